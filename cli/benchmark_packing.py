"""`benchmark-mpnet packing`: its arguments (cli/benchmark.py adds the subcommand and runs it)."""
from __future__ import annotations

import argparse

from mpnet.bench.packing import REPORT_ORDER, PackingSettings

from ._common import int_list, name_list

HELP = "packed vs padded fine-tuning steps (MPNetForSequenceClassification) on GLUE-length sentences"
DESCRIPTION = """\
One fine-tuning step (forward + backward of MPNetForSequenceClassification, mpnet-base, bf16 autocast on
CUDA) on the same random batches of real sentences, padded to the longest (dense and flex backends) and
packed into rows with document isolation (flex and dense). Reports step time, examples/s, real
(non-padding) tokens/s, padding share and the speed-up of packed over padded; writes DIR/packing.md,
packing.json and packing.png. CPU: forward only, fp32 (use --device cpu --quick for a smoke run).
Method: docs/finetune.md (section "Packing")."""

QUICK = dict(model="tiny", examples_per_step=[8], batches=2, max_length=64, warmup=0, repeats=3, max_seconds=1.0)


def add_parser(sub, common_args):
    """The `packing` subcommand: its own options, then the common ones (`common_args(parser, report)`)."""
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
    g.add_argument("--pairs", action="store_true", default=None,
                   help="sentence pairs (two consecutive sentences), as MNLI/QQP")
    g.add_argument("--num-labels", type=int, default=None, help=f"classes (default {d.num_labels})")
    g.add_argument("--attention-dropout", type=float, default=None,
                   help="attention-probability dropout (default 0: flex has none, so the dense and flex variants compute the same)")
    common_args(p, "DIR/packing.md, packing.json, packing.png", flex=False)  # its cells run the model's own flex
    return p
