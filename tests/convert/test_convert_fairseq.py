"""convert-mpnet fairseq: a fake checkpoint in EXACTLY the original fairseq MPNet layout, converted and
checked against an independent plain-torch re-implementation of the fairseq single-stream forward.

The layout (microsoft/MPNet, pretraining/fairseq): ckpt["args"] is an argparse.Namespace, ckpt["model"]
holds `decoder.sentence_encoder.*` (embed_tokens, embed_positions with padding_idx 1, emb_layer_norm,
relative_attention_bias, layers.{i}.self_attn.in_proj_weight/in_proj_bias packed q|k|v,
self_attn.out_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm) and `decoder.lm_head.*` (dense,
layer_norm, weight tied to embed_tokens, bias). The dictionary is <s>,<pad>,</s>,<unk> + dict.txt lines
+ <mask> (added by the task) + a fairseq padding word; dict.txt is deliberately NOT in HF order here, so
the test also proves the id remapping.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fixtures import make_tokenizer
from cli_support import assert_one_line_error_text, call_main, cli_main

HIDDEN, HEADS, FFN, LAYERS, POSITIONS = 16, 2, 32, 2, 64 + 2


class TrainMeter:
    """Stands for fairseq objects in extra_state (meters): the converter must not need their class."""

    def __init__(self):
        self.avg, self.count = 1.5, 3


def _fairseq_symbols(tokenizer, seed=0):
    """(dict.txt symbols in fairseq order, omitted HF tokens)."""
    vocab = tokenizer.get_vocab()
    ordinary = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= 4 and t != tokenizer.mask_token]
    rng = random.Random(seed)
    rng.shuffle(ordinary)  # not HF order: the converter must move every row to its symbol's HF id
    omitted = ordinary[-3:]  # HF tokens the fairseq model never had (they get the <unk> row)
    return ordinary[:-3], omitted


def make_fairseq_checkpoint(tmp_path, tokenizer, seed=0):
    symbols, omitted = _fairseq_symbols(tokenizer, seed)
    (tmp_path / "dict.txt").write_text("".join(f"{s} {1000 - i % 900}\n" for i, s in enumerate(symbols)))
    rows = 4 + len(symbols) + 1 + 1  # specials + dict + <mask> (task) + madeupword0000 (padding)
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape, std=0.1: std * torch.randn(*shape, generator=gen)  # noqa: E731
    enc, lm = "decoder.sentence_encoder.", "decoder.lm_head."
    embed = r(rows, HIDDEN, std=0.5)
    embed[1] = 0  # padding_idx row, as fairseq initialises it
    state = {
        f"{enc}embed_tokens.weight": embed,
        f"{enc}embed_positions.weight": r(POSITIONS, HIDDEN, std=0.5),
        f"{enc}relative_attention_bias.weight": r(32, HEADS, std=1.0),
        f"{enc}emb_layer_norm.weight": 1 + r(HIDDEN), f"{enc}emb_layer_norm.bias": r(HIDDEN),
    }
    for i in range(LAYERS):
        p = f"{enc}layers.{i}."
        state.update({
            p + "self_attn.in_proj_weight": r(3 * HIDDEN, HIDDEN, std=0.3), p + "self_attn.in_proj_bias": r(3 * HIDDEN),
            p + "self_attn.out_proj.weight": r(HIDDEN, HIDDEN, std=0.3), p + "self_attn.out_proj.bias": r(HIDDEN),
            p + "self_attn_layer_norm.weight": 1 + r(HIDDEN), p + "self_attn_layer_norm.bias": r(HIDDEN),
            p + "fc1.weight": r(FFN, HIDDEN, std=0.3), p + "fc1.bias": r(FFN),
            p + "fc2.weight": r(HIDDEN, FFN, std=0.3), p + "fc2.bias": r(HIDDEN),
            p + "final_layer_norm.weight": 1 + r(HIDDEN), p + "final_layer_norm.bias": r(HIDDEN),
        })
    state.update({
        f"{lm}dense.weight": r(HIDDEN, HIDDEN, std=0.3), f"{lm}dense.bias": r(HIDDEN),
        f"{lm}layer_norm.weight": 1 + r(HIDDEN), f"{lm}layer_norm.bias": r(HIDDEN),
        f"{lm}weight": embed,  # tied: the state dict holds the same tensor under both names
        f"{lm}bias": r(rows),
    })
    args = argparse.Namespace(arch="mpnet_rel_base", encoder_layers=LAYERS, encoder_embed_dim=HIDDEN,
                              encoder_ffn_embed_dim=FFN, encoder_attention_heads=HEADS, activation_fn="gelu",
                              pooler_activation_fn="tanh", dropout=0.1, attention_dropout=0.1,
                              activation_dropout=0.0, pooler_dropout=0.0, max_positions=POSITIONS - 2,
                              use_relative_positions=True, normalize_before=False, task="masked_permutation_lm",
                              input_mode="mpnet", tokens_per_sample=POSITIONS - 2)
    ckpt = {"args": args, "model": state,
            "optimizer_history": [{"criterion_name": "MaskedPermutationCrossEntropyCriterion",
                                   "optimizer_name": "FairseqAdam", "lr_scheduler_state": {"best": 1.9},
                                   "num_updates": 125000}],
            "extra_state": {"train_iterator": {"epoch": 3}, "val_loss": 1.9, "train_meters": {"loss": TrainMeter()}},
            "last_optimizer_state": {"state": {}, "param_groups": [{"lr": 5e-4}]}}
    torch.save(ckpt, tmp_path / "checkpoint_best.pt")
    fairseq_ids = {s: i for i, s in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + symbols + ["<mask>"])}
    return tmp_path / "checkpoint_best.pt", tmp_path / "dict.txt", state, fairseq_ids, omitted


# ------------------------------------------------- the fairseq forward, written out independently


def _bucket(relative_position, num_buckets=32, max_distance=128):
    # TransformerSentenceEncoder.relative_position_bucket, transcribed
    ret = 0
    n = -relative_position
    num_buckets //= 2
    ret += (n < 0).to(torch.long) * num_buckets
    n = torch.abs(n)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                                * (num_buckets - max_exact)).to(torch.long)
    val_if_large = torch.min(val_if_large, torch.full_like(val_if_large, num_buckets - 1))
    return ret + torch.where(is_small, n, val_if_large)


def fairseq_forward(state, tokens):
    """TransformerSentenceEncoder (post-LN, relative bias, key padding mask) + RobertaLMHead, (T, B, C) like fairseq."""
    enc, lm = "decoder.sentence_encoder.", "decoder.lm_head."
    ln = lambda x, p: F.layer_norm(x, (HIDDEN,), state[p + ".weight"], state[p + ".bias"], eps=1e-5)  # noqa: E731
    padding_mask = tokens.eq(1)
    mask = tokens.ne(1).int()
    positions = (torch.cumsum(mask, dim=1) * mask).long() + 1  # fairseq make_positions, padding_idx 1
    x = F.embedding(tokens, state[f"{enc}embed_tokens.weight"]) + F.embedding(positions, state[f"{enc}embed_positions.weight"])
    x = ln(x, f"{enc}emb_layer_norm")
    x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
    x = x.transpose(0, 1)
    tgt_len, bsz, _ = x.shape
    ctx = torch.arange(tgt_len)[:, None]
    mem = torch.arange(tgt_len)[None, :]
    values = F.embedding(_bucket(mem - ctx), state[f"{enc}relative_attention_bias.weight"])
    positions_bias = values.permute([2, 0, 1]).unsqueeze(0).expand((bsz, -1, tgt_len, tgt_len)).reshape(-1, tgt_len, tgt_len)
    head_dim = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"{enc}layers.{i}."
        residual = x
        w, b = state[p + "self_attn.in_proj_weight"], state[p + "self_attn.in_proj_bias"]
        q = F.linear(x, w[:HIDDEN], b[:HIDDEN]) * head_dim**-0.5
        k = F.linear(x, w[HIDDEN:2 * HIDDEN], b[HIDDEN:2 * HIDDEN])
        v = F.linear(x, w[2 * HIDDEN:], b[2 * HIDDEN:])
        q = q.contiguous().view(tgt_len, bsz * HEADS, head_dim).transpose(0, 1)
        k = k.contiguous().view(-1, bsz * HEADS, head_dim).transpose(0, 1)
        v = v.contiguous().view(-1, bsz * HEADS, head_dim).transpose(0, 1)
        attn_weights = torch.bmm(q, k.transpose(1, 2)).view(bsz, HEADS, tgt_len, tgt_len)
        attn_weights = attn_weights.masked_fill(padding_mask.unsqueeze(1).unsqueeze(2), float("-inf"))
        attn_weights = attn_weights.view(bsz * HEADS, tgt_len, tgt_len) + positions_bias
        attn = torch.bmm(torch.softmax(attn_weights, dim=-1), v)
        attn = attn.transpose(0, 1).contiguous().view(tgt_len, bsz, HIDDEN)
        x = ln(residual + F.linear(attn, state[p + "self_attn.out_proj.weight"], state[p + "self_attn.out_proj.bias"]),
               p + "self_attn_layer_norm")
        residual = x
        x = F.linear(F.gelu(F.linear(x, state[p + "fc1.weight"], state[p + "fc1.bias"])), state[p + "fc2.weight"],
                     state[p + "fc2.bias"])
        x = ln(residual + x, p + "final_layer_norm")
    features = x.transpose(0, 1)
    y = ln(F.gelu(F.linear(features, state[f"{lm}dense.weight"], state[f"{lm}dense.bias"])), f"{lm}layer_norm")
    return features, F.linear(y, state[f"{lm}weight"]) + state[f"{lm}bias"]


# ------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fairseq")
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    ckpt, dict_txt, state, fairseq_ids, omitted = make_fairseq_checkpoint(tmp, tokenizer)
    out = tmp / "converted"
    code, err = call_main(cli_main("convert"), "fairseq", ckpt, "--dict", dict_txt, "--output-dir", out,
                          "--tokenizer", tmp / "tokenizer")
    assert code in (0, None), err
    return out, tokenizer, state, fairseq_ids, omitted


@torch.no_grad()
def test_converted_model_matches_the_fairseq_forward(converted):
    from mpnet import MPNetForPretraining

    out, tokenizer, state, fairseq_ids, omitted = converted
    model = MPNetForPretraining.from_pretrained(out).eval()
    vocab = tokenizer.get_vocab()
    gen = torch.Generator().manual_seed(1)
    words = [s for s in fairseq_ids if s not in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")]
    picks = torch.randint(len(words), (3, 20), generator=gen)
    rows = [["<s>"] + [words[i] for i in row] + ["</s>"] for row in picks.tolist()]
    rows[1] = rows[1][:13] + ["<pad>"] * 9  # a right-padded row
    rows[2][5] = "<mask>"
    fs_tokens = torch.tensor([[fairseq_ids[s] for s in row] for row in rows])
    hf_tokens = torch.tensor([[vocab[s] for s in row] for row in rows])
    real = fs_tokens.ne(1)

    ref_features, ref_logits = fairseq_forward(state, fs_tokens)
    features = model.encode(hf_tokens, real.long())
    logits = model.mlm_logits(hf_tokens, real.long())
    assert (features[real] - ref_features[real]).abs().max().item() <= 1e-5
    # Logits: the HF column of each fairseq symbol must equal fairseq's column for it.
    symbols = [s for s in fairseq_ids if s in vocab]
    ours = logits[..., [vocab[s] for s in symbols]]
    theirs = ref_logits[..., [fairseq_ids[s] for s in symbols]]
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5

    # Transformers reads the directory as an ordinary MPNetForMaskedLM with the same numbers.
    from transformers import AutoModelForMaskedLM

    hf, info = AutoModelForMaskedLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf_logits = hf.eval()(input_ids=hf_tokens, attention_mask=real.long()).logits
    assert (hf_logits[real] - logits[real]).abs().max().item() <= 1e-5


def test_conversion_report_and_vocabulary(converted):
    out, tokenizer, state, fairseq_ids, omitted = converted
    report = json.loads((out / "conversion.json").read_text())
    assert report["identity"] is False  # dict.txt was shuffled
    assert report["rows_dropped"] == 1 and report["rows_dropped_examples"] == ["madeupword0000"]
    assert report["hf_ids_without_fairseq_row"] == len(omitted)
    assert report["max_abs_diff_vs_fairseq_forward"] <= 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-5 and config["num_attention_heads"] == HEADS
    assert config["max_position_embeddings"] == POSITIONS and config["vocab_size"] == len(tokenizer)
    assert config["mask_token_id"] == tokenizer.mask_token_id
    # A token the fairseq model never had gets its <unk> embedding.
    from mpnet import MPNetForPretraining

    model = MPNetForPretraining.from_pretrained(out)
    emb = model.mpnet.embeddings.word_embeddings.weight
    unk = state["decoder.sentence_encoder.embed_tokens.weight"][3]
    assert torch.equal(emb[tokenizer.get_vocab()[omitted[0]]], unk)
    assert torch.equal(emb[tokenizer.mask_token_id], state["decoder.sentence_encoder.embed_tokens.weight"][fairseq_ids["<mask>"]])


def test_dictionary_of_bert_ids_maps_to_hf_ids_plus_four(tmp_path):
    """A dict.txt whose symbols are BERT token ids (RoBERTa-style): symbol k is HF id k + 4."""
    from mpnet.convert.fairseq import read_fairseq_dictionary, vocabulary_mapping

    tokenizer = make_tokenizer()
    bert_ids = [7, 0, 5, 1]  # any order
    (tmp_path / "dict.txt").write_text("".join(f"{k} {100 - k}\n" for k in bert_ids))
    symbols = read_fairseq_dictionary(tmp_path / "dict.txt")
    mapping, report = vocabulary_mapping(symbols, len(symbols) + 1, tokenizer)
    assert report["dictionary_symbols"] == "bert-ids"
    assert mapping == [0, 1, 2, 3, 11, 4, 9, 5, tokenizer.mask_token_id]


def test_identity_mapping_for_a_dictionary_in_hf_order(tmp_path):
    """The released layout: dict.txt = the BERT vocab in BERT order -> fairseq id == HF id, <mask> last."""
    from mpnet.convert.fairseq import read_fairseq_dictionary, vocabulary_mapping

    tokenizer = make_tokenizer()
    tokens = [t for t, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])][4:-1]
    (tmp_path / "dict.txt").write_text("".join(f"{t} 0\n" for t in tokens))
    symbols = read_fairseq_dictionary(tmp_path / "dict.txt")
    mapping, report = vocabulary_mapping(symbols, len(symbols) + 1, tokenizer)
    assert report["identity"] and mapping[-1] == tokenizer.mask_token_id == len(tokenizer) - 1


def test_bad_fairseq_inputs_are_one_line_errors(tmp_path):
    main = cli_main("convert")

    tokenizer = make_tokenizer()
    ckpt, dict_txt, *_ = make_fairseq_checkpoint(tmp_path, tokenizer)
    out = tmp_path / "o"
    assert_one_line_error_text(*call_main(main, "fairseq", ckpt, "--dict", tmp_path / "nope.txt", "--output-dir", out),
                               "nope.txt")
    (tmp_path / "broken.pt").write_bytes(ckpt.read_bytes()[:1000])
    assert_one_line_error_text(*call_main(main, "fairseq", tmp_path / "broken.pt", "--dict", dict_txt, "--output-dir", out),
                               "broken.pt")
    (tmp_path / "big.txt").write_text("".join(f"w{i} 1\n" for i in range(10**5)))
    assert_one_line_error_text(*call_main(main, "fairseq", ckpt, "--dict", tmp_path / "big.txt", "--output-dir", out),
                               "does not belong")
    assert_one_line_error_text(*call_main(main, "fairseq", ckpt, "--output-dir", out), "--dict")


def test_a_dictionary_of_another_model_is_refused_with_its_share(tmp_path):
    """A dict.txt of the right length whose symbols are mostly not the tokenizer's (another model's dictionary)
    used to convert with exit 0, keeping the few shared rows, and the check agreed on those rows."""
    main = cli_main("convert")
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    ckpt, dict_txt, *_ = make_fairseq_checkpoint(tmp_path, tokenizer)
    symbols = [line.split()[0] for line in dict_txt.read_text().splitlines()]
    foreign = symbols[:4] + [f"otherword{i}" for i in range(len(symbols) - 4)]  # 4 shared symbols, the rest not
    (tmp_path / "other.txt").write_text("".join(f"{s} 1\n" for s in foreign))
    out = tmp_path / "o"
    code, err = call_main(main, "fairseq", ckpt, "--dict", tmp_path / "other.txt", "--output-dir", out,
                          "--tokenizer", tmp_path / "tokenizer")
    assert_one_line_error_text(code, err, f"maps only 4 of its {len(symbols):,} symbols (0.0%")
    assert not out.exists()
    # The boundary on a BERT-sized dictionary: 302 symbols without a tokenizer id (0.99%) pass, 327 (1.07%) do not.
    from mpnet.convert.fairseq import MIN_DICTIONARY_SHARE, _check_dictionary_share
    from mpnet.errors import UserError

    _check_dictionary_share(30_225, 30_527, [])  # 99.01%: accepted
    with pytest.raises(UserError, match="98.9%"):
        _check_dictionary_share(30_200, 30_527, ["x"])
    assert MIN_DICTIONARY_SHARE == 0.99


# ------------------------------------------------- writing the original format: convert-mpnet to-fairseq

BERT_STYLE_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "movie", "was", "good", "bad",
                    "##s", "##ly", ".", ","]


def our_checkpoint(path, tokenizer, seed=0, vocab_size=None):
    """A random tiny model of ours, in the dimensions the fairseq transcription above uses."""
    from mpnet import MPNetConfig, MPNetForPretraining

    torch.manual_seed(seed)
    config = MPNetConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=POSITIONS,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         mask_token_id=tokenizer.mask_token_id)
    model = MPNetForPretraining(config)
    with torch.no_grad():  # every weight random, not only the initialised ones
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path, tokenizer=tokenizer)
    return path


def bert_style_tokenizer(tmp_path):
    """No <s>/<pad>/</s>/<unk> tokens: fairseq's four specials come from [CLS] [PAD] [SEP] [UNK] by role."""
    from transformers import BertTokenizerFast

    from mpnet.data import load_tokenizer

    BertTokenizerFast(vocab={t: i for i, t in enumerate(BERT_STYLE_VOCAB)}).save_pretrained(str(tmp_path / "bert-tok"))
    return load_tokenizer(tmp_path / "bert-tok")


