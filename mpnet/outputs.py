"""What every command that writes an output shares, defined once: atomic files and directories (a reader never
sees half of one), the output-directory rule (nothing is written over something without --overwrite, and
nothing ever into a training run), and the versions recorded beside every result.

Training, fine-tuning, conversion, preprocessing, the benchmarks and the checkpoint writer all import from
here; it imports nothing of the package but its errors, so any of them can.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import torch

from .errors import UserError

# ------------------------------------------------------------------------------------------ files


def write_file_atomic(path, write):
    """`write(tmp)` fills PATH.tmp, which is then renamed to PATH: a reader never sees a half-written file.
    The file gets mode 0644 less the umask, whatever `write` created it with (safetensors creates 0600)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.chmod(tmp, 0o644 & ~_umask())
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path, text: str):
    write_file_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path, data: dict):
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def fsync_tree(directory):
    """Flush every file under `directory`, then the directory entries themselves, to the disk: after a
    rename that follows, a power loss cannot leave the new name pointing at empty files."""
    directory = Path(directory)
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_directory(path)  # (a file's descriptor flushes the same way)
    fsync_directory(directory)


def fsync_directory(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_directory_atomic(target, write):
    """The one way a directory is (re)written: `write(tmp)` fills .tmp-NAME beside TARGET, which is flushed
    to the disk and renamed into place; a previous TARGET stays (as .old-NAME) until the new one is complete.
    On any error the partial directory is removed and the previous TARGET is back under its name."""
    target = Path(target)
    tmp, old = target.with_name(f".tmp-{target.name}"), target.with_name(f".old-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        fsync_tree(tmp)  # file contents and entries on the disk before the name says "complete"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_directory(target.parent)  # the rename itself
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------- output directories

# The layout of a training run (training/checkpointing.py writes it): OUTPUT/checkpoints/step-00000200/ with
# training_state/state.pt inside. Named here because the output-directory rule below must recognise a run.
CHECKPOINTS_DIR = "checkpoints"
PREFIX = "step-"
STATE_FILE = Path("training_state") / "state.pt"


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def check_output_dir(out_dir, overwrite: bool, what: str = "this output") -> Path:
    """out_dir as a Path, refused in one line when it is a file, holds something and overwrite is not set,
    or is or holds a training run or checkpoint anywhere below it (even with overwrite: its training state
    would be lost). The one rule of every command that writes a directory; `what` names the output, e.g.
    'the conversion'."""
    out_dir = Path(out_dir).expanduser()
    found = training_checkpoint_in(out_dir)
    if found is not None:
        raise UserError(f"{out_dir} holds a training checkpoint ({found}); write {what} to a new directory "
                        "(nothing was changed)")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output directory {out_dir} is a file; choose a directory")
    if out_dir.exists() and not overwrite and any(out_dir.iterdir()):
        raise UserError(f"output directory {out_dir} already exists and is not empty "
                        f"(choose another one, or overwrite it with --overwrite)")
    return out_dir


def training_checkpoint_in(path) -> Path | None:
    """The training checkpoint that `path` is, holds anywhere below it, or would pose as (None if none): a
    directory with training_state/, a run directory with checkpoints/step-*, any folder below `path` that is
    one of these (what --overwrite would delete), or a new checkpoints/step-* that --resume would take for the
    newest step of that run. Nothing but pretraining ever writes there."""
    def run_part(folder: Path) -> Path | None:
        if (folder / STATE_FILE.parent).exists():
            return folder / STATE_FILE.parent
        root = checkpoint_root(folder)
        if root.is_dir():
            steps = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX))
            if steps:
                return steps[-1]
        return None

    path = Path(path)
    found = run_part(path)
    if found is None and path.is_dir():
        for root, folders, _ in os.walk(path):
            found = next((f for f in (run_part(Path(root) / name) for name in folders) if f is not None), None)
            if found is not None:
                break
    if found is None and path.parent.name == CHECKPOINTS_DIR and path.name.startswith(PREFIX):
        found = path
    return found


# ------------------------------------------------------------------------------------------ versions


def versions() -> dict:
    """The library versions and the device recorded beside every result (results.json, benchmark reports)."""
    import transformers

    from . import __version__

    return {"mpnet": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}
