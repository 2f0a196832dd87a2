"""What every benchmark of mpnet.bench shares: the device, the timer, the time budget, the cells and
their failures, ONE report writer (markdown + json + plots) and ONE progress line.

A benchmark module (attention, step, patterns, packing, masks) holds its measurements only. It plans
its cells (plain dicts, written to the JSON as they are), measures each through `Session.measure`, and
says what its part of the report holds as a `Section` (report.py): its settings, method lines, tables
and figures. The harness does the rest: resume, time budget, failure-to-cell, progress, files.

Conventions every section follows (and prints in its method):
- Time: median [p20, p80] of up to `repeats` runs (at least 3), after warm-up runs of which the first
  compiles ("first call" is its wall time). CUDA: CUDA events, the L2 cache flushed (a 256 MB write)
  before every run. CPU: wall clock.
- Memory: torch.cuda.max_memory_allocated() over the first timed run after a reset: everything alive
  then (inputs, prebuilt state, activations, gradients), minus the L2-flush buffer. None on CPU.
- A torch.cuda.OutOfMemoryError is an "OOM" cell; any other error, compilation included, a
  "FAIL (<phase>): <reason>" cell with the whole message in the report; "SKIP: time budget" for a
  cell not started within --time-budget; "n/a: <why>" where a cell does not apply.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import math
import re
import time
import traceback
from typing import Callable

import torch
import torch._dynamo

from ..errors import UserError
from ..training.toolkit import PeakMemory, resolve_device, synchronize
from .report import GiB, Report, Section, environment, print_header, progress_line

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FLUSH_BYTES = 256 << 20  # larger than the H100/H200 L2 (50/60 MB): flushed before every timed run
CPU_HINT = "pass --device cpu (forward only; add --quick for tiny sizes)"


# -------------------------------------------------------------------------------- device and dtype


def open_device(name: str | None) -> torch.device:
    """cpu, cuda or cuda:N (default: the GPU if there is one), made the current CUDA device: the
    timer's events, the peak-memory counters and the L2 flush all act on the current device."""
    if name and name.strip().lower().startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; {CPU_HINT}")
    device = resolve_device(name)
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: the benchmarks run on cpu, cuda or cuda:N")
    if device.type == "cuda":
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def check_dtype(dtype: str, device: torch.device):
    """bf16 (autocast, CUDA) or fp32. On CPU the project computes in fp32 (toolkit.autocast is off
    there: bf16 CPU matmuls are slower, not faster), so bf16 is refused rather than quietly dropped."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "bf16" and device.type != "cuda":
        raise UserError("--dtype bf16 needs a CUDA device (on CPU the project runs in fp32); "
                        "leave --dtype out or pass --dtype fp32")


def check_lengths(lengths, tokens_per_batch: int):
    """Sequence lengths of a sweep at a fixed number of tokens per batch (B = tokens // L >= 1)."""
    if not lengths:
        raise UserError("--lengths is empty; give sequence lengths like 512,1024")
    for length in lengths:
        if length < 8:
            raise UserError(f"sequence length {length} is too short; use lengths >= 8")
        if tokens_per_batch < length:
            raise UserError(f"--tokens-per-batch {tokens_per_batch} is smaller than length {length}: "
                            "the batch would be empty; raise --tokens-per-batch or shorten --lengths")


def check_counts(settings, *names):
    """Positive sizes (heads, head_dim, ...) and at least one warm-up and one timed run."""
    for name in names:
        if getattr(settings, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(settings, name)}")
    if settings.warmup < 1 or settings.repeats < 1:
        raise UserError("--warmup and --repeats must be >= 1 (the first warm-up run compiles)")


def check_attention_sweep(settings, device: torch.device, *counts):
    """What every sweep over sequence lengths checks (attention, patterns): --flex-kernel-options, the
    dtype on this device, the lengths at its tokens per batch, and the positive `counts`."""
    check_kernel_options(settings.flex_kernel_options)
    check_dtype(settings.dtype, device)
    check_lengths(settings.lengths, settings.tokens_per_batch)
    check_counts(settings, *counts)


def on_cuda(settings) -> bool:
    return settings.device is not None and settings.device.startswith("cuda")


def timer_text(settings) -> str:
    """How a section's runs were timed, for its method."""
    return "CUDA events, L2 flushed before each" if on_cuda(settings) else "wall clock"


def parse_entries(entries, parse, flag: str) -> list:
    """A list flag's entries (--triton-tiles, --flex-variants), each read by `parse`; an entry named twice is refused."""
    variants = [parse(entry) for entry in entries]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise UserError(f"{flag} names an entry twice: {','.join(names)}")
    return variants


def check_kernel_options(options):
    if options is not None and not (isinstance(options, dict) and all(isinstance(k, str) for k in options)):
        raise UserError('--flex-kernel-options must be a JSON object, e.g. \'{"num_stages": 1}\'')


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@contextlib.contextmanager
def flex_kernel_options(options):
    """Run the project's flex attention with these kernel_options, in this process only.

    An experiment knob: mpnet.modeling decides the options for training; this shows which ones the
    attention code should adopt (e.g. smaller tiles where the default ones need more shared memory than
    the GPU has). CUDA only; elsewhere the project's own `run_flex_attention` runs unchanged.
    """
    if not options:
        yield
        return
    from ..modeling import attention as modeling_attention

    original = modeling_attention.run_flex_attention

    def run_flex_attention(q, k, v, score_mod, block_mask):
        if q.device.type != "cuda":
            return original(q, k, v, score_mod, block_mask)
        return _compiled_flex_attention()(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                          kernel_options=dict(options))

    modeling_attention.run_flex_attention = run_flex_attention
    try:
        yield
    finally:
        modeling_attention.run_flex_attention = original


# ------------------------------------------------------------------------------------- compilation


def configure_dynamo(limit: int = 64):
    """Every (Q_LEN, KV_LEN) compiles anew: raise dynamo's recompile limits so a sweep stays compiled,
    and make a hit fail loudly (a FAIL cell) instead of silently falling back to the unfused path."""
    cfg = torch._dynamo.config
    for name, value in (("recompile_limit", limit), ("cache_size_limit", limit),
                        ("accumulated_recompile_limit", 16 * limit), ("accumulated_cache_size_limit", 16 * limit)):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), value))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(cfg, name):
            setattr(cfg, name, True)


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@contextlib.contextmanager
def compile_phases(into: dict, at_least_s: float = 0.5):
    """Seconds per compile phase spent while the block runs, from torch's own records (its `dynamo_timed`
    phases: dynamo's tracing, AOT autograd, inductor's lowering and code generation, the wait for its
    parallel kernel compiles, ...), phases of at least `at_least_s`. They nest: an outer phase includes the
    inner ones. Where a compiled step's first step goes; nothing is recorded where torch keeps no records."""
    from torch._dynamo import utils

    records = getattr(utils, "compilation_time_metrics", None)  # phase -> the list of its timings, appended to
    before = {name: len(times) for name, times in records.items()} if isinstance(records, dict) else None
    yield into
    if before is None:
        return
    # the timings appended since; all of a list shorter than before (torch._dynamo.reset() clears them)
    spent = {name: sum(times[before.get(name, 0):] if len(times) >= before.get(name, 0) else times)
             for name, times in records.items()}
    into.update({name: round(s, 2) for name, s in sorted(spent.items(), key=lambda item: -item[1]) if s >= at_least_s})


