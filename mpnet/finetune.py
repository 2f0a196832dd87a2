"""Fine-tune an MPNet checkpoint on a GLUE task (or any sentence(-pair) classification/regression set).

One run: read the task data (mpnet/tasks/glue.py), tokenize once, then per epoch train with AdamW and a
linear warmup/decay schedule, evaluate on every dev split, and keep the best dev checkpoint
(OUTPUT/best, written to a temporary folder and renamed into place). OUTPUT/results.json is rewritten
atomically after every epoch with the metrics per epoch, the best epoch, throughput, peak memory, the
backend, the seed and the library versions; tensorboard scalars go to OUTPUT/tensorboard.

Batches are padded dynamically, to a multiple of `pad_to_multiple_of` (64) tokens: few distinct shapes
means few recompiles of the FlexAttention kernel, at little padding cost. With `training.pack`
(`--pack`) a step's examples are packed instead (mpnet/modeling/packing.py): several examples share a
row of at most `task.max_length` tokens, isolated by document ids, and the classifier reads each
example's own <s>. A step still takes `batch_size` EXAMPLES in the same order and the loss is still
their mean, so packing changes the layout and the speed, not the optimisation (with dropout 0 the
losses match the padded run's to rounding; tests/test_finetune_packing.py).

Reproducibility: the seed fixes the classifier initialisation, dropout and the data order; on CPU two
runs with the same seed give identical numbers. Training subsets (--max-train-examples) are drawn with
a separate fixed seed, so runs with different seeds or backends see the same examples.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .configuration import load, to_dict
from .errors import UserError
from .tasks.glue import Task, TaskData, custom_task, get_task, load_task_data

log = logging.getLogger(__name__)

REPO_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "glue"
DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parent / "resources" / "tokenizer"


# ---------------------------------------------------------------------------------------- config


@dataclass
class TaskConfig:
    name: str = "sst2"  # a GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) or "custom"
    text_column: str | None = None  # CSV/JSONL/HF column names (default: the task's own)
    text_pair_column: str | None = None
    label_column: str | None = None
    task_type: str = "classification"  # custom tasks: classification | regression
    labels: list | None = None  # custom classification: label names in index order (default: sorted)
    max_length: int = 128  # tokens per example, special tokens included (truncation beyond)


@dataclass
class TrainConfig:
    lr: float = 2e-5
    batch_size: int = 32
    eval_batch_size: int = 128
    epochs: int = 3
    warmup_ratio: float = 0.06
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    clip_grad_norm: float = 1.0  # <= 0 disables clipping
    seed: int = 1
    max_train_examples: int | None = None  # a fixed random subset (seed `subset_seed`), for quick runs
    max_eval_examples: int | None = None
    subset_seed: int = 0
    pad_to_multiple_of: int = 64
    # Pack each step's examples into rows of <= task.max_length tokens (document isolation) instead of
    # padding every example to the longest; batch_size and eval_batch_size still count examples.
    pack: bool = False
    # Packed batches get a multiple of this many rows (rows of padding only): fewer distinct shapes,
    # fewer FlexAttention compiles. None: 4 with the flex backend, 1 (no extra rows) with dense.
    pack_rows_multiple: int | None = None
    bf16: bool = True  # autocast on CUDA; ignored on CPU
    # Attention-probability dropout (None: the checkpoint's). FlexAttention applies none, so backend
    # comparisons with identical regularisation set it to 0.
    attention_dropout: float | None = None
    log_every: int = 20  # optimizer steps between tensorboard train scalars
    progress_bar: bool = True


@dataclass
class FinetuneConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    training: TrainConfig = field(default_factory=TrainConfig)


def load_config(task_name: str, path=None, overrides: dict | None = None) -> FinetuneConfig:
    """defaults < configs/glue/<task>.yaml (or the given file) < overrides."""
    if path is None and (REPO_CONFIG_DIR / f"{task_name}.yaml").is_file():
        path = REPO_CONFIG_DIR / f"{task_name}.yaml"
        log.info("using the recipe in %s", path)
    overrides = dict(overrides or {})
    overrides.setdefault("task", {})["name"] = task_name
    config = load(FinetuneConfig, path, overrides)
    validate(config)
    return config


def validate(config: FinetuneConfig):
    t = config.training
    for name in ("batch_size", "eval_batch_size", "epochs", "pad_to_multiple_of", "log_every"):
        if getattr(t, name) <= 0:
            raise UserError(f"training.{name} must be a positive integer, got {getattr(t, name)}")
    if not t.lr > 0:
        raise UserError(f"training.lr must be positive, got {t.lr}")
    if not 0 <= t.warmup_ratio < 1:
        raise UserError(f"training.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    for name in ("max_train_examples", "max_eval_examples", "pack_rows_multiple"):
        if getattr(t, name) is not None and getattr(t, name) <= 0:
            raise UserError(f"training.{name} must be positive, got {getattr(t, name)}")
    if t.attention_dropout is not None and not 0 <= t.attention_dropout < 1:
        raise UserError(f"training.attention_dropout must be in [0, 1), got {t.attention_dropout}")
    if config.task.max_length < 8:
        raise UserError(f"task.max_length must be at least 8 tokens, got {config.task.max_length}")


# --------------------------------------------------------------------------------------- backend


@dataclass(frozen=True)
class Backend:
    """An attention backend: dense or FlexAttention, optionally with a sliding window (in tokens)."""

    flex: bool = False
    window: int | None = None

    @property
    def label(self) -> str:
        name = "flex" if self.flex else "dense"
        return f"{name}:{self.window}" if self.window else name

    @classmethod
    def parse(cls, text: str) -> "Backend":
        """'dense', 'flex', 'flex:128' (flex + sliding window 128), 'dense:128'."""
        name, _, window = text.strip().lower().partition(":")
        if name not in ("dense", "flex"):
            raise UserError(f"unknown backend '{text}'; use dense, flex or flex:W (W = sliding window in tokens)")
        if window:
            if not window.isdigit() or int(window) <= 0:
                raise UserError(f"backend '{text}': the sliding window must be a positive integer")
            return cls(name == "flex", int(window))
        return cls(name == "flex", None)


def resolve_device(name: str | None = None) -> torch.device:
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_backend_can_train(backend: Backend, device: torch.device):
    if backend.flex and device.type != "cuda":
        from .modeling.attention import CPU_TRAINING_MESSAGE, FlexAttentionUnavailable

        raise FlexAttentionUnavailable(CPU_TRAINING_MESSAGE)


# ----------------------------------------------------------------------------------- memory meter


class PeakMemory:
    """Peak memory of a phase: CUDA max allocated, or on Linux CPUs the process's peak RSS (VmHWM),
    which writing "5" to /proc/self/clear_refs resets. None where neither is available."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.kind = None

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind is None:
            return None
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ data


