"""What every benchmark of mpnet.bench shares: the device, the timer, the time budget, the cells and
their failures, ONE report writer (markdown + json + plots) and ONE progress line.

A benchmark module (attention, step, patterns, packing) holds its measurements only. It plans its
cells (plain dicts, written to the JSON as they are), measures each through `Session.measure`, and
describes its part of the report as a `Section`: its settings, its method and tables (`render`) and
its plots. The harness does the rest: resume, time budget, failure-to-cell, progress, files.

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
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch._dynamo

from ..errors import UserError
from ..training.toolkit import PeakMemory, resolve_device, synchronize, versions, write_json_atomic

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FLUSH_BYTES = 256 << 20  # larger than the H100/H200 L2 (50/60 MB): flushed before every timed run
GiB = 2**30
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


def on_cuda(settings) -> bool:
    return settings.device is not None and settings.device.startswith("cuda")


def timer_text(settings) -> str:
    """How a section's runs were timed, for its method."""
    return "CUDA events, L2 flushed before each" if on_cuda(settings) else "wall clock"


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
    (e.g. that a gradient arrived; it may also reset counters), then the timed runs: first_call_s,
    graphs (compiled while warming up), peak_gib, the time summary and a note if it recompiled."""
    result = {}
    graphs = compiled_graphs()
    result["first_call_s"] = timer.wall(first or run) / 1e3
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


def failure(exc: BaseException) -> tuple[str, str]:
    """(short cell text, longer detail) for an exception: OOM, or FAIL (<phase>): <reason>."""
    chain, cause = [exc], exc
    while (cause.__cause__ or cause.__context__) is not None and len(chain) <= 8:
        cause = cause.__cause__ or cause.__context__
        chain.append(cause)
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
    first = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
    return f"{where}: {type(root).__name__}: {first}"[:110], detail


def ok(cell: dict) -> bool:
    return cell.get("status") == "ok"


# ------------------------------------------------------------------------------------ environment


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / GiB:.0f} GiB, {props.multi_processor_count} SMs)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment(device: torch.device) -> dict:
    """Date, device, versions and the command line: printed first and written into every report."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device_description(device)}
    info.update({k: v for k, v in versions().items() if k != "device_name"})
    try:
        info["triton"] = __import__("triton").__version__
    except ImportError:
        info["triton"] = "not installed"
    info["command"] = " ".join(["benchmark-mpnet"] + sys.argv[1:])
    settings = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MPNET_"))
    if settings:  # the project's switches (e.g. MPNET_EAGER_BLOCK_MASK) change what is measured
        info["environment variables"] = " ".join(settings)
    return info


ENVIRONMENT_KEYS = ("date", "device", "mpnet", "torch", "cuda", "triton", "transformers", "python", "command",
                    "environment variables", "resumed_from")


def print_header(env: dict, settings_list, log=print):
    """The environment, then every settings dataclass of the run, field by field."""
    log("benchmark-mpnet")
    for key in ENVIRONMENT_KEYS:
        if key in env:
            log(f"  {key:<12} {env[key]}")
    for settings in settings_list:
        log(f"  {type(settings).__name__}:")
        for key, value in dataclasses.asdict(settings).items():
            log(f"    {key:<18} {value}")
    sys.stdout.flush()


# ------------------------------------------------------------------------------ progress and tables


def tflops_text(value) -> str:
    """TFLOP/s with a precision that stays readable from CPU (0.004) to GPU (512.3) figures."""
    if value is None:
        return ""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def fmt(value, spec=".2f", missing="—") -> str:
    return missing if value is None else format(value, spec)


def ratio_text(value) -> str:
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"  # CPU smoke runs give ratios like 0.004x


def tiles_text(tiles) -> str:
    computed, total = tiles
    return f"{computed}/{total} ({computed / total:.3f})"


