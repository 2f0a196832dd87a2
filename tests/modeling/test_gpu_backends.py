"""GPU: the compiled FlexAttention backend against the dense reference, forward AND backward.

Run on a CUDA machine:  python -m pytest -m gpu tests/modeling/test_gpu_backends.py -x -q  (add -s to see the
measured errors each test prints). Every test here is marked `gpu` (skipped without CUDA).

Model: hidden 256, 4 heads (head_dim 64, the real kernel's tile shape), 2 layers, randomized weights;
lengths 232 (not a multiple of the 128 block) and 512 with m = round(0.15 n); padding that differs per
row; with and without a sliding window. Compared: the output, the gradient of every parameter
(relative_attention_bias included: on the flex side it flows back through the score_mod's captured
tensor) and the input gradient (the embeddings' output, i.e. the encoder's input).

Tolerances.
- fp32: both sides run true fp32 (IEEE) matmuls: TF32 is switched off for cuBLAS
  (torch.backends.cuda.matmul.allow_tf32 = False, float32 matmul precision "highest") and FlexAttention's
  Triton kernel reads the same switch when it is compiled (its dots use input_precision "ieee" then).
  What remains is summation order (online softmax in tiles vs one softmax; the bias-table gradient is
  a sum of atomic adds in arbitrary order). Measured on an H200 (torch 2.11): outputs ~1.3e-6 relative
  by norm (max abs ~5e-5 on logits of size ~10), input gradient ~2.7e-6, relative-bias gradient ~3e-6.
  We allow 1e-4 relative by norm (30x margin) and 1e-4 * max|ref| elementwise on outputs: a real bug
  (a wrong mask entry, bias index or head) moves results by 1e-2 or more.
- bf16 autocast: bf16 keeps 8 significant bits (unit roundoff 2^-8 ~ 4e-3) and each of the ~10 matmuls
  on the path rounds its inputs. Both bf16 runs are compared to the fp32 dense reference (the truth).
  The yardstick is the dense backend's own bf16 error, because it is what bf16 costs this model, not
  a property of either backend: measured on an H200 (torch 2.11), dense bf16 is 3.2e-2 .. 4.0e-2 off
  the fp32 truth by norm on the input gradient and the q projections' gradients, flex bf16 2.5e-2 ..
  3.3e-2 (flex rounds less: its scores, softmax and bias stay fp32 inside the kernel). Flex must be
  no worse than 1.5x dense's error + 2e-3 on every tensor; a wrong mask entry, bias index or head is
  caught first by the fp32 test above, and here would push flex's error past dense's by far more.
- attn.k.bias: its gradient is exactly zero in exact arithmetic (adding k.bias shifts every score of
  a query row by the same q . b, and softmax is shift-invariant), so both backends return rounding
  noise there and a relative comparison is meaningless; instead both must be negligible next to the
  same layer's k.weight gradient (a non-zero one would mean rows that are not normalised).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from helpers import encoding_batch, generator, make_model, max_abs, other_id, pretraining_batch, rel_err, with_backend

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
GPU_MODEL = dict(hidden_size=256, num_attention_heads=4, intermediate_size=512, num_hidden_layers=2)

FP32_REL = 1e-4
ZERO_GRAD_RATIO = 0.05  # |grad k.bias| / |grad k.weight|, see the docstring
FP32_OUT_ABS = 1e-4
BF16_VS_DENSE = 1.5  # flex's bf16 error may be at most this times dense's (+ BF16_SLACK)
BF16_SLACK = 2e-3


def _m(n):
    return int(round(0.15 * n))


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def _dynamo_room(monkeypatch):
    """Many (shape, window, dtype, stream) variants compile in one process: give dynamo room, and fail
    loudly rather than silently falling back to the unfused path if the limit is ever hit."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(config, name, 64)
    if hasattr(config, "accumulated_recompile_limit"):
        monkeypatch.setattr(config, "accumulated_recompile_limit", 1024)
    if hasattr(config, "fail_on_recompile_limit_hit"):
        monkeypatch.setattr(config, "fail_on_recompile_limit_hit", True)


@contextlib.contextmanager
def ieee_fp32():
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old[0], old[1]
        torch.set_float32_matmul_precision(old[2])


