"""Small in-process pretraining runs for the fail-safe, resume and lock tests (no tests in here).

One tiny model (2 layers, hidden 32, blocks of 32 tokens, 2 examples per step) on a preprocessed prefix
of the embedded corpus: a step takes well under a second on a CPU, so each test runs a handful of them.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from cli_support import call_main, cli_main

TINY_RUN = ["model.hidden_size=32", "model.num_attention_heads=2", "model.intermediate_size=64",
            "model.num_hidden_layers=2", "data.block_size=32", "training.batch_size=2", "logging.valid_every=1000",
            "logging.valid_batches=1", "logging.progress_bar=false", "optim.warmup_steps=2"]


def embedded_prefix(path: Path, size: int = 60_000) -> Path:
    """The first `size` characters of the embedded corpus as a text file, cut at a document boundary."""
    from mpnet.data import EMBEDDED_CORPUS

    with gzip.open(EMBEDDED_CORPUS, "rt", encoding="utf-8") as handle:
        text = handle.read(size)
    path.write_text(text.rsplit("\n\n", 1)[0] + "\n", encoding="utf-8")
    return path


def preprocess_prefix(folder: Path) -> Path:
    from mpnet.data import preprocess_corpus

    out = folder / "shards"
    preprocess_corpus(embedded_prefix(folder / "austen-prefix.txt"), out, tokenizer="default", valid_fraction=0.05,
                      workers=1, progress=False)
    return out


def pretrain(*args) -> tuple[int, str]:
    """pretrain-mpnet in-process: (exit code, stderr)."""
    return call_main(cli_main("pretrain"), *args)


def rows(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def train_losses(output_dir) -> dict[int, float | None]:
    return {r["step"]: r["train/loss"] for r in rows(output_dir) if "train/loss" in r}


def checkpoint_steps(output_dir) -> list[int]:
    root = Path(output_dir) / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*")) if root.is_dir() else []


def weights(output_dir, step: int) -> dict[str, torch.Tensor]:
    from mpnet.modeling.checkpoint import read_state_dict

    return read_state_dict(Path(output_dir) / "checkpoints" / f"step-{step:08d}")


def error_line(code: int, stderr: str) -> str:
    """The one 'error:' line of a failed run (and no traceback)."""
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    return errors[0]


def poison_steps(monkeypatch, bad_steps, grad_accum: int = 1):
    """Make the training forward of the given 1-based optimizer steps return NaN logits (as a bad batch or
    a diverged model would); evaluation forwards are untouched. Counts from the run's first step."""
    from mpnet import MPNetForPretraining

    original = MPNetForPretraining.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        logits = original(self, *args, **kwargs)
        if self.training:
            step = calls["n"] // grad_accum + 1
            calls["n"] += 1
            if step in bad_steps:
                logits = logits * float("nan")
        return logits

    monkeypatch.setattr(MPNetForPretraining, "forward", forward)


def assert_same_run(a_dir, b_dir, step: int):
    """Two runs trained the same model: losses at every logged step (rel 1e-5) and the step-`step` checkpoint
    (rtol 1e-4, atol 1e-5), e.g. two processes or two nodes against one process with gradient accumulation."""
    import pytest

    a, b = train_losses(a_dir), train_losses(b_dir)
    assert sorted(a) == sorted(b) and a, (sorted(a), sorted(b))
    for logged in a:
        assert b[logged] == pytest.approx(a[logged], rel=1e-5), (logged, a[logged], b[logged])
    one, two = weights(a_dir, step), weights(b_dir, step)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
