"""Fixed-size training blocks over a preprocessed split (RoBERTa "full sentences").

The split's documents are read as one stream with </s> between consecutive documents:

    d0 d0 d0 </s> d1 d1 </s> d2 d2 d2 d2 ...

and the stream is cut into consecutive pieces of n - 2 tokens; block i is <s> + piece i + </s>. So every block
has exactly n tokens except possibly the last one, blocks cross document boundaries (the </s> separator marks
them), and a block may start or end in the middle of a sentence. Nothing is dropped or padded here; the
collator pads the short final block.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mpnet.errors import UserError

from .shards import SPLITS, read_metadata

# One in this many separator positions is kept in memory: 512 int64 index entries are one 4 KiB page.
SEPARATOR_STRIDE = 512


class TokenBlocks:
    """blocks[i] -> int64 array of length block_size (the last block may be shorter). Memory-maps the shard and
    its document index lazily, so instances pickle cheaply into DataLoader workers."""

    def __init__(self, shard_dir, split="train", block_size=512):
        if split not in SPLITS:
            raise UserError(f"unknown data split '{split}' (expected one of {', '.join(SPLITS)})")
        if block_size < 3:
            raise UserError(f"block size must be at least 3 (<s>, a token, </s>), got {block_size}")
        self.shard_dir = Path(shard_dir).expanduser()
        self.meta = read_metadata(self.shard_dir)
        self.split, self.block_size = split, int(block_size)
        self.bos, self.eos = int(self.meta["bos_token_id"]), int(self.meta["eos_token_id"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.dtype = np.dtype(self.meta["dtype"])
        self.bin_path = self.shard_dir / f"{split}.bin"

        num_tokens = int(self.meta["num_tokens"][split])
        self.idx_path = self.shard_dir / f"{split}.idx.npy"
        self._tokens = self._offsets = None
        try:
            offsets = self.offsets
            size = self.bin_path.stat().st_size
        except (OSError, ValueError) as err:
            raise UserError(f"{self.shard_dir}: cannot read the {split} shard ({err}); re-run preprocess-mpnet") from None
        if size != num_tokens * self.dtype.itemsize or offsets[-1] != num_tokens:
            raise UserError(f"{self.bin_path} is truncated or does not match metadata.json "
                            f"({size} bytes for {num_tokens} tokens); re-run preprocess-mpnet")
        self.num_tokens = num_tokens
        self.num_documents = len(offsets) - 1
        # Virtual stream positions of the separators: the one after document d sits at offsets[d + 1] + d.
        # Only every SEPARATOR_STRIDE-th is held in memory; the document index stays memory-mapped, so a
        # process (every rank, and every DataLoader worker) pages in just the index entries of the blocks it
        # reads instead of loading all 8 bytes per document of a corpus with tens of millions of them.
        self.num_separators = max(self.num_documents - 1, 0)
        sampled = np.arange(0, self.num_separators, SEPARATOR_STRIDE)
        self.sampled_separators = np.asarray(offsets[sampled + 1]) + sampled
        self.stream_length = num_tokens + self.num_separators
        self.piece = self.block_size - 2

    def __len__(self):
        return -(-self.stream_length // self.piece)

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            # np.memmap refuses empty files; an empty split simply has no blocks. np.asarray: a plain ndarray
            # over the same mapping (slicing an np.memmap costs ~10 us more per block in __array_finalize__).
            self._tokens = (np.asarray(np.memmap(self.bin_path, dtype=self.dtype, mode="r")) if self.num_tokens
                            else np.zeros(0, dtype=self.dtype))
        return self._tokens

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = np.asarray(np.load(self.idx_path, mmap_mode="r"))
        return self._offsets

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tokens"] = state["_offsets"] = None  # re-opened in the receiving process, not copied
        return state

    def separators_before(self, position) -> int:
        """How many separators sit at stream positions < position: a search of the sampled separators, then of
        the one stride of the memory-mapped index between two samples."""
        chunk = int(np.searchsorted(self.sampled_separators, position)) - 1
        if chunk < 0:
            return 0
        lo = chunk * SEPARATOR_STRIDE
        hi = min(lo + SEPARATOR_STRIDE, self.num_separators)
        return lo + int(np.searchsorted(self.offsets[lo + 1 : hi + 1] + np.arange(lo, hi), position))

    def __getitem__(self, i) -> np.ndarray:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"block {i} out of range ({n} blocks)")
        start, stop = i * self.piece, min((i + 1) * self.piece, self.stream_length)
        # Separators inside [start, stop) and how many precede start -> the token range to read.
        first, last = self.separators_before(start), self.separators_before(stop)
        tokens = np.asarray(self.tokens[start - first : stop - last], dtype=np.int64)
        inside = self.offsets[first + 1 : last + 1] + np.arange(first, last)
        # np.insert places each separator before the token that follows it; indices refer to the original array.
        piece = np.insert(tokens, inside - start - np.arange(len(inside)), self.eos)
        return np.concatenate([[self.bos], piece, [self.eos]])

    def __repr__(self):
        return (f"TokenBlocks({str(self.shard_dir)!r}, split={self.split!r}, block_size={self.block_size}: "
                f"{len(self)} blocks from {self.num_documents} documents, {self.num_tokens} tokens)")
