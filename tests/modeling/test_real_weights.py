"""Parity with transformers on the real all-mpnet-base-v2 weights (skipped unless fetched with
scripts/fetch_all_mpnet_base_v2.sh)."""
import os
from pathlib import Path

import pytest
import torch

WEIGHTS = Path(os.environ.get("MPNET_WEIGHTS_DIR", "~/.cache/mpnet/all-mpnet-base-v2")).expanduser()
pytestmark = pytest.mark.skipif(not (WEIGHTS / "model.safetensors").is_file(), reason="all-mpnet-base-v2 not fetched")

SENTENCES = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
             "must be in want of a wife.", "Emma Woodhouse, handsome, clever, and rich."]


@pytest.mark.parametrize("flex", [False, True])
def test_encode_equals_transformers_on_real_weights(flex):
    from transformers import AutoModel, AutoTokenizer

    from mpnet import MPNetForPretraining

    tokenizer = AutoTokenizer.from_pretrained(WEIGHTS)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    reference = AutoModel.from_pretrained(WEIGHTS).eval()
    ours = MPNetForPretraining.from_pretrained(WEIGHTS, use_flex_attention=flex).eval()
    assert ours.num_parameters() > 100e6
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
        got = ours.encode(batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    assert (got - expected)[real].abs().max() <= 1e-5