def read_ours(path):
    from mpnet.modeling.checkpoint import read_state_dict, to_our_keys

    return to_our_keys(read_state_dict(path)), json.loads((path / "config.json").read_text())


ARCHITECTURE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "hidden_act", "layer_norm_eps", "relative_attention_num_buckets",
                "relative_attention_max_distance", "hidden_dropout_prob", "attention_probs_dropout_prob",
                "pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id", "sliding_window_size",
                "attention_pattern")


@pytest.mark.parametrize("vocabulary", ["mpnet", "bert-style"])
def test_round_trip_ours_fairseq_ours_is_bit_exact(tmp_path, vocabulary):
    from mpnet.convert.fairseq import convert_fairseq
    from mpnet.convert.to_fairseq import convert_to_fairseq

    tokenizer = make_tokenizer() if vocabulary == "mpnet" else bert_style_tokenizer(tmp_path)
    ours = our_checkpoint(tmp_path / "ours", tokenizer)
    with open(ours / "config.json") as f:  # attention options ride along in the args
        config = json.load(f)
    config.update(sliding_window_size=8, attention_pattern="softcap:30")
    (ours / "config.json").write_text(json.dumps(config))
    report = convert_to_fairseq(ours, tmp_path / "fs")
    assert report["round_trip"] == "bit-exact" and report["identity"] == (vocabulary == "mpnet")
    convert_fairseq(tmp_path / "fs" / "checkpoint.pt", tmp_path / "fs" / "dict.txt", tmp_path / "back", ours)
    (before, before_config), (after, after_config) = read_ours(ours), read_ours(tmp_path / "back")
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    assert {k: before_config.get(k) for k in ARCHITECTURE} == {k: after_config.get(k) for k in ARCHITECTURE}


