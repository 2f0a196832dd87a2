"""What the scripts that run the project's commands in their own process share (learning_dynamics.py,
quality_benchmark.py): the one-line failure, the --out argument and the checks before the first run."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path


def failer(prog: str):
    """fail(message): stop with one line, `PROG: error: message`, as the commands do."""
    def fail(message: str):
        sys.exit(f"{prog}: error: {message}")
    return fail


def output_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The script's parser: its docstring's first paragraph as description, defaults shown, and --out."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="a new (or empty) folder for every run and the report")
    return parser


def begin_run(script: str, args, argv, fail) -> str:
    """Before the first run: --out must be new or empty, and on --device cpu CUDA is hidden (the commands run
    where CUDA is; before torch starts). Returns the command line as typed, for the report."""
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.out.exists() and any(args.out.iterdir()):
        fail(f"--out {args.out} is not empty; choose a new folder (nothing was overwritten)")
    words = sys.argv[1:] if argv is None else argv
    return f"PYTHONPATH=.:/tmp/shim python3 scripts/{script} " + " ".join(shlex.quote(str(a)) for a in words)
