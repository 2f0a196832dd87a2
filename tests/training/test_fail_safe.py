"""Pretraining does not lose work: non-finite steps are skipped and stop the run, checkpoints are never
NaN, a full disk or a busy output directory is one clear line; fine-tuning follows the same non-finite policy.
In-process runs of a tiny model (CPU)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pretrain_support import (TINY_RUN, checkpoint_steps, error_line, poison_steps, pretrain, rows, train_losses,
                              weights)


def run(out, shards, *extra):
    return pretrain("--output-dir", out, "--data", shards, "--log-every", 1, *TINY_RUN, *extra)


# ------------------------------------------------------------------------------- non-finite steps


def test_an_isolated_nonfinite_step_is_skipped_without_an_update(prefix_shards, tmp_path, monkeypatch):
    poison_steps(monkeypatch, {3})
    out = tmp_path / "run"
    code, stderr = run(out, prefix_shards, "--max-steps", 5, "--save-every", 1, "logging.keep_last=0")
    assert code == 0, stderr
    losses = train_losses(out)
    assert losses[3] is None and all(math.isfinite(losses[s]) for s in (1, 2, 4, 5))
    assert [r["train/skipped_steps"] for r in rows(out) if "train/loss" in r] == [0, 0, 1, 1, 1]
    before, skipped, after = weights(out, 2), weights(out, 3), weights(out, 4)
    assert all(torch.equal(before[k], skipped[k]) for k in before)  # step 3 changed nothing
    assert any(not torch.equal(skipped[k], after[k]) for k in before)  # step 4 trained again


def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_good_checkpoint(prefix_shards, tmp_path, monkeypatch,
                                                                             capsys):
    poison_steps(monkeypatch, set(range(5, 100)))
    out = tmp_path / "run"
    code, stderr = run(out, prefix_shards, "--max-steps", 20, "--save-every", 2, "logging.keep_last=1",
                       "training.max_nonfinite_steps=3")
    line = error_line(code, stderr)
    assert "step 7: 3 optimizer steps in a row (since step 5)" in line, line
    assert "optim.lr=" in line and "bad data" in line and "step-00000006" in line, line
    assert checkpoint_steps(out) == [6]  # written during the streak: the last good weights, kept by rotation
    good = weights(out, 6)
    assert all(torch.isfinite(v).all() for v in good.values())
    assert capsys.readouterr().out.count("update skipped") == 2  # steps 5 and 6 logged; step 7 is the stop


def test_a_learning_rate_that_diverges_stops_with_the_cause(prefix_shards, tmp_path):
    out = tmp_path / "run"
    code, stderr = run(out, prefix_shards, "--max-steps", 40, "--save-every", 3, "optim.lr=1e6",
                       "training.max_nonfinite_steps=4")
    line = error_line(code, stderr)
    assert "in a row" in line and "optim.lr=1000000.0" in line and "learning rate too high" in line, line
    for step in checkpoint_steps(out):
        assert all(torch.isfinite(v).all() for v in weights(out, step).values()), step


def test_the_last_good_checkpoint_has_a_finite_validation_loss_below_the_untrained_level(prefix_shards, tmp_path):
    """optim.lr=1e6: the guard skips the NaN updates, so the weights stay finite while every loss is NaN; the
    stop line used to call that checkpoint "the last good checkpoint". optim.lr=1 trains to finite losses
    far above the untrained model's: none of its checkpoints is good either."""
    from mpnet.training.checkpointing import read_health

    def health(out):
        return {step: read_health(out / "checkpoints" / f"step-{step:08d}") for step in checkpoint_steps(out)}

    nan_run = tmp_path / "nan"
    code, stderr = run(nan_run, prefix_shards, "--max-steps", 40, "--save-every", 3, "optim.lr=1e6",
                       "training.max_nonfinite_steps=4")
    line = error_line(code, stderr)
    assert "no good checkpoint has been written yet" in line, line
    assert health(nan_run) == {3: {"valid_loss": None, "recent_level": health(nan_run)[3]["recent_level"],
                                   "good": False}}

    high_run = tmp_path / "high"
    code, stderr = run(high_run, prefix_shards, "--max-steps", 12, "--save-every", 3, "optim.lr=1",
                       "logging.keep_last=0")
    assert code in (0, None), stderr
    untrained = torch.load(high_run / "checkpoints" / "step-00000003" / "training_state" / "state.pt",
                           weights_only=False)["untrained_valid_loss"]
    for step, h in health(high_run).items():
        assert not h["good"] and h["valid_loss"] > 1.25 * untrained and h["recent_level"] <= untrained, (step, h)


