"""Where a conversion may write: never over something without --overwrite, never into a training checkpoint.

A conversion is written into a hidden temporary sibling of the output directory, verified there, and renamed
into place only when complete (mpnet.data.preprocess.output_workspace): a failed or refused conversion leaves
the output directory exactly as it was.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from ..errors import UserError


def training_checkpoint_in(path: Path) -> Path | None:
    """The training checkpoint that `path` is, holds, or would pose as (None if none): a directory with
    training_state/, a run directory with checkpoints/step-*, or a new checkpoints/step-* that --resume would
    take for the newest step of that run."""
    from ..training.checkpointing import PREFIX, STATE_FILE, checkpoint_root

    if (path / STATE_FILE.parent).exists():
        return path / STATE_FILE.parent
    root = checkpoint_root(path)
    if root.is_dir():
        steps = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX))
        if steps:
            return steps[-1]
    if path.parent.name == checkpoint_root(Path()).name and path.name.startswith(PREFIX):
        return path
    return None


def check_conversion_output(output_dir, overwrite: bool) -> Path:
    """output_dir as a Path; refused in one line when it is a file, a non-empty directory without overwrite, or
    a training checkpoint (even with overwrite: its training state would be lost). Converters call it before
    any work, and conversion_output again right before writing."""
    from ..data.preprocess import check_output_dir

    output_dir = Path(output_dir).expanduser()
    found = training_checkpoint_in(output_dir)
    if found is not None:
        raise UserError(f"{output_dir} holds a training checkpoint ({found}); write the conversion to a new "
                        f"directory (nothing was changed)")
    return check_output_dir(output_dir, overwrite)


@contextlib.contextmanager
def conversion_output(output_dir, overwrite: bool):
    """Yields the temporary directory to write the conversion into; it becomes output_dir when the block ends
    without an error (see check_conversion_output for what is refused)."""
    from ..data.preprocess import output_workspace

    output_dir = check_conversion_output(output_dir, overwrite)
    with output_workspace(output_dir, overwrite) as tmp:
        yield tmp
