"""Saved Hugging Face datasets (`save_to_disk` folders) as pretraining corpora and fine-tuning data.

The oracle for pretraining is the same rows written as JSONL: a saved dataset must give the very shards its
JSONL export gives. Each wrong shape is one line that says what was found and what to do.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from cli_support import assert_one_line_error_text, call_main, cli_main
from mpnet.data import EMBEDDED_CORPUS, iter_documents, preprocess_corpus, resolve_data
from mpnet.errors import UserError
from mpnet.tasks import get_task, load_task_data

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def chapters():
    docs = []
    for doc in iter_documents([EMBEDDED_CORPUS]):
        docs.append(doc[:1500])  # short chapters: tokenizing stays a fraction of a second
        if len(docs) == 8:
            return docs


def rows(texts, start=0):
    return {"body": texts, "id": list(range(start, start + len(texts)))}


def save(data, path):
    data.save_to_disk(str(path))
    return path


def write_jsonl(texts, path):
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    return path


def shard_bytes(directory) -> dict:
    return {name: (directory / name).read_bytes()
            for name in ("train.bin", "valid.bin", "train.idx.npy", "valid.idx.npy")}


def test_a_saved_dataset_gives_the_shards_of_its_jsonl_export(tmp_path, chapters):
    """A single Dataset: the seeded hash splits it exactly as it splits the same documents read from JSONL."""
    dataset = save(datasets.Dataset.from_dict(rows(chapters)), tmp_path / "ds")
    options = dict(text_field="body", valid_fraction=0.3, workers=1, progress=False)
    meta = preprocess_corpus(dataset, tmp_path / "from-ds", **options)
    preprocess_corpus(write_jsonl(chapters, tmp_path / "rows.jsonl"), tmp_path / "from-jsonl", **options)
    assert shard_bytes(tmp_path / "from-ds") == shard_bytes(tmp_path / "from-jsonl")
    assert meta["split_by"] == "hash" and meta["sources"][0]["format"] == "hf-dataset"
    assert meta["num_documents"]["valid"] > 0


def test_a_dataset_dict_keeps_its_own_validation_split(tmp_path, chapters):
    """train -> the training shard and validation -> the validation shard, whatever the hash says; the test
    split is not read."""
    train, valid, test = chapters[:5], chapters[5:7], chapters[7:]
    folder = save(datasets.DatasetDict(train=datasets.Dataset.from_dict(rows(train)),
                                       validation=datasets.Dataset.from_dict(rows(valid, 5)),
                                       test=datasets.Dataset.from_dict(rows(test, 7))), tmp_path / "dd")
    meta = preprocess_corpus(folder, tmp_path / "out", text_field="body", valid_fraction=0.5, workers=1,
                             progress=False)
    # Oracles: each split alone, all in the training shard (valid_fraction 0).
    for split, texts in (("train", train), ("valid", valid)):
        preprocess_corpus(write_jsonl(texts, tmp_path / f"{split}.jsonl"), tmp_path / f"only-{split}",
                          text_field="body", valid_fraction=0.0, workers=1, progress=False)
        expected = shard_bytes(tmp_path / f"only-{split}")
        assert (tmp_path / "out" / f"{split}.bin").read_bytes() == expected["train.bin"]
        assert np.array_equal(np.load(tmp_path / "out" / f"{split}.idx.npy"),
                              np.load(tmp_path / f"only-{split}" / "train.idx.npy"))
    assert meta["num_documents"] == {"train": 5, "valid": 2} and meta["split_by"] == "source"


def test_resolve_data_reads_a_saved_dataset_once_and_sees_it_change(tmp_path, chapters):
    folder = save(datasets.Dataset.from_dict(rows(chapters[:4])), tmp_path / "ds")
    first = resolve_data(folder, tmp_path / "cache", text_field="body", workers=1, progress=False)
    assert resolve_data(folder, tmp_path / "cache", text_field="body", workers=1, progress=False) == first
    save(datasets.Dataset.from_dict(rows(chapters[4:8])), tmp_path / "ds2")
    (tmp_path / "ds").rename(tmp_path / "old")
    (tmp_path / "ds2").rename(tmp_path / "ds")  # other rows under the same name
    assert resolve_data(folder, tmp_path / "cache", text_field="body", workers=1, progress=False) != first


def test_wrong_shapes_are_one_line(tmp_path, chapters):
    folder = save(datasets.Dataset.from_dict(rows(chapters[:2])), tmp_path / "ds")
    with pytest.raises(UserError, match=r"no text field 'text' \(its fields: body \(string\), id \(int64\)\); "
                                        r"choose one with --text-field"):
        preprocess_corpus(folder, tmp_path / "a", workers=1, progress=False)
    with pytest.raises(UserError, match="field 'id' holds int64, not text"):
        preprocess_corpus(folder, tmp_path / "a", text_field="id", workers=1, progress=False)
    no_train = save(datasets.DatasetDict(validation=datasets.Dataset.from_dict(rows(chapters[:2]))),
                    tmp_path / "dd")
    with pytest.raises(UserError, match=r"DatasetDict without a 'train' split \(splits validation \(2 rows\); "
                                        r"columns body, id\)"):
        preprocess_corpus(no_train, tmp_path / "a", text_field="body", workers=1, progress=False)
    empty = datasets.Dataset.from_dict({"body": []}, features=datasets.Features({"body": datasets.Value("string")}))
    save(datasets.DatasetDict(train=datasets.Dataset.from_dict(rows(chapters[:2])), validation=empty), tmp_path / "e")
    with pytest.raises(UserError, match="validation holds no rows"):  # datasets itself fails with an IndexError
        preprocess_corpus(tmp_path / "e", tmp_path / "a", text_field="body", workers=1, progress=False)
    assert not (tmp_path / "a").exists()


def test_preprocess_mpnet_reads_a_saved_dataset_with_text_field(tmp_path, chapters, capsys):
    main = cli_main("preprocess")
    folder = save(datasets.Dataset.from_dict(rows(chapters[:4])), tmp_path / "ds")
    code, err = call_main(main, folder, "--output-dir", tmp_path / "out", "--text-field", "body", "--workers", "1",
                          "--no-progress")
    assert code in (0, None), err
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["num_documents"] == {"train": 3, "valid": 1}
    assert_one_line_error_text(*call_main(main, folder, "--output-dir", tmp_path / "bad", "--no-progress"),
                               "no text field 'text'", "body (string)")


# ---------------------------------------------------------------------------------------------- fine-tuning


def labelled(n, start=0):
    return datasets.Dataset.from_dict({"sentence": [f"sentence {i}." for i in range(start, start + n)],
                                       "label": [i % 2 for i in range(start, start + n)]})


def test_finetuning_reads_a_dataset_dict_and_refuses_a_single_dataset(tmp_path):
    save(datasets.DatasetDict(train=labelled(6), validation=labelled(4, 6)), tmp_path / "sst2")
    data = load_task_data(get_task("sst2"), tmp_path / "sst2")
    assert data.layout == "hf-datasets" and data.train.text_a[1] == "sentence 1."
    assert data.dev[""].labels == [0, 1, 0, 1]

    single = save(labelled(6), tmp_path / "single")
    with pytest.raises(UserError, match=r"single saved Dataset \(6 rows; columns sentence, label\); fine-tuning "
                                        r"needs a DatasetDict with train and validation splits") as caught:
        load_task_data(get_task("sst2"), single)
    assert "\n" not in str(caught.value) and "train_test_split" in str(caught.value)

    save(datasets.DatasetDict(train=labelled(6), test=labelled(2)), tmp_path / "no-dev")
    with pytest.raises(UserError, match=r"has no dev/validation split \(splits train \(6 rows\), test \(2 rows\)"):
        load_task_data(get_task("sst2"), tmp_path / "no-dev")
    with pytest.raises(UserError, match="has no column 'sentence1'"):  # a pair task on single sentences
        load_task_data(get_task("mrpc"), tmp_path / "sst2")
