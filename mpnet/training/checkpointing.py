"""Training checkpoints: an HF model directory plus `training_state/`, written atomically.

Layout: OUTPUT/checkpoints/step-00000200/{config.json, model.safetensors, tokenizer files,
training_state/state.pt, training_state/run_config.yaml}. A checkpoint is first written under a
hidden temporary name and renamed when complete, so a crash never leaves a half-written directory
under a real name and the newest complete one is always the one to resume from.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import yaml

from ..modeling.checkpoint import CheckpointError

STATE_FILE = Path("training_state") / "state.pt"
PREFIX = "step-"


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit():
            found.append((int(path.name[len(PREFIX):]), path))
    return sorted(found)


def last_good_checkpoint(output_dir) -> str:
    """'the last good checkpoint is step M (PATH)', for the messages of a run that stops."""
    checkpoints = [(step, path) for step, path in list_checkpoints(output_dir) if (path / STATE_FILE).is_file()]
    if not checkpoints:
        return "no checkpoint has been written yet"
    step, path = checkpoints[-1]
    return f"the last good checkpoint is step {step} ({path})"


def save_checkpoint(output_dir, step: int, model, tokenizer, state: dict, run_config: dict, keep_last: int) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer=tokenizer)
    (tmp / STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp / STATE_FILE)
    (tmp / STATE_FILE.parent / "run_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
    if final.exists():  # re-saving the same step (e.g. the final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    rotate(output_dir, keep_last, newest=final)
    return final


def rotate(output_dir, keep_last: int, newest: Path):
    """Keep the `keep_last` newest checkpoints (0: all), and always `newest`, the one just written: only
    checkpoints with finite weights are written, so the newest finite and complete one is never deleted."""
    if keep_last <= 0:
        return
    for _, old in list_checkpoints(output_dir)[:-keep_last]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def load_training_state(path) -> dict:
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} has no {STATE_FILE}; it is not a resumable checkpoint")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated pickles raise a zoo of types
        raise CheckpointError(f"cannot read {file} ({type(err).__name__}); the checkpoint is truncated or corrupt. "
                              "Delete that directory to resume from the previous one") from None
