"""GLUE task definitions, metrics (against hand-computed values) and every supported data layout."""
from __future__ import annotations

import json
import math
import sys

import pytest

from mpnet.errors import UserError
from mpnet.tasks import GLUE_TASKS, METRICS, custom_task, get_task, load_task_data
from fixtures import write_columns, write_glue

# ---------------------------------------------------------------------------------------- metrics

PREDS = [1, 0, 1, 1, 0, 1]
LABELS = [1, 0, 0, 1, 1, 1]  # TP 3, FP 1, FN 1, TN 1


def test_classification_metrics_match_hand_computed_values():
    assert METRICS["accuracy"](PREDS, LABELS) == pytest.approx(4 / 6)
    assert METRICS["f1"](PREDS, LABELS) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # 0.75
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (3 - 1) / sqrt(4*4*2*2) = 0.25
    assert METRICS["matthews_corr"](PREDS, LABELS) == pytest.approx(0.25)
    # macro F1 over the 3 classes seen: class 0: P 1/2, R 1/2 -> 1/2; class 1: P 2/3, R 2/4 -> 4/7; class 2: 0
    assert METRICS["macro_f1"]([0, 1, 1, 2, 0, 1], [0, 1, 0, 1, 1, 1]) == pytest.approx((0.5 + 4 / 7 + 0.0) / 3)


