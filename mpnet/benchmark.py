"""Attention and pretraining-step benchmarks: the library behind `benchmark-mpnet` (docs/benchmarks.md).

Two measurements, both run on the real modules of `mpnet.modeling`:

- `run_attention`: ONE two-stream attention call pair as in pretraining (content stream: n + m query rows,
  query stream: m rows, both against the n + m content keys/values, relative-position bias from the
  learnable (buckets x heads) table), forward + backward, for each sequence length and backend:
  SDPA flash without bias or mask (the ceiling), the dense `RelativeMultiHeadAttention` with its state
  built inside the timed region (what the original did per forward), the dense module with the state
  built once (its marginal cost per extra layer), `FlexTwoStreamAttention` (BlockMasks built once,
  their build timed separately) and flex with each sliding window.
- `run_step`: a full pretraining step of mpnet-base (two streams, cross-entropy on the m predicted
  tokens, backward, fused AdamW) beside a plain BERT-base MLM step (HF `BertForMaskedLM`, SDPA) of the
  same batch and length.

Conventions (printed in every report):
- Attention FLOPs of the pair: 4 * B * heads * (n + 2m) * (n + m) * head_dim forward (two matmuls,
  2 FLOPs per multiply-add); forward + backward counts 3.5x that (backward = 2.5x forward, the
  FlashAttention convention). Masked flex also gets "effective" TFLOP/s: FLOPs x block density
  (the share of 128x128 blocks the BlockMasks let the kernel compute).
- Time: median of up to `repeats` runs (at least 3) with CUDA events, L2 flushed before each run, after
  `warmup` runs (the first one compiles); p20 and p80 are reported beside the median. On CPU: wall
  clock, forward only (FlexAttention has no CPU backward), no memory figures.
- Memory: torch.cuda.max_memory_allocated() over one call after reset_peak_memory_stats(): everything
  alive at the time (inputs, prebuilt state, activations, gradients), minus the L2-flush buffer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .modeling.attention import (
    DenseAttentionState,
    FlexTwoStreamAttention,
    RelativeMultiHeadAttention,
    make_dense_attention_state,
    make_flex_attention_mask,
    make_flex_attention_state,
)
from .modeling.config import MPNetConfig
from .modeling.masks import natural_order, relative_bias_by_distance

ATTENTION_BACKENDS = ("sdpa", "dense", "dense-once", "flex", "flex-window")
STEP_BACKENDS = ("dense", "flex")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLUSH_BYTES = 256 << 20  # larger than the H100/H200 L2 (50/60 MB): flushed before every timed run
GiB = 2**30


# ------------------------------------------------------------------------------------------ settings


@dataclass
class AttentionSettings:
    lengths: list = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192])
    tokens_per_batch: int = 16384
    heads: int = 12
    head_dim: int = 64
    windows: list = field(default_factory=lambda: [256, 1024])
    backends: list = field(default_factory=lambda: list(ATTENTION_BACKENDS))
    dtype: str = "bf16"
    device: str = "cuda"
    backward: bool = True  # forward + backward (GPU); forward only on CPU
    warmup: int = 3
    repeats: int = 20
    max_seconds: float = 3.0  # stop repeating a cell after this much timing (at least 3 runs)
    with_projections: bool = False  # time the q/k/v/o Linear layers too
    attention_dropout: float = 0.1  # the dense module's attention dropout, as in mpnet-base training
    pred_ratio: float = 0.15
    num_buckets: int = 32
    max_distance: int = 128
    seed: int = 0
    flex_kernel_options: dict | None = None  # override of the project's flex kernel options (experiments)

    def validate(self):
        _check_kernel_options(self.flex_kernel_options)
        if not self.lengths:
            raise UserError("--lengths is empty; give sequence lengths like 512,1024")
        for length in self.lengths:
            if length < 8:
                raise UserError(f"sequence length {length} is too short; use lengths >= 8")
            if self.tokens_per_batch < length:
                raise UserError(f"--tokens-per-batch {self.tokens_per_batch} is smaller than length {length}: "
                                "the batch would be empty; raise --tokens-per-batch or shorten --lengths")
        if any(w <= 0 for w in self.windows):
            raise UserError(f"--windows must be positive integers, got {self.windows}")
        unknown = [b for b in self.backends if b not in ATTENTION_BACKENDS]
        if unknown or not self.backends:
            raise UserError(f"unknown attention backend(s) {unknown or '(none)'}; pick from {', '.join(ATTENTION_BACKENDS)}")
        if "flex-window" in self.backends and not self.windows:
            raise UserError("backend flex-window needs --windows (e.g. 256,1024)")
        if self.heads <= 0 or self.head_dim <= 0:
            raise UserError("--heads and --head-dim must be positive")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}")
        if self.warmup < 1 or self.repeats < 1:
            raise UserError("--warmup and --repeats must be >= 1 (the first warm-up run compiles)")


@dataclass
class StepSettings:
    seq_len: int = 512
    batch_size: int = 32
    backends: list = field(default_factory=lambda: list(STEP_BACKENDS))
    compile: bool = False
    peak_tflops: float = 989.0  # H100/H200 SXM dense bf16 (datasheet)
    dtype: str = "bf16"
    device: str = "cuda"
    model: str = "base"  # "base" (mpnet-base, BERT-base) or "tiny" (smoke runs)
    bert: bool = True
    warmup: int = 3
    repeats: int = 10
    max_seconds: float = 20.0
    lr: float = 1e-4
    seed: int = 0
    flex_kernel_options: dict | None = None
    profile: bool = False  # break each step's GPU time down by kernel family (torch.profiler)

    def validate(self):
        _check_kernel_options(self.flex_kernel_options)
        unknown = [b for b in self.backends if b not in STEP_BACKENDS]
        if unknown or not self.backends:
            raise UserError(f"unknown step backend(s) {unknown or '(none)'}; pick from {', '.join(STEP_BACKENDS)}")
        if self.batch_size < 1 or self.seq_len < 8:
            raise UserError("--batch-size must be >= 1 and --seq-len >= 8")
        limit = MPNetConfig.base().max_sequence_length
        if self.seq_len > limit:
            raise UserError(f"--seq-len {self.seq_len} is longer than mpnet-base's position table allows ({limit})")
        if self.peak_tflops <= 0:
            raise UserError("--peak-tflops must be positive")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}")
        if self.device == "cpu" and "flex" in self.backends:
            raise UserError("the flex step needs a CUDA GPU (FlexAttention has no backward on CPU); "
                            "use --backend dense on CPU")


def _check_kernel_options(options):
    if options is not None and not (isinstance(options, dict) and all(isinstance(k, str) for k in options)):
        raise UserError('--flex-kernel-options must be a JSON object, e.g. \'{"num_stages": 1}\'')


@contextlib.contextmanager
def flex_kernel_options(options):
    """Run the project's compiled flex_attention with these kernel_options, in this process only.

    An experiment knob: mpnet.modeling decides the options for training; this lets a benchmark show
    which ones the attention code should adopt (e.g. smaller tiles where the default ones need more
    shared memory than the GPU has).
    """
    if not options:
        yield
        return
    from .modeling import attention as modeling_attention

    original = modeling_attention.run_flex_attention
    compile_on = getattr(modeling_attention, "_compile_on", None)
    compiled = getattr(modeling_attention, "_compiled_flex_attention", None)
    if compile_on is None or compiled is None:
        raise UserError("--flex-kernel-options does not apply to this version of mpnet.modeling.attention "
                        "(no _compile_on/_compiled_flex_attention); drop the flag")

    def run_flex_attention(q, k, v, score_mod, block_mask):
        if compile_on(q.device):
            return compiled()(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=dict(options))
        return original(q, k, v, score_mod, block_mask)

    modeling_attention.run_flex_attention = run_flex_attention
    try:
        yield
    finally:
        modeling_attention.run_flex_attention = original


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA is not available here; pass --device cpu (forward only; add --quick for tiny sizes)")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"--device {name}: only cuda and cpu are supported")
    return device


# ------------------------------------------------------------------------------------ environment


def environment() -> dict:
    """Device, versions and the command line: printed first and written into every report."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join(["benchmark-mpnet"] + sys.argv[1:]),
    }
    for name in ("triton", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional
            info[name] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{props.name} ({props.total_memory / GiB:.0f} GiB, {props.multi_processor_count} SMs)"
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return info


def configure_dynamo(limit: int = 64):
    """Every (Q_LEN, KV_LEN) compiles anew: raise dynamo's recompile limits so the sweep stays compiled,
    and make a hit fail loudly (a FAIL cell) instead of silently falling back to the unfused path."""
    cfg = torch._dynamo.config
    for name, value in (("recompile_limit", limit), ("cache_size_limit", limit),
                        ("accumulated_recompile_limit", 16 * limit), ("accumulated_cache_size_limit", 16 * limit)):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), value))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(cfg, name):
            setattr(cfg, name, True)


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _failure(exc: BaseException) -> tuple:
    """(short cell text, longer detail) for an exception: OOM, or FAIL (<phase>): <reason>."""
    import re

    chain, cause = [exc], exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
        chain.append(cause)
        if len(chain) > 8:
            break
    text = " | ".join(f"{type(item).__name__}: {item}" for item in chain)
    detail = " ".join(text.split())[:600]
    for item in chain:
        if isinstance(item, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(item).lower():
            return "OOM", detail
    phase = getattr(exc, "benchmark_phase", None)
    where = f"FAIL ({phase})" if phase else "FAIL"
    shared = re.search(r"out of resource: (\S+) Required: (\d+) Hardware limit: ?(\d+)", text)
    if shared:
        return f"{where}: triton kernel needs {shared.group(2)} B shared memory > {shared.group(3)}", detail
    if "recompile" in text.lower() and "limit" in text.lower():
        return f"{where}: dynamo recompile limit hit", detail
    root = chain[-1]
    first = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
    return f"{where}: {type(root).__name__}: {first}"[:110], detail


def _quantile(values, q):
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Timer:
    """CUDA events (L2 flushed before each run) on GPU, wall clock on CPU; times in milliseconds."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device) if self.cuda else None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def wall(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - start) * 1e3

    def measure(self, fn, repeats: int, max_seconds: float, min_runs: int = 3, peak: bool = False):
        """Times of up to `repeats` runs (at least `min_runs`, fewer past `max_seconds`); with peak=True
        also the peak memory (GiB) of the first timed run: (times, peak)."""
        times, started, peak_gib = [], time.perf_counter(), None
        for _ in range(max(repeats, min_runs)):
            if self.cuda:
                self.flush.zero_()
                if peak and not times:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
                if peak and len(times) == 1:
                    peak_gib = (torch.cuda.max_memory_allocated() - FLUSH_BYTES) / GiB
            else:
                times.append(self.wall(fn))
            if len(times) >= min_runs and time.perf_counter() - started > max_seconds:
                break
        return (times, peak_gib) if peak else times


def _summary(times) -> dict:
    return {"ms": _quantile(times, 0.5), "p20_ms": _quantile(times, 0.2), "p80_ms": _quantile(times, 0.8),
            "runs": len(times)}


class Deadline:
    def __init__(self, seconds=None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end

    def sooner(self, seconds) -> "Deadline":
        other = Deadline()
        if self.end is not None:
            other.end = self.end - seconds
        return other


# --------------------------------------------------------------------------------------- attention


def attention_variants(settings: AttentionSettings) -> list:
    """(key, label, window) in report order; flex-window expands to one variant per window."""
    out = []
    for backend in ATTENTION_BACKENDS:
        if backend not in settings.backends:
            continue
        if backend == "flex-window":
            out += [(f"flex-w{w}", f"flex w={w}", w) for w in settings.windows]
        else:
            label = {"sdpa": "SDPA flash (no bias)", "dense": "dense", "dense-once": "dense (state once)",
                     "flex": "flex"}[backend]
            out.append((backend, label, None))
    return out


def pred_size(length: int, ratio: float = 0.15) -> int:
    return max(1, int(round(ratio * length)))


def attention_flops(batch, heads, head_dim, rows, kv_len, backward: bool) -> float:
    """4 * B * H * Lq * Lk * D forward (QK^T and PV); x3.5 for forward + backward."""
    return 4.0 * batch * heads * rows * kv_len * head_dim * (3.5 if backward else 1.0)


def projection_flops(batch, hidden, rows, kv_len, backward: bool) -> float:
    """q, o on every row, k, v on the content rows; x3 for forward + backward."""
    return 2.0 * batch * hidden * hidden * (2 * rows + 2 * kv_len) * (3.0 if backward else 1.0)


def block_density(block_mask) -> float:
    """Share of (batch, q-block, kv-block) tiles the kernel computes (partial or full), on the padded grid.

    BlockMask.sparsity() divides by the unpadded size, which misreads lengths that are not multiples of
    the block size (it even goes negative below 128), so the density is computed from the block counts.
    """
    computed = block_mask.kv_num_blocks.sum().item()
    if block_mask.full_kv_num_blocks is not None:
        computed += block_mask.full_kv_num_blocks.sum().item()
    kv_blocks = math.ceil(block_mask.shape[-1] / block_mask.BLOCK_SIZE[1])
    return computed / (block_mask.kv_num_blocks.numel() * kv_blocks)


@dataclass
class _Problem:
    length: int
    batch: int
    n: int
    m: int
    rows: int
    kv_len: int
    positions: torch.Tensor
    hidden: torch.Tensor
    grad_out: torch.Tensor
    table: torch.Tensor


def two_stream_positions(batch, n, m, generator) -> torch.Tensor:
    """What the collator produces: a random permutation per row, the last m predicted, then the m
    appended <mask> entries of each stream at the predicted tokens' original positions."""
    perm = torch.stack([torch.randperm(n, generator=generator) for _ in range(batch)])
    return torch.cat([perm, perm[:, n - m:], perm[:, n - m:]], dim=1)


def _make_problem(settings, length, device) -> _Problem:
    gen = torch.Generator().manual_seed(settings.seed + length)
    batch = settings.tokens_per_batch // length
    n, m = length, pred_size(length, settings.pred_ratio)
    rows, kv_len = n + 2 * m, n + m
    hidden_size = settings.heads * settings.head_dim
    # Under bf16 autocast q/k/v leave the projections in bf16; the residual stream entering them is fp32.
    dtype = torch.float32 if settings.with_projections else DTYPES[settings.dtype]
    hidden = torch.randn(batch, rows, hidden_size, generator=gen).to(device, dtype).requires_grad_(settings.backward)
    grad_out = torch.randn(batch, rows, hidden_size, generator=gen).to(device, dtype)
    table = (torch.randn(settings.num_buckets, settings.heads, generator=gen) * 0.02).to(device).requires_grad_(True)
    positions = two_stream_positions(batch, n, m, gen).to(device)
    return _Problem(length, batch, n, m, rows, kv_len, positions, hidden, grad_out, table)


def _module_config(settings) -> MPNetConfig:
    hidden = settings.heads * settings.head_dim
    return MPNetConfig(hidden_size=hidden, num_attention_heads=settings.heads, num_hidden_layers=1,
                       intermediate_size=4 * hidden, attention_probs_dropout_prob=settings.attention_dropout,
                       relative_attention_num_buckets=settings.num_buckets,
                       relative_attention_max_distance=settings.max_distance)


def _strip_projections(module):
    """Attention core only: q/k/v/o become identities, so q = hidden and k = v = its content rows."""
    for name in ("q", "k", "v", "o"):
        setattr(module, name, nn.Identity())
    return module


class _SDPAPair(nn.Module):
    """The ceiling: both streams in ONE flash call (n+2m query rows vs n+m keys), no bias, no mask."""

    def __init__(self, config, projections: bool):
        super().__init__()
        hidden = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, hidden // config.num_attention_heads
        make = (lambda: nn.Linear(hidden, hidden)) if projections else nn.Identity
        self.q, self.k, self.v, self.o = make(), make(), make(), make()

    def forward(self, hidden, kv_len):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        b, length, _ = hidden.shape
        split = lambda x: x.view(b, x.shape[1], self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        content = hidden[:, :kv_len]
        q, k, v = split(self.q(hidden)), split(self.k(content)), split(self.v(content))
        flash = hidden.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        backends = [SDPBackend.FLASH_ATTENTION] if flash else [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                               SDPBackend.MATH]
        with sdpa_kernel(backends):
            context = F.scaled_dot_product_attention(q, k, v)
        return self.o(context.transpose(1, 2).reshape(b, length, -1))


def _attention_cell(settings, problem: _Problem, key, window, device, timer) -> dict:
    """Build the variant, warm it up (compiling), measure memory and time. Raises on OOM / failure."""
    p = problem
    amp = DTYPES[settings.dtype]
    autocast = lambda: torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32)  # noqa: E731
    config = _module_config(settings)
    result = {}

    db_leaf = None  # a prebuilt (heads, 2*max_distance+1) bias that the state captures (flex, dense-once)
    if key == "sdpa":
        module = _SDPAPair(config, settings.with_projections).to(device)
        core = lambda: module(p.hidden, p.kv_len)  # noqa: E731
    elif key == "dense":
        module = RelativeMultiHeadAttention(config).to(device)

        def core():  # what the original did per forward: bias from the table, mask and bias materialised
            distance_bias = relative_bias_by_distance(p.table, settings.max_distance, settings.num_buckets)
            state = make_dense_attention_state(p.positions, p.n, p.m, distance_bias, settings.max_distance)
            return module(p.hidden, state)
    elif key == "dense-once":
        module = RelativeMultiHeadAttention(config).to(device)
        with torch.no_grad():
            distance_bias = relative_bias_by_distance(p.table, settings.max_distance, settings.num_buckets)
            built = make_dense_attention_state(p.positions, p.n, p.m, distance_bias, settings.max_distance)
        # The model shares one state across all layers: per extra layer it pays the attention and the
        # accumulation of the (B, H, Lq, Lk) bias gradient, not the state build or its reduction to the
        # table (once per forward/backward). So the bias here is a leaf that takes its gradient.
        state = DenseAttentionState(built.allowed, built.bias.detach().requires_grad_(settings.backward), built.kv_len)
        core = lambda: module(p.hidden, state)  # noqa: E731
    else:  # flex, flex-wN: BlockMasks built once, outside the timed region
        module = FlexTwoStreamAttention(config).to(device)
        with torch.no_grad():
            db_leaf = relative_bias_by_distance(p.table, settings.max_distance, settings.num_buckets)
        db_leaf.requires_grad_(settings.backward)
        graphs = _compiled_graphs()
        start = time.perf_counter()
        # As the model does: with a window the rows run in natural order, which makes it block-sparse.
        layout = natural_order(p.positions, p.n, p.m) if window is not None else None
        positions = p.positions if layout is None else p.positions.gather(1, layout)
        try:
            state = make_flex_attention_state(positions, p.n, p.m, db_leaf, settings.max_distance, window,
                                              layout=layout)
        except Exception as exc:
            exc.benchmark_phase = "BlockMask build"
            raise
        timer.sync()
        result["mask_first_s"] = time.perf_counter() - start
        result["density_content"] = block_density(state.content_mask)
        result["density_query"] = block_density(state.query_mask)
        rows_c = p.kv_len
        result["density"] = (rows_c * result["density_content"] + p.m * result["density_query"]) / p.rows
        result["blockmask_sparsity_pct"] = [state.content_mask.sparsity(), state.query_mask.sparsity()]
        mask_times = timer.measure(lambda: make_flex_attention_mask(positions, p.n, p.m, window, layout=layout),
                                   min(5, settings.repeats), min(2.0, settings.max_seconds))
        result["mask_ms"] = _quantile(mask_times, 0.5)
        result["mask_graphs"] = _compiled_graphs() - graphs
        core = lambda: module(p.hidden, state)  # noqa: E731

    if not settings.with_projections:
        _strip_projections(module)
    module.train()  # dense: attention dropout as in training; flex has none (documented in the report)
    params = list(module.parameters())

    phase = ["forward"]

    if settings.backward:
        def run():
            p.hidden.grad = p.table.grad = None
            for param in params:
                param.grad = None
            if db_leaf is not None:
                db_leaf.grad = None
            phase[0] = "forward"
            with autocast():
                out = core()
            phase[0] = "backward"
            out.backward(p.grad_out)
            if db_leaf is not None and db_leaf.grad is not None:
                # The rest of the chain rule, as autograd would run it in the model: bias -> table.
                relative_bias_by_distance(p.table, settings.max_distance, settings.num_buckets).backward(db_leaf.grad)
            phase[0] = "timing"
    else:
        def run():
            phase[0] = "forward"
            with torch.no_grad(), autocast():
                core()
            phase[0] = "timing"

    try:
        bias_learns = settings.backward and key not in ("sdpa", "dense-once")
        result.update(time_runs(timer, run, settings, (lambda: check_table_gradient(p.table)) if bias_learns else None))
    except Exception as exc:
        exc.benchmark_phase = phase[0]
        raise
    return result


def check_table_gradient(table):
    """After warm-up: the relative-bias table must have received a finite, non-zero gradient."""
    grad = table.grad
    if grad is None or not bool(torch.isfinite(grad).all()) or not bool(grad.abs().sum() > 0):
        raise RuntimeError("the relative-bias table received no (finite) gradient")


def time_runs(timer, run, settings, after_warmup: Callable | None = None) -> dict:
    """The first run (it compiles: its wall time is "first call"), the warm-up, `after_warmup` (a check),
    then the timed runs: first_call_s, graphs compiled, peak_gib, the time summary, a recompile note."""
    result = {}
    graphs = _compiled_graphs()
    result["first_call_s"] = timer.wall(run) / 1e3
    _warm(timer, run, settings.warmup - 1, settings.max_seconds)
    result["graphs"] = _compiled_graphs() - graphs
    if after_warmup is not None:
        after_warmup()
    graphs = _compiled_graphs()
    times, result["peak_gib"] = timer.measure(run, settings.repeats, settings.max_seconds, peak=True)
    result.update(_summary(times))
    if _compiled_graphs() != graphs:
        result["note"] = "recompiled while timing"
    return result


def run_cell(cell: dict, measure: Callable[[], dict], device) -> None:
    """Fill `cell` with measure()'s figures and status "ok", or with its failure ("OOM" or
    "FAIL (phase): ...", the error, the seconds it took); dynamo is reset after a failed compile and
    the device memory freed either way."""
    started, failure = time.perf_counter(), None
    try:
        cell.update(measure())
        cell["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - every failure becomes a table cell
        failure, cell["error"] = _failure(exc)
        cell["failed_after_s"] = time.perf_counter() - started
        del exc
    if failure is not None:
        cell["status"] = failure
        if failure != "OOM":
            torch._dynamo.reset()
    _free(device)


def _warm(timer, fn, runs, max_seconds):
    """Further warm-up runs after the first (compiling) one, stopped early when the runs are slow."""
    started = time.perf_counter()
    for _ in range(runs):
        if time.perf_counter() - started > max_seconds:
            break
        fn()
    timer.sync()


def run_attention(settings: AttentionSettings, on_update: Callable | None = None, deadline: Deadline | None = None,
                  log=print) -> list:
    """All cells of the sweep (dicts, see the module docstring); `on_update(cells)` after each cell."""
    settings.validate()
    device = resolve_device(settings.device)
    deadline = deadline or Deadline()
    configure_dynamo()
    timer = Timer(device)
    variants = attention_variants(settings)
    cells = []
    with flex_kernel_options(settings.flex_kernel_options):
        _sweep(settings, variants, cells, device, timer, deadline, on_update, log)
    return cells


def _sweep(settings, variants, cells, device, timer, deadline, on_update, log):
    for length in settings.lengths:
        torch._dynamo.reset()  # a fresh compile cache per length: no recompile limit, no stale graphs
        problem = _make_problem(settings, length, device)
        p = problem
        base = {"L": length, "B": p.batch, "n": p.n, "m": p.m, "q_rows": p.rows, "kv_len": p.kv_len}
        # Run the cheap and the compiled cells first; the dense ones are the likeliest to run out of memory.
        order = sorted(variants, key=lambda v: {"sdpa": 0, "dense-once": 2, "dense": 3}.get(v[0], 1))
        done = {}
        for key, label, window in order:
            cell = dict(base, backend=key, label=label, window=window)
            flops = attention_flops(p.batch, settings.heads, settings.head_dim, p.rows, p.kv_len, settings.backward)
            if settings.with_projections:
                flops += projection_flops(p.batch, settings.heads * settings.head_dim, p.rows, p.kv_len,
                                          settings.backward)
            cell["flops"] = flops
            if window is not None and window >= p.n - 1:
                cell["status"] = "n/a: window covers L"
            elif deadline.passed():
                cell["status"] = "SKIP: time budget"
            else:
                run_cell(cell, functools.partial(_attention_cell, settings, problem, key, window, device, timer), device)
            if cell["status"] == "ok":
                seconds = cell["ms"] / 1e3
                cell["tflops"] = flops / seconds / 1e12
                if "density" in cell:
                    attn = attention_flops(p.batch, settings.heads, settings.head_dim, p.rows, p.kv_len,
                                           settings.backward)
                    cell["eff_tflops"] = (flops - attn + attn * cell["density"]) / seconds / 1e12
            done[key] = cell
            log(_progress_line(cell))
            cells.append(cell)
            if on_update:
                on_update(cells)
        # keep report order within the length
        cells[-len(order):] = [done[key] for key, _, _ in variants]
        del problem, p
        _free(device)
        if on_update:
            on_update(cells)


def _progress_line(cell) -> str:
    head = f"L={cell['L']:>5} B={cell['B']:>3} {cell['label']:<22}"
    if cell["status"] != "ok":
        return f"{head} {cell['status']}"
    text = f"{head} {cell['ms']:9.3f} ms  {_tflops(cell['tflops']):>7} TFLOP/s"
    if cell.get("peak_gib") is not None:
        text += f"  peak {cell['peak_gib']:6.2f} GiB"
    text += f"  first call {cell['first_call_s']:.1f} s"
    if "mask_ms" in cell:
        text += f"  mask {cell['mask_ms']:.2f} ms (first {cell['mask_first_s']:.1f} s)  density {cell['density']:.3f}"
    if cell.get("note"):
        text += f"  [{cell['note']}]"
    return text


# ------------------------------------------------------------------------------------------- step


def mpnet_step_flops(config, batch, n, m) -> float:
    """Matmul FLOPs of one two-stream training step (forward + backward = 3x forward).

    Per sequence and layer: q, o and the FFN run on all n + 2m rows, k and v on the n + m content rows,
    attention is 4 (n+2m)(n+m) h; the LM head (dense + decoder) runs on the m query rows. That is
    6 x non-embedding weights x rows + attention, counted exactly for the two-stream layout.
    """
    h, f, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    rows, kv = n + 2 * m, n + m
    layer = 2 * rows * (2 * h * h + 2 * h * f) + 2 * kv * (2 * h * h) + 4 * rows * kv * h
    head = 2 * m * (h * h + h * v)
    return 3.0 * batch * (layers * layer + head)


def bert_step_flops(config, batch, length) -> float:
    """Same convention for HF BertForMaskedLM: the MLM head (transform + decoder) runs on ALL rows."""
    h, f, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    layer = 2 * length * (4 * h * h + 2 * h * f) + 4 * length * length * h
    head = 2 * length * (h * h + h * v)
    return 3.0 * batch * (layers * layer + head)


def _adamw(model, device, lr):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=lr, betas=(0.9, 0.98), eps=1e-6)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs), "foreach"


