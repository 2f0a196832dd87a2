"""fairseq data-bin directories (what `fairseq-preprocess --only-source` writes), read without fairseq.

    dict.txt                 one "<symbol> <count>" per line. fairseq's Dictionary numbers <s>=0 <pad>=1 </s>=2
                             <unk>=3 first, then the lines in order (a "#fairseq:overwrite" line takes a new id)
    train.idx, train.bin     the MMIDIDX index and the token ids of every item, back to back
    train1.idx, train1.bin   further shards of the same split, read after it (fairseq's `combine`)
    valid.idx, valid.bin     the validation split, likewise

The MMIDIDX index (fairseq/data/indexed_dataset.py, MMapIndexedDataset.Index), little-endian:

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    u64       version, 1
    u8        dtype code of the .bin (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16, 9 uint32, 10 uint64;
              6 and 7 are floats)
    u64       N, the number of items
    [u64      D, the number of document-index entries: Megatron-LM's variant of the format only]
    int32     sizes[N]      tokens per item
    int64     pointers[N]   BYTE offset of each item in the .bin
    [int64    doc_idx[D]    Megatron-LM only: item index where each document starts, then N]

The two variants share magic and version; the index file's length tells them apart (26 + 12 N bytes for
fairseq, 34 + 12 N + 8 D for Megatron-LM, which can never coincide).

fairseq-preprocess writes one item per input line, the line's tokens followed by </s>; a blank line is an
item holding only </s>. Documents, in this project's sense: the lines between blank lines (the rule of
fairseq's `--sample-break-mode complete_doc`), or every line on its own with `line_per_document`; Megatron's
doc_idx boundaries are always document boundaries, and so is the end of each shard. Each line's trailing </s>
is its terminator, not content: it is dropped, exactly as the `</s>` that TokenBlocks puts between documents
is not stored either. A `</s>` inside a line (the text held the literal symbol) stays, mapped to our eos.

`convert_fairseq_data` writes a data-bin as this project's shard directory (see shards.py), mapping each
fairseq id onto the tokenizer's id of the same token (see `fairseq_token_table`).
"""
from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mpnet.errors import UserError
from mpnet.outputs import check_output_dir

from .shards import output_workspace, shard_dtype, shard_metadata, write_document_index
from .tokenizer import load_tokenizer, save_tokenizer

log = logging.getLogger(__name__)

FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq Dictionary's fixed ids 0-3
SPECIAL_ROLES = ("bos_token_id", "pad_token_id", "eos_token_id", "unk_token_id")  # the same four, by meaning
FAIRSEQ_EOS = 2
OVERWRITE_FLAG = " #fairseq:overwrite"
MMIDIDX_MAGIC = b"MMIDIDX\x00\x00"
INTEGER_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16, 9: np.uint32,
                  10: np.uint64}
FAIRSEQ_HEADER = 9 + 8 + 1 + 8  # magic, version, dtype code, N
MEGATRON_HEADER = FAIRSEQ_HEADER + 8  # ... and D
ITEMS_PER_CHUNK = 1 << 20  # index entries handled at once: bounds memory whatever the number of lines
TOKENS_PER_CHUNK = 1 << 24  # token ids read, mapped and written at once


# ----------------------------------------------------------------------------------------------- dictionary


