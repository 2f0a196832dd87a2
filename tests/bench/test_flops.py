"""The FLOP counts behind every TFLOP/s and MFU figure, against torch's own count of a real forward +
backward (torch.utils.flop_counter.FlopCounterMode: every matmul the models run, as it runs them).

One count for MPNet, `mpnet.training.metrics.estimate_flops_per_example`, used by training's MFU and by
the benchmarks: q, o and the FFN on all n + 2m rows (in the last layer the m query rows only),
k and v on the n + m content rows only, attention (n + 2m) x (n + m) (last layer m x (n + m)), the LM
head on the m query rows; backward = 2 x forward.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from mpnet.bench.attention import attention_flops
from mpnet.bench.step import MaskedRowsBertMLM, bert_step_flops, finetune_flops_per_example
from mpnet.modeling.config import MPNetConfig
from mpnet.modeling.model import MPNetForPretraining, MPNetForSequenceClassification
from mpnet.training.metrics import estimate_flops_per_example

VOCAB = 300


def counted(forward) -> int:
    """Matmul FLOPs of forward() and the backward of its sum."""
    with FlopCounterMode(display=False) as counter:
        forward().float().sum().backward()
    return counter.get_total_flops()


def tiny_config(**overrides) -> MPNetConfig:
    return MPNetConfig.tiny(vocab_size=VOCAB, mask_token_id=VOCAB - 1, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, **overrides)


@pytest.mark.parametrize("n, m", [(40, 6), (33, 1), (24, 0)])
def test_mpnet_two_stream_count_is_what_the_model_computes(n, m):
    torch.manual_seed(0)
    config = tiny_config()
    model = MPNetForPretraining(config)
    batch = 2
    ids = torch.randint(5, VOCAB - 2, (batch, n))
    positions = torch.stack([torch.randperm(n) for _ in range(batch)])
    if m:  # the last layer computes the m query rows only: all the loss reads
        assert counted(lambda: model(ids, positions, m)) == batch * estimate_flops_per_example(config, n, m,
                                                                                               last_layer_rows=m)
    else:  # single-stream encoding: every row, no LM head
        assert counted(lambda: model.encode(ids)) == batch * estimate_flops_per_example(config, n, m)


def test_finetune_count_for_ours_and_for_transformers():
    torch.manual_seed(0)
    config = tiny_config(num_labels=3)
    batch, n = 2, 20
    ids = torch.randint(5, VOCAB - 2, (batch, n))
    mask = torch.ones_like(ids)
    expected = batch * finetune_flops_per_example(config, n)
    ours = MPNetForSequenceClassification(config)
    assert counted(lambda: ours(ids, attention_mask=mask)) == expected
    theirs = transformers.MPNetForSequenceClassification(config)
    assert counted(lambda: theirs(input_ids=ids, attention_mask=mask).logits) == expected


def test_bert_count():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForMaskedLM._from_config(config, attn_implementation="eager")
    ids = torch.randint(5, VOCAB, (2, 16))
    assert counted(lambda: model(input_ids=ids).logits) == bert_step_flops(config, 2, 16)


def test_sparse_head_bert_count():
    """The step section's reference: the MLM head on the masked rows only."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = MaskedRowsBertMLM(transformers.BertForMaskedLM._from_config(config, attn_implementation="eager"))
    ids, rows = torch.randint(5, VOCAB, (2, 16)), torch.tensor([[0, 5, 9], [3, 4, 15]])
    assert counted(lambda: model(ids, rows)) == bert_step_flops(config, 2, 16, head_rows=3)


def test_attention_pair_convention():
    # 4 B H Lq Lk D forward (two matmuls, 2 FLOPs per multiply-add), backward 2.5x forward (FlashAttention's)
    assert attention_flops(2, 12, 64, 100, 80, backward=False) == 4 * 2 * 12 * 100 * 80 * 64
    assert attention_flops(2, 12, 64, 100, 80, backward=True) == 3.5 * 4 * 2 * 12 * 100 * 80 * 64