def test_written_checkpoint_is_the_original_layout_and_computes_the_same(tmp_path):
    """Keys, args and dict.txt as the original code loads them; the fairseq forward transcribed above (not the
    converter's own reference) gives our model's logits on the same tokens."""
    from mpnet import MPNetForPretraining

    tokenizer = bert_style_tokenizer(tmp_path)
    ours = our_checkpoint(tmp_path / "ours", tokenizer, seed=3)
    code, err = call_main(cli_main("convert"), "to-fairseq", ours, "--output-dir", tmp_path / "fs")
    assert code in (0, None), err
    ckpt = torch.load(tmp_path / "fs" / "checkpoint.pt", weights_only=False)
    symbols = (tmp_path / "fs" / "dict.txt").read_text().splitlines()
    # rows: [CLS] [PAD] [SEP] [UNK] (by role), every other token in order, [MASK] last (the task's add_symbol).
    words = [t for t in BERT_STYLE_VOCAB if not t.startswith("[")]
    fairseq_order = ["[CLS]", "[PAD]", "[SEP]", "[UNK]"] + words + ["[MASK]"]
    assert [s.rsplit(" ", 1)[0] for s in symbols] == words
    state = ckpt["model"]
    enc = "decoder.sentence_encoder."
    assert state[f"{enc}embed_tokens.weight"].shape == (len(fairseq_order), HIDDEN)
    # Tied as in RobertaLMHead(weight=embed_tokens.weight): one storage in the file, as fairseq saves it.
    assert state["decoder.lm_head.weight"].data_ptr() == state[f"{enc}embed_tokens.weight"].data_ptr()
    args = ckpt["args"]
    assert isinstance(args, argparse.Namespace)
    assert (args.arch, args.task) == ("mpnet_rel_base", "masked_permutation_lm")
    assert (args.encoder_layers, args.encoder_embed_dim, args.encoder_ffn_embed_dim, args.encoder_attention_heads,
            args.max_positions, args.use_relative_positions, args.normalize_before) == (
        LAYERS, HIDDEN, FFN, HEADS, POSITIONS - 2, True, False)
    assert ckpt["optimizer_history"][-1]["num_updates"] == 0 and "train_iterator" in ckpt["extra_state"]

    model = MPNetForPretraining.from_pretrained(ours).eval()
    vocab = tokenizer.get_vocab()
    gen = torch.Generator().manual_seed(2)
    picks = torch.randint(4, len(fairseq_order), (2, 12), generator=gen)
    picks[:, 0] = 0
    picks[1, 8:] = 1  # right padding (fairseq <pad> = our [PAD])
    ours_ids = torch.tensor([[vocab[fairseq_order[i]] for i in row] for row in picks.tolist()])
    real = picks.ne(1)
    with torch.no_grad():
        ref_features, ref_logits = fairseq_forward({k: v.float() for k, v in state.items()}, picks)
        logits = model.mlm_logits(ours_ids, real.long())
    columns = [vocab[t] for t in fairseq_order]
    assert (logits[..., columns][real] - ref_logits[real]).abs().max().item() <= 1e-5


