"""Attention patterns against PyTorch SDPA: the `patterns` section of `benchmark-mpnet`.

For each pattern of mpnet/modeling/patterns.py and each sequence length, three columns:

- `flex`: the project's `FlexTwoStreamAttention` in SINGLE-STREAM mode (m = 0, natural order: the
  encoder path of fine-tuning and inference), called through the real module with identity
  projections (as the attention section does), with the learnable relative-position bias and its
  gradient (`--no-relative-bias`: without it, like for like with SDPA). The BlockMask is built outside
  the timed region; its build is timed apart. Tiles = the 128x128 tiles the kernel computes, of all.
- `sdpa-mask`: `F.scaled_dot_product_attention` with the pattern's mask materialised as a (B, 1, L, L)
  boolean tensor (what a user without FlexAttention would do), evaluated from the SAME rule functions
  the flex mask_mod calls. ALiBi becomes a float bias (1 or B, H, L, L); soft-capping cannot be
  expressed through SDPA's additive mask, so that cell is n/a.
- `sdpa`: SDPA without mask or bias, once per length: the ceiling.

Timing, failures and the report come from the harness. Attention FLOPs: 4 x B x H x L^2 x D forward,
x3.5 forward + backward; every column is credited with the same dense FLOPs, flex also with
"effective" FLOPs x the share of tiles computed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..modeling.attention import FlexAttentionState, FlexTwoStreamAttention, make_flex_attention_state
from ..modeling.block_masks import make_two_stream_block_masks
from ..modeling.config import MPNetConfig
from ..modeling.masks import is_real_token, relative_bias_by_distance
from ..modeling.packing import positions_within_documents
from ..modeling.patterns import AttentionPattern, BadAttentionPattern, parse_attention_pattern
from .attention import attention_flops, tile_facts
from .harness import (DTYPES, Timer, check_attention_sweep, check_gradient, compiled_graphs, on_cuda, phase, time_runs,
                      timed_build, timer_text, warm_median)
from .problems import identity_projections
from .report import (CELL_HEADERS, Figure, Panel, Section, Table, cell_columns, ok, ratio_text, short_status, tflops_text,
                     tiles_text)

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
    device: str | None = None
    backward: bool = True  # forward + backward (GPU); forward only on CPU
    warmup: int = 3
    repeats: int = 20
    max_seconds: float = 3.0
    num_buckets: int = 32
    max_distance: int = 128
    seed: int = 0
    flex_kernel_options: dict | None = None

    def validate(self, device: torch.device):
        check_attention_sweep(self, device, "heads", "head_dim")
        if not self.patterns:
            raise UserError("--patterns is empty; e.g. --patterns none,window:256,block:256")
        if len(set(self.patterns)) != len(self.patterns):
            raise UserError(f"--patterns names a pattern twice: {','.join(self.patterns)}")
        for text in self.patterns:  # every entry at every length, so a bad one stops before any compile
            for length in self.lengths:
                resolve_pattern(text, length)


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
class PatternProblem:
    """One length's inputs, shared by every pattern and column of it."""

    length: int
    batch: int
    hidden: torch.Tensor  # (B, L, H*D): q = k = v after the identity projections
    grad_out: torch.Tensor
    table: torch.Tensor  # (buckets, heads) relative-bias table, requires grad
    generator_seed: int


def make_pattern_problem(settings: PatternSettings, length: int, device) -> PatternProblem:
    gen = torch.Generator().manual_seed(settings.seed + length)
    batch = settings.tokens_per_batch // length
    dtype = DTYPES[settings.dtype]
    size = settings.heads * settings.head_dim
    hidden = torch.randn(batch, length, size, generator=gen).to(device, dtype).requires_grad_(settings.backward)
    grad_out = torch.randn(batch, length, size, generator=gen).to(device, dtype)
    table = (torch.randn(settings.num_buckets, settings.heads, generator=gen) * 0.02).to(device).requires_grad_(True)
    return PatternProblem(length, batch, hidden, grad_out, table, settings.seed + length)


def case_inputs(problem: PatternProblem, case: PatternCase, device):
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


def sdpa_core(hidden, heads, attn_mask):
    """The same head split and merge as the module with identity projections, through SDPA."""
    b, length, _ = hidden.shape
    x = hidden.view(b, length, heads, -1).transpose(1, 2)
    context = F.scaled_dot_product_attention(x, x, x, attn_mask=attn_mask)
    return context.transpose(1, 2).reshape(b, length, -1)