def test_the_health_rule_and_rotation_keep_the_last_good_checkpoint(tmp_path):
    import json

    from mpnet.training.checkpointing import (HEALTH_FILE, STATE_FILE, checkpoint_health, last_good_checkpoint,
                                              rotate)

    assert checkpoint_health(5.0, [])["good"]  # the first validation has nothing to be held to
    assert checkpoint_health(5.0, [4.0])["good"] and not checkpoint_health(5.01, [4.0])["good"]  # 1.25 x 4.0
    assert checkpoint_health(5.0, [9.0, 4.0, 8.0])["recent_level"] == 4.0
    assert checkpoint_health(4.9, [1.0] + [4.0] * 5)["good"]  # only the 5 most recent validations count
    assert not checkpoint_health(float("nan"), [4.0])["good"] and not checkpoint_health(float("inf"), [])["good"]
    assert checkpoint_health(None, [4.0])["good"]  # no validation split: finite weights are the rule

    root = tmp_path / "checkpoints"
    for step, good in ((2, True), (4, True), (6, False), (8, False)):
        (root / f"step-{step:08d}" / STATE_FILE).parent.mkdir(parents=True)
        (root / f"step-{step:08d}" / STATE_FILE).write_bytes(b"")
        (root / f"step-{step:08d}" / HEALTH_FILE).write_text(json.dumps({"good": good}))
    assert last_good_checkpoint(tmp_path).startswith("the last good checkpoint is step 4")
    rotate(tmp_path, keep_last=2, newest=root / "step-00000008")
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000006", "step-00000008"]


def test_a_preprocessed_directory_keeps_its_own_tokenizer_and_config_records_it(prefix_shards, tmp_path):
    """data.tokenizer given with a preprocessed directory was ignored and config.yaml recorded it anyway."""
    import yaml
    from transformers import MPNetTokenizer

    from fixtures import TINY_VOCAB

    other = tmp_path / "other-tokenizer"
    MPNetTokenizer(vocab={token: i for i, token in enumerate(TINY_VOCAB)}).save_pretrained(str(other))
    code, stderr = run(tmp_path / "refused", prefix_shards, "--max-steps", 1, f"data.tokenizer={other}")
    line = error_line(code, stderr)
    assert f"data.tokenizer={other} is not the tokenizer {prefix_shards} was preprocessed with" in line, line
    assert not (tmp_path / "refused" / "checkpoints").exists()

    for name, extra in (("same", ["data.tokenizer=default"]), ("unsaid", [])):  # the same ids / left out
        out = tmp_path / name
        code, stderr = run(out, prefix_shards, "--max-steps", 1, *extra)
        assert code in (0, None), stderr
        recorded = yaml.safe_load((out / "config.yaml").read_text())["data"]["tokenizer"]
        assert recorded == str(prefix_shards / "tokenizer"), recorded


def test_a_log_file_gets_no_progress_bar_frames(prefix_shards, tmp_path):
    """stderr redirected to a file (nohup, a batch job) used to collect a carriage-return frame per step."""
    code, stderr = run(tmp_path / "run", prefix_shards, "--max-steps", 3, "logging.progress_bar=true")
    assert code in (0, None), stderr
    assert "\r" not in stderr and "step/s" not in stderr and "it/s" not in stderr, stderr[-500:]