def free_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ timing


def quantile(values, q: float) -> float:
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_summary(times) -> dict:
    return {"ms": quantile(times, 0.5), "p20_ms": quantile(times, 0.2), "p80_ms": quantile(times, 0.8),
            "mean_ms": sum(times) / len(times), "runs": len(times)}


class Timer:
    """CUDA events (L2 flushed before each run) on GPU, wall clock on CPU; times in milliseconds."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device) if self.cuda else None
        self.memory = PeakMemory(device) if self.cuda else None

    def sync(self):
        synchronize(self.device)

    def wall(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - start) * 1e3

    def once(self, fn) -> float:
        if not self.cuda:
            return self.wall(fn)
        self.flush.zero_()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)

    def measure(self, fn, repeats: int, max_seconds: float, min_runs: int = 3) -> tuple[list, float | None]:
        """(times of up to `repeats` runs, at least `min_runs`, fewer past `max_seconds`; the peak GiB
        of the first run, None on CPU)."""
        started, peak = time.perf_counter(), None
        if self.memory is not None:
            self.flush.zero_()
            self.memory.reset()
        times = [self.once(fn)]
        if self.memory is not None:
            peak = (self.memory.peak_bytes() - FLUSH_BYTES) / GiB
        while len(times) < max(repeats, min_runs):
            if len(times) >= min_runs and time.perf_counter() - started > max_seconds:
                break
            times.append(self.once(fn))
        return times, peak


def warm(timer: Timer, fn, runs: int, max_seconds: float):
    """Warm-up runs after the first (compiling) one, stopped early when the runs are slow."""
    started = time.perf_counter()
    for _ in range(runs):
        if time.perf_counter() - started > max_seconds:
            break
        fn()
    timer.sync()


def time_runs(timer: Timer, run, warmup_runs: int, repeats: int, max_seconds: float, check=None,
              first=None) -> dict:
    """`first()` (default: one run; it compiles: "first call" s), `warmup_runs` more runs, `check()`
    (e.g. that a gradient arrived; it may also reset counters), then the timed runs: first_call_s (and
    compile_phases_s: where a compiling first call went), graphs (compiled while warming up), peak_gib, the
    time summary and a note if it recompiled."""
    result = {}
    graphs = compiled_graphs()
    with compile_phases({}) as phases:
        result["first_call_s"] = timer.wall(first or run) / 1e3
    if phases:
        result["compile_phases_s"] = phases
    warm(timer, run, warmup_runs, max_seconds)
    result["graphs"] = compiled_graphs() - graphs
    if check is not None:
        check()
    graphs = compiled_graphs()
    times, result["peak_gib"] = timer.measure(run, repeats, max_seconds)
    result.update(time_summary(times))
    if compiled_graphs() != graphs:
        result["note"] = "recompiled while timing"
    return result


def timed_build(timer: Timer, build) -> tuple:
    """(what build() returns, its wall time in s): a cell's state (masks, plan) built outside the timed
    region, its first build timed on its own (it may compile)."""
    timer.sync()
    started = time.perf_counter()
    value = build()
    timer.sync()
    return value, time.perf_counter() - started


def warm_median(timer: Timer, build, settings) -> float:
    """Median ms of a few more builds (at most 5, at most 2 s)."""
    times, _ = timer.measure(build, min(5, settings.repeats), min(2.0, settings.max_seconds))
    return quantile(times, 0.5)


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


def check_gradient(tensor, what: str = "the relative-bias table"):
    """After warm-up: `tensor` must have received a finite, non-zero gradient."""
    grad = tensor.grad
    if grad is None or not bool(torch.isfinite(grad).all()) or not bool(grad.abs().sum() > 0):
        raise RuntimeError(f"{what} received no (finite) gradient")


# ----------------------------------------------------------------------------------------- failures


@contextlib.contextmanager
def phase(name: str):
    """Label an exception raised inside with the phase it happened in (the FAIL cell names it); the
    innermost label wins."""
    try:
        yield
    except Exception as exc:
        if getattr(exc, "benchmark_phase", None) is None:
            exc.benchmark_phase = name
        raise


def _chain(exc: BaseException) -> list:
    """The exception and those it was raised from or while handling, outermost first (at most 9)."""
    chain, cause = [exc], exc
    while (cause.__cause__ or cause.__context__) is not None and len(chain) <= 8:
        cause = cause.__cause__ or cause.__context__
        chain.append(cause)
    return chain


def failure(exc: BaseException) -> tuple[str, str]:
    """(short cell text, longer detail) for an exception: OOM, or FAIL (<phase>): <reason>."""
    chain = _chain(exc)
    text = " | ".join(f"{type(item).__name__}: {item}" for item in chain)
    detail = " ".join(text.split())[:600]
    for item in chain:
        if isinstance(item, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(item).lower():
            return "OOM", detail
    where = f"FAIL ({exc.benchmark_phase})" if getattr(exc, "benchmark_phase", None) else "FAIL"
    # triton's own message ("out of resource: shared memory, Required: N, Hardware limit: M") and
    # inductor's ("out of resource: <kernel> Required: N Hardware limit:M")
    shared = re.search(r"out of resource: (.+?),? Required: (\d+),? Hardware limit: ?(\d+)", text)
    if shared:
        return f"{where}: triton kernel needs {shared.group(2)} B shared memory > {shared.group(3)}", detail
    if "recompile" in text.lower() and "limit" in text.lower():
        return f"{where}: dynamo recompile limit hit", detail
    root = chain[-1]
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    # A message that opens with an announcement ("An exception occurred in a subprocess:", inductor's compile
    # workers, then their traceback) has its reason on its last line.
    reason = lines[-1] if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{where}: {type(root).__name__}: {reason}"[:110], detail


def raised_at(exc: BaseException, frames: int = 4) -> str:
    """Where the innermost exception of the chain was raised: its last `frames` stack frames, innermost first,
    as `file:line function` with the file cut to its package path (torch/..., mpnet/...): a FAIL cell's message
    alone ("shape '[616, 768]' is invalid ...") does not say which part of the step raised it."""
    stack = traceback.extract_tb(_chain(exc)[-1].__traceback__)[-frames:]
    return " <- ".join(f"{_package_path(frame.filename)}:{frame.lineno} {frame.name}" for frame in reversed(stack))


def _package_path(filename: str) -> str:
    """The file from its innermost package folder on (mpnet/..., torch/..., tests/...), else its name."""
    parts = filename.replace("\\", "/").split("/")
    packages = [i for i, part in enumerate(parts[:-1]) if part in _PACKAGES]
    return "/".join(parts[packages[-1]:]) if packages else parts[-1]


_PACKAGES = {"mpnet", "cli", "mpnet_cli", "tests", "torch", "triton", "transformers"}


# -------------------------------------------------------------------------------------------- runs


class Session:
    """One benchmark run: device, timer, time budget, report, log and (with --resume) the cells of the
    earlier run. `measure` is where every cell of every benchmark goes through."""

    def __init__(self, device: torch.device, report: Report, deadline: Deadline | None = None, log=print,
                 resume: bool = False):
        self.device, self.report, self.log, self.resume = device, report, log, resume
        self.deadline = deadline or Deadline()
        self.timer = Timer(device)
        self.earlier: dict = {}

    def open(self, section: Section):
        """Add the section to the report (and read its earlier cells when resuming)."""
        self.log(f"\n== {section.title} ==")
        self.report.sections.append(section)
        self.earlier[section.key] = self.report.earlier_cells(section) if self.resume else {}
        if self.earlier[section.key]:
            self.log(f"resuming: {len(self.earlier[section.key])} {section.key} cell(s) from {self.report.json_path} "
                     f"({self.report.env.get('resumed_from')})")

    def measure(self, section: Section, cell: dict, measure: Callable[[], dict] | None = None,
                deadline: Deadline | None = None) -> dict:
        """Fill `cell` (it has a `name` for the progress line and a `key` unique in its section): from
        the earlier run when resuming, else SKIP past the deadline, else with measure()'s figures and
        status "ok", or with its failure. A cell that arrives with a status (n/a) is only recorded."""
        if "status" not in cell:
            earlier = self.earlier.get(section.key, {}).get(cell["key"])
            if earlier is not None:
                cell.update(earlier, resumed=True)
            elif (deadline or self.deadline).passed():
                cell["status"] = "SKIP: time budget"
            else:
                self._run(cell, measure)
        section.cells.append(cell)
        self.log(progress_line(cell))
        self.report.write()
        return cell

    def _run(self, cell: dict, measure: Callable[[], dict]):
        started, status = time.perf_counter(), None
        try:
            cell.update(measure())
            cell["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - every failure becomes a table cell
            status, cell["error"] = failure(exc)
            cell["raised_at"] = raised_at(exc)
            cell["failed_after_s"] = time.perf_counter() - started
            del exc
        if status is not None:
            cell["status"] = status
            if status != "OOM":
                torch._dynamo.reset()  # a failed compile leaves no half-built graphs behind
        free_memory(self.device)

    def sweep_lengths(self, section: Section, settings, measure_length: Callable[[int], None]) -> Section:
        """A sweep over settings.lengths (attention, patterns): dynamo's limits raised, the flex kernel
        options of the settings in force, per length a fresh compile cache (no recompile limit, no stale
        graphs), `measure_length(length)`, its memory freed and the plots redrawn."""
        self.open(section)
        configure_dynamo()
        with flex_kernel_options(settings.flex_kernel_options):
            for length in settings.lengths:
                torch._dynamo.reset()
                measure_length(length)
                free_memory(self.device)
                self.report.write(plot=True)  # the plots once per length: they take seconds on a CPU
        self.finish(section)
        return section

    def finish(self, section: Section):
        """Print the section's tables; rewrite the report with the plots."""
        self.report.write(plot=True)
        self.log("\n" + "\n".join(section.table_lines(printed_only=True)))


