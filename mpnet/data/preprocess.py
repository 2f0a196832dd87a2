"""Raw corpus -> binarized token shards that training memory-maps (the layout: shards.py); `resolve_data`, what
`--data` points at -> a shard directory.

Each document goes to the validation split when a seeded hash of its text falls below `valid_fraction`: the
split does not depend on document order, file layout or the number of workers, and identical documents always
land in the same split. If that leaves the validation split empty (a small corpus), the training document with
the lowest hash is moved there. A source that fixes the split itself (a saved DatasetDict with a validation
split, corpus.py) keeps it.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import multiprocessing as mp
import os
from collections import deque
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from mpnet.errors import UserError
from mpnet.outputs import check_output_dir

from .corpus import documents_with_splits, file_format, list_sources, source_files
from .fairseq_data import convert_fairseq_data, inspect_data_bin, looks_like_fairseq_data_bin
from .shards import (FORMAT_VERSION, SPLITS, is_preprocessed, output_workspace, shard_dtype, shard_metadata,
                     write_document_index)
from .tokenizer import load_tokenizer, save_tokenizer, tokenizer_identity, train_sentencepiece

log = logging.getLogger(__name__)

COPY_TOKENS = 1 << 24  # tokens per read when a shard is rewritten
CHUNK_CHARS = 1 << 18  # ~256 kB of text per worker task: amortizes IPC, keeps memory bounded and workers busy


# ----------------------------------------------------------------------------------------------------------------
# split + tokenization (the part that runs in worker processes)

def split_score(text: str, seed: int) -> float:
    """A seeded hash of the document's text, uniform in [0, 1): below valid_fraction means validation."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=int(seed).to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") / 2**64


def is_valid_document(text: str, seed: int, valid_fraction: float) -> bool:
    """Deterministic train/valid assignment from the document's content and the seed."""
    return valid_fraction > 0 and split_score(text, seed) < valid_fraction


_worker = {}


def _init_worker(tokenizer_json, dtype, seed, in_pool=True):
    if in_pool:  # one chunk per process at a time; rayon threads inside every worker would only oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(tokenizer=Tokenizer.from_str(tokenizer_json), dtype=np.dtype(dtype), seed=seed)


def _encode_chunk(texts):
    """-> (split score per document, token count per document, all ids concatenated in the shard dtype)."""
    w = _worker
    encodings = w["tokenizer"].encode_batch(texts, add_special_tokens=False)
    lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
    ids = np.fromiter((i for e in encodings for i in e.ids), dtype=w["dtype"], count=int(lengths.sum()))
    scores = np.array([split_score(t, w["seed"]) for t in texts], dtype=np.float64)
    return scores, lengths, ids


def _chunks(documents, chunk_chars=CHUNK_CHARS):
    """(split, [documents]) from (split, document) pairs: a chunk holds documents of one split only."""
    chunk, size, chunk_split = [], 0, None
    for split, doc in documents:
        if chunk and split != chunk_split:
            yield chunk_split, chunk
            chunk, size = [], 0
        chunk_split = split
        chunk.append(doc)
        size += len(doc)
        if size >= chunk_chars:
            yield chunk_split, chunk
            chunk, size = [], 0
    if chunk:
        yield chunk_split, chunk


def _encoded_chunks(documents, init_args, workers):
    """(split, documents, encoded) for each chunk, in order, with at most 2 x workers chunks in flight
    (Pool.imap would read the whole corpus ahead into its task queue)."""
    if workers <= 1:
        _init_worker(*init_args, in_pool=False)
        for split, chunk in _chunks(documents):
            yield split, len(chunk), _encode_chunk(chunk)
        return
    with mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(
            workers, initializer=_init_worker, initargs=init_args) as pool:
        pending = deque()
        for split, chunk in _chunks(documents):
            pending.append((split, len(chunk), pool.apply_async(_encode_chunk, (chunk,))))
            if len(pending) >= 2 * workers:
                split, n, result = pending.popleft()
                yield split, n, result.get()
        while pending:
            split, n, result = pending.popleft()
            yield split, n, result.get()