def _pair(window, seed=0):
    dense = make_model(seed=seed, sliding_window_size=window, **GPU_MODEL)
    flex = with_backend(dense, True)
    return dense.to(DEVICE).train(), flex.to(DEVICE).train()  # dropout is 0: train mode = grads on


def _batch(stream, n):
    if stream == "two":
        m = _m(n)
        ids, positions, mask = pretraining_batch(generator(n), n, m, (0, 31))
        return ids.to(DEVICE), positions.to(DEVICE), mask.to(DEVICE), m
    ids, mask = encoding_batch(generator(n), n, (n, n - 57))
    return ids.to(DEVICE), None, mask.to(DEVICE), 0


def _run(model, stream, batch, bf16=False):
    """Forward + backward with a fixed random cotangent; returns output, input grad, parameter grads."""
    ids, positions, mask, m = batch
    model.zero_grad(set_to_none=True)
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["input"] = output

    hook = model.mpnet.embeddings.register_forward_hook(keep)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            if stream == "two":
                out = model(ids, positions, m, attention_mask=mask)
            else:
                out = model.encode(ids, attention_mask=mask)
        weights = torch.randn(out.shape, generator=generator(99)).to(DEVICE)
        if stream == "single":
            weights = weights * mask[..., None]  # padding rows are not outputs
        (out.float() * weights).sum().backward()
    finally:
        hook.remove()
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach().float(), captured["input"].grad.detach().float().clone(), grads


def _zero_in_exact_arithmetic(name):
    return name.endswith("attention.attn.k.bias")


def _check_zero_grads(grads, label):
    ratios = {name: (grads[name].norm() / grads[name.replace(".bias", ".weight")].norm()).item()
              for name in grads if _zero_in_exact_arithmetic(name)}
    print(f"\n[{label}] |grad k.bias| / |grad k.weight|: " + ", ".join(f"{r:.1e}" for r in ratios.values()))
    for name, ratio in ratios.items():
        assert ratio <= ZERO_GRAD_RATIO, f"{label} {name}: gradient should vanish, ratio {ratio:.3g}"


def _real_rows(out, stream, batch):
    return out[batch[2].bool()] if stream == "single" else out


# Each case compiles its own kernels (~1 min each on an H200): five fp32 cases, two bf16 ones.
CASES = [("two", 232, None), ("two", 512, None), ("two", 512, 64), ("single", 232, 64), ("single", 512, None)]


# --------------------------------------------------------------------------------- fp32 parity


@pytest.mark.parametrize("stream,n,window", CASES)
def test_fp32_forward_and_gradients_match(stream, n, window):
    dense, flex = _pair(window)
    batch = _batch(stream, n)
    with ieee_fp32():
        out_d, in_d, grads_d = _run(dense, stream, batch)
        out_f, in_f, grads_f = _run(flex, stream, batch)
    out_d, out_f = _real_rows(out_d, stream, batch), _real_rows(out_f, stream, batch)
    report = {"out_abs": max_abs(out_f, out_d), "out_rel": rel_err(out_f, out_d), "input_grad_rel": rel_err(in_f, in_d)}
    assert grads_d.keys() == grads_f.keys()
    assert "mpnet.encoder.relative_attention_bias.weight" in grads_f
    _check_zero_grads(grads_d, "dense")
    _check_zero_grads(grads_f, "flex")
    param_rel = {name: rel_err(grads_f[name], grads_d[name]) for name in grads_d if not _zero_in_exact_arithmetic(name)}
    worst = max(param_rel, key=param_rel.get)
    print(f"\n[fp32 {stream} n={n} w={window}] {report} worst param grad {worst}: {param_rel[worst]:.2e}; "
          f"relative_attention_bias: {param_rel['mpnet.encoder.relative_attention_bias.weight']:.2e}")
    assert torch.isfinite(out_f).all() and torch.isfinite(in_f).all()
    assert report["out_abs"] <= FP32_OUT_ABS * out_d.abs().max().item()
    assert report["out_rel"] <= FP32_REL
    assert report["input_grad_rel"] <= FP32_REL
    assert param_rel[worst] <= FP32_REL, f"{worst}: {param_rel[worst]:.3g}"


# --------------------------------------------------------------------------------- bf16 parity


