"""Attention patterns against PyTorch SDPA: the library behind `benchmark-mpnet patterns`.

For each pattern of mpnet/modeling/patterns.py and each sequence length, three columns:

- `flex`: the project's `FlexTwoStreamAttention` in SINGLE-STREAM mode (m = 0, natural order: the
  encoder path of fine-tuning and inference), called through the real module with identity
  projections (as mpnet/benchmark.py does), with the learnable relative-position bias and its gradient
  (`--no-relative-bias`: without it, like for like with SDPA). The BlockMask is built outside the timed
  region; its build is timed apart. Block density = the share of 128x128 tiles the kernel computes.
- `sdpa-mask`: `F.scaled_dot_product_attention` with the pattern's mask materialised as a (B, 1, L, L)
  boolean tensor (what a user without FlexAttention would do), evaluated from the SAME rule functions
  the flex mask_mod calls. ALiBi becomes a float bias (1 or B, H, L, L); soft-capping cannot be
  expressed through SDPA's additive mask, so that cell is n/a.
- `sdpa`: SDPA without mask or bias, once per length: the ceiling.

Times, FLOPs and memory follow mpnet/benchmark.py (its Timer, failure handling and report style are
imported, not copied). Attention FLOPs: 4 x B x H x L^2 x D forward, x3.5 forward + backward; every
column is credited with the same dense FLOPs, flex also with "effective" FLOPs x block density.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch._dynamo
import torch.nn.functional as F

from .benchmark import (
    DTYPES,
    Deadline,
    Timer,
    _compiled_graphs,
    _failure_notes,
    _free,
    _fmt,
    _quantile,
    _settings_lines,
    _strip_projections,
    _tflops,
    attention_flops,
    block_density,
    check_table_gradient,
    configure_dynamo,
    environment,
    flex_kernel_options,
    print_header,
    resolve_device,
    run_cell,
    time_runs,
)
from .errors import UserError
from .modeling.config import MPNetConfig
from .modeling.attention import (
    FlexAttentionState,
    FlexTwoStreamAttention,
    make_flex_attention_mask,
    make_flex_attention_state,
)
from .modeling.masks import is_real_token, relative_bias_by_distance
from .modeling.packing import positions_within_documents
from .modeling.patterns import AttentionPattern, BadAttentionPattern, parse_attention_pattern

# `prefix` without a length means prefix:L/4; `documents:K` packs K documents into every row.
DEFAULT_PATTERNS = "none,window:256,dilated:128:2,global:256,block:256,swin:256,prefix,documents:4,softcap:30,alibi"
QUICK_PATTERNS = "none,window:16,dilated:8:2,global:16,block:32,swin:32,prefix,documents:4,softcap:30,alibi"
COLUMNS = ("flex", "sdpa-mask", "sdpa")
COLUMN_LABELS = {"flex": "flex", "sdpa-mask": "SDPA + dense mask", "sdpa": "SDPA, no mask (ceiling)"}
# Score mods that are a bias added to the score, independent of it: SDPA takes them as a float attn_mask.
ADDITIVE_SCORE_MODS = {"alibi"}


# ------------------------------------------------------------------------------------------ settings


@dataclass
class PatternSettings:
    lengths: list = field(default_factory=lambda: [1024, 4096])
    tokens_per_batch: int = 16384
    heads: int = 12
    head_dim: int = 64
    patterns: list = field(default_factory=lambda: DEFAULT_PATTERNS.split(","))
    relative_bias: bool = True  # flex with MPNet's learnable relative bias (and its gradient)
    dtype: str = "bf16"
    device: str = "cuda"
    backward: bool = True  # forward + backward (GPU); forward only on CPU
    warmup: int = 3
    repeats: int = 20
    max_seconds: float = 3.0
    num_buckets: int = 32
    max_distance: int = 128
    seed: int = 0
    flex_kernel_options: dict | None = None

    def validate(self):
        if not self.lengths:
            raise UserError("--lengths is empty; give sequence lengths like 1024,4096")
        for length in self.lengths:
            if length < 8:
                raise UserError(f"sequence length {length} is too short; use lengths >= 8")
            if self.tokens_per_batch < length:
                raise UserError(f"--tokens-per-batch {self.tokens_per_batch} is smaller than length {length}: "
                                "the batch would be empty; raise --tokens-per-batch or shorten --lengths")
        if not self.patterns:
            raise UserError("--patterns is empty; e.g. --patterns none,window:256,block:256")
        if len(set(self.patterns)) != len(self.patterns):
            raise UserError(f"--patterns names a pattern twice: {','.join(self.patterns)}")
        for text in self.patterns:  # every entry at every length, so a bad one stops before any compile
            for length in self.lengths:
                resolve_pattern(text, length)
        if self.heads <= 0 or self.head_dim <= 0:
            raise UserError("--heads and --head-dim must be positive")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}")
        if self.warmup < 1 or self.repeats < 1:
            raise UserError("--warmup and --repeats must be >= 1 (the first warm-up run compiles)")


# ------------------------------------------------------------------------------------------ patterns


@dataclass(frozen=True)
class PatternCase:
    """One --patterns entry resolved at one length."""

    name: str  # as given: "prefix", "documents:4", "block:64+softcap:30"
    spec: str  # what patterns.py parses at this length ("prefix:256"); "" for none / documents alone
    pattern: AttentionPattern
    documents: int  # documents packed per row; 0 = one sequence per row
    layer: int  # layer parity timed: 1 (the shifted blocks) for swin, whose parity 0 is plain block:B
    sdpa_na: str | None  # why SDPA cannot express it, else None
    label: str  # for tables: the name, with what a length-dependent part means here ("prefix (prefix:256)")

    @property
    def has_mask(self) -> bool:
        return bool(self.pattern.masks) or self.documents > 0


def _entry_error(text, problem):
    return UserError(f"--patterns entry '{text}': {problem}. Entries are joined by commas; besides the patterns "
                     "of patterns.py an entry may be none, prefix (P = L/4) or documents[:K] (K documents per "
                     "row, default 4), and parts of one entry are joined by '+' (block:64+softcap:30)")


def resolve_pattern(text: str, length: int) -> PatternCase:
    """'prefix' -> prefix:L/4, 'documents:K' -> K documents per row, 'a+b' -> the spec 'a,b'."""
    specs, documents, sdpa_na, rewritten = [], 0, None, False
    for part in filter(None, (p.strip() for p in text.split("+"))):
        name, *args = part.split(":")
        name = name.strip().lower()
        if name == "none" and not args:
            continue
        if name in ("documents", "docs"):
            try:
                documents = int(args[0]) if args else 4
            except ValueError:
                raise _entry_error(text, f"'{part}' needs an integer number of documents") from None
            if len(args) > 1 or not 1 <= documents <= length:
                raise _entry_error(text, f"'{part}' needs one number of documents between 1 and L = {length}")
            continue
        if name == "prefix" and not args:
            part, rewritten = f"prefix:{length // 4}", True
        try:
            piece = parse_attention_pattern(part)
        except BadAttentionPattern as err:
            raise _entry_error(text, str(err)) from None
        if piece.scores and name not in ADDITIVE_SCORE_MODS:
            sdpa_na = (f"n/a: SDPA cannot apply {name} (its attn_mask is added to the scores; "
                       f"{name} transforms them)")
        specs.append(part)
    if not text.strip():
        raise _entry_error(text, "empty entry")
    spec = ",".join(specs)
    pattern = parse_attention_pattern(spec)
    layer = 1 if pattern.alternates else 0
    label = text.strip() + (f" ({spec})" if rewritten else "") + (" (odd layers)" if layer else "")
    return PatternCase(text.strip(), spec, pattern, documents, layer, sdpa_na, label)


def document_ids_for(batch, length, documents, generator) -> torch.Tensor:
    """(B, L) ids of `documents` consecutive documents per row, cut at random points (as a packer would
    fill a row with documents of varying lengths), every document at least one token long."""
    rows = []
    for _ in range(batch):
        cuts = torch.sort(torch.randperm(length - 1, generator=generator)[:documents - 1] + 1).values
        starts = torch.zeros(length, dtype=torch.long)
        starts[cuts] = 1
        rows.append(starts.cumsum(0))
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------- inputs


@dataclass
class _Problem:
    length: int
    batch: int
    hidden: torch.Tensor  # (B, L, H*D): q = k = v after the identity projections
    grad_out: torch.Tensor
    table: torch.Tensor  # (buckets, heads) relative-bias table, requires grad
    generator_seed: int


def make_problem(settings: PatternSettings, length: int, device) -> _Problem:
    gen = torch.Generator().manual_seed(settings.seed + length)
    batch = settings.tokens_per_batch // length
    dtype = DTYPES[settings.dtype]
    size = settings.heads * settings.head_dim
    hidden = torch.randn(batch, length, size, generator=gen).to(device, dtype).requires_grad_(settings.backward)
    grad_out = torch.randn(batch, length, size, generator=gen).to(device, dtype)
    table = (torch.randn(settings.num_buckets, settings.heads, generator=gen) * 0.02).to(device).requires_grad_(True)
    return _Problem(length, batch, hidden, grad_out, table, settings.seed + length)


def case_inputs(problem: _Problem, case: PatternCase, device):
    """(positions, document_ids) of the case: 0..L-1 in every row, or restarting at every document
    (as `MPNetForSequenceClassification.encode` numbers packed rows); no padding."""
    b, length = problem.batch, problem.length
    if not case.documents:
        return torch.arange(length, device=device).expand(b, length).contiguous(), None
    gen = torch.Generator().manual_seed(problem.generator_seed)  # the same documents for every entry
    document_ids = document_ids_for(b, length, case.documents, gen).to(device)
    real = torch.ones(b, length, dtype=torch.bool, device=device)
    return positions_within_documents(real, document_ids), document_ids


def sdpa_mask(case: PatternCase, positions, document_ids, heads: int, dtype):
    """The attn_mask an SDPA user would pass: the pattern's rules evaluated on the (query, key) grid of
    original positions, as the dense backend materialises them (m = 0: no two-stream rule), as a
    (B, 1, L, L) boolean; with an additive score mod (ALiBi) a float (1 or B, H, L, L) bias instead,
    -inf where the mask hides. None when there is nothing to apply."""
    if case.sdpa_na:
        raise ValueError(f"{case.name}: {case.sdpa_na}")
    q_pos, kv_pos = positions[:, :, None], positions[:, None, :]
    allowed = None
    if case.has_mask:
        q_doc = kv_doc = None
        if document_ids is not None:
            q_doc, kv_doc = document_ids[:, :, None], document_ids[:, None, :]
        allowed = (is_real_token(kv_pos) & case.pattern.visible(q_pos, kv_pos, case.layer, q_doc, kv_doc))[:, None]
    if not case.pattern.scores:
        return allowed
    # One bias for the whole batch when every row has the same positions (no documents): (1, H, L, L).
    rows = positions[:1] if bool((positions == positions[:1]).all()) else positions
    head = torch.arange(heads, device=positions.device)[None, :, None, None]
    zero = torch.zeros((), device=positions.device)
    bias = case.pattern.modify_score(zero, head, rows[:, None, :, None], rows[:, None, None, :], heads)
    if allowed is not None:
        bias = bias.masked_fill(~allowed, float("-inf"))
    return bias.to(dtype)


def _sdpa_core(hidden, heads, attn_mask):
    """The same head split and merge as the module with identity projections, through SDPA."""
    b, length, _ = hidden.shape
    x = hidden.view(b, length, heads, -1).transpose(1, 2)
    context = F.scaled_dot_product_attention(x, x, x, attn_mask=attn_mask)
    return context.transpose(1, 2).reshape(b, length, -1)


def _flex_state(settings, case, positions, document_ids, distance_bias):
    """The module's state for single-stream encoding: the project's own state (bias as a score_mod) or,
    with --no-relative-bias, its BlockMask and only the pattern's score mods."""
    length = positions.shape[1]
    if settings.relative_bias:
        return make_flex_attention_state(positions, length, 0, distance_bias, settings.max_distance,
                                         pattern=case.pattern, document_ids=document_ids, layer=case.layer)
    mask, _ = make_flex_attention_mask(positions, length, 0, pattern=case.pattern, document_ids=document_ids,
                                       layer=case.layer)

    def pattern_scores(score, b, h, q_idx, kv_idx):
        return case.pattern.modify_score(score, h, positions[b, q_idx], positions[b, kv_idx], settings.heads)

    return FlexAttentionState(mask, None, pattern_scores if case.pattern.scores else None, None, length)