# ----------------------------------------------------------------------------------------------------------------
# the public entry points

def preprocess_corpus(inputs, out_dir, tokenizer="default", valid_fraction=0.02, workers=2, text_field="text",
                      sentencepiece_vocab_size=None, seed=0, line_per_document=False, overwrite=False,
                      progress=True):
    """Tokenize a corpus into out_dir (see the module docstring for the layout). Returns the metadata dict.

    inputs: a file, a directory (searched recursively), a saved HF dataset folder or a list of them. tokenizer:
    see load_tokenizer; ignored when sentencepiece_vocab_size is set (a unigram model of that size is trained on
    the training documents).
    An existing out_dir is an error unless overwrite=True, and even then it is replaced only once the new output
    is complete. progress: a tqdm bar on stderr when it is a terminal."""
    if not 0 <= valid_fraction < 1:
        raise UserError(f"valid fraction must be in [0, 1), got {valid_fraction}")
    out_dir = check_output_dir(out_dir, overwrite)
    _refuse_data_bins(inputs)
    sources = list_sources(inputs)
    workers = max(1, int(workers or 1))

    def documents():  # a fresh pass over the corpus (two passes when a sentencepiece model is trained first)
        return documents_with_splits(sources, text_field=text_field, line_per_document=line_per_document)

    with output_workspace(out_dir, overwrite) as tmp:
        spm_model = None
        if sentencepiece_vocab_size:
            spm_model = _train_sentencepiece_on(documents(), tmp, sentencepiece_vocab_size, workers, seed,
                                                valid_fraction, progress)
        tok = load_tokenizer(spm_model or tokenizer)
        dtype = shard_dtype(len(tok))
        init_args = (_untruncated_backend(tok, tokenizer).to_str(), dtype.str, seed)
        with _SplitWriter(tmp, valid_fraction, progress) as writer:
            for split, n_docs, encoded in _encoded_chunks(documents(), init_args, workers):
                writer.add(n_docs, *encoded, split=split)
        num_docs, num_tokens = _ensure_validation_document(writer, tmp, dtype, sources, valid_fraction)
        write_document_index(tmp)
        save_tokenizer(tok, tmp / "tokenizer", sentencepiece_model=spm_model)
        for f in tmp.glob("spm.*"):
            f.unlink()
        source = f"sentencepiece-unigram-{sentencepiece_vocab_size}" if spm_model else str(tokenizer)
        meta = shard_metadata(tok, source, dtype, num_docs, num_tokens)
        meta.update(valid_fraction=valid_fraction, seed=seed, text_field=text_field,
                    line_per_document=line_per_document, split_by="source" if writer.source_split else "hash",
                    sources=[{"path": str(p), "format": file_format(p),
                              "bytes": sum(f.stat().st_size for f in source_files(p))} for p in sources])
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("preprocess: %d files -> %s (train %d docs / %d tokens, valid %d docs / %d tokens)", len(sources),
             out_dir, num_docs["train"], num_tokens["train"], num_docs["valid"], num_tokens["valid"])
    return meta


# ----------------------------------------------------------------------------------------------------------------
# the pieces of preprocess_corpus

def _refuse_data_bins(inputs):
    for item in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        if looks_like_fairseq_data_bin(item):
            raise UserError(f"{item} is a fairseq data-bin, not raw text; import it with "
                            f"preprocess-mpnet --from-fairseq {item} (or train on it: pretrain-mpnet --data {item})")