@pytest.mark.parametrize("stream,n,window", [("two", 512, 64), ("single", 232, None)])
def test_bf16_autocast_forward_and_gradients_match(stream, n, window):
    dense, flex = _pair(window)
    batch = _batch(stream, n)
    with ieee_fp32():
        out_ref, in_ref, grads_ref = _run(dense, stream, batch)  # the fp32 truth
    out_d, in_d, grads_d = _run(dense, stream, batch, bf16=True)
    out_f, in_f, grads_f = _run(flex, stream, batch, bf16=True)
    out_ref, out_d, out_f = (_real_rows(x, stream, batch) for x in (out_ref, out_d, out_f))
    pairs = {"output": (out_f, out_d, out_ref), "input grad": (in_f, in_d, in_ref)}
    _check_zero_grads(grads_d, "dense bf16")
    _check_zero_grads(grads_f, "flex bf16")
    pairs.update({name: (grads_f[name], grads_d[name], grads_ref[name])
                  for name in grads_ref if not _zero_in_exact_arithmetic(name)})
    lines, failures = [], []
    for name, (f, d, ref) in pairs.items():
        err_f, err_d, err_fd = rel_err(f, ref), rel_err(d, ref), rel_err(f, d)
        lines.append(f"{name}: flex {err_f:.2e} dense {err_d:.2e} flex-vs-dense {err_fd:.2e}")
        if not err_f <= BF16_VS_DENSE * err_d + BF16_SLACK:
            failures.append(lines[-1])
    worst = sorted(lines, key=lambda line: -float(line.split("flex ")[1].split()[0]))[:4]
    print(f"\n[bf16 {stream} n={n} w={window}] worst relative errors vs fp32:\n  " + "\n  ".join(worst))
    assert not failures, failures


# ---------------------------------------------------------------------------------- recompiles


def test_new_batches_of_the_same_shape_do_not_recompile():
    """Three training steps, same shape, different permutations and padding: every step builds new
    mask_mod/score_mod closures and BlockMasks; only the first may compile."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    _, flex = _pair(window=None, seed=1)
    n, m = 232, _m(232)
    graphs = []
    for step in range(3):
        ids, positions, mask = pretraining_batch(generator(100 + step), n, m, ((0, 31), (12, 0), (5, 5))[step])
        flex.zero_grad(set_to_none=True)
        flex(ids.to(DEVICE), positions.to(DEVICE), m, attention_mask=mask.to(DEVICE)).float().square().mean().backward()
        torch.cuda.synchronize()
        graphs.append(counters["stats"]["unique_graphs"])
    frames = dict(counters["frames"])
    print(f"\n[recompiles] unique graphs after each step: {graphs}; frames: {frames}")
    assert graphs[0] > 0, "nothing was compiled: the flex backend did not use torch.compile on CUDA"
    reasons = {}
    if hasattr(torch._dynamo.utils, "guard_failures"):
        reasons = {getattr(code, "co_name", str(code)): [str(r)[:300] for r in failures]
                   for code, failures in torch._dynamo.utils.guard_failures.items()}
    assert graphs[2] == graphs[0], f"steps 2-3 compiled {graphs[2] - graphs[0]} new graph(s); guard failures: {reasons}"


# -------------------------------------------------------------------------------- no leak, GPU


def test_no_leak_with_the_compiled_kernel():
    """test_no_leak's black box, on CUDA with the compiled kernel: rank i sees predicted rank j iff j < i."""
    n, m = 64, 10
    flex = make_model(seed=31, flex=True, **{**GPU_MODEL, "num_hidden_layers": 3}).to(DEVICE)
    ids, positions, mask = pretraining_batch(generator(1), n, m, (0,))
    rows = ids.repeat(m + 1, 1)
    for j in range(m):
        rows[1 + j, n - m + j] = other_id(rows[1 + j, n - m + j], shift=7)
    with torch.no_grad():
        logits = flex(rows.to(DEVICE), positions.repeat(m + 1, 1).to(DEVICE), m,
                      attention_mask=mask.repeat(m + 1, 1).to(DEVICE)).float().cpu()
    diff = (logits[1:] - logits[:1]).abs().amax(-1)  # diff[j, i]
    j, i = torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")
    print(f"\n[no-leak GPU] max change where hidden (j >= i): {diff[j >= i].max():.3g}; "
          f"min change where visible (j < i): {diff[j < i].min():.3g}")
    assert diff[j >= i].max() <= 1e-6
    assert diff[j < i].min() > 1e-3