def read_fairseq_dictionary(path) -> list[str]:
    """dict.txt -> the symbols in fairseq id order (the four specials first), as fairseq's
    Dictionary.add_from_file numbers them. "#fairseq:overwrite" lines get a new id, like fairseq."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dictionary {path} does not exist; pass the dict.txt that came with the checkpoint or data")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"dictionary {path} is not UTF-8 text; a fairseq dict.txt holds '<symbol> <count>' "
                        f"lines") from None
    except OSError as err:
        raise UserError(f"cannot read dictionary {path}: {err.strerror or err}") from None
    symbols = list(FAIRSEQ_SPECIALS)
    seen = set(symbols)
    # fairseq reads the file in text mode: universal newlines, so \r\n and a lone \r end a line as \n does.
    for line_no, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        if not line.strip():
            continue
        overwrite = line.endswith(OVERWRITE_FLAG)
        if overwrite:
            line = line[: -len(OVERWRITE_FLAG)]
        symbol, sep, count = line.rstrip().rpartition(" ")
        if not sep or not count.lstrip("-").isdigit():
            raise UserError(f"{path}:{line_no}: expected '<symbol> <count>', got {line[:80]!r}")
        if symbol in seen and not overwrite:
            raise UserError(f"{path}:{line_no}: duplicate symbol {symbol!r} (fairseq rejects it too)")
        seen.add(symbol)
        symbols.append(symbol)
    return symbols


def fairseq_token_table(symbols: list[str], tokenizer) -> np.ndarray:
    """Our tokenizer id for every fairseq id (-1: the tokenizer has no such token).

    The four specials go by meaning: fairseq's <unk> is "a word dict.txt lacks", which is the tokenizer's unknown
    token (the MPNet tokenizer's [UNK], not its unused '<unk>' entry), </s> is its eos, and so on; a tokenizer
    without that role falls back to the symbol. Every other symbol is looked up as a token of the vocabulary."""
    vocab = tokenizer.get_vocab()
    table = np.full(len(symbols), -1, dtype=np.int64)
    for fairseq_id, symbol in enumerate(symbols):
        role = getattr(tokenizer, SPECIAL_ROLES[fairseq_id], None) if fairseq_id < len(SPECIAL_ROLES) else None
        our_id = role if role is not None else vocab.get(symbol)
        if our_id is not None:
            table[fairseq_id] = our_id
    return table


# ------------------------------------------------------------------------------------------- MMIDIDX files


class IndexedShard:
    """One MMIDIDX file pair (prefix.idx + prefix.bin): shard[i] -> int64 token ids of item i, as fairseq's
    MMapIndexedDataset[i]. Both files are memory-mapped; nothing is read until asked for."""

    def __init__(self, prefix):
        self.prefix = Path(prefix)
        self.idx_path, self.bin_path = self.prefix.with_name(self.prefix.name + ".idx"), self.prefix.with_name(
            self.prefix.name + ".bin")
        header = self._read_header()
        version, code, count = struct.unpack("<QBQ", header[9:FAIRSEQ_HEADER])
        if version != 1:
            raise UserError(f"{self.idx_path}: MMIDIDX version {version}; only version 1 exists in fairseq")
        if code not in INTEGER_DTYPES:
            raise UserError(f"{self.idx_path}: dtype code {code} is not an integer type; token ids must be integers")
        self.dtype = np.dtype(INTEGER_DTYPES[code])
        index_bytes = self.idx_path.stat().st_size
        if index_bytes == FAIRSEQ_HEADER + 12 * count:
            body, doc_count = FAIRSEQ_HEADER, 0
        else:
            body = MEGATRON_HEADER
            doc_count = struct.unpack("<Q", header[FAIRSEQ_HEADER:body])[0] if len(header) >= body else -1
            if doc_count < 0 or index_bytes != MEGATRON_HEADER + 12 * count + 8 * doc_count:
                raise UserError(f"{self.idx_path} is truncated or corrupt: {index_bytes} bytes cannot hold the "
                                f"{count} items its header announces")
        self.sizes = np.memmap(self.idx_path, dtype=np.int32, mode="r", offset=body, shape=(count,)) if count else (
            np.zeros(0, np.int32))
        self.pointers = np.memmap(self.idx_path, dtype=np.int64, mode="r", offset=body + 4 * count,
                                  shape=(count,)) if count else np.zeros(0, np.int64)
        self.doc_idx = np.memmap(self.idx_path, dtype=np.int64, mode="r", offset=body + 12 * count,
                                 shape=(doc_count,)) if doc_count else None
        self._check_extent()
        self._tokens = None

    def _read_header(self) -> bytes:
        try:
            with open(self.idx_path, "rb") as f:
                header = f.read(MEGATRON_HEADER)
            self.bin_bytes = self.bin_path.stat().st_size
        except OSError as err:
            raise UserError(f"cannot read {err.filename}: {err.strerror or err}") from None
        if header[:8] == b"TNTIDX\x00\x00":
            raise UserError(f"{self.idx_path} is fairseq's legacy 'cached'/'lazy' index; binarize with "
                            f"fairseq-preprocess --dataset-impl mmap (the default)")
        if header[:9] != MMIDIDX_MAGIC or len(header) < FAIRSEQ_HEADER:
            raise UserError(f"{self.idx_path} is not a fairseq MMIDIDX index (no MMIDIDX header)")
        return header

    def _check_extent(self):
        """Every item must lie inside the .bin (fairseq would read garbage or crash otherwise)."""
        itemsize = self.dtype.itemsize
        for lo in range(0, len(self), ITEMS_PER_CHUNK):
            sizes = np.asarray(self.sizes[lo : lo + ITEMS_PER_CHUNK], dtype=np.int64)
            pointers = np.asarray(self.pointers[lo : lo + ITEMS_PER_CHUNK])
            if (sizes < 0).any() or (pointers < 0).any() or (pointers % itemsize).any() or \
                    (pointers + sizes * itemsize > self.bin_bytes).any():
                raise UserError(f"{self.bin_path} does not match {self.idx_path.name}: items point outside its "
                                f"{self.bin_bytes} bytes (truncated, or the two files are from different runs)")
        if self.doc_idx is not None and len(self.doc_idx) and (
                (np.diff(self.doc_idx) < 0).any() or self.doc_idx[0] < 0 or self.doc_idx[-1] > len(self)):
            raise UserError(f"{self.idx_path}: its document index is not an increasing list of item numbers")

    def __len__(self):
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        return int(np.sum(self.sizes, dtype=np.int64))

    @property
    def tokens(self) -> np.ndarray:
        """The whole .bin as one array of token ids (pointers / itemsize index into it)."""
        if self._tokens is None:
            count = self.bin_bytes // self.dtype.itemsize  # a torn last element lies outside every item anyway
            self._tokens = (np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(count,)) if count
                            else np.zeros(0, self.dtype))
        return self._tokens

    def __getitem__(self, i) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range ({len(self)} items)")
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.tokens[start : start + int(self.sizes[i])], dtype=np.int64)


# ------------------------------------------------------------------------------------------ the directory


@dataclass
class DataBin:
    root: Path
    dictionary: Path
    splits: dict = field(default_factory=dict)  # "train"/"valid" -> [shard prefixes in reading order]

    def files(self) -> list[Path]:
        prefixes = [p for shards in self.splits.values() for p in shards]
        return [self.dictionary] + [p.with_name(p.name + ext) for p in prefixes for ext in (".idx", ".bin")]


def looks_like_fairseq_data_bin(path) -> bool:
    """A directory holding a dict*.txt, or .idx/.bin files at its top level: a fairseq data-bin, or a broken one
    (never a raw-text corpus to be read line by line: its dict.txt would be taken for text)."""
    path = Path(path).expanduser()
    if not path.is_dir() or (path / "metadata.json").is_file():
        return False
    return any(p.is_file() and (p.suffix in (".idx", ".bin") or (p.name.startswith("dict") and p.suffix == ".txt"))
               for p in path.iterdir())


def _split_shards(root: Path, split: str) -> list[Path]:
    """split, split1, split2, ... while both files exist (fairseq's load_indexed_dataset with combine=True)."""
    shards, k = [], 0
    while (root / f"{split}{k or ''}.idx").is_file() and (root / f"{split}{k or ''}.bin").is_file():
        shards.append(root / f"{split}{k or ''}")
        k += 1
    return shards


def inspect_data_bin(path) -> DataBin:
    """The dictionary and the train/valid shards of a data-bin, or a one-line refusal saying what is missing."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"{root} is {'a file' if root.exists() else 'not found'}; a fairseq data-bin is the directory "
                        f"fairseq-preprocess --only-source --destdir wrote (dict.txt, train.bin/.idx, valid.bin/.idx)")
    if (root / "train.idx.npy").is_file():
        raise UserError(f"{root} looks like a preprocess-mpnet directory but has no metadata.json (an interrupted "
                        f"run?); preprocess the corpus again")
    found = sorted(p.name for p in root.iterdir() if p.suffix in (".idx", ".bin", ".txt"))[:6]
    described = (f"{root} looks like a fairseq data-bin (it holds {', '.join(found)})" if found
                 else f"{root} holds no fairseq data-bin files")
    if not (root / "dict.txt").is_file():
        raise UserError(f"{described}, and no dict.txt; only `fairseq-preprocess --only-source` data-bins "
                        f"(dict.txt, train.bin/.idx, valid.bin/.idx) can be read")
    data_bin = DataBin(root, root / "dict.txt")
    for split in ("train", "valid"):
        data_bin.splits[split] = _split_shards(root, split)
        if not data_bin.splits[split]:
            raise UserError(f"{described} but has no {split}.idx + {split}.bin pair; binarize the {split} text "
                            f"with fairseq-preprocess --only-source --{split}pref ...")
    return data_bin


# ------------------------------------------------------------------------------------------ conversion


class _SplitConverter:
    """Streams the shards of one split into tmp/{split}.bin (our ids, our dtype) and tmp/{split}.lengths."""

    def __init__(self, tmp: Path, split: str, table: np.ndarray, symbols, dtype, line_per_document: bool, bar):
        self.table, self.symbols, self.dtype, self.bar = table, symbols, dtype, bar
        self.line_per_document = line_per_document
        self.bin = open(tmp / f"{split}.bin", "wb")
        self.lengths = open(tmp / f"{split}.lengths", "wb")
        self.num_documents = self.num_tokens = 0

    def close(self):
        self.bin.close()
        self.lengths.close()

    def add_shard(self, shard: IndexedShard):
        doc_starts = None if shard.doc_idx is None else np.asarray(shard.doc_idx)
        open_length = 0  # tokens of the document still open at the chunk boundary
        for lo in range(0, len(shard), ITEMS_PER_CHUNK):
            hi = min(lo + ITEMS_PER_CHUNK, len(shard))
            kept, drop = self._write_items(shard, lo, hi)
            starts = np.ones(hi - lo, bool) if self.line_per_document else kept == 0
            if doc_starts is not None:
                inside = doc_starts[(doc_starts >= lo) & (doc_starts < hi)]
                starts[inside - lo] = True
            # Items before the first start continue the open document; each start opens the next one.
            segment = np.cumsum(starts)
            lengths = np.bincount(segment, weights=kept, minlength=segment[-1] + 1).astype(np.int64)
            lengths[0] += open_length
            self._add_documents(lengths[:-1])
            open_length = int(lengths[-1])
        self._add_documents(np.array([open_length], np.int64))  # a shard's end ends its last document

    def _add_documents(self, lengths: np.ndarray):
        lengths = lengths[lengths > 0]  # blank-line runs and empty lines make no document
        self.lengths.write(lengths.tobytes())
        self.num_documents += len(lengths)

    def _write_items(self, shard: IndexedShard, lo: int, hi: int):
        """Write items [lo, hi) without their trailing </s>; -> (tokens kept per item, stream offsets dropped)."""
        itemsize = shard.dtype.itemsize
        sizes = np.asarray(shard.sizes[lo:hi], dtype=np.int64)
        starts = np.asarray(shard.pointers[lo:hi]) // itemsize
        ends = starts + sizes
        last = np.where(sizes > 0, shard.tokens[np.maximum(ends - 1, 0)] if len(shard.tokens) else -1, -1)
        trailing_eos = (sizes > 0) & (last == FAIRSEQ_EOS)
        kept = sizes - trailing_eos
        # Consecutive items form runs of contiguous tokens (fairseq writes one run per file); each run is copied
        # in slices with the dropped offsets removed.
        run_breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1
        drops = ends[trailing_eos] - 1
        for run_lo, run_hi in zip(np.r_[0, run_breaks], np.r_[run_breaks, len(sizes)]):
            if run_hi > run_lo:
                self._copy(shard, int(starts[run_lo]), int(ends[run_hi - 1]), drops)
        return kept, drops

    def _copy(self, shard: IndexedShard, start: int, stop: int, drops: np.ndarray):
        for a in range(start, stop, TOKENS_PER_CHUNK):
            b = min(a + TOKENS_PER_CHUNK, stop)
            ids = np.asarray(shard.tokens[a:b], dtype=np.int64)
            keep = np.ones(b - a, bool)
            inside = drops[(drops >= a) & (drops < b)]
            keep[inside - a] = False
            ids = ids[keep]
            self._check_ids(ids, shard)
            self.bin.write(self.table[ids].astype(self.dtype).tobytes())
            self.num_tokens += len(ids)
            self.bar.update(b - a)

    def _check_ids(self, ids: np.ndarray, shard: IndexedShard):
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.table)):
            bad = int(ids[(ids < 0) | (ids >= len(self.table))][0])
            raise UserError(f"{shard.bin_path} holds token id {bad}, outside its dict.txt ({len(self.table)} ids "
                            f"with the 4 specials): the data-bin and its dictionary do not belong together")
        unmapped = self.table[ids] < 0
        if unmapped.any():
            symbol = self.symbols[int(ids[unmapped][0])]
            raise UserError(f"dict.txt symbol {symbol!r} (in {shard.bin_path.name}) is not a token of the tokenizer; "
                            f"the data was binarized with another vocabulary (give its tokenizer with --tokenizer / "
                            f"data.tokenizer)")


def _check_dictionary(symbols: list[str], table: np.ndarray):
    """Integer symbols are ids of some other vocabulary (RoBERTa's GPT-2 BPE dictionaries); mapping them as token
    strings would be silently wrong."""
    ordinary = [s for s in symbols[4:] if not s.startswith("madeupword")]
    if ordinary and all(s.isdigit() for s in ordinary):
        raise UserError("dict.txt lists token ids (like RoBERTa's GPT-2 BPE dictionary), not token strings; it "
                        "cannot be mapped onto a tokenizer by symbol")
    missing = [s for s, i in zip(symbols, table) if i < 0 and not s.startswith("madeupword")]
    if missing:
        log.info("fairseq data: %d dict.txt symbols are not tokens of the tokenizer (e.g. %s); fine as long as "
                 "the data never uses them", len(missing), ", ".join(map(repr, missing[:5])))


def convert_fairseq_data(data_bin, out_dir, tokenizer="default", line_per_document=False, overwrite=False,
                         progress=True) -> dict:
    """A fairseq data-bin -> this project's shard directory at out_dir (written atomically, like
    preprocess_corpus). tokenizer: the tokenizer whose vocabulary the dict.txt symbols are looked up in (see
    load_tokenizer). Returns the metadata dict."""
    out_dir = check_output_dir(out_dir, overwrite)
    layout = inspect_data_bin(data_bin)
    shards = {split: [IndexedShard(p) for p in prefixes] for split, prefixes in layout.splits.items()}
    symbols = read_fairseq_dictionary(layout.dictionary)
    tok = load_tokenizer(tokenizer)
    table = fairseq_token_table(symbols, tok)
    _check_dictionary(symbols, table)
    dtype = shard_dtype(len(tok))
    total = sum(s.num_tokens for split in shards.values() for s in split)
    num_docs, num_tokens = {}, {}
    with output_workspace(out_dir, overwrite) as tmp:
        with tqdm(total=total, desc="converting fairseq data", unit="tok", unit_scale=True,
                  disable=None if progress else True, dynamic_ncols=True) as bar:
            for split, split_shards in shards.items():
                converter = _SplitConverter(tmp, split, table, symbols, dtype, line_per_document, bar)
                try:
                    for shard in split_shards:
                        converter.add_shard(shard)
                finally:
                    converter.close()
                num_docs[split], num_tokens[split] = converter.num_documents, converter.num_tokens
        if num_docs["train"] == 0:
            raise UserError(f"{layout.root}: the train split holds no tokens")
        write_document_index(tmp)
        save_tokenizer(tok, tmp / "tokenizer")
        meta = shard_metadata(tok, str(tokenizer), dtype, num_docs, num_tokens)
        meta.update(line_per_document=line_per_document, fairseq_data_bin=str(layout.root.resolve()),
                    sources=[{"path": str(p.resolve()), "format": f"fairseq-{p.suffix[1:]}",
                              "bytes": p.stat().st_size} for p in layout.files()])
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("fairseq data: %s -> %s (train %d docs / %d tokens, valid %d docs / %d tokens)", layout.root, out_dir,
             num_docs["train"], num_tokens["train"], num_docs["valid"], num_tokens["valid"])
    return meta
