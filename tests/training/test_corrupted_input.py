"""`data.corrupted_input` (docs/objectives.md): where the mpnet objective's 80/10/10-corrupted tokens go.

"content" (the default): the predicted tokens' content-stream entries, plain <mask> appended. "appended":
the original MPNet code's layout (MaskedDataset.collater, input_mode 'mpnet'): the content stream keeps
the real predicted tokens and both appended sections (MASK entries and queries) carry the corrupted ones.
Checked: both modes draw the same permutation, targets and corruption for the same (seed, step, rank);
the model's appended inputs go to both appended sections (an all-<mask> appended_ids is the default
forward exactly, and a query's output depends on its own appended input); a run trains; bad values,
another objective and a changed value on resume are one line.
"""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from helpers import MASK_ID, PAD_ID, VOCAB, generator, pretraining_batch, tiny_config
from mpnet.data.collator import MPNetCollator
from mpnet.modeling.model import MPNetForPretraining
from pretrain_support import TINY_RUN, checkpoint_steps, error_line, pretrain, train_losses


def collate(corrupted_input, objective="mpnet", step=3):
    gen = np.random.default_rng(0)
    examples = [gen.integers(5, VOCAB - 1, size=size) for size in (40, 40, 31)]  # one row padded
    collator = MPNetCollator(VOCAB, PAD_ID, MASK_ID, [0, 2], seed=7, objective=objective,
                             corrupted_input=corrupted_input)
    return collator(examples, step=step)


def test_both_modes_draw_the_same_batch_and_place_the_corruption_differently():
    content, appended = collate("content"), collate("appended")
    for key in ("positions", "targets", "attention_mask"):
        assert torch.equal(content[key], appended[key]), key
    m = content["pred_size"]
    n = content["input_ids"].shape[1]
    predicted = content["targets"] != -100
    assert "appended_ids" not in content
    # appended: the content stream holds the real tokens (the targets), the corruption moved to appended_ids
    assert torch.equal(appended["input_ids"][:, : n - m], content["input_ids"][:, : n - m])
    assert torch.equal(appended["input_ids"][:, n - m:][predicted], content["targets"][predicted])
    assert torch.equal(appended["appended_ids"][predicted], content["input_ids"][:, n - m:][predicted])
    assert (appended["appended_ids"][~predicted] == MASK_ID).all()
    corrupted = appended["appended_ids"][predicted]
    assert (corrupted == MASK_ID).any() and (corrupted != MASK_ID).any()


def test_appended_is_for_the_mpnet_objective_only():
    with pytest.raises(ValueError, match="mpnet objective only"):
        collate("appended", objective="plm")
    with pytest.raises(ValueError, match="one of content, appended"):
        collate("both")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MPNetForPretraining(tiny_config(hidden_size=32, num_attention_heads=2)).eval()


def test_all_mask_appended_inputs_are_the_default_forward(model):
    n, m = 24, 4
    input_ids, positions, mask = pretraining_batch(generator(1), n, m, (0, 5))
    with torch.no_grad():
        default = model(input_ids, positions, m, attention_mask=mask)
        explicit = model(input_ids, positions, m, attention_mask=mask,
                         appended_ids=torch.full((2, m), MASK_ID, dtype=torch.long))
    assert torch.equal(default, explicit)


def test_a_query_reads_its_own_appended_input():
    """One layer: replacing the appended input of rank j changes the query of rank j (its own input)
    and no query of a higher rank (they see MASK entries of rank >= i only; with more layers the change
    would reach them through the CTX rows, which see every MASK entry)."""
    torch.manual_seed(0)
    model = MPNetForPretraining(tiny_config(hidden_size=32, num_attention_heads=2, num_hidden_layers=1)).eval()
    n, m = 24, 4
    input_ids, positions, mask = pretraining_batch(generator(2), n, m, (0,))
    base = torch.full((1, m), MASK_ID, dtype=torch.long)
    with torch.no_grad():
        before = model(input_ids, positions, m, attention_mask=mask, appended_ids=base)
        for j in range(m):
            changed = base.clone()
            changed[0, j] = 7
            after = model(input_ids, positions, m, attention_mask=mask, appended_ids=changed)
            delta = (after - before).abs().amax(-1)[0]
            assert delta[j] > 1e-6, f"query {j} ignores its own appended input"
            assert (delta[j + 1:] == 0).all(), f"a query above rank {j} sees MASK entry {j}: {delta.tolist()}"


def test_wrong_appended_inputs_are_one_line(model):
    input_ids, positions, mask = pretraining_batch(generator(3), 24, 4, (0,))
    with pytest.raises(Exception, match="appended_ids"):
        model(input_ids, positions, 4, attention_mask=mask, objective="plm",
              appended_ids=torch.full((1, 4), MASK_ID, dtype=torch.long))


def run(out, shards, *extra):
    return pretrain("--output-dir", out, "--data", shards, "--log-every", 1, *TINY_RUN, *extra)


def test_an_appended_run_trains_and_resume_keeps_the_layout(prefix_shards, tmp_path):
    out = tmp_path / "run"
    code, stderr = run(out, prefix_shards, "--max-steps", 2, "--save-every", 2, "data.corrupted_input=appended")
    assert code == 0, stderr
    losses = train_losses(out)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    default = tmp_path / "default"
    assert run(default, prefix_shards, "--max-steps", 2)[0] == 0
    assert train_losses(default) != losses  # the layout changes what is computed
    resumable = tmp_path / "resumable"
    shutil.copytree(out, resumable)
    line = error_line(*run(resumable, prefix_shards, "--resume", "--max-steps", 4, "data.corrupted_input=content"))
    assert "data.corrupted_input='content' conflicts" in line
    assert checkpoint_steps(resumable) == [2]


@pytest.mark.parametrize("args,fragment", [
    (["data.corrupted_input=original"], "config key 'data.corrupted_input' got 'original'"),
    (["data.corrupted_input=appended", "--objective", "plm"], "data.corrupted_input=appended is a layout of the mpnet"),
])
def test_bad_settings_are_one_line_before_any_work(prefix_shards, tmp_path, args, fragment):
    out = tmp_path / "run"
    line = error_line(*run(out, prefix_shards, "--max-steps", 1, *args))
    assert fragment in line
    assert not out.exists()
