"""finetune-mpnet --pack: packed batches fine-tune the same model as padded ones.

With --pack a step still takes `batch_size` examples in the same order and the loss is still their
mean; only the layout changes (several examples per row, isolated by document ids, each read at its
own <s>). With dropout 0 (the tiny checkpoint's) every step's loss must therefore match the padded
run's, and so must the dev metrics and the trained weights.

Not bit for bit: the packed and the padded batch have different shapes, so the matrix products and
the reductions of the gradients over the batch (e.g. a weight's gradient sums over all rows)
accumulate in a different order, which moves the last bits of fp32 (~1e-7 relative per step; AdamW
then carries such differences on). So the losses are compared to 1e-5 relative, the trained weights
to 1e-4 relative, and the dev predictions (argmax; regression: the scores) must agree.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch

import mpnet.training.finetune as finetune_module
from mpnet.training.config import load_finetune_config as load_config
from mpnet.training.finetune import finetune
from fixtures import make_checkpoint, make_tokenizer, write_glue
from cli_support import call_main, cli_main

QUICK = {"epochs": 2, "lr": 1e-3, "batch_size": 8, "eval_batch_size": 16, "progress_bar": False, "warmup_ratio": 0.1}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune-pack")
    tokenizer = make_tokenizer()
    ckpt = make_checkpoint(root / "ckpt", tokenizer=tokenizer)
    for task in ("sst2", "stsb"):
        write_glue(task, root / "glue", n_train=32, n_dev=12)
    return root, ckpt


def run(workspace, tmp_path, task, pack, monkeypatch):
    """Fine-tune; returns (results, every step's loss)."""
    root, ckpt = workspace
    losses = []
    original = finetune_module._loss

    def recording(logits, labels, regression):
        loss = original(logits, labels, regression)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(finetune_module, "_loss", recording)
    config = load_config(task, None, {"training": {**QUICK, "pack": pack}, "task": {"max_length": 48}})
    results = finetune(ckpt, root / "glue", config, tmp_path / f"{task}-{'packed' if pack else 'padded'}")
    monkeypatch.setattr(finetune_module, "_loss", original)
    return results, losses


def weights(path):
    from mpnet import MPNetForSequenceClassification

    return MPNetForSequenceClassification.from_pretrained(path).state_dict()


@pytest.mark.parametrize("task", ["sst2", "stsb"])
def test_packed_finetuning_gives_the_padded_losses(workspace, tmp_path, task, monkeypatch):
    padded, padded_losses = run(workspace, tmp_path, task, False, monkeypatch)
    packed, packed_losses = run(workspace, tmp_path, task, True, monkeypatch)
    assert len(padded_losses) == len(packed_losses) == 2 * 4  # 32 examples / batch 8, two epochs
    for step, (a, b) in enumerate(zip(packed_losses, padded_losses)):
        assert a == pytest.approx(b, rel=1e-5), f"step {step + 1}"
    assert padded_losses[0] != padded_losses[-1]  # it trains
    for mine, theirs in zip(packed["epochs"], padded["epochs"]):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-4)
        # the point of packing: far fewer padding positions (examples are 6-12 tokens, rows up to 48)
        assert mine["train_padding_share"] < 0.5 * theirs["train_padding_share"], (mine, theirs)
    assert packed["packed"] is True and padded["packed"] is False
    assert packed["best"]["epoch"] == padded["best"]["epoch"]
    a, b = weights(packed["best"]["checkpoint"]), weights(padded["best"]["checkpoint"])
    for name in b:
        scale = b[name].float().norm().clamp(min=1e-3)
        assert ((a[name].float() - b[name].float()).norm() / scale).item() <= 1e-4, name


def test_packed_evaluation_gives_the_padded_predictions(workspace):
    """evaluate() with packed batches (file order, bucketed rows) predicts what padded batches predict, so it
    scores the same. Run in float64, where the two batchings differ only in the order of the sums: with
    u = 1.1e-16 and reductions of at most 64 terms (hidden 32, FFN 64, 48 tokens) each sum is exact to
    gamma_64 = 64u = 7e-15 relative; 1e-10 of the largest prediction leaves four orders of magnitude for the
    two layers. (In float32 the same comparison differed by 1.1e-6 in Pearson on one 2-core machine and by
    less on another: a tolerance fitted to one CPU.) The metrics then follow from the predictions: Pearson
    moves by at most 2 max|delta| / std(predictions), and Spearman not at all while no two predictions lie
    closer than the tolerance (the ranks are the same)."""
    import numpy as np

    from mpnet.data.classification import Batching, prepare_data
    from mpnet.training.finetune import Backend, evaluate, load_classifier, read_task_data

    root, ckpt = workspace
    tokenizer = make_tokenizer()
    config = load_config("stsb", None, {"training": QUICK, "task": {"max_length": 48}})
    data = read_task_data(config, root / "glue")
    model = load_classifier(ckpt, data.task, Backend()).double()
    prepared = prepare_data(data, tokenizer, config, model.config.max_sequence_length, model.config.vocab_size)
    device = torch.device("cpu")
    predictions = []

    class KeepPredictions:  # the task, keeping what evaluate() scores
        def __getattr__(self, name):
            return getattr(data.task, name)

        def compute_metrics(self, preds, labels, suffix):
            predictions.append(np.array(preds))
            return data.task.compute_metrics(preds, labels, suffix)

    task = KeepPredictions()
    padded = evaluate(model, task, prepared.dev, device, 5, tokenizer.pad_token_id, 16, bf16=False)
    batching = Batching(tokenizer.pad_token_id, 16, model.config.max_sequence_length, True, 48, 3)
    packed = evaluate(model, task, prepared.dev, device, 5, tokenizer.pad_token_id, 16, bf16=False,
                      batching=batching)
    padded_preds, packed_preds = predictions
    tolerance = 1e-10 * np.abs(padded_preds).max()
    delta = np.abs(packed_preds - padded_preds).max()
    assert delta <= tolerance, (delta, tolerance)
    assert abs(packed["metrics"]["pearson"] - padded["metrics"]["pearson"]) <= 2 * tolerance / padded_preds.std()
    gaps = np.diff(np.sort(padded_preds))
    assert gaps[gaps > 0].min() > 2 * tolerance  # distinct predictions stay in order: the same ranks
    assert packed["metrics"]["spearman"] == padded["metrics"]["spearman"]


def test_cli_pack_flag(workspace, tmp_path, caplog):
    root, ckpt = workspace
    out = tmp_path / "cli"
    caplog.set_level(logging.INFO, logger="mpnet.training.finetune")
    code, err = call_main(cli_main("finetune"), "--checkpoint", ckpt, "--task", "sst2", "--data-dir", root / "glue",
                          "--output-dir", out, "--epochs", 1, "--batch-size", 8, "--max-length", 48, "--pack",
                          "--no-progress")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["packed"] is True and results["config"]["training"]["pack"] is True
    assert "packed into rows of <= 48 tokens" in caplog.text
