"""Sentence(-pair) classification data as model inputs: tokenized splits, padded or packed batches.

Batches are padded dynamically, to a multiple of `pad_to_multiple_of` (64) tokens: few distinct shapes
means few recompiles of the FlexAttention kernel, at little padding cost. Packed batches
(`training.pack`) put several examples in a row of at most `task.max_length` tokens, isolated by
document ids (mpnet/modeling/packing.py); the classifier reads each example's own <s>.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..modeling.packing import pack
from ..tasks import Task, TaskData

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One tokenized split: token id lists (special tokens included) and labels."""

    input_ids: list[list[int]]
    labels: np.ndarray
    source: str = ""

    def __len__(self):
        return len(self.input_ids)


def encode_split(tokenizer, split, max_length: int, regression: bool) -> Encoded:
    ids: list[list[int]] = []
    step = 2048  # batched calls: the fast tokenizer parallelises inside a batch
    for start in range(0, len(split), step):
        a = split.text_a[start:start + step]
        b = None if split.text_b is None else split.text_b[start:start + step]
        ids.extend(tokenizer(a, b, truncation=True, max_length=max_length)["input_ids"])
    labels = np.asarray(split.labels, dtype=np.float32 if regression else np.int64)
    return Encoded(ids, labels, split.source)


def padded_length(longest: int, multiple: int, cap: int) -> int:
    """Round up to the next multiple (few distinct shapes -> few flex recompiles), never past the cap."""
    return min(max(1, math.ceil(longest / multiple)) * multiple, cap)


def make_batch(encoded: Encoded, indices, pad_id: int, multiple: int, cap: int):
    rows = [encoded.input_ids[i] for i in indices]
    width = padded_length(max(len(r) for r in rows), multiple, cap)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, :len(row)] = 1
    return input_ids, attention_mask, torch.from_numpy(encoded.labels[list(indices)])


@dataclass(frozen=True)
class Batching:
    """How examples become model inputs: padded rows (the default) or packed rows."""

    pad_id: int
    multiple: int  # widths round up to a multiple of this many tokens
    cap: int  # the position table's limit
    pack: bool = False
    row_length: int = 0  # packed: tokens per row at most (task.max_length)
    rows_multiple: int = 1  # packed: rows round up to a multiple of this

    def inputs(self, encoded: Encoded, indices) -> tuple[dict, int, int]:
        """(model keyword inputs on the CPU, real tokens, computed positions) for the examples `indices`;
        the model returns their logits in the order of `indices`."""
        if self.pack:
            batch = pack([encoded.input_ids[i] for i in indices], self.row_length, self.pad_id,
                         pad_width_to_multiple_of=self.multiple, pad_rows_to_multiple_of=self.rows_multiple)
            inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                      "document_ids": batch.document_ids, "starts": batch.starts}
            return inputs, batch.num_real_tokens, batch.input_ids.numel()
        input_ids, attention_mask, _ = make_batch(encoded, indices, self.pad_id, self.multiple, self.cap)
        return ({"input_ids": input_ids, "attention_mask": attention_mask}, int(attention_mask.sum()),
                input_ids.numel())


@dataclass
class PreparedData:
    """Task data tokenized once; shared by the runs of a backend comparison."""

    task: Task
    train: Encoded
    dev: dict[str, Encoded]
    layout: str
    max_length: int


def prepare_data(data: TaskData, tokenizer, cfg, model_limit: int, vocab_size: int) -> PreparedData:
    t = cfg.training
    max_length = cfg.task.max_length
    if max_length > model_limit:
        log.info("task.max_length %d exceeds what the checkpoint's position table allows; using %d", max_length, model_limit)
        max_length = model_limit
    regression = data.task.is_regression
    train = encode_split(tokenizer, data.train.subset(t.max_train_examples, t.subset_seed), max_length, regression)
    dev = {k: encode_split(tokenizer, v.subset(t.max_eval_examples, t.subset_seed), max_length, regression)
           for k, v in data.dev.items()}
    top = max(max((max(r) for r in e.input_ids if r), default=0) for e in [train, *dev.values()])
    if top >= vocab_size:
        raise UserError(f"the tokenizer produces id {top}, but the checkpoint's vocabulary has {vocab_size} entries; "
                        "the tokenizer does not belong to this checkpoint")
    return PreparedData(data.task, train, dev, data.layout, max_length)
