"""What plain transformers does with our checkpoints (mpnet/hub.py, modeling/checkpoint.py).

A checkpoint that transformers' own MPNet would compute differently (a sliding window, an attention
pattern, relative buckets saturating at other than 128) is written as model_type "mpnet_pattern" with
an auto_map and a shim file: the Auto classes refuse it, naming trust_remote_code=True; with it they
build our classes, which must give our numbers exactly. transformers' concrete MPNet class still
loads it with one warning (documented in hub.py; pinned here so the documentation stays true). A
checkpoint without any of these stays a plain "mpnet" one.

Exactness: with trust_remote_code transformers runs our own modules on the same float32 weights, the
same operations in the same order, in this process; the outputs are bitwise equal, so any difference
at all is a wiring bug (a key, a tie, an initialisation that overwrote a loaded weight).
Non-vacuity: on the same inputs transformers' MPNet (full attention, buckets saturating at 128) is
far off, so the tests would catch the old silent load.
"""
from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
import transformers
import transformers.dynamic_module_utils

from helpers import encoding_batch, generator, make_model, max_abs, randomize_, tiny_config
from mpnet import MPNetForPretraining, MPNetForSequenceClassification, UserError
from mpnet.modeling.checkpoint import AUTO_MAP, SHIM_FILE, read_config

N = 19  # longer than every window and block below, and past the bucket distance 16 ...
LENGTHS = (19, 14, 6)  # ... with rows of other lengths, right-padded
# each of these makes transformers' own MPNet compute another function from the same weights
BEYOND_TRANSFORMERS = {
    "window": dict(sliding_window_size=4),
    "pattern": dict(attention_pattern="block:6,softcap:2"),
    "bucket-distance": dict(relative_attention_max_distance=16),
}
FAR_OFF = 0.1  # transformers' MPNet vs ours on such a checkpoint: the rows differ by more than this


@pytest.fixture(scope="module", autouse=True)
def modules_cache(tmp_path_factory):
    """transformers copies the shim of a checkpoint it loads with trust_remote_code into
    HF_MODULES_CACHE (default ~/.cache/huggingface/modules) and puts that folder on sys.path; here
    both go to a temporary folder. Only dynamic_module_utils reads the name, so patching it there works."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path_factory.mktemp("hf_modules")))
        patch.setattr(sys, "path", list(sys.path))
        yield


@pytest.fixture(scope="module")
def batch():
    return encoding_batch(generator(11), N, LENGTHS)


@pytest.fixture(scope="module", params=list(BEYOND_TRANSFORMERS))
def pattern_checkpoint(request, tmp_path_factory):
    model = make_model(seed=31, **BEYOND_TRANSFORMERS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, path


def _no_terminal(monkeypatch):
    """Without trust_remote_code transformers asks at a terminal first ([y/N], 15 s); a process with
    no terminal (a job, CI) reads EOF and gets the error. Pin the second, whatever pytest's stdin is."""
    def no_answer(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", no_answer)


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_pattern_checkpoint_carries_its_model_type_auto_map_and_shim(pattern_checkpoint):
    _, path = pattern_checkpoint
    config = _config(path)
    assert config["model_type"] == "mpnet_pattern"
    assert config["auto_map"] == AUTO_MAP
    shim = (path / SHIM_FILE).read_text()
    assert "from mpnet import hub" in shim and "trust_remote_code=True" in shim


def test_auto_classes_refuse_it_naming_trust_remote_code(pattern_checkpoint, monkeypatch):
    _, path = pattern_checkpoint
    _no_terminal(monkeypatch)
    for auto_class in (transformers.AutoModelForMaskedLM, transformers.AutoModel,
                       transformers.AutoModelForSequenceClassification, transformers.AutoConfig):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            auto_class.from_pretrained(path)
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            auto_class.from_pretrained(path, trust_remote_code=False)


def test_with_trust_remote_code_transformers_builds_our_config(pattern_checkpoint):
    """Our fields, defaults and checks: a config subclass without its own __init__ would get
    transformers' generated one (its MPNet defaults, layer_norm_eps 1e-12 and 512 positions, no checks)."""
    _, path = pattern_checkpoint
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=True)
    theirs, ours = config.to_dict(), read_config(path).to_dict()
    for key in ("model_type", "auto_map", "_name_or_path"):
        theirs.pop(key), ours.pop(key, None)
    assert theirs == ours
    defaults = type(config)()
    assert (defaults.layer_norm_eps, defaults.max_position_embeddings) == (1e-5, 514)
    with pytest.raises(UserError, match="sliding_window_size"):
        type(config)(sliding_window_size=0)