def _bert_config(kind: str):
    import transformers

    sizes = {} if kind == "base" else dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=512)
    return transformers.BertConfig(**sizes)


def _bert_model(config):
    import transformers

    try:
        return transformers.BertForMaskedLM._from_config(config, attn_implementation="sdpa")
    except (TypeError, AttributeError):
        config._attn_implementation = "sdpa"
        return transformers.BertForMaskedLM(config)


def _step_cell(settings: StepSettings, which: str, device, timer) -> dict:
    amp = DTYPES[settings.dtype]
    gen = torch.Generator().manual_seed(settings.seed)
    batch, n = settings.batch_size, settings.seq_len
    m = pred_size(n)
    if which == "bert":
        config = _bert_config(settings.model)
        model = _bert_model(config).to(device).train()
        ids = torch.randint(1000, config.vocab_size, (batch, n), generator=gen)
        labels = torch.full_like(ids, -100)
        chosen = torch.stack([torch.randperm(n, generator=gen)[:m] for _ in range(batch)])
        labels.scatter_(1, chosen, ids.gather(1, chosen))
        ids.scatter_(1, chosen, 103)  # [MASK]
        ids, labels = ids.to(device), labels.to(device)
        forward = torch.compile(model) if settings.compile else model

        def loss_fn():  # no attention_mask: no padding, so SDPA runs unmasked (what HF does for all-ones)
            return forward(input_ids=ids, labels=labels).loss

        flops = bert_step_flops(config, batch, n)
        attention = f"HF BertForMaskedLM, attn_implementation={model.config._attn_implementation}"
    else:
        make = MPNetConfig.base if settings.model == "base" else MPNetConfig.tiny
        config = make(use_flex_attention=which == "flex")
        from .modeling.model import MPNetForPretraining

        model = MPNetForPretraining(config).to(device).train()
        ids = torch.randint(3, config.mask_token_id, (batch, n), generator=gen)  # no <s>, <pad>, </s>, <mask>
        targets = ids[:, n - m:].clone()
        ids[:, n - m:] = config.mask_token_id  # the predicted tokens, corrupted (all <mask>: same cost)
        positions = torch.stack([torch.randperm(n, generator=gen) for _ in range(batch)])
        ids, targets, positions = ids.to(device), targets.to(device), positions.to(device)
        forward = torch.compile(model) if settings.compile else model

        def loss_fn():
            logits = forward(ids, positions, m)
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

        flops = mpnet_step_flops(config, batch, n, m)
        attention = "FlexTwoStreamAttention" if which == "flex" else "RelativeMultiHeadAttention (dense)"

    optimizer, kind = _adamw(model, device, settings.lr)
    losses = []

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    result = {"attention": attention, "optimizer": f"AdamW ({kind})",
              "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "flops": flops,
              "tokens": batch * n, "predicted": batch * m}
    result["first_step_s"] = timer.wall(step) / 1e3
    _warm(timer, step, settings.warmup - 1, settings.max_seconds)
    times, result["peak_gib"] = timer.measure(step, settings.repeats, settings.max_seconds, peak=True)
    result.update(_summary(times))
    last = float(losses[-1])
    if not math.isfinite(last):
        raise RuntimeError(f"loss is not finite ({last})")
    result["loss"] = last
    if settings.profile and device.type == "cuda":
        try:
            result["profile"] = kernel_breakdown(step)
        except Exception as exc:  # noqa: BLE001 - the timing above stands without the breakdown
            result["profile_error"] = f"{type(exc).__name__}: {exc}"
    return result


