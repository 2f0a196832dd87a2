#!/usr/bin/env python3
"""The pretraining-quality benchmark: does pretraining with this framework yield a better encoder, and which
objective yields the best one? One table, from one command.

From the repository root, installed (`pip install -e .`) or not:

    mkdir -p /tmp/shim && ln -sfn "$PWD/cli" /tmp/shim/mpnet_cli
    python scripts/build_corpus.py --out data/corpus                 # the benchmark corpus (~21.6M tokens)
    python scripts/make_sentiment_data.py data/sentiment             # the default held-out task
    PYTHONPATH=.:/tmp/shim python3 scripts/quality_benchmark.py --out runs/quality --data data/corpus

What it runs, through the commands' own entry points (in this process; with --jobs N, N at once, each in its own
process), the exact command lines in the json:
1. --data (default: the config's corpus) preprocessed once into OUT/data, so every objective reads the same shards;
2. the pretraining budget: --steps N, or --minutes-per-objective M turned into N from a short timed mpnet run
   (mpnet is the most expensive objective, so none takes longer than M minutes): the same token budget for all;
3. `pretrain-mpnet --objective X --max-steps N` for each of --objectives: --config's model and optimizer
   (configs/mpnet-small-corpus.yaml: 4 layers, hidden 256, batches of 256 x 128), warmup 10% of the steps,
   validation ten times on the way (with --budget-points K, a checkpoint at each K-th of the steps, each scored
   as its own row OBJECTIVE/step-N: the budget trend of one pretraining);
4. a fresh, untrained model of the same config (row "none": what fine-tuning alone reaches);
5. `finetune-mpnet` of every checkpoint on every --task (default: the sentiment task of
   scripts/make_sentiment_data.py; any GLUE-layout folder as TASK=DIR), for each --finetune-seeds seed (and each
   lr of a --finetune-lr grid, each row then scored at its best lr);
6. OUT/quality.md, OUT/quality.json, OUT/quality_pretraining.png (fill-mask accuracy against tokens) and
   OUT/quality_finetune.png (dev score per row, each seed a dot, the mean a bar).

With --checkpoint DIR (repeatable) it pretrains nothing and scores those checkpoints (any MPNet checkpoint: ours,
an HF MPNet directory) the same way, beside an untrained model of --config unless --no-baseline; a checkpoint of a
pretrain-mpnet run (RUN/checkpoints/step-N) gets its tokens and fill-mask accuracy from the run's record, so
several checkpoints of one run give a budget trend.

The valid accuracy that ranks objectives is the fill-mask accuracy: one stream, a fixed 15% of the held-out
tokens replaced by <mask>, the same batches for every objective (mpnet/training/evaluation.py). Each objective's
own valid loss and accuracy are in the json; they measure different tasks and do not rank the objectives.
"""
from __future__ import annotations

import importlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from command_runs import begin_run, failer, output_parser

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = ("mpnet", "mlm", "plm")
# Rows beyond the three objectives: (objective, extra config overrides). mpnet is the original MPNet code's
# inputs (data.corrupted_input=appended, the default); mpnet-content the other layout (docs/objectives.md);
# mpnet-steep-bias the steeper locality prior (training.relative_bias_init=local, docs/bench/dynamics.md).
VARIANTS = {"mpnet-content": ("mpnet", ["data.corrupted_input=content"]),
            "mpnet-steep-bias": ("mpnet", ["training.relative_bias_init=local"])}
