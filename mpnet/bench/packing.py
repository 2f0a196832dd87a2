"""Packed against padded fine-tuning steps on GLUE-length inputs: the `packing` section of `benchmark-mpnet`.

One fine-tuning step of `MPNetForSequenceClassification` (mpnet-base by default: forward, cross-entropy
over the examples, backward; bf16 autocast on CUDA) on the SAME examples laid out four ways:

- `padded-dense`: random batches (not length-sorted) padded to their longest example, the usual
  Hugging Face way, dense attention backend;
- `padded-flex`: the same padded batches on the FlexAttention backend;
- `packed-flex`: the same examples packed into rows (mpnet/modeling/packing.py, best-fit decreasing),
  FlexAttention with document isolation (positions restart per example; a token sees only its own
  example), logits read at each example's <s>: exactly what the example gets alone;
- `packed-dense`: the packed rows on the dense backend (materialised (R, H, T, T) mask and bias).

Every variant sees the same number of EXAMPLES per step (`examples_per_step`), so examples/s compare
directly; real tokens/s counts only non-padding tokens, and the padding share is padding positions
over all positions computed (padded: N x width; packed: rows x row length, empty bucket rows included).

Shapes: FlexAttention compiles once per input shape, so shapes are bucketed. Padded widths round up to
a multiple of `pad_multiple` tokens (never past max_length); packed rows are exactly `row_length`
tokens wide and their number rounds up to a multiple of `rows_multiple` (extra rows are all padding
and change nothing). The dense variants use the same shapes, so the backends compare like for like.

Inputs: real sentence lengths. By default the SST-2-like sentiment sentences that
scripts/make_sentiment_data.py writes to data/sentiment/train.tsv when they are there, else the
embedded corpus (Jane Austen's novels, mpnet/resources/corpus) split into sentences; `--data` names
another TSV with a `sentence` column, a GLUE task folder, or a text corpus. Tokenized with the
project's tokenizer (mpnet/resources/tokenizer), truncated to max_length. The report says which.

Timing comes from the harness; the timed steps cycle through `batches` distinct random batches, so
throughput = all real tokens (examples) of the timed steps / their summed time. On CPU: wall clock,
forward only (FlexAttention has no CPU backward), fp32.
"""
from __future__ import annotations

import csv
import functools
import random
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..modeling.config import MPNetConfig
from ..modeling.packing import pack
from ..training.toolkit import autocast
from .harness import check_dtype, configure_dynamo, on_cuda, phase, time_runs, timer_text
from .report import Figure, Panel, Section, Table, fmt, ok, short_status, time_text

VARIANTS = ("padded-dense", "packed-flex", "padded-flex", "packed-dense")  # run order: the key pair first
REPORT_ORDER = ("padded-dense", "padded-flex", "packed-flex", "packed-dense")
REPO = Path(__file__).resolve().parents[2]
SENTIMENT_TSV = Path("data") / "sentiment" / "train.tsv"


