"""Data side of pretraining: tokenizer, preprocessing into shards, token blocks, the MPNet collator.

Everything runs on a slice of the real embedded corpus (Jane Austen) with the real MPNet tokenizer.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mpnet.data import (DEFAULT_TOKENIZER_DIR, EMBEDDED_CORPUS, MPNetCollator, TokenBlocks, load_tokenizer,
                        preprocess_corpus, read_metadata, resolve_data, tokenizer_identity)
from mpnet.data.corpus import iter_documents
from mpnet.data.preprocess import is_valid_document
from mpnet.data.tokenizer import special_token_ids, word_starts
from mpnet.errors import UserError

SLICE_CHARS = 120_000


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def chapters():
    """The first chapters of the embedded corpus (about 120 kB), as a list of documents."""
    docs, size = [], 0
    for doc in iter_documents([EMBEDDED_CORPUS]):
        docs.append(doc)
        size += len(doc)
        if size > SLICE_CHARS:
            return docs


@pytest.fixture(scope="module")
def corpus_file(chapters, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "austen.txt"
    path.write_text("\n\n".join(chapters) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("default")


@pytest.fixture(scope="module")
def shards(corpus_file, tmp_path_factory):
    """Paragraph-level documents (one per line in the embedded format) so that both splits hold many of them."""
    out = tmp_path_factory.mktemp("shards") / "data"
    meta = preprocess_corpus(corpus_file, out, valid_fraction=0.1, workers=1, line_per_document=True,
                             progress=False)
    return out, meta


def paragraphs(chapters):
    return [line.strip() for doc in chapters for line in doc.split("\n") if line.strip()]


def split_documents(shard_dir, split):
    meta = read_metadata(shard_dir)
    tokens = np.fromfile(Path(shard_dir) / f"{split}.bin", dtype=meta["dtype"])
    idx = np.load(Path(shard_dir) / f"{split}.idx.npy")
    return [tokens[idx[i]: idx[i + 1]].astype(np.int64) for i in range(len(idx) - 1)]


# ------------------------------------------------------------------------------------------------ tokenizer

def test_default_tokenizer_is_the_real_mpnet_one(tok):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(DEFAULT_TOKENIZER_DIR), local_files_only=True)  # works without us too
    assert plain("Emma Woodhouse, handsome.").input_ids == tok("Emma Woodhouse, handsome.").input_ids
    assert len(tok) == 30527
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2, 30526)
    assert tok.unk_token_id == 104 and tok.unk_token == "[UNK]"
    ids = tok("It is a truth universally acknowledged <mask>.").input_ids
    assert ids[0] == 0 and ids[-1] == 2 and 30526 in ids
    assert tok.decode(ids[1:-1]) == "it is a truth universally acknowledged <mask>."  # lower-cased WordPiece
    assert {0, 1, 2, 104, 30526} <= set(special_token_ids(tok))
    starts = word_starts(tok)
    assert starts.shape == (30527,) and starts[tok.convert_tokens_to_ids("the")]
    assert not starts[tok.convert_tokens_to_ids("##s")]


def test_tokenizer_identity_is_stable_across_copies_and_differs_between_tokenizers(tok, tmp_path):
    tok.save_pretrained(tmp_path / "copy")
    assert tokenizer_identity(load_tokenizer(tmp_path / "copy")) == tokenizer_identity(tok)
    assert tokenizer_identity(tok).startswith("wordpiece-30527-")
    with pytest.raises(UserError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.skipif(not (Path(os.environ.get("MPNET_WEIGHTS_DIR", "~/.cache/mpnet/all-mpnet-base-v2")).expanduser()
                         / "tokenizer.json").is_file(), reason="all-mpnet-base-v2 not fetched")
def test_committed_tokenizer_encodes_like_the_fetched_model_directory(tok, chapters):
    from transformers import AutoTokenizer

    weights = Path(os.environ.get("MPNET_WEIGHTS_DIR", "~/.cache/mpnet/all-mpnet-base-v2")).expanduser()
    original = AutoTokenizer.from_pretrained(str(weights), local_files_only=True)
    # That tokenizer.json carries sentence-transformers' fixed 128-token padding/truncation: switch both off.
    for sentence in chapters[0][:5000].split(". ")[:20]:
        assert tok(sentence).input_ids == original(sentence, truncation=False, padding=False).input_ids


# ------------------------------------------------------------------------------------------------ preprocessing

def test_preprocess_writes_shards_metadata_and_tokenizer(shards, chapters, tok):
    out, meta = shards
    assert read_metadata(out) == meta
    docs = paragraphs(chapters)
    expected = {"train": [], "valid": []}
    for doc in docs:  # the split is the seeded content hash, recomputable from the text alone
        expected["valid" if is_valid_document(doc, 0, 0.1) else "train"].append(doc)

    assert meta["tokenizer"] == tokenizer_identity(tok)
    assert meta["vocab_size"] == 30527 and meta["dtype"] == "uint16"
    assert (meta["bos_token_id"], meta["pad_token_id"], meta["eos_token_id"], meta["mask_token_id"]) == (0, 1, 2, 30526)
    assert meta["num_documents"] == {s: len(expected[s]) for s in ("train", "valid")}
    assert 0.05 < meta["num_documents"]["valid"] / len(docs) < 0.15  # about valid_fraction
    for split in ("train", "valid"):
        stored = split_documents(out, split)
        encoded = [tok(d, add_special_tokens=False).input_ids for d in expected[split]]
        assert [s.tolist() for s in stored] == encoded  # boundaries and ids, document by document
        assert meta["num_tokens"][split] == sum(map(len, encoded))
        assert (out / f"{split}.bin").stat().st_size == 2 * meta["num_tokens"][split]
    # Round trip of one document through the shard and the saved tokenizer copy.
    saved = load_tokenizer(out / "tokenizer")
    assert tokenizer_identity(saved) == meta["tokenizer"]
    first = expected["train"][0]
    assert saved.decode(split_documents(out, "train")[0]) == tok.decode(tok(first, add_special_tokens=False).input_ids)
    assert saved.decode(split_documents(out, "train")[0]).startswith(" ".join(first.lower().split()[:5]))


def test_split_is_by_content_hash_not_position_and_workers_do_not_matter(shards, chapters, tmp_path):
    out, meta = shards
    docs = paragraphs(chapters)
    random.Random(1).shuffle(docs)
    shuffled = tmp_path / "shuffled.txt"
    shuffled.write_text("\n".join(docs))
    meta2 = preprocess_corpus(shuffled, tmp_path / "p", valid_fraction=0.1, workers=2, line_per_document=True,
                              progress=False)
    assert meta2["num_documents"] == meta["num_documents"] and meta2["num_tokens"] == meta["num_tokens"]
    valid_a = sorted(map(tuple, split_documents(out, "valid")))
    valid_b = sorted(map(tuple, split_documents(tmp_path / "p", "valid")))
    assert valid_a == valid_b


def test_preprocess_jsonl_and_blank_line_blocks(tmp_path, chapters, tok):
    rows = [{"id": i, "body": doc} for i, doc in enumerate(chapters[:3])]
    src = tmp_path / "docs.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n\n")
    meta = preprocess_corpus(src, tmp_path / "j", text_field="body", valid_fraction=0.0, workers=1, progress=False)
    assert meta["num_documents"] == {"train": 3, "valid": 0}
    stored = split_documents(tmp_path / "j", "train")
    assert [s.tolist() for s in stored] == [tok(d, add_special_tokens=False).input_ids for d in chapters[:3]]
    assert TokenBlocks(tmp_path / "j", "valid", 16).__len__() == 0  # an empty split is just empty
    with pytest.raises(UserError, match="no 'text' field"):
        preprocess_corpus(src, tmp_path / "k", workers=1, progress=False)


def test_small_corpus_still_gets_one_validation_document(tmp_path, chapters, tok, monkeypatch):
    import mpnet.data.preprocess as pp
    from mpnet.data.preprocess import split_score

    monkeypatch.setattr(pp, "COPY_TOKENS", 1000)  # the shard rewrite goes through several reads

    docs = chapters[:4]
    # A seed whose lowest-scoring document sits in the middle (the move must cut the shard, not trim its end).
    seed = next(s for s in range(100) if min(range(4), key=lambda i: split_score(docs[i], s)) in (1, 2)
                and not any(is_valid_document(d, s, 0.001) for d in docs))
    src = tmp_path / "four.txt"
    src.write_text("\n\n".join(docs))
    meta = preprocess_corpus(src, tmp_path / "out", valid_fraction=0.001, workers=1, seed=seed, progress=False)
    moved = min(range(4), key=lambda i: split_score(docs[i], seed))  # the lowest content hash, not a position
    assert meta["num_documents"] == {"train": 3, "valid": 1}
    encoded = [tok(d, add_special_tokens=False).input_ids for d in docs]
    assert [s.tolist() for s in split_documents(tmp_path / "out", "valid")] == [encoded[moved]]
    assert [s.tolist() for s in split_documents(tmp_path / "out", "train")] == encoded[:moved] + encoded[moved + 1:]
    assert meta["num_tokens"] == {"train": sum(map(len, encoded)) - len(encoded[moved]), "valid": len(encoded[moved])}


def test_preprocess_bad_input_and_existing_output(tmp_path, corpus_file):
    with pytest.raises(UserError, match="not found"):
        preprocess_corpus(tmp_path / "missing.txt", tmp_path / "a", progress=False)
    (tmp_path / "empty.txt").write_text("\n \n\n")
    with pytest.raises(UserError, match="empty"):
        preprocess_corpus(tmp_path / "empty.txt", tmp_path / "a", workers=1, progress=False)
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.tmp-*"))  # nothing half-written left
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="already exists"):
        preprocess_corpus(corpus_file, existing, workers=1, progress=False)
    assert (existing / "keep.txt").read_text() == "precious"
    preprocess_corpus(corpus_file, existing, workers=1, overwrite=True, progress=False)
    assert (existing / "metadata.json").is_file() and not (existing / "keep.txt").exists()


def test_resolve_data_caches_by_source_and_tokenizer(tmp_path, corpus_file, shards, monkeypatch):
    import mpnet.data.preprocess as pp

    assert resolve_data(shards[0], tmp_path / "cache") == shards[0]  # already preprocessed: as is
    src = tmp_path / "raw.txt"
    src.write_text(corpus_file.read_text()[:20_000])
    first = resolve_data(src, tmp_path / "cache", workers=1, progress=False)
    assert first.parent == tmp_path / "cache" and len(first.name) == 16
    assert read_metadata(first)["sources"][0]["path"] == str(src.resolve())

    def fail(*args, **kwargs):
        raise AssertionError("should have reused the cache")

    monkeypatch.setattr(pp, "preprocess_corpus", fail)
    assert resolve_data(src, tmp_path / "cache", workers=1) == first
    monkeypatch.undo()
    src.write_text(corpus_file.read_text()[:10_000])  # changed source -> new entry
    second = resolve_data(src, tmp_path / "cache", workers=1, progress=False)
    assert second != first and read_metadata(second)["num_tokens"]["train"] < read_metadata(first)["num_tokens"]["train"]


def test_sentencepiece_training_path(tmp_path, corpus_file):
    import sentencepiece as spm

    meta = preprocess_corpus(corpus_file, tmp_path / "sp", sentencepiece_vocab_size=800, valid_fraction=0.1,
                             workers=1, line_per_document=True, progress=False)
    assert meta["tokenizer"].startswith("unigram-") and meta["vocab_size"] <= 800
    assert (meta["bos_token_id"], meta["pad_token_id"], meta["eos_token_id"], meta["mask_token_id"]) == (0, 1, 2, 4)
    assert set(meta["special_token_ids"]) == {0, 1, 2, 3, 4} and meta["dtype"] == "uint16"
    tok = load_tokenizer(tmp_path / "sp" / "tokenizer")
    assert tokenizer_identity(tok) == meta["tokenizer"]
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp" / "tokenizer" / "sentencepiece.model"))
    train_docs = [d for d in paragraphs([corpus_file.read_text()]) if not is_valid_document(d, 0, 0.1)]
    stored = split_documents(tmp_path / "sp", "train")
    assert [s.tolist() for s in stored[:50]] == [sp.encode(d) for d in train_docs[:50]]
    assert tok("Miss <mask>.").input_ids[0] == 0 and 4 in tok("Miss <mask>.").input_ids
    assert load_tokenizer(tmp_path / "sp" / "tokenizer" / "sentencepiece.model").mask_token_id == 4
    assert tok.model_max_length == 512  # MPNet's longest input, saved with the tokenizer (was 1e30)
    assert len(tok("word " * 600, truncation=True).input_ids) == 512


# ------------------------------------------------------------------------------------------------ blocks

@pytest.mark.parametrize("n", [3, 64, 509])
def test_token_blocks_cut_the_separated_stream(shards, n):
    out, meta = shards
    docs = split_documents(out, "train")
    stream = np.concatenate([np.concatenate([d, [2]]) for d in docs])[:-1]  # </s> between documents only
    blocks = TokenBlocks(out, "train", block_size=n)
    assert len(blocks) == math.ceil(len(stream) / (n - 2))
    for i in list(range(min(len(blocks), 40))) + [len(blocks) - 2, len(blocks) - 1]:
        block = blocks[i]
        assert block.dtype == np.int64 and block[0] == 0 and block[-1] == 2
        assert len(block) == n or (i == len(blocks) - 1 and len(block) <= n)
        np.testing.assert_array_equal(block[1:-1], stream[i * (n - 2): (i + 1) * (n - 2)])
    assert np.array_equal(blocks[-1], blocks[len(blocks) - 1])
    with pytest.raises(IndexError):
        blocks[len(blocks)]
    clone = pickle.loads(pickle.dumps(blocks))  # DataLoader workers: no shard copy in the pickle
    assert len(pickle.dumps(blocks)) < 20_000 and np.array_equal(clone[5], blocks[5])


def test_token_blocks_refuse_a_truncated_shard(shards, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(shards[0], out)
    with open(out / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match="truncated"):
        TokenBlocks(out, "train", 128)


# ------------------------------------------------------------------------------------------------ collator

VOCAB, PAD, MASK = 50, 1, 49
SPECIALS = [0, 1, 2, 3, 49]


def random_rows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        row = rng.integers(4, MASK, size=n)
        row[0], row[-1] = 0, 2
        rows.append(row)
    return rows


def uncorrupted(batch):
    """The entries in permuted order with the predicted ones restored from the targets."""
    ids = batch["input_ids"].clone()
    m = batch["pred_size"]
    pred = ids[:, -m:]
    ids[:, -m:] = torch.where(batch["targets"] >= 0, batch["targets"], pred)
    return ids


def test_collator_rows_are_permutations_with_consistent_positions_and_targets():
    rows = random_rows([40, 40, 25, 3])
    collator = MPNetCollator(VOCAB, PAD, MASK, SPECIALS, seed=7)
    batch = collator(rows, step=3, rank=1)
    n, m = 40, round(0.15 * 40)
    assert batch["pred_size"] == m
    assert batch["input_ids"].shape == batch["positions"].shape == batch["attention_mask"].shape == (4, n)
    assert batch["targets"].shape == (4, m)
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "positions", "targets", "attention_mask"))
    restored = uncorrupted(batch)
    for b, row in enumerate(rows):
        pos, real = batch["positions"][b], batch["attention_mask"][b].bool()
        # Padding: pad id, position -1, attention 0, ordered first.
        assert torch.equal(real, pos >= 0)
        assert int(real.sum()) == len(row)
        assert not real[: n - len(row)].any() and real[n - len(row):].all()
        assert (batch["input_ids"][b][~real] == PAD).all()
        # Scatter back: the real entries are a permutation of the original positions and restore the row.
        assert sorted(pos[real].tolist()) == list(range(len(row)))
        back = torch.full((len(row),), -1)
        back[pos[real]] = restored[b][real]
        assert back.tolist() == row.tolist()
        # Targets are the original tokens at the predicted positions, in rank order; padding is never a target.
        pred_pos = pos[n - m:]
        tgt = batch["targets"][b]
        assert torch.equal(tgt >= 0, pred_pos >= 0)
        assert tgt[pred_pos >= 0].tolist() == row[pred_pos[pred_pos >= 0].numpy()].tolist()
    # The 3-token row has fewer real tokens than m: its first ranks are padding, marked -100.
    assert batch["targets"][3].tolist()[: m - 3] == [-100] * (m - 3)


def test_collator_corruption_is_80_10_10_and_never_draws_special_ids():
    rows = random_rows([128] * 512, seed=1)
    batch = MPNetCollator(VOCAB, PAD, MASK, SPECIALS)(rows, step=0)
    inp, tgt = batch["appended_ids"], batch["targets"]  # the default layout: the corrupted tokens are appended
    total = tgt.numel()
    masked = (inp == MASK).float().mean().item()
    same = (inp == tgt).float().mean().item()
    other = ((inp != MASK) & (inp != tgt)).float().mean().item()
    # A random replacement equals the original with probability 1/45: it then counts as "same".
    p_same = 0.1 + 0.1 / (VOCAB - len(SPECIALS))
    for observed, p in ((masked, 0.8), (same, p_same), (other, 0.1 - 0.1 / (VOCAB - len(SPECIALS)))):
        assert abs(observed - p) < 5 * math.sqrt(p * (1 - p) / total), (observed, p)
    replaced = inp[(inp != MASK) & (inp != tgt)]
    assert not np.isin(replaced.numpy(), SPECIALS).any()
    assert set(replaced.tolist()) == set(range(4, 49))  # uniform over all non-special ids
    assert (batch["input_ids"] != MASK).all()   # the content stream holds the real tokens, context and predicted


def test_collator_is_reproducible_from_seed_step_rank():
    rows = random_rows([64, 60, 50])
    collator = MPNetCollator(VOCAB, PAD, MASK, SPECIALS, seed=3)
    a = collator(rows, step=10, rank=0)
    same = MPNetCollator(VOCAB, PAD, MASK, SPECIALS, seed=3)(rows, step=10, rank=0)
    torch.manual_seed(123)  # global RNG state plays no part
    assert all(torch.equal(a[k], same[k]) for k in ("input_ids", "positions", "targets", "attention_mask"))
    for other in (collator(rows, step=11, rank=0), collator(rows, step=10, rank=1),
                  MPNetCollator(VOCAB, PAD, MASK, SPECIALS, seed=4)(rows, step=10, rank=0)):
        assert not torch.equal(a["positions"], other["positions"])


def test_collator_whole_word_units_and_special_tokens_held_back():
    starts = np.ones(VOCAB, dtype=bool)
    starts[20:40] = False  # ids 20..39 continue the previous word
    rows = random_rows([96] * 64, seed=2)
    collator = MPNetCollator(VOCAB, PAD, MASK, SPECIALS, whole_word_mask=True, word_starts=starts,
                             predict_special_tokens=False)
    batch = collator(rows, step=5)
    for b, row in enumerate(rows):
        pos = batch["positions"][b].tolist()
        for k, p in enumerate(pos):
            if 0 < p and not starts[row[p]] and row[p - 1] not in SPECIALS:
                assert pos[k - 1] == p - 1  # a continuation piece follows its word's previous piece
        tgt = batch["targets"][b]
        assert not np.isin(tgt[tgt >= 0].numpy(), SPECIALS).any()  # <s> </s> never predicted here
    assert (batch["targets"] >= 0).float().mean() > 0.9


def test_collator_on_real_blocks_feeds_the_model_what_it_predicts(shards):
    """Real blocks, the real tokenizer's words: each row is its block permuted (context and content stream
    uncorrupted), the targets are the block's tokens at the predicted positions, words stay whole, the appended
    inputs follow the corruption rule, and the model's prediction for the first predicted token does not see
    that token while the later ones do (the predicted part is where the model takes it to be)."""
    from mpnet import MPNetConfig, MPNetForPretraining

    out, meta = shards
    tokenizer = load_tokenizer(out)
    starts = word_starts(tokenizer)
    blocks = TokenBlocks(out, "train", block_size=32)
    examples = [np.asarray(blocks[i], dtype=np.int64) for i in (0, 1, len(blocks) - 1)]  # the last one is short
    assert len(examples[-1]) < 32
    collator = MPNetCollator(meta["vocab_size"], meta["pad_token_id"], meta["mask_token_id"],
                             meta["special_token_ids"], whole_word_mask=True, word_starts=starts)
    batch = collator(examples, step=0)
    n, m = 32, batch["pred_size"]
    assert m == round(0.15 * n) and batch["targets"].shape == batch["appended_ids"].shape == (3, m)
    special = set(meta["special_token_ids"]) | {meta["pad_token_id"], meta["mask_token_id"]}
    for b, block in enumerate(examples):
        pos, ids, real = batch["positions"][b], batch["input_ids"][b], batch["attention_mask"][b].bool()
        padding = n - len(block)  # entries first, pad id, position -1, never attended
        assert real.tolist() == [False] * padding + [True] * len(block)
        assert (ids[:padding] == meta["pad_token_id"]).all() and (pos[:padding] == -1).all()
        pos, ids = pos[padding:], ids[padding:]
        assert sorted(pos.tolist()) == list(range(len(block)))
        assert ids.tolist() == block[pos.numpy()].tolist()  # every entry is its block token, predicted ones too
        assert batch["targets"][b].tolist() == block[pos[-m:].numpy()].tolist()
        for k, p in enumerate(pos.tolist()):  # a word piece follows the piece before it, across the boundary too
            if p > 0 and not starts[block[p]] and block[p] not in special:
                assert pos[k - 1] == p - 1, (b, k, tokenizer.convert_ids_to_tokens([int(block[p - 1]), int(block[p])]))
        for given, target in zip(batch["appended_ids"][b].tolist(), batch["targets"][b].tolist()):
            assert given in (meta["mask_token_id"], target) or given not in special

    config = MPNetConfig(vocab_size=meta["vocab_size"], hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=66, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = MPNetForPretraining(config).eval()
    inputs = {k: batch[k] for k in ("input_ids", "positions", "pred_size", "attention_mask", "appended_ids")}
    # Rewrite the content-stream entry of each row's first predicted token (rank 0).
    edited = batch["input_ids"].clone()
    edited[:, n - m] = (edited[:, n - m] + 1) % meta["vocab_size"]
    with torch.no_grad():
        logits = model(**inputs)
        after = model(**{**inputs, "input_ids": edited})
    assert logits.shape == (3, m, meta["vocab_size"])
    torch.testing.assert_close(after[:, 0], logits[:, 0])        # rank 0 never reads its own token
    assert (after[:, 1:] - logits[:, 1:]).abs().amax(dim=(1, 2)).min() > 1e-4  # later ranks read it
