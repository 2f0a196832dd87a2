"""Training checkpoints: an HF model directory plus `training_state/`, written atomically.

Layout: OUTPUT/checkpoints/step-00000200/{config.json, model.safetensors, tokenizer files,
training_state/state.pt, training_state/run_config.yaml}. A checkpoint is first written under a
hidden temporary name, flushed to the disk (files and directory) and renamed when complete, so neither a
crash nor a power loss leaves a half-written directory under a real name, and the newest complete one is
always the one to resume from. A save that fails (a full disk) removes its partial directory and says so
in one line.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError

from ..errors import UserError
from ..modeling.checkpoint import CheckpointError
# the run layout is named in outputs.py, whose output-directory rule must recognise a run
from ..outputs import PREFIX, STATE_FILE, checkpoint_root, write_directory_atomic


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit():
            found.append((int(path.name[len(PREFIX):]), path))
    return sorted(found)


# A good checkpoint: complete, finite weights (no other is written), and a validation loss that is finite and not
# above the run's recent level, i.e. at most RECENT_LEVEL_FACTOR x the lowest of the RECENT_VALIDATIONS validations
# before it and of the untrained model's (a checkpoint worse than no training is never good, however long it
# stays there). Finite weights alone are not enough: optim.lr=1e6 keeps them finite (the guard skips the NaN
# updates) while every loss is NaN. A loss that rises by a quarter is a divergence, not noise (valid losses of
# one run move by a few percent between validations).
HEALTH_FILE = Path("training_state") / "health.json"
RECENT_VALIDATIONS = 5
RECENT_LEVEL_FACTOR = 1.25


def checkpoint_health(valid_loss: float | None, recent: list[float], untrained: float | None = None) -> dict:
    """health.json of a checkpoint: its validation loss (None: the run has no validation split, and then finite
    weights are the rule), the recent level it was held to, and the verdict. `untrained`: the loss before
    step 1 (None for a run resumed from a checkpoint written before it was recorded)."""
    if valid_loss is None:
        return {"valid_loss": None, "recent_level": None, "good": True}
    bounds = [x for x in recent[-RECENT_VALIDATIONS:] + [untrained] if x is not None and math.isfinite(x)]
    level = min(bounds) if bounds else None
    finite = math.isfinite(valid_loss)
    good = finite and (level is None or valid_loss <= RECENT_LEVEL_FACTOR * level)
    return {"valid_loss": valid_loss if finite else None, "recent_level": level, "good": good}


def health_words(health: dict) -> str:
    """Why a checkpoint is not good, e.g. 'valid loss 9.1 above 1.25 x its recent level 6.2'."""
    if health.get("valid_loss") is None:
        return "its validation loss is not finite"
    return (f"valid loss {health['valid_loss']:.4g} above {RECENT_LEVEL_FACTOR} x its recent level "
            f"{health['recent_level']:.4g}")


def read_health(path) -> dict:
    """A checkpoint's health.json; one written before the rule existed counts as good (its weights are finite)."""
    try:
        return json.loads((Path(path) / HEALTH_FILE).read_text())
    except (OSError, ValueError):
        return {"good": True}


def good_checkpoints(output_dir) -> list[tuple[int, Path]]:
    return [(step, path) for step, path in list_checkpoints(output_dir)
            if (path / STATE_FILE).is_file() and read_health(path).get("good", True)]


def last_good_checkpoint(output_dir) -> str:
    """'the last good checkpoint is step M (PATH)', for the messages of a run that stops."""
    checkpoints = good_checkpoints(output_dir)
    if not checkpoints:
        return ("no good checkpoint has been written yet" if list_checkpoints(output_dir)
                else "no checkpoint has been written yet")
    step, path = checkpoints[-1]
    return f"the last good checkpoint is step {step} ({path})"


class CheckpointSaveError(UserError):
    """A checkpoint could not be written (disk full, read-only, permissions); nothing already saved is lost."""


