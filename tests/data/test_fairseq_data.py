"""fairseq data-bin directories: the MMIDIDX reader, dict.txt onto the tokenizer, documents, and training on one.

Oracles: fairseq's own MMapIndexedDataset (when fairseq is installed), the text the committed data-bin was
binarized from (tests/fixtures/fairseq, written by fairseq-preprocess), and the project's own tokenization of
that text. A small MMIDIDX writer below (fairseq's layout, or Megatron-LM's with a document index) makes the
cases fairseq-preprocess does not: several shards, other dtypes, non-contiguous items, a document index.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from cli_support import assert_one_line_error_text, call_main, cli_main
from mpnet.data import TokenBlocks, load_tokenizer, preprocess_corpus, read_metadata, resolve_data
from mpnet.data.fairseq_data import (IndexedShard, convert_fairseq_data, fairseq_token_table,
                                     looks_like_fairseq_data_bin, read_fairseq_dictionary)
from mpnet.errors import UserError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fairseq"
DATA_BIN = FIXTURE / "data-bin"
DTYPE_CODES = {np.uint8: 1, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8, np.uint32: 9}


def write_mmidx(prefix: Path, items, dtype=np.uint16, doc_idx=None, physical_order=None):
    """prefix.idx + prefix.bin in the MMIDIDX layout (fairseq/data/indexed_dataset.py); with doc_idx, Megatron-LM's
    variant. physical_order: the order the items are laid out in the .bin (default: index order, as fairseq)."""
    order = list(range(len(items))) if physical_order is None else physical_order
    pointers, blob = [0] * len(items), b""
    for i in order:
        pointers[i] = len(blob)
        blob += np.asarray(items[i], dtype=dtype).tobytes()
    prefix.with_name(prefix.name + ".bin").write_bytes(blob)
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQ", 1, DTYPE_CODES[dtype], len(items))
    if doc_idx is not None:
        header += struct.pack("<Q", len(doc_idx))
    body = np.array([len(t) for t in items], np.int32).tobytes() + np.array(pointers, np.int64).tobytes()
    tail = b"" if doc_idx is None else np.array(doc_idx, np.int64).tobytes()
    prefix.with_name(prefix.name + ".idx").write_bytes(header + body + tail)


def write_data_bin(root: Path, symbols, train, valid, **kwargs) -> Path:
    """dict.txt + train/valid. train may be a list of shards (train, train1, ...); items are fairseq ids."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dict.txt").write_text("".join(f"{s} {100 - i}\n" for i, s in enumerate(symbols)))
    shards = train if train and isinstance(train[0], list) and train[0] and isinstance(train[0][0], list) else [train]
    for k, items in enumerate(shards):
        write_mmidx(root / f"train{k or ''}", items, **kwargs)
    write_mmidx(root / "valid", valid, **kwargs)
    return root


def documents(shard_dir, split):
    meta = read_metadata(shard_dir)
    tokens = np.fromfile(Path(shard_dir) / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)
    offsets = np.load(Path(shard_dir) / f"{split}.idx.npy")
    return [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("default")


def blocks_of_lines(path: Path) -> list[list[str]]:
    docs, current = [], []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            docs.append(current)
            current = []
    return docs + ([current] if current else [])


# --------------------------------------------------------------------------------------------- the reader


def test_reader_reads_the_fairseq_written_fixture():
    shard = IndexedShard(DATA_BIN / "train")
    lines = (FIXTURE / "train.txt").read_text().split("\n")[:-1]
    assert len(shard) == len(lines) and shard.dtype == np.uint16  # one item per line, blank ones included
    symbols = read_fairseq_dictionary(DATA_BIN / "dict.txt")
    ids = {s: i for i, s in enumerate(symbols)}
    tok = load_tokenizer("default")
    for i, line in enumerate(lines):
        assert shard[i].tolist() == [ids[t] for t in tok.tokenize(line)] + [2]  # ... + </s>
    assert symbols[:5] == ["<s>", "<pad>", "</s>", "<unk>", "."] and symbols[-1] == "madeupword0003"


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int64])
def test_reader_matches_fairseq_mmap_indexed_dataset(tmp_path, dtype):
    fairseq_data = pytest.importorskip("fairseq.data")
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 60000, rng.integers(0, 9)).tolist() for _ in range(50)]
    write_mmidx(tmp_path / "x", items, dtype=dtype, physical_order=list(rng.permutation(50)))
    for prefix in (tmp_path / "x", DATA_BIN / "train", DATA_BIN / "valid"):
        ours, theirs = IndexedShard(prefix), fairseq_data.MMapIndexedDataset(str(prefix))
        assert len(ours) == len(theirs) and np.array_equal(ours.sizes, theirs.sizes)
        for i in range(len(theirs)):
            assert np.array_equal(ours[i], theirs[i].numpy())
    symbols = read_fairseq_dictionary(DATA_BIN / "dict.txt")
    assert symbols == fairseq_data.Dictionary.load(str(DATA_BIN / "dict.txt")).symbols