@dataclass
class PackingSettings:
    examples_per_step: list = field(default_factory=lambda: [32, 128])
    max_length: int = 128  # truncation (GLUE recipes use 128; MPNet's own 512)
    row_length: int | None = None  # packed row width (default: max_length)
    pad_multiple: int = 32  # padded widths round up to a multiple of this (bucketing: few flex compiles)
    rows_multiple: int = 4  # packed row counts round up to a multiple of this
    batches: int = 8  # distinct random batches per examples_per_step, cycled while timing
    variants: list = field(default_factory=lambda: list(VARIANTS))
    model: str = "base"  # base (mpnet-base) | tiny
    data: str | None = None  # None: data/sentiment/train.tsv if present, else the embedded corpus
    pairs: bool = False  # sentence pairs (consecutive sentences), as MNLI/QQP/MRPC
    num_labels: int = 2
    attention_dropout: float = 0.0  # 0: the dense and flex variants compute the same function (flex has none)
    dtype: str = "bf16"
    device: str | None = None
    backward: bool = True  # forward + backward (GPU); forward only on CPU
    warmup: int = 1  # warm-up passes over all batches after the first (compiling) pass
    repeats: int = 24  # timed steps (at least 3), cycling through the batches
    max_seconds: float = 10.0  # stop timing a cell after this long (once 3 steps are in)
    seed: int = 0

    @property
    def row(self) -> int:
        return self.row_length or self.max_length

    def validate(self, device: torch.device):
        check_dtype(self.dtype, device)
        if not self.examples_per_step or any(n < 1 for n in self.examples_per_step):
            raise UserError("--examples-per-step must be positive integers, e.g. 32,128")
        if self.max_length < 8:
            raise UserError(f"--max-length must be at least 8 tokens, got {self.max_length}")
        limit = MPNetConfig.base().max_sequence_length
        if self.row > limit or self.max_length > limit:
            raise UserError(f"--max-length/--row-length must be <= {limit} (the position table of mpnet-base)")
        if self.row < self.max_length:
            raise UserError(f"--row-length {self.row} is shorter than --max-length {self.max_length}: "
                            "the longest examples would not fit in a row")
        for name in ("pad_multiple", "rows_multiple", "batches", "repeats"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer")
        if self.warmup < 0:
            raise UserError("--warmup must be >= 0")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise UserError(f"unknown variant(s) {unknown or '(none)'}; pick from {', '.join(REPORT_ORDER)}")
        if self.model not in ("base", "tiny"):
            raise UserError("--model must be base or tiny")
        if not 0 <= self.attention_dropout < 1:
            raise UserError("--attention-dropout must be in [0, 1)")


# ------------------------------------------------------------------------------------------- data


def split_sentences(text: str) -> list[str]:
    """Sentences of a document: split after . ! ? (and a closing quote), at least three words each."""
    text = " ".join(text.split())
    parts = re.split(r"(?<=[.!?])\s+|(?<=[.!?][\"'])\s+", text)
    return [p for p in parts if len(p.split()) >= 3]


def _read_tsv_sentences(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or "sentence" not in [h.strip() for h in rows[0]]:
        raise UserError(f"{path} has no 'sentence' column in its header (expected the GLUE SST-2 layout)")
    column = [h.strip() for h in rows[0]].index("sentence")
    return [row[column] for row in rows[1:] if len(row) > column and row[column].strip()]


def load_sentences(spec: str | None) -> tuple[list[str], str]:
    """(sentences, where they came from). spec None: the sentiment set if present, else the embedded corpus."""
    from ..data.corpus import EMBEDDED_CORPUS, iter_documents, list_sources

    if spec is None:
        for candidate in (Path.cwd() / SENTIMENT_TSV, REPO / SENTIMENT_TSV):
            if candidate.is_file():
                sentences = _read_tsv_sentences(candidate)
                return sentences, (f"sentiment sentences ({candidate}: rottentomatoes.com snippets written by "
                                   f"scripts/make_sentiment_data.py), {len(sentences)} sentences")
        spec = "embedded"
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "train.tsv").is_file():
        path = path / "train.tsv"
    if path.is_file() and path.suffix == ".tsv":
        sentences = _read_tsv_sentences(path)
        return sentences, f"{path} ('sentence' column), {len(sentences)} sentences"
    files = list_sources(spec)
    sentences = [s for doc in iter_documents(files) for s in split_sentences(doc)]
    if len(sentences) < 2:
        raise UserError(f"{spec}: found fewer than two sentences of three words or more")
    name = ("the embedded corpus (Jane Austen's six novels, mpnet/resources/corpus/austen.txt.gz)"
            if files == [EMBEDDED_CORPUS.resolve()] else f"{spec}")
    return sentences, f"{name} split into sentences, {len(sentences)} sentences"


@dataclass
class Examples:
    """Tokenized examples per examples_per_step: `batches` lists of token-id lists, and labels."""

    batches: dict  # N -> list of batches (each a list of id lists)
    labels: dict  # N -> list of (N,) label tensors
    source: str
    stats: dict


def draw_examples(settings: PackingSettings, tokenizer, sentences: list[str], source: str) -> Examples:
    """Seeded random batches (no length sorting), tokenized with truncation to max_length."""
    rng = random.Random(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    pool = len(sentences) - 1 if settings.pairs else len(sentences)
    draws = {n: [rng.sample(range(pool), min(n, pool)) for _ in range(settings.batches)]
             for n in settings.examples_per_step}
    if any(len(d[0]) < n for n, d in draws.items()):
        raise UserError(f"{source}: only {pool} examples, fewer than --examples-per-step")
    wanted = sorted({i for d in draws.values() for batch in d for i in batch})
    first = [sentences[i] for i in wanted]
    second = [sentences[i + 1] for i in wanted] if settings.pairs else None
    encoded = tokenizer(first, second, truncation=True, max_length=settings.max_length)["input_ids"]
    ids = dict(zip(wanted, encoded))
    batches = {n: [[ids[i] for i in batch] for batch in d] for n, d in draws.items()}
    labels = {n: [torch.randint(0, settings.num_labels, (n,), generator=gen) for _ in d] for n, d in draws.items()}
    lengths = sorted(len(e) for e in encoded)
    stats = {"examples_drawn": len(lengths), "mean_tokens": statistics.fmean(lengths),
             "median_tokens": statistics.median(lengths), "p90_tokens": lengths[int(0.9 * (len(lengths) - 1))],
             "max_tokens": lengths[-1],
             "truncated_share": sum(length >= settings.max_length for length in lengths) / len(lengths)}
    kind = "sentence pairs (consecutive sentences)" if settings.pairs else "single sentences"
    return Examples(batches, labels, f"{source}; {kind}", stats)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def padded_batch(examples: list[list[int]], pad_id: int, multiple: int, max_length: int) -> dict:
    """Right-padded to the longest example, rounded up to a multiple (never past max_length)."""
    width = min(_round_up(max(len(e) for e in examples), multiple), max(max_length, max(len(e) for e in examples)))
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, :len(example)] = torch.tensor(example, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long()}


def packed_batch(examples: list[list[int]], pad_id: int, row_length: int, rows_multiple: int) -> dict:
    """Rows of exactly row_length tokens, their number rounded up to rows_multiple; logits in input order."""
    batch = pack(examples, row_length, pad_id, pad_width_to_multiple_of=row_length,
                 pad_rows_to_multiple_of=rows_multiple)
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
            "document_ids": batch.document_ids, "starts": batch.starts}


