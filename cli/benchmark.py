"""benchmark-mpnet: attention, pretraining-step and fine-tuning speed and memory (docs/benchmarks.md).

  benchmark-mpnet all         every cell of the performance targets in one run, one report:
                              attention (two-stream pair and single stream), step, finetune
                              (--sections adds patterns, packing), then the targets table (each
                              goal met or not, from those cells); DIR/benchmark.{md,json} and plots
  benchmark-mpnet attention   one layer's attention per backend and length (fwd + bwd): the two-stream
                              pair and single stream (--streams)
  benchmark-mpnet step        a full mpnet-base pretraining step beside a BERT-base MLM step
  benchmark-mpnet finetune    a mpnet-base classification step: transformers' MPNet against ours (each backend)
  benchmark-mpnet patterns    the attention patterns (window, block, swin, ...) on flex against SDPA with a
                              dense mask and SDPA without one; DIR/patterns.{md,json}, patterns_time.png
  benchmark-mpnet packing     packed vs padded fine-tuning steps on GLUE-length sentences; DIR/packing.{md,json,png}
  benchmark-mpnet mask-build  the flex backend's BlockMask builders (tile summaries) against create_block_mask;
                              DIR/mask_build.{md,json,png}

Options without a subcommand run `all`. A benchmark is a command, never a timed test. On CPU the attention
is timed forward only (FlexAttention has no CPU backward) and everything runs in fp32; for a smoke
run: benchmark-mpnet --device cpu --quick. Method: docs/benchmarks.md and, for patterns, docs/patterns.md.
The Triton kernels' tiles and parts: `benchmark-mpnet attention --backends sdpa,triton --triton-tiles ...` (GPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from mpnet.bench.attention import run_attention
from mpnet.bench.harness import open_device, run_benchmarks
from mpnet.bench.mask_build import BUILDERS, MaskBuildSettings, run_mask_build
from mpnet.bench.packing import PackingSettings, run_packing
from mpnet.bench.patterns import DEFAULT_PATTERNS, QUICK_PATTERNS, PatternSettings, run_patterns
from mpnet.bench.problems import ATTENTION_CELLS, SINGLE_STREAM_LENGTHS, AttentionSettings
from mpnet.bench.targets import TargetSettings, run_targets
from mpnet.bench.step import (COMPILE_MODES, COMPILE_SCOPES, FINETUNE_MODELS, STEP_BACKENDS, STEP_MODELS,
                              FinetuneSettings, StepSettings, run_finetune, run_step)
from mpnet.modeling.backends import ATTENTION_BACKENDS

from . import benchmark_packing
from ._common import OneLineErrorParser, command, int_list, name_list, text_list

SUBCOMMANDS = ("all", "attention", "step", "finetune", "patterns", "packing", "mask-build")
SECTIONS = ("attention", "single", "step", "finetune", "patterns", "packing")
ALL_SECTIONS = ["attention", "single", "step", "finetune"]  # the cells of the performance targets
# Tiny sizes for --quick (any flag given still wins): seconds on a CPU.
QUICK = {
    "attention": dict(lengths=[64], tokens_per_batch=256, heads=2, head_dim=16, windows=[16], warmup=1, repeats=3,
                      max_seconds=1.0),
    "single": dict(lengths=[32], tokens_per_batch=256, heads=2, head_dim=16, windows=[16], warmup=1, repeats=3,
                   max_seconds=1.0),
    "step": dict(model="tiny", seq_len=32, batch_size=2, warmup=1, repeats=3, max_seconds=2.0),
    "finetune": dict(model="tiny", seq_len=32, batch_size=2, warmup=1, repeats=3, max_seconds=2.0),
    "patterns": dict(lengths=[64, 128], tokens_per_batch=512, heads=2, head_dim=16, patterns=QUICK_PATTERNS.split(","),
                     warmup=1, repeats=3, max_seconds=1.0),
    "packing": benchmark_packing.QUICK,
    "mask-build": dict(lengths=[64, 256], tokens_per_batch=256, windows=[None, 16], warmup=1, repeats=3,
                       max_seconds=1.0),
}
# `all` on a GPU also runs the fastest backend compiled, beside its compiled reference (target 3 and 6).
ALL_ALSO_COMPILE = ["bert-sparse", "bert", "transformers", "triton"]
# What every section takes from the command line, whichever subcommand runs it.
COMMON = {"device", "dtype", "seed", "warmup", "repeats", "max_seconds", "flex_kernel_options"}


def _json_object(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like {{\"num_stages\": 1}}, got {text}")
    return value


def _window_list(text):
    """--windows of mask-build: sizes and 'none' (no window)."""
    try:
        return [None if w.lower() == "none" else int(w) for w in text_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected window sizes and 'none', comma-separated, got '{text}'") from None


def common_args(parser, report="DIR/benchmark.md, benchmark.json and the plots", dtype=True, flex=True):
    """The options every subcommand takes; `dtype` and `flex` (--flex-kernel-options) where its cells use them."""
    g = parser.add_argument_group("common")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU when there is one)")
    if dtype:
        g.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                       help="bf16 autocast (default on CUDA) or fp32 (the only choice on CPU)")
    g.add_argument("--output-dir", default=None, metavar="DIR", help=f"write {report} here")
    g.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (any flag you give still wins)")
    g.add_argument("--seed", type=int, default=None, help="seed of the random inputs and weights (default 0)")
    g.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new cell after this many seconds (they are reported as SKIP); "
                        "results are written after every cell")
    g.add_argument("--resume", action="store_true",
                   help="keep the cells of DIR's report from an earlier run with the same options and measure "
                        "only the rest (with --time-budget: a long run in several commands)")
    g.add_argument("--warmup", type=int, default=None, help="warm-up runs per cell, the first compiles (default 3)")
    g.add_argument("--repeats", type=int, default=None,
                   help="timed runs per cell (default 20 attention, 10 step, 20 finetune; at least 3)")
    g.add_argument("--max-seconds", type=float, default=None,
                   help="stop repeating a cell after this much timing, once 3 runs are in (default 3 / 20 / 10)")
    if flex:
        g.add_argument("--flex-kernel-options", type=_json_object, default=None, metavar="JSON",
                       help="experiment: run the project's compiled flex_attention with these kernel_options in this "
                            "process, e.g. '{\"num_stages\": 1}' (default: the project's own)")


def attention_args(parser, streams=True, profile=True):
    g = parser.add_argument_group("attention")
    if profile:  # `all` has the step's --profile, which covers these cells too
        g.add_argument("--profile", action="store_true", default=None,
                       help="also break the SDPA flash and triton cells down by GPU kernel (torch.profiler; CUDA only)")
    g.add_argument("--lengths", type=int_list, default=None,
                   help="two-stream sequence lengths (default 512,1024,2048,4096,8192)")
    g.add_argument("--single-lengths", type=int_list, default=None,
                   help=f"single-stream lengths (default {','.join(map(str, SINGLE_STREAM_LENGTHS))})")
    if streams:
        g.add_argument("--streams", type=name_list(("two", "one")), default=None,
                       help="two (the pretraining pair), one (single stream) or two,one (default)")
    g.add_argument("--tokens-per-batch", type=int, default=None, help="B = this // L (default 16384)")
    g.add_argument("--heads", type=int, default=None, help="attention heads (default 12)")
    g.add_argument("--head-dim", type=int, default=None, help="head dimension (default 64)")
    g.add_argument("--windows", type=int_list, default=None, help="sliding-window sizes for flex-window (default 256,1024)")
    g.add_argument("--backends", type=name_list(ATTENTION_CELLS), default=None,
                   help=f"subset of the cells {','.join(ATTENTION_CELLS)} (default all)")
    g.add_argument("--layers", type=int, default=None,
                   help="sdpa-bias: layers sharing its once-per-forward bias build and gradient reduction (default 12)")
    g.add_argument("--forward-only", action="store_true", help="time forward passes only (always so on CPU)")
    g.add_argument("--with-projections", action="store_true", default=None,
                   help="include the q/k/v/o projections (default: attention core only)")
    g.add_argument("--attention-dropout", type=float, default=None,
                   help="the dense module's attention dropout (default 0.1, as in training; flex has none)")
    g.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="also time SDPA, flex and triton cells as CUDA-graph replays: GPU time without the host's "
                        "launch time, a column and a ratio table of their own (CUDA only; default off)")
    g.add_argument("--triton-tiles", type=text_list, default=None, metavar="LIST",
                   help="time each triton cell once per entry (CUDA only): 'default' (the kernels' own tiles), "
                        "fwd=, dkdv= or dq=MxN[wW][sS] (one kernel's tiles: block_m x block_n, warps, stages, e.g. "
                        "dkdv=32x64s3), or no-bias, no-bias-gradient, no-mask (that part left out: timing only, "
                        "wrong results); '+' joins changes of one entry")
    g.add_argument("--flex-variants", type=text_list, default=None, metavar="LIST",
                   help="time each flex cell once per entry (CUDA only): 'default' (the backend as it trains), "
                        "no-bias-gradient, no-bias, no-mask (that part left out: timing only, wrong results), "
                        "copies=QxK (the bias table copied per query row mod Q and key mod K, spreading its "
                        "gradient's atomic adds; the backend's own 128x1), or OPTION=VALUE (a flex kernel option "
                        "over the backend's, e.g. BLOCK_M1=64, bwd_num_warps=8); '+' joins changes of one entry")


def step_args(parser, flag, also_compile=STEP_MODELS):
    g = parser.add_argument_group("step")
    g.add_argument("--seq-len", type=int, default=None, help="sequence length (default 512)")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 32)")
    g.add_argument(flag, dest="step_backends", type=name_list(STEP_BACKENDS), default=None,
                   help=f"MPNet attention backend(s), a subset of {','.join(STEP_BACKENDS)} (default: each that "
                        "trains on the device, modeling/backends.py)")
    g.add_argument("--batch-sizes", type=int_list, default=None, metavar="LIST",
                   help="micro-batch sweep: every cell once per batch size, e.g. 32,64,128 (default: --batch-size)")
    g.add_argument("--also-all-rows", type=name_list(STEP_BACKENDS), default=None, metavar="NAMES",
                   help="run these MPNet backends' cells once more with the last layer on every row (rows 'all "
                        "rows'): what skipping the rows the loss never reads saves (default none)")
    g.add_argument("--no-bert", action="store_true",
                   help="skip the two BERT-base steps (MLM head on the masked rows, the reference; on every row)")
    model_args(g, also_compile)


def model_args(g, also_compile=STEP_MODELS):
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile every model")
    g.add_argument("--also-compile", type=name_list(also_compile), default=None, metavar="NAMES",
                   help=f"run these cells once more under torch.compile, rows '+compile' (a subset of "
                        f"{','.join(also_compile)}; default none, and {','.join(ALL_ALSO_COMPILE)} in `all` on a GPU)")
    g.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="torch.compile's mode for the compiled cells (default: default; reduce-overhead adds CUDA graphs)")
    g.add_argument("--compile-scope", choices=COMPILE_SCOPES, default=None,
                   help="what the compiled cells compile: model (one graph, default) or layers (each repeated layer "
                        "compiled in place, the rest eager: one compile serves every layer)")
    g.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default 989: H100/H200 SXM dense bf16)")
    g.add_argument("--model", choices=["base", "tiny"], default=None, help="model size (default base; tiny with --quick)")
    g.add_argument("--profile", action="store_true", default=None,
                   help="also break each model's step down by GPU kernel family, and in `all` the SDPA flash and "
                        "triton attention cells by kernel (torch.profiler; CUDA only)")


def finetune_args(parser, own=True):
    g = parser.add_argument_group("finetune")
    if own:
        g.add_argument("--seq-len", type=int, default=None, help="tokens per example (default 128)")
        g.add_argument("--batch-size", type=int, default=None, help="examples per step (default 32)")
        g.add_argument("--num-labels", type=int, default=None, help="classes (default 2)")
        model_args(g, FINETUNE_MODELS)
    g.add_argument("--models" if own else "--finetune-models", dest="finetune_models", type=name_list(FINETUNE_MODELS),
                   default=None, help=f"a subset of {','.join(FINETUNE_MODELS)} (default: transformers "
                                      "and each backend that trains on the device)")


def pattern_args(parser):
    g = parser.add_argument_group("patterns")
    g.add_argument("--lengths", type=int_list, default=None, help="sequence lengths (default 1024,4096)")
    g.add_argument("--patterns", type=text_list, default=None, metavar="LIST",
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


def mask_build_args(parser):
    d = MaskBuildSettings()
    g = parser.add_argument_group("mask-build")
    g.add_argument("--lengths", type=int_list, default=None, help=f"sequence lengths (default {','.join(map(str, d.lengths))})")
    g.add_argument("--windows", type=_window_list, default=None, help="window sizes, 'none' for no window (default none,256)")
    g.add_argument("--builders", type=name_list(BUILDERS), default=None,
                   help=f"subset of {','.join(BUILDERS)} (default {','.join(d.builders)}; compiled compiles for minutes)")
    g.add_argument("--tokens-per-batch", type=int, default=None, help=f"B = this // L (default {d.tokens_per_batch})")


def build_parser():
    parser = OneLineErrorParser(prog="benchmark-mpnet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    p = sub.add_parser("all", help="every cell of the performance targets, one report (the default)")
    p.add_argument("--sections", type=name_list(SECTIONS), default=None,
                   help=f"subset of {','.join(SECTIONS)} (default {','.join(ALL_SECTIONS)}; patterns and packing "
                        "run with their own defaults)")
    attention_args(p, streams=False, profile=False)
    step_args(p, "--step-backend", also_compile=tuple(dict.fromkeys(STEP_MODELS + FINETUNE_MODELS)))
    finetune_args(p, own=False)
    common_args(p)
    p = sub.add_parser("attention", help="attention backends: time and memory against sequence length")
    attention_args(p)
    common_args(p)
    p = sub.add_parser("step", help="full pretraining step (MPNet) beside a BERT MLM step")
    step_args(p, "--backend")
    common_args(p)
    p = sub.add_parser("finetune", help="mpnet-base sequence-classification step: transformers' MPNet vs ours")
    finetune_args(p)
    common_args(p)
    p = sub.add_parser("patterns", help="attention patterns: flex against SDPA with a dense mask and without")
    pattern_args(p)
    common_args(p, "DIR/patterns.md, patterns.json, patterns_time.png")
    benchmark_packing.add_parser(sub, common_args)  # packed vs padded fine-tuning steps (cli/benchmark_packing.py)
    p = sub.add_parser("mask-build", help="BlockMask builders: tile summaries against create_block_mask")
    mask_build_args(p)
    common_args(p, "DIR/mask_build.md, mask_build.json, mask_build.png", dtype=False, flex=False)
    return parser


# ---------------------------------------------------------------------------------- settings from args


def settings_from(cls, args, quick: dict, names=None, **fixed):
    """A settings dataclass from the command line: `fixed` values, else the flag of the field's name
    (of those in `names`, default every field) when given, else the --quick size, else the default."""
    values = dict(fixed)
    for f in dataclasses.fields(cls):
        if f.name in values:
            continue
        given = getattr(args, f.name, None) if names is None or f.name in names else None
        if given is not None:
            values[f.name] = given
        elif args.quick and f.name in quick:
            values[f.name] = quick[f.name]
    return cls(**values)


def device_fields(args, device) -> dict:
    cuda = device.type == "cuda"
    return {"device": str(device), "dtype": args.dtype or ("bf16" if cuda else "fp32")}


def attention_plan(args, device, streams, owned=True) -> list:
    names = None if owned else COMMON | {"profile"}
    fixed = dict(device_fields(args, device), backward=device.type == "cuda" and not getattr(args, "forward_only", False))
    plan = []
    if "two" in streams:
        plan.append((run_attention, settings_from(AttentionSettings, args, QUICK["attention"], names, streams="two",
                                                  **fixed)))
    if "one" in streams:
        lengths = getattr(args, "single_lengths", None) or (QUICK["single"]["lengths"] if args.quick
                                                             else SINGLE_STREAM_LENGTHS)
        plan.append((run_attention, settings_from(AttentionSettings, args, QUICK["single"], names, streams="one",
                                                  lengths=lengths, **fixed)))
    return plan


def also_compile(args, device, choices) -> list:
    """--also-compile's names that this section knows; in `all` on a GPU without the flag, ALL_ALSO_COMPILE."""
    chosen = args.also_compile
    if chosen is None:
        chosen = ALL_ALSO_COMPILE if args.what == "all" and device.type == "cuda" else []
    return [name for name in chosen if name in choices]


