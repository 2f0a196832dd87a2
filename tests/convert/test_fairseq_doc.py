"""docs/fairseq.md's commands run exactly as the page writes them, on the committed fixture.

The `bash` blocks are read out of the page (so the page cannot drift from what is tested) and run in order
as one script, in a scratch directory where `tests/` is this checkout's: relative paths resolve as they do
from the repository root, and the outputs stay out of the checkout. Skipped without fairseq.
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

needs_fairseq = pytest.mark.skipif(importlib.util.find_spec("fairseq") is None,
                                   reason="fairseq is not installed (docs/fairseq.md: pip install -c constraints.txt "
                                          "-e '.[fairseq]' && pip install --no-deps ve-fairseq==0.12.3)")


def doc_blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)


def test_the_page_has_its_blocks():
    """What the run below relies on (checked without fairseq too): one install block, and fairseq-train among
    the commands that are run."""
    blocks = doc_blocks()
    assert sum(INSTALL in block for block in blocks) == 1
    assert any("fairseq-train $DATA_BIN" in block for block in blocks if INSTALL not in block)


@pytest.mark.slow
@needs_fairseq
def test_the_commands_of_docs_fairseq_md_run_as_written(tmp_path):
    bin_dir = Path(sys.executable).parent
    if not all((bin_dir / tool).exists() or shutil.which(tool) for tool in
               ("fairseq-train", "preprocess-mpnet", "pretrain-mpnet", "convert-mpnet")):
        pytest.skip("the console scripts are not installed (pip install -e .)")
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


@needs_fairseq
def test_pip_check_finds_nothing_missing_but_torchaudio():
    """The fairseq extra lists every requirement ve-fairseq declares except torchaudio (docs/fairseq.md says
    why it stays out); pip check says so and nothing else about ve-fairseq or this project."""
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    ours = [line for line in result.stdout.splitlines() if line.startswith(("ve-fairseq", "mpnet "))]
    assert set(ours) <= {TORCHAUDIO_LINE}, result.stdout
    assert f"pip check        # one line: {TORCHAUDIO_LINE[:-1]}" in DOC.read_text()
