"""What every command shares: user errors become one line on stderr and a non-zero exit."""
from __future__ import annotations

import functools
import logging
import sys

from mpnet.errors import UserError


def command(main):
    """Wrap a CLI main(): UserError and friends -> 'NAME: error: message' on stderr, exit 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        name = main.__module__.rsplit(".", 1)[-1]
        try:
            return main(argv)
        except UserError as err:
            print(f"{name}: error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print(f"{name}: interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