def test_weights_that_overflow_are_never_saved(prefix_shards, tmp_path, monkeypatch):
    """An update that itself overflows (finite gradients, infinite weights): the save refuses."""
    original = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    out = tmp_path / "run"
    code, stderr = run(out, prefix_shards, "--max-steps", 2, "--save-every", 1)
    line = error_line(code, stderr)
    assert "step 1: the weights are no longer finite, so no checkpoint was written" in line, line
    assert "no checkpoint has been written yet" in line
    assert checkpoint_steps(out) == [] and not list((out / "checkpoints").glob(".tmp*"))


def test_resume_refuses_a_checkpoint_with_nonfinite_weights(prefix_shards, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    assert run(out, prefix_shards, "--max-steps", 2, "--save-every", 1, "logging.keep_last=0")[0] == 0
    file = out / "checkpoints" / "step-00000002" / "model.safetensors"
    state = load_file(file)
    name = next(iter(state))
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, file, metadata={"format": "pt"})
    line = error_line(*run(out, prefix_shards, "--max-steps", 4, "--save-every", 1, "--resume",
                           "logging.keep_last=0"))
    assert "step-00000002 holds non-finite weights" in line and "delete it" in line, line


def test_rotation_keeps_the_checkpoint_just_written(tmp_path):
    from mpnet.training.checkpointing import rotate

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"step-{step:08d}").mkdir(parents=True)
    rotate(tmp_path, keep_last=1, newest=root / "step-00000004")  # step-6: not ours, e.g. copied in by hand
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000006"]


# ------------------------------------------------------------------------------------- full disk


def _no_checkpoint_debris(out):
    root = out / "checkpoints"
    return not [p for p in root.iterdir() if p.name.startswith(".")] if root.is_dir() else True


def _estimate_matches_a_real_checkpoint(line, out, step):
    """'needs about X MB' is within 25% of what checkpoint `step` really takes."""
    import re

    needed = float(re.search(r"needs about ([\d.,]+) MB", line).group(1).replace(",", ""))
    actual = sum(f.stat().st_size for f in (out / "checkpoints" / f"step-{step:08d}").rglob("*") if f.is_file())
    assert abs(needed - actual / 2**20) <= 0.25 * actual / 2**20, (needed, actual)