def build_cell(settings: PatternSettings, problem: _Problem, case: PatternCase | None, column: str, device,
               timer: Timer) -> tuple[Callable, Callable | None, dict]:
    """(forward, after_backward, facts) of one cell, its mask built (and the build timed) here, outside
    the timed region. forward() returns the attention output; after_backward() finishes the chain rule
    where the cell's leaf is not the table. case is None for the ceiling."""
    p = problem
    facts = {}
    if column == "sdpa":
        return (lambda: _sdpa_core(p.hidden, settings.heads, None)), None, facts
    positions, document_ids = case_inputs(p, case, device)
    if column == "sdpa-mask":
        start = time.perf_counter()
        mask = sdpa_mask(case, positions, document_ids, settings.heads, DTYPES[settings.dtype])
        timer.sync()
        facts["mask_first_s"] = time.perf_counter() - start
        if mask is not None:
            facts["attn_mask"] = f"{tuple(mask.shape)} {str(mask.dtype).replace('torch.', '')}"
            facts["mask_ms"] = _quantile(timer.measure(
                lambda: sdpa_mask(case, positions, document_ids, settings.heads, DTYPES[settings.dtype]),
                min(5, settings.repeats), min(2.0, settings.max_seconds)), 0.5)
        return (lambda: _sdpa_core(p.hidden, settings.heads, mask)), None, facts

    config = MPNetConfig(hidden_size=settings.heads * settings.head_dim, num_attention_heads=settings.heads,
                         num_hidden_layers=1, relative_attention_num_buckets=settings.num_buckets,
                         relative_attention_max_distance=settings.max_distance)
    module = _strip_projections(FlexTwoStreamAttention(config).to(device))
    # The bias the state captures is a leaf of its own (as in benchmark.py): its gradient is carried
    # on to the table after each backward, as autograd would in the model.
    with torch.no_grad():
        distance_bias = relative_bias_by_distance(p.table, settings.max_distance, settings.num_buckets)
    distance_bias.requires_grad_(settings.backward and settings.relative_bias)
    graphs = _compiled_graphs()
    start = time.perf_counter()
    try:
        state = _flex_state(settings, case, positions, document_ids, distance_bias)
    except Exception as exc:
        exc.benchmark_phase = "BlockMask build"
        raise
    timer.sync()
    facts["mask_first_s"] = time.perf_counter() - start
    facts["density"] = block_density(state.content_mask)
    facts["mask_ms"] = _quantile(timer.measure(
        lambda: make_flex_attention_mask(positions, p.length, 0, pattern=case.pattern, document_ids=document_ids,
                                         layer=case.layer),
        min(5, settings.repeats), min(2.0, settings.max_seconds)), 0.5)
    facts["mask_graphs"] = _compiled_graphs() - graphs

    def after_backward():
        if distance_bias.grad is not None:
            relative_bias_by_distance(p.table, settings.max_distance, settings.num_buckets).backward(distance_bias.grad)
            distance_bias.grad = None

    return (lambda: module(p.hidden, state)), after_backward, facts


