"""Pretraining does not lose work: non-finite steps are skipped and stop the run, checkpoints are never
NaN, a full disk or a busy output directory is one clear line. In-process runs of a tiny model (CPU)."""
from __future__ import annotations

import math

import pytest
import torch

from pretrain_support import (TINY_RUN, checkpoint_steps, error_line, poison_steps, pretrain, rows, train_losses,
                              weights)


def run(out, shards, *extra):
    return pretrain("--output-dir", out, "--data", shards, "--log-every", 1, *TINY_RUN, *extra)


# ------------------------------------------------------------------------------- non-finite steps


def test_an_isolated_nonfinite_step_is_skipped_without_an_update(prefix_shards, tmp_path, monkeypatch):
    poison_steps(monkeypatch, {3})
    out = tmp_path / "run"
    code, stderr = run(out, prefix_shards, "--max-steps", 5, "--save-every", 1, "logging.keep_last=0")
    assert code == 0, stderr
    losses = train_losses(out)
    assert losses[3] is None and all(math.isfinite(losses[s]) for s in (1, 2, 4, 5))
    assert [r["train/skipped_steps"] for r in rows(out) if "train/loss" in r] == [0, 0, 1, 1, 1]
    before, skipped, after = weights(out, 2), weights(out, 3), weights(out, 4)
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # step 3 changed nothing
    assert any(not torch.equal(skipped[k], after[k]) for k in before)  # step 4 trained again


def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_good_checkpoint(prefix_shards, tmp_path, monkeypatch,
                                                                             capsys):
    poison_steps(monkeypatch, set(range(5, 100)))
    out = tmp_path / "run"
    code, stderr = run(out, prefix_shards, "--max-steps", 20, "--save-every", 2, "logging.keep_last=1",
                       "training.max_nonfinite_steps=3")
    line = error_line(code, stderr)
    assert "step 7: 3 optimizer steps in a row (since step 5)" in line, line
    assert "optim.lr=" in line and "bad data" in line and "step-00000006" in line, line
    assert checkpoint_steps(out) == [6]  # written during the streak: the last good weights, kept by rotation
    good = weights(out, 6)
    assert all(torch.isfinite(v).all() for v in good.values())
    assert capsys.readouterr().out.count("update skipped") == 2  # steps 5 and 6 logged; step 7 is the stop


def test_a_learning_rate_that_diverges_stops_with_the_cause(prefix_shards, tmp_path):
    out = tmp_path / "run"
    code, stderr = run(out, prefix_shards, "--max-steps", 40, "--save-every", 3, "optim.lr=1e6",
                       "training.max_nonfinite_steps=4")
    line = error_line(code, stderr)
    assert "in a row" in line and "optim.lr=1000000.0" in line and "learning rate too high" in line, line
    for step in checkpoint_steps(out):
        assert all(torch.isfinite(v).all() for v in weights(out, step).values()), step


def test_weights_that_overflow_are_never_saved(prefix_shards, tmp_path, monkeypatch):
    """An update that itself overflows (finite gradients, infinite weights): the save refuses."""
    original = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    out = tmp_path / "run"
    code, stderr = run(out, prefix_shards, "--max-steps", 2, "--save-every", 1)
    line = error_line(code, stderr)
    assert "step 1: the weights are no longer finite, so no checkpoint was written" in line, line
    assert "no checkpoint has been written yet" in line
    assert checkpoint_steps(out) == [] and not list((out / "checkpoints").glob(".tmp*"))


def test_resume_refuses_a_checkpoint_with_nonfinite_weights(prefix_shards, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    assert run(out, prefix_shards, "--max-steps", 2, "--save-every", 1, "logging.keep_last=0")[0] == 0
    file = out / "checkpoints" / "step-00000002" / "model.safetensors"
    state = load_file(file)
    name = next(iter(state))
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, file, metadata={"format": "pt"})
    line = error_line(*run(out, prefix_shards, "--max-steps", 4, "--save-every", 1, "--resume",
                           "logging.keep_last=0"))
    assert "step-00000002 holds non-finite weights" in line and "delete it" in line, line


def test_rotation_keeps_the_checkpoint_just_written(tmp_path):
    from mpnet.training.checkpointing import rotate

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"step-{step:08d}").mkdir(parents=True)
    rotate(tmp_path, keep_last=1, newest=root / "step-00000004")  # step-6: not ours, e.g. copied in by hand
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000006"]
