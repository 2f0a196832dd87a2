"""The attention benchmark's cells compute the same attention (mpnet/bench/attention.py), so their
times compare like for like. Not a timing: CPU, fp32, tiny sizes.

- Every backend's cell (SDPA with the materialised bias + mask, dense with its state built per call or
  once, flex with and without a window) gives the dense reference's output on the same input, for the
  two-stream pair and for single-stream attention.
- The SDPA + materialised bias cell's gradient reaches the bias table and equals the dense one's.
"""
from __future__ import annotations

import pytest
import torch

from mpnet.bench.attention import (build_dense, build_dense_once, build_flex, build_sdpa_bias, distance_bias_of,
                                   materialised_bias, sdpa_bias_kernels)
from mpnet.bench.problems import AttentionSettings, SDPAAttention, attention_module, make_attention_problem
from mpnet.bench.harness import Timer
from mpnet.errors import UserError
from mpnet.modeling.attention import RelativeMultiHeadAttention, make_dense_attention_state
from mpnet.modeling.masks import natural_order

CPU = torch.device("cpu")


def settings(streams, backward=False):
    return AttentionSettings(streams=streams, lengths=[40], tokens_per_batch=80, heads=2, head_dim=8, dtype="fp32",
                             device="cpu", backward=backward, attention_dropout=0.0, max_distance=16, repeats=1,
                             warmup=1, max_seconds=0.1)


@pytest.mark.parametrize("streams", ["two", "one"])
def test_every_cell_computes_the_dense_attention(streams):
    s = settings(streams)
    p = make_attention_problem(s, 40, CPU)
    with torch.no_grad():
        expected = build_dense(s, p, CPU, Timer(CPU)).forward()
        outputs = {"dense (state once)": build_dense_once(s, p, CPU, Timer(CPU)).forward(),
                   "SDPA + materialised bias": build_sdpa_bias(s, p, CPU, Timer(CPU)).forward(),
                   "flex": build_flex(s, p, CPU, Timer(CPU)).forward()}
    assert expected.shape == (p.batch, p.rows, 16) and (p.m > 0) == (streams == "two")
    for name, out in outputs.items():
        assert (out - expected).abs().max().item() <= 1e-5, name
    # A window changes the function: flex w=8 equals the dense backend with the same window.
    with torch.no_grad():
        windowed = build_flex(s, p, CPU, Timer(CPU), window=8).forward()
        layout = natural_order(p.positions, p.n, p.m) if p.m else None
        positions = p.positions if layout is None else p.positions.gather(1, layout)
        state = make_dense_attention_state(positions, p.n, p.m, distance_bias_of(s, p.table), s.max_distance, "window:8",
                                           layout=layout)
        reference = attention_module(RelativeMultiHeadAttention, s, CPU)(p.hidden, state)
    assert (windowed - reference).abs().max().item() <= 1e-5
    assert (windowed - expected).abs().max().item() > 1e-3  # the window hides something at n = 40


def test_sdpa_bias_gradient_reaches_the_table_as_dense_does():
    """One forward of the user's alternative (build the bias from the table, then SDPA) has the dense
    backend's gradient in the table: the cell's two timed parts are that computation split in two."""
    s = settings("two", backward=True)
    p = make_attention_problem(s, 40, CPU)
    build_dense(s, p, CPU, Timer(CPU)).forward().backward(p.grad_out)
    dense = p.table.grad.clone()
    p.table.grad = None
    module = attention_module(SDPAAttention, s, CPU)
    module(p.hidden, p.kv_len, sdpa_bias_kernels(CPU), attn_mask=materialised_bias(s, p)).backward(p.grad_out)
    assert dense.abs().sum() > 0
    assert torch.allclose(p.table.grad, dense, atol=1e-6, rtol=1e-4)


