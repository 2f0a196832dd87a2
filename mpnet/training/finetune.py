"""Fine-tune an MPNet checkpoint on a GLUE task (or any sentence(-pair) classification/regression set).

One run: read the task data (mpnet/tasks/), tokenize once (mpnet/data/classification.py), then per
epoch train with the shared toolkit's AdamW and linear warmup/decay schedule, evaluate on every dev
split, and keep the best dev checkpoint (OUTPUT/best, written to a temporary folder and renamed into
place). OUTPUT/results.json is rewritten atomically after every epoch with the metrics per epoch, the
best epoch, throughput, peak memory, the backend, the seed and the library versions; the train and dev
scalars go to OUTPUT/metrics.jsonl and OUTPUT/tensorboard (the metrics log pretraining writes too).

With `training.pack` (`--pack`) a step still takes `batch_size` EXAMPLES in the same order and the
loss is still their mean, so packing changes the layout and the speed, not the optimisation (with
dropout 0 the losses match the padded run's to rounding; tests/training/test_finetune_packing.py).

Reproducibility: the seed fixes the classifier initialisation, dropout and the data order; on CPU two
runs with the same seed give identical numbers. Training subsets (--max-train-examples) are drawn with
a separate fixed seed, so runs with different seeds or backends see the same examples.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.classification import Batching, Encoded, PreparedData, prepare_data
from ..data.tokenizer import checkpoint_tokenizer
from ..errors import UserError
from ..modeling.backends import ATTENTION_BACKEND_NAMES, AttentionBackend, attention_backend
from ..modeling.config import check_window
from ..modeling.patterns import window_spec
from ..outputs import check_output_dir, versions, write_directory_atomic, write_json_atomic
from ..tasks import Task, TaskData, custom_task, get_task, load_task_data
from .config import FinetuneConfig, TaskConfig, to_dict
from .metrics import ScalarLog
from .toolkit import (OptimizerStep, PeakMemory, adamw, autocast, compile_model, compiles, lr_scheduler, resolve_device,
                      seed_everything, synchronize, to_device)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- backend


@dataclass(frozen=True)
class Backend:
    """An attention backend (MPNetConfig.attention_backend), optionally with a sliding window (in tokens)."""

    name: str = "dense"
    window: int | None = None

    def __post_init__(self):
        if self.name not in ATTENTION_BACKEND_NAMES:
            raise UserError(f"unknown backend '{self.name}'; use {', '.join(ATTENTION_BACKEND_NAMES)}, "
                            "optionally with :W (W = sliding window in tokens)")
        check_window(self.window, "the sliding window")

    @property
    def flex(self) -> bool:
        return self.name == "flex"

    @property
    def registry_entry(self) -> AttentionBackend:
        """What the backend can do (modeling/backends.py)."""
        return attention_backend(self.name)

    @property
    def label(self) -> str:
        return f"{self.name}:{self.window}" if self.window else self.name

    @classmethod
    def parse(cls, text: str) -> "Backend":
        """'dense', 'flex', 'triton', with ':W' for a sliding window of W tokens (e.g. 'flex:128')."""
        name, _, window = text.strip().lower().partition(":")
        if window and not window.isdigit():
            raise UserError(f"backend '{text}': the sliding window must be a positive integer")
        return cls(name, int(window) if window else None)


def check_backend_can_train(backend: Backend, device: torch.device, packed: bool = False):
    """One line, before any data is read, when the backend cannot train on `device` with its window (and
    the document isolation of packed batches): the registry (modeling/backends.py) says what each can."""
    backend.registry_entry.check(device, training=True, pattern=window_spec(backend.window), documents=packed)


# ----------------------------------------------------------------------------------------- model


def load_classifier(checkpoint, task: Task, backend: Backend, attention_dropout: float | None = None):
    """The checkpoint's encoder with a classification head for `task`, under the given backend.

    A checkpoint that already is a classifier with a different number of labels (e.g. the MNLI model
    the MPNet paper starts RTE, MRPC and STS-B from) keeps its encoder and gets a fresh head, as
    fairseq does when re-registering a head of another size.
    """
    from ..modeling import MPNetForSequenceClassification
    from ..modeling.checkpoint import read_config
    from ..modeling.model import MPNetClassificationHead, _init_weights

    labels = {"num_labels": task.num_labels,
              "problem_type": "regression" if task.is_regression else "single_label_classification"}
    if not task.is_regression:
        labels["id2label"] = {i: name for i, name in enumerate(task.labels)}
        labels["label2id"] = {name: i for i, name in enumerate(task.labels)}
    backend_fields = {"attention_backend": backend.name, "sliding_window_size": backend.window}
    if attention_dropout is not None:
        backend_fields["attention_probs_dropout_prob"] = attention_dropout
    existing = read_config(checkpoint)
    # a classifier head: ours, transformers', or the pattern classes' name when transformers re-saved it (mpnet/hub.py)
    is_classifier = any(name.endswith("ForSequenceClassification") for name in existing.architectures or [])
    old_labels = existing.num_labels if is_classifier else None
    if old_labels is not None and old_labels != task.num_labels:
        model = MPNetForSequenceClassification.from_pretrained(checkpoint, **backend_fields)
        for key, value in labels.items():
            setattr(model.config, key, value)
        model.classifier = MPNetClassificationHead(model.config)
        model.classifier.apply(lambda module: _init_weights(module, model.config.initializer_range))
        log.info("%s is a %d-label classifier; its head was replaced by a new %d-label one", checkpoint,
                 old_labels, task.num_labels)
        return model
    return MPNetForSequenceClassification.from_pretrained(checkpoint, **labels, **backend_fields)


def _loss(logits, labels, regression: bool):
    if regression:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def evaluate(model, task: Task, dev: dict[str, Encoded], device, batch_size: int, pad_id: int, multiple: int,
             bf16: bool = True, batching: Batching | None = None) -> dict:
    """Metrics on every dev split, the task score, and evaluation throughput.

    batching: padded (default, from pad_id and multiple) or packed (`Batching(pack=True, ...)`)."""
    model.eval()
    batching = batching or Batching(pad_id, multiple, model.config.max_sequence_length)
    metrics, examples, seconds = {}, 0, 0.0
    for suffix, encoded in dev.items():
        # Padded: length-sorted batches pad less. Packed: file order (packing needs no sorting, and
        # batches of mixed lengths need about the same number of rows: few shapes to compile).
        # Predictions go back to file order before scoring.
        order = list(range(len(encoded)))
        if not batching.pack:
            order.sort(key=lambda i: len(encoded.input_ids[i]))
        preds = np.zeros(len(encoded), dtype=np.float64 if task.is_regression else np.int64)
        synchronize(device)
        start = time.perf_counter()
        for begin in range(0, len(order), batch_size):
            idx = order[begin:begin + batch_size]
            inputs, _, _ = batching.inputs(encoded, idx)
            with autocast(device, bf16):
                logits = model(**to_device(inputs, device)).float()
            out = logits[:, 0] if task.is_regression else logits.argmax(-1)
            preds[idx] = out.cpu().numpy()
        synchronize(device)
        seconds += time.perf_counter() - start
        examples += len(encoded)
        metrics.update(task.compute_metrics(preds, encoded.labels, suffix))
    return {"metrics": metrics, "score": task.score(metrics), "eval_examples": examples, "eval_seconds": seconds,
            "eval_examples_per_s": examples / seconds if seconds > 0 else None}


def build_task(cfg: TaskConfig) -> Task:
    if cfg.name.lower() == "custom":
        return custom_task(cfg.text_column or "text", cfg.text_pair_column, cfg.label_column or "label",
                           cfg.task_type, cfg.labels)
    return get_task(cfg.name)


def read_task_data(cfg: FinetuneConfig, data_dir) -> TaskData:
    task = build_task(cfg.task)
    return load_task_data(task, data_dir, cfg.task.text_column, cfg.task.text_pair_column, cfg.task.label_column)


# ------------------------------------------------------------------------------------------ train


@dataclass
class Run:
    """What one fine-tuning run holds while it trains."""

    model: torch.nn.Module
    train_forward: torch.nn.Module  # the model, or the model under torch.compile (training.compile)
    tokenizer: object
    task: Task
    prepared: PreparedData
    batching: Batching
    optimizer_step: OptimizerStep  # AdamW, the schedule, clipping and the non-finite policy
    device: torch.device
    output_dir: Path
    steps_per_epoch: int
    step: int = 0


# What a fine-tuning run writes into its folder; --overwrite removes these (and nothing else) first, so the new
# run's tensorboard curves and metrics are not mixed with the old run's.
RUN_OUTPUTS = ("tensorboard", "metrics.jsonl", "results.json", "best")


def _remove_previous_run(output_dir: Path):
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def finetune(checkpoint, data_dir, config: FinetuneConfig, output_dir, backend: Backend = Backend(),
             device: str | torch.device | None = None, prepared: PreparedData | None = None, tokenizer=None,
             overwrite: bool = False) -> dict:
    """Fine-tune `checkpoint` on the configured task; returns the results dict (also in results.json).
    A non-empty output_dir is refused unless overwrite; a training checkpoint always."""
    output_dir = check_output_dir(output_dir, overwrite, "the fine-tuning run")
    if overwrite:
        _remove_previous_run(output_dir)
    run = _start(checkpoint, data_dir, config, output_dir, backend, device, prepared, tokenizer)
    t = config.training
    results = _results_header(run, checkpoint, data_dir, config, backend)
    writer = ScalarLog(run.output_dir)
    memory = PeakMemory(run.device)
    memory.reset()
    shuffle = torch.Generator().manual_seed(t.seed)
    train_seconds, train_examples, best_score = 0.0, 0, -math.inf
    for epoch in range(1, t.epochs + 1):
        record = _train_epoch(run, t, epoch, shuffle, writer)
        train_seconds += record["train_seconds"]
        train_examples += len(run.prepared.train)
        evaluation = evaluate(run.model, run.task, run.prepared.dev, run.device, t.eval_batch_size,
                              run.batching.pad_id, t.pad_to_multiple_of, t.bf16, run.batching)
        record.update(**evaluation, is_best=evaluation["score"] > best_score)
        if record["is_best"]:
            best_score = evaluation["score"]
            write_directory_atomic(run.output_dir / "best",
                                   lambda tmp: run.model.save_pretrained(tmp, tokenizer=run.tokenizer))
            results["best"] = {"epoch": epoch, "score": evaluation["score"], "metrics": evaluation["metrics"],
                               "checkpoint": str(run.output_dir / "best")}
        results["epochs"].append(record)
        _log_epoch(writer, record, run.step, epoch, t.epochs)
        peak = memory.peak_bytes()
        results.update({
            "train_examples_per_s": train_examples / train_seconds,
            "eval_examples_per_s": float(np.mean([e["eval_examples_per_s"] for e in results["epochs"]
                                                  if e["eval_examples_per_s"]] or [0.0])),
            "peak_memory_bytes": peak, "peak_memory_kind": memory.kind if peak is not None else None,
        })
        write_json_atomic(run.output_dir / "results.json", results)
    writer.close()
    results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(run.output_dir / "results.json", results)
    best = results["best"]
    log.info("best dev score %.2f at epoch %d; checkpoint %s; results %s", 100 * best["score"], best["epoch"],
             best["checkpoint"], run.output_dir / "results.json")
    return results


def _start(checkpoint, data_dir, config, output_dir, backend, device, prepared, tokenizer) -> Run:
    """Device, tokenizer, data, model, optimizer and schedule; fails before reading data where it can."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    check_backend_can_train(backend, device, config.training.pack)
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    if not checkpoint.is_dir():
        raise UserError(f"checkpoint {checkpoint} is not a directory; pass an MPNet checkpoint (HF layout)")
    t = config.training
    tokenizer = tokenizer or checkpoint_tokenizer(checkpoint)
    seed_everything(t.seed)
    data = read_task_data(config, data_dir) if prepared is None else None
    task = data.task if prepared is None else prepared.task
    model = load_classifier(checkpoint, task, backend, t.attention_dropout)
    if prepared is None:
        prepared = prepare_data(data, tokenizer, config, model.config.max_sequence_length, model.config.vocab_size)
    model.to(device)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / "config.json", to_dict(config))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id
    rows_multiple = t.pack_rows_multiple or backend.registry_entry.capabilities.packed_rows_multiple
    batching = Batching(pad_id, t.pad_to_multiple_of, model.config.max_sequence_length, t.pack, prepared.max_length,
                        rows_multiple)
    steps_per_epoch = math.ceil(len(prepared.train) / t.batch_size)
    total_steps = steps_per_epoch * t.epochs
    optimizer = adamw(model, t.lr, t.betas, t.eps, t.weight_decay, device)
    scheduler = lr_scheduler(optimizer, round(t.warmup_ratio * total_steps), total_steps)
    compiled = compiles(t.compile, device)
    log.info("fine-tuning %s on %s (%d train examples, %d epochs, %d steps) with the %s backend on %s%s%s",
             checkpoint, task.name, len(prepared.train), t.epochs, total_steps, backend.label, device,
             f", packed into rows of <= {prepared.max_length} tokens" if t.pack else "",
             f", compiled ({t.compile_mode} mode{', by layers' if t.compile_scope == 'layers' else ''}; the first steps "
             "of each new width compile)" if compiled else "")
    train_forward = compile_model(model, t.compile_mode, t.compile_scope) if compiled else model
    optimizer_step = OptimizerStep(model, optimizer, scheduler, device, t.bf16, t.clip_grad_norm, t.max_nonfinite_steps,
                                   t.compile_mode if compiled else "default", lr_name="training.lr",
                                   warmup_name="training.warmup_ratio")
    return Run(model, train_forward, tokenizer, task, prepared, batching, optimizer_step, device, output_dir,
               steps_per_epoch)


