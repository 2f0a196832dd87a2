"""Running the command-line tools from tests: in-process (`call_main`) or as real processes (`run_cli`),
installed with `pip install -e .` or not (then a folder maps cli/ to `mpnet_cli`, as setup.py does)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cli_shim() -> Path:
    """A folder exposing this checkout's cli/ as `mpnet_cli` (what setup.py's package_dir does), so the
    CLIs run installed or not."""
    shim = Path(tempfile.gettempdir()) / f"mpnet-cli-shim-{hashlib.sha1(str(REPO).encode()).hexdigest()[:12]}"
    if not (shim / "mpnet_cli").exists():
        shim.mkdir(exist_ok=True)
        try:
            (shim / "mpnet_cli").symlink_to(REPO / "cli", target_is_directory=True)
        except FileExistsError:
            pass
    return shim


def cli_main(module: str):
    """The main() of `mpnet_cli.<module>`, importable whether or not the package is installed."""
    import importlib

    try:
        return importlib.import_module(f"mpnet_cli.{module}").main
    except ModuleNotFoundError:
        sys.path.append(str(_cli_shim()))
        return importlib.import_module(f"mpnet_cli.{module}").main


def cli_env(**extra) -> dict:
    """os.environ plus a PYTHONPATH under which `python -m mpnet_cli.<module>` runs this checkout."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(_cli_shim()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_cli(module: str, *args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """Run `python -m mpnet_cli.<module>` as a real process (exit status, stderr, no traceback)."""
    env = cli_env()
    return subprocess.run([sys.executable, "-m", f"mpnet_cli.{module}", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or REPO, env=env, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str):
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def call_main(main, *args) -> tuple[int, str]:
    """Call a CLI's main() in-process (faster than a subprocess); returns (exit code, captured stderr)."""
    import contextlib
    import io

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, err.getvalue()


def assert_one_line_error_text(code: int, stderr: str, *fragments: str):
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
