"""`benchmark-mpnet packing`: its arguments and its run (cli/benchmark.py adds the subcommand)."""
from __future__ import annotations

import argparse

import torch

from mpnet.packing_benchmark import REPORT_ORDER, PackingSettings, benchmark_packing

from ._common import int_list, name_list

HELP = "packed vs padded fine-tuning steps (MPNetForSequenceClassification) on GLUE-length sentences"
DESCRIPTION = """\
One fine-tuning step (forward + backward of MPNetForSequenceClassification, mpnet-base, bf16 autocast on
CUDA) on the same random batches of real sentences, padded to the longest (dense and flex backends) and
packed into rows with document isolation (flex and dense). Reports step time, examples/s, real
(non-padding) tokens/s, padding share and the speed-up of packed over padded; writes DIR/packing.md,
packing.json and packing.png. CPU: forward only (use --device cpu --quick for a smoke run).
Method: docs/finetune.md (section "Packing")."""

QUICK = dict(model="tiny", examples_per_step=[8], batches=2, max_length=64, warmup=0, repeats=3, max_seconds=1.0)


def add_parser(sub):
    p = sub.add_parser("packing", help=HELP, description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d = PackingSettings()
    g = p.add_argument_group("packing")
    g.add_argument("--examples-per-step", type=int_list, default=None,
                   help=f"examples per step, one cell group each (default {','.join(map(str, d.examples_per_step))})")
    g.add_argument("--variants", type=name_list(REPORT_ORDER), default=None,
                   help=f"subset of {','.join(REPORT_ORDER)} (default all)")
    g.add_argument("--max-length", type=int, default=None, help=f"truncate examples to this (default {d.max_length})")
    g.add_argument("--row-length", type=int, default=None, help="packed row width in tokens (default --max-length)")
    g.add_argument("--pad-multiple", type=int, default=None,
                   help=f"padded widths round up to a multiple of this (default {d.pad_multiple}; 1 = exact longest)")
    g.add_argument("--rows-multiple", type=int, default=None,
                   help=f"packed row counts round up to a multiple of this (default {d.rows_multiple})")
    g.add_argument("--batches", type=int, default=None,
                   help=f"distinct random batches per examples-per-step, cycled while timing (default {d.batches})")
    g.add_argument("--model", choices=["base", "tiny"], default=None, help="model size (default base; tiny with --quick)")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="a TSV with a 'sentence' column (GLUE SST-2 layout), a folder holding train.tsv, a text "
                        "corpus or 'embedded' (default: data/sentiment/train.tsv if present, else the embedded corpus)")
    g.add_argument("--pairs", action="store_true", help="sentence pairs (two consecutive sentences), as MNLI/QQP")
    g.add_argument("--attention-dropout", type=float, default=None,
                   help="attention-probability dropout (default 0: flex has none, so both backends compute the same)")
    c = p.add_argument_group("common")
    c.add_argument("--device", default=None, help="cuda (default when available) or cpu (forward only)")
    c.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                   help="autocast dtype on CUDA (default bf16); CPU runs in fp32")
    c.add_argument("--output-dir", default=None, metavar="DIR", help="write DIR/packing.md, packing.json, packing.png")
    c.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (any flag you give still wins)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new cell after this many seconds (reported as SKIP); results are written after "
                        "every cell")
    c.add_argument("--warmup", type=int, default=None, help=f"warm-up passes after the compiling one (default {d.warmup})")
    c.add_argument("--repeats", type=int, default=None, help=f"timed steps per cell (default {d.repeats})")
    c.add_argument("--max-seconds", type=float, default=None,
                   help=f"stop timing a cell after this long, once 3 steps are in (default {d.max_seconds:g})")
    return p


def settings_from(args) -> PackingSettings:
    d = PackingSettings()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"  # CPU: fp32 (bf16 matmuls are slow there), forward only

    def pick(name):
        value = getattr(args, name)
        if value is not None:
            return value
        return QUICK[name] if args.quick and name in QUICK else getattr(d, name)

    return PackingSettings(
        examples_per_step=pick("examples_per_step"), max_length=pick("max_length"), row_length=args.row_length,
        pad_multiple=pick("pad_multiple"), rows_multiple=pick("rows_multiple"), batches=pick("batches"),
        variants=pick("variants"), model=pick("model"), data=args.data, pairs=args.pairs,
        attention_dropout=pick("attention_dropout"), dtype=args.dtype if cuda else "fp32", device=device,
        backward=cuda, warmup=pick("warmup"), repeats=pick("repeats"),
        max_seconds=pick("max_seconds"), seed=args.seed)


def run(args) -> int:
    benchmark_packing(settings_from(args), out_dir=args.output_dir, time_budget=args.time_budget)
    return 0