def layout(settings: PackingSettings, variant: str, examples: list[list[int]], pad_id: int) -> dict:
    if variant.startswith("packed"):
        return packed_batch(examples, pad_id, settings.row, settings.rows_multiple)
    return padded_batch(examples, pad_id, settings.pad_multiple, settings.max_length)


# ------------------------------------------------------------------------------------------ cells


def model_config(settings: PackingSettings, flex: bool, vocab_size: int) -> MPNetConfig:
    make = MPNetConfig.base if settings.model == "base" else MPNetConfig.tiny
    return make(vocab_size=vocab_size, num_labels=settings.num_labels, use_flex_attention=flex,
                attention_probs_dropout_prob=settings.attention_dropout)


def device_batches(settings: PackingSettings, variant: str, n: int, examples: Examples, pad_id: int, device):
    """(the variant's batches on the device with their labels, real tokens per batch, shapes)."""
    batches, real, shapes = [], [], []
    for ids, labels in zip(examples.batches[n], examples.labels[n]):
        inputs = layout(settings, variant, ids, pad_id)
        real.append(int(inputs["attention_mask"].sum()))
        shapes.append(tuple(inputs["input_ids"].shape))
        batches.append(({k: v.to(device) for k, v in inputs.items()}, labels.to(device)))
    return batches, real, shapes


def measure_packing(settings: PackingSettings, variant: str, n: int, examples: Examples, pad_id: int,
                    vocab_size: int, device, timer) -> dict:
    """One variant at N examples per step: the first pass over every batch compiles each shape, then
    `warmup` more passes, then the timed steps, which cycle through the batches from the first."""
    from ..modeling.model import MPNetForSequenceClassification

    torch.manual_seed(settings.seed)  # the same weights for every variant
    with phase("build"):
        model = MPNetForSequenceClassification(model_config(settings, variant.endswith("flex"), vocab_size))
        model = model.to(device).train()
        batches, real, shapes = device_batches(settings, variant, n, examples, pad_id, device)
    steps = [0]

    def step():
        inputs, labels = batches[steps[0] % len(batches)]
        steps[0] += 1
        with phase("forward"), torch.set_grad_enabled(settings.backward), autocast(device, settings.dtype == "bf16"):
            logits = model(**inputs)
        if settings.backward:
            with phase("backward"):
                F.cross_entropy(logits.float(), labels).backward()
                model.zero_grad(set_to_none=True)

    result = time_runs(timer, step, settings.warmup * len(batches), settings.repeats, settings.max_seconds,
                       check=lambda: steps.__setitem__(0, 0), first=lambda: [step() for _ in batches])
    result["first_pass_s"] = result.pop("first_call_s")
    seconds = result["mean_ms"] * result["runs"] / 1e3
    used = [i % len(batches) for i in range(result["runs"])]
    positions = [s[0] * s[1] for s in shapes]
    result.update(shapes=sorted(set(shapes)), real_tokens_per_step=statistics.fmean(real),
                  positions_per_step=statistics.fmean(positions), padding_share=1 - sum(real) / sum(positions),
                  real_tokens_per_s=sum(real[i] for i in used) / seconds, examples_per_s=n * result["runs"] / seconds)
    return result


