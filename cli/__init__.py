"""Command-line entry points (installed as the package `mpnet_cli`). Each parses arguments and calls the library."""
