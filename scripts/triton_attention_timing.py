"""Time the Triton attention backend against SDPA flash (no bias) and the flex backend, on one CUDA GPU.

    PYTHONPATH=. python scripts/triton_attention_timing.py --out DIR [--lengths 512,2048,8192]
        [--single-lengths 128,512] [--sweep] [--leave-out] [--host] [--window 256] [--flex-lengths 512] [--budget-s 400]

Problems as in the project's benchmark: 16k tokens per batch (B = 16384 // L), 12 heads x 64, bf16,
random permutations; the two-stream pair is n = L content rows plus m = round(0.15 n) predicted tokens:
n + 2m query rows over n + m keys, in one call. Timed: forward + backward (dq, dk, dv and the
learnable (32, heads) bias table's gradient), CUDA events, median of --reps runs after warm-up.
SDPA flash runs the same q, k, v shapes without bias or mask (the ceiling). --sweep tries a few tile
settings (for the single stream one kernel's at a time), --leave-out prices the bias and its gradient (timing only: results then wrong), --flex-lengths
times the flex backend's two calls (it compiles for about a minute per shape), --host the host time of
an eager call and of empty Triton launches (what a launch costs per argument), and a cProfile of an eager
single-stream call (host_profile.txt). Writes triton_timing.json
and triton_timing.md under --out and prints the table; sections past --budget-s are skipped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mpnet.bench.harness import Timer  # noqa: E402
from mpnet.bench.harness import kernel_ms_per_call  # noqa: E402
from mpnet.modeling import triton_launch as T  # noqa: E402
from mpnet.modeling import triton_plan as P  # noqa: E402
from mpnet.modeling.triton_internals import triton  # noqa: E402
from mpnet.modeling.masks import relative_bias_by_distance  # noqa: E402

HEADS, HEAD_DIM, TOKENS = 12, 64, 16384
DEVICE = "cuda"

SWEEP = {
    "default": T.default_tiles(torch.bfloat16),
    "small": T.KernelTiles(T.Tiles(64, 64, 4, 2), T.Tiles(32, 64, 4, 2), T.Tiles(64, 32, 4, 2)),
    "large": T.KernelTiles(T.Tiles(128, 64, 8, 2), T.Tiles(32, 128, 8, 2), T.Tiles(128, 64, 8, 2)),
    "fwd64x64s3": T.KernelTiles(T.Tiles(64, 64, 4, 3), T.Tiles(32, 64, 4, 2), T.Tiles(64, 32, 4, 2)),
    "fwd64x128": T.KernelTiles(T.Tiles(64, 128, 4, 2), T.Tiles(32, 64, 4, 2), T.Tiles(64, 32, 4, 2)),
    "fwd128x64w4": T.KernelTiles(T.Tiles(128, 64, 4, 2), T.Tiles(32, 64, 4, 2), T.Tiles(64, 32, 4, 2)),
    "fwd32x64": T.KernelTiles(T.Tiles(32, 64, 4, 2), T.Tiles(32, 64, 4, 2), T.Tiles(64, 32, 4, 2)),
    "dkdv64x64": T.KernelTiles(T.Tiles(64, 64, 4, 2), T.Tiles(64, 64, 4, 2), T.Tiles(64, 32, 4, 2)),
    "dkdv16x64": T.KernelTiles(T.Tiles(64, 64, 4, 2), T.Tiles(16, 64, 4, 2), T.Tiles(64, 32, 4, 2)),
    "dkdv32x64s3": T.KernelTiles(T.Tiles(64, 64, 4, 2), T.Tiles(32, 64, 4, 3), T.Tiles(64, 32, 4, 2)),
    "dkdv32x32": T.KernelTiles(T.Tiles(64, 64, 4, 2), T.Tiles(32, 32, 4, 2), T.Tiles(64, 32, 4, 2)),
    "dq64x64": T.KernelTiles(T.Tiles(64, 64, 4, 2), T.Tiles(32, 64, 4, 2), T.Tiles(64, 64, 4, 2)),
    "dq32x64": T.KernelTiles(T.Tiles(64, 64, 4, 2), T.Tiles(32, 64, 4, 2), T.Tiles(32, 64, 4, 2)),
    "dq64x32s3": T.KernelTiles(T.Tiles(64, 64, 4, 2), T.Tiles(32, 64, 4, 2), T.Tiles(64, 32, 4, 3)),
}


def _one_kernel_changed(forward=None, key_gradients=None, query_gradients=None):
    base = T.default_tiles(torch.bfloat16, single_stream=True)
    return T.KernelTiles(T.Tiles(*forward) if forward else base.forward,
                         T.Tiles(*key_gradients) if key_gradients else base.key_gradients,
                         T.Tiles(*query_gradients) if query_gradients else base.query_gradients)


# The single stream's --sweep: one kernel's tiles changed at a time (block_m, block_n, warps, stages), so that
# each kernel's best can be read from kernels_ms.
SINGLE_SWEEP = {
    "single default": T.default_tiles(torch.bfloat16, single_stream=True),
    "fwd64x64": _one_kernel_changed(forward=(64, 64, 4, 2)),
    "fwd128x64w8": _one_kernel_changed(forward=(128, 64, 8, 2)),
    "fwd128x128w8": _one_kernel_changed(forward=(128, 128, 8, 2)),
    "fwd64x128s3": _one_kernel_changed(forward=(64, 128, 4, 3)),
    "dkdv64x64": _one_kernel_changed(key_gradients=(64, 64, 4, 2)),
    "dkdv64x32": _one_kernel_changed(key_gradients=(64, 32, 4, 2)),
    "dkdv16x64": _one_kernel_changed(key_gradients=(16, 64, 4, 2)),
    "dkdv32x128w8": _one_kernel_changed(key_gradients=(32, 128, 8, 2)),
    "dkdv64x128w8": _one_kernel_changed(key_gradients=(64, 128, 8, 2)),
    "dkdv32x64s2": _one_kernel_changed(key_gradients=(32, 64, 4, 2)),
    "dkdv32x64s4": _one_kernel_changed(key_gradients=(32, 64, 4, 4)),
    "dkdv32x128w8s3": _one_kernel_changed(key_gradients=(32, 128, 8, 3)),
    "dq64x64": _one_kernel_changed(query_gradients=(64, 64, 4, 2)),
    "dq32x64": _one_kernel_changed(query_gradients=(32, 64, 4, 2)),
    "dq128x64w8": _one_kernel_changed(query_gradients=(128, 64, 8, 2)),
    "dq128x32w8": _one_kernel_changed(query_gradients=(128, 32, 8, 3)),
}


def median_ms(fn, warmup=3, reps=15):
    """Median of `reps` runs after `warmup` ones, by the benchmarks' own timer (CUDA events, L2 flushed)."""
    for _ in range(warmup):
        fn()
    times, _ = Timer(torch.device("cuda")).measure(fn, reps, max_seconds=60)
    return statistics.median(times)