TRITON_CHECK = """
import torch
from mpnet.bench.attention import RelativeMultiHeadAttention, build_dense, build_triton, distance_bias_of, rows_for
from mpnet.bench.problems import AttentionSettings, attention_module, make_attention_problem
from mpnet.bench.harness import Timer
from mpnet.modeling.attention import make_dense_attention_state
from mpnet.modeling.patterns import window_spec
cpu = torch.device("cpu")
for streams in ("two", "one"):
    s = AttentionSettings(streams=streams, lengths=[40], tokens_per_batch=80, heads=2, head_dim=16, dtype="fp32",
                          device="cpu", backward=True, attention_dropout=0.0, max_distance=16)
    p = make_attention_problem(s, 40, cpu)
    build_dense(s, p, cpu, Timer(cpu)).forward().backward(p.grad_out)
    dense_grad, p.table.grad = p.table.grad.clone(), None
    for window in (None, 8):
        layout, positions = rows_for(p, window)
        state = make_dense_attention_state(positions, p.n, p.m, distance_bias_of(s, p.table), s.max_distance, window_spec(window),
                                           layout=layout)
        with torch.no_grad():
            expected = attention_module(RelativeMultiHeadAttention, s, cpu)(p.hidden, state)
        out = build_triton(s, p, cpu, Timer(cpu), window=window).forward()
        assert (out - expected).abs().max().item() <= 1e-5, (streams, window)
    out = build_triton(s, p, cpu, Timer(cpu)).forward()
    out.backward(p.grad_out)
    assert torch.allclose(p.table.grad, dense_grad, atol=1e-5, rtol=1e-4), streams
print("triton cells ok")
"""