def test_fairseq_itself_loads_the_written_state_dict(tmp_path):
    """fairseq's RoBERTa (the MPNet architecture without the relative bias, which upstream fairseq lacks) loads
    checkpoint.pt's weights strictly through its own checkpoint upgrade and matches our logits."""
    pytest.importorskip("fairseq.models.roberta")
    from fairseq.data import Dictionary
    from fairseq.models.roberta.model import RobertaEncoder, RobertaModel, base_architecture

    from mpnet import MPNetForPretraining
    from mpnet.convert.to_fairseq import convert_to_fairseq

    tokenizer = make_tokenizer()
    ours = our_checkpoint(tmp_path / "ours", tokenizer, seed=5)
    model = MPNetForPretraining.from_pretrained(ours).eval()
    with torch.no_grad():
        model.mpnet.encoder.relative_attention_bias.weight.zero_()
    model.save_pretrained(tmp_path / "no-bias", tokenizer=tokenizer)
    convert_to_fairseq(tmp_path / "no-bias", tmp_path / "fs")
    ckpt = torch.load(tmp_path / "fs" / "checkpoint.pt", weights_only=False)
    dictionary = Dictionary.load(str(tmp_path / "fs" / "dict.txt"))
    assert dictionary.add_symbol("<mask>") == tokenizer.mask_token_id and dictionary.symbols[4:-1] == [
        t for t, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])][4:-1]
    args = argparse.Namespace(**vars(ckpt["args"]))
    args.arch = "roberta_base"
    base_architecture(args)
    fairseq_model = RobertaModel(args, RobertaEncoder(args, dictionary)).eval()
    state = dict(ckpt["model"])
    state.pop("decoder.sentence_encoder.relative_attention_bias.weight")
    fairseq_model.upgrade_state_dict_named(state, "")
    fairseq_model.load_state_dict(state, strict=True)
    ids = torch.randint(4, len(tokenizer) - 1, (2, 20), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 0, 2
    with torch.no_grad():
        assert (fairseq_model(ids)[0] - model.mlm_logits(ids)).abs().max().item() <= 1e-5


def test_a_padded_vocabulary_writes_fairseq_padding_words(tmp_path):
    from mpnet.convert.fairseq import convert_fairseq
    from mpnet.convert.to_fairseq import convert_to_fairseq

    tokenizer = bert_style_tokenizer(tmp_path)
    ours = our_checkpoint(tmp_path / "ours", tokenizer, vocab_size=len(tokenizer) + 3)
    report = convert_to_fairseq(ours, tmp_path / "fs")
    assert report["padding_words"] == 3 and report["fairseq_rows"] == len(tokenizer) + 3
    assert (tmp_path / "fs" / "dict.txt").read_text().splitlines()[-1] == "madeupword0002 0"
    convert_fairseq(tmp_path / "fs" / "checkpoint.pt", tmp_path / "fs" / "dict.txt", tmp_path / "back", ours)
    (before, _), (after, config) = read_ours(ours), read_ours(tmp_path / "back")
    n = len(tokenizer)  # the rows no token reaches are fairseq padding on the way back: dropped
    assert config["vocab_size"] == n and torch.equal(after["mpnet.embeddings.word_embeddings.weight"],
                                                     before["mpnet.embeddings.word_embeddings.weight"][:n])


# ------------------------------------------------------ output directories and strict input (every subcommand)


def test_output_directory_rules(tmp_path):
    main = cli_main("convert")
    tokenizer = make_tokenizer()
    ours = our_checkpoint(tmp_path / "ours", tokenizer)

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    for args in (("to-fairseq", ours), ("hf", ours)):
        assert_one_line_error_text(*call_main(main, *args, "--output-dir", busy), "not empty", "--overwrite")
    assert (busy / "keep.txt").read_text() == "precious"
    code, err = call_main(main, "to-fairseq", ours, "--output-dir", busy, "--overwrite")
    assert code in (0, None), err
    assert sorted(p.name for p in busy.iterdir()) == ["checkpoint.pt", "conversion.json", "dict.txt"]

    # A training checkpoint is never written to, --overwrite or not: a step directory, a run, a new step-*.
    step = tmp_path / "run" / "checkpoints" / "step-00000010"
    (step / "training_state").mkdir(parents=True)
    (step / "training_state" / "state.pt").write_bytes(b"state")
    for target in (step, tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-00000020"):
        for args in (("to-fairseq", ours), ("hf", ours),
                     ("fairseq", busy / "checkpoint.pt", "--dict", busy / "dict.txt")):
            assert_one_line_error_text(*call_main(main, *args, "--output-dir", target, "--overwrite"),
                                       "training checkpoint")
    assert (step / "training_state" / "state.pt").read_bytes() == b"state"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000010"]

    (tmp_path / "a-file").write_text("x")
    assert_one_line_error_text(*call_main(main, "to-fairseq", ours, "--output-dir", tmp_path / "a-file"), "is a file")


def test_bad_inputs_of_the_writer_and_the_reader_are_one_line(tmp_path):
    main = cli_main("convert")
    tokenizer = make_tokenizer()
    ours = our_checkpoint(tmp_path / "ours", tokenizer)
    call_main(main, "to-fairseq", ours, "--output-dir", tmp_path / "fs")
    (tmp_path / "random.bin").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    assert_one_line_error_text(*call_main(main, "fairseq", tmp_path / "fs" / "checkpoint.pt", "--dict",
                                          tmp_path / "random.bin", "--output-dir", tmp_path / "o"), "not UTF-8")
    assert_one_line_error_text(*call_main(main, "to-fairseq", tmp_path / "nope", "--output-dir", tmp_path / "o"),
                               "not a directory")
    config = json.loads((ours / "config.json").read_text())
    (ours / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-12}))
    assert_one_line_error_text(*call_main(main, "to-fairseq", ours, "--output-dir", tmp_path / "o"), "layer_norm_eps")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------- the fairseq-train plugin (skipped without the fairseq extra)


