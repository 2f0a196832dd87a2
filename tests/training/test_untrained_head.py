"""A checkpoint without an LM head (an encoder-only model: `convert-mpnet hf` of a sentence-transformers model
writes none) never answers fill-mask with the random head it loads with: fill_mask refuses it in one line,
and pretraining from it trains the new head before its summary answers."""
from __future__ import annotations

import json
import shutil

import pytest

from mpnet import MPNetForPretraining
from mpnet.convert.hf import drop_lm_head
from mpnet.data import load_tokenizer
from mpnet.errors import UserError
from mpnet.modeling.config import MPNetConfig
from mpnet.training.evaluation import fill_mask
from pretrain_support import TINY_RUN, pretrain

SHAPE = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(with its LM head, the same without one) of a tiny model with the default tokenizer."""
    root = tmp_path_factory.mktemp("heads")
    MPNetForPretraining(MPNetConfig.tiny(**SHAPE)).save_pretrained(root / "with", tokenizer=load_tokenizer("default"))
    shutil.copytree(root / "with", root / "without")
    drop_lm_head(root / "without")
    return root / "with", root / "without"


def test_fill_mask_refuses_a_model_whose_checkpoint_has_no_lm_head(checkpoints):
    with_head, without = checkpoints
    tokenizer = load_tokenizer(str(with_head))
    assert len(fill_mask(MPNetForPretraining.from_pretrained(with_head), tokenizer)) == 3
    with pytest.raises(UserError, match="LM head is untrained: its checkpoint has none") as caught:
        fill_mask(MPNetForPretraining.from_pretrained(without), tokenizer)
    assert "\n" not in str(caught.value)


def test_pretraining_from_it_trains_the_head_before_answering(checkpoints, prefix_shards, tmp_path):
    run_options = [option for option in TINY_RUN if not option.startswith("model.")]  # the checkpoint's shape
    code, stderr = pretrain("--data", prefix_shards, "--output-dir", tmp_path / "run", "--max-steps", 1,
                            f"training.init_from={checkpoints[1]}", *run_options)
    assert code in (0, None), stderr
    assert len(json.loads((tmp_path / "run" / "summary.json").read_text())["fill_mask"]) == 3
