"""The preprocessed (shard) directory that training memory-maps, whatever it was made from: its layout, its
metadata.json and the atomic way it is written. preprocess.py fills it from raw text, fairseq_data.py from a
fairseq data-bin; both write through the helpers here.

    metadata.json          tokenizer identity, vocab size, dtype, special ids, document/token counts, sources
    train.bin, valid.bin   every document's token ids back to back (no special tokens), numpy uint16 or uint32
    train.idx.npy, valid.idx.npy
                           int64 document boundaries: document i is bin[idx[i]:idx[i + 1]]; idx[0] = 0,
                           idx[-1] = number of tokens
    tokenizer/             an HF-format copy of the tokenizer (plus sentencepiece.model when one was trained)

Everything is written into a temporary sibling directory (`output_workspace`), renamed into place at the end.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mpnet.errors import UserError

from .tokenizer import special_token_ids, tokenizer_identity

FORMAT_VERSION = 1
SPLITS = ("train", "valid")


@contextlib.contextmanager
def output_workspace(out_dir: Path, overwrite: bool):
    """A hidden temporary sibling of out_dir to write into; renamed into place when the block succeeds, removed
    when it fails (nothing half-written is ever left behind)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the final output should be readable like any other directory
    try:
        yield tmp
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool):
    """Atomic rename; an existing output is moved aside first and deleted only after the new one is in place."""
    old = None
    if out_dir.exists():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        elif overwrite:
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        else:  # appeared while we were working (another process preprocessing the same thing)
            raise UserError(f"output directory {out_dir} already exists and is not empty")
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_document_index(tmp: Path):
    """{split}.lengths (int64 per document) -> {split}.idx.npy (int64 offsets, starting at 0)."""
    for s in SPLITS:
        doc_lengths = np.fromfile(tmp / f"{s}.lengths", dtype=np.int64)
        np.save(tmp / f"{s}.idx.npy", np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64))
        (tmp / f"{s}.lengths").unlink()


def shard_metadata(tok, tokenizer_source: str, dtype: np.dtype, num_docs: dict, num_tokens: dict) -> dict:
    """The metadata.json keys every shard directory has, whatever it was made from."""
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_identity(tok),
        "tokenizer_source": tokenizer_source,
        "tokenizer_dir": "tokenizer",
        "vocab_size": len(tok),
        "dtype": dtype.name,
        "pad_token_id": tok.pad_token_id,
        "mask_token_id": tok.mask_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "unk_token_id": tok.unk_token_id,
        "special_token_ids": special_token_ids(tok),
        "num_documents": num_docs,
        "num_tokens": num_tokens,
    }


def read_metadata(shard_dir) -> dict:
    """metadata.json of a preprocessed directory, checked for the keys training relies on."""
    path = Path(shard_dir).expanduser() / "metadata.json"
    if not path.is_file():
        raise UserError(f"{shard_dir} is not a preprocessed data directory (no metadata.json); "
                        f"run preprocess-mpnet on your corpus first")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    missing = [k for k in ("tokenizer", "vocab_size", "dtype", "num_tokens", "pad_token_id", "mask_token_id")
               if k not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; re-run preprocess-mpnet")
    return meta


def is_preprocessed(data) -> bool:
    """Whether `data` (a --data value: a path, a list of paths, 'embedded') is a preprocess-mpnet directory."""
    return isinstance(data, (str, Path)) and (Path(data).expanduser() / "metadata.json").is_file()