def _intact(out, step):
    from mpnet.modeling.checkpoint import read_state_dict
    from mpnet.training.checkpointing import load_training_state

    path = out / "checkpoints" / f"step-{step:08d}"
    assert load_training_state(path)["step"] == step
    assert read_state_dict(path)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 20 MB tmpfs (room for one checkpoint of the tiny run, about 14 MB, not two); root only."""
    import os
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (the simulated ENOSPC test covers this case)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_keeps_the_last_checkpoint_and_resume_says_so_once(prefix_shards, small_tmpfs):
    out = small_tmpfs / "run"
    line = error_line(*run(out, prefix_shards, "--max-steps", 6, "--save-every", 2, "logging.keep_last=1"))
    assert "no space left on " in line and "(tmpfs) while saving step 4 to " in line, line
    assert "the last good checkpoint is step 2" in line, line
    assert checkpoint_steps(out) == [2] and _no_checkpoint_debris(out)
    _intact(out, 2)
    _estimate_matches_a_real_checkpoint(line, out, 2)
    code, stderr = run(out, prefix_shards, "--max-steps", 6, "--save-every", 2, "logging.keep_last=1", "--resume")
    line = error_line(code, stderr)
    assert stderr.count("no space left") == 1, stderr
    assert "(tmpfs) while preparing to save step 4" in line and "the last good checkpoint is step 2" in line, line
    _intact(out, 2)


def _fail_second_state_save(monkeypatch, error):
    original, calls = torch.save, {"n": 0}

    def save(obj, file, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(file, "wb") as handle:  # a partial file, as a real failing write leaves
                handle.write(b"partial")
            raise error
        return original(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_simulated_full_disk_during_a_save(prefix_shards, tmp_path, monkeypatch):
    import errno
    import os

    _fail_second_state_save(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    out = tmp_path / "run"
    line = error_line(*run(out, prefix_shards, "--max-steps", 6, "--save-every", 2, "logging.keep_last=1"))
    assert "no space left on " in line and f"while saving step 4 to {out / 'checkpoints'}; needs about " in line
    assert "the last good checkpoint is step 2" in line, line
    assert checkpoint_steps(out) == [2] and _no_checkpoint_debris(out)
    _intact(out, 2)
    _estimate_matches_a_real_checkpoint(line, out, 2)


def test_another_write_error_during_a_save_is_one_line(prefix_shards, tmp_path, monkeypatch):
    import errno

    _fail_second_state_save(monkeypatch, PermissionError(errno.EACCES, "Permission denied", "state.pt"))
    out = tmp_path / "run"
    line = error_line(*run(out, prefix_shards, "--max-steps", 6, "--save-every", 2))
    assert "cannot write while saving step 4" in line and "Permission denied" in line, line
    assert "the last good checkpoint is step 2" in line and _no_checkpoint_debris(out)


def test_a_full_disk_while_logging_is_one_line(prefix_shards, tmp_path, monkeypatch):
    import errno

    from mpnet.training.metrics import MetricsLogger

    original = MetricsLogger._write

    def write(self, row):
        if row["step"] >= 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.jsonl))
        original(self, row)

    monkeypatch.setattr(MetricsLogger, "_write", write)
    out = tmp_path / "run"
    line = error_line(*run(out, prefix_shards, "--max-steps", 6, "--save-every", 2))
    assert "no space left on " in line and f"while writing {out / 'metrics.jsonl'}" in line, line
    assert "the last good checkpoint is step 2" in line


def test_checkpoint_files_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """fsync of every file and of the temporary directory, then the rename, then the parent directory."""
    import os

    from mpnet import MPNetConfig, MPNetForPretraining
    from mpnet.training import checkpointing

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    model = MPNetForPretraining(MPNetConfig.tiny(vocab_size=64, mask_token_id=63, hidden_size=16,
                                                 num_attention_heads=2, intermediate_size=32))
    final = checkpointing.save_checkpoint(tmp_path, 7, model, None, {"step": 7}, {}, keep_last=0)
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    synced_before = {Path(e[1]).name for e in events[:rename] if e[0] == "fsync"}
    assert {"model.safetensors", "config.json", "state.pt", "run_config.yaml", ".tmp-step-00000007"} <= synced_before
    assert ("fsync", str(final.parent)) in events[rename:]


# ------------------------------------------------------------------------------------ output dir


def test_a_second_run_into_a_busy_output_dir_fails_at_once_naming_the_holder(prefix_shards, tmp_path):
    """The holder is this test process (the lock pretraining takes); the second run is a real process."""
    import os
    import time

    from cli_support import assert_one_line_error, run_cli
    from mpnet.training.safety import OutputDirLock

    out = tmp_path / "run"
    with OutputDirLock(out):
        start = time.perf_counter()
        result = run_cli("pretrain", "--output-dir", out, "--data", prefix_shards, *TINY_RUN)
        elapsed = time.perf_counter() - start
        assert_one_line_error(result, f"{out} is in use by another run (pid {os.getpid()})")
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    assert elapsed < 60  # at once: before any data or model work (the process start is most of it)
    code, stderr = run(out, prefix_shards, "--max-steps", 1)  # released: the next run goes ahead
    assert code == 0, stderr


def test_the_lock_is_released_when_a_run_fails(prefix_shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison_steps(monkeypatch, {1})
    assert error_line(*run(out, prefix_shards, "--max-steps", 3, "training.max_nonfinite_steps=1"))
    monkeypatch.undo()
    code, stderr = run(out, prefix_shards, "--max-steps", 1)
    assert code == 0, stderr


def test_an_output_dir_that_is_a_file(prefix_shards, tmp_path):
    file = tmp_path / "results.txt"
    file.write_text("not a directory")
    line = error_line(*run(file, prefix_shards, "--max-steps", 1))
    assert f"--output-dir {file} is a file, not a directory" in line
    line = error_line(*run(file / "run", prefix_shards, "--max-steps", 1))
    assert "a part of that path is a file" in line
    assert file.read_text() == "not a directory"


# ------------------------------------------------------------- the guard without a host sync (fused AdamW)


@pytest.fixture
def fused_adamw(monkeypatch):
    """AdamW fused on the CPU too, as the toolkit builds it on CUDA: the guard then skips on the device."""
    from mpnet.training import toolkit

    original = torch.optim.AdamW

    def fused(params, **kwargs):
        return original(params, **{**kwargs, "fused": True})

    monkeypatch.setattr(toolkit.torch.optim, "AdamW", fused)
    yield
    monkeypatch.setattr(toolkit.torch.optim, "AdamW", original)


def test_on_device_an_isolated_nonfinite_step_is_skipped_without_an_update(prefix_shards, tmp_path, monkeypatch,
                                                                          fused_adamw):
    test_an_isolated_nonfinite_step_is_skipped_without_an_update(prefix_shards, tmp_path, monkeypatch)


def test_on_device_consecutive_nonfinite_steps_stop_at_the_next_poll(prefix_shards, tmp_path, monkeypatch, capsys,
                                                                    fused_adamw):
    poison_steps(monkeypatch, set(range(5, 100)))
    out = tmp_path / "run"
    code, stderr = pretrain("--output-dir", out, "--data", prefix_shards, "--log-every", 4, *TINY_RUN,
                            "--max-steps", 20, "--save-every", 100, "training.max_nonfinite_steps=3")
    line = error_line(code, stderr)
    assert "step 7: 3 optimizer steps in a row (since step 5)" in line, line  # counted exactly, read at step 8
    assert "no checkpoint has been written yet" in line
    assert capsys.readouterr().out.count("update skipped") == 2


def _count_host_reads_in_train_steps(monkeypatch):
    """Calls that copy a tensor's value to the host (a sync on a GPU) made by mpnet's own code (not the CPU-side
    data pipeline) while Trainer.train_step runs."""
    import sys

    from mpnet.training.pretrain import Trainer

    reads, inside = [], [False]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if inside[0] and "/mpnet/" in caller and "/mpnet/data/" not in caller:
                reads.append((_name, Path(caller).name, sys._getframe(1).f_lineno))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    step = Trainer.train_step

    def counted(self, *args):
        inside[0] = True
        try:
            return step(self, *args)
        finally:
            inside[0] = False

    monkeypatch.setattr(Trainer, "train_step", counted)
    return reads


def test_the_guard_reads_one_value_per_step_on_the_host_path(prefix_shards, tmp_path, monkeypatch):
    reads = _count_host_reads_in_train_steps(monkeypatch)
    code, stderr = run(tmp_path / "run", prefix_shards, "--max-steps", 6, "--save-every", 100)
    assert code == 0, stderr
    assert len(reads) == 6 and {r[1] for r in reads} == {"safety.py"}, reads


def test_the_guard_reads_nothing_during_a_step_on_the_device_path(prefix_shards, tmp_path, monkeypatch, fused_adamw):
    reads = _count_host_reads_in_train_steps(monkeypatch)
    code, stderr = run(tmp_path / "run", prefix_shards, "--max-steps", 6, "--save-every", 100)
    assert code == 0, stderr
    assert reads == []


def test_metrics_go_to_the_experiment_tracker_named_by_report_to(prefix_shards, tmp_path, monkeypatch):
    """logging.report_to=wandb: the run config and every metrics row reach the tracker (a stand-in module here,
    with wandb's calls: init, run.log(values, step=), run.finish), and nothing else changes."""
    import json as json_

    fake = tmp_path / "fake-trackers"
    fake.mkdir()
    calls = tmp_path / "calls.jsonl"
    (fake / "wandb.py").write_text(f"""
import json
CALLS = {str(calls)!r}
def _record(*item):
    with open(CALLS, "a") as f:
        f.write(json.dumps(item) + "\\n")
class _Run:
    def log(self, values, step):
        _record("log", step, values)
    def finish(self):
        _record("finish")
def init(dir, name, config):
    _record("init", name, config["training"]["max_steps"])
    return _Run()
""")
    monkeypatch.syspath_prepend(str(fake))
    out = tmp_path / "run"
    code, stderr = run(out, prefix_shards, "--max-steps", 3, "logging.report_to=wandb")
    assert code in (0, None), stderr
    recorded = [json_.loads(line) for line in calls.read_text().splitlines()]
    assert recorded[0] == ["init", "run", 3] and recorded[-1] == ["finish"]
    logged = [(step, values) for kind, step, values in (r for r in recorded if r[0] == "log")]
    assert [step for step, _ in logged] == [row["step"] for row in rows(out)]  # every row of metrics.jsonl
    assert all("train/loss" in values or "valid/loss" in values for _, values in logged)

    import importlib.util

    if importlib.util.find_spec("mlflow") is None:  # a tracker that is not installed: one line, before any work
        code, stderr = run(tmp_path / "other", prefix_shards, "--max-steps", 1, "logging.report_to=mlflow")
        assert "logging.report_to=mlflow but mlflow is not installed (pip install mlflow)" in error_line(code, stderr)
        assert not (tmp_path / "other").exists()
    code, stderr = run(tmp_path / "third", prefix_shards, "logging.report_to=tensorboardX")
    assert "'logging.report_to' got 'tensorboardX'" in error_line(code, stderr)


# ------------------------------------------------- fine-tuning: the same policy (toolkit.OptimizerStep)


def _poison_classifier_steps(monkeypatch, bad_steps) -> list:
    """NaN logits in the training forwards of the given 1-based fine-tuning steps; returns the weights each
    training forward saw (a copy of the encoder's first weight), one entry per step."""
    from mpnet import MPNetForSequenceClassification

    original, seen = MPNetForSequenceClassification.forward, []

    def forward(self, *args, **kwargs):
        logits = original(self, *args, **kwargs)
        if self.training:
            seen.append(self.mpnet.embeddings.word_embeddings.weight.detach().clone())
            if len(seen) in bad_steps:
                logits = logits * float("nan")
        return logits

    monkeypatch.setattr(MPNetForSequenceClassification, "forward", forward)
    return seen


@pytest.fixture(scope="module")
def glue_workspace(tmp_path_factory):
    from fixtures import make_checkpoint, write_glue

    root = tmp_path_factory.mktemp("finetune-nonfinite")
    write_glue("sst2", root / "glue", n_train=32, n_dev=8)
    return root / "glue", make_checkpoint(root / "ckpt")


def _finetune(glue_workspace, out, **training):
    from mpnet.training.config import load_finetune_config
    from mpnet.training.finetune import finetune

    data, checkpoint = glue_workspace
    config = load_finetune_config("sst2", None, {"task": {"max_length": 32}, "training": {
        "epochs": 1, "lr": 1e-3, "batch_size": 8, "progress_bar": False, **training}})
    return finetune(checkpoint, data, config, out)


def test_finetuning_skips_an_isolated_nonfinite_step_without_an_update(glue_workspace, tmp_path, monkeypatch):
    seen = _poison_classifier_steps(monkeypatch, {2})
    result = _finetune(glue_workspace, tmp_path / "run")  # 32 examples, 4 steps
    assert len(seen) == 4 and result["epochs"][0]["skipped_steps"] == 1
    assert not torch.equal(seen[0], seen[1])  # step 1 trained
    assert torch.equal(seen[1], seen[2])  # step 2 changed nothing
    assert not torch.equal(seen[2], seen[3])  # step 3 trained again
    assert math.isfinite(result["epochs"][0]["train_loss"])  # the mean of the steps that updated


def test_finetuning_stops_after_max_nonfinite_steps_in_a_row(glue_workspace, tmp_path, monkeypatch):
    from mpnet.training.safety import NonFiniteError

    _poison_classifier_steps(monkeypatch, {2, 3, 4})
    with pytest.raises(NonFiniteError) as stop:
        _finetune(glue_workspace, tmp_path / "run", max_nonfinite_steps=3)
    line = str(stop.value)
    assert "step 4: 3 optimizer steps in a row (since step 2)" in line, line
    assert "training.lr=0.001" in line and "training.warmup_ratio" in line, line
    assert "no checkpoint has been written yet" in line, line