def flex_state(settings, case, positions, document_ids, distance_bias):
    """The module's state for single-stream encoding: the project's own state (bias as a score_mod) or,
    with --no-relative-bias, its BlockMask and only the pattern's score mods."""
    length = positions.shape[1]
    if settings.relative_bias:
        return make_flex_attention_state(positions, length, 0, distance_bias, settings.max_distance,
                                         pattern=case.pattern, document_ids=document_ids, layer=case.layer)
    mask, _ = make_two_stream_block_masks(positions, length, 0, pattern=case.pattern, document_ids=document_ids,
                                       layer=case.layer)

    def pattern_scores(score, b, h, q_idx, kv_idx):
        return case.pattern.modify_score(score, h, positions[b, q_idx], positions[b, kv_idx], settings.heads)

    return FlexAttentionState(mask, None, pattern_scores if case.pattern.scores else None, None, length)


def build_sdpa_mask_cell(settings, p: PatternProblem, case, positions, document_ids, timer) -> tuple:
    def build():
        return sdpa_mask(case, positions, document_ids, settings.heads, DTYPES[settings.dtype])

    mask, first = timed_build(timer, build)
    facts = {"mask_first_s": first}
    if mask is not None:
        facts["attn_mask"] = f"{tuple(mask.shape)} {str(mask.dtype).replace('torch.', '')}"
        facts["mask_ms"] = warm_median(timer, build, settings)
    return (lambda: sdpa_core(p.hidden, settings.heads, mask)), None, facts


def build_flex_cell(settings, p: PatternProblem, case, positions, document_ids, device, timer) -> tuple:
    config = MPNetConfig(hidden_size=settings.heads * settings.head_dim, num_attention_heads=settings.heads,
                         num_hidden_layers=1, relative_attention_num_buckets=settings.num_buckets,
                         relative_attention_max_distance=settings.max_distance)
    module = identity_projections(FlexTwoStreamAttention(config).to(device))
    # The bias the state captures is a leaf of its own: its gradient is carried on to the table after
    # each backward, as autograd would in the model.
    with torch.no_grad():
        distance_bias = relative_bias_by_distance(p.table, settings.max_distance, settings.num_buckets)
    distance_bias.requires_grad_(settings.backward and settings.relative_bias)
    graphs = compiled_graphs()
    with phase("BlockMask build"):
        state, first = timed_build(timer, lambda: flex_state(settings, case, positions, document_ids, distance_bias))
    facts = {"mask_first_s": first, **tile_facts(state)}
    facts["mask_ms"] = warm_median(timer, lambda: make_two_stream_block_masks(
        positions, p.length, 0, pattern=case.pattern, document_ids=document_ids, layer=case.layer), settings)
    facts["mask_graphs"] = compiled_graphs() - graphs

    def after_backward():
        if distance_bias.grad is not None:
            relative_bias_by_distance(p.table, settings.max_distance, settings.num_buckets).backward(distance_bias.grad)
            distance_bias.grad = None

    return (lambda: module(p.hidden, state)), after_backward, facts


def build_cell(settings: PatternSettings, problem: PatternProblem, case: PatternCase | None, column: str, device,
               timer: Timer) -> tuple[Callable, Callable | None, dict]:
    """(forward, after_backward, facts) of one cell, its mask built (and the build timed) here, outside
    the timed region. forward() returns the attention output; after_backward() finishes the chain rule
    where the cell's leaf is not the table. case is None for the ceiling."""
    if column == "sdpa":
        return (lambda: sdpa_core(problem.hidden, settings.heads, None)), None, {}
    positions, document_ids = case_inputs(problem, case, device)
    if column == "sdpa-mask":
        return build_sdpa_mask_cell(settings, problem, case, positions, document_ids, timer)
    return build_flex_cell(settings, problem, case, positions, document_ids, device, timer)