# Kernel families, matched on the CUDA kernel's name (first match wins). The flex kernels are inductor
# templates ("triton_tem_fused_..."), SDPA's are FlashAttention's; the GEMM families cover cuBLAS/CUTLASS.
KERNEL_FAMILIES = (
    ("flex attention (fwd+bwd)", ("flex_attention", "triton_tem_")),
    ("SDPA flash attention", ("flash", "fmha", "cudnn")),
    ("matmul (GEMM)", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_")),
    ("optimizer (AdamW)", ("adam",)),
    ("softmax / dropout", ("softmax", "dropout", "bernoulli")),
    ("reductions / index (incl. bias gather)", ("reduce", "index", "embedding", "gather", "scatter", "sort")),
)
OTHER_KERNELS = "other (elementwise, norms, copies)"


def kernel_family(name: str) -> str:
    lowered = name.lower()
    for family, needles in KERNEL_FAMILIES:
        if any(needle in lowered for needle in needles):
            return family
    return OTHER_KERNELS


def kernel_breakdown(step, steps: int = 3, top: int = 8) -> dict:
    """GPU kernel time per step by family and the top kernels, from torch.profiler over `steps` steps:
    the evidence of where a step's time goes (which is what a missed target must be explained by)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        micros = getattr(event, "self_device_time_total", None)
        if micros is None:
            micros = event.self_cuda_time_total
        if micros > 0:
            kernels[event.key] = kernels.get(event.key, 0.0) + micros / 1e3 / steps
    families = {}
    for name, ms in kernels.items():
        families[kernel_family(name)] = families.get(kernel_family(name), 0.0) + ms
    total = sum(families.values())
    return {"gpu_ms_per_step": total,
            "families": sorted(([f, ms] for f, ms in families.items()), key=lambda item: -item[1]),
            "top_kernels": sorted(([k[:90], ms] for k, ms in kernels.items()), key=lambda item: -item[1])[:top]}


def profile_lines(rows) -> list:
    """Markdown: where each model's step time goes on the GPU."""
    out = []
    for row in rows:
        prof = row.get("profile")
        if not prof:
            continue
        total = prof["gpu_ms_per_step"]
        out += [f"#### {row['model']} {row['backend']}: GPU kernel time per step {total:.1f} ms "
                f"(step wall {row['ms']:.1f} ms)", "", "| kernel family | ms / step | share |", "|---|---|---|"]
        out += [f"| {family} | {ms:.2f} | {100 * ms / total:.1f}% |" for family, ms in prof["families"]]
        out += ["", "| top kernels | ms / step |", "|---|---|"]
        out += [f"| `{name}` | {ms:.2f} |" for name, ms in prof["top_kernels"]]
        out.append("")
    return out


def run_step(settings: StepSettings, on_update: Callable | None = None, deadline: Deadline | None = None,
             log=print) -> list:
    settings.validate()
    device = resolve_device(settings.device)
    deadline = deadline or Deadline()
    configure_dynamo()
    timer = Timer(device)
    which = [f"mpnet-{b}" for b in settings.backends] + (["bert"] if settings.bert else [])
    rows = []
    with flex_kernel_options(settings.flex_kernel_options):
        for name in which:
            torch._dynamo.reset()
            rows.append(_step_row(settings, name, device, timer, deadline))
            log(_step_line(rows[-1]))
            if on_update:
                on_update(rows)
    bert = next((r for r in rows if r["model"].startswith("BERT") and r["status"] == "ok"), None)
    for row in rows:
        if bert and row["status"] == "ok":
            row["vs_bert"] = row["ms"] / bert["ms"]
    if on_update:
        on_update(rows)
    return rows


def _step_row(settings, name, device, timer, deadline) -> dict:
    model_name = ("BERT" if name == "bert" else "MPNet") + f"-{settings.model}"
    row = {"model": model_name, "backend": name.replace("mpnet-", "") if name != "bert" else "sdpa",
           "batch": settings.batch_size, "seq_len": settings.seq_len, "m": pred_size(settings.seq_len),
           "compile": settings.compile}
    if deadline.passed():
        row["status"] = "SKIP: time budget"
        return row
    failure = None
    try:
        row.update(_step_cell(settings, "bert" if name == "bert" else name.split("-", 1)[1], device, timer))
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - every failure becomes a table row
        failure, row["error"] = _failure(exc)
        del exc
    if failure is not None:
        row["status"] = failure
    _free(device)
    if row["status"] == "ok":
        seconds = row["ms"] / 1e3
        row["tokens_per_s"] = row["tokens"] / seconds
        row["gflop_per_token"] = row["flops"] / row["tokens"] / 1e9
        row["tflops"] = row["flops"] / seconds / 1e12
        row["mfu"] = row["tflops"] / settings.peak_tflops if device.type == "cuda" else None
    return row


def _step_line(row) -> str:
    head = f"{row['model']:<12} {row['backend']:<6}"
    if row["status"] != "ok":
        return f"{head} {row['status']}"
    text = (f"{head} {row['ms']:9.2f} ms/step  {row['tokens_per_s']:10.0f} tokens/s  {row['tflops']:6.1f} TFLOP/s"
            f"  loss {row['loss']:.3f}  first step {row['first_step_s']:.1f} s")
    if row.get("peak_gib") is not None:
        text += f"  peak {row['peak_gib']:.2f} GiB"
    return text


# ----------------------------------------------------------------------------------------- reports


def _fmt(value, spec=".2f", missing="—"):
    return missing if value is None else format(value, spec)


def _tflops(value):
    """TFLOP/s with a precision that stays readable from CPU (0.004) to GPU (512.3) figures."""
    if value is None:
        return ""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def attention_tables(cells, settings: AttentionSettings):
    """(main rows, relative-throughput rows, x-SDPA rows, headers...) for tabulate."""
    variants = attention_variants(settings)
    main = []
    for c in cells:
        ok = c["status"] == "ok"
        main.append([
            c["L"], c["B"], c["m"], f"{c['q_rows']}x{c['kv_len']}", c["label"],
            f"{c['ms']:.3f} [{c['p20_ms']:.3f}, {c['p80_ms']:.3f}]" if ok else c["status"],
            _tflops(c.get("tflops")) if ok else "",
            _fmt(c.get("density"), ".3f", "") if ok else "",
            _tflops(c.get("eff_tflops")) if ok else "",
            _fmt(c.get("peak_gib"), ".2f", "n/a") if ok else "",
            (f"{c['mask_ms']:.2f} ({c['mask_first_s']:.1f} s)" if "mask_ms" in c else "") if ok else "",
            _fmt(c.get("first_call_s"), ".1f") if ok else "",
        ])
    main_headers = ["L", "B", "m", "rows x keys", "backend", "time ms median [p20, p80]", "TFLOP/s",
                    "block density", "eff. TFLOP/s", "peak GiB", "mask build ms (first s)", "first call s"]

    by_length = {}
    for c in cells:
        by_length.setdefault(c["L"], {})[c["backend"]] = c
    rel_keys = [v for v in variants if v[0] != "sdpa"]
    relative, vs_sdpa = [], []
    for length, row in by_length.items():
        ms = {k: c["ms"] for k, c in row.items() if c["status"] == "ok"}
        ref_key = "dense" if "dense" in ms else next((k for k, _, _ in rel_keys if k in ms), None)
        line = [length]
        for key, _, _ in rel_keys:
            c = row.get(key)
            if c is None:
                line.append("")
            elif c["status"] != "ok":
                line.append("OOM" if c["status"] == "OOM" else c["status"].split(":")[0])
            else:
                mark = "" if ref_key == "dense" else "*"
                line.append(f"{ms[ref_key] / ms[key]:.2f}x{mark}")
        relative.append(line)
        if "sdpa" in ms:
            vs_sdpa.append([length] + [f"{ms[k] / ms['sdpa']:.1f}x" if k in ms else
                                       (row[k]["status"].split(":")[0] if k in row else "") for k, _, _ in rel_keys])
    rel_headers = ["L"] + [label for _, label, _ in rel_keys]
    return main, main_headers, relative, rel_headers, vs_sdpa, rel_headers


def step_table(rows, settings: StepSettings):
    table = []
    for r in rows:
        ok = r["status"] == "ok"
        table.append([
            r["model"], r["backend"] + (" +compile" if r["compile"] else ""), f"{r['batch']}x{r['seq_len']}",
            _fmt(r.get("params_m"), ".1f") if ok else "",
            f"{r['ms']:.1f} [{r['p20_ms']:.1f}, {r['p80_ms']:.1f}]" if ok else r["status"],
            _fmt(r.get("tokens_per_s"), ",.0f") if ok else "",
            _fmt(r.get("gflop_per_token"), ".2f") if ok else "",
            _tflops(r.get("tflops")) if ok else "",
            (_fmt(100 * r["mfu"], ".1f") if r.get("mfu") is not None else "n/a") if ok else "",
            _fmt(r.get("peak_gib"), ".2f", "n/a") if ok else "",
            _fmt(r.get("vs_bert"), ".2f") + "x" if r.get("vs_bert") is not None else "",
            _fmt(r.get("first_step_s"), ".1f") if ok else "",
        ])
    headers = ["model", "attention", "batch x len", "params M", "step ms median [p20, p80]", "tokens/s",
               "GFLOP/token", "TFLOP/s", f"MFU % (peak {settings.peak_tflops:g})", "peak GiB", "x BERT step time",
               "first step s"]
    return table, headers


ATTENTION_METHOD = """\
- One two-stream attention call PAIR per cell, as in one pretraining layer: B = tokens_per_batch // L
  sequences, n = L, m = round(0.15 L) predicted tokens; the content stream has n + m query rows, the
  query stream m rows, both attend to the n + m content keys/values. Positions are a random
  permutation per sequence (as the collator draws them); the relative-position bias comes from a
  learnable (32 x heads) table that requires grad{grad}.
- {what}. {proj}
- SDPA flash: both streams in one `scaled_dot_product_attention` call (n + 2m rows vs n + m keys), no
  bias, no mask: the ceiling. dense: `RelativeMultiHeadAttention` with `make_dense_attention_state`
  (materialised mask and (B, H, n+2m, n+m) bias) built INSIDE the timed region, as the original did
  per forward, attention dropout {dropout} as in training. dense (state once): the same module with the
  state built before timing; the bias is then a leaf that receives its gradient, so this is the
  marginal cost of each further layer (the model builds the state and reduces the bias gradient into
  the table once per step). flex: `FlexTwoStreamAttention` (compiled `flex_attention`, the project's
  mask_mods and score_mods), BlockMasks built once outside the timed region (their build is timed
  apart: warm median, and the first, compiling build); the bias gradient flows into the captured
  (heads x distances) tensor and on to the table. flex w=W: the same with the sliding window
  |pos_q - pos_k| <= W on original positions (n/a where W >= L - 1). FlexAttention applies no
  attention dropout.
- Time: median [p20, p80] of up to {repeats} runs ({timer}) after {warmup} warm-up runs; "first call"
  is the first run's wall time (compilation included). TFLOP/s: attention FLOPs
  4 x B x heads x (n+2m) x (n+m) x head_dim for the forward, x3.5 for forward + backward{projf};
  block density = share of 128x128 tiles the BlockMasks let flex compute (content and query stream
  together), eff. TFLOP/s = FLOPs x density / time. peak GiB = torch.cuda.max_memory_allocated() over
  one run (inputs and prebuilt state included). OOM = torch.cuda.OutOfMemoryError; FAIL = an error
  (compilation included); SKIP = not started within --time-budget.
- Dynamo: recompile limits raised to 64, a hit is a FAIL (no silent eager fallback), and
  torch._dynamo.reset() between lengths."""

STEP_METHOD = """\
- One optimizer step per timed run: forward in {dtype} autocast, loss, backward, AdamW (betas 0.9/0.98,
  eps 1e-6, weight decay 0.01 on matrices, fused kernel), zero_grad; median [p20, p80] of up to
  {repeats} steps (CUDA events) after {warmup} warm-up steps (the first compiles, allocates the
  optimizer state); peak GiB = max_memory_allocated over one step.
- MPNet: `MPNetForPretraining` ({model}), two streams (n + 2m rows, m = round(0.15 n)), cross-entropy on
  the m predicted tokens; random token ids, one random permutation per sequence, no padding.
- BERT: `transformers.BertForMaskedLM` ({model}, attn_implementation="sdpa"), the same batch and length,
  15% of the tokens predicted (labels -100 elsewhere), loss from the model (its MLM head runs on every
  row, which is what a user of that class pays), no attention_mask (no padding).
- Model FLOPs are matmul FLOPs, forward + backward = 3 x forward (no recompute counted): per sequence and
  layer MPNet does q, o and the FFN on n + 2m rows, k and v on n + m rows and 4 (n+2m)(n+m) h of
  attention, plus its LM head on m rows; BERT does 2 L (4h^2 + 2hf) + 4 L^2 h per layer and its MLM
  head on all L rows. That is 6 x non-embedding parameters x rows + attention. tokens/s counts the
  B x L input tokens; MFU = achieved TFLOP/s / {peak} TFLOP/s (--peak-tflops; 989 = H100/H200 SXM dense
  bf16). "x BERT step time" = step time / BERT's step time (below 1 = faster than BERT)."""


def _settings_lines(settings) -> list:
    return [f"- `{k}`: {v}" for k, v in dataclasses.asdict(settings).items()]


def render_markdown(env, attention=None, step=None, plots=()) -> str:
    from tabulate import tabulate

    out = [f"# benchmark-mpnet: {env['date']}", "",
           "| | |", "|---|---|"]
    for key in ("device", "torch", "cuda", "triton", "transformers", "python", "command"):
        out.append(f"| {key} | `{env.get(key)}` |")
    if attention is not None:
        settings, cells = attention
        mode = "forward + backward" if settings.backward else "FORWARD ONLY (CPU: FlexAttention has no backward there)"
        main, mh, rel, rh, sd, sh = attention_tables(cells, settings)
        timer = "CUDA events, L2 flushed before each" if settings.device.startswith("cuda") else "wall clock"
        out += ["", f"## Attention: one two-stream call pair, {mode}, {settings.dtype}", "", "Settings:", ""]
        out += _settings_lines(settings)
        out += ["", "Method:", "", ATTENTION_METHOD.format(
            what=("Timed: forward + backward" if settings.backward else "Timed: forward only"),
            grad=(" and receives its gradient in every timed run (checked after warm-up)" if settings.backward
                  else " (forward only here: no gradients are computed)"),
            proj=("The q/k/v/o projections ARE included (fp32 weights under autocast)." if settings.with_projections
                  else "The q/k/v/o projections are NOT timed: the modules' Linear layers are replaced by "
                       "identities, so a cell times the head split, both streams' attention, their concatenation "
                       "and the head merge."),
            dropout=settings.attention_dropout, repeats=settings.repeats, warmup=settings.warmup, timer=timer,
            projf=(" plus 2 x B x h^2 x (2 rows + 2 keys) for the projections (x3 with backward)"
                   if settings.with_projections else "")), ""]
        if settings.flex_kernel_options:
            out += [f"**flex kernel_options overridden by the benchmark** (`--flex-kernel-options`): "
                    f"`{json.dumps(settings.flex_kernel_options)}`; the project's flex backend passes none.", ""]
        out += ["### Time, throughput, memory", "", tabulate(main, mh, tablefmt="github", disable_numparse=True), ""]
        out += ["### Relative throughput (dense = 1.00x, higher is faster; as in seed 000's table)", "",
                tabulate(rel, rh, tablefmt="github", disable_numparse=True), "",
                "`*`: dense did not run at this length; the row is relative to the first backend that did.", ""]
        if sd:
            out += ["### Time relative to SDPA flash without bias (lower is better)", "",
                    tabulate(sd, sh, tablefmt="github", disable_numparse=True), ""]
        out += _failure_notes(cells, lambda c: f"L={c['L']} {c['label']}")
        for name in plots:
            out += [f"![{name}]({name})", ""]
    if step is not None:
        settings, rows = step
        table, headers = step_table(rows, settings)
        out += ["", f"## Pretraining step ({settings.model} models, {settings.dtype})", "", "Settings:", ""]
        out += _settings_lines(settings)
        if settings.flex_kernel_options:
            out += ["", f"**flex kernel_options overridden by the benchmark**: `{json.dumps(settings.flex_kernel_options)}`"]
        out += ["", "Method:", "", STEP_METHOD.format(dtype=settings.dtype, repeats=settings.repeats,
                                                     warmup=settings.warmup, model=f"{settings.model} config",
                                                     peak=f"{settings.peak_tflops:g}"), ""]
        out += [tabulate(table, headers, tablefmt="github", disable_numparse=True), ""]
        profiled = profile_lines(rows)
        if profiled:
            out += ["### Where the step time goes (torch.profiler, CUDA kernels, mean of 3 steps)", ""] + profiled
        out += _failure_notes(rows, lambda r: f"{r['model']} {r['backend']}")
    return "\n".join(out) + "\n"


def _failure_notes(items, name) -> list:
    notes = [f"- {name(item)}: {item['status']}" + (f" (after {item['failed_after_s']:.0f} s)"
                                                      if item.get("failed_after_s") else "")
             + f"\n  `{item['error']}`" for item in items if item.get("error")]
    return ["Failures (full messages):", ""] + notes + [""] if notes else []


def plot_attention(cells, settings: AttentionSettings, out_dir: Path) -> list:
    """attention_time.png and attention_memory.png: log-log against L, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric, name, ylabel in (("ms", "attention_time.png", "time per call pair (ms, median)"),
                                 ("peak_gib", "attention_memory.png", "peak memory (GiB)")):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        drawn = False
        failed = []
        for key, label, _ in attention_variants(settings):
            points = [(c["L"], c[metric]) for c in cells
                      if c["backend"] == key and c["status"] == "ok" and c.get(metric) is not None]
            if points:
                xs, ys = zip(*points)
                line, = ax.plot(xs, ys, marker="o", label=label)
                drawn = True
                failed += [(c["L"], c["status"].split(":")[0], line.get_color()) for c in cells
                           if c["backend"] == key and (c["status"] == "OOM" or c["status"].startswith("FAIL"))]
        if drawn:  # mark where a drawn backend ran out of memory or failed, at the top of the plot
            top = ax.get_ylim()[1]
            for length, text, color in failed:
                ax.scatter([length], [top], marker="x", color=color)
                ax.annotate(text, (length, top), fontsize=7, color=color, ha="center", va="top",
                            xytext=(0, -6), textcoords="offset points")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L (tokens per batch fixed)")
        ax.set_ylabel(ylabel)
        mode = "fwd+bwd" if settings.backward else "forward only"
        ax.set_title(f"two-stream attention pair, {mode}, {settings.dtype}, "
                     f"{settings.tokens_per_batch} tokens/batch, {settings.heads}x{settings.head_dim}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data (CPU: no memory figures)" if metric == "peak_gib" else "no data",
                    transform=ax.transAxes, ha="center")
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(name)
    return written


class Report:
    """Writes DIR/benchmark.{md,json} (and the attention plots) after every cell, so a run that is cut
    short still leaves what it measured."""

    def __init__(self, out_dir, env):
        self.dir = Path(out_dir) if out_dir else None
        self.env = env
        self.attention = None
        self.step = None
        self.plots = []
        if self.dir is not None:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UserError(f"cannot create --output-dir {self.dir}: {err.strerror}") from None

    def write(self, plot=False):
        if self.dir is None:
            return
        if plot and self.attention is not None:
            self.plots = plot_attention(self.attention[1], self.attention[0], self.dir)
        data = {"environment": self.env}
        if self.attention is not None:
            data["attention"] = {"settings": dataclasses.asdict(self.attention[0]), "cells": self.attention[1]}
        if self.step is not None:
            data["step"] = {"settings": dataclasses.asdict(self.step[0]), "rows": self.step[1]}
        tmp = self.dir / "benchmark.json.tmp"
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(self.dir / "benchmark.json")
        tmp = self.dir / "benchmark.md.tmp"
        tmp.write_text(render_markdown(self.env, self.attention, self.step, self.plots))
        tmp.replace(self.dir / "benchmark.md")


def print_header(env, settings_list, log=print):
    log("benchmark-mpnet")
    for key in ("date", "device", "torch", "cuda", "triton", "transformers", "python", "command"):
        log(f"  {key:<12} {env.get(key)}")
    for settings in settings_list:
        log(f"  {type(settings).__name__}:")
        for key, value in dataclasses.asdict(settings).items():
            log(f"    {key:<18} {value}")
    sys.stdout.flush()


def benchmark(attention: AttentionSettings | None, step: StepSettings | None, out_dir=None,
              time_budget: float | None = None, log=print) -> Report:
    """Run what is given (attention sweep, then the step comparison), print the tables, write the report."""
    from tabulate import tabulate

    for settings in (attention, step):
        if settings is not None:
            settings.validate()
            resolve_device(settings.device)
    env = environment()
    report = Report(out_dir, env)
    print_header(env, [s for s in (attention, step) if s is not None], log)
    deadline = Deadline(time_budget)
    if attention is not None:
        mode = "forward + backward" if attention.backward else "FORWARD ONLY (CPU: FlexAttention has no backward)"
        log(f"\n== attention: one two-stream call pair, {mode} ==")
        # keep about two minutes of the budget for the step comparison
        attn_deadline = deadline.sooner(min(120.0, 0.4 * time_budget)) if (step is not None and time_budget) else deadline
        last_length = [None]

        def update(cells):
            report.attention = (attention, cells)
            length = cells[-1]["L"] if cells else None
            report.write(plot=length != last_length[0])
            last_length[0] = length

        cells = run_attention(attention, update, attn_deadline, log)
        report.attention = (attention, cells)
        report.write(plot=True)
        main, mh, rel, rh, sd, sh = attention_tables(cells, attention)
        log("\n" + tabulate(main, mh, tablefmt="github", disable_numparse=True))
        log("\nRelative throughput (dense = 1.00x, higher is faster):\n" + tabulate(rel, rh, tablefmt="github", disable_numparse=True))
        if sd:
            log("\nTime relative to SDPA flash without bias (lower is better):\n" + tabulate(sd, sh, tablefmt="github", disable_numparse=True))
        if not attention.backward:
            log("\nNOTE: forward only (CPU); the GPU run times forward + backward.")
    if step is not None:
        log(f"\n== pretraining step: {step.model} models, batch {step.batch_size} x {step.seq_len}, {step.dtype} ==")
        if torch.device(step.device).type != "cuda":
            log("NOTE: CPU run: no MFU (the peak is a GPU figure), no memory figures")

        def update_step(rows):
            report.step = (step, rows)
            report.write()

        rows = run_step(step, update_step, deadline, log)
        report.step = (step, rows)
        report.write(plot=attention is not None)
        table, headers = step_table(rows, step)
        log(f"\npeak for MFU: {step.peak_tflops:g} TFLOP/s (--peak-tflops)")
        log(tabulate(table, headers, tablefmt="github", disable_numparse=True))
        for line in profile_lines(rows):
            log(line)
    if report.dir is not None:
        log(f"\nwrote {report.dir / 'benchmark.md'}, {report.dir / 'benchmark.json'}"
            + "".join(f", {report.dir / p}" for p in report.plots))
    return report
