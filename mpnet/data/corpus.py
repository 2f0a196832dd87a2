"""Reading raw corpora: which files, and the documents inside them.

Formats (by file name):
- `.jsonl`, `.jsonl.gz`, `.ndjson`: one JSON object per line; the document is the value of `text_field`.
- anything else (`.txt`, `.txt.gz`, ...): UTF-8 text, one document per blank-line-separated block (the block's
  lines are kept, joined by newlines), or one document per non-empty line with `line_per_document=True`.
- a folder that Hugging Face `datasets` saved (`save_to_disk`): the document is the value of `text_field` in each
  row (mpnet/hf_datasets.py). A saved DatasetDict is read through its `train` split, and its validation split, when it
  has one, is the validation split (the source fixes the split); otherwise the seeded hash decides, as for text.
A `.gz` suffix means gzip. Directories are searched recursively for `.txt`, `.text`, `.jsonl`, `.ndjson` files
(optionally `.gz`); hidden files are skipped. Documents that are only whitespace are skipped.
"""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Iterable, Iterator

from mpnet.errors import UserError

from ..hf_datasets import dataset_files, pretraining_splits, saved_dataset_kind, text_documents

# Jane Austen's six novels, one document per chapter (see mpnet/resources/corpus/README.md). The input name
# "embedded" stands for it wherever a corpus path is accepted.
EMBEDDED_CORPUS = Path(__file__).resolve().parent.parent / "resources" / "corpus" / "austen.txt.gz"
EMBEDDED_NAME = "embedded"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text")


def _base_suffix(path: Path) -> str:
    name = path.name.lower()
    return Path(name[:-3]).suffix if name.endswith(".gz") else path.suffix.lower()


def file_format(path) -> str:
    if saved_dataset_kind(path):
        return "hf-dataset"
    return "jsonl" if _base_suffix(Path(path)) in JSONL_SUFFIXES else "text"


def source_files(source: Path) -> list[Path]:
    """The files a source is read from: itself, or every file of a saved dataset folder."""
    return dataset_files(source) if saved_dataset_kind(source) else [source]


def list_sources(inputs) -> list[Path]:
    """Expand inputs (a path or a list of paths; directories recursively; "embedded" = EMBEDDED_CORPUS) into a
    de-duplicated file list (directory contents sorted by name); a saved HF dataset folder stays one source."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    files = []
    for item in inputs:
        path = Path(item).expanduser()
        if str(item) == EMBEDDED_NAME and not path.exists():
            path = EMBEDDED_CORPUS
        if path.is_dir() and saved_dataset_kind(path):
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                           and _base_suffix(p) in JSONL_SUFFIXES + TEXT_SUFFIXES)
            if not found:
                raise UserError(f"corpus directory {path} holds no .txt/.jsonl files (optionally .gz)")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise UserError(f"corpus path {path} is not a regular file or directory")
        else:
            raise UserError(f"corpus not found: {path}")
    if not files:
        raise UserError("no corpus given")
    unique = dict.fromkeys(p.resolve() for p in files)  # keep order, drop repeats
    return list(unique)


def _open_text(path: Path) -> io.TextIOBase:
    try:
        if path.name.lower().endswith(".gz"):
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
        return open(path, encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None


def _lines(path: Path) -> Iterator[str]:
    """Lines of a (possibly gzipped) UTF-8 file; read failures become one-line UserErrors."""
    f = _open_text(path)
    lines_read = 0
    try:
        with f:
            for line in f:
                yield line
                lines_read += 1
    except UnicodeDecodeError as err:  # text is decoded in chunks: the bad byte is at or after the next line
        raise UserError(f"cannot read {path}: it is not UTF-8 text (byte 0x{err.object[err.start]:02x}, from line "
                        f"{lines_read + 1} on); convert it first, e.g. iconv -f latin1 -t utf-8 {path} > "
                        f"{Path(path).stem}.utf8.txt") from None
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError; a truncated gzip raises EOFError
        raise UserError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None


def _text_documents(path: Path, line_per_document: bool) -> Iterator[str]:
    block = []
    for line in _lines(path):
        line = line.rstrip()
        if line_per_document:
            if line.strip():
                yield line.strip()
        elif line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for lineno, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {lineno} is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise UserError(f"{path} line {lineno} has no '{text_field}' field (choose the field with --text-field)")
        text = record[text_field]
        if not isinstance(text, str):
            raise UserError(f"{path} line {lineno}: field '{text_field}' is not a string")
        if text.strip():
            yield text


def documents_with_splits(files: Iterable[Path], text_field: str = "text",
                          line_per_document: bool = False) -> Iterator[tuple[str | None, str]]:
    """(split, document) for all non-empty documents of all sources, in source order: split is "train" or
    "valid" where the source fixes it (a saved DatasetDict with a validation split), else None."""
    for path in files:
        fmt = file_format(path)
        if fmt == "hf-dataset":
            for split, dataset in pretraining_splits(path):
                where = f"{path}[{split}]" if split else str(path)
                yield from ((split, text) for text in text_documents(dataset, text_field, where))
        elif fmt == "jsonl":
            yield from ((None, text) for text in _jsonl_documents(path, text_field))
        else:
            yield from ((None, text) for text in _text_documents(path, line_per_document))


def iter_documents(files: Iterable[Path], text_field: str = "text", line_per_document: bool = False) -> Iterator[str]:
    """All non-empty documents of all sources, in source order."""
    return (text for _, text in documents_with_splits(files, text_field, line_per_document))