def _measure_cell(settings, problem, case, column, device, timer) -> dict:
    """Build, warm up (the first run compiles), time. Raises on OOM / failure, with the phase."""
    p = problem
    phase = ["build"]
    try:
        forward, after_backward, result = build_cell(settings, problem, case, column, device, timer)
    except Exception as exc:
        exc.benchmark_phase = getattr(exc, "benchmark_phase", None) or "mask build"
        raise
    if settings.backward:
        def run():
            p.hidden.grad = p.table.grad = None
            phase[0] = "forward"
            out = forward()
            phase[0] = "backward"
            out.backward(p.grad_out)
            if after_backward is not None:
                after_backward()
            phase[0] = "timing"
    else:
        def run():
            phase[0] = "forward"
            with torch.no_grad():
                forward()
            phase[0] = "timing"
    try:
        bias_learns = settings.backward and column == "flex" and settings.relative_bias
        result.update(time_runs(timer, run, settings, (lambda: check_table_gradient(p.table)) if bias_learns else None))
    except Exception as exc:
        exc.benchmark_phase = phase[0]
        raise
    return result


# -------------------------------------------------------------------------------------------- sweep


def _cell_key(cell) -> tuple:
    return cell["L"], cell["pattern"], cell["column"]


def run_patterns(settings: PatternSettings, on_update: Callable | None = None, deadline: Deadline | None = None,
                 log=print, done: dict | None = None) -> list:
    """All cells (dicts): per length the ceiling, then flex and sdpa-mask per pattern. `done` maps
    (L, pattern, column) to cells of an earlier run (--resume): those are kept, not measured again."""
    settings.validate()
    device = resolve_device(settings.device)
    deadline = deadline or Deadline()
    done = done or {}
    configure_dynamo()
    timer = Timer(device)
    cells = []
    with flex_kernel_options(settings.flex_kernel_options):
        for length in settings.lengths:
            torch._dynamo.reset()  # a fresh compile cache per length: no recompile limit, no stale graphs
            problem = make_problem(settings, length, device)
            flops = attention_flops(problem.batch, settings.heads, settings.head_dim, length, length, settings.backward)
            plan = [(None, "sdpa")] + [(resolve_pattern(t, length), c) for t in settings.patterns
                                       for c in ("flex", "sdpa-mask")]
            for case, column in plan:
                cell = {"L": length, "B": problem.batch, "pattern": case.name if case else None,
                        "label": case.label if case else "(none)", "spec": case.spec if case else "",
                        "documents": case.documents if case else 0, "layer": case.layer if case else 0,
                        "column": column, "flops": flops}
                if _cell_key(cell) in done:
                    cell = dict(done[_cell_key(cell)], resumed=True)
                else:
                    _run_cell(settings, problem, case, column, device, timer, deadline, cell)
                log(_progress_line(cell))
                cells.append(cell)
                if on_update:
                    on_update(cells)
            del problem
            _free(device)
    return cells


