"""Backend parity on CPU: the dense reference and the FlexAttention backend compute the same function.

Forward only (FlexAttention has no CPU backward; gradients are compared in test_gpu_backends.py).
Same weights, fp32, max abs diff <= 1e-5, for two-stream pretraining logits and single-stream
encodings, with and without a sliding window, with padding that differs per row, and at a length
that is not a multiple of the 128 block size. Also: the factory picks the class the config names,
and flex training on CPU fails fast with a message that says what to do.
"""
from __future__ import annotations

import pytest
import torch

from helpers import (
    encoding_batch,
    generator,
    make_model,
    max_abs,
    pretraining_batch,
    stacked_positions,
    tiny_config,
    with_backend,
)
from mpnet import MPNetForPretraining, MPNetForSequenceClassification
from mpnet.errors import UserError
from mpnet.modeling import (
    FlexAttentionUnavailable,
    FlexTwoStreamAttention,
    RelativeMultiHeadAttention,
    two_stream_self_attention_factory,
)
from mpnet.modeling.attention import make_dense_attention_state, make_flex_attention_state
from mpnet.modeling.patterns import window_spec
from mpnet.modeling.masks import relative_bias_by_distance

TOL = 1e-5

# (n, m, pad counts per row): a small case, and n = 232 (not a multiple of 128) with m = round(0.15 n)
TWO_STREAM = [(24, 4, (0, 3, 9)), (232, 35, (0, 40))]
SINGLE = [(24, (24, 21, 9)), (232, (232, 100))]
WINDOWS = [None, 3, 40]


@pytest.fixture(scope="module")
def models():
    dense = make_model(seed=11, num_hidden_layers=2)
    return {window: (with_backend(dense, False, sliding_window_size=window),
                     with_backend(dense, True, sliding_window_size=window)) for window in WINDOWS}


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("n,m,pads", TWO_STREAM)
def test_two_stream_dense_equals_flex(models, n, m, pads, window):
    dense, flex = models[window]
    ids, positions, mask = pretraining_batch(generator(n + m), n, m, pads)
    with torch.no_grad():
        a = dense(ids, positions, m, attention_mask=mask)
        b = flex(ids, positions, m, attention_mask=mask)
    assert a.shape == (len(pads), m, dense.config.vocab_size)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert max_abs(a, b) <= TOL


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("n,lengths", SINGLE)
def test_single_stream_dense_equals_flex(models, n, lengths, window):
    dense, flex = models[window]
    ids, mask = encoding_batch(generator(n), n, lengths)
    with torch.no_grad():
        a = dense.encode(ids, attention_mask=mask)
        b = flex.encode(ids, attention_mask=mask)
        la, lb = dense.mlm_logits(ids), flex.mlm_logits(ids)  # padding from pad ids alone
    real = mask.bool()
    assert torch.isfinite(a[real]).all()
    assert max_abs(a[real], b[real]) <= TOL
    assert max_abs(la[real], lb[real]) <= TOL


@pytest.mark.parametrize("window", [None, 3])
def test_fully_padded_row_is_finite_and_equal(models, window):
    """A row with no real token (every key hidden): no NaN from either backend, and the same output."""
    dense, flex = models[window]
    ids, mask = encoding_batch(generator(3), 24, (24, 0))
    with torch.no_grad():
        a = dense.encode(ids, attention_mask=mask)
        b = flex.encode(ids, attention_mask=mask)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert max_abs(a, b) <= TOL


def test_window_wider_than_sequence_is_no_window(models):
    """w >= n - 1 must change nothing (both backends)."""
    dense, flex = models[None]
    wide_dense, wide_flex = (with_backend(dense, flex_, sliding_window_size=100) for flex_ in (False, True))
    ids, positions, mask = pretraining_batch(generator(5), 24, 4, (0, 3))
    with torch.no_grad():
        reference = dense(ids, positions, 4, attention_mask=mask)
        assert max_abs(wide_dense(ids, positions, 4, attention_mask=mask), reference) <= TOL
        assert max_abs(wide_flex(ids, positions, 4, attention_mask=mask), reference) <= TOL