def load_tokenizer(checkpoint):
    """The checkpoint's own tokenizer; checkpoints without tokenizer files fall back to the MPNet
    WordPiece tokenizer shipped in mpnet/resources/tokenizer (with a note)."""
    from transformers import AutoTokenizer

    checkpoint = Path(checkpoint)
    has_files = any((checkpoint / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    source = checkpoint if has_files else DEFAULT_TOKENIZER_DIR
    if not has_files:
        if not (DEFAULT_TOKENIZER_DIR / "tokenizer_config.json").is_file() and not (DEFAULT_TOKENIZER_DIR / "vocab.txt").is_file():
            raise UserError(f"{checkpoint} has no tokenizer files and the default MPNet tokenizer "
                            f"({DEFAULT_TOKENIZER_DIR}) is missing; copy tokenizer files into the checkpoint")
        log.info("%s has no tokenizer files; using the default MPNet tokenizer in %s", checkpoint, DEFAULT_TOKENIZER_DIR)
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer in {source}: {str(err).splitlines()[0]}") from None


@dataclass
class Encoded:
    """One tokenized split: token id lists (special tokens included) and labels."""

    input_ids: list[list[int]]
    labels: np.ndarray
    source: str = ""

    def __len__(self):
        return len(self.input_ids)


def encode_split(tokenizer, split, max_length: int, regression: bool) -> Encoded:
    ids: list[list[int]] = []
    step = 2048  # batched calls: the fast tokenizer parallelises inside a batch
    for start in range(0, len(split), step):
        a = split.text_a[start:start + step]
        b = None if split.text_b is None else split.text_b[start:start + step]
        ids.extend(tokenizer(a, b, truncation=True, max_length=max_length)["input_ids"])
    labels = np.asarray(split.labels, dtype=np.float32 if regression else np.int64)
    return Encoded(ids, labels, split.source)


def padded_length(longest: int, multiple: int, cap: int) -> int:
    """Round up to the next multiple (few distinct shapes -> few flex recompiles), never past the cap."""
    return min(max(1, math.ceil(longest / multiple)) * multiple, cap)


def make_batch(encoded: Encoded, indices, pad_id: int, multiple: int, cap: int):
    rows = [encoded.input_ids[i] for i in indices]
    width = padded_length(max(len(r) for r in rows), multiple, cap)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, :len(row)] = 1
    return input_ids, attention_mask, torch.from_numpy(encoded.labels[list(indices)])


@dataclass(frozen=True)
class Batching:
    """How examples become model inputs: padded rows (the default) or packed rows."""

    pad_id: int
    multiple: int  # widths round up to a multiple of this many tokens
    cap: int  # the position table's limit
    pack: bool = False
    row_length: int = 0  # packed: tokens per row at most (task.max_length)
    rows_multiple: int = 1  # packed: rows round up to a multiple of this

    def inputs(self, encoded: Encoded, indices) -> tuple[dict, int, int]:
        """(model keyword inputs on the CPU, real tokens, computed positions) for the examples `indices`;
        the model returns their logits in the order of `indices`."""
        if self.pack:
            from .modeling.packing import pack

            batch = pack([encoded.input_ids[i] for i in indices], self.row_length, self.pad_id,
                         pad_width_to_multiple_of=self.multiple, pad_rows_to_multiple_of=self.rows_multiple)
            inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                      "document_ids": batch.document_ids, "starts": batch.starts}
            return inputs, batch.num_real_tokens, batch.input_ids.numel()
        input_ids, attention_mask, _ = make_batch(encoded, indices, self.pad_id, self.multiple, self.cap)
        return ({"input_ids": input_ids, "attention_mask": attention_mask}, int(attention_mask.sum()),
                input_ids.numel())


