"""Packed sequence classification: MPNetForSequenceClassification on packed rows (several examples per
row, isolated by document ids) gives every example the logits it gets alone, and the same gradients.

The oracle is each example run by itself (batch of one, no padding). fp32, CPU: logits to 1e-5 on the
dense and the FlexAttention backend (flex forward only: PyTorch has no FlexAttention backward on CPU);
on the dense backend the parameter gradients of the summed loss equal the sum of the examples' own
gradients to 1e-5 (norm-wise relative error, per parameter; the attention key biases, whose exact
gradient is zero, hold rounding noise on both sides and are checked to be noise-sized instead).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import generator, max_abs, ordinary_ids, randomize_, rel_err, tiny_config
from mpnet import MPNetForSequenceClassification
from mpnet.modeling.packing import document_starts, pack

LENGTHS = [5, 17, 9, 30, 3, 12, 21, 8]
ROW = 32
NUM_LABELS = 3


def examples(lengths, seed=0):
    """<s> ordinary tokens </s>, as a tokenizer writes a sentence."""
    gen = generator(seed)
    return [[0, *ordinary_ids(gen, (length - 2,)).tolist(), 2] for length in lengths]


def classifier(flex: bool = False) -> MPNetForSequenceClassification:
    model = MPNetForSequenceClassification(tiny_config(num_labels=NUM_LABELS))
    model = randomize_(model, seed=23).eval()
    if flex:
        config = copy.deepcopy(model.config)
        config.use_flex_attention = True
        other = MPNetForSequenceClassification(config)
        other.load_state_dict(model.state_dict())
        model = other.eval()
    return model


@pytest.fixture(scope="module")
def dense():
    return classifier(flex=False)


def alone_logits(model, items):
    return torch.cat([model(torch.tensor([item])) for item in items])


@pytest.mark.parametrize("padding", [{}, {"pad_width_to_multiple_of": ROW, "pad_rows_to_multiple_of": 3}],
                         ids=["tight", "bucketed"])
@pytest.mark.parametrize("flex", [False, True], ids=["dense", "flex"])
def test_packed_logits_equal_one_by_one(dense, flex, padding):
    model = classifier(flex=True) if flex else dense
    items = examples(LENGTHS)
    batch = pack(items, max_length=ROW, **padding)
    if padding:  # bucketed: 4 full-width rows of examples, then 2 rows of padding only
        assert batch.input_ids.shape == (6, ROW) and not batch.attention_mask[4:].any()
    with torch.no_grad():
        packed = model(batch.input_ids, batch.attention_mask, batch.document_ids, batch.starts)
        expected = alone_logits(model, items)
    assert packed.shape == (len(items), NUM_LABELS)
    assert max_abs(packed, expected) <= 1e-5


def test_default_order_is_row_major_documents(dense):
    items = examples(LENGTHS)
    batch = pack(items, max_length=ROW)
    order = sorted(range(len(items)), key=lambda i: batch.placements[i][:2])  # (row, start)
    assert document_starts(batch.document_ids).tolist() == [list(batch.placements[i][:2]) for i in order]
    with torch.no_grad():
        packed = dense(batch.input_ids, batch.attention_mask, batch.document_ids)
        expected = alone_logits(dense, [items[i] for i in order])
    assert max_abs(packed, expected) <= 1e-5


def test_unpacked_calls_are_unchanged(dense):
    """Without document_ids the model is HF's: logits at each row's <s>; padded rows give the same."""
    items = examples([7, 12, 4])
    ids = torch.full((3, 12), 1)
    for row, item in enumerate(items):
        ids[row, :len(item)] = torch.tensor(item)
    with torch.no_grad():
        padded = dense(ids, (ids != 1).long())
        expected = alone_logits(dense, items)
    assert max_abs(padded, expected) <= 1e-5


def test_packed_gradients_equal_the_sum_over_examples(dense):
    model = copy.deepcopy(dense).train()  # dropout is 0 in the tiny config: train mode changes nothing
    items = examples(LENGTHS)
    labels = torch.randint(0, NUM_LABELS, (len(items),), generator=generator(4))
    batch = pack(items, max_length=ROW, pad_rows_to_multiple_of=3)

    model.zero_grad()
    logits = model(batch.input_ids, batch.attention_mask, batch.document_ids, batch.starts)
    F.cross_entropy(logits, labels, reduction="sum").backward()
    packed = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad()
    for item, label in zip(items, labels):  # gradients accumulate: the sum over the examples
        F.cross_entropy(model(torch.tensor([item])), label[None], reduction="sum").backward()
    alone = {name: p.grad.clone() for name, p in model.named_parameters()}

    assert packed.keys() == alone.keys()
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    total = flat(alone).norm().item()
    assert rel_err(flat(packed), flat(alone)) <= 1e-5
    # The key biases' exact gradient is zero (they add one constant to all scores of a query row,
    # which the softmax ignores): both sides hold only rounding noise there, so a relative error
    # means nothing; they must be noise-sized. Every other parameter: <= 1e-5 relative.
    zero_exactly = [name for name in alone if name.endswith("attn.k.bias")]
    for name in zero_exactly:
        assert max(packed[name].norm().item(), alone[name].norm().item()) <= 1e-6 * total, name
    worst = max((rel_err(packed[name], alone[name]), name) for name in alone if name not in zero_exactly)
    assert worst[0] <= 1e-5, worst
    # The comparison is not vacuous: every other parameter gets a real gradient.
    assert all(alone[name].norm() > 1e-3 for name in alone if name not in zero_exactly)


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_packed_flex_training_step_equals_one_by_one(monkeypatch):
    """CUDA, fp32 without TF32: the compiled flex kernels on packed 128-token rows (head_dim 64, the
    real tile shape), forward and backward, against each example alone on the dense backend. 1e-4
    relative: summation order differs (online softmax in tiles, atomic adds into the bias table)."""
    config = torch._dynamo.config
    monkeypatch.setattr(config, "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit", 64)
    matmul, cudnn, precision = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                                torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        size = dict(hidden_size=256, num_attention_heads=4, intermediate_size=512, num_labels=NUM_LABELS)
        dense = randomize_(MPNetForSequenceClassification(tiny_config(**size)), seed=5).to("cuda").train()
        flex = MPNetForSequenceClassification(tiny_config(use_flex_attention=True, **size))
        flex.load_state_dict(dense.state_dict())
        flex = flex.to("cuda").train()
        lengths = [100, 7, 60, 33, 128, 12, 90, 45, 21, 64]
        items = examples(lengths, seed=3)
        labels = torch.randint(0, NUM_LABELS, (len(items),), generator=generator(6)).cuda()
        batch = pack(items, max_length=128, pad_width_to_multiple_of=128, pad_rows_to_multiple_of=4).to("cuda")
        logits = flex(batch.input_ids, batch.attention_mask, batch.document_ids, batch.starts)
        F.cross_entropy(logits, labels, reduction="sum").backward()
        packed = {name: p.grad.clone() for name, p in flex.named_parameters()}
        alone_logits = []
        for item, label in zip(items, labels):
            out = dense(torch.tensor([item], device="cuda"))
            F.cross_entropy(out, label[None], reduction="sum").backward()
            alone_logits.append(out.detach())
        alone = {name: p.grad.clone() for name, p in dense.named_parameters()}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        torch.set_float32_matmul_precision(precision)
    assert rel_err(logits.detach(), torch.cat(alone_logits)) <= 1e-4
    total = torch.cat([g.flatten() for g in alone.values()]).norm().item()
    for name in alone:
        if name.endswith("attn.k.bias"):  # exactly zero in exact arithmetic (see above): noise-sized
            assert max(packed[name].norm().item(), alone[name].norm().item()) <= 1e-4 * total, name
        else:
            assert rel_err(packed[name], alone[name]) <= 1e-4, name