def test_with_trust_remote_code_transformers_computes_ours(pattern_checkpoint, batch):
    model, path = pattern_checkpoint
    ids, mask = batch
    real = mask.bool()
    ours = MPNetForPretraining.from_pretrained(path).eval()
    hf_mlm, info = transformers.AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf_mlm.lm_head.decoder.weight is hf_mlm.mpnet.embeddings.word_embeddings.weight
    hf_base = transformers.AutoModel.from_pretrained(path, trust_remote_code=True)
    assert not hf_mlm.training and not hf_base.training
    with torch.no_grad():
        logits, hidden = ours.mlm_logits(ids, mask), ours.encode(ids, mask)
        assert torch.equal(hf_mlm(input_ids=ids, attention_mask=mask).logits, logits)
        assert torch.equal(hf_base(input_ids=ids, attention_mask=mask).last_hidden_state, hidden)
        assert torch.equal(logits, model.mlm_logits(ids, mask))  # the reload is the saved model
        full_attention = transformers.MPNetForMaskedLM.from_pretrained(path).eval()(input_ids=ids, attention_mask=mask)
    assert max_abs(full_attention.logits[real], logits[real]) > FAR_OFF


def test_classifier_with_trust_remote_code_computes_ours(tmp_path, batch):
    model = randomize_(MPNetForSequenceClassification(tiny_config(num_labels=3, sliding_window_size=4)), seed=8).eval()
    model.save_pretrained(tmp_path)
    hf_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask = batch
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf_model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(theirs.logits, ours)
    # transformers' classification loss (its own reduction code): the same mean, up to rounding
    assert torch.allclose(theirs.loss, torch.nn.functional.cross_entropy(ours, labels))


def test_transformers_own_save_of_it_loads_back_everywhere(pattern_checkpoint, batch, tmp_path):
    """A model loaded with trust_remote_code and saved by transformers (e.g. by its Trainer) is again a
    pattern checkpoint: the shim is copied along, and transformers and we both read it."""
    model, path = pattern_checkpoint
    transformers.AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True).save_pretrained(tmp_path)
    assert _config(tmp_path)["model_type"] == "mpnet_pattern" and (tmp_path / SHIM_FILE).is_file()
    ids, mask = batch
    with torch.no_grad():
        expected = model.mlm_logits(ids, mask)
        again = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True)
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, expected)
        assert torch.equal(MPNetForPretraining.from_pretrained(tmp_path).eval().mlm_logits(ids, mask), expected)


def test_concrete_transformers_class_only_warns(pattern_checkpoint, caplog):
    """transformers.MPNetForMaskedLM ignores auto_map: it loads the weights into full attention and
    says so in one warning only (hub.py's docstring; nothing in a checkpoint can stop it)."""
    _, path = pattern_checkpoint
    transformers_log = logging.getLogger("transformers")  # it does not propagate to pytest's handler
    transformers_log.addHandler(caplog.handler)
    try:
        model = transformers.MPNetForMaskedLM.from_pretrained(path)
    finally:
        transformers_log.removeHandler(caplog.handler)
    assert type(model) is transformers.MPNetForMaskedLM
    assert any("mpnet_pattern" in record.getMessage() and record.levelno == logging.WARNING
               for record in caplog.records)


def test_plain_checkpoint_stays_plain_mpnet(tmp_path, batch):
    model = make_model(seed=32)
    model.save_pretrained(tmp_path)
    config = _config(tmp_path)
    assert config["model_type"] == "mpnet" and "auto_map" not in config and not (tmp_path / SHIM_FILE).exists()
    hf_model = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path)  # no remote code involved
    assert type(hf_model) is transformers.MPNetForMaskedLM
    ids, mask = batch
    real = mask.bool()
    with torch.no_grad():  # parity itself: test_hf_parity.py (<= 1e-5, both directions)
        theirs, ours = hf_model(input_ids=ids, attention_mask=mask).logits, model.mlm_logits(ids, mask)
    assert max_abs(theirs[real], ours[real]) <= 1e-5


def test_dropping_the_window_on_load_saves_a_plain_checkpoint(tmp_path):
    windowed = make_model(seed=33, sliding_window_size=4)
    windowed.save_pretrained(tmp_path)
    reloaded = MPNetForPretraining.from_pretrained(tmp_path)
    assert reloaded.config.sliding_window_size == 4 and not hasattr(reloaded.config, "auto_map")
    unwindowed = MPNetForPretraining.from_pretrained(tmp_path, sliding_window_size=None)
    unwindowed.save_pretrained(tmp_path)  # over the windowed one: its shim must go too
    config = _config(tmp_path)
    assert config["model_type"] == "mpnet" and "auto_map" not in config and not (tmp_path / SHIM_FILE).exists()
    assert type(transformers.AutoModelForMaskedLM.from_pretrained(tmp_path)) is transformers.MPNetForMaskedLM
