"""GLUE task definitions and official metrics; the task registry (`get_task`, `custom_task`).

A task knows its text columns, its labels (None for regression), its dev split(s) and its official
metrics. Its data is read by mpnet/tasks/readers.py.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import UserError

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------- metrics


def accuracy(preds, labels) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean()) if len(labels) else 0.0


def f1_binary(preds, labels) -> float:
    """F1 of the positive class (label index 1), as GLUE reports it for MRPC and QQP."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0))


def f1_macro(preds, labels) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, average="macro", zero_division=0))


def matthews_corr(preds, labels) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, preds))


def _correlation(fn, preds, labels) -> float:
    # Constant predictions (e.g. a model that has not learned yet) have no defined correlation; scipy
    # returns NaN with a warning. Report 0.0 instead so the number stays JSON-valid and comparable.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(preds, labels)[0]) if len(labels) > 1 else float("nan")
    return 0.0 if math.isnan(value) else value


def pearson(preds, labels) -> float:
    from scipy.stats import pearsonr

    return _correlation(pearsonr, np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64))


def spearman(preds, labels) -> float:
    from scipy.stats import spearmanr

    return _correlation(spearmanr, np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64))


METRICS: dict[str, Callable] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "macro_f1": f1_macro,
    "matthews_corr": matthews_corr,
    "pearson": pearson,
    "spearman": spearman,
}


# --------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class DevSplit:
    """One dev set: its metric-name suffix ("" when the task has one), GLUE TSV file, HF split names."""

    suffix: str
    tsv: str
    hf_splits: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    name: str
    glue_dir: str  # folder name inside a GLUE download (glue_data/SST-2)
    columns: tuple[str, str | None]  # HF datasets column names; also the CSV/JSONL defaults
    labels: tuple[str, ...] | None  # label names in HF datasets order; None = regression
    metrics: tuple[str, ...]  # official metrics, keys of METRICS
    # GLUE TSV layout: header names (or 0-based column indices for headerless CoLA) of text a, text b, label.
    tsv_columns: tuple[str | int, str | int | None, str | int]
    tsv_header: bool = True
    tsv_labels: tuple[str, ...] | None = None  # label strings in the TSV, same order as `labels`
    dev_splits: tuple[DevSplit, ...] = (DevSplit("", "dev.tsv", ("validation", "dev")),)
    label_column: str = "label"

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_pair(self) -> bool:
        return self.columns[1] is not None

    def metric_keys(self) -> list[str]:
        return [metric_key(m, split.suffix) for split in self.dev_splits for m in self.metrics]

    def score(self, metrics: dict) -> float:
        """The one number used to pick the best epoch: the mean of the official metrics on the first
        dev split (MNLI: matched), like HF's `combined_score` for MRPC, QQP and STS-B."""
        first = self.dev_splits[0].suffix
        return float(np.mean([metrics[metric_key(m, first)] for m in self.metrics]))

    def compute_metrics(self, preds, labels, suffix: str = "") -> dict:
        return {metric_key(m, suffix): METRICS[m](preds, labels) for m in self.metrics}

    def label_index(self, value, where: str) -> int | float:
        """A raw label (TSV string, label name, integer index, number) -> class index or float score."""
        if self.labels is None:
            try:
                return float(value)
            except (TypeError, ValueError):
                raise UserError(f"{where}: label {value!r} is not a number (task {self.name} is a regression)") from None
        text = str(value).strip()
        for names in (self.tsv_labels, self.labels):
            if names and text in names:
                return names.index(text)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= int(value) < len(self.labels):
            return int(value)
        if text.lstrip("-").isdigit() and 0 <= int(text) < len(self.labels):
            return int(text)
        allowed = sorted(set(self.labels) | set(self.tsv_labels or ()))
        raise UserError(f"{where}: unknown label {value!r} for task {self.name}; expected one of {', '.join(allowed)}")


def metric_key(metric: str, suffix: str) -> str:
    return f"{metric}_{suffix}" if suffix else metric


_MNLI_LABELS = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, Task] = {
    # CoLA train.tsv/dev.tsv: no header; columns source, label, original label ('*'), sentence.
    "cola": Task("cola", "CoLA", ("sentence", None), ("unacceptable", "acceptable"), ("matthews_corr",),
                 (3, None, 1), tsv_header=False, tsv_labels=("0", "1")),
    "sst2": Task("sst2", "SST-2", ("sentence", None), ("negative", "positive"), ("accuracy",),
                 ("sentence", None, "label"), tsv_labels=("0", "1")),
    "mrpc": Task("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"),
                 ("#1 String", "#2 String", "Quality"), tsv_labels=("0", "1")),
    "qqp": Task("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"),
                ("question1", "question2", "is_duplicate"), tsv_labels=("0", "1")),
    "stsb": Task("stsb", "STS-B", ("sentence1", "sentence2"), None, ("pearson", "spearman"),
                 ("sentence1", "sentence2", "score")),
    "mnli": Task("mnli", "MNLI", ("premise", "hypothesis"), _MNLI_LABELS, ("accuracy",),
                 ("sentence1", "sentence2", "gold_label"), tsv_labels=_MNLI_LABELS,
                 dev_splits=(DevSplit("m", "dev_matched.tsv", ("validation_matched", "dev_matched")),
                             DevSplit("mm", "dev_mismatched.tsv", ("validation_mismatched", "dev_mismatched")))),
    "qnli": Task("qnli", "QNLI", ("question", "sentence"), _NLI2, ("accuracy",),
                 ("question", "sentence", "label"), tsv_labels=_NLI2),
    "rte": Task("rte", "RTE", ("sentence1", "sentence2"), _NLI2, ("accuracy",),
                ("sentence1", "sentence2", "label"), tsv_labels=_NLI2),
    # WNLI's TSV uses 1 = entailment; HF datasets' names are (not_entailment, entailment).
    "wnli": Task("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",),
                 ("sentence1", "sentence2", "label"), tsv_labels=("0", "1")),
}
TASK_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "custom": "custom"}


def custom_task(text_column: str = "text", text_pair_column: str | None = None, label_column: str = "label",
                task_type: str = "classification", labels: list[str] | None = None) -> Task:
    """Any sentence or sentence-pair set with named columns (CSV, JSONL, headed TSV, HF datasets).

    Classification reports accuracy and F1 (binary: of label index 1; else macro F1); regression
    reports Pearson and Spearman. Without `labels`, the sorted distinct training labels are used.
    """
    if task_type not in ("classification", "regression"):
        raise UserError(f"task type must be 'classification' or 'regression', got {task_type!r}")
    regression = task_type == "regression"
    metrics = ("pearson", "spearman") if regression else ("accuracy", "f1" if labels is not None and len(labels) == 2 else "macro_f1")
    return Task("custom", "custom", (text_column, text_pair_column), None if regression else tuple(labels or ()),
                metrics, (text_column, text_pair_column, label_column), label_column=label_column)


def get_task(name: str) -> Task:
    key = TASK_ALIASES.get(name.lower(), name.lower())
    if key not in GLUE_TASKS:
        raise UserError(f"unknown task '{name}'; choose one of {', '.join(GLUE_TASKS)} or 'custom' "
                        "(any CSV/JSONL set with --text-column/--label-column)")
    return GLUE_TASKS[key]