FAIRSEQ_DATA_BIN = Path(__file__).resolve().parents[1] / "fixtures" / "fairseq" / "data-bin"


def fairseq_train_command(save_dir, layers, *extra):
    """fairseq-train with the plugin on the committed data-bin: a 32-wide model of `layers` layers on the CPU."""
    import sys

    import mpnet.fairseq_plugin as plugin

    return [sys.executable, "-m", "fairseq_cli.train", str(FAIRSEQ_DATA_BIN), "--user-dir",
            str(Path(plugin.__file__).parent), "--task", "masked_permutation_lm", "--arch", "mpnet_base",
            "--criterion", "cross_entropy", "--encoder-layers", str(layers), "--encoder-embed-dim", "32",
            "--encoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2", "--tokens-per-sample", "32",
            "--batch-size", "4", "--optimizer", "adam", "--lr", "1e-3", "--cpu", "--save-dir", str(save_dir),
            "--log-format", "simple", "--log-interval", "1", "--seed", "1", *extra]


@pytest.mark.parametrize("mode", [["--input-mode", "mlm"], ["--input-mode", "plm"],
                                  ["--input-mode", "mpnet", "--corrupted-input", "appended"]])
def test_fairseq_train_runs_the_original_input_modes(tmp_path, mode):
    """The original task's --input-mode (and the original's mpnet inputs) under fairseq-train: 2 CPU updates."""
    pytest.importorskip("fairseq.models")
    import subprocess

    command = fairseq_train_command(tmp_path / "ckpt", 1, "--no-save", "--max-update", "2", *mode)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "num_updates=2" in result.stderr + result.stdout