def run_benchmarks(plan, device: torch.device, out_dir=None, stem: str = "benchmark", time_budget: float | None = None,
                   resume: bool = False, log=print) -> Report:
    """Run a plan of (run, settings) pairs, `run(session, settings, deadline)` each adding its section,
    into ONE report DIR/STEM.{md,json}. Every settings is checked before anything runs. With a time
    budget each benchmark leaves min(60 s, 10% of it) per benchmark still to come."""
    for _, settings in plan:
        settings.device = str(device)
        settings.validate(device)
    env = environment(device)
    report = Report(out_dir, stem, env)
    session = Session(device, report, Deadline(time_budget), log, resume)
    print_header(env, [settings for _, settings in plan], log)
    reserve = min(60.0, 0.1 * time_budget) if time_budget else 0.0
    for index, (run, settings) in enumerate(plan):
        run(session, settings, session.deadline.sooner(reserve * (len(plan) - 1 - index)))
    report.write(plot=True)
    if report.dir is not None:
        log("\nwrote " + ", ".join(str(path) for path in report.files()))
    return report


def kernel_ms_per_call(fn, calls: int = 3) -> dict:
    """{CUDA kernel name: GPU ms per call of fn}, from torch.profiler over `calls` calls."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        micros = getattr(event, "self_device_time_total", None)
        micros = event.self_cuda_time_total if micros is None else micros
        if micros > 0:
            kernels[event.key] = kernels.get(event.key, 0.0) + micros / 1e3 / calls
    return kernels
