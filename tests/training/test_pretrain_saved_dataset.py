"""pretrain-mpnet --data on a folder that Hugging Face datasets saved: its text field (--text-field) is the
corpus and a DatasetDict's own validation split is the one validated on."""
from __future__ import annotations

import json

import pytest
import yaml

from pretrain_support import TINY_RUN, embedded_prefix, error_line, pretrain


def test_pretrain_on_a_saved_dataset_dict_with_its_text_field(tmp_path):
    datasets = pytest.importorskip("datasets")
    paragraphs = [line for line in embedded_prefix(tmp_path / "prefix.txt", 20_000).read_text().splitlines() if line]
    split = {"train": paragraphs[:-2], "validation": paragraphs[-2:]}
    datasets.DatasetDict({name: datasets.Dataset.from_dict({"body": texts}) for name, texts in split.items()}
                         ).save_to_disk(str(tmp_path / "dd"))

    code, stderr = pretrain("--data", tmp_path / "dd", "--text-field", "body", "--output-dir", tmp_path / "run",
                            "--max-steps", 1, *TINY_RUN)
    assert code in (0, None), stderr
    (cache,) = (tmp_path / "run" / "data-cache").iterdir()
    meta = json.loads((cache / "metadata.json").read_text())
    assert meta["num_documents"] == {"train": len(split["train"]), "valid": 2} and meta["split_by"] == "source"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["text_field"] == "body"

    line = error_line(*pretrain("--data", tmp_path / "dd", "--output-dir", tmp_path / "other", "--max-steps", 1,
                                *TINY_RUN))
    assert "has no text field 'text' (its fields: body (string)); choose one with --text-field" in line
