"""Do the fast attention backends train the same model? The same pretraining run once per backend.

    python scripts/backend_training_equivalence.py --out DIR [--backends dense,flex,triton] [--steps 2000]
        [--config configs/mpnet-tiny.yaml] [--valid-every 100] [override ...]

Each backend runs `pretrain-mpnet --config CONFIG --attention-backend B` for --steps steps with the same
seed (hence the same batches, permutations and initial weights) and, by default, no attention-probability
dropout (`model.attention_probs_dropout_prob=0`: flex and triton never apply it, dense does), so the
runs differ only in how attention is computed. Extra `key=value` overrides go to every run.

Writes DIR/<backend>/ (the runs), DIR/equivalence.md + .json (final valid loss and accuracy per backend,
relative difference to the first backend, wall time) and DIR/equivalence.png (train and valid loss curves).
pretrain-mpnet runs on CUDA when there is a GPU. The flex backend trains only on a GPU (FlexAttention has no CPU backward); triton needs CUDA too.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_backend(backend, args, overrides, out):
    command = [sys.executable, "-m", "mpnet_cli.pretrain", "--config", args.config, "--output-dir", str(out),
               "--attention-backend", backend, "--no-progress",
               f"training.max_steps={args.steps}", f"logging.valid_every={args.valid_every}",
               f"logging.save_every={args.steps}", *overrides]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - began
    (out.parent / f"{backend}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"{backend}: pretrain-mpnet exited {done.returncode}: {tail[0]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows, wall


def device_name():
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (must not hold earlier runs)")
    parser.add_argument("--backends", default="dense,flex,triton")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--valid-every", type=int, default=100)
    parser.add_argument("--config", default=str(ROOT / "configs" / "mpnet-tiny.yaml"))
    parser.add_argument("--keep-attention-dropout", action="store_true",
                        help="leave attention_probs_dropout_prob as the config sets it (dense applies it, the others do not)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; pick a new --out")
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(args.overrides)
    if not args.keep_attention_dropout:
        overrides.append("model.attention_probs_dropout_prob=0")
    backends = [b for b in args.backends.split(",") if b]
    results = {}
    for backend in backends:
        print(f"{backend}: {args.steps} steps ...", flush=True)
        rows, wall = run_backend(backend, args, overrides, out / backend)
        train = [(r["step"], r["train/loss"]) for r in rows if r.get("train/loss") is not None]
        valid = [(r["step"], r["valid/loss"], r["valid/accuracy"]) for r in rows if "valid/loss" in r]
        results[backend] = {"train": train, "valid": valid, "wall_s": round(wall, 1)}
        print(f"{backend}: final valid loss {valid[-1][1]:.4f}, accuracy {valid[-1][2]:.4f}, {wall:.0f} s", flush=True)

    reference = backends[0]
    ref_loss = results[reference]["valid"][-1][1]
    lines = [f"# Training equivalence of the attention backends ({datetime.date.today()})", "",
             f"`python scripts/backend_training_equivalence.py --out DIR --backends {args.backends} "
             f"--steps {args.steps}" + "".join(f" {o}" for o in args.overrides) + "`", "",
             f"Config `{Path(args.config).name}`, overrides {overrides}; same seed for every backend; device "
             f"{device_name()} (pretrain-mpnet uses CUDA when there is one).", "",
             "| backend | final valid loss | vs " + reference + " | final valid accuracy | max abs valid-loss gap over the run | wall s |",
             "|---|---|---|---|---|---|"]
    for backend in backends:
        valid = results[backend]["valid"]
        loss = valid[-1][1]
        gap = max(abs(a[1] - b[1]) for a, b in zip(valid, results[reference]["valid"]))
        results[backend]["final_valid_loss"] = loss
        results[backend]["relative_to_reference"] = (loss - ref_loss) / ref_loss
        lines.append(f"| {backend} | {loss:.4f} | {100 * (loss - ref_loss) / ref_loss:+.2f}% | {valid[-1][2]:.4f} | "
                     f"{gap:.4f} | {results[backend]['wall_s']} |")
    (out / "equivalence.md").write_text("\n".join(lines) + "\n")
    (out / "equivalence.json").write_text(json.dumps({"steps": args.steps, "overrides": overrides,
                                                      "device": device_name(), "results": results}, indent=1))
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for backend in backends:
        steps, losses = zip(*results[backend]["train"])
        left.plot(steps, losses, label=backend, linewidth=1)
        steps, losses, _ = zip(*results[backend]["valid"])
        right.plot(steps, losses, marker="o", markersize=3, label=backend)
    left.set(title="train loss", xlabel="step")
    right.set(title="valid loss", xlabel="step")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "equivalence.png", dpi=110)


if __name__ == "__main__":
    main()
