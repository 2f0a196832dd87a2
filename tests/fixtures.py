"""Fixtures shared by the GLUE / fine-tuning / comparison / conversion tests (no tests in here).

Everything is written by the tests themselves: tiny random MPNet checkpoints (HF layout, with
tokenizer files) and small data sets in each supported layout, with a learnable signal (the label is
decided by a sentiment word) so a few steps of training move the metrics.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch

from mpnet import MPNetConfig, MPNetForPretraining

REPO = Path(__file__).resolve().parents[1]
RESOURCE_TOKENIZER = REPO / "mpnet" / "resources" / "tokenizer"

POSITIVE = ["good", "great", "fine", "nice", "happy"]
NEGATIVE = ["bad", "awful", "poor", "sad", "boring"]
FILLER = ["the", "a", "movie", "film", "was", "is", "very", "not", "plot", "actor", "story", "and", "it", "this"]
TINY_VOCAB = (["<s>", "<pad>", "</s>", "<unk>", "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "'", "-"]
              + FILLER + POSITIVE + NEGATIVE + ["##s", "##ed", "##ly", "yes", "no", "maybe", "dog", "cat", "<mask>"])


def make_tokenizer():
    """The real MPNet tokenizer when it is committed, else a tiny WordPiece one built here."""
    from transformers import AutoTokenizer, MPNetTokenizer

    if (RESOURCE_TOKENIZER / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(RESOURCE_TOKENIZER))
    return MPNetTokenizer(vocab={token: i for i, token in enumerate(TINY_VOCAB)})


def tiny_config(tokenizer, **overrides) -> MPNetConfig:
    settings = dict(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id, hidden_size=32,
                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=258,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    settings.update(overrides)
    return MPNetConfig.tiny(**settings)


def make_checkpoint(path: Path, seed: int = 0, tokenizer=None) -> Path:
    tokenizer = tokenizer or make_tokenizer()
    torch.manual_seed(seed)
    MPNetForPretraining(tiny_config(tokenizer)).save_pretrained(path, tokenizer=tokenizer)
    return path


# ----------------------------------------------------------------------------------- sentences


def sentence(rng: random.Random, positive: bool) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
    words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
    return " ".join(words) + "."


def pair(rng: random.Random, same: bool) -> tuple[str, str]:
    first_positive = rng.random() < 0.5
    return sentence(rng, first_positive), sentence(rng, first_positive if same else not first_positive)


STSB_HEADER = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
               "score"]


def _write_tsv(path: Path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def write_glue(task: str, root: Path, n_train: int = 48, n_dev: int = 16, seed: int = 0) -> Path:
    """A tiny data set of `task` in the official GLUE TSV layout under root/<GLUE folder>; returns that folder."""
    rng = random.Random(seed)
    folder = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
              "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}[task]
    out = root / folder

    def examples(n):
        for i in range(n):
            yield i, rng.random() < 0.5

    if task == "cola":  # headerless: source, label, original label, sentence
        for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
            _write_tsv(out / name, [["gj04", str(int(y)), "" if y else "*", sentence(rng, y)] for _, y in examples(n)])
    elif task == "sst2":
        for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
            _write_tsv(out / name, [[sentence(rng, y), str(int(y))] for _, y in examples(n)], ["sentence", "label"])
    elif task == "mrpc":
        header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
        for name, n, first in (("train.tsv", n_train, 0), ("dev.tsv", n_dev, n_train)):  # ids unique across files
            _write_tsv(out / name, [[str(int(y)), str(1000 + first + i), str(5000 + first + i), *pair(rng, y)]
                                    for i, y in examples(n)], header)
    elif task == "qqp":
        header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
        for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
            rows = [[str(i), str(2 * i), str(2 * i + 1), *pair(rng, y), str(int(y))] for i, y in examples(n)]
            rows.append(["999", "1", "2", "a question with no pair"])  # QQP has malformed lines: skipped
            _write_tsv(out / name, rows, header)
    elif task == "stsb":
        header = STSB_HEADER
        for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
            rows = []
            for i, y in examples(n):
                a, b = pair(rng, y)
                score = (4.0 if y else 1.0) + rng.random()
                rows.append([str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", a, b, f"{score:.3f}"])
            _write_tsv(out / name, rows, header)
    elif task == "mnli":
        header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                  "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
        labels = ["entailment", "neutral", "contradiction"]
        for name, n in (("train.tsv", n_train), ("dev_matched.tsv", n_dev), ("dev_mismatched.tsv", n_dev + 2)):
            rows = []
            for i in range(n):
                label = labels[i % 3]
                a, b = pair(rng, label == "entailment")
                rows.append([str(i), str(i), f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", a, b, label, label])
            rows.append(["900", "1", "1e", "fiction", "x", "y", "x", "y", "no gold label", "here", "neutral", "-"])
            _write_tsv(out / name, rows, header)
    elif task in ("qnli", "rte", "wnli"):
        cols = {"qnli": ["index", "question", "sentence", "label"],
                "rte": ["index", "sentence1", "sentence2", "label"],
                "wnli": ["index", "sentence1", "sentence2", "label"]}[task]
        for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
            rows = []
            for i, y in examples(n):
                label = str(int(y)) if task == "wnli" else ("entailment" if y else "not_entailment")
                rows.append([str(i), *pair(rng, y), label])
            _write_tsv(out / name, rows, cols)
    # GLUE folders also hold an unlabelled test.tsv; the readers must ignore it.
    _write_tsv(out / "test.tsv", [["index", "sentence"], ["0", "unlabelled"]])
    return out


def write_sentiment_scores(root: Path, n_train: int, n_dev: int, seed: int = 0) -> Path:
    """STS-B in the GLUE layout with a target that a tiny random-init model learns in a few steps: each sentence
    is one sentiment word, and the score counts the positive ones (0, 1 or 2, plus up to 0.2 of noise, so ranks
    are strict). Returns the STS-B folder under root."""
    rng = random.Random(seed)
    out = root / "STS-B"
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = []
        for i in range(n):
            positive = [rng.random() < 0.5, rng.random() < 0.5]
            words = [rng.choice(POSITIVE if p else NEGATIVE) + "." for p in positive]
            score = sum(positive) + 0.2 * rng.random()
            rows.append([str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", *words,
                         f"{score:.3f}"])
        _write_tsv(out / name, rows, STSB_HEADER)
    return out


def write_columns(root: Path, fmt: str, n_train: int = 40, n_dev: int = 12, seed: int = 0, regression=False) -> Path:
    """train/dev files with named columns (review, other, stars), CSV or JSONL."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("dev", n_dev)):
        records = []
        for _ in range(n):
            y = rng.random() < 0.5
            label = (4.5 if y else 1.5) + rng.random() / 2 if regression else ("pos" if y else "neg")
            records.append({"review": sentence(rng, y), "other": sentence(rng, y), "stars": label})
        if fmt == "csv":
            with open(root / f"{name}.csv", "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=["review", "other", "stars"])
                writer.writeheader()
                writer.writerows(records)
        else:
            (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