def save_checkpoint(output_dir, step: int, model, tokenizer, state: dict, run_config: dict, keep_last: int,
                    needed_bytes: int | None = None, health: dict | None = None) -> Path:
    """Write step `step` under a temporary name, flush it to the disk, rename it into place, then rotate.
    Any OS error (a full disk above all) removes the partial directory and raises CheckpointSaveError,
    one line naming the filesystem, the space needed and the last good checkpoint, which stays intact."""
    root = checkpoint_root(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    last_good = last_good_checkpoint(output_dir)

    def write(tmp):
        model.save_pretrained(tmp, tokenizer=tokenizer)
        (tmp / STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp / STATE_FILE)
        (tmp / STATE_FILE.parent / "run_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        if health is not None:
            (tmp / HEALTH_FILE).write_text(json.dumps(health) + "\n")

    try:
        root.mkdir(parents=True, exist_ok=True)
        write_directory_atomic(final, write)  # re-saving a step: the old copy stays until the new one is in place
    except (OSError, RuntimeError, SafetensorError) as err:  # torch.save and safetensors wrap write errors
        message = save_failure(err, f"saving step {step} to {root}", root, needed_bytes, last_good)
        if message is None:
            raise
        raise CheckpointSaveError(message) from None
    rotate(output_dir, keep_last, newest=final)
    return final


def remove_partial_saves(output_dir):
    """Delete what an interrupted save left behind (`.tmp-step-*`): it holds space and is never resumed from."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for path in root.glob(".tmp-" + PREFIX + "*"):
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------ disk space

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def tensor_bytes(obj, _seen=None) -> int:
    """Bytes of every tensor in a (nested) state, tied weights counted once: what a checkpoint of it takes
    on disk, near enough."""
    seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.numel())
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def filesystem_of(path) -> str:
    """The mount point holding `path` and its type, e.g. '/mnt/scratch (tmpfs)'."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    kind = None
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[1].replace("\\040", " ") == str(path):
                    kind = fields[2]
    except OSError:
        pass
    return f"{path} ({kind})" if kind else str(path)


def free_bytes(path) -> int | None:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 2**20:.1f} MB"


def no_space_message(doing: str, where, needed_bytes: int | None, last_good: str) -> str:
    free = free_bytes(where)
    needs = f"; needs about {_mb(needed_bytes)}" if needed_bytes else ""
    has = f" ({_mb(free)} free)" if free is not None else ""
    return f"no space left on {filesystem_of(where)} while {doing}{needs}{has}; {last_good}"


def save_failure(err, doing: str, where, needed_bytes: int | None, last_good: str) -> str | None:
    """The one line for a failed write, or None when `err` is not a disk problem (then it is re-raised)."""
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        return no_space_message(doing, where, needed_bytes, last_good)
    if isinstance(err, OSError):
        target = f" ({err.filename})" if err.filename else ""
        return f"cannot write while {doing}: {err.strerror or err}{target}; {last_good}"
    free = free_bytes(where)  # torch.save / safetensors report a full disk as a plain write failure
    if needed_bytes and free is not None and free < needed_bytes:
        return no_space_message(doing, where, needed_bytes, last_good)
    return None


def check_space(output_dir, needed_bytes: int, step: int, last_good: str):
    """Refuse to start (or resume) a run whose next checkpoint cannot fit: say so now, not after hours."""
    free = free_bytes(output_dir)
    if free is not None and free < needed_bytes:
        raise CheckpointSaveError(no_space_message(f"preparing to save step {step} to {checkpoint_root(output_dir)}",
                                                   output_dir, needed_bytes, last_good))


def rotate(output_dir, keep_last: int, newest: Path):
    """Keep the `keep_last` newest checkpoints (0: all), always `newest`, the one just written, and always the
    last good one (a run that diverged keeps the checkpoint to go back to)."""
    if keep_last <= 0:
        return
    good = good_checkpoints(output_dir)
    keep = {newest} | ({good[-1][1]} if good else set())
    for _, old in list_checkpoints(output_dir)[:-keep_last]:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


def checkpoint_problem(path) -> str | None:
    """Why checkpoint `path` cannot be resumed from (None: it can), read cheaply: the config parses, the weights'
    header and length agree (safetensors checks both on open), the state archive has its end record (a
    truncated zip loses it). The full read happens when the run loads it."""
    import zipfile

    from safetensors import safe_open

    path = Path(path)
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        return f"config.json: {type(err).__name__}"
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
            handle.keys()
    except (OSError, SafetensorError) as err:
        return f"model.safetensors: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    try:
        with zipfile.ZipFile(path / STATE_FILE):
            pass
    except (OSError, zipfile.BadZipFile) as err:
        return f"{STATE_FILE}: {type(err).__name__}"
    return None


def load_training_state(path) -> dict:
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} has no {STATE_FILE}; it is not a resumable checkpoint")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated pickles raise a zoo of types
        raise CheckpointError(f"cannot read {file} ({type(err).__name__}); the checkpoint is truncated or corrupt. "
                              "Delete that directory to resume from the previous one") from None