def run_packing(session, settings: PackingSettings, deadline=None) -> Section:
    """Read and tokenize the inputs, then for each examples_per_step each variant (in VARIANTS order)."""
    from ..data.tokenizer import load_tokenizer

    device = session.device
    settings.validate(device)
    tokenizer = load_tokenizer("default")
    sentences, source = load_sentences(settings.data)
    examples = draw_examples(settings, tokenizer, sentences, source)
    s = examples.stats
    mode = "forward + backward" if settings.backward else "FORWARD ONLY (CPU: FlexAttention has no backward there)"
    section = Section("packing", f"Packed vs padded fine-tuning steps, {mode}, {settings.dtype}", settings,
                      method_lines, lambda s: [results_table(s.cells)], packing_figures,
                      extra={"inputs": {"source": examples.source, **s}})
    session.open(section)
    session.log(f"  inputs: {examples.source}")
    session.log(f"  tokens per example: mean {s['mean_tokens']:.1f}, median {s['median_tokens']:g}, p90 "
                f"{s['p90_tokens']}, max {s['max_tokens']}, {100 * s['truncated_share']:.1f}% truncated to "
                f"{settings.max_length}")
    configure_dynamo()
    for n in settings.examples_per_step:
        torch._dynamo.reset()
        for variant in [v for v in VARIANTS if v in settings.variants]:
            cell = {"key": f"N={n}/{variant}", "name": f"N={n:>4} {variant:<13}", "examples": n, "variant": variant,
                    "backend": "flex" if variant.endswith("flex") else "dense", "layout": variant.split("-")[0]}
            measure = functools.partial(measure_packing, settings, variant, n, examples, tokenizer.pad_token_id,
                                        len(tokenizer), device, session.timer)
            session.measure(section, cell, relative_to_padded(section, cell, measure), deadline)
    speedups(section.cells)
    section.extra["headline"] = headline(section.cells)
    session.finish(section)
    return section


def relative_to_padded(section: Section, cell: dict, measure):
    def measured():
        result = measure()
        base = next((c for c in section.cells if c["examples"] == cell["examples"] and c["variant"] == "padded-dense"
                     and ok(c)), None)
        if base is not None:
            result["relative"] = [result["examples_per_s"] / base["examples_per_s"], "padded-dense"]
        return result
    return measured


def speedups(cells):
    """examples/s over the padded variants' at the same examples_per_step (same examples, so same ratio
    for real tokens/s)."""
    for cell in cells:
        for ref in ("padded-dense", "padded-flex"):
            base = next((c for c in cells if c["examples"] == cell["examples"] and c["variant"] == ref and ok(c)), None)
            if ok(cell) and base is not None:
                cell[f"vs_{ref.replace('-', '_')}"] = cell["examples_per_s"] / base["examples_per_s"]


def _shapes_text(shapes) -> str:
    return ", ".join(f"{a}x{b}" for a, b in shapes)


# ----------------------------------------------------------------------------------------- reports


def results_table(cells) -> Table:
    order = {v: i for i, v in enumerate(REPORT_ORDER)}
    rows = []
    for c in sorted(cells, key=lambda c: (c["examples"], order[c["variant"]])):
        good = ok(c)
        rows.append([
            c["examples"], c["variant"],
            _shapes_text(c["shapes"]) if good else "",
            f"{100 * c['padding_share']:.1f}" if good else "",
            time_text(c, ".2f"),
            fmt(c.get("examples_per_s"), ",.1f") if good else "",
            fmt(c.get("real_tokens_per_s"), ",.0f") if good else "",
            (fmt(c.get("vs_padded_dense"), ".2f") + "x") if c.get("vs_padded_dense") is not None else "",
            (fmt(c.get("vs_padded_flex"), ".2f") + "x") if c.get("vs_padded_flex") is not None else "",
            fmt(c.get("peak_gib"), ".2f", "n/a") if good else "",
            fmt(c.get("first_pass_s"), ".1f") if good else "",
        ])
    headers = ["examples/step", "variant", "shapes (rows x width)", "padding %", "step ms median [p20, p80]",
               "examples/s", "real tokens/s", "x padded-dense", "x padded-flex", "peak GiB", "first pass s"]
    return Table(headers, rows, "Results", [f"- {line}" for line in headline(cells)])


