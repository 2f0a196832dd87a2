"""Where a conversion may write: never over something without --overwrite, never into a training checkpoint.

A conversion is written into a hidden temporary sibling of the output directory, verified there, and renamed
into place only when complete (mpnet.data.shards.output_workspace): a failed or refused conversion leaves
the output directory exactly as it was.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from ..outputs import check_output_dir


def check_conversion_output(output_dir, overwrite: bool) -> Path:
    """output_dir as a Path; refused in one line when it is a file, a non-empty directory without overwrite, or
    a training checkpoint (even with overwrite: its training state would be lost). Converters call it before
    any work, and conversion_output again right before writing."""
    return check_output_dir(output_dir, overwrite, "the conversion")


@contextlib.contextmanager
def conversion_output(output_dir, overwrite: bool):
    """Yields the temporary directory to write the conversion into; it becomes output_dir when the block ends
    without an error (see check_conversion_output for what is refused)."""
    from ..data.shards import output_workspace

    output_dir = check_conversion_output(output_dir, overwrite)
    with output_workspace(output_dir, overwrite) as tmp:
        yield tmp