def _untruncated_backend(tok, spec) -> Tokenizer:
    """A copy of the tokenizer's backend with truncation and padding off (tok itself is left as it is)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"tokenizer {spec} has no fast (tokenizers) backend; convert it to tokenizer.json")
    backend = Tokenizer.from_str(backend.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


class _SplitWriter:
    """Appends encoded chunks to tmp/{train,valid}.bin (ids) and .lengths (int64 per document) as they come, so
    memory stays bounded by the chunks in flight whatever the corpus size; counts documents and tokens and
    remembers the training document closest to validation (the one to move over if validation stays empty)."""

    def __init__(self, tmp: Path, valid_fraction: float, progress: bool):
        self.valid_fraction = valid_fraction
        self.source_split = False  # whether some document's split was fixed by its source
        self.num_docs, self.num_tokens = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
        self.best = None  # (score, index, token offset, length) of the training document with the lowest score
        self.bins = {s: open(tmp / f"{s}.bin", "wb") for s in SPLITS}
        self.lens = {s: open(tmp / f"{s}.lengths", "wb") for s in SPLITS}
        self.bar = tqdm(desc="tokenizing", unit="doc", disable=None if progress else True, dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        for f in [*self.bins.values(), *self.lens.values()]:
            f.close()

    def add(self, n_docs: int, scores: np.ndarray, doc_lengths: np.ndarray, ids: np.ndarray, split=None):
        """split: "train" / "valid" when the chunk's source fixes it, None when the scores decide."""
        keep = doc_lengths > 0  # a document whose characters all tokenize to nothing is dropped
        scores, doc_lengths = scores[keep], doc_lengths[keep]
        valid = scores < self.valid_fraction if split is None else np.full(len(scores), split == "valid")
        self.source_split |= split is not None
        if self.valid_fraction > 0 and (~valid).any():
            i = int(np.argmin(np.where(valid, np.inf, scores)))
            if self.best is None or scores[i] < self.best[0]:
                before = ~valid[:i]
                self.best = (scores[i], self.num_docs["train"] + int(before.sum()),
                             self.num_tokens["train"] + int(doc_lengths[:i][before].sum()), int(doc_lengths[i]))
        token_valid = np.repeat(valid, doc_lengths)
        for split, doc_mask in (("train", ~valid), ("valid", valid)):
            self.bins[split].write(ids[token_valid == (split == "valid")].tobytes())
            self.lens[split].write(doc_lengths[doc_mask].tobytes())
            self.num_docs[split] += int(doc_mask.sum())
            self.num_tokens[split] += int(doc_lengths[doc_mask].sum())
        self.bar.update(n_docs)
        self.bar.set_postfix(tokens=sum(self.num_tokens.values()), refresh=False)


def _ensure_validation_document(writer: _SplitWriter, tmp: Path, dtype, sources, valid_fraction: float):
    """-> (documents, tokens) per split, after refusing an empty corpus and giving a small corpus that missed the
    validation split its one validation document."""
    num_docs, num_tokens = writer.num_docs, writer.num_tokens
    if num_docs["train"] + num_docs["valid"] == 0:
        raise UserError(f"the corpus is empty: no text found in {', '.join(map(str, sources))}")
    if num_docs["train"] == 0:
        if writer.source_split:
            raise UserError(f"the training split is empty: no text found in the train split of "
                            f"{', '.join(map(str, sources))}")
        raise UserError(f"all {num_docs['valid']} documents fell into the validation split "
                        f"(lower --valid-fraction or give more documents)")
    if num_docs["valid"] == 0 and valid_fraction > 0 and num_docs["train"] >= 2:
        # A small corpus can miss the validation split entirely; training wants something to validate on, so
        # the training document with the lowest score (still a content hash, not a position) moves over.
        length = writer.best[3]
        _move_document(tmp, dtype, *writer.best[1:])
        num_docs = {"train": num_docs["train"] - 1, "valid": 1}
        num_tokens = {"train": num_tokens["train"] - length, "valid": length}
        log.info("preprocess: no document fell into the validation split; moved one (%d tokens) there", length)
    return num_docs, num_tokens


def _move_document(tmp: Path, dtype: np.dtype, index: int, offset: int, length: int):
    """Move training document `index` (tokens [offset, offset + length)) into the (empty) validation split."""
    train = np.memmap(tmp / "train.bin", dtype=dtype, mode="r")
    (tmp / "valid.bin").write_bytes(train[offset : offset + length].tobytes())
    np.array([length], dtype=np.int64).tofile(tmp / "valid.lengths")
    with open(tmp / "train.bin.new", "wb") as f:  # streamed copy without the document
        for start in range(0, len(train), COPY_TOKENS):
            piece = np.asarray(train[start : start + COPY_TOKENS])
            lo, hi = max(offset - start, 0), min(offset + length - start, len(piece))
            f.write(piece.tobytes() if hi <= 0 or lo >= len(piece) else
                    piece[:lo].tobytes() + piece[hi:].tobytes())
    del train
    os.replace(tmp / "train.bin.new", tmp / "train.bin")
    lengths = np.fromfile(tmp / "train.lengths", dtype=np.int64)
    np.delete(lengths, index).tofile(tmp / "train.lengths")


