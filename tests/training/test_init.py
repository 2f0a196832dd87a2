"""The initialisation of a new pretraining model (training.lm_bias_init, training.relative_bias_init).

Checked by brute force: the unigram LM-head bias is the add-one-smoothed log-frequency of every id of the
training shard (counted here with a Python Counter), so a fresh model's first predictions are the unigram
distribution; the locality prior is, for every distance up to the saturation distance, -slope x (the nearest
distance of its bucket), symmetric, zero at distance 0, never rising with distance, with slopes 1 .. 1/16
(local) or ALiBi's 2^(-8h/H) (alibi) across the heads; a fresh run applies both (and neither with
"zero"/"normal"), init_from keeps its checkpoint's weights.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from mpnet.data import read_metadata
from mpnet.modeling.checkpoint import read_state_dict
from mpnet.modeling.config import MPNetConfig
from mpnet.modeling.masks import relative_position_bucket
from mpnet.training.pretrain import local_relative_bias, unigram_log_prior
from pretrain_support import TINY_RUN, pretrain


def test_the_unigram_prior_is_the_smoothed_log_frequency_of_every_id(prefix_shards):
    meta = read_metadata(prefix_shards)
    ids = np.fromfile(prefix_shards / "train.bin", dtype=np.dtype(meta["dtype"])).tolist()
    counts = Counter(ids)
    total = len(ids) + meta["vocab_size"]
    prior = unigram_log_prior(prefix_shards, meta)
    assert prior.shape == (meta["vocab_size"],)
    for token in list(counts)[:50] + [meta["mask_token_id"]]:
        assert prior[token].item() == pytest.approx(math.log((counts[token] + 1) / total), abs=1e-5)
    assert prior.exp().sum().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("kind,slopes", [("local", [16.0 ** (-h / 3) for h in range(4)]),
                                         ("alibi", [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8])])
def test_the_locality_prior_falls_with_distance_in_every_head(kind, slopes):
    config = MPNetConfig.tiny()
    table = local_relative_bias(config, kind)
    assert table.shape == (config.relative_attention_num_buckets, config.num_attention_heads)
    top = config.relative_attention_max_distance
    distance = torch.arange(-top, top + 1)
    bias = table[relative_position_bucket(distance, config.relative_attention_num_buckets, top)]  # (2 top + 1, heads)
    assert bias[top + 1].tolist() == pytest.approx([-s for s in slopes])
    assert (bias[top] == 0).all()  # distance 0
    assert torch.equal(bias, bias.flip(0))  # symmetric
    far = bias[top:]  # distances 0 .. top
    assert (far[1:] <= far[:-1]).all()  # never rises with distance
    for d in range(0, top + 1):  # -slope x the nearest distance sharing d's bucket
        bucket = relative_position_bucket(torch.tensor(d), config.relative_attention_num_buckets, top)
        same = [e for e in range(0, top + 1)
                if relative_position_bucket(torch.tensor(e), config.relative_attention_num_buckets, top) == bucket]
        assert bias[top + d].tolist() == pytest.approx([-min(same) * s for s in slopes])


@pytest.mark.parametrize("settings,prior,unigram", [([], "alibi", True),
                                                    (["training.relative_bias_init=local"], "local", True),
                                                    (["training.relative_bias_init=normal",
                                                      "training.lm_bias_init=zero"], None, False)])
def test_a_fresh_run_applies_its_init(prefix_shards, tmp_path, settings, prior, unigram):
    out = tmp_path / "run"
    code, stderr = pretrain("--output-dir", out, "--data", prefix_shards, "--max-steps", 1, "--save-every", 1,
                            *TINY_RUN, "optim.lr=1e-12", "optim.warmup_steps=1000", *settings)  # one step, ~no update
    assert code == 0, stderr
    weights = read_state_dict(next((out / "checkpoints").glob("step-*")))
    config = MPNetConfig.tiny(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    relative = weights["mpnet.encoder.relative_attention_bias.weight"]
    if prior:
        assert torch.allclose(relative, local_relative_bias(config, prior), atol=1e-6)
    else:  # N(0, 0.02)
        assert relative.abs().max() < 0.2 and not torch.allclose(relative, local_relative_bias(config, "local"),
                                                                 atol=1e-2)
    bias = weights["lm_head.bias"]
    prior = unigram_log_prior(prefix_shards, read_metadata(prefix_shards))
    assert torch.allclose(bias, prior, atol=1e-5) == unigram
    if not unigram:
        assert bias.abs().max() < 1e-6
