"""finetune-mpnet: fine-tune an MPNet checkpoint on a GLUE task or any sentence(-pair) classification/regression set."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import OVERRIDES_HELP, OneLineErrorParser, command, overrides_from, parse_with_overrides

EPILOG = """examples:
  finetune-mpnet --checkpoint runs/tiny/checkpoints/step-00000300 --task rte --data-dir glue_data/RTE
  finetune-mpnet --checkpoint ~/.cache/mpnet/all-mpnet-base-v2 --task sst2 --data-dir data/sentiment \\
      --config configs/glue/sentiment.yaml --output-dir runs/sentiment
  finetune-mpnet --checkpoint CKPT --task custom --data-dir my_set --text-column review --label-column stars \\
      --task-type regression
  finetune-mpnet --checkpoint CKPT --task mnli --data-dir glue_data --use-flex-attention --sliding-window-size 128
  finetune-mpnet --checkpoint CKPT --task sst2 --data-dir data/sentiment --use-flex-attention --pack

Recipe: defaults < configs/glue/TASK.yaml (used automatically when present) < --config FILE < flags <
SECTION.KEY=VALUE overrides (sections: task, training). Data layouts: the GLUE TSV folder, an HF
DatasetDict saved with save_to_disk, or train/dev .csv/.jsonl with named columns.
Writes OUTPUT/results.json, OUTPUT/best (the best dev checkpoint, HF format), OUTPUT/metrics.jsonl and
OUTPUT/tensorboard."""


def build_parser():
    from mpnet.modeling.backends import ATTENTION_BACKEND_NAMES

    p = OneLineErrorParser(prog="finetune-mpnet", description=__doc__, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="MPNet checkpoint dir (ours or any HF MPNet dir)")
    p.add_argument("--task", required=True, help="cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli or custom")
    p.add_argument("--data-dir", type=Path, required=True, help="the task's data folder (or its parent, e.g. glue_data)")
    p.add_argument("--output-dir", type=Path, help="default: runs/finetune/TASK-BACKEND-seedSEED")
    p.add_argument("--config", type=Path, help="YAML recipe: a file or a packaged name such as glue/sentiment "
                                               "(default: the packaged glue/TASK when there is one)")
    p.add_argument("--use-flex-attention", action="store_true", help="FlexAttention backend (training needs CUDA)")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKEND_NAMES, default="dense",
                   help="attention backend (one that cannot train on the device, e.g. flex or triton without CUDA, is "
                        "refused before any data is read; --use-flex-attention = flex)")
    p.add_argument("--sliding-window-size", type=int, metavar="W", help="attend only within W tokens")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--overwrite", action="store_true", help="replace the results in a non-empty --output-dir")
    train = p.add_argument_group("training (override the recipe)")
    for flag, kind, text in [("--lr", float, "peak learning rate"), ("--batch-size", int, "examples per step"),
                             ("--epochs", int, "passes over the training set"),
                             ("--warmup-ratio", float, "fraction of steps with linear warmup"),
                             ("--weight-decay", float, "AdamW weight decay"), ("--seed", int, "run seed"),
                             ("--eval-batch-size", int, "examples per evaluation batch"),
                             ("--max-train-examples", int, "train on a fixed random subset"),
                             ("--max-eval-examples", int, "evaluate on a fixed random subset")]:
        train.add_argument(flag, type=kind, help=text)
    train.add_argument("--pack", action="store_true",
                       help="pack each batch's examples into rows of <= --max-length tokens (document isolation) "
                            "instead of padding each to the longest; --batch-size still counts examples")
    train.add_argument("--compile", action="store_true",
                       help="torch.compile the training forward (training.compile; the fastest fine-tuning on a GPU "
                            "with --attention-backend triton: docs/benchmarks.md)")
    train.add_argument("--compile-mode", metavar="MODE",
                       help="torch.compile mode, implies --compile (training.compile_mode; default: default): "
                            "reduce-overhead replays CUDA graphs, no host launch time between kernels (one graph "
                            "per padded width; docs/finetune.md)")
    train.add_argument("--compile-scope", metavar="SCOPE",
                       help="what torch.compile compiles, implies --compile (training.compile_scope; default: "
                            "model): model or layers, each encoder layer compiled in place, one compile for all of "
                            "them (a shorter first step; evaluation runs them too)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    task = p.add_argument_group("task / data")
    task.add_argument("--max-length", type=int, help="tokens per example (truncate beyond)")
    task.add_argument("--text-column", help="CSV/JSONL column of the (first) text")
    task.add_argument("--text-pair-column", help="CSV/JSONL column of the second text, for pair tasks")
    task.add_argument("--label-column", help="CSV/JSONL label column")
    task.add_argument("--task-type", choices=["classification", "regression"], help="custom tasks only")
    task.add_argument("--labels", help="custom classification: comma-separated label names in index order")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help=OVERRIDES_HELP)
    return p


def config_from_args(args):
    """The run config and backend from parsed arguments (shared with compare-mpnet-backends)."""
    from mpnet.training.config import load_finetune_config

    flags = {
        "training": {"lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs,
                     "warmup_ratio": args.warmup_ratio, "weight_decay": args.weight_decay, "seed": args.seed,
                     "eval_batch_size": args.eval_batch_size, "max_train_examples": args.max_train_examples,
                     "max_eval_examples": args.max_eval_examples,
                     "pack": True if getattr(args, "pack", False) else None,
                     "compile": True if getattr(args, "compile", False) or getattr(args, "compile_mode", None)
                     or getattr(args, "compile_scope", None) else None,
                     "compile_mode": getattr(args, "compile_mode", None),
                     "compile_scope": getattr(args, "compile_scope", None),
                     "progress_bar": False if args.no_progress else None},
        "task": {"max_length": args.max_length, "text_column": args.text_column,
                 "text_pair_column": args.text_pair_column, "label_column": args.label_column,
                 "task_type": args.task_type,
                 "labels": [x.strip() for x in args.labels.split(",")] if args.labels else None},
    }
    return load_finetune_config(args.task.lower(), args.config, overrides_from(args, flags))


@command
def main(argv=None):
    args = parse_with_overrides(build_parser(), argv)
    from mpnet.modeling.checkpoint import model_dir
    from mpnet.modeling.config import check_window
    from mpnet.tasks import get_task
    from mpnet.training.finetune import Backend, finetune

    if args.task.lower() != "custom":
        get_task(args.task)  # an unknown task fails before anything is loaded
    config = config_from_args(args)
    check_window(args.sliding_window_size, "--sliding-window-size")
    backend = Backend("flex" if args.use_flex_attention else args.attention_backend, args.sliding_window_size)
    output = args.output_dir or Path("runs/finetune") / f"{config.task.name}-{backend.label.replace(':', 'w')}-seed{config.training.seed}"
    finetune(model_dir(args.checkpoint), args.data_dir, config, output, backend=backend, device=args.device, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