ROWS = {**{name: (name, []) for name in OBJECTIVES}, **VARIANTS}
BASELINE = "none"
PROG = "quality_benchmark"
DEFAULT_TASK = "sst2=data/sentiment"
# The config keys every pretraining command sets itself (pretrain_argv), each with the flag that chooses it here:
# --pretrain-set may not set them too.
SET_BY_THE_BENCHMARK = {"training.max_steps": "--steps", "training.batch_size": "--batch-size",
                        "training.objective": "--objectives", "optim.warmup_steps": "10% of --steps",
                        "logging.save_every": "--budget-points", "logging.log_every": "--steps",
                        "logging.valid_every": "--budget-points", "logging.keep_last": "--budget-points",
                        "data.corrupted_input": "--objectives (mpnet-content)",
                        "training.relative_bias_init": "--objectives (mpnet-steep-bias)",
                        "model.attention_backend": "--attention-backend"}


fail = failer(PROG)


def parse_args(argv=None):
    from mpnet.modeling.backends import ATTENTION_BACKEND_NAMES

    p = output_parser(PROG, __doc__)
    p.add_argument("--data", help="pretraining corpus: text files or folders, or preprocessed shards "
                                  "(default: --config's data.path)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "mpnet-small-corpus.yaml",
                   help="pretraining config: model, optimizer, block size, batch")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="pretraining steps per objective (the token budget: steps x "
                                                   "batch x block)")
    budget.add_argument("--minutes-per-objective", type=float,
                        help="pretraining time of the mpnet objective, turned into steps from a short timed run "
                             "(1.5 when --steps is not given)")
    p.add_argument("--budget-points", type=int, default=1,
                   help="score each objective at this many evenly spaced budgets: checkpoints of the same run, "
                        "rows OBJECTIVE/step-N (a budget trend from one pretraining per objective)")
    p.add_argument("--objectives", default=",".join(OBJECTIVES),
                   help=f"comma-separated rows among {', '.join(ROWS)}")
    p.add_argument("--checkpoint", type=Path, action="append", default=[],
                   help="score this checkpoint instead of pretraining (repeatable)")
    p.add_argument("--batch-size", type=int, help="pretraining examples per step (default: the config's)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKEND_NAMES,
                   help="for pretraining and fine-tuning (default: triton on cuda, dense on cpu)")
    p.add_argument("--probe-steps", type=int, default=60, help="steps of the timed run behind --minutes-per-objective")
    p.add_argument("--task", action="append", default=[], metavar="TASK=DIR",
                   help=f"a GLUE task and its folder in the GLUE layout, repeatable (default: {DEFAULT_TASK}); "
                        "sst2 uses configs/glue/sentiment.yaml, other tasks configs/glue/TASK.yaml")
    p.add_argument("--finetune-seeds", default="1,2,3", help="comma-separated fine-tuning seeds")
    p.add_argument("--finetune-lr", default="3e-4",
                   help="peak fine-tuning lr (a 4-layer model needs more than the recipes' 1e-5 to 2e-5: "
                        "docs/compare-sentiment-small/ measured 1e-4, 3e-4 and 1e-3); a comma-separated list is a "
                        "grid: every row fine-tuned at each, scored at the lr of its best mean (the published "
                        "protocol of small BERTs), every lr's scores in the json")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-max-length", type=int, default=64, help="tokens per example")
    p.add_argument("--finetune-max-train-examples", type=int, help="a fixed subset of each task's training set")
    p.add_argument("--no-baseline", action="store_true", help="skip the untrained-model row")
    p.add_argument("--pretrain-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config override for every pretraining run, repeatable (e.g. training.compile=true); "
                        "checked against --config before anything runs")
    p.add_argument("--jobs", type=int, default=1,
                   help="commands run at once (each in its own process, its output in OUT/logs/): the pretraining "
                        "rows side by side on the one GPU (a small model leaves most of it idle), then the "
                        "fine-tuning runs; --minutes-per-objective times one row alone")
    p.add_argument("--redraw", type=Path, metavar="QUALITY_JSON",
                   help="run nothing: write the report (quality.md, the plots, the json) into --out again from a "
                        "run's quality.json, its options taken from the command recorded there (e.g. when only the "
                        "json came back from the machine that ran it)")
    args = p.parse_args(argv)
    args.objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    unknown = [o for o in args.objectives if o not in ROWS]
    if unknown or not args.objectives:
        fail(f"--objectives takes names among {', '.join(ROWS)}, got {', '.join(unknown) or 'none'}")
    try:
        args.finetune_seeds = [int(s) for s in args.finetune_seeds.split(",") if s.strip()]
    except ValueError:
        fail(f"--finetune-seeds takes comma-separated integers, got {args.finetune_seeds!r}")
    try:
        args.finetune_lrs = [float(s) for s in str(args.finetune_lr).split(",") if s.strip()]
    except ValueError:
        fail(f"--finetune-lr takes a number or comma-separated numbers, got {args.finetune_lr!r}")
    if not args.finetune_lrs or min(args.finetune_lrs) <= 0:
        fail(f"--finetune-lr must be positive, got {args.finetune_lr!r}")
    args.tasks = {}
    for spec in args.task or [DEFAULT_TASK]:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            fail(f"--task takes TASK=DIR (e.g. {DEFAULT_TASK}), got {spec!r}")
        args.tasks[name.strip().lower()] = Path(folder)
    for name in ("steps", "minutes_per_objective", "batch_size", "probe_steps", "finetune_epochs", "jobs",
                 "budget_points"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {value}")
    for pair in args.pretrain_set:
        key = pair.split("=", 1)[0].strip()
        if key in SET_BY_THE_BENCHMARK:
            fail(f"--pretrain-set {pair}: the benchmark sets {key} itself (choose it with {SET_BY_THE_BENCHMARK[key]})")
    args.attention_backend = args.attention_backend or ("triton" if args.device == "cuda" else "dense")
    if args.steps is None and args.minutes_per_objective is None:
        args.minutes_per_objective = 1.5
    if args.steps is not None and args.steps % args.budget_points:
        fail(f"--steps must be a multiple of --budget-points ({args.budget_points}), got {args.steps}")
    return args


def shown(value) -> str:
    """A command-line word; paths under the current folder relative to it (the commands as typed from the root)."""
    if isinstance(value, Path) and value.is_absolute():
        try:
            return str(value.relative_to(Path.cwd()))
        except ValueError:
            pass
    return str(value)


def require_runtime(device: str, fail):
    """Stop in one line (through `fail`) when the commands are not importable or --device cuda has no GPU."""
    try:
        importlib.import_module("mpnet_cli.pretrain")
    except ModuleNotFoundError:
        fail("mpnet_cli is not importable: pip install -e . or run with PYTHONPATH=.:/tmp/shim after "
             "mkdir -p /tmp/shim && ln -sfn \"$PWD/cli\" /tmp/shim/mpnet_cli")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is visible; pass --device cpu for a (slow) CPU run")


def run_command(program: str, module: str, argv: list, log: list, fail=fail) -> float:
    """Run a command's main() here; stop (through `fail`) on a non-zero exit. Returns its wall time in seconds."""
    line = command_line(program, argv)
    print(f"\n$ {line}", flush=True)
    main = importlib.import_module(f"mpnet_cli.{module}").main
    start = time.perf_counter()
    try:
        main([shown(a) for a in argv])
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            fail(f"`{line}` exited with {exit_.code} (its error is above)")
    seconds = time.perf_counter() - start
    log.append({"command": line, "seconds": round(seconds, 1)})
    return seconds


def command_line(program: str, argv: list) -> str:
    return f"{program} " + " ".join(shlex.quote(shown(a)) for a in argv)


def run_commands(commands: list[tuple[str, str, list, str]], log: list, jobs: int, logs: Path) -> list[float]:
    """(program, module, argv, name) commands, `jobs` at once; wall seconds of each. With jobs 1 each runs here
    (run_command); else each in its own process, its output in logs/NAME.log, all finished before one that
    failed stops the run (its log named)."""
    if jobs == 1:
        return [run_command(program, module, argv, log) for program, module, argv, _ in commands]
    from concurrent.futures import ThreadPoolExecutor

    logs.mkdir(parents=True, exist_ok=True)

    def run(command):
        program, module, argv, name = command
        start = time.perf_counter()
        with open(logs / f"{name}.log", "w") as out:
            code = subprocess.run([sys.executable, "-m", f"mpnet_cli.{module}", *map(shown, argv)], stdout=out,
                                  stderr=subprocess.STDOUT).returncode
        return code, time.perf_counter() - start

    for program, _, argv, name in commands:
        print(f"$ {command_line(program, argv)}    > {shown(logs / name)}.log", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(run, commands))
    for (program, _, argv, name), (code, seconds) in zip(commands, results):
        if code != 0:
            fail(f"`{command_line(program, argv)}` exited with {code}; its output: {shown(logs / name)}.log")
        log.append({"command": command_line(program, argv), "seconds": round(seconds, 1), "at_once": jobs})
    return [seconds for _, seconds in results]


def git_commit() -> str:
    """The checkout's commit; "unknown" outside a git checkout of the project (a copy of it inside another
    repository must not report that repository's commit)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != REPO.resolve():
            return "unknown"
        return git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------- pretraining


def pretrain_argv(args, shards: Path, row: str, out: Path, steps: int, log_every=None, valid_every=None,
                  points: int = 1) -> list:
    """The row's pretrain-mpnet command: a checkpoint at each of `points` evenly spaced budgets (the last at
    `steps`), about ten validations in all, one at each checkpoint."""
    objective, overrides = ROWS[row]
    save_every = steps // points
    valid_every = valid_every or max(1, save_every // max(1, round(10 / points)))
    return [*overrides, *args.pretrain_set, "--config", args.config, "--output-dir", out, "--data", shards,
            "--objective", objective,
            "--max-steps", steps, "--save-every", save_every, "--log-every", log_every or max(1, steps // 20),
            "--no-progress", "--attention-backend", args.attention_backend,
            f"training.batch_size={args.batch_size}", f"optim.warmup_steps={max(1, round(0.1 * steps))}",
            f"logging.valid_every={valid_every}", f"logging.keep_last={0 if points > 1 else 1}"]


def calibrate_steps(args, shards: Path, block_size: int, log: list) -> tuple[int, dict]:
    probe = args.out / "probe"
    # Logged in two halves: the rate is that of the second (the first holds the start-up: allocator, kernels).
    # No validation on the way: with one every probe_steps // 10 steps the first GPU run measured 138k tokens/s
    # where the rows then trained at 250-290k, so 0.9 minutes per objective became 0.5.
    argv = pretrain_argv(args, shards, "mpnet", probe, args.probe_steps, log_every=max(1, args.probe_steps // 2),
                         valid_every=args.probe_steps + 1)
    run_command("pretrain-mpnet", "pretrain", argv, log)
    summary = json.loads((probe / "summary.json").read_text())
    seconds_per_step = args.batch_size * block_size / summary["tokens_per_s"]
    steps = max(1, int(args.minutes_per_objective * 60 / seconds_per_step) // args.budget_points) * args.budget_points
    return steps, {"probe_steps": args.probe_steps, "mpnet_tokens_per_s": summary["tokens_per_s"],
                   "seconds_per_step": seconds_per_step}


def pretrain_rows(args, shards: Path, steps: int, block_size: int, log: list) -> list[dict]:
    commands = [("pretrain-mpnet", "pretrain", pretrain_argv(args, shards, row, args.out / "pretrain" / row, steps,
                                                             points=args.budget_points),
                 f"pretrain-{row}") for row in args.objectives]
    seconds = run_commands(commands, log, args.jobs, args.out / "logs")
    rows = []
    for row, s in zip(args.objectives, seconds):
        final = pretrain_result(args, row, steps, block_size, s)
        if args.budget_points > 1:  # the earlier budgets: checkpoints of the same run, read from its record
            checkpoints = args.out / "pretrain" / row / "checkpoints"
            rows += [checkpoint_row(checkpoints / f"step-{n:08d}")
                     for n in range(steps // args.budget_points, steps, steps // args.budget_points)]
            final["row"] = f"{row}/step-{steps:08d}"
        rows.append(final)
    return rows


def pretrain_result(args, row: str, steps: int, block_size: int, seconds: float) -> dict:
    out = args.out / "pretrain" / row
    summary = json.loads((out / "summary.json").read_text())
    tokens_per_step = args.batch_size * block_size
    curve = validation_curve(out, tokens_per_step)
    return {"row": row, "steps": steps, "tokens": steps * tokens_per_step, "pretrain_seconds": round(seconds, 1),
            "train_loss": summary["last_train_loss"], "valid_loss": summary["valid_loss"],
            "valid_accuracy": summary["valid_accuracy"], "fill_mask_accuracy": summary["valid_fill_mask_accuracy"],
            "tokens_per_s": summary["tokens_per_s"], "fill_mask": summary.get("fill_mask"), "curve": curve,
            "checkpoint": summary["checkpoint"]}


def validation_curve(run: Path, tokens_per_step: int, last_step: float = float("inf")) -> list[dict]:
    """A pretrain-mpnet run's validations up to last_step, from RUN/metrics.jsonl."""
    return [{"step": r["step"], "tokens": r["step"] * tokens_per_step,
             "fill_mask_accuracy": r.get("valid/fill_mask_accuracy"), "accuracy": r.get("valid/accuracy")}
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "valid/loss" in r and r["step"] <= last_step]