def step_plan(args, device) -> list:
    backends = args.step_backends or [name for name in STEP_BACKENDS if ATTENTION_BACKENDS[name].trains_on(device)]
    return [(run_step, settings_from(StepSettings, args, QUICK["step"], backends=backends, bert=not args.no_bert,
                                     also_compile=also_compile(args, device, STEP_MODELS),
                                     **device_fields(args, device)))]


def finetune_plan(args, device, owned=True) -> list:
    names = None if owned else COMMON | {"compile", "compile_mode", "compile_scope", "peak_tflops", "model", "profile"}
    models = args.finetune_models or [name for name in FINETUNE_MODELS
                                      if name not in ATTENTION_BACKENDS or ATTENTION_BACKENDS[name].trains_on(device)]
    return [(run_finetune, settings_from(FinetuneSettings, args, QUICK["finetune"], names, models=models,
                                         also_compile=also_compile(args, device, FINETUNE_MODELS),
                                         **device_fields(args, device)))]


def pattern_plan(args, device, owned=True) -> list:
    fixed = dict(device_fields(args, device), backward=device.type == "cuda" and not getattr(args, "forward_only", False),
                 relative_bias=not getattr(args, "no_relative_bias", False))
    return [(run_patterns, settings_from(PatternSettings, args, QUICK["patterns"], None if owned else COMMON, **fixed))]