def _run_cell(settings, problem, case, column, device, timer, deadline, cell):
    if column == "sdpa-mask" and case.sdpa_na:
        cell["status"] = case.sdpa_na
        return
    if column == "sdpa-mask" and not case.has_mask and not case.pattern.scores:
        cell["status"] = "n/a: nothing to mask (the SDPA ceiling is this cell)"
        return
    if deadline.passed():
        cell["status"] = "SKIP: time budget"
        return
    run_cell(cell, lambda: _measure_cell(settings, problem, case, column, device, timer), device)
    if cell["status"] == "ok":
        seconds = cell["ms"] / 1e3
        cell["tflops"] = cell["flops"] / seconds / 1e12
        if "density" in cell:
            cell["eff_tflops"] = cell["flops"] * cell["density"] / seconds / 1e12


def _progress_line(cell) -> str:
    head = f"L={cell['L']:>5} B={cell['B']:>3} {cell['label']:<28} {cell['column']:<9}"
    if cell["status"] != "ok":
        return f"{head} {cell['status']}"
    text = f"{head} {cell['ms']:9.3f} ms  {_tflops(cell['tflops']):>7} TFLOP/s"
    if cell.get("peak_gib") is not None:
        text += f"  peak {cell['peak_gib']:6.2f} GiB"
    text += f"  first call {cell['first_call_s']:.1f} s"
    if "density" in cell:
        text += f"  density {cell['density']:.3f}"
    if "mask_ms" in cell:
        text += f"  mask {cell['mask_ms']:.2f} ms (first {cell['mask_first_s']:.1f} s)"
    if cell.get("resumed"):
        text += "  [from the earlier run]"
    if cell.get("note"):
        text += f"  [{cell['note']}]"
    return text


