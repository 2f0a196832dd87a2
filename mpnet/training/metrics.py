"""Training metrics: tensorboard scalars, a metrics.jsonl log, throughput/MFU and the final summary.

Per-step values stay on the device as running sums; they are read (one host sync) only at log steps.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from . import distributed as dist_utils

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU; unknown devices get no MFU figure.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_tflops_for(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def estimate_flops_per_example(config, n: int, m: int, last_layer_rows: int | None = None) -> float:
    """Matmul FLOPs of training on one two-stream example (forward + backward = 3x forward).

    Rows: n + 2m (content stream n + m, query stream m); keys and values: the n + m content rows. Per
    layer: q, o and the FFN on all n + 2m rows, k and v on the n + m content rows only, attention
    scores and their product with v (n + 2m) x (n + m) x H each; the LM head (dense + decoder) on the m
    query rows. last_layer_rows: the rows the last layer computes (q, o, FFN, attention; default all):
    pretraining's forward computes only the m it predicts there (`MPNetForPretraining.forward`). 2 FLOPs
    per multiply-add. m = 0 is single-stream encoding of n tokens (no LM head).
    Checked against torch's FlopCounterMode on a real forward + backward (tests/bench/test_flops.py).
    """
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    rows, keys = n + 2 * m, n + m

    def layer(computed_rows):
        return 2 * computed_rows * (2 * h * h + 2 * h * i) + 2 * keys * (2 * h * h) + 2 * 2 * computed_rows * keys * h

    last = rows if last_layer_rows is None else last_layer_rows
    return 3.0 * ((layers - 1) * layer(rows) + layer(last)) + lm_head_flops(config, m)


def lm_head_flops(config, rows: int) -> float:
    """Matmul FLOPs of the LM head (dense + tied decoder) on `rows` rows, forward + backward."""
    h = config.hidden_size
    return 3.0 * 2 * rows * (h * h + h * config.vocab_size)


def _row(line: str) -> dict | None:
    """A metrics.jsonl row, or None for a blank line or the cut-off last line of a run that crashed mid-write
    (the resumed run rewrites every row after its checkpoint anyway)."""
    try:
        row = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


class WandbTracker:
    """Weights & Biases: one run per output directory, the run config as its config."""
    package = "wandb"

    def __init__(self, module, output_dir: Path, run_config: dict):
        self.run = module.init(dir=str(output_dir), name=output_dir.name, config=run_config)

    def log(self, step: int, scalars: dict):
        self.run.log(scalars, step=step)

    def close(self):
        self.run.finish()


class MlflowTracker:
    """MLflow: one run per output directory, the run config flattened into its parameters."""
    package = "mlflow"

    def __init__(self, module, output_dir: Path, run_config: dict):
        self.mlflow = module
        module.start_run(run_name=output_dir.name)
        module.log_params(_flatten(run_config))

    def log(self, step: int, scalars: dict):
        self.mlflow.log_metrics(scalars, step=step)

    def close(self):
        self.mlflow.end_run()


# logging.report_to: where the metrics log also writes, as HF Trainer's report_to; each tracker's package is
# imported only when it is asked for, so none is a dependency.
TRACKERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def report_to_names(spec: str | None) -> list[str]:
    """'wandb,mlflow' -> ['wandb', 'mlflow']; None, 'none' or '' -> []."""
    return [name.strip() for name in (spec or "").split(",") if name.strip() and name.strip() != "none"]


def check_trackers(spec: str | None):
    """Before any work: each tracker logging.report_to names is installed, else one line naming the install."""
    import importlib.util

    for name in report_to_names(spec):
        package = TRACKERS[name].package
        if importlib.util.find_spec(package) is None:
            raise UserError(f"logging.report_to={spec} but {package} is not installed (pip install {package}), "
                            "or drop it from logging.report_to")


def open_trackers(spec: str | None, output_dir, run_config: dict) -> list:
    """The trackers named by logging.report_to, started (check_trackers has run)."""
    import importlib

    return [TRACKERS[name](importlib.import_module(TRACKERS[name].package), Path(output_dir), run_config)
            for name in report_to_names(spec)]


class ScalarLog:
    """The one metrics log of every run: each row (a dict with "step") goes to OUTPUT/metrics.jsonl, to
    tensorboard (OUTPUT/tensorboard) and to the `trackers` (logging.report_to). A run resumed at `start_step`
    rewrites what came after it."""

    def __init__(self, output_dir, start_step: int = 0, enabled: bool = True, trackers=()):
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.history: list[dict] = []
        self.writer = None
        self.trackers = list(trackers)
        self.jsonl = self.output_dir / "metrics.jsonl"
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=start_step + 1)
        if self.jsonl.exists():
            rows = [row for row in map(_row, self.jsonl.read_text().splitlines())
                    if row is not None and row.get("step", 0) <= start_step]
            self.jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
            self.history = rows

    def write(self, row: dict):
        if not self.enabled:
            return
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}  # strict JSON
        self.history.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {key: value for key, value in row.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, row["step"])
        self.writer.flush()
        for tracker in self.trackers:
            tracker.log(row["step"], scalars)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


class MetricsLogger:
    """Pretraining's metrics: loss and accuracy summed on the device between log steps, throughput, MFU,
    validation rows and the final summary, written through a `ScalarLog`."""

    def __init__(self, output_dir, is_main, start_step, flops_per_example, peak_tflops, trackers=()):
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.flops_per_example = flops_per_example
        self.peak_tflops = peak_tflops
        self.log = ScalarLog(output_dir, start_step, enabled=is_main, trackers=trackers)
        self.history = self.log.history
        self.jsonl = self.log.jsonl
        self.start_time = time.perf_counter()
        self._reset()

    def _reset(self):
        self.sums = None  # the interval's finite steps: [loss sum, correct, predicted, micro-batches] on the device
        self.step_sums = None  # the current step's micro-batches, kept or dropped by after_step
        self.examples = self.tokens = 0
        self.interval_start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def accumulate(self, loss, logits, targets):
        """One micro-batch's loss and accuracy counts, summed on the device (no host sync)."""
        valid = targets != -100
        correct = ((logits.argmax(-1) == targets) & valid).sum()
        if self.step_sums is None:
            self.step_sums = [loss.float(), correct.float(), valid.sum().float(), 1]
        else:
            self.step_sums[0] += loss.float()
            self.step_sums[1] += correct
            self.step_sums[2] += valid.sum()
            self.step_sums[3] += 1

    def after_step(self, examples, n, finite=True):
        """End of an optimizer step: its sums join the interval's unless the step was skipped as non-finite.
        `finite`: a bool, or a 0-dim device tensor (then the choice is made on the device, no host sync)."""
        if self.step_sums is not None and finite is not False:
            loss, correct, count, micro = self.step_sums
            row = torch.stack([loss, correct, count, torch.full((), float(micro), device=loss.device)])
            if isinstance(finite, torch.Tensor):
                row = torch.where(finite, row, torch.zeros_like(row))
            self.sums = row if self.sums is None else self.sums + row
        self.step_sums = None
        self.examples += examples
        self.tokens += examples * n

    def _write(self, row):
        self.log.write(row)

    def log_train(self, step, lr, grad_norm, env, skipped: int = 0) -> dict:
        """A train row over the interval's finite steps (`skipped`: the run's non-finite steps so far)."""
        sums = self.sums if self.sums is not None else torch.zeros(4, device=grad_norm.device)  # all skipped
        sums = dist_utils.all_reduce_sum(sums, env).tolist()  # the one host sync of a log interval
        elapsed = time.perf_counter() - self.interval_start
        row = {"step": step, "train/loss": sums[0] / sums[3] if sums[3] else None,
               "train/accuracy": sums[1] / max(sums[2], 1) if sums[3] else None,
               "train/lr": lr, "train/grad_norm": float(grad_norm), "train/skipped_steps": skipped,
               "perf/tokens_per_s": self.tokens / elapsed, "perf/examples_per_s": self.examples / elapsed}
        if self.peak_tflops:
            row["perf/mfu"] = self.examples * self.flops_per_example / elapsed / (self.peak_tflops * 1e12)
        if torch.cuda.is_available():
            row["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self._write(row)
        self._reset()
        return row

    def log_valid(self, step, values, env):
        row = {"step": step, **values}
        self._write(row)
        fill = values.get("valid/fill_mask_accuracy")
        self.note(f"step {step}: valid loss {values['valid/loss']:.4f}, accuracy {values['valid/accuracy']:.3f}"
                  + (f", fill-mask accuracy {fill:.3f}" if fill is not None else ""))

    def note(self, message):
        if self.is_main:
            tqdm.write(message)

    def summary(self, output_dir, checkpoints, fill_mask=()) -> dict:
        """The run's summary (summary.json, and printed); `fill_mask`: (sentence, top answers) of the final
        model (evaluation.fill_mask)."""
        rows = [r for r in self.history if "train/loss" in r]
        train = [r for r in rows if r["train/loss"] is not None]  # intervals with at least one finite step
        valid = [r for r in self.history if "valid/loss" in r]
        result = {"steps": rows[-1]["step"] if rows else 0,
                  "skipped_steps": rows[-1].get("train/skipped_steps", 0) if rows else 0,
                  "first_train_loss": train[0]["train/loss"] if train else None,
                  "last_train_loss": train[-1]["train/loss"] if train else None,
                  "valid_loss": valid[-1]["valid/loss"] if valid else None,
                  "valid_accuracy": valid[-1]["valid/accuracy"] if valid else None,
                  "valid_fill_mask_accuracy": valid[-1].get("valid/fill_mask_accuracy") if valid else None,
                  "fill_mask": [{"sentence": s, "answers": a} for s, a in fill_mask],
                  "tokens_per_s": train[-1]["perf/tokens_per_s"] if train else None,
                  "checkpoint": str(checkpoints[-1][1]) if checkpoints else None,
                  "wall_time_s": time.perf_counter() - self.start_time}
        if self.is_main:
            self.log.close()
            lines = [
                f"steps              {result['steps']}",
                f"train loss         {result['first_train_loss']:.4f} -> {result['last_train_loss']:.4f}" if train else "",
                f"valid loss / acc   {result['valid_loss']:.4f} / {result['valid_accuracy']:.3f}" if valid else "",
                f"fill-mask acc      {result['valid_fill_mask_accuracy']:.3f} (one stream, 15% <mask>)"
                if result["valid_fill_mask_accuracy"] is not None else "",
                f"skipped steps      {result['skipped_steps']} (non-finite loss or gradient)" if result["skipped_steps"] else "",
                f"tokens/s (last)    {result['tokens_per_s']:,.0f}" if train else "",
                f"wall time          {result['wall_time_s']:.0f} s",
                f"checkpoint         {result['checkpoint']}",
                f"metrics            {self.jsonl}",
                f"tensorboard        tensorboard --logdir {self.output_dir / 'tensorboard'}",
            ] + [f"fill-mask          {s.replace('<mask>', '___')}  ->  {' | '.join(a)}" for s, a in fill_mask]
            width = max(len(line) for line in lines)
            print("\n" + "=" * width + "\n" + "\n".join(line for line in lines if line) + "\n" + "=" * width)
            (Path(output_dir) / "summary.json").write_text(json.dumps(result, indent=2))
        return result
