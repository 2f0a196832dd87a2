"""The MPNet collator: permute each example, predict the last m tokens of the permuted order.

The same batches serve the three objectives of the original MPNet code (docs/objectives.md): mpnet and
mlm take them as described below; plm (permuted LM, XLNet-style) takes the same permutation and
predicted tokens WITHOUT step 3, as the original's `--input-mode plm` collater does: its content stream
holds every token as it is.

For a batch padded to width n, m = round(pred_prob * n) (at least 1), one value for the whole batch. Per row:

1. Order. Padding entries come first (they sit inside the non-predicted part whenever the row has at least m
   real tokens), then the real tokens in a fresh random order. With whole-word masking the random order is over
   words (a word-start token and its continuation pieces), tokens of a word staying together in their original
   order; the boundary between context and predicted part may split one word.
2. Predicted part: the last m entries, rank 0..m-1 in permuted order. targets[b, r] is the original id of the
   rank-r entry, -100 where that entry is padding (only when a row has fewer than m real tokens).
3. Corruption of the predicted real tokens: 80% <mask>, 10% a random id drawn uniformly from the non-special
   ids, 10% unchanged. mpnet puts the corrupted tokens where `corrupted_input` says (default "appended": the
   inputs of the appended entries, the original MPNet code's layout); mlm in place of the predicted tokens.

Special tokens (<s>, </s>) are permuted and predicted like any other token, as in the original MPNet; pass
predict_special_tokens=False to keep them in the context part instead (they are then ordered right after the
padding).

Document isolation (document_separator_id set): blocks are cut across documents with </s> between them;
with isolation each entry also gets a document id (the number of separators before it in the block, so a
separator belongs to the document it closes) and its position restarts at 0 in every document, so the
model's attention never crosses a document boundary and positions mean "position in the document".

Randomness comes only from a torch.Generator seeded from (seed, step, rank), so a batch is a pure function of
its examples and those three numbers: resuming or re-running gives identical batches, and ranks differ.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


# Whether each objective's predicted tokens are corrupted 80/10/10 in the input (the names are those of
# modeling.model.OBJECTIVES). The permutation draws come first, so every objective gets the same
# permutation and predicted tokens for the same (seed, step, rank).
CORRUPTS_PREDICTED = {"mpnet": True, "mlm": True, "plm": False}
# Where the mpnet objective's corrupted tokens go (data.corrupted_input; mlm and plm ignore it).
# "appended" (the default): the original MPNet code's (MaskedDataset.collater, input_mode 'mpnet'): the
# content stream keeps the real predicted tokens, so a query of rank i sees the earlier predicted tokens
# themselves, and the corrupted tokens are the inputs of both appended sections (a query reads its own).
# "content": into the predicted tokens' content-stream entries, the appended entries plain <mask> (the
# layout this project was first specified with): a query never reads its own corrupted input, only the
# later queries do, and it learns much more slowly (docs/objectives.md, docs/bench/dynamics.md).
CORRUPTED_INPUTS = ("appended", "content")


class MPNetCollator:
    def __init__(self, vocab_size, pad_token_id, mask_token_id, special_token_ids, pred_prob=0.15,
                 whole_word_mask=False, word_starts=None, seed=0, predict_special_tokens=True,
                 document_separator_id=None, objective="mpnet", corrupted_input="appended"):
        if not 0 < pred_prob < 1:
            raise ValueError(f"pred_prob must be in (0, 1), got {pred_prob}")
        if objective not in CORRUPTS_PREDICTED:
            raise ValueError(f"objective must be one of {', '.join(CORRUPTS_PREDICTED)}, got {objective!r}")
        self.objective, self.corrupt = objective, CORRUPTS_PREDICTED[objective]
        if corrupted_input not in CORRUPTED_INPUTS:
            raise ValueError(f"corrupted_input must be one of {', '.join(CORRUPTED_INPUTS)}, got {corrupted_input!r}")
        self.corrupted_input = corrupted_input if objective == "mpnet" else "content"  # mlm: in place; plm: none
        if whole_word_mask and word_starts is None:
            raise ValueError("whole_word_mask needs word_starts (a bool array over the vocabulary)")
        self.vocab_size = int(vocab_size)
        self.pad_token_id, self.mask_token_id = int(pad_token_id), int(mask_token_id)
        self.pred_prob, self.seed = float(pred_prob), int(seed)
        self.whole_word_mask, self.predict_special_tokens = bool(whole_word_mask), bool(predict_special_tokens)
        special = torch.zeros(self.vocab_size, dtype=torch.bool)
        special[torch.as_tensor(sorted({int(i) for i in special_token_ids} | {self.pad_token_id, self.mask_token_id}))] = True
        self.is_special = special
        self.replacement_ids = torch.nonzero(~special).flatten()  # random replacements never draw a special token
        self.document_separator_id = None if document_separator_id is None else int(document_separator_id)
        self.word_starts = None
        if word_starts is not None:
            self.word_starts = torch.as_tensor(np.asarray(word_starts, dtype=bool))
            if len(self.word_starts) < self.vocab_size:
                raise ValueError(f"word_starts covers {len(self.word_starts)} ids, vocabulary has {self.vocab_size}")

    def generator(self, step, rank) -> torch.Generator:
        # SeedSequence mixes the three numbers properly: (seed, step, rank) tuples never collide by arithmetic.
        state = np.random.SeedSequence([self.seed, int(step), int(rank)]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))

    def pred_size(self, width) -> int:
        return max(1, int(round(self.pred_prob * width)))

    def __call__(self, examples: Sequence, step=0, rank=0) -> dict:
        g = self.generator(step, rank)
        rows = [torch.as_tensor(np.asarray(e), dtype=torch.long) for e in examples]
        B, n = len(rows), max(len(r) for r in rows)
        m = self.pred_size(n)

        tokens = torch.full((B, n), self.pad_token_id, dtype=torch.long)
        real = torch.zeros((B, n), dtype=torch.bool)
        for b, r in enumerate(rows):
            tokens[b, : len(r)] = r
            real[b, : len(r)] = True

        # Sort key per entry: padding -2 (first), held-back specials -1 (next), the rest a uniform draw per unit
        # (token, or word with whole-word masking). A stable sort keeps a word's pieces in their original order.
        if self.whole_word_mask:
            starts = self.word_starts[tokens] | self.is_special[tokens] | ~real
            starts[:, 0] = True
            unit = torch.cumsum(starts.long(), dim=1) - 1                     # word index of every token
            key = torch.gather(torch.rand((B, n), generator=g), 1, unit)
        else:
            key = torch.rand((B, n), generator=g)
        held = ~real
        if not self.predict_special_tokens:
            special_real = self.is_special[tokens] & real
            key = torch.where(special_real, torch.full_like(key, -1.0), key)
            held = held | special_real
        key = torch.where(real, key, torch.full_like(key, -2.0))
        perm = torch.argsort(key, dim=1, stable=True)                          # permuted index -> original position

        input_ids = torch.gather(tokens, 1, perm)
        natural_positions = torch.arange(n).expand(B, n)
        if self.document_separator_id is not None:
            document, natural_positions = self.documents(tokens)
        positions = torch.where(torch.gather(real, 1, perm), torch.gather(natural_positions, 1, perm),
                                torch.full_like(perm, -1))
        attention_mask = torch.gather(real, 1, perm).long()

        # Predicted part = last m entries; entries held back (padding / specials) there are not predicted.
        targets = input_ids[:, n - m :].clone()
        predicted = ~torch.gather(held, 1, perm)[:, n - m :]
        targets[~predicted] = -100

        appended_ids = None
        if self.corrupt:  # 80/10/10 on the predicted entries, all draws from the same generator.
            u = torch.rand((B, m), generator=g)
            random_ids = self.replacement_ids[torch.randint(len(self.replacement_ids), (B, m), generator=g)]
            corrupted = targets.clone()
            corrupted = torch.where(u < 0.8, torch.full_like(corrupted, self.mask_token_id), corrupted)
            corrupted = torch.where((u >= 0.8) & (u < 0.9), random_ids, corrupted)
            if self.corrupted_input == "content":
                input_ids[:, n - m :] = torch.where(predicted, corrupted, input_ids[:, n - m :])
            else:  # not-predicted (padding) entries of the predicted part get a plain <mask>
                appended_ids = torch.where(predicted, corrupted, torch.full_like(corrupted, self.mask_token_id))

        batch = {"input_ids": input_ids, "positions": positions, "targets": targets, "pred_size": m,
                 "attention_mask": attention_mask}
        if appended_ids is not None:
            batch["appended_ids"] = appended_ids
        if self.document_separator_id is not None:
            batch["document_ids"] = torch.gather(document, 1, perm)
        return batch

    def documents(self, tokens):
        """(document id, position within the document) of every entry of natural-order rows."""
        B, n = tokens.shape
        index = torch.arange(n).expand(B, n)
        closes = tokens == self.document_separator_id
        starts = torch.zeros_like(closes)
        starts[:, 0] = True
        starts[:, 1:] = closes[:, :-1]
        document = torch.cumsum(starts.long(), dim=1) - 1
        first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
        return document, index - first
