#!/usr/bin/env python3
"""The objective ablation of docs/objectives.md: mpnet, mlm and plm pretrained with the same model, data and
token budget, then each checkpoint fine-tuned on the sentiment demo data the same way; one table.

From the repository root, installed (`pip install -e .`) or not:

    mkdir -p /tmp/shim && ln -sfn "$PWD/cli" /tmp/shim/mpnet_cli
    PYTHONPATH=.:/tmp/shim python3 scripts/objective_ablation.py --out runs/objectives --minutes-per-objective 1.5

What it runs, in this process, through the commands' own entry points (the exact command lines are in the
json):
1. the corpus of --config (configs/mpnet-tiny.yaml: the embedded Austen novels) preprocessed once into
   OUT/data, so every objective reads the same shards;
2. the pretraining budget: --steps N, or --minutes-per-objective M turned into N from a short mpnet run
   (its tokens/s; mpnet is the most expensive objective, so no objective takes longer than M minutes);
3. `pretrain-mpnet --objective X --max-steps N` for each objective: the config's model, optimizer and
   data, batch --batch-size, warmup 10% of the steps (the config's 30 of 300), one checkpoint at the end;
4. a fresh, untrained model of the same config (row "none": what fine-tuning alone reaches);
5. `finetune-mpnet --task sst2` on each checkpoint for each --finetune-seeds seed: the sentiment recipe
   (configs/glue/sentiment.yaml) with --finetune-lr and --finetune-epochs, dense backend;
6. OUT/objectives.md and OUT/objectives.json: per objective the pretraining figures and the sentiment dev
   accuracy (the best epoch and the last epoch, mean and sample std over the seeds).

The sentiment data comes from `python scripts/make_sentiment_data.py data/sentiment` (needs network once);
the rest needs no network. The valid loss of each objective is on its own task, so it is not comparable
across objectives; the fine-tuning accuracy is.
"""
from __future__ import annotations

import argparse
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

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = ("mpnet", "mlm", "plm")
# Rows beyond the three objectives: (objective, extra config overrides). mpnet is the original MPNet code's
# inputs (data.corrupted_input=appended, the default); mpnet-content the other layout (docs/objectives.md).
VARIANTS = {"mpnet-content": ("mpnet", ["data.corrupted_input=content"])}
ROWS = {**{name: (name, []) for name in OBJECTIVES}, **VARIANTS}
BASELINE = "none"
PROG = "objective_ablation"


