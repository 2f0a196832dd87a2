import sys

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def benchmark_main(monkeypatch):
    """benchmark-mpnet's main() in-process. cli_main may put a shim for `mpnet_cli` on sys.path; it is
    taken away afterwards, so later tests still see whether the package is really installed."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    from cli_support import cli_main

    before = set(sys.modules)
    yield cli_main("benchmark")
    for name in set(sys.modules) - before:
        if name == "mpnet_cli" or name.startswith("mpnet_cli."):
            del sys.modules[name]