def checkpoint_row(checkpoint: Path) -> dict:
    """A --checkpoint row. A checkpoint of a pretrain-mpnet run (RUN/checkpoints/step-N) is named RUN/step-N and
    reads its run's record: tokens up to step N (steps x batch x grad_accum x block of RUN/config.yaml, one
    process), the fill-mask curve up to N and its value at N from RUN/metrics.jsonl; any other directory is
    named by itself, its columns left empty."""
    import yaml

    run = checkpoint.parent.parent
    recorded = (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
    if not (checkpoint.name.startswith("step-") and recorded):
        return {"row": checkpoint.name, "checkpoint": str(checkpoint)}
    step = int(checkpoint.name.removeprefix("step-"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    training = config["training"]
    tokens_per_step = training["batch_size"] * training.get("grad_accum", 1) * config["data"]["block_size"]
    curve = validation_curve(run, tokens_per_step, last_step=step)
    at_step = next((c for c in curve if c["step"] == step), {})
    return {"row": f"{run.name}/{checkpoint.name}", "objective": training.get("objective"), "steps": step,
            "tokens": step * tokens_per_step, "fill_mask_accuracy": at_step.get("fill_mask_accuracy"),
            "valid_accuracy": at_step.get("accuracy"), "curve": curve, "checkpoint": str(checkpoint)}


def untrained_checkpoint(config: Path, shards: Path, folder: Path) -> Path:
    """A fresh model of the config with the original MPNet initialisation, saved as a checkpoint."""
    import torch

    from mpnet.data import load_tokenizer, read_metadata
    from mpnet.modeling import MPNetForPretraining
    from mpnet.training.config import PretrainConfig, load, model_config

    cfg = load(PretrainConfig, config)
    meta = read_metadata(shards)
    torch.manual_seed(cfg.training.seed)
    model = MPNetForPretraining(model_config(cfg.model, vocab_size=meta["vocab_size"],
                                             pad_token_id=meta["pad_token_id"], mask_token_id=meta["mask_token_id"]))
    model.save_pretrained(folder, tokenizer=load_tokenizer(str(shards / "tokenizer")))
    return folder


# ------------------------------------------------------------------------------------------ fine-tuning


def task_config(task: str) -> Path:
    return REPO / "configs" / "glue" / ("sentiment.yaml" if task == "sst2" else f"{task}.yaml")


def finetune_all(args, rows: list[dict], log: list):
    """Every row's checkpoint fine-tuned on every task per lr and seed: r["finetune"] = {task: [{seed, best,
    best_epoch, last, seconds}]} at the lr of the best mean (r["finetune_lr"][task]), every lr's in
    r["finetune_grid"] = {task: {lr: [...]}}; dev score x100."""
    runs, commands = [], []
    grid = len(args.finetune_lrs) > 1
    for r in rows:
        name = r["row"].replace("/", "-")
        for task, folder in args.tasks.items():
            for lr in args.finetune_lrs:
                for seed in args.finetune_seeds:
                    run = f"{name}-lr{lr:g}-seed{seed}" if grid else f"{name}-seed{seed}"
                    out = args.out / "finetune" / task / run
                    argv = ["--checkpoint", r["checkpoint"], "--task", task, "--data-dir", folder, "--config",
                            task_config(task), "--output-dir", out, "--device", args.device, "--seed", seed, "--lr",
                            lr, "--epochs", args.finetune_epochs, "--max-length", args.finetune_max_length,
                            "--attention-backend", args.attention_backend, "--no-progress"]
                    if args.finetune_max_train_examples:
                        argv += ["--max-train-examples", args.finetune_max_train_examples]
                    runs.append((r, task, lr, seed, out))
                    commands.append(("finetune-mpnet", "finetune", argv, f"finetune-{task}-{run}"))
    seconds = run_commands(commands, log, args.jobs, args.out / "logs")
    for r in rows:
        r["finetune_grid"] = {task: {lr: [] for lr in args.finetune_lrs} for task in args.tasks}
    for (r, task, lr, seed, out), s in zip(runs, seconds):
        results = json.loads((out / "results.json").read_text())
        r["finetune_grid"][task][lr].append({"seed": seed, "best": 100 * results["best"]["score"],
                                             "best_epoch": results["best"]["epoch"],
                                             "last": 100 * results["epochs"][-1]["score"], "seconds": round(s, 1)})
    for r in rows:
        r["finetune_lr"] = {task: best_lr(r["finetune_grid"][task]) for task in args.tasks}
        r["finetune"] = {task: r["finetune_grid"][task][r["finetune_lr"][task]] for task in args.tasks}


def best_lr(scores_by_lr: dict) -> float:
    """The lr whose seeds' mean dev score is highest (the first such in grid order on a tie)."""
    return max(scores_by_lr, key=lambda lr: statistics.mean(s["best"] for s in scores_by_lr[lr]))


# ------------------------------------------------------------------------------------------------ report


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def plot(rows: list[dict], tasks: list[str], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # one curve per pretraining run: checkpoints of one run (RUN/step-N) share it, the longest drawn, named RUN
    curves = {}
    for r in rows:
        run = r["row"].split("/")[0]
        if r.get("curve") and len(r["curve"]) > len(curves.get(run, [])):
            curves[run] = r["curve"]
    if curves:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for run, curve in curves.items():
            points = [(c["tokens"] / 1e6, c["fill_mask_accuracy"]) for c in curve
                      if c["fill_mask_accuracy"] is not None]
            ax.plot(*zip(*points), marker="o", markersize=3, label=run)
        ax.set(xlabel="pretraining tokens (M)", ylabel="fill-mask accuracy (held out)",
               title="Pretraining: the same batches scored for every objective")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "quality_pretraining.png", dpi=110)
        plt.close(fig)
        written.append("quality_pretraining.png")
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.8, 1.4 * len(rows)) * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, r in enumerate(rows):
            values = [s["best"] for s in r["finetune"][task]]
            ax.bar(i, statistics.mean(values), color="#9ecae1" if r["row"] != BASELINE else "#d9d9d9")
            ax.plot([i] * len(values), values, "o", color="#08519c", markersize=4)
        baseline = [statistics.mean(s["best"] for s in r["finetune"][task]) for r in rows if r["row"] == BASELINE]
        if baseline:  # the line every pretrained bar has to clear
            ax.axhline(baseline[0], color="#636363", linestyle="--", linewidth=1, label="untrained (mean)")
            ax.legend(loc="lower right")
        # RUN/step-N on two lines: checkpoints of a budget trend have long names
        ax.set_xticks(range(len(rows)), [r["row"].replace("/", "\n") for r in rows])
        low = min(s["best"] for r in rows for s in r["finetune"][task])
        ax.set_ylim(max(0, low - 5), min(100, max(s["best"] for r in rows for s in r["finetune"][task]) + 2))
        ax.set(ylabel="dev score x100 (best epoch)", title=f"{task}: each seed a dot, the mean a bar")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "quality_finetune.png", dpi=110)
    plt.close(fig)
    return written + ["quality_finetune.png"]


def write_report(args, rows: list[dict], facts: dict):
    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    tasks = list(args.tasks)
    lines = ["# Pretraining quality: what each pretrained encoder fine-tunes to", "",
             f"- command: `{facts['command']}`",
             f"- device: {facts['device']}; torch {facts['torch']}; commit {facts['commit']}; {facts['date']}",
             f"- model: `{facts['config']}`; pretraining data: `{facts['data']}`"
             + (f" ({facts['data_tokens']['train']:,} training tokens, {facts['data_tokens']['valid']:,} held out)"
                if facts.get("data_tokens") else ""),
             f"- fine-tuning: {', '.join(f'{t} (`{shown(d)}`)' for t, d in args.tasks.items())}; lr "
             + (f"{args.finetune_lrs[0]:g}" if len(args.finetune_lrs) == 1 else
                f"the best mean of {', '.join(f'{lr:g}' for lr in args.finetune_lrs)} per row and task "
                "(the lr beside each score)")
             + f", {args.finetune_epochs} epochs, <= {args.finetune_max_length} tokens, seeds "
             f"{','.join(map(str, args.finetune_seeds))}; dev score x100 at the best epoch, mean ± sample std",
             f"- wall time of the whole run: {facts['total_seconds'] / 60:.1f} min"
             + (f" ({facts['jobs']} commands at once: the minutes below overlap)" if facts["jobs"] > 1 else ""), "",
             "| row | pretraining tokens | minutes | fill-mask acc (held out) | "
             + " | ".join(f"{t} dev" for t in tasks) + " |",
             "|---|---|---|---|" + "---|" * len(tasks)]
    for r in rows:
        minutes = None if r.get("pretrain_seconds") is None else r["pretrain_seconds"] / 60
        cells = [spread([s["best"] for s in r["finetune"][t]])
                 + (f" (lr {r['finetune_lr'][t]:g})" if len(args.finetune_lrs) > 1 else "") for t in tasks]
        lines.append(f"| {r['row']} | {fmt(r.get('tokens'), ',')} | {fmt(minutes, '.1f')} "
                     f"| {fmt(r.get('fill_mask_accuracy'), '.3f')} | " + " | ".join(cells) + " |")
    baseline = next((r for r in rows if r["row"] == BASELINE), None)
    if baseline:
        lines += ["", "Against the untrained model (difference of the means, in points; the table holds each "
                      "seed spread):", ""]
        for r in rows:
            if r is baseline:
                continue
            parts = []
            for t in tasks:
                ours, base = ([s["best"] for s in x["finetune"][t]] for x in (r, baseline))
                parts.append(f"{t} {statistics.mean(ours) - statistics.mean(base):+.2f}")
            lines.append(f"- {r['row']}: " + ", ".join(parts))
    lines += ["", "Row `none` is the same model untrained (the original initialisation), fine-tuned the same way. "
              "The fill-mask accuracy scores one stream on the same held-out batches for every objective, so it "
              "ranks them; each objective's own valid loss is in quality.json."]
    pictures = plot(rows, tasks, args.out)
    lines += [""] + [f"![{p}]({p})" for p in pictures] + [""]
    (args.out / "quality.md").write_text("\n".join(lines))
    (args.out / "quality.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=2, default=str))
    print("\n" + "\n".join(lines))
    print(f"wrote {args.out / 'quality.md'}, quality.json and {', '.join(pictures)}")


def redraw(args):
    """The report of a finished run, from its quality.json alone."""
    try:
        recorded = json.loads(args.redraw.read_text())
        facts, rows = recorded["facts"], recorded["rows"]
        words = shlex.split(facts["command"].split("quality_benchmark.py", 1)[1])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        fail(f"--redraw {args.redraw}: not a quality.json of this benchmark ({err})")
    original = parse_args(words)
    original.out = args.out
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(original, rows, facts)


def main(argv=None):
    args = parse_args(argv)
    command = begin_run("quality_benchmark.py", args, argv, fail)
    if args.redraw:
        return redraw(args)
    for task, folder in args.tasks.items():
        if not folder.is_dir():
            hint = f"; make it first: python scripts/make_sentiment_data.py {folder}" if task == "sst2" else ""
            fail(f"--task {task}={folder}: no such folder{hint}")
        if not task_config(task).is_file():
            fail(f"--task {task}: no recipe {shown(task_config(task))}; tasks: sst2 or a GLUE task name")
    for checkpoint in args.checkpoint:
        if not (checkpoint / "config.json").is_file():
            fail(f"--checkpoint {checkpoint} is not a model directory (no config.json)")
    require_runtime(args.device, fail)
    import torch

    from mpnet.data import read_metadata, resolve_data
    from mpnet.errors import UserError
    from mpnet.training.config import PretrainConfig, load, parse_overrides

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        cfg = load(PretrainConfig, args.config, parse_overrides(args.pretrain_set))
    except UserError as err:
        fail(f"--pretrain-set: {err}")
    block_size = cfg.data.block_size
    args.batch_size = args.batch_size or cfg.training.batch_size
    data = args.data or cfg.data.path
    shards = resolve_data(data, args.out / "data", tokenizer=cfg.data.tokenizer, workers=os.cpu_count())
    meta = read_metadata(shards)
    log: list = []
    rows, calibration, steps = [], None, args.steps
    if args.checkpoint:
        rows = [checkpoint_row(c) for c in args.checkpoint]
    else:
        if steps is None:
            steps, calibration = calibrate_steps(args, shards, block_size, log)
            print(f"\n{PROG}: mpnet ran {calibration['seconds_per_step'] * 1000:.1f} ms per step: {steps} steps per "
                  f"objective for {args.minutes_per_objective} min", flush=True)
        rows = pretrain_rows(args, shards, steps, block_size, log)
    if not args.no_baseline:
        rows.append({"row": BASELINE, "tokens": 0,
                     "checkpoint": str(untrained_checkpoint(args.config, shards, args.out / "untrained"))})
    finetune_all(args, rows, log)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    facts = {"command": command, "device": device, "torch": torch.__version__, "commit": git_commit(),
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": shown(args.config),
             "data": shown(Path(data)) if not isinstance(data, list) else data,
             "data_tokens": meta.get("num_tokens"), "block_size": block_size, "batch_size": args.batch_size,
             "steps": steps, "calibration": calibration, "finetune_lr": args.finetune_lrs,
             "finetune_epochs": args.finetune_epochs, "finetune_seeds": args.finetune_seeds, "jobs": args.jobs,
             "commands": log,
             "total_seconds": round(time.perf_counter() - started, 1)}
    write_report(args, rows, facts)


if __name__ == "__main__":
    main()