def _train_sentencepiece_on(documents, tmp, vocab_size, workers, seed, valid_fraction, progress):
    """Train on the training documents only (validation text stays unseen), one paragraph per line."""
    text_file = tmp / "spm.txt"
    n = 0
    with open(text_file, "w", encoding="utf-8") as f:
        for split, doc in tqdm(documents, desc="collecting sentencepiece text", unit="doc",
                               disable=None if progress else True):
            if split == "train" or (split is None and not is_valid_document(doc, seed, valid_fraction)):
                f.write(doc.strip() + "\n")
                n += 1
    if n == 0:
        raise UserError("the corpus is empty: no training text to train a sentencepiece model on")
    return train_sentencepiece(text_file, tmp / "spm", vocab_size, workers=workers, seed=seed)


def _source_fingerprint(sources) -> list:
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for p in sources for f in source_files(p)]


def resolve_data(data, cache_dir, tokenizer="default", **preprocess_kwargs) -> Path:
    """A preprocessed directory -> itself. Raw text (file, directory, list) or a fairseq data-bin directory ->
    preprocessed once into cache_dir/<16-hex hash of the sources' paths, sizes and mtimes, the tokenizer and the
    options>, reused after. preprocess_kwargs go to preprocess_corpus (valid_fraction, workers,
    sentencepiece_vocab_size, ...); for a data-bin only line_per_document, overwrite and progress apply."""
    if is_preprocessed(data):
        return Path(data).expanduser()
    fairseq = isinstance(data, (str, Path)) and looks_like_fairseq_data_bin(data)
    if fairseq:
        if preprocess_kwargs.get("sentencepiece_vocab_size"):
            raise UserError(f"{data} is a fairseq data-bin: it is tokenized already, no sentencepiece model can be "
                            f"trained for it")
        sources = inspect_data_bin(data).files()
    else:
        _refuse_data_bins(data)  # a data-bin inside a list of inputs would be read as text
        sources = list_sources(data)
    spm_size = preprocess_kwargs.get("sentencepiece_vocab_size")
    # The key names the options that change the shards and differ from preprocess_corpus's defaults, so that
    # passing a default explicitly finds the same cache entry as leaving it out.
    defaults = {k: p.default for k, p in inspect.signature(preprocess_corpus).parameters.items()}
    options = {k: v for k, v in sorted(preprocess_kwargs.items())
               if k not in ("workers", "progress", "overwrite") and v != defaults.get(k, inspect.Parameter.empty)}
    if fairseq:
        options = {"fairseq_data_bin": True, "line_per_document": bool(options.get("line_per_document", False))}
    key = {
        "sources": _source_fingerprint(sources),
        "tokenizer": f"sentencepiece-{spm_size}" if spm_size else tokenizer_identity(load_tokenizer(tokenizer)),
        "options": options,
        "format_version": FORMAT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    out_dir = Path(cache_dir).expanduser() / digest
    if (out_dir / "metadata.json").is_file():
        log.info("data: reusing %s", out_dir)
        return out_dir
    try:
        if fairseq:
            _convert_fairseq_data(data, out_dir, tokenizer, preprocess_kwargs)
        else:
            preprocess_corpus(sources, out_dir, tokenizer=tokenizer, **preprocess_kwargs)
    except UserError:
        if (out_dir / "metadata.json").is_file():  # another process (rank) finished the same job first
            return out_dir
        raise
    return out_dir


def _convert_fairseq_data(data_bin, out_dir, tokenizer, options: dict):
    convert_fairseq_data(data_bin, out_dir, tokenizer=tokenizer, **{
        k: v for k, v in options.items() if k in ("line_per_document", "overwrite", "progress")})