# What the progress line shows of an ok cell, in this order, each where the cell has it.
PROGRESS_FIELDS = (
    ("ms", lambda v: f"{v:9.3f} ms"),
    ("tflops", lambda v: f"{tflops_text(v):>7} TFLOP/s"),
    ("examples_per_s", lambda v: f"{v:9.1f} ex/s"),
    ("tokens_per_s", lambda v: f"{v:10.0f} tokens/s"),
    ("padding_share", lambda v: f"padding {100 * v:4.1f}%"),
    ("loss", lambda v: f"loss {v:.3f}"),
    ("peak_gib", lambda v: f"peak {v:6.2f} GiB"),
    ("first_call_s", lambda v: f"first call {v:.1f} s"),
    ("tiles", lambda v: f"tiles {tiles_text(v)}"),
    ("relative", lambda v: f"{ratio_text(v[0])} {v[1]}"),
)


def progress_line(cell: dict) -> str:
    """One line per cell, for every benchmark: its name, then its status or its figures."""
    if not ok(cell):
        text = f"{cell['name']} {cell['status']}"
    else:
        parts = [show(cell[key]) for key, show in PROGRESS_FIELDS if cell.get(key) is not None]
        if "mask_ms" in cell:
            parts.append(f"mask {cell['mask_ms']:.2f} ms (first {cell['mask_first_s']:.1f} s)")
        text = " ".join([cell["name"]] + parts)
    if cell.get("resumed"):
        text += "  [from the earlier run]"
    if cell.get("note"):
        text += f"  [{cell['note']}]"
    return text


def time_text(cell: dict, spec=".3f") -> str:
    """Table text of a cell's time: median [p20, p80], or its status."""
    if not ok(cell):
        return cell["status"]
    return f"{cell['ms']:{spec}} [{cell['p20_ms']:{spec}}, {cell['p80_ms']:{spec}}]"


CELL_HEADERS = ["time ms median [p20, p80]", "TFLOP/s", "tiles computed/total (share)", "eff. TFLOP/s", "peak GiB",
                "mask build ms (first s)", "first call s"]


def cell_columns(cell: dict) -> list:
    """The columns of CELL_HEADERS for one attention cell (blank where it has no such figure)."""
    if not ok(cell):
        return [cell["status"]] + [""] * (len(CELL_HEADERS) - 1)
    return [time_text(cell), tflops_text(cell.get("tflops")), tiles_text(cell["tiles"]) if "tiles" in cell else "",
            tflops_text(cell.get("eff_tflops")), fmt(cell.get("peak_gib"), ".2f", "n/a"),
            f"{cell['mask_ms']:.2f} ({cell['mask_first_s']:.1f} s)" if "mask_ms" in cell else "",
            fmt(cell.get("first_call_s"), ".1f")]


def short_status(cell: dict) -> str:
    """Table text of a cell that did not run: OOM, FAIL, SKIP, n/a."""
    return cell["status"].split(":")[0]


def github_table(rows, headers) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def failure_notes(cells) -> list:
    notes = [f"- {cell['name'].strip()}: {cell['status']}"
             + (f" (after {cell['failed_after_s']:.0f} s)" if cell.get("failed_after_s") else "")
             + f"\n  `{cell['error']}`" for cell in cells if cell.get("error")]
    return ["Failures (full messages):", ""] + notes + [""] if notes else []


# ---------------------------------------------------------------------------------- report sections


@dataclass
class Section:
    """One benchmark's part of a report: its settings, its cells, how it renders and plots."""

    key: str  # its JSON key: attention, single, step, finetune, patterns, packing
    title: str  # its heading in the markdown report
    settings: object  # a dataclass
    render: Callable[["Section"], list]  # markdown lines: method and tables
    plot: Callable[["Section", Path], list] | None = None  # writes its plots into a folder, returns file names
    cells: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # more JSON beside settings and cells (e.g. the inputs)
    plots: list = field(default_factory=list)
    plotted: int = 0  # cells when last plotted
    tables: Callable[["Section"], list] | None = None  # what is printed at the end (default: render's tables)

    def to_json(self) -> dict:
        return {"settings": dataclasses.asdict(self.settings), **self.extra, "cells": self.cells}


