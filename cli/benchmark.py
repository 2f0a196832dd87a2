"""benchmark-mpnet: attention and pretraining-step speed and memory against sequence length.

  benchmark-mpnet attention   one two-stream attention call pair per backend and length (fwd + bwd)
  benchmark-mpnet step        a full mpnet-base pretraining step beside a BERT-base MLM step
  benchmark-mpnet all         both; writes DIR/benchmark.md, benchmark.json, attention_{time,memory}.png
  benchmark-mpnet patterns    the attention patterns (window, block, swin, ...) on flex against SDPA with a
                              dense mask and SDPA without one; writes DIR/patterns.{md,json}, patterns_time.png
  benchmark-mpnet packing     packed vs padded fine-tuning steps on GLUE-length sentences; DIR/packing.{md,json,png}

A benchmark is a command, never a timed test. On CPU only forward passes are timed (FlexAttention
has no CPU backward); use --device cpu --quick for a smoke run. Method: docs/benchmarks.md and, for
patterns, docs/patterns.md.
"""
from __future__ import annotations

import argparse
import json

import torch

from mpnet.benchmark import ATTENTION_BACKENDS, STEP_BACKENDS, AttentionSettings, StepSettings, benchmark
from mpnet.pattern_benchmark import DEFAULT_PATTERNS, QUICK_PATTERNS, PatternSettings, benchmark_patterns

from . import benchmark_packing
from ._common import command, int_list, name_list

QUICK_ATTENTION = dict(lengths=[64, 128], tokens_per_batch=512, heads=2, head_dim=16, windows=[16], warmup=1,
                       repeats=3, max_seconds=1.0)
QUICK_PATTERN = dict(lengths=[64, 128], tokens_per_batch=512, heads=2, head_dim=16,
                     patterns=QUICK_PATTERNS.split(","), warmup=1, repeats=3, max_seconds=1.0)
QUICK_STEP = dict(model="tiny", seq_len=64, batch_size=4, warmup=1, repeats=3, max_seconds=5.0)


def _json_object(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like {{\"num_stages\": 1}}, got {text}")
    return value


def _text_list(text):
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one comma-separated entry")
    return values


def _common(parser):
    g = parser.add_argument_group("common")
    g.add_argument("--device", default=None, help="cuda (default when available) or cpu (forward only)")
    g.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="autocast dtype (default bf16)")
    g.add_argument("--output-dir", default=None, metavar="DIR",
                   help="write DIR/benchmark.md, benchmark.json (and the attention plots) here; "
                        "patterns: DIR/patterns.md, patterns.json, patterns_time.png")
    g.add_argument("--quick", action="store_true",
                   help="tiny sizes for a smoke run (any flag you give still wins)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new cell after this many seconds (they are reported as SKIP); "
                        "results are written after every cell")
    g.add_argument("--warmup", type=int, default=None, help="warm-up runs per cell, the first compiles (default 3)")
    g.add_argument("--repeats", type=int, default=None,
                   help="timed runs per cell (default 20 attention, 10 step; at least 3)")
    g.add_argument("--max-seconds", type=float, default=None,
                   help="stop repeating a cell after this much timing, once 3 runs are in (default 3 / 20)")
    g.add_argument("--flex-kernel-options", type=_json_object, default=None, metavar="JSON",
                   help="experiment: run the project's compiled flex_attention with these kernel_options in this "
                        "process, e.g. '{\"num_stages\": 1}' (default: the project's own)")


def _attention_args(parser):
    g = parser.add_argument_group("attention")
    g.add_argument("--lengths", type=int_list, default=None, help="sequence lengths (default 512,1024,2048,4096,8192)")
    g.add_argument("--tokens-per-batch", type=int, default=None, help="B = this // L (default 16384)")
    g.add_argument("--heads", type=int, default=None, help="attention heads (default 12)")
    g.add_argument("--head-dim", type=int, default=None, help="head dimension (default 64)")
    g.add_argument("--windows", type=int_list, default=None, help="sliding-window sizes for flex-window (default 256,1024)")
    g.add_argument("--backends", type=name_list(ATTENTION_BACKENDS), default=None,
                   help=f"subset of {','.join(ATTENTION_BACKENDS)} (default all)")
    g.add_argument("--forward-only", action="store_true", help="time forward passes only (always so on CPU)")
    g.add_argument("--with-projections", action="store_true",
                   help="include the q/k/v/o projections (default: attention core only)")
    g.add_argument("--attention-dropout", type=float, default=None,
                   help="the dense module's attention dropout (default 0.1, as in training; flex has none)")


def _step_args(parser, flag):
    g = parser.add_argument_group("step")
    g.add_argument("--seq-len", type=int, default=None, help="sequence length (default 512)")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 32)")
    g.add_argument(flag, dest="step_backend", type=name_list(STEP_BACKENDS), default=None,
                   help="MPNet attention backend(s): dense, flex or dense,flex (default dense,flex on GPU, dense on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile both models")
    g.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak for MFU (default 989: H100/H200 SXM dense bf16)")
    g.add_argument("--model", choices=["base", "tiny"], default=None, help="model size (default base; tiny with --quick)")
    g.add_argument("--no-bert", action="store_true", help="skip the BERT-base comparison")
    g.add_argument("--profile", action="store_true",
                   help="also break each model's step down by GPU kernel family (torch.profiler; CUDA only)")