@pytest.mark.slow
def test_triton_cell_computes_the_dense_attention_in_the_interpreter():
    """The triton cells (CUDA in the benchmark) on CPU in Triton's interpreter, which must be switched on
    before triton is imported: hence a process of its own."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "triton cells ok" in out.stdout, (out.returncode, out.stderr[-3000:])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "triton", "flex"])
def test_cuda_graph_replay_computes_what_the_eager_run_computes(backend):
    """--cuda-graphs times a cell's fwd+bwd as a CUDA-graph replay; the replay must do the same work: the
    table's gradient (triton) or the input's (sdpa, flex) after one replay equals the eager run's. The flex
    cell is the one whose capture used to fail (a node built outside the run, on the default stream)."""
    from mpnet.bench.attention import BUILDERS, build_flex, build_triton, graph_timing, make_run

    cuda = torch.device("cuda")
    s = AttentionSettings(streams="two", lengths=[256], tokens_per_batch=1024, heads=4, head_dim=64, dtype="bf16",
                          device="cuda", backward=True, repeats=3, warmup=2, max_seconds=1.0, cuda_graphs=True)
    p = make_attention_problem(s, 256, cuda)
    builder = {"triton": build_triton, "flex": build_flex}.get(backend, BUILDERS.get(backend))
    leaf = p.table if backend == "triton" else p.hidden
    run = make_run(builder(s, p, cuda, Timer(cuda)), p, s, cuda)
    run()
    eager = leaf.grad.clone()
    timing = graph_timing(lambda: make_run(builder(s, p, cuda, Timer(cuda)), p, s, cuda), s, Timer(cuda))
    assert timing.get("graph_ms", 0) > 0, timing
    # the last replay's gradient: the triton kernels and flex's dQ / dK / dV passes are deterministic (no
    # atomics; flex's bias gradient has them, hence the input's gradient there); flash's dq is not
    exact = dict(rtol=0, atol=0) if backend != "sdpa" else {}
    torch.testing.assert_close(leaf.grad, eager, **exact)


@pytest.mark.gpu
def test_profile_names_the_triton_backends_kernels_and_their_gpu_time():
    """--profile: the triton cell lists its own kernels with their GPU ms per run, and the report shows them
    (the evidence of where its time goes against SDPA flash's)."""
    from types import SimpleNamespace

    from mpnet.bench.attention import Variant, kernel_tables, measure_attention

    cuda = torch.device("cuda")
    s = AttentionSettings(streams="one", lengths=[128], tokens_per_batch=1024, heads=4, head_dim=64, dtype="bf16",
                          device="cuda", backward=True, repeats=3, warmup=2, max_seconds=1.0, profile=True)
    cell = measure_attention(s, make_attention_problem(s, 128, cuda), Variant("triton", "triton"), cuda, Timer(cuda))
    names = {name for name, ms in cell["kernels"] if ms > 0}
    assert {"_forward_kernel", "_key_gradients_kernel", "_query_gradients_kernel"} <= names, cell["kernels"]
    assert 0 < sum(ms for _, ms in cell["kernels"]) <= cell["kernel_ms"] + 1e-9
    text = "\n".join(line for table in kernel_tables(SimpleNamespace(cells=[dict(cell, L=128, label="triton")]))
                     for line in table.lines())
    assert "`_key_gradients_kernel`" in text and "Where the time goes" in text


def test_the_report_lists_profiled_kernels_only_for_cells_that_have_them():
    """--profile's table: one row per profiled cell with its GPU total, its timed ms and its kernels in
    the order given (largest first); no table at all when nothing was profiled (CPU, or no --profile)."""
    from types import SimpleNamespace

    from mpnet.bench.attention import kernel_tables

    profiled = dict(L=128, label="triton", ms=1.5, kernel_ms=0.41,
                    kernels=[["_key_gradients_kernel", 0.193], ["_forward_kernel", 0.08]])
    tables = kernel_tables(SimpleNamespace(cells=[profiled, dict(L=128, label="flex", ms=2.9)]))
    lines = [line for table in tables for line in table.lines()]
    rows = [line for line in "\n".join(lines).splitlines() if line.startswith("| 128")]
    assert len(rows) == 1 and "0.410" in rows[0] and "1.500" in rows[0], lines
    assert rows[0].index("_key_gradients_kernel") < rows[0].index("_forward_kernel")
    assert kernel_tables(SimpleNamespace(cells=[dict(L=128, label="flex", ms=2.9)])) == []


def test_cuda_graphs_time_the_sdpa_flex_and_triton_cells_with_and_without_a_window():
    from mpnet.bench.attention import attention_variants, graphed

    keys = [v.key for v in attention_variants(AttentionSettings(windows=[256]))]
    assert [key for key in keys if graphed(key)] == ["sdpa", "flex", "flex-w256", "triton", "triton-w256"]


def test_the_method_says_how_graph_replays_are_timed_when_they_are():
    from mpnet.bench.attention import method_lines

    assert any("CUDA graph ms" in line for line in method_lines(AttentionSettings(cuda_graphs=True)))
    assert not any("CUDA graph ms" in line for line in method_lines(AttentionSettings()))


def test_triton_tiles_give_each_triton_cell_once_per_entry():
    """--triton-tiles: the triton cells, with and without a window, once per entry (the others once), each
    entry read into the one kernel's tiles it changes or the parts it leaves out."""
    from mpnet.bench.attention import attention_variants, graphed
    from mpnet.bench.triton_tiles import parse_tile_variant

    settings = AttentionSettings(windows=[256], backends=["sdpa", "flex", "triton", "triton-window"],
                                 triton_tiles=["default", "dkdv=32x64s3", "no-bias+no-mask"])
    keys = [v.key for v in attention_variants(settings)]
    assert keys == ["sdpa", "flex", "triton/default", "triton/dkdv=32x64s3", "triton/no-bias+no-mask",
                    "triton-w256/default", "triton-w256/dkdv=32x64s3", "triton-w256/no-bias+no-mask"]
    assert all(graphed(key) for key in keys)
    assert parse_tile_variant("dkdv=32x64s3").tiles == (("key_gradients", (32, 64, 4, 3)),)
    assert parse_tile_variant("fwd=128x64w8+dq=64x32").tiles == (("forward", (128, 64, 8, 2)),
                                                                ("query_gradients", (64, 32, 4, 2)))
    assert parse_tile_variant("no-bias-gradient").leave_out == {"bias_gradient"}
    for bad, why in (("dkdv=32x", "cannot read"), ("fwd=48x64", "powers of two"), ("dq=64x32+dq=32x32", "twice")):
        with pytest.raises(UserError, match=why):
            parse_tile_variant(bad)


def test_flex_variants_give_each_flex_cell_once_per_entry():
    """--flex-variants: the flex cells, with and without a window, once per entry (the others once), each entry
    read into its bias-table copies, kernel options (over the backend's) and parts left out."""
    from mpnet.bench.attention import attention_variants, graphed
    from mpnet.bench.flex_variants import parse_flex_variant
    from mpnet.modeling.attention import CUDA_KERNEL_OPTIONS

    settings = AttentionSettings(windows=[256], backends=["sdpa", "flex", "flex-window", "triton"],
                                 flex_variants=["default", "copies=16x16", "no-bias-gradient"])
    keys = [v.key for v in attention_variants(settings)]
    assert keys == ["sdpa", "flex/default", "flex/copies=16x16", "flex/no-bias-gradient", "flex-w256/default",
                    "flex-w256/copies=16x16", "flex-w256/no-bias-gradient", "triton"]
    assert all(graphed(key) for key in keys)
    variant = parse_flex_variant("copies=1x128+BLOCK_M1=64+bwd_num_warps=8+PRESCALE_QK=true")
    assert variant.copies == (1, 128) and not variant.leave_out
    assert variant.kernel_options(torch.bfloat16) == {**CUDA_KERNEL_OPTIONS[torch.bfloat16], "BLOCK_M1": 64,
                                                      "bwd_num_warps": 8, "PRESCALE_QK": True}
    assert parse_flex_variant("default").kernel_options(torch.bfloat16) is None
    assert parse_flex_variant("no-mask+no-bias").leave_out == {"no-mask", "no-bias"}
    for bad, why in (("copies=16", "cannot read"), ("copies=256x256", "at most"), ("BLOCK_Q=64", "not a flex kernel"),
                     ("num_stages=1+num_stages=2", "twice"), ("copies=2x2+no-bias", "cannot go with"),
                     ("", "empty")):
        with pytest.raises(UserError, match=why):
            parse_flex_variant(bad)
    with pytest.raises(UserError, match="CUDA"):
        AttentionSettings(backends=["flex"], flex_variants=["default"]).validate(torch.device("cpu"))
    with pytest.raises(UserError, match="not both"):
        AttentionSettings(backends=["flex"], flex_variants=["num_stages=2"],
                          flex_kernel_options={"num_stages": 1}).validate(torch.device("cuda"))


def test_flex_bias_copies_read_the_same_bias():
    """copies=QxK changes which copy of the table a score reads, never its value: the flex cell's output with
    other copies (and kernel options, unused on CPU) equals the backend's own, bit for bit."""
    from mpnet.bench.attention import build_flex
    from mpnet.bench.flex_variants import parse_flex_variant

    cpu = torch.device("cpu")
    s = AttentionSettings(streams="two", lengths=[128], tokens_per_batch=256, heads=2, head_dim=16, dtype="fp32",
                          device="cpu", backward=False)
    p = make_attention_problem(s, 128, cpu)
    with torch.no_grad():
        default = build_flex(s, p, cpu, Timer(cpu)).forward()
        for entry in ("copies=16x16", "copies=1x128+BLOCK_M1=64", "copies=128x1"):
            out = build_flex(s, p, cpu, Timer(cpu), variant=parse_flex_variant(entry)).forward()
            assert torch.equal(out, default), entry


@pytest.mark.gpu
def test_flex_bias_copies_give_the_tables_gradient():
    """The copies' gradients summed back into the table equal the backend's own (fp32): only the order of the
    float32 additions differs (the kernel's atomic adds, the sum over copies). The bound is the fp32 parity
    tests' (tests/modeling/test_gpu_backends.py: 1e-4 relative by norm, against ~3e-6 measured for the
    table's gradient there); a copy read at a wrong index moves the gradient by far more."""
    from mpnet.bench.attention import build_flex
    from mpnet.bench.flex_variants import parse_flex_variant

    cuda = torch.device("cuda")
    s = AttentionSettings(streams="two", lengths=[256], tokens_per_batch=512, heads=2, head_dim=64, dtype="fp32",
                          device="cuda", backward=True, attention_dropout=0.0)
    p = make_attention_problem(s, 256, cuda)
    grads = []
    for entry in (None, "copies=16x16", "copies=1x128"):
        p.table.grad = None
        core = build_flex(s, p, cuda, Timer(cuda), variant=None if entry is None else parse_flex_variant(entry))
        out = core.forward()
        out.backward(p.grad_out)
        core.after_backward()
        grads.append(p.table.grad.clone())
    for grad in grads[1:]:
        assert ((grad - grads[0]).norm() / grads[0].norm()).item() <= 1e-4


@pytest.mark.gpu
def test_other_triton_tiles_compute_what_the_default_tiles_compute():
    """--triton-tiles times other tiles of the same kernels: the output and the table's gradient equal the
    default tiles' (fp32, IEEE dots), so each such cell times the same attention."""
    from mpnet.bench.attention import build_triton
    from mpnet.bench.triton_tiles import parse_tile_variant

    cuda = torch.device("cuda")
    for streams in ("two", "one"):
        s = AttentionSettings(streams=streams, lengths=[256], tokens_per_batch=512, heads=2, head_dim=64,
                              dtype="fp32", device="cuda", backward=True, attention_dropout=0.0)
        p = make_attention_problem(s, 256, cuda)
        results = []
        for tiles in (None, parse_tile_variant("fwd=16x32s1+dkdv=32x16s1+dq=16x32s1")):
            p.table.grad = None
            out = build_triton(s, p, cuda, Timer(cuda), tiles=tiles).forward()
            out.backward(p.grad_out)
            results.append((out.detach(), p.table.grad.clone()))
        (out, grad), (default_out, default_grad) = results[1], results[0]
        assert (out - default_out).abs().max().item() <= 1e-5, streams
        torch.testing.assert_close(grad, default_grad, atol=1e-5, rtol=1e-4)
