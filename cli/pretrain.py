"""pretrain-mpnet: pretrain (or continue pretraining) an MPNet encoder with the MPNet objective (or MLM / PLM)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import OVERRIDES_HELP, OneLineErrorParser, command, overrides_from, parse_with_overrides

EPILOG = """examples:
  pretrain-mpnet --config configs/mpnet-tiny.yaml --output-dir runs/tiny
  pretrain-mpnet --config configs/mpnet-base.yaml --data corpus/ --output-dir runs/base --use-flex-attention
  pretrain-mpnet --config configs/mpnet-tiny.yaml --output-dir runs/tiny --resume training.max_steps=2000
  pretrain-mpnet --config configs/mpnet-tiny.yaml --output-dir runs/swin --attention-pattern swin:64,softcap:30
  pretrain-mpnet --config configs/mpnet-tiny.yaml --output-dir runs/plm --objective plm
  torchrun --nproc-per-node 2 -m mpnet_cli.pretrain --config configs/mpnet-base.yaml --output-dir runs/ddp

Any config key can be overridden as SECTION.KEY=VALUE (sections: model, data, optim, training,
logging, distributed). Logs: OUTPUT/metrics.jsonl and `tensorboard --logdir OUTPUT/tensorboard`."""


def build_parser():
    p = OneLineErrorParser(prog="pretrain-mpnet", description=__doc__, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML run config: a file or a packaged name (mpnet-tiny, mpnet-small, "
                                               "mpnet-base, mpnet-long) (default: built-in tiny defaults)")
    p.add_argument("--output-dir", type=Path, help="where checkpoints, logs and the data cache go (required unless "
                                                     "--resume names the run)")
    p.add_argument("--data", help="raw text file/dir/JSONL or a saved Hugging Face dataset (preprocessed on the fly "
                                  "into OUTPUT/data-cache) or a preprocess-mpnet output dir; 'embedded' = the bundled "
                                  "Austen corpus")
    p.add_argument("--text-field", metavar="F", help="the field holding the text in JSONL rows and saved HF datasets "
                                                     "(default: data.text_field of --config, built-in text)")
    from mpnet.modeling.backends import ATTENTION_BACKEND_NAMES
    from mpnet.training.config import LoggingConfig, OptimConfig, TrainingConfig

    training, logging_, optim = TrainingConfig(), LoggingConfig(), OptimConfig()

    def default(key, value):  # the flags default to the config's value; these are the built-in ones
        return f"(default: {key} of --config, built-in {value})"

    p.add_argument("--max-steps", type=int, metavar="N",
                   help=f"optimizer steps to train for {default('training.max_steps', training.max_steps)}")
    p.add_argument("--lr", type=float, metavar="LR", help=f"peak learning rate {default('optim.lr', optim.lr)}")
    p.add_argument("--batch-size", type=int, metavar="N", help="examples per step and process "
                   + default("training.batch_size", training.batch_size))
    p.add_argument("--warmup-steps", type=int, metavar="N", help="linear warmup steps "
                   + default("optim.warmup_steps", optim.warmup_steps))
    p.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps, and at the end "
                   + default("logging.save_every", logging_.save_every))
    p.add_argument("--log-every", type=int, metavar="N",
                   help=f"log train metrics every N steps {default('logging.log_every', logging_.log_every)}")
    p.add_argument("--seed", type=int, metavar="S",
                   help=f"seed for init, data order, masking and dropout {default('training.seed', training.seed)}")
    p.add_argument("--objective", choices=["mpnet", "mlm", "plm"],
                   help="mpnet: masked and permuted LM (two streams, position compensation); mlm: BERT-style masked "
                        "LM (one stream); plm: XLNet-style permuted LM (two streams, no position compensation); see "
                        f"docs/objectives.md {default('training.objective', training.objective)}")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                   help="continue from the newest complete checkpoint in OUTPUT, or from PATH: a run directory, or "
                        "one of its checkpoints (to go back to it, with the newer ones moved away); its run config "
                        "is used and conflicting settings are refused (docs/resume.md)")
    p.add_argument("--use-flex-attention", action="store_true",
                   help="use the FlexAttention backend (needs CUDA for training) instead of the dense one")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKEND_NAMES,
                   help="attention backend (default: the config's, dense when unset; one that cannot train on this "
                        "machine, e.g. flex or triton without CUDA, is refused before any data is prepared; "
                        "--use-flex-attention = flex)")
    p.add_argument("--sliding-window-size", type=int, metavar="N",
                   help="each token attends only to original positions within N of its own")
    p.add_argument("--attention-pattern", metavar="SPEC",
                   help="sparse pattern and score mods on original positions, comma-separated: window:W, "
                        "neighbourhood:R, dilated:W:D, global:W[:P...], block:B, swin:B, prefix:P, softcap:C, "
                        "alibi (e.g. block:64,softcap:30; see docs/patterns.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logging.progress_bar=false)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help=OVERRIDES_HELP)
    return p


@command
def main(argv=None):
    args = parse_with_overrides(build_parser(), argv)
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.append(args.resume)  # `--resume training.max_steps=2000`: an override after a bare --resume
        args.resume = True
    flags = {
        "data": {"path": args.data, "text_field": args.text_field},
        "training": {"max_steps": args.max_steps, "seed": args.seed, "objective": args.objective,
                     "batch_size": args.batch_size},
        "optim": {"lr": args.lr, "warmup_steps": args.warmup_steps},
        "logging": {"save_every": args.save_every, "log_every": args.log_every,
                    "progress_bar": False if args.no_progress else None},
        "model": {"use_flex_attention": True if args.use_flex_attention else None,
                  "attention_backend": args.attention_backend,
                  "sliding_window_size": args.sliding_window_size, "attention_pattern": args.attention_pattern},
    }
    from mpnet.modeling.config import check_window
    from mpnet.training.config import PretrainConfig, build, load, merge, read_yaml
    from mpnet.training.pretrain import pretrain
    from mpnet.training.resume import resume_target

    check_window(args.sliding_window_size, "--sliding-window-size")
    overrides = overrides_from(args, flags)
    output_dir, resume_from = resume_target(args.output_dir, args.resume)
    run_config = output_dir / "config.yaml"
    if args.resume and not args.config and run_config.is_file():  # the values are checked against the run's own
        config = build(PretrainConfig, merge(read_yaml(run_config), overrides))
    else:
        config = load(PretrainConfig, args.config, overrides)  # every value checked here
    requested = merge(read_yaml(args.config), overrides) if args.config else overrides  # what --resume checks
    pretrain(config, output_dir, resume=bool(args.resume), requested=requested, resume_from=resume_from)


if __name__ == "__main__":
    main()