def settings_lines(settings) -> list:
    return ["Settings:", ""] + [f"- `{k}`: {v}" for k, v in dataclasses.asdict(settings).items()] + [""]


class Report:
    """DIR/STEM.md and DIR/STEM.json (and the sections' plots), rewritten after every cell, so a run
    that is cut short (or killed) keeps what it measured and --resume can go on from there."""

    def __init__(self, out_dir, stem: str, env: dict):
        self.dir = Path(out_dir) if out_dir else None
        self.stem, self.env, self.sections = stem, env, []
        if self.dir is not None:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UserError(f"cannot create --output-dir {self.dir}: {err.strerror}") from None

    @property
    def json_path(self) -> Path | None:
        return None if self.dir is None else self.dir / f"{self.stem}.json"

    def earlier_cells(self, section: Section) -> dict:
        """--resume: the section's cells of DIR/STEM.json, by key, if that run had the same settings
        (SKIP cells left out: they are measured now)."""
        if self.dir is None:
            raise UserError("--resume needs --output-dir (the run to resume is DIR/" + f"{self.stem}.json)")
        if not self.json_path.is_file():
            return {}
        data = json.loads(self.json_path.read_text())
        earlier = data.get(section.key)
        if earlier is None:
            return {}
        ours = json.loads(json.dumps(dataclasses.asdict(section.settings), default=str))
        theirs = earlier.get("settings", {})
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if differ:
            raise UserError(f"--resume: {self.json_path} has {section.key} cells measured with other settings "
                            f"(they differ in {', '.join(differ)}); give the same options or another --output-dir")
        self.env["resumed_from"] = data.get("environment", {}).get("date")
        return {cell["key"]: cell for cell in earlier.get("cells", []) if not cell["status"].startswith("SKIP")}

    def write(self, plot: bool = False):
        if self.dir is None:
            return
        if plot:  # only what changed since its last plot: plotting takes seconds on a CPU
            for section in self.sections:
                if section.plot is not None and section.cells and section.plotted != len(section.cells):
                    section.plots, section.plotted = section.plot(section, self.dir), len(section.cells)
        data = {"environment": self.env, **{s.key: s.to_json() for s in self.sections}}
        write_json_atomic(self.json_path, data)
        tmp = self.dir / f"{self.stem}.md.tmp"
        tmp.write_text(self.markdown())
        os.replace(tmp, self.dir / f"{self.stem}.md")

    def markdown(self) -> str:
        title = "benchmark-mpnet" + ("" if self.stem == "benchmark" else f" {self.stem}")
        out = [f"# {title}: {self.env['date']}", "", "| | |", "|---|---|"]
        out += [f"| {key} | `{self.env[key]}` |" for key in ENVIRONMENT_KEYS if key in self.env]
        for section in self.sections:
            out += ["", f"## {section.title}", ""] + settings_lines(section.settings)
            out += section.render(section) + failure_notes(section.cells)
            out += [line for name in section.plots for line in (f"![{name}]({name})", "")]
        return "\n".join(out) + "\n"

    def files(self) -> list:
        if self.dir is None:
            return []
        return [self.dir / f"{self.stem}.md", self.json_path] + [self.dir / p for s in self.sections for p in s.plots]


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
            cell["failed_after_s"] = time.perf_counter() - started
            del exc
        if status is not None:
            cell["status"] = status
            if status != "OOM":
                torch._dynamo.reset()  # a failed compile leaves no half-built graphs behind
        free_memory(self.device)

    def finish(self, section: Section):
        """Print the section's tables; rewrite the report with the plots."""
        self.report.write(plot=True)
        tables = (section.tables or section.render)(section)
        self.log("\n" + "\n".join(tables))


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