# ------------------------------------------------------------------------------------------ reports


def _short(status) -> str:
    """Table text of a cell that did not run: OOM, FAIL, SKIP, n/a."""
    return status.split(":")[0]


def _ratio(ms, numerator, denominator) -> str:
    if numerator not in ms or denominator not in ms:
        return ""
    x = ms[numerator] / ms[denominator]
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.2g}x"  # CPU smoke runs give ratios like 0.004x


def summary_table(cells):
    """One row per (L, pattern), as attention-gym's tables: times of the three columns and the ratios."""
    ceiling = {c["L"]: c for c in cells if c["column"] == "sdpa"}
    rows, by = [], {}
    for c in cells:
        if c["column"] != "sdpa":
            by.setdefault((c["L"], c["pattern"]), {})[c["column"]] = c
    for (length, _), pair in by.items():
        flex, masked, top = pair.get("flex"), pair.get("sdpa-mask"), ceiling.get(length)
        ms = {k: c["ms"] for k, c in (("flex", flex), ("sdpa-mask", masked), ("sdpa", top))
              if c is not None and c["status"] == "ok"}

        def text(c):
            return "" if c is None else (f"{c['ms']:.3f}" if c["status"] == "ok" else _short(c["status"]))

        any_cell = flex or masked
        rows.append([length, any_cell["B"], any_cell["label"],
                     _fmt(flex.get("density") if flex else None, ".3f", ""),
                     text(flex), _tflops(flex.get("eff_tflops")) if "flex" in ms else "",
                     text(masked), text(top),
                     _ratio(ms, "sdpa-mask", "flex"), _ratio(ms, "flex", "sdpa")])
    headers = ["L", "B", "pattern", "block density", "flex ms", "flex eff. TFLOP/s", "SDPA + mask ms",
               "SDPA ceiling ms", "flex speed-up over SDPA + mask", "flex time / ceiling"]
    return rows, headers