def packing_plan(args, device, owned=True) -> list:
    names = None if owned else COMMON | {"model"}
    fixed = dict(device_fields(args, device), backward=device.type == "cuda")
    return [(run_packing, settings_from(PackingSettings, args, QUICK["packing"], names, **fixed))]


def plan_of(args, device) -> tuple[list, str]:
    """(the (run, settings) pairs to run in order, the report's file stem)."""
    if args.what == "attention":
        return attention_plan(args, device, args.streams or ["two", "one"]), "benchmark"
    if args.what == "step":
        return step_plan(args, device), "benchmark"
    if args.what == "finetune":
        return finetune_plan(args, device), "benchmark"
    if args.what == "patterns":
        return pattern_plan(args, device), "patterns"
    if args.what == "packing":
        return packing_plan(args, device), "packing"
    if args.what == "mask-build":
        settings = settings_from(MaskBuildSettings, args, QUICK["mask-build"], device=str(device))
        return [(run_mask_build, settings)], "mask_build"
    chosen = args.sections or ALL_SECTIONS
    plan = attention_plan(args, device, [s for k, s in (("attention", "two"), ("single", "one")) if k in chosen])
    plan += step_plan(args, device) if "step" in chosen else []
    plan += finetune_plan(args, device, owned=False) if "finetune" in chosen else []
    plan += pattern_plan(args, device, owned=False) if "patterns" in chosen else []
    plan += packing_plan(args, device, owned=False) if "packing" in chosen else []
    if {"attention", "step"} & set(chosen):  # the targets table, from the cells above
        plan.append((run_targets, TargetSettings(device=str(device))))
    return plan, "benchmark"


def with_subcommand(argv: list) -> list:
    """`benchmark-mpnet --device cpu --quick` runs `all`: a command line that starts with an option gets
    its subcommand moved to the front, or `all` when it names none. (An empty one still asks for a
    subcommand: `all` at full size on a CPU would run for hours.)"""
    if not argv or argv[0] in ("-h", "--help") or not argv[0].startswith("-"):
        return argv
    named = next((i for i, word in enumerate(argv) if word in SUBCOMMANDS), None)
    if named is None:
        return ["all"] + argv
    return [argv[named]] + argv[:named] + argv[named + 1:]


@command
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(with_subcommand(argv))
    device = open_device(args.device)
    plan, stem = plan_of(args, device)
    run_benchmarks(plan, device, out_dir=args.output_dir, stem=stem, time_budget=args.time_budget, resume=args.resume)
    return 0


if __name__ == "__main__":
    main()