def test_writer_layout_reads_back_including_megatron_document_index(tmp_path):
    items = [[5, 6, 2], [], [7, 2], [8]]
    write_mmidx(tmp_path / "f", items, physical_order=[2, 0, 3, 1])
    write_mmidx(tmp_path / "m", items, dtype=np.int32, doc_idx=[0, 2, 4])
    for prefix in ("f", "m"):
        shard = IndexedShard(tmp_path / prefix)
        assert [shard[i].tolist() for i in range(4)] == items and shard.num_tokens == 6
    assert IndexedShard(tmp_path / "f").doc_idx is None
    assert IndexedShard(tmp_path / "m").doc_idx.tolist() == [0, 2, 4]


# -------------------------------------------------------------------------------------- ids and documents


def test_fixture_converts_to_the_documents_of_its_text(tmp_path, tok):
    """Blank-line blocks are documents; each line's </s> goes; every id is the tokenizer's id of the same token;
    fairseq's <unk> (valid words missing from the train-built dict.txt) becomes the tokenizer's unknown token."""
    meta = convert_fairseq_data(DATA_BIN, tmp_path / "out", progress=False)
    symbols = set(read_fairseq_dictionary(DATA_BIN / "dict.txt"))
    vocab = tok.get_vocab()
    for split in ("train", "valid"):
        expected = [[vocab[t] if t in symbols else tok.unk_token_id for line in doc for t in tok.tokenize(line)]
                    for doc in blocks_of_lines(FIXTURE / f"{split}.txt")]
        assert documents(tmp_path / "out", split) == expected
        assert meta["num_documents"][split] == len(expected)
    valid = [t for doc in documents(tmp_path / "out", "valid") for t in doc]
    assert 0.2 < valid.count(tok.unk_token_id) / len(valid) < 0.4 and tok.unk_token_id == vocab["[UNK]"]
    # The training documents are exactly what preprocess-mpnet makes of the same text.
    raw = "\n\n".join("\n".join(doc) for doc in blocks_of_lines(FIXTURE / "train.txt"))
    assert documents(tmp_path / "out", "train") == [tok(d, add_special_tokens=False).input_ids for d in raw.split("\n\n")]
    assert meta["vocab_size"] == len(tok) and meta["dtype"] == "uint16" and meta["eos_token_id"] == 2
    assert meta["fairseq_data_bin"] == str(DATA_BIN) and {s["format"] for s in meta["sources"]} == {
        "fairseq-txt", "fairseq-idx", "fairseq-bin"}
    blocks = TokenBlocks(tmp_path / "out", "train", block_size=32)
    assert len(blocks) == -(-(meta["num_tokens"]["train"] + meta["num_documents"]["train"] - 1) // 30)


def test_line_per_document_and_document_rules(tmp_path, tok, monkeypatch):
    """Documents from blank lines, Megatron's document index and shard ends; </s> dropped only at a line's end;
    the same output whatever the chunk sizes (chunk boundaries inside items and documents)."""
    import mpnet.data.fairseq_data as fd

    symbols = ["hello", "world", "the", "cat"]
    h, w, t, c = 4, 5, 6, 7
    shard0 = [[h, w, 2], [t, 2], [2], [2], [c, 2, c, 2], [h]]
    shard1 = [[w, w, 2], [2], [t, c, 2]]
    root = write_data_bin(tmp_path / "bin", symbols, [shard0, shard1], [[c, 2]], physical_order=None)
    ids = {s: tok.convert_tokens_to_ids(s) for s in symbols}
    H, W, T, C, EOS = ids["hello"], ids["world"], ids["the"], ids["cat"], tok.eos_token_id
    by_blank = [[H, W, T], [C, EOS, C, H], [W, W], [T, C]]  # shard ends close documents; inner </s> stays
    by_line = [[H, W], [T], [C, EOS, C], [H], [W, W], [T, C]]
    for line_per_document, expected in ((False, by_blank), (True, by_line)):
        out = tmp_path / f"out-{line_per_document}"
        convert_fairseq_data(root, out, line_per_document=line_per_document, progress=False)
        assert documents(out, "train") == expected and documents(out, "valid") == [[C]]
        monkeypatch.setattr(fd, "ITEMS_PER_CHUNK", 2)
        monkeypatch.setattr(fd, "TOKENS_PER_CHUNK", 3)
        convert_fairseq_data(root, tmp_path / "small-chunks", line_per_document=line_per_document,
                             overwrite=True, progress=False)
        assert documents(tmp_path / "small-chunks", "train") == expected
        monkeypatch.undo()

    # Megatron-LM's document index: items 0-1 | 2-4 are documents even without a blank line; items out of order.
    megatron = tmp_path / "megatron"
    megatron.mkdir()
    (megatron / "dict.txt").write_text("".join(f"{s} 1\n" for s in symbols))
    write_mmidx(megatron / "train", [[h], [w], [t], [c], [h, w]], dtype=np.int32, doc_idx=[0, 2, 5],
                physical_order=[4, 1, 3, 0, 2])
    write_mmidx(megatron / "valid", [[t]], dtype=np.int32, doc_idx=[0, 1])
    convert_fairseq_data(megatron, tmp_path / "m-out", progress=False)
    assert documents(tmp_path / "m-out", "train") == [[H, W], [T, C, H, W]]


def test_specials_map_by_meaning_and_symbols_by_token(tok):
    table = fairseq_token_table(["<s>", "<pad>", "</s>", "<unk>", "the", "##s", "nonexistent-token"], tok)
    assert table.tolist() == [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id,
                              tok.convert_tokens_to_ids("the"), tok.convert_tokens_to_ids("##s"), -1]


# ------------------------------------------------------------------------------------------------ refusals


def test_unmappable_or_foreign_data_is_refused_in_one_line(tmp_path):
    def refused(root, *fragments):
        with pytest.raises(UserError) as err:
            convert_fairseq_data(root, tmp_path / "never", progress=False)
        assert "\n" not in str(err.value) and all(f in str(err.value) for f in fragments), str(err.value)
        assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never.tmp-*"))

    # A symbol the tokenizer lacks is fine while unused (fairseq's madeupword padding is), refused once it occurs.
    ok = write_data_bin(tmp_path / "unused", ["the", "Ġfoo"], [[4, 2]], [[4, 2]])
    convert_fairseq_data(ok, tmp_path / "fine", progress=False)
    refused(write_data_bin(tmp_path / "used", ["the", "Ġfoo", "Ġbar"], [[4, 5, 6, 2]], [[4, 2]]), "'Ġfoo'")
    refused(write_data_bin(tmp_path / "outside", ["the"], [[4, 9, 2]], [[4, 2]]), "token id 9", "do not belong")
    refused(write_data_bin(tmp_path / "ints", ["50256", "13", "11"], [[4, 2]], [[4, 2]]), "token ids")

    truncated = write_data_bin(tmp_path / "truncated", ["the"], [[4, 4, 4, 2]], [[4, 2]])
    (truncated / "train.bin").write_bytes((truncated / "train.bin").read_bytes()[:3])
    refused(truncated, "train.bin", "truncated")
    short_index = write_data_bin(tmp_path / "short-index", ["the"], [[4, 2]] * 5, [[4, 2]])
    (short_index / "train.idx").write_bytes((short_index / "train.idx").read_bytes()[:-7])
    refused(short_index, "train.idx", "truncated or corrupt")
    legacy = write_data_bin(tmp_path / "legacy", ["the"], [[4, 2]], [[4, 2]])
    (legacy / "train.idx").write_bytes(b"TNTIDX\x00\x00" + bytes(40))
    refused(legacy, "--dataset-impl mmap")
    floats = write_data_bin(tmp_path / "floats", ["the"], [[4, 2]], [[4, 2]])
    (floats / "valid.idx").write_bytes((floats / "valid.idx").read_bytes()[:17] + b"\x06" +
                                       (floats / "valid.idx").read_bytes()[18:])
    refused(floats, "not an integer type")
    no_valid = write_data_bin(tmp_path / "no-valid", ["the"], [[4, 2]], [[4, 2]])
    (no_valid / "valid.idx").unlink()
    refused(no_valid, "no valid.idx", "--validpref")
    no_dict = write_data_bin(tmp_path / "no-dict", ["the"], [[4, 2]], [[4, 2]])
    (no_dict / "dict.txt").unlink()
    refused(no_dict, "no dict.txt")
    (tmp_path / "binary-dict").mkdir()
    shutil.copy(no_valid / "train.bin", tmp_path / "binary-dict")
    shutil.copy(no_valid / "train.idx", tmp_path / "binary-dict")
    (tmp_path / "binary-dict" / "dict.txt").write_bytes(bytes(range(256)) * 4)
    write_mmidx(tmp_path / "binary-dict" / "valid", [[4, 2]])
    refused(tmp_path / "binary-dict", "not UTF-8")


def test_resolve_data_converts_once_and_never_reads_a_data_bin_as_text(tmp_path, monkeypatch):
    import mpnet.data.fairseq_data as fd

    data_bin = shutil.copytree(DATA_BIN, tmp_path / "data-bin")
    first = resolve_data(data_bin, tmp_path / "cache", progress=False)
    assert first.parent == tmp_path / "cache" and read_metadata(first)["fairseq_data_bin"] == str(data_bin.resolve())

    def fail(*args, **kwargs):
        raise AssertionError("should have reused the cache")

    monkeypatch.setattr(fd, "convert_fairseq_data", fail)
    assert resolve_data(data_bin, tmp_path / "cache") == first
    assert resolve_data(data_bin, tmp_path / "cache", line_per_document=False) == first
    monkeypatch.undo()
    assert resolve_data(data_bin, tmp_path / "cache", line_per_document=True, progress=False) != first

    # Only dict.txt (the binarized files lost): refused, not taken for a one-document text corpus.
    (tmp_path / "dict-only").mkdir()
    shutil.copy(DATA_BIN / "dict.txt", tmp_path / "dict-only")
    assert looks_like_fairseq_data_bin(tmp_path / "dict-only")
    with pytest.raises(UserError, match="fairseq data-bin .* no train.idx"):
        resolve_data(tmp_path / "dict-only", tmp_path / "cache")
    with pytest.raises(UserError, match="--from-fairseq"):
        preprocess_corpus(data_bin, tmp_path / "p", progress=False)
    with pytest.raises(UserError, match="--from-fairseq"):  # inside a list of raw inputs too
        resolve_data([FIXTURE / "train.txt", data_bin], tmp_path / "cache")
    with pytest.raises(UserError, match="sentencepiece"):
        resolve_data(data_bin, tmp_path / "cache", sentencepiece_vocab_size=100)
    assert not looks_like_fairseq_data_bin(first)  # our own directories stay ours


# ---------------------------------------------------------------------------------------------- commands


def test_preprocess_from_fairseq_command(tmp_path):
    main = cli_main("preprocess")
    out = tmp_path / "imported"
    code, err = call_main(main, "--from-fairseq", DATA_BIN, "--output-dir", out, "--no-progress")
    assert code in (0, None), err
    assert read_metadata(out)["num_documents"] == {"train": 9, "valid": 3}
    assert_one_line_error_text(*call_main(main, "--from-fairseq", DATA_BIN, "--output-dir", out), "already exists")
    assert_one_line_error_text(*call_main(main, DATA_BIN, "--output-dir", tmp_path / "x"), "--from-fairseq")
    assert_one_line_error_text(*call_main(main, "--from-fairseq", DATA_BIN, "corpus.txt", "-o", tmp_path / "y"),
                               "not both")
    assert_one_line_error_text(*call_main(main, "--from-fairseq", DATA_BIN, "--sentencepiece-vocab-size", "100",
                                          "-o", tmp_path / "z"), "--sentencepiece-vocab-size")
    assert_one_line_error_text(*call_main(main, "-o", tmp_path / "w"), "INPUT")
    # not a directory: a file, a missing path, an empty directory (each was a traceback)
    (tmp_path / "corpus.txt").write_text("a line\n")
    (tmp_path / "empty").mkdir()
    for source, words in (("corpus.txt", "is a file"), ("missing", "is not found"), ("empty", "no dict.txt")):
        assert_one_line_error_text(*call_main(main, "--from-fairseq", tmp_path / source, "-o", tmp_path / "v"), words)
    assert not (tmp_path / "v").exists()


def test_pretrain_trains_on_a_fairseq_data_bin(tmp_path):
    main = cli_main("pretrain")
    out = tmp_path / "run"
    small = ["model.hidden_size=32", "model.num_attention_heads=2", "model.intermediate_size=64",
             "model.num_hidden_layers=1", "data.block_size=32", "training.batch_size=2", "logging.valid_every=2",
             "logging.valid_batches=1", "logging.progress_bar=false", "optim.warmup_steps=1"]
    code, err = call_main(main, "--output-dir", out, "--data", DATA_BIN, "--max-steps", "2", "--save-every", "2", *small)
    assert code in (0, None), err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in rows) and any(k.startswith("valid/") for r in rows for k in r)
    cached = [read_metadata(p) for p in (out / "data-cache").iterdir() if (p / "metadata.json").is_file()]
    assert [m["fairseq_data_bin"] for m in cached] == [str(DATA_BIN)]
    (tmp_path / "dict-only").mkdir()
    shutil.copy(DATA_BIN / "dict.txt", tmp_path / "dict-only")
    assert_one_line_error_text(*call_main(main, "--output-dir", tmp_path / "run2", "--data", tmp_path / "dict-only",
                                          "--max-steps", "1", *small), "no train.idx")