def detail_table(cells):
    rows = []
    for c in cells:
        ok = c["status"] == "ok"
        rows.append([
            c["L"], c["B"], c["label"] if c["pattern"] is not None else "(none)", COLUMN_LABELS[c["column"]],
            f"{c['ms']:.3f} [{c['p20_ms']:.3f}, {c['p80_ms']:.3f}]" if ok else
            ("n/a (below)" if c["status"].startswith("n/a") else c["status"]),
            _tflops(c.get("tflops")) if ok else "",
            _fmt(c.get("density"), ".3f", "") if ok else "",
            _tflops(c.get("eff_tflops")) if ok else "",
            _fmt(c.get("peak_gib"), ".2f", "n/a") if ok else "",
            (f"{c['mask_ms']:.2f} ({c['mask_first_s']:.1f} s)" if "mask_ms" in c else "") if ok else "",
            c.get("attn_mask", "") if ok else "",
            _fmt(c.get("first_call_s"), ".1f") if ok else "",
        ])
    headers = ["L", "B", "pattern", "column", "time ms median [p20, p80]", "TFLOP/s", "block density",
               "eff. TFLOP/s", "peak GiB", "mask build ms (first s)", "SDPA attn_mask", "first call s"]
    return rows, headers


PATTERN_METHOD = """\
- Single-stream attention (m = 0, tokens in natural order: the encoder path of fine-tuning and
  inference), B = tokens_per_batch // L rows of L tokens, no padding; q = k = v = the (B, L, H*D)
  input in {dtype} (the modules' q/k/v/o Linear layers replaced by identities, as in
  `benchmark-mpnet attention`). {what}.
- flex: `FlexTwoStreamAttention` ({compiled}, the project's mask_mod and score_mod)
  {bias}.
  The BlockMask is built once, outside the timed region; its build is timed apart (warm median, and
  the first build, which compiles). block density = share of 128x128 tiles it lets the kernel
  compute; eff. TFLOP/s = FLOPs x density / time.
- SDPA + mask: `torch.nn.functional.scaled_dot_product_attention` (PyTorch picks the kernel) with the
  pattern's mask materialised from the same rule functions as a (B, 1, L, L) boolean attn_mask, built
  outside the timed region (build timed apart); ALiBi as a float (1 or B, H, L, L) attn_mask (-inf
  where a mask also hides); soft-capping is n/a (SDPA only adds its attn_mask to the scores); `none`
  has nothing to mask (n/a: the ceiling is that case). SDPA applies no relative-position bias.
- SDPA ceiling: SDPA without mask or bias, once per length.
- Patterns: `prefix` = prefix:L/4; `documents:K` = K documents per row cut at random points (the same
  for every pattern and column), positions restarting at each document as `encode` numbers packed
  rows; swin is timed on its odd-layer (shifted-block) parity, its even layers being block:B.
- Time: median [p20, p80] of up to {repeats} runs ({timer}) after {warmup} warm-up runs; "first call"
  = the first run's wall time (compilation included). TFLOP/s: 4 x B x H x L^2 x D for the forward,
  x3.5 for forward + backward, the same dense FLOPs for every column. peak GiB =
  torch.cuda.max_memory_allocated() over one run (inputs, masks and state included). OOM =
  torch.cuda.OutOfMemoryError; FAIL = an error (compilation included); SKIP = not started within
  --time-budget.
- Dynamo: recompile limits raised to 64, a hit is a FAIL (no silent eager fallback), and
  torch._dynamo.reset() between lengths."""