def test_correlation_metrics_match_hand_computed_values():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 4.0]
    # Pearson: cov 3.5 / sqrt(5 * 4.75)
    assert METRICS["pearson"](x, y) == pytest.approx(3.5 / math.sqrt(5 * 4.75))
    # Spearman: ranks of y are 1, 2.5, 4, 2.5 -> Pearson of ranks = 3 / sqrt(5 * 4.5)
    assert METRICS["spearman"](x, y) == pytest.approx(3 / math.sqrt(5 * 4.5))
    # constant predictions have no correlation: 0.0, not NaN
    assert METRICS["pearson"]([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0


def test_official_metrics_and_scores_per_task():
    expected = {"cola": ["matthews_corr"], "sst2": ["accuracy"], "mrpc": ["accuracy", "f1"],
                "qqp": ["accuracy", "f1"], "stsb": ["pearson", "spearman"],
                "mnli": ["accuracy_m", "accuracy_mm"], "qnli": ["accuracy"], "rte": ["accuracy"], "wnli": ["accuracy"]}
    assert {name: task.metric_keys() for name, task in GLUE_TASKS.items()} == expected
    mrpc = get_task("mrpc")
    metrics = mrpc.compute_metrics(PREDS, LABELS)
    assert metrics == pytest.approx({"accuracy": 4 / 6, "f1": 0.75})
    assert mrpc.score(metrics) == pytest.approx((4 / 6 + 0.75) / 2)
    assert get_task("mnli").score({"accuracy_m": 0.8, "accuracy_mm": 0.7}) == 0.8  # best epoch picked on matched
    assert get_task("SST-2").name == "sst2" and get_task("stsb").is_regression and get_task("mnli").num_labels == 3
    with pytest.raises(UserError, match="unknown task 'glue9'"):
        get_task("glue9")


# ------------------------------------------------------------------------------ GLUE TSV layouts


def test_a_row_without_its_tabs_is_skipped_with_its_line_number(tmp_path, caplog):
    """Before, a row whose tabs were lost was dropped with no word at the default log level."""
    import logging

    folder = write_glue("sst2", tmp_path, n_train=6, n_dev=4)
    lines = (folder / "train.tsv").read_text().splitlines()
    lines[3] = lines[3].replace("\t", " ")  # file line 4: the header is line 1
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        data = load_task_data(get_task("sst2"), folder)
    assert len(data.train) == 5
    assert "train.tsv: skipped 1 line(s) with fewer than 2 tab-separated fields (line 4)" in caplog.text, caplog.text


@pytest.mark.parametrize("name", list(GLUE_TASKS))
def test_every_glue_tsv_layout(tmp_path, name):
    folder = write_glue(name, tmp_path, n_train=30, n_dev=10)
    task = get_task(name)
    for where in (folder, tmp_path):  # the task folder, or its parent (glue_data/)
        data = load_task_data(task, where)
        assert len(data.train) == 30  # QQP's malformed line and MNLI's '-' line are skipped
        assert set(data.dev) == {split.suffix for split in task.dev_splits}
        assert [len(s) for s in data.dev.values()] == ([10, 12] if name == "mnli" else [10])
        assert (data.train.text_b is None) == (not task.is_pair)
        assert all(text.endswith(".") for text in data.train.text_a)
        if task.is_regression:
            assert all(isinstance(v, float) and 1.0 <= v <= 5.0 for v in data.train.labels)
        else:
            assert set(data.train.labels) <= set(range(task.num_labels))
            assert len(set(data.train.labels)) > 1


def test_label_strings_map_to_hf_datasets_order(tmp_path):
    write_glue("rte", tmp_path)
    write_glue("mnli", tmp_path)
    write_glue("wnli", tmp_path)
    rte = load_task_data(get_task("rte"), tmp_path)
    rows = (tmp_path / "RTE" / "train.tsv").read_text().splitlines()[1:]
    assert [0 if r.endswith("\tentailment") else 1 for r in rows] == rte.train.labels  # entailment = 0
    mnli = load_task_data(get_task("mnli"), tmp_path)
    assert mnli.train.labels[:3] == [0, 1, 2]  # entailment, neutral, contradiction
    wnli = load_task_data(get_task("wnli"), tmp_path)
    rows = (tmp_path / "WNLI" / "train.tsv").read_text().splitlines()[1:]
    assert [int(r[-1]) for r in rows] == wnli.train.labels  # TSV 1 = entailment = HF index 1


def test_mrpc_raw_msr_files_with_bom_and_dev_ids(tmp_path):
    folder = write_glue("mrpc", tmp_path, n_train=20, n_dev=6)
    train = (folder / "train.tsv").read_text().splitlines()
    dev = (folder / "dev.tsv").read_text().splitlines()[1:]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "msr_paraphrase_train.txt").write_text("\ufeff" + "\n".join(train + dev) + "\n", encoding="utf-8")
    (raw / "dev_ids.tsv").write_text("".join(f"{r.split(chr(9))[1]}\t{r.split(chr(9))[2]}\n" for r in dev))
    data = load_task_data(get_task("mrpc"), raw)
    assert (len(data.train), len(data.dev[""])) == (20, 6)
    assert data.dev[""].text_a == [r.split("\t")[3] for r in dev]
    # without dev_ids.tsv the MSR test file is the dev set
    (raw / "dev_ids.tsv").unlink()
    (raw / "msr_paraphrase_test.txt").write_text("\n".join([train[0]] + dev) + "\n")
    data = load_task_data(get_task("mrpc"), raw)
    assert (len(data.train), len(data.dev[""])) == (26, 6)


# --------------------------------------------------------------------------- named-column formats


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_custom_classification_and_regression_from_named_columns(tmp_path, fmt):
    write_columns(tmp_path / "cls", fmt)
    data = load_task_data(custom_task("review", "other", "stars"), tmp_path / "cls")
    assert data.task.labels == ("neg", "pos") and data.task.metrics == ("accuracy", "f1")
    assert (len(data.train), len(data.dev[""])) == (40, 12) and len(data.train.text_b) == 40
    write_columns(tmp_path / "reg", fmt, regression=True)
    data = load_task_data(custom_task("review", None, "stars", "regression"), tmp_path / "reg")
    assert data.task.is_regression and data.train.text_b is None
    assert all(4.5 <= v <= 5.0 or 1.5 <= v <= 2.0 for v in data.train.labels)
    with pytest.raises(UserError, match="no column 'text'"):
        load_task_data(custom_task(), tmp_path / "cls")


def test_glue_task_from_jsonl_with_hf_column_names(tmp_path):
    for split, n in (("train", 5), ("validation", 3)):
        rows = [{"sentence1": f"a {i}.", "sentence2": f"b {i}.", "label": ["entailment", 1, "not_entailment"][i % 3]}
                for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_task_data(get_task("rte"), tmp_path)
    assert data.train.labels == [0, 1, 1, 0, 1] and len(data.dev[""]) == 3


def test_hf_datasets_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    names = ["not_equivalent", "equivalent"]
    features = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=names), "idx": datasets.Value("int32")})
    import pyarrow as pa

    def make(n):
        # Built from an Arrow table with an explicit fingerprint: Dataset.from_dict hashes its input with
        # dill, which fails with some dill/pyarrow version pairs and is beside the point here.
        table = pa.table({"sentence1": [f"s{i}" for i in range(n)], "sentence2": [f"t{i}" for i in range(n)],
                          "label": [i % 2 for i in range(n)], "idx": list(range(n))}).cast(features.arrow_schema)
        return datasets.Dataset(datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(features=features),
                                fingerprint=f"fixture-{n}")

    datasets.DatasetDict({"train": make(6), "validation": make(4), "test": make(2)}).save_to_disk(str(tmp_path / "mrpc"))
    data = load_task_data(get_task("mrpc"), tmp_path)
    assert data.layout == "hf-datasets" and data.train.labels == [0, 1, 0, 1, 0, 1] and len(data.dev[""]) == 4


def test_hf_datasets_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train", "validation"]}')
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(UserError, match="pip install datasets"):
        load_task_data(get_task("sst2"), tmp_path)


# -------------------------------------------------------------------------------------- bad input


def test_missing_directory_and_split_name_the_file_and_layout(tmp_path):
    with pytest.raises(UserError, match=r"does not exist; expected the GLUE SST-2 folder: train.tsv"):
        load_task_data(get_task("sst2"), tmp_path / "nowhere")
    folder = write_glue("mnli", tmp_path)
    (folder / "dev_mismatched.tsv").unlink()
    with pytest.raises(UserError, match=r"dev_mismatched.tsv is missing; expected the GLUE MNLI folder"):
        load_task_data(get_task("mnli"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty holds no data files; expected the GLUE CoLA folder"):
        load_task_data(get_task("cola"), tmp_path / "empty")
    folder = write_glue("sst2", tmp_path)
    (folder / "train.tsv").write_text("sentence\tlabel\nfine.\tmaybe\n")
    with pytest.raises(UserError, match="unknown label 'maybe'"):
        load_task_data(get_task("sst2"), tmp_path)
