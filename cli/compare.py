"""compare-mpnet-backends: fine-tune / evaluate one checkpoint under several attention backends; table + plot."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import OVERRIDES_HELP, OneLineErrorParser, command, int_list, overrides_from, parse_with_overrides, text_list

EPILOG = """examples:
  compare-mpnet-backends --checkpoint runs/tiny/checkpoints/step-00000300 --tasks sst2,rte --data-dir glue_data \\
      --backends dense,flex,flex:128 --seeds 1,2,3 --output-dir runs/compare
  compare-mpnet-backends --checkpoint ~/.cache/mpnet/all-mpnet-base-v2 --tasks sst2 --data-dir data/sentiment \\
      --config configs/glue/sentiment.yaml --backends dense,flex,flex:32 --seeds 1 --output-dir runs/compare-cpu

Backends: a backend's name, optionally :W for a sliding window of W tokens (flex:128). Where every
backend trains on the device (a CUDA GPU) each is fine-tuned; where one cannot train (flex on CPU) the
task is fine-tuned once with dense and that model is evaluated under each backend (the output says so);
one that cannot even run there (triton without CUDA) is refused before any work.
Writes OUTPUT/comparison.md, OUTPUT/comparison.png, OUTPUT/comparison.json and OUTPUT/runs/."""


def build_parser():
    from mpnet.modeling.backends import ATTENTION_BACKEND_NAMES

    p = OneLineErrorParser(prog="compare-mpnet-backends", description=__doc__, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="MPNet checkpoint dir (ours or any HF MPNet dir)")
    p.add_argument("--tasks", required=True, type=text_list, help="comma-separated GLUE tasks, e.g. sst2,rte")
    p.add_argument("--data-dir", type=Path, required=True, help="folder holding the task folders (glue_data)")
    p.add_argument("--backends", default="dense,flex", type=text_list,
                   help=f"comma-separated: {', '.join(ATTENTION_BACKEND_NAMES)}, each optionally :W "
                        "(default: dense,flex)")
    p.add_argument("--seeds", default=[1], type=int_list, help="comma-separated seeds (default: 1)")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--config", type=Path, help="YAML recipe for every task: a file or a packaged name such as "
                                               "glue/sentiment (default: the packaged glue/TASK)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    for flag, kind in [("--lr", float), ("--batch-size", int), ("--epochs", int), ("--max-length", int),
                       ("--eval-batch-size", int), ("--max-train-examples", int), ("--max-eval-examples", int)]:
        p.add_argument(flag, type=kind, help="override the recipe")
    p.add_argument("--compile", action="store_true", help="torch.compile each training forward (training.compile)")
    p.add_argument("--compile-mode", metavar="MODE",
                   help="torch.compile mode, implies --compile (training.compile_mode; default: default; "
                        "reduce-overhead: CUDA graphs)")
    p.add_argument("--compile-scope", metavar="SCOPE",
                   help="what torch.compile compiles, implies --compile (training.compile_scope; default: model; "
                        "model, or layers: each encoder layer compiled in place, one compile for all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help=OVERRIDES_HELP + " (sections: task, training)")
    return p


@command
def main(argv=None):
    args = parse_with_overrides(build_parser(), argv)
    from mpnet.modeling.checkpoint import model_dir
    from mpnet.training.compare import compare, parse_backends

    flags = {"training": {"lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs,
                          "eval_batch_size": args.eval_batch_size, "max_train_examples": args.max_train_examples,
                          "max_eval_examples": args.max_eval_examples,
                          "compile": True if args.compile or args.compile_mode or args.compile_scope else None,
                          "compile_mode": args.compile_mode, "compile_scope": args.compile_scope,
                          "progress_bar": False if args.no_progress else None},
             "task": {"max_length": args.max_length}}
    compare(model_dir(args.checkpoint), [t.lower() for t in args.tasks], args.data_dir,
            parse_backends(args.backends), args.seeds, args.output_dir, args.config, overrides_from(args, flags),
            args.device, args.overwrite)
    print((args.output_dir / "comparison.md").read_text())


if __name__ == "__main__":
    main()
