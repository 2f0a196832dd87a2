"""Readers: a task's data directory -> `TaskData` (a train split and one or more dev splits), from

- the standard GLUE TSV directory (what `download_glue_data.py` writes: CoLA headerless, SST-2 with a
  header, MRPC's `msr_paraphrase_*.txt` or `train.tsv`/`dev.tsv`, MNLI `dev_matched.tsv` and
  `dev_mismatched.tsv`, STS-B's score column, ...);
- an HF `datasets` DatasetDict saved with `save_to_disk` (needs the `datasets` package; mpnet/hf_datasets.py);
- CSV (`train.csv`, `dev.csv`) or JSONL (`train.jsonl`, `dev.jsonl`) with named columns, for GLUE
  tasks and for any sentence / sentence-pair classification or regression set (task "custom").

Nothing here touches the network. GLUE test splits carry no labels and are never read.
"""
from __future__ import annotations

import csv
import json
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..hf_datasets import describe, load_saved_dataset, saved_dataset_kind
from ..errors import UserError
from .glue import DevSplit, Task, custom_task

log = logging.getLogger(__name__)

# GLUE's QQP/MNLI fields can be long; the csv module's default field limit (128 KiB) is not enough
# for a few malformed lines, which we want to skip rather than crash on.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


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
    malformed, unlabelled = [], 0
    for line_no, row in enumerate(rows, start=2 if header is not None else 1):
        if len(row) <= needed:
            malformed.append(line_no)
            continue
        if keep is not None and not keep(row):
            continue
        raw_label = row[il]
        if task.name == "mnli" and raw_label == "-":  # unlabelled MNLI pairs (no gold agreement)
            unlabelled += 1
            continue
        split.labels.append(task.label_index(raw_label, f"{path}:{line_no}"))
        split.text_a.append(row[ia])
        if ib is not None:
            split.text_b.append(row[ib])
    if malformed:
        # QQP's train.tsv has a few lines with missing fields; the GLUE reference code skips them too. Said as a
        # warning with the line numbers: a file whose separators were lost (spaces for tabs) shows up here.
        shown = ", ".join(map(str, malformed[:5])) + (f" and {len(malformed) - 5} more" if len(malformed) > 5 else "")
        log.warning("%s: skipped %d line(s) with fewer than %d tab-separated fields (line %s)", path, len(malformed),
                    needed + 1, shown)
    if unlabelled:
        log.info("%s: skipped %d unlabelled line(s)", path, unlabelled)
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
    data = load_saved_dataset(root)
    if saved_dataset_kind(root) == "Dataset":
        raise UserError(f"{root} is a single saved Dataset ({describe(data)}); fine-tuning needs a DatasetDict "
                        f"with train and validation splits: split it and save that, e.g. s = "
                        f"dataset.train_test_split(test_size=0.1); DatasetDict(train=s['train'], "
                        f"validation=s['test']).save_to_disk(DIR)")

    def split_of(names: tuple[str, ...], what: str):
        for name in names:
            if name in data:
                return name, data[name]
        raise UserError(f"{root} (a saved DatasetDict) has no {what} split ({describe(data)}); "
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
    if saved_dataset_kind(root):
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
