"""docs/fairseq.md's commands run exactly as the page writes them, on the committed fixture.

The `bash` blocks are read out of the page (so the page cannot drift from what is tested) and run in order
as one script, in a scratch directory where `tests/` is this checkout's: relative paths resolve as they do
from the repository root, and the outputs stay out of the checkout. Where fairseq is not installed (CI), the
page's install block itself runs first, from the repository root, in a fresh virtual environment that sees
this environment's packages (torch stays the one installed): so CI also checks that the install works as written.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "fairseq.md"
INSTALL = "pip install"  # the one block that is not run: it changes the environment
TORCHAUDIO_LINE = "ve-fairseq 0.12.3 requires torchaudio, which is not installed."


def _installed_here() -> bool:
    return importlib.util.find_spec("fairseq") is not None and all(
        (Path(sys.executable).parent / tool).exists() or shutil.which(tool)
        for tool in ("fairseq-train", "preprocess-mpnet", "pretrain-mpnet", "convert-mpnet"))


@pytest.fixture(scope="module")
def fairseq_bin(tmp_path_factory) -> Path:
    """The bin directory of an environment with fairseq and this package: this one if it has them, else a fresh
    virtual environment (--system-site-packages) in which the page's install block has run as written."""
    if _installed_here():
        return Path(sys.executable).parent
    venv = tmp_path_factory.mktemp("fairseq") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    install = next(block for block in doc_blocks() if INSTALL in block)
    # line by line as a reader would (no -e): the block ends in `pip check`, which exits 1 on the one line the
    # page announces (test_pip_check_finds_nothing_missing_but_torchaudio checks that line)
    result = subprocess.run(["bash", "-uo", "pipefail", "-c", install], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    if "No matching distribution found" in result.stderr:  # a package index without fairseq: nothing to test
        pytest.skip(f"the page's install block could not find a package: {result.stderr.strip().splitlines()[-1]}")
    bin_dir = venv / "bin"
    imported = subprocess.run([str(bin_dir / "python"), "-c", "import fairseq, mpnet.fairseq_plugin"], env=env,
                              capture_output=True, text=True, timeout=300)
    scripts = all((bin_dir / tool).exists() for tool in ("fairseq-train", "pretrain-mpnet"))
    assert imported.returncode == 0 and scripts, result.stdout[-2000:] + result.stderr[-3000:] + imported.stderr[-2000:]
    return bin_dir


def doc_blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def test_the_page_has_its_blocks():
    """What the run below relies on (checked without fairseq too): one install block, and fairseq-train among
    the commands that are run."""
    blocks = doc_blocks()
    assert sum(INSTALL in block for block in blocks) == 1
    assert any("fairseq-train $DATA_BIN" in block for block in blocks if INSTALL not in block)


@pytest.mark.slow
def test_the_commands_of_docs_fairseq_md_run_as_written(tmp_path, fairseq_bin):
    bin_dir = fairseq_bin
    (tmp_path / "tests").symlink_to(REPO / "tests", target_is_directory=True)
    script = "\n".join(block for block in doc_blocks() if INSTALL not in block)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]

    assert (tmp_path / "data" / "fixture" / "metadata.json").is_file()
    assert (tmp_path / "runs" / "fixture" / "checkpoints" / "step-00000002").is_dir()
    assert (tmp_path / "fixture-back" / "conversion.json").is_file()  # ours -> fairseq -> ours
    # fairseq-train keeps one checkpoint, and convert-mpnet reads it back
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint_last.pt"]
    assert "Stopping training due to num_updates: 2" in result.stdout + result.stderr
    assert (tmp_path / "ours" / "conversion.json").is_file()


@pytest.mark.slow
def test_pip_check_finds_nothing_missing_but_torchaudio(fairseq_bin):
    """The fairseq extra lists every requirement ve-fairseq declares except torchaudio (docs/fairseq.md says
    why it stays out); pip check says so and nothing else about ve-fairseq or this project."""
    python = fairseq_bin / "python" if (fairseq_bin / "python").exists() else Path(sys.executable)
    result = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    ours = [line for line in result.stdout.splitlines() if line.startswith(("ve-fairseq", "mpnet "))]
    assert set(ours) <= {TORCHAUDIO_LINE}, result.stdout
    assert f"pip check        # one line: {TORCHAUDIO_LINE[:-1]}" in DOC.read_text()
