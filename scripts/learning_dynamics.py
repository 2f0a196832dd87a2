#!/usr/bin/env python3
"""Learning curves of our pretraining beside an independent reference MLM written with transformers' classes.

Every run trains the same model size on the same blocks of the same corpus, in the same order, with the same
optimizer (AdamW betas 0.9/0.98, eps 1e-6, weight decay 0.01), schedule (linear warmup and decay), clipping and
batch, and is scored at the same steps on the same held-out batches:

- ours: `pretrain-mpnet` runs, in this process, one per --runs entry (NAME: an objective, or mpnet-content for
  the mpnet objective with data.corrupted_input=content);
- reference: transformers' RobertaForMaskedLM + DataCollatorForLanguageModeling (15%, 80/10/10), the
  model shaped like --config's (hidden, layers, heads, FFN, dropout, vocabulary), trained by the loop below,
  at each --reference-lrs value.

Scores (mpnet/training/evaluation.py): each run's own-task accuracy, its accuracy on the tokens whose input is
<mask>, and the fill-mask accuracy: one stream, a fixed 15% of the validation tokens replaced by <mask>, the same
batches for every run and for the reference. Writes OUT/dynamics.md, OUT/dynamics.json and OUT/dynamics.png.

From the repository root, installed (`pip install -e .`) or not:

    mkdir -p /tmp/shim && ln -sfn "$PWD/cli" /tmp/shim/mpnet_cli
    PYTHONPATH=.:/tmp/shim python3 scripts/learning_dynamics.py --out runs/dynamics --steps 3000
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from command_runs import begin_run, failer, output_parser
from quality_benchmark import REPO, git_commit, require_runtime, run_command, shown

PROG = "learning_dynamics"
# Run names -> (objective, extra overrides)
ORIGINAL_INIT = ["training.relative_bias_init=normal", "training.lm_bias_init=zero"]  # HF's and the original's
RUNS = {"mpnet": ("mpnet", []), "mpnet-original-init": ("mpnet", ORIGINAL_INIT),
        "mpnet-zero-lm-bias": ("mpnet", ["training.lm_bias_init=zero"]),
        "mpnet-normal-relative-bias": ("mpnet", ["training.relative_bias_init=normal"]),
        "mpnet-content": ("mpnet", ["data.corrupted_input=content"]),
        "mpnet-content-original-init": ("mpnet", ["data.corrupted_input=content", *ORIGINAL_INIT]),
        "mlm": ("mlm", []), "mlm-original-init": ("mlm", ORIGINAL_INIT),
        "plm": ("plm", []), "plm-original-init": ("plm", ORIGINAL_INIT)}
BIAS_INITS = ("zero", "unigram")  # the reference's LM-head bias: transformers' init, or ours (training.lm_bias_init)
REFERENCE = "reference-mlm"
fail = failer(PROG)


def parse_args(argv=None):
    p = output_parser(PROG, __doc__)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "mpnet-tiny.yaml",
                   help="model, corpus and block size of every run")
    p.add_argument("--runs", default="mpnet,mpnet-content,mlm",
                   help=f"comma-separated runs of ours among {', '.join(RUNS)}")
    p.add_argument("--reference-lrs", default="",
                   help="comma-separated peak lrs of the transformers reference (default: --lr only; 'none': no "
                        "reference)")
    p.add_argument("--reference-bias-inits", default="zero,unigram",
                   help=f"comma-separated LM-head bias inits of the reference among {', '.join(BIAS_INITS)}")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="peak lr of our runs (and of the reference by default)")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=250, help="steps between scores")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per score")
    p.add_argument("--attention-backend", choices=["dense", "flex", "triton"], default="dense")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config override (repeatable), e.g. model.hidden_dropout_prob=0: our runs take it, and the "
                        "reference its model shape, dropout and block size")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--title", default="Learning dynamics", help="heading of the report")
    args = p.parse_args(argv)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        fail(f"--runs takes names among {', '.join(RUNS)}, got {', '.join(unknown)}")
    if args.reference_lrs.strip().lower() == "none":
        args.reference_lrs = []
    else:
        try:
            args.reference_lrs = [float(v) for v in args.reference_lrs.split(",") if v.strip()] or [args.lr]
        except ValueError:
            fail(f"--reference-lrs takes comma-separated numbers, got {args.reference_lrs!r}")
    args.reference_bias_inits = [v.strip() for v in args.reference_bias_inits.split(",") if v.strip()]
    if not set(args.reference_bias_inits) <= set(BIAS_INITS):
        fail(f"--reference-bias-inits takes names among {', '.join(BIAS_INITS)}, got {args.reference_bias_inits}")
    for name in ("steps", "batch_size", "eval_every", "eval_batches"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def our_run(args, shards: Path, name: str, log: list) -> dict:
    objective, overrides = RUNS[name]
    out = args.out / "runs" / name
    argv = [*overrides, "--config", args.config, "--output-dir", out, "--data", shards, "--objective", objective,
            "--max-steps", args.steps, "--save-every", args.steps, "--log-every", args.eval_every, "--no-progress",
            "--seed", args.seed, "--attention-backend", args.attention_backend,
            f"training.batch_size={args.batch_size}", f"optim.lr={args.lr}", f"optim.warmup_steps={args.warmup_steps}",
            f"logging.valid_every={args.eval_every}", f"logging.valid_batches={args.eval_batches}",
            "logging.keep_last=1", *(o for o in args.set if not o.startswith("data.path="))]  # --data is the shards
    seconds = run_command("pretrain-mpnet", "pretrain", argv, log, fail)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    curve = [{"step": r["step"], "accuracy": r["valid/accuracy"], "masked_accuracy": r["valid/masked_accuracy"],
              "fill_mask_accuracy": r["valid/fill_mask_accuracy"], "loss": r["valid/loss"]}
             for r in rows if "valid/loss" in r]
    summary = json.loads((out / "summary.json").read_text())
    return {"name": name, "kind": "ours", "objective": objective, "overrides": overrides, "lr": args.lr,
            "seconds": round(seconds, 1), "curve": curve, "fill_mask": summary.get("fill_mask")}


def reference_run(args, cfg, shards: Path, lr: float, bias_init: str, fill_batches, device) -> dict:
    """RobertaForMaskedLM trained on our blocks in our order, by transformers' own model, collator and schedule."""
    import numpy as np
    import torch
    from transformers import (DataCollatorForLanguageModeling, RobertaConfig, RobertaForMaskedLM,
                              get_linear_schedule_with_warmup)

    from mpnet.data import TokenBlocks, load_tokenizer, read_metadata
    from mpnet.training.config import model_config
    from mpnet.training.evaluation import fill_mask_scores

    meta = read_metadata(shards)
    ours = model_config(cfg.model, vocab_size=meta["vocab_size"], pad_token_id=meta["pad_token_id"],
                        mask_token_id=meta["mask_token_id"])
    config = RobertaConfig(vocab_size=meta["vocab_size"], hidden_size=ours.hidden_size,
                           num_hidden_layers=ours.num_hidden_layers, num_attention_heads=ours.num_attention_heads,
                           intermediate_size=ours.intermediate_size, hidden_act=ours.hidden_act,
                           hidden_dropout_prob=ours.hidden_dropout_prob,
                           attention_probs_dropout_prob=ours.attention_probs_dropout_prob,
                           max_position_embeddings=ours.max_position_embeddings, type_vocab_size=1,
                           initializer_range=ours.initializer_range, layer_norm_eps=ours.layer_norm_eps,
                           pad_token_id=meta["pad_token_id"], bos_token_id=meta["bos_token_id"],
                           eos_token_id=meta["eos_token_id"])
    torch.manual_seed(args.seed)
    model = RobertaForMaskedLM(config).to(device)
    if bias_init == "unigram":
        from mpnet.training.pretrain import unigram_log_prior

        with torch.no_grad():
            model.lm_head.bias.copy_(unigram_log_prior(shards, meta).to(device))
    tokenizer = load_tokenizer(str(shards / "tokenizer"))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.data.pred_prob, return_tensors="pt")
    blocks = TokenBlocks(shards, "train", cfg.data.block_size)
    valid_blocks = TokenBlocks(shards, "valid", cfg.data.block_size)
    torch.manual_seed(2**20)  # its own-task validation batches, fixed
    valid = [collator([{"input_ids": valid_blocks[i].tolist()}
                       for i in range(b * args.batch_size, min(len(valid_blocks), (b + 1) * args.batch_size))])
             for b in range(min(args.eval_batches, -(-len(valid_blocks) // args.batch_size)))]
    decay = [p for p in model.parameters() if p.ndim >= 2]  # no decay on biases and LayerNorms, as ours
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = get_linear_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)
    bf16 = device.type == "cuda"

    def logits_fn(input_ids, attention_mask):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(input_ids=input_ids, attention_mask=attention_mask).logits

    def score(step):
        model.eval()
        with torch.no_grad():
            right = total = masked_right = masked_total = 0
            for batch in valid:
                labels, input_ids = batch["labels"].to(device), batch["input_ids"].to(device)
                hits = logits_fn(input_ids, batch["attention_mask"].to(device)).argmax(-1) == labels
                chosen = labels != -100
                masked = chosen & (input_ids == tokenizer.mask_token_id)
                right += hits[chosen].sum().item()
                total += chosen.sum().item()
                masked_right += hits[masked].sum().item()
                masked_total += masked.sum().item()
        fill = fill_mask_scores(logits_fn, fill_batches, device)
        model.train()
        return {"step": step, "accuracy": right / max(total, 1), "masked_accuracy": masked_right / max(masked_total, 1),
                "fill_mask_accuracy": fill["accuracy"], "loss": None}

    # Our data order (pretrain.StepBatches with one process, no accumulation): a seeded shuffle per epoch.
    orders = {}

    def block(g):
        epoch, offset = divmod(g, len(blocks))
        if epoch not in orders:
            orders.clear()
            orders[epoch] = np.random.default_rng([args.seed, epoch]).permutation(len(blocks))
        return blocks[int(orders[epoch][offset])]

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    curve = []
    model.train()
    for step in range(args.steps):
        batch = collator([{"input_ids": block(g).tolist()}
                          for g in range(step * args.batch_size, (step + 1) * args.batch_size)])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append(score(step + 1))
            print(f"{REFERENCE} lr {lr:g} {bias_init} bias step {step + 1}: accuracy {curve[-1]['accuracy']:.3f}, fill-mask "
                  f"{curve[-1]['fill_mask_accuracy']:.3f}", flush=True)
    return {"name": f"{REFERENCE} (lr {lr:g}, {bias_init} bias)", "kind": "reference", "objective": "mlm", "lr": lr,
            "seconds": round(time.perf_counter() - started, 1), "curve": curve, "fill_mask": None}


def unigram_accuracy(shards: Path, fill_batches) -> tuple[str, float]:
    """Fill-mask accuracy of always answering the training split's most frequent non-special token."""
    import numpy as np
    import torch

    from mpnet.data import load_tokenizer, read_metadata

    meta = read_metadata(shards)
    tokens = np.memmap(shards / "train.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    counts = np.bincount(tokens, minlength=meta["vocab_size"])
    counts[list(meta["special_token_ids"]) + [meta["pad_token_id"], meta["mask_token_id"]]] = 0
    top = int(counts.argmax())
    targets = torch.cat([b["targets"][b["targets"] != -100] for b in fill_batches])
    return load_tokenizer(str(shards / "tokenizer")).decode([top]).strip(), (targets == top).float().mean().item()


def write_report(args, runs: list[dict], facts: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def fmt(v):
        return "—" if v is None else f"{v:.3f}"

    steps = sorted({point["step"] for run in runs for point in run["curve"]})
    lines = [f"# {args.title}", "",
             f"- command: `{facts['command']}`",
             f"- device: {facts['device']}; torch {facts['torch']}, transformers {facts['transformers']}; commit "
             f"{facts['commit']}; {facts['date']}",
             f"- every run: `{facts['config']}`'s model and corpus, batch {args.batch_size} x {facts['block_size']} "
             f"tokens, {args.steps} steps ({facts['tokens']:,} tokens), AdamW (0.9, 0.98), lr {args.lr:g} (reference: "
             f"its own column), {args.warmup_steps} warmup steps then linear decay, clip 1.0, seed {args.seed}; our "
             f"backend {args.attention_backend}" + (f"; overrides {' '.join(args.set)}" if args.set else ""),
             f"- unigram baseline (always `{facts['unigram_token']}`): fill-mask accuracy {facts['unigram']:.3f}",
             f"- wall time of the whole run: {facts['total_seconds'] / 60:.1f} min", ""]
    for key, heading in (("fill_mask_accuracy", "Fill-mask accuracy (one stream, 15% <mask>; the same batches for "
                                                "every run)"),
                         ("accuracy", "Own-task accuracy (each run's own inputs: 10% of mlm's and mpnet's predicted "
                                      "tokens are their own input)"),
                         ("masked_accuracy", "Own-task accuracy on the predicted tokens whose input is <mask>")):
        lines += [f"## {heading}", "", "| step | " + " | ".join(r["name"] for r in runs) + " |",
                  "|---|" + "---|" * len(runs)]
        for step in steps:
            cells = [fmt(next((p[key] for p in r["curve"] if p["step"] == step), None)) for r in runs]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Final fill-mask answers (top 3)", ""]
    for run in runs:
        for item in run.get("fill_mask") or []:
            lines.append(f"- {run['name']}: `{item['sentence']}` -> {', '.join(item['answers'])}")
    lines += ["", "Seconds per run: " + ", ".join(f"{r['name']} {r['seconds']:.0f}" for r in runs), ""]
    (args.out / "dynamics.md").write_text("\n".join(lines))
    (args.out / "dynamics.json").write_text(json.dumps({"facts": facts, "runs": runs}, indent=2))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "fill_mask_accuracy", "fill-mask accuracy (same batches for all)"),
                           (axes[1], "accuracy", "own-task accuracy")):
        for run in runs:
            points = [(p["step"], p[key]) for p in run["curve"] if p[key] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=run["name"],
                        linestyle="--" if run["kind"] == "reference" else "-")
        ax.axhline(facts["unigram"], color="grey", linewidth=0.8, linestyle=":", label="unigram")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "dynamics.png", dpi=110)
    print("\n" + "\n".join(lines))
    print(f"wrote {args.out / 'dynamics.md'}, dynamics.json and dynamics.png")


def main(argv=None):
    args = parse_args(argv)
    command = begin_run("learning_dynamics.py", args, argv, fail)
    require_runtime(args.device, fail)
    import torch
    import transformers

    from mpnet.data import TokenBlocks, read_metadata, resolve_data
    from mpnet.errors import UserError
    from mpnet.training.config import PretrainConfig, load, parse_overrides
    from mpnet.training.evaluation import fill_mask_batches

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    try:  # --set applies to the reference's model and blocks too, so every run sees the same batches
        cfg = load(PretrainConfig, args.config, parse_overrides(args.set))
    except UserError as err:
        fail(str(err))
    shards = resolve_data(cfg.data.path, args.out / "data", tokenizer=cfg.data.tokenizer)
    meta = read_metadata(shards)
    # The same batches pretrain-mpnet scores its runs on (pretrain.prepare_data) at this batch size.
    fill = fill_mask_batches(TokenBlocks(shards, "valid", cfg.data.block_size), meta["mask_token_id"],
                             meta["special_token_ids"], meta["pad_token_id"], args.batch_size, args.eval_batches,
                             cfg.data.pred_prob)
    device = torch.device(args.device)
    log: list = []
    runs = [our_run(args, shards, name, log) for name in args.runs]
    runs += [reference_run(args, cfg, shards, lr, init, fill, device)
             for lr in args.reference_lrs for init in args.reference_bias_inits]
    token, unigram = unigram_accuracy(shards, fill)
    facts = {"command": command,
             "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)",
             "torch": torch.__version__, "transformers": transformers.__version__, "commit": git_commit(),
             "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": shown(args.config),
             "block_size": cfg.data.block_size, "tokens": args.steps * args.batch_size * cfg.data.block_size,
             "unigram_token": token, "unigram": unigram, "commands": log,
             "total_seconds": round(time.perf_counter() - started, 1)}
    write_report(args, runs, facts)


if __name__ == "__main__":
    main()