def _pattern_args(parser):
    g = parser.add_argument_group("patterns")
    g.add_argument("--lengths", type=int_list, default=None, help="sequence lengths (default 1024,4096)")
    g.add_argument("--patterns", type=_text_list, default=None, metavar="LIST",
                   help="comma-separated entries: none, any pattern of docs/patterns.md (window:256, dilated:128:2, "
                        "global:256, block:256, swin:256, prefix:P, softcap:30, alibi, ...), prefix alone "
                        "(P = L/4) or documents[:K] (K packed documents per row); '+' joins parts of one entry "
                        f"(block:64+softcap:30). Default {DEFAULT_PATTERNS}")
    g.add_argument("--tokens-per-batch", type=int, default=None, help="B = this // L (default 16384)")
    g.add_argument("--heads", type=int, default=None, help="attention heads (default 12)")
    g.add_argument("--head-dim", type=int, default=None, help="head dimension (default 64)")
    g.add_argument("--no-relative-bias", action="store_true",
                   help="flex without MPNet's relative-position bias (like for like with SDPA); default: with "
                        "the learnable bias and its gradient, as the model runs")
    g.add_argument("--forward-only", action="store_true", help="time forward passes only (always so on CPU)")
    g.add_argument("--resume", action="store_true",
                   help="keep the cells of DIR/patterns.json from an earlier run with the same options and "
                        "measure only the rest (with --time-budget: a long sweep in several commands)")


def build_parser():
    parser = argparse.ArgumentParser(prog="benchmark-mpnet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True, metavar="{attention,step,all,patterns,packing}")
    p = sub.add_parser("attention", help="attention backends: time and memory against sequence length")
    _attention_args(p)
    _common(p)
    p = sub.add_parser("step", help="full pretraining step (MPNet) beside a BERT MLM step")
    _step_args(p, "--backend")
    _common(p)
    p = sub.add_parser("all", help="attention sweep, then the step comparison; one report")
    _attention_args(p)
    _step_args(p, "--step-backend")
    _common(p)
    p = sub.add_parser("patterns", help="attention patterns: flex against SDPA with a dense mask and without")
    _pattern_args(p)
    _common(p)
    benchmark_packing.add_parser(sub)  # packed vs padded fine-tuning steps (cli/benchmark_packing.py)
    return parser


def _pick(args, name, quick, default):
    value = getattr(args, name, None)
    if value is not None:
        return value
    if args.quick and name in quick:
        return quick[name]
    return default


def attention_settings(args, device) -> AttentionSettings:
    d = AttentionSettings()
    q = QUICK_ATTENTION
    return AttentionSettings(
        lengths=_pick(args, "lengths", q, d.lengths),
        tokens_per_batch=_pick(args, "tokens_per_batch", q, d.tokens_per_batch),
        heads=_pick(args, "heads", q, d.heads),
        head_dim=_pick(args, "head_dim", q, d.head_dim),
        windows=_pick(args, "windows", q, d.windows),
        backends=_pick(args, "backends", q, d.backends),
        dtype=args.dtype,
        device=device,
        backward=torch.device(device).type == "cuda" and not args.forward_only,
        warmup=_pick(args, "warmup", q, d.warmup),
        repeats=_pick(args, "repeats", q, d.repeats),
        max_seconds=_pick(args, "max_seconds", q, d.max_seconds),
        with_projections=args.with_projections,
        attention_dropout=_pick(args, "attention_dropout", q, d.attention_dropout),
        seed=args.seed,
        flex_kernel_options=args.flex_kernel_options,
    )


def pattern_settings(args, device) -> PatternSettings:
    d = PatternSettings()
    q = QUICK_PATTERN
    return PatternSettings(
        lengths=_pick(args, "lengths", q, d.lengths),
        tokens_per_batch=_pick(args, "tokens_per_batch", q, d.tokens_per_batch),
        heads=_pick(args, "heads", q, d.heads),
        head_dim=_pick(args, "head_dim", q, d.head_dim),
        patterns=_pick(args, "patterns", q, d.patterns),
        relative_bias=not args.no_relative_bias,
        dtype=args.dtype,
        device=device,
        backward=torch.device(device).type == "cuda" and not args.forward_only,
        warmup=_pick(args, "warmup", q, d.warmup),
        repeats=_pick(args, "repeats", q, d.repeats),
        max_seconds=_pick(args, "max_seconds", q, d.max_seconds),
        seed=args.seed,
        flex_kernel_options=args.flex_kernel_options,
    )


def step_settings(args, device) -> StepSettings:
    d = StepSettings()
    q = QUICK_STEP
    cuda = torch.device(device).type == "cuda"
    return StepSettings(
        seq_len=_pick(args, "seq_len", q, d.seq_len),
        batch_size=_pick(args, "batch_size", q, d.batch_size),
        backends=args.step_backend or (list(STEP_BACKENDS) if cuda else ["dense"]),
        compile=args.compile,
        peak_tflops=args.peak_tflops,
        dtype=args.dtype,
        device=device,
        model=_pick(args, "model", q, d.model),
        bert=not args.no_bert,
        warmup=_pick(args, "warmup", q, d.warmup),
        repeats=_pick(args, "repeats", q, d.repeats),
        max_seconds=_pick(args, "max_seconds", q, d.max_seconds),
        seed=args.seed,
        flex_kernel_options=args.flex_kernel_options,
        profile=args.profile,
    )


@command
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.what == "packing":
        return benchmark_packing.run(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.what == "patterns":
        benchmark_patterns(pattern_settings(args, device), out_dir=args.output_dir, time_budget=args.time_budget,
                           resume=args.resume)
        return 0
    attention = attention_settings(args, device) if args.what in ("attention", "all") else None
    step = step_settings(args, device) if args.what in ("step", "all") else None
    benchmark(attention, step, out_dir=args.output_dir, time_budget=args.time_budget)
    return 0


if __name__ == "__main__":
    main()
