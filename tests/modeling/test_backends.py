"""Backend parity on CPU: the dense reference and the FlexAttention backend compute the same function.

Forward only (FlexAttention has no CPU backward; gradients are compared in test_gpu_backends.py).
Same weights, fp32, max abs diff <= 1e-5, for two-stream pretraining logits and single-stream
encodings, with and without a sliding window, with padding that differs per row, and at a length
that is not a multiple of the 128 block size. Also: the factory picks the class the config names,
and flex training on CPU fails fast with a message that says what to do.

The registry (modeling/backends.py): every entry's claims hold. Each backend computes the dense
backend's logits for every pattern rule, objective and document isolation it claims and refuses the
rules it does not claim; it trains and runs on this machine's device exactly where its entry says;
it applies attention dropout iff its entry says so; and the commands refuse a backend that cannot
train here (triton without CUDA) in one line before any output or data directory exists.
"""
from __future__ import annotations

import os

import pytest
import torch

from cli_support import assert_one_line_error_text, call_main, cli_main
from fixtures import make_checkpoint
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
from mpnet.modeling.backends import ATTENTION_BACKEND_NAMES, ATTENTION_BACKENDS
from mpnet.modeling.config import MPNetConfig
from mpnet.modeling.model import OBJECTIVES
from mpnet.modeling.patterns import PATTERN_NAMES, window_spec
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


# --------------------------------------------------------------------------------- the registry

# This machine's CPU, and a GPU where there is one (the `gpu` tests): each entry's claims for each.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# On a GPU both sides run IEEE fp32 and differ by summation order only: test_gpu_backends.py's output
# tolerance, 1e-4 x max|reference|.
GPU_FP32_OUT = 1e-4
# One spec per rule of patterns.py: a backend's claim to each rule is checked on it.
SPEC_OF_RULE = {"window": "window:3", "neighbourhood": "neighbourhood:2", "dilated": "dilated:2:2",
                "global": "global:2:5", "block": "block:8", "swin": "swin:8", "prefix": "prefix:6",
                "softcap": "softcap:2", "alibi": "alibi"}
# (pattern, objective, document isolation): each rule under mpnet, each objective and documents alone
JOBS = ([(spec, "mpnet", False) for spec in SPEC_OF_RULE.values()]
        + [(None, objective, False) for objective in OBJECTIVES] + [(None, "mpnet", True)])
N, M = 24, 4


@pytest.fixture(scope="module")
def reference():
    return make_model(seed=21, num_hidden_layers=1)