def render_markdown(env, settings: PatternSettings, cells, plots=()) -> str:
    from tabulate import tabulate

    mode = "forward + backward" if settings.backward else "FORWARD ONLY (CPU: FlexAttention has no backward there)"
    out = [f"# benchmark-mpnet patterns: {env['date']}", "", "| | |", "|---|---|"]
    for key in ("device", "torch", "cuda", "triton", "python", "command", "resumed_from"):
        if key in env:
            out.append(f"| {key} | `{env.get(key)}` |")
    out += ["", f"## Attention patterns: flex against SDPA, {mode}, {settings.dtype}", "", "Settings:", ""]
    out += _settings_lines(settings)
    cuda = settings.device.startswith("cuda")
    out += ["", "Method:", "", PATTERN_METHOD.format(
        dtype=settings.dtype, what="Timed: forward + backward" if settings.backward else "Timed: forward only",
        bias=("with MPNet's learnable relative-position bias as a score_mod" +
              (" and its gradient (into the table, checked after warm-up)" if settings.backward else ""))
        if settings.relative_bias else "WITHOUT the relative-position bias (--no-relative-bias): like for like",
        repeats=settings.repeats, warmup=settings.warmup,
        compiled="compiled `flex_attention`" if cuda else "eager `flex_attention` on CPU, as the project runs it there",
        timer="CUDA events, L2 flushed before each" if cuda else "wall clock"), ""]
    if settings.flex_kernel_options:
        out += [f"**flex kernel_options overridden by the benchmark**: `{json.dumps(settings.flex_kernel_options)}`", ""]
    summary, sh = summary_table(cells)
    detail, dh = detail_table(cells)
    out += ["### Summary (lower ms is faster; speed-up = SDPA + mask time / flex time)", "",
            tabulate(summary, sh, tablefmt="github", disable_numparse=True), ""]
    out += ["### Every cell", "", tabulate(detail, dh, tablefmt="github", disable_numparse=True), ""]
    notes = sorted({(c["label"], c["status"]) for c in cells if c["status"].startswith("n/a")})
    if notes:
        out += ["n/a cells:", ""] + [f"- {label}: {status[len('n/a: '):]}" for label, status in notes] + [""]
    out += _failure_notes(cells, lambda c: f"L={c['L']} {c['label']} {c['column']}")
    for name in plots:
        out += [f"![{name}]({name})", ""]
    return "\n".join(out) + "\n"