def measure_cell(settings: PatternSettings, problem: PatternProblem, case, column, device, timer) -> dict:
    """Build, warm up (the first run compiles), time, the FLOP rates. Raises on OOM / failure, with the phase."""
    p = problem
    with phase("mask build"):
        forward, after_backward, result = build_cell(settings, problem, case, column, device, timer)

    def run():
        if not settings.backward:
            with phase("forward"), torch.no_grad():
                forward()
            return
        p.hidden.grad = p.table.grad = None
        with phase("forward"):
            out = forward()
        with phase("backward"):
            out.backward(p.grad_out)
            if after_backward is not None:
                after_backward()

    learns = settings.backward and column == "flex" and settings.relative_bias
    result.update(time_runs(timer, run, settings.warmup - 1, settings.repeats, settings.max_seconds,
                            check=(lambda: check_gradient(p.table)) if learns else None))
    flops = attention_flops(p.batch, settings.heads, settings.head_dim, p.length, p.length, settings.backward)
    result["tflops"] = flops / (result["ms"] / 1e3) / 1e12
    if "density" in result:
        result["eff_tflops"] = result["tflops"] * result["density"]
    return result


# -------------------------------------------------------------------------------------------- sweep


def cell_plan(settings, p: PatternProblem, case: PatternCase | None, column: str) -> dict:
    label = case.label if case else "(none)"
    cell = {"key": f"L={p.length}/{case.name if case else ''}/{column}",
            "name": f"L={p.length:>5} B={p.batch:>3} {label:<28} {column:<9}", "L": p.length, "B": p.batch,
            "pattern": case.name if case else None, "label": label, "spec": case.spec if case else "",
            "documents": case.documents if case else 0, "layer": case.layer if case else 0, "column": column,
            "flops": attention_flops(p.batch, settings.heads, settings.head_dim, p.length, p.length, settings.backward)}
    if column == "sdpa-mask" and case.sdpa_na:
        cell["status"] = case.sdpa_na
    elif column == "sdpa-mask" and not case.has_mask and not case.pattern.scores:
        cell["status"] = "n/a: nothing to mask (the SDPA ceiling is this cell)"
    return cell


def run_patterns(session, settings: PatternSettings, deadline=None) -> Section:
    """Per length the ceiling, then flex and sdpa-mask per pattern; the plot after every length."""
    device = session.device
    settings.validate(device)
    mode = "forward + backward" if settings.backward else "FORWARD ONLY (CPU: FlexAttention has no backward there)"
    section = Section("patterns", f"Attention patterns: flex against SDPA, {mode}, {settings.dtype}", settings,
                      method_lines, lambda s: [summary_table(s.cells), detail_table(s.cells)], pattern_figures)

    def measure_length(length):
        problem = make_pattern_problem(settings, length, device)
        plan = [(None, "sdpa")] + [(resolve_pattern(t, length), c) for t in settings.patterns
                                   for c in ("flex", "sdpa-mask")]
        for case, column in plan:
            measure = functools.partial(measure_cell, settings, problem, case, column, device, session.timer)
            session.measure(section, cell_plan(settings, problem, case, column), measure, deadline)

    return session.sweep_lengths(section, settings, measure_length)


# ------------------------------------------------------------------------------------------ reports


def summary_table(cells) -> Table:
    """One row per (L, pattern), as attention-gym's tables: times of the three columns and the ratios."""
    ceiling = {c["L"]: c for c in cells if c["column"] == "sdpa"}
    rows, by = [], {}
    for c in cells:
        if c["column"] != "sdpa":
            by.setdefault((c["L"], c["pattern"]), {})[c["column"]] = c
    for (length, _), pair in by.items():
        flex, masked, top = pair.get("flex"), pair.get("sdpa-mask"), ceiling.get(length)
        ms = {k: c["ms"] for k, c in (("flex", flex), ("sdpa-mask", masked), ("sdpa", top)) if c is not None and ok(c)}

        def text(c):
            return "" if c is None else (f"{c['ms']:.3f}" if ok(c) else short_status(c))

        def ratio(numerator, denominator):
            return ratio_text(ms[numerator] / ms[denominator]) if numerator in ms and denominator in ms else ""

        any_cell = flex or masked
        rows.append([length, any_cell["B"], any_cell["label"],
                     tiles_text(flex["tiles"]) if flex and "tiles" in flex else "",
                     text(flex), tflops_text(flex.get("eff_tflops")) if "flex" in ms else "",
                     text(masked), text(top), ratio("sdpa-mask", "flex"), ratio("flex", "sdpa")])
    headers = ["L", "B", "pattern", "tiles computed/total (share)", "flex ms", "flex eff. TFLOP/s", "SDPA + mask ms",
               "SDPA ceiling ms", "flex speed-up over SDPA + mask", "flex time / ceiling"]
    return Table(headers, rows, "Summary (lower ms is faster; speed-up = SDPA + mask time / flex time)")