@pytest.fixture(autouse=True)
def _ieee_fp32(monkeypatch):
    """TF32 off for the GPU cases (FlexAttention's and Triton's kernels read the same switch)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _under(model, backend: str, device, **fields) -> MPNetForPretraining:
    """The same weights under another backend (and config fields), on `device`, in eval mode."""
    return with_backend(model, False, attention_backend=backend, **fields).eval().to(device)


def _logits(model, objective="mpnet", documents=False):
    device = next(model.parameters()).device
    ids, positions, mask = (t.to(device) for t in pretraining_batch(generator(7), N, M, (0, 5)))
    document_ids = (positions >= N // 2).long() if documents else None  # two documents per row
    return model(ids, positions, M, attention_mask=mask, objective=objective, document_ids=document_ids)


def _interpreted(name, device) -> bool:
    # TRITON_INTERPRET=1 lets Triton's interpreter run the triton backend on CPU tensors, for its tests only
    return name == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def test_the_registry_names_each_backend_once_and_claims_only_known_rules():
    assert ATTENTION_BACKEND_NAMES == tuple(ATTENTION_BACKENDS) and set(SPEC_OF_RULE) == PATTERN_NAMES
    for name, entry in ATTENTION_BACKENDS.items():
        assert entry.name == name and MPNetConfig.tiny(attention_backend=name).attention_backend == name
        assert type(two_stream_self_attention_factory(tiny_config(attention_backend=name))) is entry.module_class
        assert entry.capabilities.patterns <= PATTERN_NAMES
        assert entry.capabilities.objectives is None or entry.capabilities.objectives <= set(OBJECTIVES)
        assert entry.capabilities.packed_rows_multiple >= 1
    dense = ATTENTION_BACKENDS["dense"]  # the reference computes everything, everywhere
    assert dense.trains_on("cpu") and all(not dense.unsupported(pattern, documents=documents, objective=objective)
                                          for pattern, objective, documents in JOBS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [n for n in ATTENTION_BACKEND_NAMES if n != "dense"])
@pytest.mark.parametrize("pattern,objective,documents", JOBS,
                         ids=[f"{p or 'no-pattern'}-{o}{'-documents' if d else ''}" for p, o, d in JOBS])
def test_each_backend_computes_what_its_entry_claims_and_refuses_the_rest(reference, name, pattern, objective,
                                                                          documents, device):
    entry = ATTENTION_BACKENDS[name]
    missing = entry.unsupported(pattern, documents=documents, objective=objective)
    other = _under(reference, name, device, attention_pattern=pattern)
    if missing:  # refused by name, never computed as something else
        with pytest.raises(UserError) as info, torch.no_grad():
            _logits(other, objective, documents)
        assert any(part in str(info.value) for part in missing), (missing, str(info.value))
        return
    if not (entry.runs_on(device) or _interpreted(name, device)):
        pytest.skip(f"{name} runs on {', '.join(sorted(entry.capabilities.runs_on))} only")
    with torch.no_grad():
        expected = _logits(_under(reference, "dense", device, attention_pattern=pattern), objective, documents)
        got = _logits(other, objective, documents)
    tolerance = TOL if device == "cpu" else GPU_FP32_OUT * expected.abs().max().item()
    assert torch.isfinite(expected).all() and max_abs(got, expected) <= tolerance


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ATTENTION_BACKEND_NAMES)
def test_each_backend_trains_and_runs_exactly_where_its_entry_says(reference, name, device):
    entry = ATTENTION_BACKENDS[name]
    if _interpreted(name, device):
        pytest.skip("Triton's interpreter runs the triton backend on CPU for its tests")
    model = _under(reference, name, device).train()
    for training, claimed in ((True, entry.trains_on(device)), (False, entry.runs_on(device))):
        assert (entry.refusal(device, training=training) is None) == claimed
        with torch.set_grad_enabled(training):
            if not claimed:
                with pytest.raises(UserError):
                    _logits(model)
                continue
            logits = _logits(model)
            if training:  # a backward that reaches the relative bias, as training needs
                logits.float().square().mean().backward()
                assert model.mpnet.encoder.relative_attention_bias.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ATTENTION_BACKEND_NAMES)
def test_attention_dropout_is_applied_exactly_where_the_entry_says(reference, name, device):
    entry = ATTENTION_BACKENDS[name]
    if not (entry.runs_on(device) or _interpreted(name, device)):
        pytest.skip(f"{name} does not run on {device}")
    model = _under(reference, name, device, attention_probs_dropout_prob=0.5)
    with torch.no_grad():
        evaluated = _logits(model)
        trained = _logits(model.train())  # hidden dropout is 0: only attention dropout can differ
    assert (max_abs(trained, evaluated) > 1e-3) == entry.capabilities.attention_dropout


def test_a_refusal_names_the_backends_that_can_do_the_job():
    line = ATTENTION_BACKENDS["triton"].refusal("cuda", training=True, pattern="window:8,block:16,softcap:30")
    assert "block:16, softcap:30" in line and "dense or flex" in line and "window:8" not in line.split("(")[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal on a machine without CUDA")
def test_the_commands_refuse_triton_without_cuda_in_one_line_before_any_data(tmp_path):
    """pretrain-mpnet would preprocess the corpus into OUTPUT/data-cache, finetune-mpnet and compare-mpnet-backends
    would read the task's data: each stops first, in one line, and creates no directory."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A sentence of the corpus that would be preprocessed.\n" * 20)
    checkpoint = make_checkpoint(tmp_path / "checkpoint")
    glue = tmp_path / "glue"
    glue.mkdir()  # empty: reading the task's data would fail with another message
    runs = {"pretrain": ["--data", corpus],
            "finetune": ["--checkpoint", checkpoint, "--task", "sst2", "--data-dir", glue],
            "compare": ["--checkpoint", checkpoint, "--tasks", "sst2", "--data-dir", glue]}
    for command, arguments in runs.items():
        out = tmp_path / f"out-{command}"
        backend = ["--backends", "dense,triton"] if command == "compare" else ["--attention-backend", "triton"]
        code, stderr = call_main(cli_main(command), *arguments, *backend, "--output-dir", out)
        assert_one_line_error_text(code, stderr, "the triton attention backend cannot", "CUDA")
        assert not out.exists(), command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "corpus.txt", "glue"]