@pytest.mark.parametrize("mode,corrupted", [("mlm", "content"), ("plm", "content"), ("mpnet", "appended")])
def test_the_plugin_wires_the_input_mode_into_batches_and_model(mode, corrupted):
    """In process: the task's collator and the model get the mode; the model's logits are those of
    MPNetForPretraining with that objective on the same batch."""
    pytest.importorskip("fairseq.models")
    from mpnet.fairseq_plugin.model import MPNetFairseqModel, MPNetModelConfig
    from mpnet.fairseq_plugin.task import MaskedPermutationLMConfig, MaskedPermutationLMTask

    cfg = MaskedPermutationLMConfig(data=str(FAIRSEQ_DATA_BIN), tokens_per_sample=32, input_mode=mode, corrupted_input=corrupted,
                                    seed=1)
    task = MaskedPermutationLMTask.setup_task(cfg)
    task.load_dataset("train")
    dataset = task.datasets["train"]
    batch = dataset.collater([dataset[i] for i in range(3)])
    assert task.collator().objective == mode
    assert ("appended_ids" in batch["net_input"]) == (corrupted == "appended")
    model = MPNetFairseqModel.build_model(MPNetModelConfig(encoder_layers=1, encoder_embed_dim=32,
                                                           encoder_ffn_embed_dim=64, encoder_attention_heads=2,
                                                           dropout=0.0, attention_dropout=0.0, max_positions=32), task)
    model.eval()
    net = batch["net_input"]
    with torch.no_grad():
        ours = model(**net)
        direct = model.model(net["input_ids"], net["positions"], net["pred_size"], net["attention_mask"],
                             objective=mode, appended_ids=net.get("appended_ids"))
    assert model.objective == mode and torch.equal(ours, direct)


def test_fairseq_train_with_the_plugin_and_its_checkpoint_converts_back(tmp_path):
    """fairseq-train --task masked_permutation_lm --arch mpnet_base trains this project's model on the committed
    data-bin (3 CPU updates, then 2 more resumed from its checkpoint), and convert-mpnet reads the result."""
    pytest.importorskip("fairseq.models")
    import subprocess

    data_bin = FAIRSEQ_DATA_BIN
    command = fairseq_train_command(tmp_path / "ckpt", 2, "--no-epoch-checkpoints")
    for updates in (3, 5):
        result = subprocess.run(command + ["--max-update", str(updates)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"num_updates={updates}" in result.stderr + result.stdout
    assert "Loaded checkpoint" in result.stderr + result.stdout  # the second run resumed the first

    code, err = call_main(cli_main("convert"), "fairseq", tmp_path / "ckpt" / "checkpoint_last.pt", "--dict",
                          data_bin / "dict.txt", "--output-dir", tmp_path / "ours")
    assert code in (0, None), err
    report = json.loads((tmp_path / "ours" / "conversion.json").read_text())
    assert report["layers"] == 2 and report["hidden_size"] == 32 and report["max_abs_diff_vs_fairseq_forward"] <= 1e-5