def detail_table(cells) -> Table:
    rows = [[c["L"], c["B"], c["label"] if c["pattern"] is not None else "(none)", COLUMN_LABELS[c["column"]]]
            + (["n/a (below)"] + [""] * (len(CELL_HEADERS) - 1) if c["status"].startswith("n/a") else cell_columns(c))
            + [c.get("attn_mask", "")] for c in cells]
    notes = sorted({(c["label"], c["status"]) for c in cells if c["status"].startswith("n/a")})
    return Table(["L", "B", "pattern", "column"] + CELL_HEADERS + ["SDPA attn_mask"], rows, "Every cell",
                 ["n/a cells:", ""] + [f"- {label}: {status[len('n/a: '):]}" for label, status in notes] if notes else [],
                 printed=False)


PATTERN_METHOD = """\
- Single-stream attention (m = 0, tokens in natural order: the encoder path of fine-tuning and
  inference), B = tokens_per_batch // L rows of L tokens, no padding; q = k = v = the (B, L, H*D)
  input in {dtype} (the modules' q/k/v/o Linear layers replaced by identities, as in the attention
  section). {what}.
- flex: `FlexTwoStreamAttention` ({compiled}, the project's mask_mod and score_mod)
  {bias}.
  The BlockMask is built once, outside the timed region; its build is timed apart (warm median, and
  the first build). tiles = 128x128 tiles it lets the kernel compute, of all tiles on the padded
  grid; eff. TFLOP/s = FLOPs x that share / time.
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
  torch.cuda.max_memory_allocated() over one run (inputs, masks and state included).
- Dynamo: recompile limits raised to 64, a hit is a FAIL (no silent eager fallback), and
  torch._dynamo.reset() between lengths."""


def method_lines(section: Section) -> list:
    settings = section.settings
    bias = ("with MPNet's learnable relative-position bias as a score_mod"
            + (" and its gradient (into the table, checked after warm-up)" if settings.backward else "")
            if settings.relative_bias else "WITHOUT the relative-position bias (--no-relative-bias): like for like")
    compiled = ("compiled `flex_attention`" if on_cuda(settings)
                else "eager `flex_attention` on CPU, as the project runs it there")
    return PATTERN_METHOD.format(dtype=settings.dtype, bias=bias, repeats=settings.repeats, warmup=settings.warmup,
                                 what="Timed: forward + backward" if settings.backward else "Timed: forward only",
                                 compiled=compiled, timer=timer_text(settings)).splitlines()


def pattern_figures(section: Section) -> list[Figure]:
    """patterns_time.png: one panel per length, a bar pair per pattern (flex, SDPA + mask) and the
    SDPA ceiling as a dashed line; a cell without a time is labelled (n/a, OOM, FAIL, SKIP)."""
    settings, cells = section.settings, section.cells
    panels = []
    for length in [length for length in settings.lengths if any(c["L"] == length for c in cells)]:
        here = [c for c in cells if c["L"] == length]
        labels = list(dict.fromkeys(c["label"] for c in here if c["column"] != "sdpa"))
        bars = {}
        for column in ("flex", "sdpa-mask"):
            found = [next((c for c in here if c["label"] == label and c["column"] == column), None) for label in labels]
            bars[COLUMN_LABELS[column]] = [None if c is None else c["ms"] if ok(c) else short_status(c) for c in found]
        top = next((c for c in here if c["column"] == "sdpa" and ok(c)), None)
        panels.append(Panel(f"L = {length}, B = {here[0]['B']}", "time per call (ms, median, log)" if not panels else "",
                            categories=labels, bars=bars, log_y=True,
                            ceiling=None if top is None else (COLUMN_LABELS["sdpa"], top["ms"])))
    if not panels:
        return []
    mode = "fwd+bwd" if settings.backward else "forward only"
    bias = "flex with relative bias" if settings.relative_bias else "no relative bias"
    return [Figure("patterns_time.png", panels, f"attention patterns, single stream, {mode}, {settings.dtype}, "
                   f"{settings.tokens_per_batch} tokens/batch, {settings.heads}x{settings.head_dim}, {bias}",
                   (1.0 + 0.75 * len(settings.patterns) * len(panels), 4.6))]
