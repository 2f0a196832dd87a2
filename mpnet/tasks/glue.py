"""GLUE task definitions, official metrics and readers for every supported data layout.

A task knows its text columns, its labels (None for regression), its dev split(s) and its official
metrics. Readers turn a directory into `TaskData` (a train split and one or more dev splits), from:

- the standard GLUE TSV directory (what `download_glue_data.py` writes: CoLA headerless, SST-2 with a
  header, MRPC's `msr_paraphrase_*.txt` or `train.tsv`/`dev.tsv`, MNLI `dev_matched.tsv` and
  `dev_mismatched.tsv`, STS-B's score column, ...);
- an HF `datasets` DatasetDict saved with `save_to_disk` (needs the `datasets` package);
- CSV (`train.csv`, `dev.csv`) or JSONL (`train.jsonl`, `dev.jsonl`) with named columns, for GLUE
  tasks and for any sentence / sentence-pair classification or regression set (task "custom").

Nothing here touches the network. GLUE test splits carry no labels and are never read.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import random
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError

log = logging.getLogger(__name__)

# GLUE's QQP/MNLI fields can be long; the csv module's default field limit (128 KiB) is not enough
# for a few malformed lines, which we want to skip rather than crash on.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


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


# ---------------------------------------------------------------------------------------- data


@dataclass
class Split:
    """Parallel lists: text_a, text_b (None for single-sentence tasks) and labels."""

    text_a: list[str] = field(default_factory=list)
    text_b: list[str] | None = None
    labels: list = field(default_factory=list)
    source: str = ""

    def __len__(self):
        return len(self.labels)

    def subset(self, limit: int | None, seed: int = 0) -> "Split":
        """A fixed random subset of `limit` examples (file order kept); the seed is fixed by the
        caller so that runs with different training seeds see the same examples."""
        if limit is None or limit >= len(self):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self)), limit))
        pick = lambda values: [values[i] for i in keep]  # noqa: E731
        return Split(pick(self.text_a), None if self.text_b is None else pick(self.text_b), pick(self.labels),
                     f"{self.source} (random subset of {limit})")


@dataclass
class TaskData:
    task: Task
    train: Split
    dev: dict[str, Split]  # dev-split suffix ("" or "m"/"mm") -> split
    layout: str  # which reader produced it (for logs and results)


def expected_layout(task: Task) -> str:
    """A one-line description of the accepted directory layouts for this task."""
    if task.name == "custom":
        return ("train.csv + dev.csv, or train.jsonl + dev.jsonl, or train.tsv + dev.tsv with a header, "
                f"with columns {task.columns[0]}{', ' + task.columns[1] if task.columns[1] else ''}, "
                f"{task.label_column}; or an HF DatasetDict saved with save_to_disk")
    dev = " + ".join(split.tsv for split in task.dev_splits)
    if task.name == "cola":
        tsv = "train.tsv + dev.tsv (no header: source, label, original label, sentence)"
    elif task.name == "mrpc":
        tsv = ("train.tsv + dev.tsv, or msr_paraphrase_train.txt (+ dev_ids.tsv or msr_paraphrase_test.txt), "
               "header 'Quality #1 ID #2 ID #1 String #2 String'")
    else:
        a, b, label = task.tsv_columns
        cols = ", ".join(str(c) for c in (a, b, label) if c is not None)
        tsv = f"train.tsv + {dev} with a header naming {cols}"
    return (f"the GLUE {task.glue_dir} folder: {tsv}; or an HF DatasetDict saved with save_to_disk; "
            f"or train/dev .csv or .jsonl with columns {', '.join(c for c in task.columns if c)}, {task.label_column}")


def _read_tsv_rows(path: Path) -> list[list[str]]:
    # utf-8-sig: the MSR paraphrase files start with a byte-order mark. QUOTE_NONE: GLUE text contains
    # bare quote characters that are part of the sentence.
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def _rows_to_split(task: Task, rows: list[list[str]], header: list[str] | None, path: Path,
                   columns: tuple, keep=None) -> Split:
    def index_of(col):
        if col is None or isinstance(col, int):
            return col
        if header is None or col not in header:
            raise UserError(f"{path} has no column '{col}' (header: {', '.join(header or [])}); "
                            f"expected {expected_layout(task)}")
        return header.index(col)

    ia, ib, il = (index_of(c) for c in columns)
    needed = max(i for i in (ia, ib, il) if i is not None)
    split = Split(text_b=[] if ib is not None else None, source=str(path))
    skipped = 0
    for line_no, row in enumerate(rows, start=2 if header is not None else 1):
        if len(row) <= needed or (keep is not None and not keep(row)):
            skipped += len(row) <= needed
            continue
        raw_label = row[il]
        if task.name == "mnli" and raw_label == "-":  # unlabelled MNLI pairs (no gold agreement)
            skipped += 1
            continue
        split.labels.append(task.label_index(raw_label, f"{path}:{line_no}"))
        split.text_a.append(row[ia])
        if ib is not None:
            split.text_b.append(row[ib])
    if skipped:
        # QQP's train.tsv has a few lines with missing fields; the GLUE reference code skips them too.
        log.info("%s: skipped %d malformed or unlabelled line(s)", path, skipped)
    return split


def _read_glue_tsv(task: Task, path: Path, keep=None) -> Split:
    rows = _read_tsv_rows(path)
    if task.tsv_header:
        if not rows:
            raise UserError(f"{path} is empty; expected {expected_layout(task)}")
        header, rows = [h.strip() for h in rows[0]], rows[1:]
    else:
        header = None
    split = _rows_to_split(task, rows, header, path, task.tsv_columns, keep)
    if not len(split):
        raise UserError(f"{path} holds no labelled examples; expected {expected_layout(task)}")
    return split


def _missing(task: Task, root: Path, name: str) -> UserError:
    return UserError(f"{root / name} is missing; expected {expected_layout(task)}")


def _read_mrpc(task: Task, root: Path) -> TaskData:
    """MRPC: train.tsv/dev.tsv (GLUE download) or the raw msr_paraphrase_train.txt/_test.txt."""
    if (root / "train.tsv").is_file():
        if not (root / "dev.tsv").is_file():
            raise _missing(task, root, "dev.tsv")
        return TaskData(task, _read_glue_tsv(task, root / "train.tsv"), {"": _read_glue_tsv(task, root / "dev.tsv")},
                        "glue-tsv")
    raw_train = root / "msr_paraphrase_train.txt"
    if not raw_train.is_file():
        raise _missing(task, root, "train.tsv")
    dev_ids = root / "dev_ids.tsv"
    if dev_ids.is_file():
        # The GLUE dev set is the list of (#1 ID, #2 ID) pairs in dev_ids.tsv, taken out of the MSR train file.
        pairs = {tuple(r[:2]) for r in _read_tsv_rows(dev_ids) if len(r) >= 2}
        train = _read_glue_tsv(task, raw_train, keep=lambda row: (row[1], row[2]) not in pairs)
        dev = _read_glue_tsv(task, raw_train, keep=lambda row: (row[1], row[2]) in pairs)
        return TaskData(task, train, {"": dev}, "msr-paraphrase + dev_ids.tsv")
    raw_test = root / "msr_paraphrase_test.txt"
    if not raw_test.is_file():
        raise UserError(f"{root} has msr_paraphrase_train.txt but neither dev_ids.tsv nor msr_paraphrase_test.txt; "
                        f"expected {expected_layout(task)}")
    log.info("%s: no dev_ids.tsv, so the MSR test file serves as the dev set (GLUE's dev set is a subset "
             "of the MSR train file listed in dev_ids.tsv)", root)
    return TaskData(task, _read_glue_tsv(task, raw_train), {"": _read_glue_tsv(task, raw_test)}, "msr-paraphrase")


def _read_glue_dir(task: Task, root: Path) -> TaskData:
    if task.name == "mrpc":
        return _read_mrpc(task, root)
    for name in ["train.tsv"] + [split.tsv for split in task.dev_splits]:
        if not (root / name).is_file():
            raise _missing(task, root, name)
    dev = {split.suffix: _read_glue_tsv(task, root / split.tsv) for split in task.dev_splits}
    return TaskData(task, _read_glue_tsv(task, root / "train.tsv"), dev, "glue-tsv")


# --- named-column formats: CSV / JSONL / headed TSV (custom tasks) and HF datasets


def _records_to_split(task: Task, records, columns: tuple, where: str) -> Split:
    col_a, col_b, col_label = columns
    split = Split(text_b=[] if col_b else None, source=where)
    for number, record in enumerate(records, start=1):
        for col in (c for c in columns if c):
            if col not in record:
                raise UserError(f"{where}: record {number} has no column '{col}' (it has: "
                                f"{', '.join(map(str, record))}); pass --text-column/--text-pair-column/--label-column")
        label = record[col_label]
        # Unlabelled rows: empty cells, MNLI's "-" (no gold agreement), -1 in HF datasets' test splits.
        if label is None or label == "" or (task.labels is not None and label in ("-", -1)):
            continue
        split.labels.append(label)
        split.text_a.append(str(record[col_a]))
        if col_b:
            split.text_b.append(str(record[col_b]))
    return split


def _read_records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = []
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{line_no} is not valid JSON ({err.msg}); expected one object per line") from None
        return records
    delimiter = "\t" if suffix == ".tsv" else ","
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle, delimiter=delimiter))


def _find_file(root: Path, stems: tuple[str, ...], suffixes: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in suffixes:
            if (root / f"{stem}{suffix}").is_file():
                return root / f"{stem}{suffix}"
    return None


def _dev_stems(task: Task, split: DevSplit) -> tuple[str, ...]:
    return (split.tsv.rsplit(".", 1)[0],) + split.hf_splits if split.suffix else ("dev", "validation")


def _read_named_columns(task: Task, root: Path, columns: tuple) -> TaskData:
    suffixes = (".csv", ".jsonl", ".json") + ((".tsv",) if task.name == "custom" else ())
    train_file = _find_file(root, ("train",), suffixes)
    if train_file is None:
        raise UserError(f"{root} has no train file; expected {expected_layout(task)}")
    splits = {}
    for split in task.dev_splits:
        dev_file = _find_file(root, _dev_stems(task, split), suffixes)
        if dev_file is None:
            names = "/".join(f"{s}{train_file.suffix}" for s in _dev_stems(task, split))
            raise UserError(f"{root} has {train_file.name} but no dev split ({names}); expected {expected_layout(task)}")
        splits[split.suffix] = _records_to_split(task, _read_records(dev_file), columns, str(dev_file))
    train = _records_to_split(task, _read_records(train_file), columns, str(train_file))
    return TaskData(task, train, splits, train_file.suffix.lstrip(".") + "-columns")


def _read_hf_datasets(task: Task, root: Path, columns: tuple) -> TaskData:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{root} is an HF datasets directory (dataset_dict.json); reading it needs the "
                        "`datasets` package: pip install datasets (or export the splits to CSV/JSONL)") from None
    data = datasets.load_from_disk(str(root))
    if not isinstance(data, datasets.DatasetDict):
        raise UserError(f"{root} holds a single HF Dataset, not a DatasetDict with train and validation splits")

    def split_of(names: tuple[str, ...], what: str):
        for name in names:
            if name in data:
                return name, data[name]
        raise UserError(f"{root} (HF datasets) has no {what} split; it has {', '.join(data)}; "
                        f"expected one of {', '.join(names)}")

    def convert(name, dataset):
        label_feature = dataset.features.get(columns[2])
        names = getattr(label_feature, "names", None)
        records = dataset.to_dict()
        keys = list(records)
        rows = [dict(zip(keys, values)) for values in zip(*records.values())]
        if names and task.labels is not None:
            # Map ClassLabel ints through their names so a dataset with another label order still lines up.
            for row in rows:
                if isinstance(row[columns[2]], int) and 0 <= row[columns[2]] < len(names):
                    row[columns[2]] = names[row[columns[2]]]
        return _records_to_split(task, rows, columns, f"{root}[{name}]")

    train = convert(*split_of(("train",), "train"))
    dev = {split.suffix: convert(*split_of(split.hf_splits, "dev/validation")) for split in task.dev_splits}
    return TaskData(task, train, dev, "hf-datasets")


def _resolve_root(task: Task, data_dir: Path) -> Path:
    """Accept the task folder itself or its parent (glue_data/ holding SST-2/, sst2/, ...)."""
    for name in (task.glue_dir, task.name, task.glue_dir.lower()):
        if (data_dir / name).is_dir():
            return data_dir / name
    return data_dir


def _finalize_labels(task: Task, data: TaskData) -> TaskData:
    """Turn raw labels into class indices / floats; a custom classification task learns its label set."""
    if task.name == "custom" and task.labels == ():
        names = sorted({str(v) for v in data.train.labels})
        if len(names) < 2:
            raise UserError(f"{data.train.source}: a classification set needs at least two distinct labels, "
                            f"found {names}; use --task-type regression for scores")
        task = custom_task(task.columns[0], task.columns[1], task.label_column, "classification", names)
        data.task = task
    for split in [data.train, *data.dev.values()]:
        split.labels = [task.label_index(value, split.source) for value in split.labels]
    return data


def load_task_data(task: Task, data_dir, text_column: str | None = None, text_pair_column: str | None = None,
                   label_column: str | None = None) -> TaskData:
    """Read a task's train and dev splits from whichever supported layout `data_dir` holds."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist; expected {expected_layout(task)}")
    root = _resolve_root(task, data_dir)
    columns = (text_column or task.columns[0],
               text_pair_column if text_pair_column is not None else task.columns[1],
               label_column or task.label_column)
    if (root / "dataset_dict.json").is_file():
        data = _read_hf_datasets(task, root, columns)
    elif task.name != "custom" and (any(root.glob("*.tsv")) or (root / "msr_paraphrase_train.txt").is_file()):
        data = _read_glue_dir(task, root)
    elif any(any(root.glob(pattern)) for pattern in ("*.csv", "*.jsonl", "*.json", "*.tsv")):
        data = _read_named_columns(task, root, columns)
    else:
        raise UserError(f"{root} holds no data files; expected {expected_layout(task)}")
    data = _finalize_labels(task, data)
    for name, split in [("train", data.train)] + [(f"dev{('_' + k) if k else ''}", v) for k, v in data.dev.items()]:
        if not len(split):
            raise UserError(f"{split.source}: the {name} split holds no labelled examples")
    log.info("%s: %d train examples, dev %s (%s)", data.task.name, len(data.train),
             ", ".join(f"{k or 'dev'}={len(v)}" for k, v in data.dev.items()), data.layout)
    return data