def fail(message: str):
    sys.exit(f"{PROG}: error: {message}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="a new (or empty) folder for every run and the table")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="pretraining steps per objective (the token budget: steps x "
                                                   "batch x block)")
    budget.add_argument("--minutes-per-objective", type=float,
                        help="pretraining time of the mpnet objective, turned into steps from a short timed run "
                             "(default 1.5 when --steps is not given)")
    p.add_argument("--objectives", default=",".join(OBJECTIVES),
                   help=f"comma-separated rows among {', '.join(ROWS)} (default: the three objectives)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "mpnet-tiny.yaml", help="pretraining config")
    p.add_argument("--batch-size", type=int, default=32, help="pretraining examples per step (default 32)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--attention-backend", choices=["dense", "flex", "triton"], default="dense", help="for pretraining")
    p.add_argument("--probe-steps", type=int, default=60, help="steps of the timed run behind --minutes-per-objective")
    p.add_argument("--sentiment-dir", type=Path, default=REPO / "data" / "sentiment")
    p.add_argument("--finetune-seeds", default="1,2", help="comma-separated fine-tuning seeds (default 1,2)")
    p.add_argument("--finetune-lr", type=float, default=2e-4, help="peak fine-tuning lr (default 2e-4: a 2-layer "
                                                                   "model needs more than the recipe's 2e-5)")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--finetune-max-train-examples", type=int, help="a fixed subset of the training sentences")
    p.add_argument("--finetune-max-length", type=int, help="tokens per sentence (default: the recipe's 128)")
    p.add_argument("--no-baseline", action="store_true", help="skip the untrained-model row")
    args = p.parse_args(argv)
    args.objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    unknown = [o for o in args.objectives if o not in ROWS]
    if unknown or not args.objectives:
        fail(f"--objectives takes names among {', '.join(ROWS)}, got {', '.join(unknown) or 'none'}")
    try:
        args.finetune_seeds = [int(s) for s in args.finetune_seeds.split(",") if s.strip()]
    except ValueError:
        fail(f"--finetune-seeds takes comma-separated integers, got {args.finetune_seeds!r}")
    for name in ("steps", "minutes_per_objective", "batch_size", "probe_steps", "finetune_epochs"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.steps is None and args.minutes_per_objective is None:
        args.minutes_per_objective = 1.5
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
    argv = [shown(a) for a in argv]
    line = f"{program} " + " ".join(shlex.quote(a) for a in argv)
    print(f"\n$ {line}", flush=True)
    main = importlib.import_module(f"mpnet_cli.{module}").main
    start = time.perf_counter()
    try:
        main(argv)
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            fail(f"`{line}` exited with {exit_.code} (its error is above)")
    seconds = time.perf_counter() - start
    log.append({"command": line, "seconds": round(seconds, 1)})
    return seconds


def pretrain_argv(args, shards: Path, row: str, out: Path, steps: int, log_every=None) -> list:
    objective, overrides = ROWS[row]
    return [*overrides, "--config", args.config, "--output-dir", out, "--data", shards, "--objective", objective,
            "--max-steps", steps, "--save-every", steps, "--log-every", log_every or max(1, steps // 20),
            "--no-progress",
            "--attention-backend", args.attention_backend, f"training.batch_size={args.batch_size}",
            f"optim.warmup_steps={max(1, round(0.1 * steps))}", f"logging.valid_every={steps}", "logging.keep_last=1"]


def calibrate_steps(args, shards: Path, block_size: int, log: list) -> tuple[int, dict]:
    probe = args.out / "probe"
    # Logged in two halves: the rate is that of the second (the first holds the start-up: allocator, kernels).
    argv = pretrain_argv(args, shards, "mpnet", probe, args.probe_steps, log_every=max(1, args.probe_steps // 2))
    run_command("pretrain-mpnet", "pretrain", argv, log)
    summary = json.loads((probe / "summary.json").read_text())
    seconds_per_step = args.batch_size * block_size / summary["tokens_per_s"]
    steps = max(1, int(args.minutes_per_objective * 60 / seconds_per_step))
    return steps, {"probe_steps": args.probe_steps, "mpnet_tokens_per_s": summary["tokens_per_s"],
                   "seconds_per_step": seconds_per_step}


def untrained_checkpoint(args, shards: Path, folder: Path) -> Path:
    """A fresh model of the config, initialised as pretrain-mpnet initialises one (its seed), saved as a checkpoint."""
    import torch

    from mpnet.data import load_tokenizer, read_metadata
    from mpnet.modeling import MPNetForPretraining
    from mpnet.training.config import PretrainConfig, load, model_config

    cfg = load(PretrainConfig, args.config)
    meta = read_metadata(shards)
    torch.manual_seed(cfg.training.seed)
    config = model_config(cfg.model, vocab_size=meta["vocab_size"], pad_token_id=meta["pad_token_id"],
                          mask_token_id=meta["mask_token_id"])
    model = MPNetForPretraining(config)
    model.save_pretrained(folder, tokenizer=load_tokenizer(str(shards / "tokenizer")))
    return folder


def finetune_scores(args, checkpoint: Path, name: str, log: list) -> list[dict]:
    scores = []
    for seed in args.finetune_seeds:
        out = args.out / "finetune" / f"{name}-seed{seed}"
        argv = ["--checkpoint", checkpoint, "--task", "sst2", "--data-dir", args.sentiment_dir,
                "--config", REPO / "configs" / "glue" / "sentiment.yaml", "--output-dir", out, "--device", args.device,
                "--seed", seed, "--lr", args.finetune_lr, "--epochs", args.finetune_epochs, "--no-progress"]
        if args.finetune_max_train_examples:
            argv += ["--max-train-examples", args.finetune_max_train_examples]
        if args.finetune_max_length:
            argv += ["--max-length", args.finetune_max_length]
        seconds = run_command("finetune-mpnet", "finetune", argv, log)
        results = json.loads((out / "results.json").read_text())
        scores.append({"seed": seed, "best": 100 * results["best"]["score"], "best_epoch": results["best"]["epoch"],
                       "last": 100 * results["epochs"][-1]["score"], "seconds": round(seconds, 1)})
    return scores


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_report(args, rows: list[dict], facts: dict):
    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    lines = ["# Objectives compared: mpnet, mlm, plm", "",
             f"- command: `{facts['command']}`",
             f"- device: {facts['device']}; torch {facts['torch']}; commit {facts['commit']}; {facts['date']}",
             f"- model and data: `{facts['config']}` (batch {args.batch_size} x {facts['block_size']} tokens), "
             f"{facts['steps']} steps per objective = {facts['tokens']:,} tokens, backend {args.attention_backend}",
             f"- fine-tuning: sst2 layout of `{shown(args.sentiment_dir)}`, lr {args.finetune_lr}, epochs "
             f"{args.finetune_epochs}, seeds {','.join(map(str, args.finetune_seeds))}; dev accuracy x100, "
             "mean ± sample std",
             f"- wall time of the whole run: {facts['total_seconds'] / 60:.1f} min", "",
             "| objective | pretrain steps | tokens | train loss (last) | valid loss (own task) | pretrain s "
             "| sentiment dev acc, best epoch | sentiment dev acc, last epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        best = [s["best"] for s in row["finetune"]]
        last = [s["last"] for s in row["finetune"]]
        lines.append(f"| {row['objective']} | {row['steps']} | {row['tokens']:,} | {fmt(row['train_loss'], '.3f')} "
                     f"| {fmt(row['valid_loss'], '.3f')} | {fmt(row['pretrain_seconds'], '.0f')} | {spread(best)} "
                     f"| {spread(last)} |")
    lines += ["", "The valid loss is each objective's own (mpnet and plm: permuted prediction, mlm: masked "
              "prediction with the other tokens visible), so it does not rank the objectives; the dev accuracy does."
              + (" Row `none`: the same model untrained, fine-tuned the same way." if not args.no_baseline else ""), ""]
    (args.out / "objectives.md").write_text("\n".join(lines))
    (args.out / "objectives.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=2))
    print("\n" + "\n".join(lines))
    print(f"wrote {args.out / 'objectives.md'} and {args.out / 'objectives.json'}")


def main(argv=None):
    args = parse_args(argv)
    command = "PYTHONPATH=.:/tmp/shim python3 scripts/objective_ablation.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # pretrain-mpnet runs where CUDA is; hide it (before torch starts)
    if args.out.exists() and any(args.out.iterdir()):
        fail(f"--out {args.out} is not empty; choose a new folder (nothing was overwritten)")
    for split in ("train.tsv", "dev.tsv"):
        if not (args.sentiment_dir / split).is_file():
            fail(f"{args.sentiment_dir / split} is missing; make the sentiment data first: "
                 f"python scripts/make_sentiment_data.py {args.sentiment_dir}")
    require_runtime(args.device, fail)
    import torch

    from mpnet.data import resolve_data
    from mpnet.training.config import PretrainConfig, load

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = load(PretrainConfig, args.config)
    block_size = cfg.data.block_size
    shards = resolve_data(cfg.data.path, args.out / "data", tokenizer=cfg.data.tokenizer)
    log: list = []
    calibration = None
    steps = args.steps
    if steps is None:
        steps, calibration = calibrate_steps(args, shards, block_size, log)
        print(f"\n{PROG}: mpnet ran {calibration['seconds_per_step'] * 1000:.1f} ms per step: {steps} steps per "
              f"objective for {args.minutes_per_objective} min", flush=True)
    tokens = steps * args.batch_size * block_size
    rows = []
    for objective in args.objectives:
        out = args.out / "pretrain" / objective
        seconds = run_command("pretrain-mpnet", "pretrain", pretrain_argv(args, shards, objective, out, steps), log)
        summary = json.loads((out / "summary.json").read_text())
        rows.append({"objective": objective, "steps": steps, "tokens": tokens, "train_loss": summary["last_train_loss"],
                     "valid_loss": summary["valid_loss"], "valid_accuracy": summary["valid_accuracy"],
                     "tokens_per_s": summary["tokens_per_s"], "pretrain_seconds": round(seconds, 1),
                     "checkpoint": summary["checkpoint"]})
    if not args.no_baseline:
        checkpoint = untrained_checkpoint(args, shards, args.out / "pretrain" / BASELINE / "untrained")
        rows.append({"objective": BASELINE, "steps": 0, "tokens": 0, "train_loss": None, "valid_loss": None,
                     "valid_accuracy": None, "tokens_per_s": None, "pretrain_seconds": None,
                     "checkpoint": str(checkpoint)})
    for row in rows:
        row["finetune"] = finetune_scores(args, Path(row["checkpoint"]), row["objective"], log)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    facts = {"command": command, "device": device, "torch": torch.__version__, "commit": git_commit(),
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "config": shown(args.config),
             "block_size": block_size, "batch_size": args.batch_size, "steps": steps, "tokens": tokens,
             "calibration": calibration, "finetune_lr": args.finetune_lr, "finetune_epochs": args.finetune_epochs,
             "finetune_seeds": args.finetune_seeds, "commands": log,
             "total_seconds": round(time.perf_counter() - started, 1)}
    write_report(args, rows, facts)


if __name__ == "__main__":
    main()
