"""What pretraining is judged by: validation on the run's own task, and fill-mask, the same for every run.

`evaluate` reports three accuracies on the held-out blocks:

- valid/accuracy: the objective's own task, on batches built by the run's collator (the figure the loss
  trains). Its inputs differ by objective and layout: with mlm and the mpnet "appended" layout 10% of the
  predicted tokens are their own input (80/10/10), which a model learns to copy within a few hundred steps;
  with the "content" layout a query never reads its own input. So it does not compare runs.
- valid/masked_accuracy: the same predictions restricted to the tokens whose corrupted input is <mask>
  (80% of them; plm: all, it corrupts nothing), where copying is impossible.
- valid/fill_mask_accuracy: what `pipeline("fill-mask")` sees. Natural-order blocks with a fixed 15% of
  their non-special tokens replaced by <mask>, encoded in ONE stream, those tokens predicted. The same
  batches for every objective and layout, and for any masked LM (`fill_mask_scores` takes a logits
  function), so it is the figure that compares runs (docs/bench/dynamics.md).

`fill_mask` answers a few sentences with <mask> in them: the run summary prints the final checkpoint's
answers. It refuses a model whose LM head is untrained (`untrained_lm_head`), whose answers would be random.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from . import toolkit

# Printed by the run summary (metrics.MetricsLogger.summary): everyday English, one <mask> each.
FILL_MASK_SENTENCES = (
    "I do not <mask> what you mean.",
    "She was very <mask> to see him again.",
    "He said that he would <mask> her the next morning.",
)
FILL_MASK_SEED = 2**21  # the fill-mask batches' own stream, apart from every training and validation draw


def fill_mask_batches(blocks, mask_token_id: int, special_token_ids, pad_token_id: int, batch_size: int,
                      count: int, pred_prob: float = 0.15, seed: int = FILL_MASK_SEED) -> list[dict]:
    """`count` fixed batches of natural-order blocks: round(pred_prob x real tokens) of each row's non-special
    tokens (at least one) become <mask>; targets hold their ids, -100 elsewhere."""
    special = torch.as_tensor(sorted({int(i) for i in special_token_ids} | {int(pad_token_id), int(mask_token_id)}))
    generator = torch.Generator().manual_seed(seed)
    count = min(count, -(-len(blocks) // batch_size))
    batches = []
    for b in range(count):
        rows = [torch.as_tensor(np.asarray(blocks[i]), dtype=torch.long)
                for i in range(b * batch_size, min(len(blocks), (b + 1) * batch_size))]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
        targets = torch.full_like(input_ids, -100)
        attention_mask = torch.zeros_like(input_ids)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = row
            attention_mask[r, : len(row)] = 1
            candidates = torch.nonzero(~torch.isin(row, special)).flatten()
            if len(candidates) == 0:
                continue
            take = max(1, int(round(pred_prob * len(row))))
            chosen = candidates[torch.randperm(len(candidates), generator=generator)[:take]]
            targets[r, chosen] = row[chosen]
            input_ids[r, chosen] = int(mask_token_id)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets})
    return batches


@torch.no_grad()
def fill_mask_scores(logits_fn, batches, device) -> dict:
    """Loss and accuracy of `logits_fn(input_ids, attention_mask) -> (B, n, vocab)` at the masked tokens."""
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    count = torch.zeros((), device=device)
    for batch in batches:
        batch = toolkit.to_device(batch, device)
        targets = batch["targets"]
        chosen = targets != -100
        logits = logits_fn(batch["input_ids"], batch["attention_mask"])[chosen].float()
        loss_sum += F.cross_entropy(logits, targets[chosen], reduction="sum")
        correct += (logits.argmax(-1) == targets[chosen]).sum()
        count += chosen.sum()
    count = count.clamp(min=1)
    return {"loss": (loss_sum / count).item(), "accuracy": (correct / count).item()}


def corrupted_inputs(batch) -> torch.Tensor:
    """(B, pred_size) input of each predicted token as the collator corrupted it (mask, random or itself)."""
    if "appended_ids" in batch:
        return batch["appended_ids"]
    return batch["input_ids"][:, batch["input_ids"].shape[1] - batch["pred_size"]:]


@torch.no_grad()
def evaluate(model, batches, device, bf16: bool = True, objective: str = "mpnet", fill_batches=()) -> dict:
    """valid/loss, valid/accuracy and valid/masked_accuracy on the run's own batches; valid/fill_mask_loss and
    valid/fill_mask_accuracy on `fill_batches` (module docstring)."""
    model.eval()
    mask_id = model.config.mask_token_id
    sums = torch.zeros(5, device=device)  # loss, correct, count, correct where the input is <mask>, such count
    for batch in batches:
        batch = toolkit.to_device(batch, device)
        with toolkit.autocast(device, bf16):
            logits = model(batch["input_ids"], batch["positions"], batch["pred_size"], batch["attention_mask"],
                           document_ids=batch.get("document_ids"), objective=objective,
                           appended_ids=batch.get("appended_ids"))
        targets = batch["targets"]
        valid = targets != -100
        right = (logits.argmax(-1) == targets) & valid
        masked = valid & (corrupted_inputs(batch) == mask_id) if objective != "plm" else valid
        sums += torch.stack([F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                             reduction="sum"),
                             right.sum().float(), valid.sum().float(), (right & masked).sum().float(),
                             masked.sum().float()])
    loss, correct, count, masked_correct, masked_count = sums.tolist()
    values = {"valid/loss": loss / max(count, 1), "valid/accuracy": correct / max(count, 1),
              "valid/masked_accuracy": masked_correct / max(masked_count, 1)}
    if fill_batches:
        def logits_fn(input_ids, attention_mask):
            with toolkit.autocast(device, bf16):
                return model.mlm_logits(input_ids, attention_mask)

        scores = fill_mask_scores(logits_fn, fill_batches, device)
        values.update({"valid/fill_mask_loss": scores["loss"], "valid/fill_mask_accuracy": scores["accuracy"]})
    return values


def untrained_lm_head(model) -> bool:
    """Whether the model's LM head came from neither its checkpoint nor training: a checkpoint without one (an
    encoder-only model, e.g. `convert-mpnet hf` of a sentence-transformers model) loads with a new, random head
    (modeling/checkpoint.py records it in `untrained_parts`; a training step clears it)."""
    return "lm_head" in getattr(model, "untrained_parts", ())


@torch.no_grad()
def fill_mask(model, tokenizer, sentences=FILL_MASK_SENTENCES, top_k: int = 3) -> list[tuple[str, list[str]]]:
    """(sentence, its top_k answers for the first <mask>) for each sentence, with the model's own tokenizer."""
    if untrained_lm_head(model):
        raise UserError("this model's LM head is untrained: its checkpoint has none (an encoder-only model, e.g. "
                        "converted from sentence-transformers), so fill-mask would answer with random weights; "
                        "pretrain from it first (pretrain-mpnet training.init_from=CHECKPOINT)")
    model.eval()
    device = next(model.parameters()).device
    answers = []
    for sentence in sentences:
        text = sentence.replace("<mask>", tokenizer.mask_token)
        encoded = tokenizer(text, return_tensors="pt")
        input_ids = encoded["input_ids"].to(device)
        where = (input_ids[0] == tokenizer.mask_token_id).nonzero().flatten()
        if len(where) == 0:
            continue
        logits = model.mlm_logits(input_ids, encoded["attention_mask"].to(device))[0, where[0]].float()
        ids = logits.topk(top_k).indices.tolist()
        answers.append((sentence, [tokenizer.decode([i]).strip() for i in ids]))
    return answers
