"""`data.corrupted_input` (docs/objectives.md): where the mpnet objective's 80/10/10-corrupted tokens go.

"appended" (the default): the original MPNet code's layout (MaskedDataset.collater, input_mode 'mpnet'): the
content stream keeps the real predicted tokens and both appended sections (MASK entries and queries) carry the
corrupted ones. "content": the predicted tokens' content-stream entries, plain <mask> appended.
Checked: both modes draw the same permutation, targets and corruption for the same (seed, step, rank);
the model's appended inputs go to both appended sections (an all-<mask> appended_ids is the default
forward exactly, and a query's output depends on its own appended input); with "content" a query never
reads its own corrupted input (why its own-task accuracy has no copy share, docs/bench/dynamics.md); the
validation accuracy split counts exactly the <mask>-input targets; a run trains; a resumed run keeps the
layout it recorded (an old run without the key is "content"); bad values, another objective and a changed
value on resume are one line.
"""
from __future__ import annotations

import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

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


def test_other_objectives_ignore_the_layout_and_bad_values_are_refused():
    for objective in ("plm", "mlm"):
        assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b
                   for a, b in zip(collate("appended", objective).values(), collate("content", objective).values()))
        assert "appended_ids" not in collate("appended", objective)
    with pytest.raises(ValueError, match="one of appended, content"):
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
    code, stderr = run(out, prefix_shards, "--max-steps", 2, "--save-every", 2)  # appended: the default
    assert code == 0, stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["corrupted_input"] == "appended"
    losses = train_losses(out)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    content = tmp_path / "content"
    assert run(content, prefix_shards, "--max-steps", 2, "--save-every", 2, "data.corrupted_input=content")[0] == 0
    assert train_losses(content) != losses  # the layout changes what is computed
    resumable = tmp_path / "resumable"
    shutil.copytree(out, resumable)
    line = error_line(*run(resumable, prefix_shards, "--resume", "--max-steps", 4, "data.corrupted_input=content"))
    assert "data.corrupted_input='content' conflicts" in line
    assert checkpoint_steps(resumable) == [2]


def test_resume_keeps_the_recorded_content_layout_and_old_runs_are_content(prefix_shards, tmp_path):
    """A run that recorded content resumes as content under the new default; a run config written before the
    key existed (that run trained content) resumes as content too, and its config.yaml then says so."""
    content = tmp_path / "content"
    assert run(content, prefix_shards, "--max-steps", 2, "--save-every", 2, "data.corrupted_input=content")[0] == 0
    whole = tmp_path / "whole"
    assert run(whole, prefix_shards, "--max-steps", 4, "--save-every", 2, "data.corrupted_input=content")[0] == 0
    old = tmp_path / "old"
    shutil.copytree(content, old)
    saved = next((old / "checkpoints").glob("step-*")) / "training_state" / "run_config.yaml"
    config = yaml.safe_load(saved.read_text())
    del config["data"]["corrupted_input"]
    saved.write_text(yaml.safe_dump(config, sort_keys=False))
    for folder in (content, old):
        code, stderr = run(folder, prefix_shards, "--resume", "--max-steps", 4, "--save-every", 2)
        assert code == 0, stderr
        assert yaml.safe_load((folder / "config.yaml").read_text())["data"]["corrupted_input"] == "content"
        assert train_losses(folder) == train_losses(whole), folder.name  # exactly the content run continued


def test_a_content_query_never_reads_its_own_corrupted_input(model):
    """The mechanism behind the content layout's missing copy share: the query of rank i reads the content
    entries of ranks < i only, so replacing the corrupted input of rank j changes no query of rank <= j."""
    n, m = 24, 4
    input_ids, positions, mask = pretraining_batch(generator(4), n, m, (0,))
    with torch.no_grad():
        before = model(input_ids, positions, m, attention_mask=mask)
        for j in range(m):
            changed = input_ids.clone()
            changed[0, n - m + j] = 7
            delta = (model(input_ids=changed, positions=positions, pred_size=m, attention_mask=mask) - before).abs()
            delta = delta.amax(-1)[0]
            assert (delta[: j + 1] == 0).all(), f"query <= {j} reads the content entry of rank {j}: {delta.tolist()}"
            if j < m - 1:
                assert delta[j + 1:].max() > 1e-6, "the later queries read it"


def test_masked_accuracy_counts_only_the_mask_input_targets():
    """valid/masked_accuracy, brute force: a model that answers every predicted token with its corrupted input
    scores exactly the unchanged share on valid/accuracy and 0 on the <mask>-input tokens, in both layouts."""
    from mpnet.training.evaluation import evaluate

    class Copier(torch.nn.Module):
        config = SimpleNamespace(mask_token_id=MASK_ID)

        def forward(self, input_ids, positions, pred_size, attention_mask=None, document_ids=None, objective="mpnet",
                    appended_ids=None):
            inputs = appended_ids if appended_ids is not None else input_ids[:, input_ids.shape[1] - pred_size:]
            return torch.nn.functional.one_hot(inputs, VOCAB).float()

    for layout in ("appended", "content"):
        batches = [collate(layout, step=s) for s in range(4)]
        values = evaluate(Copier(), batches, torch.device("cpu"), bf16=False)
        unchanged = sum(int(((b["targets"] != -100) & (collate_inputs(b) == b["targets"])).sum()) for b in batches)
        predicted = sum(int((b["targets"] != -100).sum()) for b in batches)
        assert 0 < unchanged < predicted
        assert values["valid/accuracy"] == pytest.approx(unchanged / predicted, abs=1e-6), layout
        assert values["valid/masked_accuracy"] == 0.0, layout


def collate_inputs(batch):
    n, m = batch["input_ids"].shape[1], batch["pred_size"]
    return batch["appended_ids"] if "appended_ids" in batch else batch["input_ids"][:, n - m:]


@pytest.mark.parametrize("args,fragment", [
    (["data.corrupted_input=original"], "config key 'data.corrupted_input' got 'original'"),
    (["data.corrupted_input=appended", "--objective", "plm"], "data.corrupted_input=appended is a layout of the mpnet"),
])
def test_bad_settings_are_one_line_before_any_work(prefix_shards, tmp_path, args, fragment):
    out = tmp_path / "run"
    line = error_line(*run(out, prefix_shards, "--max-steps", 1, *args))
    assert fragment in line
    assert not out.exists()
