"""Compare attention backends on downstream tasks: does the fast backend cost accuracy?

For every task and seed, the same fine-tuning (same recipe, same seed, same data order) runs under each
backend ("dense", "flex", "flex:W" = FlexAttention with a sliding window of W tokens). Where a backend
cannot train on this device (modeling/backends.py says where each trains and runs: FlexAttention has no
backward pass on CPU), the comparison becomes evaluation-only: the task is fine-tuned once per seed
with the dense backend and that model is evaluated under every backend; the output says so.

Writes OUTPUT/comparison.md (Markdown table), OUTPUT/comparison.png (score, train and eval examples/s,
peak memory) and OUTPUT/comparison.json (every run and the summary); the runs themselves (results.json,
best checkpoint, tensorboard) live under OUTPUT/runs/TASK/BACKEND/seedS.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..data.classification import prepare_data
from ..data.tokenizer import checkpoint_tokenizer
from ..errors import UserError
from ..modeling.patterns import window_spec
from ..tasks import get_task
from .config import FinetuneConfig, load_finetune_config
from .finetune import Backend, evaluate_checkpoint, finetune, read_task_data
from ..outputs import check_output_dir, versions, write_json_atomic
from .toolkit import resolve_device

log = logging.getLogger(__name__)

EVAL_ONLY_NOTE = ("{limits}, so the {names} backend cannot be fine-tuned on {device}: this is an evaluation-only "
                  "comparison. Each task was fine-tuned once per seed with the dense "
            "backend, and that same model was evaluated under every backend (scores differ only by numerics; "
            "train ex/s applies to the dense run). Run on a CUDA GPU to fine-tune under each backend.")


def parse_backends(names: list[str]) -> list[Backend]:
    backends = [Backend.parse(name) for name in names]
    if len({b.label for b in backends}) != len(backends):
        raise UserError(f"--backends lists a backend twice: {','.join(names)}")
    return backends


def _dir_name(backend: Backend) -> str:
    return backend.label.replace(":", "-w")


@dataclass
class BackendRun:
    """One fine-tuning (or evaluation) of the checkpoint under one backend and seed: its score and speed."""

    task: str
    backend: str
    seed: int
    mode: str  # "trained" or "eval-only"
    score: float
    metrics: dict
    train_examples_per_s: float | None
    eval_examples_per_s: float | None
    peak_memory_bytes: int | None
    peak_memory_kind: str | None
    run_dir: str


def compare(checkpoint, tasks: list[str], data_dir, backends: list[Backend], seeds: list[int], output_dir,
            config_path=None, overrides: dict | None = None, device=None, overwrite: bool = False) -> dict:
    checkpoint = Path(checkpoint)
    output_dir = check_output_dir(output_dir, overwrite, "the comparison")
    task_specs = [get_task(name) for name in tasks]  # unknown task -> error before any work
    if not checkpoint.is_dir():
        raise UserError(f"checkpoint {checkpoint} is not a directory; pass an MPNet checkpoint (HF layout)")
    if not Path(data_dir).is_dir():
        raise UserError(f"data directory {data_dir} does not exist; pass the GLUE folder holding the task folders")
    device = resolve_device(device)
    for backend in backends:  # each must at least run here, with its window: one line before any work
        backend.registry_entry.check(device, training=False, pattern=window_spec(backend.window))
    untrainable = list(dict.fromkeys(b.registry_entry for b in backends if not b.registry_entry.trains_on(device)))
    eval_only = bool(untrainable)
    note = EVAL_ONLY_NOTE.format(limits="; ".join(entry.device_limits for entry in untrainable),
                                 names=" and ".join(entry.name for entry in untrainable),
                                 device=device.type.upper()) if eval_only else None
    if note:
        log.info("%s", note)
    from ..modeling.checkpoint import read_config

    model_config = read_config(checkpoint)
    tokenizer = checkpoint_tokenizer(checkpoint)
    output_dir.mkdir(parents=True, exist_ok=True)
    runs: list[BackendRun] = []
    for spec in task_specs:
        base = load_finetune_config(spec.name, config_path, copy.deepcopy(overrides or {}))
        data = read_task_data(base, data_dir)
        prepared = prepare_data(data, tokenizer, base, model_config.max_sequence_length, model_config.vocab_size)
        for seed in seeds:
            config = copy.deepcopy(base)
            config.training.seed = seed
            if eval_only:
                runs.extend(_eval_only_runs(checkpoint, data_dir, config, prepared, backends, seed, output_dir, device,
                                            tokenizer))
            else:
                for backend in backends:
                    run_dir = output_dir / "runs" / spec.name / _dir_name(backend) / f"seed{seed}"
                    result = finetune(checkpoint, data_dir, config, run_dir, backend=backend, device=device, overwrite=True,
                                      prepared=prepared, tokenizer=tokenizer)
                    runs.append(BackendRun(spec.name, backend.label, seed, "trained", result["best"]["score"],
                                    result["best"]["metrics"], result["train_examples_per_s"],
                                    result["eval_examples_per_s"], result["peak_memory_bytes"],
                                    result["peak_memory_kind"], str(run_dir)))
    without_dropout = [b.label for b in backends if not b.registry_entry.capabilities.attention_dropout]
    if not eval_only and without_dropout and len(without_dropout) < len(backends):
        dropout = base.training.attention_dropout
        dropout = model_config.attention_probs_dropout_prob if dropout is None else dropout
        if dropout:
            extra = (f"{', '.join(without_dropout)} apply no attention-probability dropout, the other backends "
                     f"apply {dropout}: pass training.attention_dropout=0 for identical regularisation.")
            note = f"{note} {extra}" if note else extra
    summary = summarize(runs, [b.label for b in backends], tasks)
    report = {
        "checkpoint": str(checkpoint), "data_dir": str(data_dir), "device": str(device),
        "mode": "evaluation-only" if eval_only else "fine-tuned under each backend", "note": note,
        "tasks": [s.name for s in task_specs], "backends": [b.label for b in backends], "seeds": seeds,
        "score_definitions": {s.name: score_definition(s) for s in task_specs},
        "runs": [run.__dict__ for run in runs], "summary": summary, "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(output_dir / "comparison.json", report)
    (output_dir / "comparison.md").write_text(markdown(report))
    plot(report, output_dir / "comparison.png")
    log.info("wrote %s, %s and %s", output_dir / "comparison.md", output_dir / "comparison.png",
             output_dir / "comparison.json")
    return report


def _eval_only_runs(checkpoint, data_dir, config: FinetuneConfig, prepared, backends, seed, output_dir, device,
                    tokenizer) -> list[BackendRun]:
    """Fine-tune once with dense, then evaluate the best checkpoint under every backend."""
    task = prepared.task.name
    train_dir = output_dir / "runs" / task / "dense-train" / f"seed{seed}"
    trained = finetune(checkpoint, data_dir, config, train_dir, backend=Backend(), device=device, overwrite=True,
                       prepared=prepared,
                       tokenizer=tokenizer)
    best = Path(trained["best"]["checkpoint"])
    runs = []
    for backend in backends:
        result = evaluate_checkpoint(best, prepared, backend, device, config.training.eval_batch_size,
                                     config.training.pad_to_multiple_of, config.training.bf16, tokenizer)
        log.info("%s seed %d, %s (eval-only): score %.2f, %.1f eval ex/s", task, seed, backend.label,
                 100 * result["score"], result["eval_examples_per_s"] or 0.0)
        dense = backend.name == "dense" and backend.window is None
        runs.append(BackendRun(task, backend.label, seed, "trained (dense)" if dense else "eval-only", result["score"],
                        result["metrics"], trained["train_examples_per_s"] if dense else None,
                        result["eval_examples_per_s"], result["peak_memory_bytes"], result["peak_memory_kind"],
                        str(train_dir)))
    return runs


def score_definition(task) -> str:
    metrics = ", ".join(task.metrics)
    where = f" on dev_{task.dev_splits[0].suffix}" if task.dev_splits[0].suffix else ""
    return (f"mean of {metrics}" if len(task.metrics) > 1 else metrics) + where


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(runs: list[BackendRun], backends: list[str], tasks: list[str]) -> list[dict]:
    """One row per (backend, task): score mean and std over seeds, difference to dense, throughput, memory."""
    rows = []
    for task in tasks:
        dense_runs = [r for r in runs if r.task == task and r.backend == "dense"]
        dense_mean = _mean([r.score for r in dense_runs])
        for backend in backends:
            mine = [r for r in runs if r.task == task and r.backend == backend]
            if not mine:
                continue
            scores = [r.score for r in mine]
            mean = float(np.mean(scores))
            peaks = [r.peak_memory_bytes for r in mine if r.peak_memory_bytes is not None]
            metric_names = list(mine[0].metrics)
            rows.append({
                "backend": backend, "task": task, "mode": mine[0].mode, "seeds": [r.seed for r in mine],
                "score_mean": mean, "score_std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
                "score_diff_vs_dense": None if dense_mean is None else mean - dense_mean,
                "metrics_mean": {m: float(np.mean([r.metrics[m] for r in mine])) for m in metric_names},
                "train_examples_per_s": _mean([r.train_examples_per_s for r in mine]),
                "eval_examples_per_s": _mean([r.eval_examples_per_s for r in mine]),
                "peak_memory_bytes": max(peaks) if peaks else None,
                "peak_memory_kind": mine[0].peak_memory_kind,
            })
    return rows


def _fmt(value, spec="{:.1f}", missing="—"):
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else spec.format(value)


def markdown(report: dict) -> str:
    kinds = {row["peak_memory_kind"] for row in report["summary"]} - {None}
    memory_label = {"cuda_max_allocated": "peak GPU memory (MiB)", "cpu_peak_rss": "peak process RSS (MiB)"}
    memory_header = memory_label.get(next(iter(kinds)), "peak memory (MiB)") if len(kinds) == 1 else "peak memory (MiB)"
    lines = [
        "# Attention backends compared on fine-tuning",
        "",
        f"- checkpoint: `{report['checkpoint']}`",
        f"- device: {report['device']} ({report['versions'].get('device_name')}); torch {report['versions']['torch']}",
        f"- mode: **{report['mode']}**",
        f"- seeds: {', '.join(map(str, report['seeds']))}; date {report['date']}",
        "- dev score: " + "; ".join(f"{task}: {d}" for task, d in report["score_definitions"].items())
        + " (x100, mean ± sample std over seeds)",
        "",
    ]
    if report["note"]:
        lines += [f"> **Note:** {report['note']}", ""]
    lines += [f"| backend | task | dev score | Δ vs dense | train ex/s | eval ex/s | {memory_header} | mode |",
              "|---|---|---|---|---|---|---|---|"]
    for row in report["summary"]:
        n = len(row["seeds"])
        score = f"{100 * row['score_mean']:.2f} ± {100 * row['score_std']:.2f}" + (f" (n={n})" if n != 1 else " (n=1)")
        diff = _fmt(None if row["score_diff_vs_dense"] is None else 100 * row["score_diff_vs_dense"], "{:+.2f}")
        memory = _fmt(None if row["peak_memory_bytes"] is None else row["peak_memory_bytes"] / 2**20, "{:.0f}")
        lines.append(f"| {row['backend']} | {row['task']} | {score} | {diff} | {_fmt(row['train_examples_per_s'])} "
                     f"| {_fmt(row['eval_examples_per_s'])} | {memory} | {row['mode']} |")
    lines += ["", "All metrics (x100, mean over seeds):", "", "| backend | task | metrics |", "|---|---|---|"]
    for row in report["summary"]:
        metrics = ", ".join(f"{k} {100 * v:.2f}" for k, v in row["metrics_mean"].items())
        lines.append(f"| {row['backend']} | {row['task']} | {metrics} |")
    where = "runs/TASK/dense-train/seedS" if report["mode"] == "evaluation-only" else "runs/TASK/BACKEND/seedS"
    lines += ["", f"Runs (results.json, best checkpoint, tensorboard) are under `{where}`.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path):
    """Four panels of grouped bars (x: task, one bar per backend): score, train ex/s, eval ex/s, memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, backends = report["tasks"], report["backends"]
    rows = {(r["backend"], r["task"]): r for r in report["summary"]}
    kinds = {r["peak_memory_kind"] for r in report["summary"]} - {None}
    memory_title = {"cuda_max_allocated": "peak GPU memory (MiB)", "cpu_peak_rss": "peak process RSS (MiB)"}.get(
        next(iter(kinds)) if len(kinds) == 1 else None, "peak memory (MiB)")
    panels = [
        ("dev score (x100)", lambda r: 100 * r["score_mean"], lambda r: 100 * r["score_std"]),
        ("train examples/s", lambda r: r["train_examples_per_s"], None),
        ("eval examples/s", lambda r: r["eval_examples_per_s"], None),
        (memory_title, lambda r: None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20, None),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(max(8, 2.5 * len(tasks) + 4), 7.5))
    width = 0.8 / max(1, len(backends))
    x = np.arange(len(tasks))
    for ax, (title, value, error) in zip(axes.flat, panels):
        drawn = False
        for i, backend in enumerate(backends):
            heights, errors, positions = [], [], []
            for j, task in enumerate(tasks):
                row = rows.get((backend, task))
                v = None if row is None else value(row)
                if v is None:
                    continue
                heights.append(v)
                errors.append(error(row) if error else 0.0)
                positions.append(x[j] - 0.4 + width * (i + 0.5))
            if heights:
                drawn = True
                ax.bar(positions, heights, width, yerr=errors if error else None, capsize=3, label=backend)
        note = ("\n(dense only: the others are eval-only here)"
                if drawn and "train" in title and report["mode"] == "evaluation-only" else "")
        ax.set_title(title + note, fontsize=10)
        ax.set_xticks(x, tasks)
        ax.set_xlim(-0.6, len(tasks) - 0.4)
        if not drawn:
            ax.text(0.5, 0.5, "not measured here" if "train" not in title else "no training runs",
                    ha="center", va="center", transform=ax.transAxes, color="gray")
    handles, labels = next((ax.get_legend_handles_labels() for ax in axes.flat if ax.get_legend_handles_labels()[0]),
                           ([], []))
    # One legend for the figure, in its own row under the title: it never covers a bar or a label.
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=max(1, len(labels)), fontsize=9,
               frameon=False)
    fig.suptitle(f"Attention backends: {report['mode']} ({report['device']})", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)