def plot_patterns(cells, settings: PatternSettings, out_dir: Path) -> list:
    """patterns_time.png: one panel per length, a bar pair per pattern (flex, SDPA + mask) and the
    SDPA ceiling as a dashed line; a cell without a time is labelled (n/a, OOM, FAIL, SKIP)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [length for length in settings.lengths if any(c["L"] == length for c in cells)]
    if not lengths:
        return []
    fig, axes = plt.subplots(1, len(lengths), figsize=(1.0 + 0.75 * len(settings.patterns) * len(lengths), 4.6),
                             dpi=110, squeeze=False)
    colors = {"flex": "tab:blue", "sdpa-mask": "tab:orange"}
    for ax, length in zip(axes[0], lengths):
        here = [c for c in cells if c["L"] == length]
        labels = list(dict.fromkeys(c["label"] for c in here if c["column"] != "sdpa"))
        times = [c["ms"] for c in here if c["status"] == "ok"]
        floor = min(times) / 3 if times else 1.0
        for offset, column in ((-0.2, "flex"), (0.2, "sdpa-mask")):
            for i, label in enumerate(labels):
                cell = next((c for c in here if c["label"] == label and c["column"] == column), None)
                if cell is None:
                    continue
                if cell["status"] == "ok":
                    ax.bar(i + offset, cell["ms"], width=0.4, color=colors[column], label=COLUMN_LABELS[column])
                else:
                    ax.text(i + offset, floor * 1.1, _short(cell["status"]), rotation=90, ha="center",
                            va="bottom", fontsize=7, color=colors[column])
        top = next((c for c in here if c["column"] == "sdpa" and c["status"] == "ok"), None)
        if top is not None:
            ax.axhline(top["ms"], color="black", linestyle="--", linewidth=1, label=COLUMN_LABELS["sdpa"])
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=7)
        batch = here[0]["B"]
        ax.set_title(f"L = {length}, B = {batch}", fontsize=9)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("time per call (ms, median, log)")
    legend = {}  # one entry per column, not one per bar, above the panels where it hides no bar
    for ax in axes[0]:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="upper center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, 0.94))
    mode = "fwd+bwd" if settings.backward else "forward only"
    bias = "flex with relative bias" if settings.relative_bias else "no relative bias"
    fig.suptitle(f"attention patterns, single stream, {mode}, {settings.dtype}, {settings.tokens_per_batch} "
                 f"tokens/batch, {settings.heads}x{settings.head_dim}, {bias}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(out_dir / "patterns_time.png")
    plt.close(fig)
    return ["patterns_time.png"]


class PatternReport:
    """DIR/patterns.{md,json} and patterns_time.png, rewritten after every cell, so a run that is cut
    short (or killed) still leaves what it measured, and --resume can go on from there."""

    def __init__(self, out_dir, env, settings):
        self.dir = Path(out_dir) if out_dir else None
        self.env, self.settings, self.cells, self.plots = env, settings, [], []
        if self.dir is not None:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UserError(f"cannot create --output-dir {self.dir}: {err.strerror}") from None

    def earlier_cells(self) -> dict:
        """--resume: the cells of DIR/patterns.json if it was written with the same settings, SKIP
        cells left out (they are measured now)."""
        path = None if self.dir is None else self.dir / "patterns.json"
        if path is None or not path.is_file():
            return {}
        data = json.loads(path.read_text())
        ours = json.loads(json.dumps(dataclasses.asdict(self.settings), default=str))
        theirs = data.get("settings", {})
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if differ:
            raise UserError(f"--resume: {path} was written with other settings (they differ in {', '.join(differ)}); "
                            "give the same options or another --output-dir")
        self.env["resumed_from"] = data.get("environment", {}).get("date")
        return {_cell_key(c): c for c in data.get("cells", []) if not c["status"].startswith("SKIP")}

    def write(self, cells, plot=False):
        self.cells = cells
        if self.dir is None:
            return
        if plot:
            self.plots = plot_patterns(cells, self.settings, self.dir)
        data = {"environment": self.env, "settings": dataclasses.asdict(self.settings), "cells": cells}
        for name, text in (("patterns.json", json.dumps(data, indent=2, default=str)),
                           ("patterns.md", render_markdown(self.env, self.settings, cells, self.plots))):
            tmp = self.dir / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.dir / name)


def benchmark_patterns(settings: PatternSettings, out_dir=None, time_budget: float | None = None,
                       resume: bool = False, log=print) -> PatternReport:
    """Run the sweep, print a progress line per cell and the tables, write the report."""
    from tabulate import tabulate

    settings.validate()
    resolve_device(settings.device)
    env = environment()
    report = PatternReport(out_dir, env, settings)
    if resume and report.dir is None:
        raise UserError("--resume needs --output-dir (the run to resume is DIR/patterns.json)")
    done = report.earlier_cells() if resume else {}
    print_header(env, [settings], log)
    mode = "forward + backward" if settings.backward else "FORWARD ONLY (CPU: FlexAttention has no backward)"
    log(f"\n== attention patterns: flex vs SDPA + dense mask vs SDPA ceiling, single stream, {mode} ==")
    if done:
        log(f"resuming: {len(done)} cell(s) from {report.dir / 'patterns.json'} ({env['resumed_from']})")
    last_length = [None]

    def update(cells):
        length = cells[-1]["L"]
        report.write(cells, plot=length != last_length[0])  # the plot once per length: it is slow on CPU
        last_length[0] = length

    cells = run_patterns(settings, update, Deadline(time_budget), log, done)
    report.write(cells, plot=True)
    summary, headers = summary_table(cells)
    log("\n" + tabulate(summary, headers, tablefmt="github", disable_numparse=True))
    if not settings.backward:
        log("\nNOTE: forward only (CPU); the GPU run times forward + backward.")
    if report.dir is not None:
        log(f"\nwrote {report.dir / 'patterns.md'}, {report.dir / 'patterns.json'}"
            + "".join(f", {report.dir / p}" for p in report.plots))
    return report

