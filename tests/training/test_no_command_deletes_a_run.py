"""No command deletes or overwrites a training run, with or without --overwrite: the run directory itself, its
checkpoints/ folder, one checkpoint, or any folder above the run (outputs.check_output_dir, the one rule every
writing command calls). Each command is refused in one line and every file of the run is left as it was."""
from __future__ import annotations

from pathlib import Path

import pytest

from cli_support import assert_one_line_error_text, call_main, cli_main
from mpnet.outputs import training_checkpoint_in


def make_run(root: Path) -> Path:
    run = root / "runs" / "tiny"
    state = run / "checkpoints" / "step-00000010" / "training_state"
    state.mkdir(parents=True)
    (state / "state.pt").write_bytes(b"optimizer state")
    (run / "checkpoints" / "step-00000010" / "model.safetensors").write_bytes(b"weights")
    (run / "metrics.jsonl").write_text('{"step": 10}\n')
    return run


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def targets(run: Path) -> list[Path]:
    return [run, run / "checkpoints", run / "checkpoints" / "step-00000010", run.parent, run.parent.parent]


def test_the_rule_finds_the_run_from_every_target(tmp_path):
    run = make_run(tmp_path)
    for target in targets(run):
        assert training_checkpoint_in(target) is not None, target
    assert training_checkpoint_in(run / "checkpoints" / "step-00000020") is not None  # would pose as the newest
    (tmp_path / "elsewhere" / "finetune").mkdir(parents=True)
    assert training_checkpoint_in(tmp_path / "elsewhere") is None


@pytest.mark.parametrize("command", ["preprocess", "convert-hf"])
def test_writing_commands_refuse_every_target_even_with_overwrite(tmp_path, command):
    run = make_run(tmp_path / "work")
    before = files_of(tmp_path / "work")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some text to tokenize.\n\nAnother document.\n")
    for target in targets(run):
        if command == "preprocess":
            code, err = call_main(cli_main("preprocess"), corpus, "--output-dir", target, "--overwrite")
        else:
            code, err = call_main(cli_main("convert"), "hf", tmp_path / "any-hf-dir", "--output-dir", target,
                                  "--overwrite")
        assert_one_line_error_text(code, err, "holds a training checkpoint", "nothing was changed")
        assert files_of(tmp_path / "work") == before, target