def _on(inputs: dict, device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in inputs.items()}


# ----------------------------------------------------------------------------------------- model


def load_classifier(checkpoint, task: Task, backend: Backend, attention_dropout: float | None = None):
    """The checkpoint's encoder with a classification head for `task`, under the given backend.

    A checkpoint that already is a classifier with a different number of labels (e.g. the MNLI model
    the MPNet paper starts RTE, MRPC and STS-B from) keeps its encoder and gets a fresh head, as
    fairseq does when re-registering a head of another size.
    """
    from .modeling import MPNetForSequenceClassification
    from .modeling.checkpoint import read_config
    from .modeling.model import MPNetClassificationHead, _init_weights

    labels = {"num_labels": task.num_labels,
              "problem_type": "regression" if task.is_regression else "single_label_classification"}
    if not task.is_regression:
        labels["id2label"] = {i: name for i, name in enumerate(task.labels)}
        labels["label2id"] = {name: i for i, name in enumerate(task.labels)}
    backend_fields = {"use_flex_attention": backend.flex, "sliding_window_size": backend.window}
    if attention_dropout is not None:
        backend_fields["attention_probs_dropout_prob"] = attention_dropout
    existing = read_config(checkpoint)
    old_labels = existing.num_labels if "MPNetForSequenceClassification" in (existing.architectures or []) else None
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