@pytest.mark.slow
def test_compiled_flex_on_cpu_equals_dense(monkeypatch):
    """The compiled CPU path (MPNET_COMPILE_FLEX_CPU=1) at one small shape (~20 s of compilation).

    Single stream with a window and padding (one BlockMask, one score_mod: the cheapest compile); the
    compiled two-stream path is covered on the GPU. A second batch of the same shape with other
    padding must reuse the compiled graphs (new mask_mod/score_mod closures must not recompile).
    """
    monkeypatch.setenv("MPNET_COMPILE_FLEX_CPU", "1")
    dense = make_model(seed=3, num_hidden_layers=1, sliding_window_size=4)
    flex = with_backend(dense, True)
    counters = torch._dynamo.utils.counters
    with torch.no_grad():
        for step, lengths in enumerate([(16, 12), (11, 16)]):
            ids, mask = encoding_batch(generator(step), 16, lengths)
            a = dense.encode(ids, attention_mask=mask)
            b = flex.encode(ids, attention_mask=mask)
            real = mask.bool()
            assert max_abs(a[real], b[real]) <= TOL
            graphs = counters["stats"]["unique_graphs"]
            if step == 0:
                first = graphs
                assert first > 0, "nothing was compiled: MPNET_COMPILE_FLEX_CPU=1 had no effect"
    assert graphs == first, f"the second batch of the same shape compiled {graphs - first} new graph(s)"


# ---------------------------------------------------------------------------------- factory


def test_factory_picks_the_backend():
    assert type(two_stream_self_attention_factory(tiny_config(use_flex_attention=False))) is RelativeMultiHeadAttention
    assert type(two_stream_self_attention_factory(tiny_config(use_flex_attention=True))) is FlexTwoStreamAttention
    for flex, cls in ((False, RelativeMultiHeadAttention), (True, FlexTwoStreamAttention)):
        for model_cls in (MPNetForPretraining, MPNetForSequenceClassification):
            model = model_cls(tiny_config(use_flex_attention=flex))
            kinds = {type(layer.attention.attn) for layer in model.mpnet.encoder.layer}
            assert kinds == {cls}


def test_backends_share_parameter_names_and_shapes():
    dense = MPNetForPretraining(tiny_config(use_flex_attention=False)).state_dict()
    flex = MPNetForPretraining(tiny_config(use_flex_attention=True)).state_dict()
    assert {k: v.shape for k, v in dense.items()} == {k: v.shape for k, v in flex.items()}


def test_flex_training_on_cpu_raises_a_clear_error():
    model = make_model(seed=0, flex=True).train()
    ids, positions, mask = pretraining_batch(generator(0), 12, 2, (0,))
    with pytest.raises(FlexAttentionUnavailable) as info:
        model(ids, positions, 2, attention_mask=mask)
    message = str(info.value)
    assert "CUDA" in message and "dense" in message
    assert isinstance(info.value, UserError)
    with pytest.raises(FlexAttentionUnavailable):
        model.encode(ids)
    model.eval()  # gradients are refused in eval mode too: there is no backward to run
    with pytest.raises(FlexAttentionUnavailable):
        model(ids, positions, 2, attention_mask=mask)
    # inference under no_grad is fine, in either mode
    with torch.no_grad():
        model(ids, positions, 2, attention_mask=mask)
        model.train()(ids, positions, 2, attention_mask=mask)


@pytest.mark.parametrize("n,m,window", [(232, 35, None), (232, 35, 7), (150, 0, None)])
def test_flex_score_mod_with_gradient_replicas_equals_dense(n, m, window):
    """When the bias table requires grad (training) the flex score_mod reads per-query-row replicas of
    it; that path only trains on CUDA, but its forward must equal the dense one (rows past 128 wrap)."""
    config = tiny_config()
    dense_attn = RelativeMultiHeadAttention(config).eval()
    flex_attn = FlexTwoStreamAttention(config).eval()
    flex_attn.load_state_dict(dense_attn.state_dict())
    table = torch.randn(32, config.num_attention_heads, generator=generator(4), requires_grad=True)
    distance_bias = relative_bias_by_distance(table, 128, 32)
    assert distance_bias.requires_grad
    ids, positions, mask = pretraining_batch(generator(n), n, m, (0, 9))
    stacked = stacked_positions(positions, mask, n, m)
    hidden = torch.randn(2, n + 2 * m, config.hidden_size, generator=generator(6))
    with torch.no_grad():
        a = dense_attn(hidden, make_dense_attention_state(stacked, n, m, distance_bias, 128, window_spec(window)))
        b = flex_attn(hidden, make_flex_attention_state(stacked, n, m, distance_bias, 128, window_spec(window)))
    assert max_abs(a, b) <= TOL


def test_dense_backend_trains_on_cpu():
    """The CPU path for training: dense backward reaches every parameter, incl. the relative bias."""
    model = make_model(seed=0, flex=False).train()
    ids, positions, mask = pretraining_batch(generator(0), 12, 2, (0, 3))
    model(ids, positions, 2, attention_mask=mask).float().square().mean().backward()
    bias_grad = model.mpnet.encoder.relative_attention_bias.weight.grad
    assert bias_grad is not None and bias_grad.abs().sum() > 0
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