def kernel_ms(fn, reps=5):
    """GPU ms per call of each of the backend's Triton kernels in `fn`, by kernel name (one warm call first)."""
    fn()
    return {name.strip("_"): round(ms, 3) for name, ms in kernel_ms_per_call(fn, reps).items()
            if name.startswith("_") and "kernel" in name}


def host_us(fn, reps=200):
    """Host time per call in microseconds: `reps` calls without waiting for the GPU (a problem small
    enough that the GPU keeps up, so the host's own launch time is what is measured)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - start) / reps * 1e6
    torch.cuda.synchronize()
    return host


def launch_costs() -> dict:
    """Host us per eager call on a small pair (4 x 128 tokens, 12 heads): triton fwd, fwd + bwd, SDPA flash
    fwd + bwd, and empty Triton kernels with 2 and 36 arguments (a launch's cost per argument)."""
    p = two_stream_problem(128, batch=4)
    plan = P.make_triton_attention_plan(p["positions"], p["n"], p["m"])
    bias = P.log2_bias_by_index(p["table"], 128)
    forward, step = triton_steps(p, plan, SWEEP["default"], bias)
    flash = flash_step(p)

    @triton.jit
    def two(X, n):
        pass

    @triton.jit
    def wide(A0, A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, A11, A12, A13, A14, A15, i0, i1, i2, i3, i4, i5, i6, i7,
             i8, i9, i10, i11, i12, i13, i14, i15, i16, i17, i18, i19):
        pass

    tensors = [torch.empty(16, device=DEVICE) for _ in range(16)]
    ints = [7 * (i + 1) for i in range(20)]
    single = single_problem(128, batch=4)
    single_plan = P.make_triton_attention_plan(single["positions"], single["n"], 0)
    _, single_step = triton_steps(single, single_plan, None, P.log2_bias_by_index(single["table"], 128))
    return {"triton fwd": host_us(forward), "triton fwd+bwd": host_us(step), "sdpa flash fwd+bwd": host_us(flash),
            "triton single fwd+bwd": host_us(single_step), "sdpa flash single fwd+bwd": host_us(flash_step(single)),
            "empty kernel, 2 arguments": host_us(lambda: two[(1,)](tensors[0], 16)),
            "empty kernel, 36 arguments": host_us(lambda: wide[(1,)](*tensors, *ints))}


def host_profile(path, reps=300) -> None:
    """Where an eager single-stream fwd + bwd spends its host time (4 x 128 tokens): cProfile's top
    functions by own time, written to `path`."""
    import cProfile
    import io
    import pstats

    p = single_problem(128, batch=4)
    plan = P.make_triton_attention_plan(p["positions"], p["n"], 0)
    _, step = triton_steps(p, plan, None, P.log2_bias_by_index(p["table"], 128))
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(reps):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    text.write(f"{reps} eager single-stream fwd + bwd calls (4 x 128 tokens), by own time\n")
    stats.sort_stats("tottime").print_stats(30)
    text.write("\nby cumulative time\n")
    stats.sort_stats("cumulative").print_stats(30)
    Path(path).write_text(text.getvalue())


def two_stream_problem(length, seed=0, batch=None):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    batch, n = batch or TOKENS // length, length
    m = round(0.15 * n)
    perm = torch.stack([torch.randperm(n, device=DEVICE, generator=gen) for _ in range(batch)])
    positions = torch.cat([perm, perm[:, n - m:], perm[:, n - m:]], 1)

    def rand(rows, grad=True):
        return torch.randn(batch, HEADS, rows, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16,
                           generator=gen).requires_grad_(grad)
    q, k, v = rand(n + 2 * m), rand(n + m), rand(n + m)
    cotangent = rand(n + 2 * m, grad=False)
    table = torch.randn(32, HEADS, device=DEVICE, generator=gen).requires_grad_(True)
    return dict(batch=batch, n=n, m=m, positions=positions, q=q, k=k, v=v, g=cotangent, table=table)


def single_problem(length, seed=0, batch=None):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    batch = batch or TOKENS // length
    positions = torch.arange(length, device=DEVICE)[None].repeat(batch, 1)

    def rand(grad=True):
        return torch.randn(batch, HEADS, length, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16,
                           generator=gen).requires_grad_(grad)
    q, k, v, g = rand(), rand(), rand(), rand(False)
    table = torch.randn(32, HEADS, device=DEVICE, generator=gen).requires_grad_(True)
    return dict(batch=batch, n=length, m=0, positions=positions, q=q, k=k, v=v, g=g, table=table)


def flash_step(p):
    def step():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out = F.scaled_dot_product_attention(p["q"], p["k"], p["v"])
        torch.autograd.grad(out, (p["q"], p["k"], p["v"]), p["g"])
    return step


def triton_steps(p, plan, tiles, bias=None):
    """bias: the by-index bias table when given (as the model's state passes it), else built per call."""
    def forward():
        with torch.no_grad():
            T.triton_two_stream_attention(p["q"], p["k"], p["v"], p["table"], plan, tiles=tiles, bias_by_index=bias)

    def step():
        out = T.triton_two_stream_attention(p["q"], p["k"], p["v"], p["table"], plan, tiles=tiles, bias_by_index=bias)
        torch.autograd.grad(out, (p["q"], p["k"], p["v"], p["table"]), p["g"])
    return forward, step


def flex_step(p, window=None):
    from mpnet.modeling import attention as A

    try:
        from mpnet.bench.harness import configure_dynamo
    except ImportError:
        configure_dynamo = None
    if configure_dynamo is not None:
        configure_dynamo(64)
    else:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    distance_bias = relative_bias_by_distance(p["table"], 128, 32)
    state = A.make_flex_attention_state(p["positions"], p["n"], p["m"], distance_bias, 128, f"window:{window}" if window else None)
    kv = p["n"] + p["m"]
    q, k, v = p["q"], p["k"], p["v"]

    def step():
        parts = [A.run_flex_attention(q[:, :, :kv], k, v, state.content_score_mod, state.content_mask)]
        if state.query_mask is not None:
            parts.append(A.run_flex_attention(q[:, :, kv:], k, v, state.query_score_mod, state.query_mask))
        torch.autograd.grad(torch.cat(parts, 2), (q, k, v, p["table"]), p["g"], retain_graph=True)
    return step


def extra_configs(args, single_stream=False):
    """The --leave-out configurations beside the default tiles."""
    base, configs = T.default_tiles(torch.bfloat16, single_stream), {}
    if args.leave_out:
        configs["no bias gradient"] = T.KernelTiles(base.forward, base.key_gradients, base.query_gradients,
                                                    frozenset({"bias_gradient"}))
        for left_out in ({"bias"}, {"mask"}, {"bias", "mask"}):
            configs["no " + " or ".join(sorted(left_out))] = T.KernelTiles(
                base.forward, base.key_gradients, base.query_gradients, frozenset(left_out))
    return configs


def named_configs(names: str) -> dict:
    known = {**SWEEP, **SINGLE_SWEEP}
    unknown = [name for name in names.split(",") if name not in known]
    if unknown:
        raise SystemExit(f"--configs: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    return {name: known[name] for name in names.split(",")}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--single-lengths", default="128,512")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--configs", default="", help="named tile settings of SWEEP / SINGLE_SWEEP to time "
                        "(comma-separated) instead of the default or --sweep ones")
    parser.add_argument("--leave-out", action="store_true")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--flex-lengths", default="")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--budget-s", type=float, default=400)
    parser.add_argument("--host", action="store_true", help="host us per eager call (launch_costs) first")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": triton.__version__, "heads": HEADS, "head_dim": HEAD_DIM, "tokens": TOKENS,
               "date": time.strftime("%Y-%m-%d %H:%M"), "rows": []}

    def record(**row):
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        (out / "triton_timing.json").write_text(json.dumps(results, indent=1))

    def time_left():
        return args.budget_s - (time.time() - began)

    def guarded(label, fn):
        if time_left() <= 0:
            print(f"skipped (budget): {label}", flush=True)
            return None
        try:
            return fn()
        except Exception as error:  # a failed cell is reported, the run goes on
            print(f"FAILED {label}: {type(error).__name__}: {str(error)[:300]}", flush=True)
            return None

    if args.host:
        costs = {name: round(us, 1) for name, us in launch_costs().items()}
        record(kind="host us per call", L=128, **costs)
        host_profile(out / "host_profile.txt")
    lengths = [int(x) for x in args.lengths.split(",") if x]
    for length in lengths:
        p = two_stream_problem(length)
        plan = P.make_triton_attention_plan(p["positions"], p["n"], p["m"])
        torch.cuda.synchronize()
        plan_ms = median_ms(lambda: P.make_triton_attention_plan(p["positions"], p["n"], p["m"]), 1, 5)
        flash = median_ms(flash_step(p), reps=args.reps)
        configs = dict(SWEEP) if args.sweep and length <= 2048 else {"default": SWEEP["default"]}
        if args.configs:
            configs = named_configs(args.configs)
        if length <= 2048:
            configs.update(extra_configs(args))
        for name, tiles in configs.items():
            def cell(tiles=tiles, name=name):
                forward, step = triton_steps(p, plan, tiles)
                compile_start = time.time()
                step()
                torch.cuda.synchronize()
                compile_s = time.time() - compile_start
                torch.cuda.reset_peak_memory_stats()
                total = median_ms(step, reps=args.reps)
                peak = torch.cuda.max_memory_allocated() / 2**30
                fwd = median_ms(forward, reps=args.reps)
                record(kind="pair", L=length, B=p["batch"], m=p["m"], config=name, triton_ms=round(total, 3),
                       triton_fwd_ms=round(fwd, 3), flash_ms=round(flash, 3), ratio=round(total / flash, 2),
                       peak_gib=round(peak, 2), plan_ms=round(plan_ms, 3), first_call_s=round(compile_s, 1),
                       kernels_ms=kernel_ms(step))
            guarded(f"pair L={length} {name}", cell)
        del p, plan
        torch.cuda.empty_cache()

    for length in [int(x) for x in args.single_lengths.split(",") if x]:
        p = single_problem(length)
        plan = P.make_triton_attention_plan(p["positions"], p["n"], 0)
        flash = median_ms(flash_step(p), reps=args.reps)

        configs = dict(SINGLE_SWEEP) if args.sweep else {"single default": SINGLE_SWEEP["single default"]}
        if args.configs:
            configs = named_configs(args.configs)
        for name, tiles in {**configs, **extra_configs(args, single_stream=True)}.items():
            def cell(p=p, plan=plan, flash=flash, length=length, tiles=tiles, name=name):
                forward, step = triton_steps(p, plan, tiles)
                total = median_ms(step, reps=args.reps)
                fwd = median_ms(forward, reps=args.reps)
                record(kind="single", L=length, B=p["batch"], config=name, triton_ms=round(total, 3),
                       triton_fwd_ms=round(fwd, 3), flash_ms=round(flash, 3), ratio=round(total / flash, 2),
                       kernels_ms=kernel_ms(step))
            guarded(f"single L={length} {name}", cell)

    if args.window:
        def window_cell():
            p = two_stream_problem(8192)
            plan = P.make_triton_attention_plan(p["positions"], p["n"], p["m"], window=args.window)
            _, step = triton_steps(p, plan, SWEEP["default"])
            torch.cuda.reset_peak_memory_stats()
            total = median_ms(step, reps=args.reps)
            record(kind="window", L=8192, window=args.window, config="default", triton_ms=round(total, 3),
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        guarded("window", window_cell)

    for length in [int(x) for x in args.flex_lengths.split(",") if x]:
        def flex_cell(length=length):
            p = two_stream_problem(length)
            step = flex_step(p)
            start = time.time()
            step()
            torch.cuda.synchronize()
            compile_s = time.time() - start
            record(kind="flex pair", L=length, flex_ms=round(median_ms(step, reps=args.reps), 3),
                   first_call_s=round(compile_s, 1))
        guarded(f"flex L={length}", flex_cell)

    lines = ["| kind | L | config | triton fwd+bwd ms | triton fwd ms | flash ms | ratio | other |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        other = {k: v for k, v in row.items() if k not in ("kind", "L", "config", "triton_ms", "triton_fwd_ms",
                                                            "flash_ms", "ratio")}
        lines.append(f"| {row['kind']} | {row['L']} | {row.get('config', '')} | {row.get('triton_ms', '')} | "
                     f"{row.get('triton_fwd_ms', '')} | {row.get('flash_ms', '')} | {row.get('ratio', '')} | {other} |")
    table = "\n".join(lines)
    (out / "triton_timing.md").write_text(f"{results['device']}, torch {results['torch']}, triton {results['triton']}, "
                                          f"{results['date']}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
