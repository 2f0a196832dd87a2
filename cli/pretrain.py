"""pretrain-mpnet: pretrain (or continue pretraining) an MPNet encoder with the MPNet objective."""
from __future__ import annotations

import argparse
from pathlib import Path

from mpnet.configuration import add_flags, load, parse_overrides
from mpnet.errors import UserError

from ._common import OneLineErrorParser, command

EPILOG = """examples:
  pretrain-mpnet --config configs/mpnet-tiny.yaml --output-dir runs/tiny
  pretrain-mpnet --config configs/mpnet-base.yaml --data corpus/ --output-dir runs/base --use-flex-attention
  pretrain-mpnet --config configs/mpnet-tiny.yaml --output-dir runs/tiny --resume training.max_steps=2000
  pretrain-mpnet --config configs/mpnet-tiny.yaml --output-dir runs/swin --attention-pattern swin:64,softcap:30
  torchrun --nproc-per-node 2 -m mpnet_cli.pretrain --config configs/mpnet-base.yaml --output-dir runs/ddp

Any config key can be overridden as SECTION.KEY=VALUE (sections: model, data, optim, training,
logging, distributed). Logs: OUTPUT/metrics.jsonl and `tensorboard --logdir OUTPUT/tensorboard`."""


def build_parser():
    p = OneLineErrorParser(prog="pretrain-mpnet", description=__doc__, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML run config (default: built-in tiny defaults)")
    p.add_argument("--output-dir", type=Path, required=True, help="where checkpoints, logs and the data cache go")
    p.add_argument("--data", help="raw text file/dir/JSONL (preprocessed on the fly into OUTPUT/data-cache) or a "
                                  "preprocess-mpnet output dir; 'embedded' = the bundled Austen corpus")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train for")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (and at the end)")
    p.add_argument("--log-every", type=int, help="log train metrics every N steps")
    p.add_argument("--seed", type=int, help="seed for init, data order and masking")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in OUTPUT")
    p.add_argument("--use-flex-attention", action="store_true",
                   help="use the FlexAttention backend (needs CUDA for training) instead of the dense one")
    p.add_argument("--sliding-window-size", type=int, metavar="N",
                   help="each token attends only to original positions within N of its own")
    p.add_argument("--attention-pattern", metavar="SPEC",
                   help="sparse pattern and score mods on original positions, comma-separated: window:W, "
                        "neighbourhood:R, dilated:W:D, global:W[:P...], block:B, swin:B, prefix:P, softcap:C, "
                        "alibi (e.g. block:64,softcap:30; see docs/patterns.md)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")
    return p


@command
def main(argv=None):
    args = build_parser().parse_args(argv)
    overrides = parse_overrides(args.overrides)
    flags = {
        "data": {"path": args.data},
        "training": {"max_steps": args.max_steps, "seed": args.seed},
        "logging": {"save_every": args.save_every, "log_every": args.log_every},
        "model": {"use_flex_attention": True if args.use_flex_attention else None,
                  "sliding_window_size": args.sliding_window_size, "attention_pattern": args.attention_pattern},
    }
    if args.sliding_window_size is not None and args.sliding_window_size <= 0:
        raise UserError(f"--sliding-window-size must be a positive number of tokens, got {args.sliding_window_size}")
    add_flags(overrides, flags)
    pattern = overrides.get("model", {}).get("attention_pattern")
    if pattern is not None:  # the flag or model.attention_pattern=...: fail before any data is prepared
        import yaml

        from mpnet.modeling.patterns import parse_attention_pattern

        spec = yaml.safe_load(pattern) if isinstance(pattern, str) else pattern  # as model_config reads it
        parse_attention_pattern(None if spec is None else str(spec))

    from mpnet.training.config import PretrainConfig
    from mpnet.training.pretrain import pretrain

    config = load(PretrainConfig, args.config, overrides)
    for section in ("log_every", "save_every", "valid_every"):
        if getattr(config.logging, section) <= 0:
            raise UserError(f"logging.{section} must be positive")
    pretrain(config, args.output_dir, resume=args.resume)


if __name__ == "__main__":
    main()
