"""HF parity: our single-stream encoder is HF transformers' MPNet, and checkpoints move both ways.

Random tiny weights (every parameter re-drawn, see helpers.randomize_), fp32, max abs diff <= 1e-5 on
real tokens of a right-padded batch whose rows have different lengths (attention_mask passed to both
sides; HF derives absolute positions from the pad ids and relative ones from indices, which agree with
ours on real tokens of right-padded rows). Directions:
- ours -> save_pretrained -> transformers' AutoModelForMaskedLM / AutoModel / AutoModelForSequenceClassification;
- transformers' MPNetForMaskedLM (layer_norm_eps 1e-5 and HF's default 1e-12) and MPNetModel ->
  save_pretrained -> our from_pretrained;
both backends (the flex one through from_pretrained(..., use_flex_attention=True)).
"""
from __future__ import annotations

import pytest
import torch
import transformers

from helpers import VOCAB, encoding_batch, generator, make_model, max_abs, randomize_, tiny_config
from mpnet import MPNetForPretraining, MPNetForSequenceClassification

TOL = 1e-5
N = 19
LENGTHS = (19, 14, 6)


@pytest.fixture(scope="module")
def batch():
    return encoding_batch(generator(7), N, LENGTHS)


@pytest.fixture(scope="module")
def saved_ours(tmp_path_factory):
    model = make_model(seed=21, num_hidden_layers=2)
    path = tmp_path_factory.mktemp("ours")
    model.save_pretrained(path)
    return model, path


def _hf_hidden(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=mask).last_hidden_state


def _hf_logits(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=mask).logits


def _ours(model, ids, mask):
    with torch.no_grad():
        return model.encode(ids, attention_mask=mask), model.mlm_logits(ids, attention_mask=mask)


def test_hf_loads_our_checkpoint_without_key_problems(saved_ours):
    _, path = saved_ours
    hf_model, info = transformers.AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    assert type(hf_model).__name__ == "MPNetForMaskedLM"
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[key], f"{key}: {info[key]}"
    assert not info.get("error_msgs")
    base, info = transformers.AutoModel.from_pretrained(path, output_loading_info=True)
    assert type(base).__name__ == "MPNetModel"
    assert all(k.startswith("pooler.") for k in info["missing_keys"]), info["missing_keys"]  # we have no pooler
    assert not info["mismatched_keys"]


@pytest.mark.parametrize("flex", [False, True], ids=["dense", "flex"])
def test_our_checkpoint_in_hf_gives_our_numbers(saved_ours, batch, flex):
    model, path = saved_ours
    if flex:
        model = MPNetForPretraining.from_pretrained(path, use_flex_attention=True).eval()
        assert model.config.use_flex_attention
    ids, mask = batch
    real = mask.bool()
    hidden, logits = _ours(model, ids, mask)
    hf_mlm = transformers.AutoModelForMaskedLM.from_pretrained(path).eval()
    hf_base = transformers.AutoModel.from_pretrained(path).eval()
    hf_hidden = _hf_hidden(hf_base, ids, mask)
    hf_logits = _hf_logits(hf_mlm, ids, mask)
    assert hidden.shape == hf_hidden.shape and logits.shape == hf_logits.shape == (len(LENGTHS), N, VOCAB)
    assert max_abs(hidden[real], hf_hidden[real]) <= TOL
    assert max_abs(logits[real], hf_logits[real]) <= TOL
    # the comparison is not vacuous: the rows really differ, and the padding really is ignored
    assert hidden[real].std() > 0.1 and logits[real].std() > 0.1


def test_left_padding_matches_hf_too(saved_ours):
    """HF numbers absolute positions from the pad ids and relative ones from indices: both agree with
    ours on the real tokens of left-padded rows as well."""
    model, path = saved_ours
    ids, mask = encoding_batch(generator(8), N, LENGTHS)
    ids, mask = ids.flip(1), mask.flip(1)
    real = mask.bool()
    hf_mlm = transformers.AutoModelForMaskedLM.from_pretrained(path).eval()
    assert max_abs(_ours(model, ids, mask)[1][real], _hf_logits(hf_mlm, ids, mask)[real]) <= TOL


def test_reloaded_checkpoint_is_identical(saved_ours, batch):
    model, path = saved_ours
    again = MPNetForPretraining.from_pretrained(path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    ids, mask = batch
    assert torch.equal(_ours(model, ids, mask)[1], _ours(again, ids, mask)[1])


def _hf_config(**overrides):
    settings = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    settings.update(overrides)
    return transformers.MPNetConfig(**settings)


@pytest.mark.parametrize("eps", [1e-5, None], ids=["eps1e-5", "hf-default-eps"])
@pytest.mark.parametrize("flex", [False, True], ids=["dense", "flex"])
def test_hf_masked_lm_checkpoint_loads_into_ours(tmp_path, batch, eps, flex):
    config = _hf_config() if eps is None else _hf_config(layer_norm_eps=eps)
    torch.manual_seed(0)
    hf_model = randomize_(transformers.MPNetForMaskedLM(config), seed=5).eval()
    hf_model.save_pretrained(tmp_path)
    ours = MPNetForPretraining.from_pretrained(tmp_path, use_flex_attention=flex).eval()
    assert ours.config.layer_norm_eps == config.layer_norm_eps
    ids, mask = batch
    real = mask.bool()
    hidden, logits = _ours(ours, ids, mask)
    assert max_abs(hidden[real], _hf_hidden(hf_model.mpnet, ids, mask)[real]) <= TOL
    assert max_abs(logits[real], _hf_logits(hf_model, ids, mask)[real]) <= TOL


@pytest.mark.parametrize("flex", [False, True], ids=["dense", "flex"])
def test_hf_base_model_checkpoint_loads_into_ours(tmp_path, batch, flex):
    torch.manual_seed(0)
    hf_model = randomize_(transformers.MPNetModel(_hf_config(layer_norm_eps=1e-5)), seed=6).eval()
    hf_model.save_pretrained(tmp_path)
    ours = MPNetForPretraining.from_pretrained(tmp_path, use_flex_attention=flex).eval()
    ids, mask = batch
    real = mask.bool()
    hidden = _ours(ours, ids, mask)[0]
    assert max_abs(hidden[real], _hf_hidden(hf_model, ids, mask)[real]) <= TOL


def test_classification_checkpoint_matches_hf(tmp_path, batch):
    model = randomize_(MPNetForSequenceClassification(tiny_config(num_labels=3)), seed=8).eval()
    model.save_pretrained(tmp_path)
    hf_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert type(hf_model).__name__ == "MPNetForSequenceClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask = batch
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf_model.eval()(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == theirs.shape == (len(LENGTHS), 3)
    assert max_abs(ours, theirs) <= TOL


def test_saved_files_are_readable_like_any_other(tmp_path):
    """model.safetensors gets the mode of the other files (safetensors itself creates 0600 files)."""
    import os

    from helpers import make_model

    make_model(seed=0).save_pretrained(tmp_path / "ckpt")
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "ckpt" / name).stat().st_mode & 0o777 == 0o644 & ~mask, name
