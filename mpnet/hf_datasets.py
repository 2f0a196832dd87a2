"""Datasets saved with Hugging Face `datasets` (`Dataset.save_to_disk`, `DatasetDict.save_to_disk`), read from
their folder, never from the network. Pretraining reads one text field of them (mpnet/data/corpus.py),
fine-tuning labelled train and dev splits (mpnet/tasks/readers.py); both import it from here. Reading needs the
`datasets` package (`pip install "mpnet[datasets]"`); recognising a folder does not.

    a saved DatasetDict   dataset_dict.json, and one folder per split (train/, validation/, ...)
    a saved Dataset       state.json, dataset_info.json and its data-*.arrow files
"""
from __future__ import annotations

import logging
from pathlib import Path

from mpnet.errors import UserError

log = logging.getLogger(__name__)

DICT_FILE = "dataset_dict.json"
DATASET_FILES = ("state.json", "dataset_info.json")
# The split pretraining validates on when a DatasetDict has one (fine-tuning names its own per task).
VALIDATION_SPLITS = ("validation", "valid", "dev")
TEXT_TYPES = ("string", "large_string")


def saved_dataset_kind(path) -> str | None:
    """'DatasetDict' or 'Dataset' for a folder that save_to_disk wrote, else None."""
    path = Path(path).expanduser()
    if (path / DICT_FILE).is_file():
        return "DatasetDict"
    if all((path / name).is_file() for name in DATASET_FILES):
        return "Dataset"
    return None


def load_saved_dataset(path):
    """The Dataset or DatasetDict saved in the folder `path` (memory-mapped, nothing copied)."""
    kind = saved_dataset_kind(path)
    _refuse_empty_splits(Path(path).expanduser(), kind)
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path} is a saved Hugging Face {kind or 'dataset'}; reading it needs the `datasets` "
                        f"package: pip install datasets") from None
    try:
        return datasets.load_from_disk(str(Path(path).expanduser()))
    except (OSError, ValueError, KeyError) as err:  # a folder copied in part, or written by another layout
        raise UserError(f"cannot load the saved dataset {path}: {str(err).splitlines()[0]}") from None


def _refuse_empty_splits(path: Path, kind: str | None):
    """datasets saves a split of no rows without an .arrow file and then fails to load it (IndexError deep in
    its table code); said here in one line instead."""
    folders = [path] if kind != "DatasetDict" else [p for p in sorted(path.iterdir()) if saved_dataset_kind(p)]
    for folder in folders:
        if not any(folder.glob("*.arrow")):
            raise UserError(f"{folder} holds no rows (no .arrow file): datasets cannot load an empty saved split "
                            f"back; save it with rows, or without that split")


def describe(dataset) -> str:
    """'N rows; columns a, b' of a Dataset, or 'splits train (N rows), ...; columns a, b' of a DatasetDict."""
    if not isinstance(dataset, dict):  # a DatasetDict is a dict of its splits
        return f"{dataset.num_rows} rows; columns {', '.join(dataset.column_names)}"
    splits = ", ".join(f"{name} ({split.num_rows} rows)" for name, split in dataset.items())
    columns = next(iter(dataset.values())).column_names if len(dataset) else []
    return f"splits {splits}; columns {', '.join(columns)}"


def dataset_files(path) -> list[Path]:
    """Every file of a saved dataset folder, sorted: what says whether it changed (sizes and times)."""
    return sorted(p for p in Path(path).expanduser().rglob("*") if p.is_file())


def pretraining_splits(path) -> list[tuple[str | None, object]]:
    """[(split, Dataset)] that pretraining reads from a saved dataset: a DatasetDict's `train` split, with its
    own validation split when it has one (split names "train" / "valid"); a Dataset, or a DatasetDict
    without a validation split, gets split None: the seeded hash of each document decides, as for text."""
    data = load_saved_dataset(path)
    if saved_dataset_kind(path) == "Dataset":
        return [(None, data)]
    if "train" not in data:
        raise UserError(f"{path} is a DatasetDict without a 'train' split ({describe(data)}); pretraining reads "
                        f"'train' (and {' / '.join(VALIDATION_SPLITS)} for validation when there is one)")
    valid = next((name for name in VALIDATION_SPLITS if name in data and data[name].num_rows), None)
    ignored = [name for name in data if name not in ("train", valid)]
    if ignored:
        log.info("%s: pretraining reads 'train'%s; not read: %s", path, f" and '{valid}'" if valid else "",
                 ", ".join(ignored))
    if valid is None:
        return [(None, data["train"])]
    return [("train", data["train"]), ("valid", data[valid])]


def text_column(dataset, field: str, where: str) -> None:
    """Refuse, in one line naming the fields there are, a dataset whose `field` is missing or not text."""
    fields = ", ".join(f"{name} ({_type_name(feature)})" for name, feature in dataset.features.items())
    if field not in dataset.column_names:
        raise UserError(f"{where} has no text field '{field}' (its fields: {fields}); choose one with "
                        f"--text-field / data.text_field")
    if _type_name(dataset.features[field]) not in TEXT_TYPES:
        raise UserError(f"{where}: field '{field}' holds {_type_name(dataset.features[field])}, not text (its "
                        f"fields: {fields}); choose a text field with --text-field / data.text_field")


def _type_name(feature) -> str:
    return getattr(feature, "dtype", None) or type(feature).__name__


def text_documents(dataset, field: str, where: str, batch_size: int = 1024):
    """The non-empty texts of one column, in row order, read a batch of rows at a time."""
    text_column(dataset, field, where)
    for batch in dataset.select_columns([field]).iter(batch_size=batch_size):
        for text in batch[field]:
            if text and text.strip():
                yield text