def headline(cells) -> list:
    """One line per examples_per_step: packed-flex against the padded variants."""
    lines = []
    for n in sorted({c["examples"] for c in cells}):
        packed = next((c for c in cells if c["examples"] == n and c["variant"] == "packed-flex" and ok(c)), None)
        if packed is None:
            continue
        parts = [f"{packed[key]:.2f}x {ref}" for key, ref in (("vs_padded_dense", "padded-dense"),
                                                             ("vs_padded_flex", "padded-flex")) if key in packed]
        if parts:
            padded = ", ".join(f"{100 * c['padding_share']:.0f}% {c['variant']}" for c in cells
                               if c["examples"] == n and c["layout"] == "padded" and ok(c))
            lines.append(f"{n} examples/step: packed-flex is " + ", ".join(parts)
                         + f" (padding {100 * packed['padding_share']:.0f}% vs {padded})")
    return lines


METHOD = """\
- Step: `MPNetForSequenceClassification` ({model}, random init, {labels} labels, hidden dropout 0.1,
  attention dropout {dropout}), {step}
- The same {batches} random batches of N examples (no length sorting) for every variant, cycled while
  timing: median [p20, p80] of up to {repeats} steps ({timer}) after one pass that compiles every
  shape ("first pass s") and {warmup} more warm-up pass(es). examples/s and real tokens/s = the timed
  steps' examples / non-padding tokens over their summed time; the speed-ups divide examples/s at
  the same N (identical for real tokens/s).
- padded: each batch right-padded to its longest example rounded up to a multiple of {pad} tokens (at
  most {max_length}). packed: best-fit decreasing into rows of exactly {row} tokens, the number of rows
  rounded up to a multiple of {rows} (whole rows of padding); document ids isolate the examples and
  restart their positions, and the classifier reads each example's own <s> (tests prove the packed
  logits and gradients equal the example alone). padding % = padding positions / all positions.
- dense: materialised mask and (B, H, T, T) bias; flex: {flex} FlexAttention (BlockMask per step,
  built inside the timed step as in training), padding and other examples' tokens skipped by the
  block mask where a whole 128-tile is masked."""


def method_lines(section: Section) -> list:
    settings, s = section.settings, section.extra["inputs"]
    step = (f"forward in {settings.dtype} autocast, cross-entropy over the step's examples, backward, zero_grad (no "
            "optimizer update: it costs the same in every variant)." if settings.backward else
            f"forward only (no_grad), {settings.dtype}.")
    inputs = (f"- Inputs: {s['source']}. Tokens per example (with <s> and </s>, truncated to {settings.max_length}): "
              f"mean {s['mean_tokens']:.1f}, median {s['median_tokens']:g}, p90 {s['p90_tokens']}, max "
              f"{s['max_tokens']}; {100 * s['truncated_share']:.1f}% truncated ({s['examples_drawn']} examples drawn).")
    return [inputs] + METHOD.format(
        model=f"mpnet-{settings.model}", labels=settings.num_labels, dropout=settings.attention_dropout, step=step,
        flex="compiled" if on_cuda(settings) else "eager (CPU: not compiled)", batches=settings.batches,
        repeats=settings.repeats, warmup=settings.warmup, timer=timer_text(settings), pad=settings.pad_multiple,
        max_length=settings.max_length, row=settings.row, rows=settings.rows_multiple).splitlines()


def packing_figures(section: Section) -> list[Figure]:
    """packing.png: examples/s per variant (bars grouped by examples per step, labelled with the
    speed-up over padded-dense) beside the padding share."""
    settings, cells = section.settings, section.cells
    sizes = sorted({c["examples"] for c in cells})
    variants = [v for v in REPORT_ORDER if any(c["variant"] == v for c in cells)]
    if not sizes or not variants:
        return []
    found = {v: [next((c for c in cells if c["examples"] == n and c["variant"] == v), None) for n in sizes]
             for v in variants}
    speed = {v: [None if c is None else c["examples_per_s"] if ok(c) else short_status(c) for c in found[v]]
             for v in variants}
    notes = {v: ["" if c is None or c.get("vs_padded_dense") is None else f"{c['vs_padded_dense']:.2f}x"
                 for c in found[v]] for v in variants}
    padding = {v: [100 * c["padding_share"] if c is not None and ok(c) else None for c in found[v]] for v in variants}
    categories = [f"{n} examples/step" for n in sizes]
    mode = "fwd+bwd" if settings.backward else "forward only"
    return [Figure("packing.png", [
        Panel(f"mpnet-{settings.model} classification step, {mode}, {settings.dtype}; label: x padded-dense",
              "examples/s (higher is better)", categories=categories, bars=speed, bar_notes=notes),
        Panel(f"rows: padded to longest (x{settings.pad_multiple}) / packed {settings.row}-token rows",
              "padding share of computed positions (%)", categories=categories, bars=padding, y_limits=(0, 100))],
        size=(11, 4.5))]