def _optimizer(model, cfg: TrainConfig, device):
    # No weight decay on biases and LayerNorm weights (BERT/RoBERTa practice).
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup to the peak lr over warmup_steps, then linear decay to 0 at total_steps."""

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _loss(logits, labels, regression: bool):
    if regression:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits.float(), labels)


def _autocast(device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


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
        _sync(device)
        start = time.perf_counter()
        for begin in range(0, len(order), batch_size):
            idx = order[begin:begin + batch_size]
            inputs, _, _ = batching.inputs(encoded, idx)
            with _autocast(device, bf16):
                logits = model(**_on(inputs, device)).float()
            out = logits[:, 0] if task.is_regression else logits.argmax(-1)
            preds[idx] = out.cpu().numpy()
        _sync(device)
        seconds += time.perf_counter() - start
        examples += len(encoded)
        metrics.update(task.compute_metrics(preds, encoded.labels, suffix))
    return {"metrics": metrics, "score": task.score(metrics), "eval_examples": examples, "eval_seconds": seconds,
            "eval_examples_per_s": examples / seconds if seconds > 0 else None}


# ------------------------------------------------------------------------------------- utilities


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def versions() -> dict:
    import transformers

    from . import __version__

    return {"mpnet": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}


def write_json_atomic(path: Path, data: dict):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def save_checkpoint_atomic(model, tokenizer, target: Path):
    """Write to TARGET.tmp, then swap it in: an interrupted save never leaves a half-written TARGET."""
    tmp, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    model.save_pretrained(tmp, tokenizer=tokenizer)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def build_task(cfg: TaskConfig) -> Task:
    if cfg.name.lower() == "custom":
        return custom_task(cfg.text_column or "text", cfg.text_pair_column, cfg.label_column or "label",
                           cfg.task_type, cfg.labels)
    return get_task(cfg.name)


def read_task_data(cfg: FinetuneConfig, data_dir) -> TaskData:
    task = build_task(cfg.task)
    return load_task_data(task, data_dir, cfg.task.text_column, cfg.task.text_pair_column, cfg.task.label_column)


@dataclass
class PreparedData:
    """Task data tokenized once; shared by the runs of a backend comparison."""

    task: Task
    train: Encoded
    dev: dict[str, Encoded]
    layout: str
    max_length: int


def prepare_data(data: TaskData, tokenizer, cfg: FinetuneConfig, model_limit: int, vocab_size: int) -> PreparedData:
    t = cfg.training
    max_length = cfg.task.max_length
    if max_length > model_limit:
        log.info("task.max_length %d exceeds what the checkpoint's position table allows; using %d", max_length, model_limit)
        max_length = model_limit
    regression = data.task.is_regression
    train = encode_split(tokenizer, data.train.subset(t.max_train_examples, t.subset_seed), max_length, regression)
    dev = {k: encode_split(tokenizer, v.subset(t.max_eval_examples, t.subset_seed), max_length, regression)
           for k, v in data.dev.items()}
    top = max(max((max(r) for r in e.input_ids if r), default=0) for e in [train, *dev.values()])
    if top >= vocab_size:
        raise UserError(f"the tokenizer produces id {top}, but the checkpoint's vocabulary has {vocab_size} entries; "
                        "the tokenizer does not belong to this checkpoint")
    return PreparedData(data.task, train, dev, data.layout, max_length)


# ------------------------------------------------------------------------------------------ train


def finetune(checkpoint, data_dir, config: FinetuneConfig, output_dir, backend: Backend = Backend(),
             device: str | torch.device | None = None, prepared: PreparedData | None = None, tokenizer=None) -> dict:
    """Fine-tune `checkpoint` on the configured task; returns the results dict (also in results.json)."""
    validate(config)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    check_backend_can_train(backend, device)  # fail before reading any data
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    if not checkpoint.is_dir():
        raise UserError(f"checkpoint {checkpoint} is not a directory; pass an MPNet checkpoint (HF layout)")
    t = config.training
    tokenizer = tokenizer or load_tokenizer(checkpoint)
    seed_everything(t.seed)
    if prepared is None:
        data = read_task_data(config, data_dir)
        task = data.task
    else:
        task = prepared.task
    model = load_classifier(checkpoint, task, backend, t.attention_dropout)
    if prepared is None:
        prepared = prepare_data(data, tokenizer, config, model.config.max_sequence_length, model.config.vocab_size)
    model.to(device)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2, default=str) + "\n")

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id
    cap = model.config.max_sequence_length
    rows_multiple = t.pack_rows_multiple or (4 if backend.flex else 1)
    batching = Batching(pad_id, t.pad_to_multiple_of, cap, t.pack, prepared.max_length, rows_multiple)
    steps_per_epoch = math.ceil(len(prepared.train) / t.batch_size)
    total_steps = steps_per_epoch * t.epochs
    warmup_steps = round(t.warmup_ratio * total_steps)
    optimizer = _optimizer(model, t, device)
    scheduler = linear_schedule(optimizer, warmup_steps, total_steps)
    shuffle = torch.Generator().manual_seed(t.seed)
    memory = PeakMemory(device)
    memory.reset()

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(output_dir / "tensorboard"))
    results = {
        "task": task.name, "checkpoint": str(checkpoint), "data_dir": str(data_dir), "data_layout": prepared.layout,
        "backend": backend.label, "use_flex_attention": backend.flex, "sliding_window_size": backend.window,
        "packed": t.pack, "seed": t.seed, "device": str(device), "config": to_dict(config), "max_length": prepared.max_length,
        "num_train_examples": len(prepared.train),
        "num_eval_examples": {k or "dev": len(v) for k, v in prepared.dev.items()},
        "metric_names": task.metric_keys(), "score_definition": f"mean of {', '.join(task.metrics)}"
        + (f" on dev_{task.dev_splits[0].suffix}" if task.dev_splits[0].suffix else ""),
        "epochs": [], "best": None, "versions": versions(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    log.info("fine-tuning %s on %s (%d train examples, %d epochs, %d steps) with the %s backend on %s%s",
             checkpoint, task.name, len(prepared.train), t.epochs, total_steps, backend.label, device,
             f", packed into rows of <= {prepared.max_length} tokens" if t.pack else "")

    from tqdm.auto import tqdm

    step, train_seconds, train_examples = 0, 0.0, 0
    best_score = -math.inf
    for epoch in range(1, t.epochs + 1):
        model.train()
        order = torch.randperm(len(prepared.train), generator=shuffle).tolist()
        loss_sum, loss_count, real_tokens, positions = 0.0, 0, 0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{t.epochs}", unit="step",
                   disable=None if t.progress_bar else True, leave=False)  # None: only on a terminal
        _sync(device)
        epoch_start = time.perf_counter()
        for begin in range(0, len(order), t.batch_size):
            idx = order[begin:begin + t.batch_size]
            inputs, real, computed = batching.inputs(prepared.train, idx)
            labels = torch.from_numpy(prepared.train.labels[idx])
            real_tokens, positions = real_tokens + real, positions + computed
            with _autocast(device, t.bf16):
                logits = model(**_on(inputs, device))
            loss = _loss(logits, labels.to(device), task.is_regression)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            value = loss.item()
            if not math.isfinite(value):
                raise UserError(f"the training loss became {value} at step {step}; lower the learning rate "
                                f"(training.lr = {t.lr})")
            loss_sum += value * len(idx)
            loss_count += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if step % t.log_every == 0:
                writer.add_scalar("train/loss", value, step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
        _sync(device)
        epoch_seconds = time.perf_counter() - epoch_start
        bar.close()
        train_seconds += epoch_seconds
        train_examples += len(order)

        evaluation = evaluate(model, task, prepared.dev, device, t.eval_batch_size, pad_id, t.pad_to_multiple_of, t.bf16,
                              batching)
        record = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(1, loss_count),
                  "train_seconds": epoch_seconds, "train_examples_per_s": len(order) / epoch_seconds,
                  "train_tokens_per_s": real_tokens / epoch_seconds,
                  "train_padding_share": 1 - real_tokens / max(1, positions),
                  **evaluation, "is_best": False}
        if evaluation["score"] > best_score:
            best_score = evaluation["score"]
            record["is_best"] = True
            save_checkpoint_atomic(model, tokenizer, output_dir / "best")
            results["best"] = {"epoch": epoch, "score": evaluation["score"], "metrics": evaluation["metrics"],
                               "checkpoint": str(output_dir / "best")}
        results["epochs"].append(record)
        for key, value in evaluation["metrics"].items():
            writer.add_scalar(f"dev/{key}", value, step)
        writer.add_scalar("dev/score", evaluation["score"], step)
        writer.add_scalar("perf/train_examples_per_s", record["train_examples_per_s"], step)
        if evaluation["eval_examples_per_s"]:
            writer.add_scalar("perf/eval_examples_per_s", evaluation["eval_examples_per_s"], step)
        peak = memory.peak_bytes()
        results.update({
            "train_examples_per_s": train_examples / train_seconds,
            "eval_examples_per_s": float(np.mean([e["eval_examples_per_s"] for e in results["epochs"]
                                                  if e["eval_examples_per_s"]] or [0.0])),
            "peak_memory_bytes": peak, "peak_memory_kind": memory.kind if peak is not None else None,
        })
        write_json_atomic(output_dir / "results.json", results)
        shown = ", ".join(f"{k} {100 * v:.2f}" for k, v in evaluation["metrics"].items())
        log.info("epoch %d/%d: train loss %.4f, dev %s%s; %.1f train ex/s, %.1f eval ex/s", epoch, t.epochs,
                 record["train_loss"], shown, " (best)" if record["is_best"] else "",
                 record["train_examples_per_s"], evaluation["eval_examples_per_s"] or 0.0)
    writer.close()
    results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(output_dir / "results.json", results)
    best = results["best"]
    log.info("best dev score %.2f at epoch %d; checkpoint %s; results %s", 100 * best["score"], best["epoch"],
             best["checkpoint"], output_dir / "results.json")
    return results


def evaluate_checkpoint(checkpoint, prepared: PreparedData, backend: Backend, device, batch_size: int,
                        multiple: int = 64, bf16: bool = True, tokenizer=None) -> dict:
    """Evaluate a fine-tuned classifier directory under a backend (no training): metrics, eval ex/s, memory."""
    from .modeling import MPNetForSequenceClassification

    tokenizer = tokenizer or load_tokenizer(checkpoint)
    model = MPNetForSequenceClassification.from_pretrained(checkpoint, use_flex_attention=backend.flex,
                                                           sliding_window_size=backend.window).to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id
    memory = PeakMemory(device)
    memory.reset()
    result = evaluate(model, prepared.task, prepared.dev, device, batch_size, pad_id, multiple, bf16)
    peak = memory.peak_bytes()
    result.update(peak_memory_bytes=peak, peak_memory_kind=memory.kind if peak is not None else None)
    return result