def _results_header(run: Run, checkpoint, data_dir, config, backend) -> dict:
    task, prepared = run.task, run.prepared
    return {
        "task": task.name, "checkpoint": str(checkpoint), "data_dir": str(data_dir), "data_layout": prepared.layout,
        "backend": backend.label, "use_flex_attention": backend.flex, "sliding_window_size": backend.window,
        "packed": config.training.pack, "seed": config.training.seed, "device": str(run.device),
        "config": to_dict(config), "max_length": prepared.max_length, "num_train_examples": len(prepared.train),
        "num_eval_examples": {k or "dev": len(v) for k, v in prepared.dev.items()},
        "metric_names": task.metric_keys(), "score_definition": f"mean of {', '.join(task.metrics)}"
        + (f" on dev_{task.dev_splits[0].suffix}" if task.dev_splits[0].suffix else ""),
        "epochs": [], "best": None, "versions": versions(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _train_epoch(run: Run, t, epoch: int, shuffle: torch.Generator, writer) -> dict:
    """One pass over the training set; the loss is read and the non-finite guard polled every step (fine-tuning
    steps are short, and a run whose steps keep failing must stop at the step it happened). The epoch's train
    loss is the mean over the steps that were not skipped."""
    from tqdm.auto import tqdm

    run.model.train()
    train = run.prepared.train
    order = torch.randperm(len(train), generator=shuffle).tolist()
    loss_sum, loss_count, real_tokens, positions = 0.0, 0, 0, 0
    bar = tqdm(total=run.steps_per_epoch, desc=f"epoch {epoch}/{t.epochs}", unit="step",
               disable=None if t.progress_bar else True, leave=False)  # None: only on a terminal
    stepper = run.optimizer_step
    synchronize(run.device)
    start = time.perf_counter()
    for begin in range(0, len(order), t.batch_size):
        idx = order[begin:begin + t.batch_size]
        inputs, real, computed = run.batching.inputs(train, idx)
        labels = torch.from_numpy(train.labels[idx])
        real_tokens, positions = real_tokens + real, positions + computed
        stepper.start()
        logits = stepper.forward(lambda: run.train_forward(**to_device(inputs, run.device)))
        loss = _loss(logits, labels.to(run.device), run.task.is_regression)
        stepper.backward(loss)
        stepper.update(run.step, loss.detach())
        run.step += 1
        stepper.poll(log.warning, lambda: _kept_checkpoint(run))
        value = loss.item()
        if math.isfinite(value):
            loss_sum += value * len(idx)
            loss_count += len(idx)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.4f}")
        if run.step % t.log_every == 0:
            writer.write({"step": run.step, "train/loss": value, "train/lr": stepper.scheduler.get_last_lr()[0]})
    synchronize(run.device)
    seconds = time.perf_counter() - start
    bar.close()
    return {"epoch": epoch, "step": run.step, "train_loss": loss_sum / loss_count if loss_count else math.nan,
            "skipped_steps": stepper.guard.skipped, "train_seconds": seconds,
            "train_examples_per_s": len(order) / seconds, "train_tokens_per_s": real_tokens / seconds,
            "train_padding_share": 1 - real_tokens / max(1, positions)}


def _kept_checkpoint(run: Run) -> str:
    """What a stopped run leaves, for the non-finite guard's message."""
    best = run.output_dir / "best"
    return f"the best dev checkpoint so far is {best}" if best.is_dir() else "no checkpoint has been written yet"


def _log_epoch(writer, record: dict, step: int, epoch: int, epochs: int):
    writer.write({"step": step, "epoch": epoch, **{f"dev/{key}": value for key, value in record["metrics"].items()},
                  "dev/score": record["score"], "perf/train_examples_per_s": record["train_examples_per_s"],
                  "perf/eval_examples_per_s": record["eval_examples_per_s"]})
    shown = ", ".join(f"{k} {100 * v:.2f}" for k, v in record["metrics"].items())
    log.info("epoch %d/%d: train loss %.4f, dev %s%s; %.1f train ex/s, %.1f eval ex/s", epoch, epochs,
             record["train_loss"], shown, " (best)" if record["is_best"] else "",
             record["train_examples_per_s"], record["eval_examples_per_s"] or 0.0)


def evaluate_checkpoint(checkpoint, prepared: PreparedData, backend: Backend, device, batch_size: int,
                        multiple: int = 64, bf16: bool = True, tokenizer=None) -> dict:
    """Evaluate a fine-tuned classifier directory under a backend (no training): metrics, eval ex/s, memory."""
    from ..modeling import MPNetForSequenceClassification

    tokenizer = tokenizer or checkpoint_tokenizer(checkpoint)
    model = MPNetForSequenceClassification.from_pretrained(checkpoint, attention_backend=backend.name,
                                                           sliding_window_size=backend.window).to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id
    memory = PeakMemory(device)
    memory.reset()
    result = evaluate(model, prepared.task, prepared.dev, device, batch_size, pad_id, multiple, bf16)
    peak = memory.peak_bytes()
    result.update(peak_memory_bytes=peak, peak_memory_kind=memory.kind if peak is not None else None)
    return result
