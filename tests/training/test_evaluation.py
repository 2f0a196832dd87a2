"""The fill-mask figure every run is compared by (mpnet/training/evaluation.py), and the dynamics command.

Brute force: each fill-mask row masks exactly round(pred_prob x its length) of its non-special tokens (fewer
only when it has fewer), the targets are the replaced ids, nothing else changes, and the batches are the same
on every call; fill_mask_scores counts a logits function that knows the answers as 1.0 and the unigram guess
as its share of the targets. learning_dynamics.py runs end to end on a CPU in seconds and reports every run
on the same fill-mask batches.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mpnet.data import TokenBlocks, read_metadata
from mpnet.training.evaluation import fill_mask_batches, fill_mask_scores

REPO = Path(__file__).resolve().parents[2]


def batches_of(shards, **kwargs):
    meta = read_metadata(shards)
    blocks = TokenBlocks(shards, "valid", 32)
    return meta, blocks, fill_mask_batches(blocks, meta["mask_token_id"], meta["special_token_ids"],
                                           meta["pad_token_id"], batch_size=4, count=3, **kwargs)


def test_fill_mask_batches_mask_a_fixed_share_of_the_ordinary_tokens(prefix_shards):
    meta, blocks, batches = batches_of(prefix_shards)
    special = set(meta["special_token_ids"]) | {meta["pad_token_id"], meta["mask_token_id"]}
    assert len(batches) == min(3, -(-len(blocks) // 4))
    row_index = 0
    for batch in batches:
        for ids, targets, mask in zip(batch["input_ids"], batch["targets"], batch["attention_mask"]):
            original = np.asarray(blocks[row_index])
            row_index += 1
            length = len(original)
            assert mask[:length].all() and not mask[length:].any()
            chosen = (targets != -100).nonzero().flatten().tolist()
            ordinary = [i for i, t in enumerate(original.tolist()) if t not in special]
            assert len(chosen) == min(len(ordinary), max(1, round(0.15 * length)))
            assert set(chosen) <= set(ordinary)
            assert targets[chosen].tolist() == original[chosen].tolist()
            assert (ids[chosen] == meta["mask_token_id"]).all()
            unchanged = [i for i in range(length) if i not in chosen]
            assert ids[unchanged].tolist() == original[unchanged].tolist()
    again = batches_of(prefix_shards)[2]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, again) for k in a)


def test_fill_mask_scores_count_right_answers(prefix_shards):
    meta, _, batches = batches_of(prefix_shards)
    vocab = meta["vocab_size"]

    def oracle(input_ids, attention_mask):  # answers each batch's targets (looked up by its inputs)
        targets = next(b["targets"] for b in batches if torch.equal(b["input_ids"], input_ids))
        return torch.nn.functional.one_hot(targets.clamp(min=0), vocab).float() * 10

    assert fill_mask_scores(oracle, batches, torch.device("cpu"))["accuracy"] == 1.0
    targets = torch.cat([b["targets"][b["targets"] != -100] for b in batches])
    top = int(torch.bincount(targets).argmax())

    def unigram(input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, vocab)
        logits[..., top] = 1.0
        return logits

    share = (targets == top).float().mean().item()
    assert fill_mask_scores(unigram, batches, torch.device("cpu"))["accuracy"] == pytest.approx(share)


def test_the_dynamics_command_reports_every_run_on_the_same_batches(tmp_path):
    from pretrain_support import embedded_prefix

    prefix_text = embedded_prefix(tmp_path / "austen-prefix.txt")
    out = tmp_path / "dynamics"
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "mpnet_cli").symlink_to(REPO / "cli")
    env = {"PYTHONPATH": f"{REPO}:{shim}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "learning_dynamics.py"), "--out", str(out),
                             "--device", "cpu", "--steps", "4", "--eval-every", "2", "--eval-batches", "1",
                             "--batch-size", "4", "--runs", "mpnet", "--reference-bias-inits", "zero",
                             "--set", "model.num_hidden_layers=1", "--set", "data.block_size=32",
                             "--set", "data.path=" + str(prefix_text)],
                            capture_output=True, text=True, env={**env, **_passthrough()}, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "dynamics.json").read_text())
    names = [run["name"] for run in report["runs"]]
    assert names == ["mpnet", "reference-mlm (lr 0.002, zero bias)"]
    for run in report["runs"]:
        assert [point["step"] for point in run["curve"]] == [2, 4]
        assert all(0 <= point["fill_mask_accuracy"] <= 1 for point in run["curve"])
    assert (out / "dynamics.md").read_text().count("| 4 |") == 3  # one row per table
    assert (out / "dynamics.png").stat().st_size > 0


def _passthrough() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k in ("VIRTUAL_ENV", "LANG", "TMPDIR", "PYTHONHASHSEED")}


def test_the_quality_benchmark_ranks_every_objective_against_the_untrained_model(tmp_path):
    """scripts/quality_benchmark.py end to end on a CPU at toy size: every objective pretrained on the same
    shards for the same steps, each checkpoint and an untrained model fine-tuned per seed, one report; then the
    same command scoring a given checkpoint (--checkpoint) instead of pretraining."""
    import yaml

    from fixtures import write_glue
    from pretrain_support import embedded_prefix

    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "intermediate_size": 64},
        "data": {"path": str(embedded_prefix(tmp_path / "austen-prefix.txt")), "block_size": 32},
        "training": {"batch_size": 4}, "logging": {"valid_batches": 1}}))
    glue = write_glue("sst2", tmp_path / "glue", n_train=16, n_dev=8)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "mpnet_cli").symlink_to(REPO / "cli")
    env = {"PYTHONPATH": f"{REPO}:{shim}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **_passthrough()}
    common = ["--device", "cpu", "--config", str(config), "--task", f"sst2={glue}", "--finetune-epochs", "1",
              "--finetune-max-length", "32"]

    def benchmark(out, *extra):
        result = subprocess.run([sys.executable, str(REPO / "scripts" / "quality_benchmark.py"), "--out", str(out),
                                 *common, *extra], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((out / "quality.json").read_text())

    report = benchmark(tmp_path / "q", "--steps", "4", "--finetune-seeds", "1,2", "--jobs", "2")  # side by side
    rows = {row["row"]: row for row in report["rows"]}
    assert list(rows) == ["mpnet", "mlm", "plm", "none"]
    for name in ("mpnet", "mlm", "plm"):
        assert rows[name]["tokens"] == 4 * 4 * 32 and 0 <= rows[name]["fill_mask_accuracy"] <= 1
        assert [point["step"] for point in rows[name]["curve"]] == [1, 2, 3, 4]
    for row in rows.values():
        assert [score["seed"] for score in row["finetune"]["sst2"]] == [1, 2]
        assert all(0 <= score["best"] <= 100 for score in row["finetune"]["sst2"])
    markdown = (tmp_path / "q" / "quality.md").read_text()
    assert "| mpnet | 512 |" in markdown and "- plm: sst2 " in markdown
    assert (tmp_path / "q" / "quality_pretraining.png").stat().st_size > 0
    assert (tmp_path / "q" / "quality_finetune.png").stat().st_size > 0
    assert (tmp_path / "q" / "logs" / "pretrain-plm.log").is_file()  # each side-by-side command's output
    assert all(command["at_once"] == 2 for command in report["facts"]["commands"])
    # the same report again from the json alone (all that may come back from the machine that ran it)
    redrawn = subprocess.run([sys.executable, str(REPO / "scripts" / "quality_benchmark.py"), "--out",
                              str(tmp_path / "r"), "--redraw", str(tmp_path / "q" / "quality.json")],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert redrawn.returncode == 0, redrawn.stderr[-3000:]
    assert (tmp_path / "r" / "quality.md").read_text() == markdown
    assert json.loads((tmp_path / "r" / "quality.json").read_text()) == report
    assert (tmp_path / "r" / "quality_finetune.png").stat().st_size > 0

    # a checkpoint scored over an lr grid: every lr run, the row scored at the lr of its best mean
    scored = benchmark(tmp_path / "c", "--checkpoint", rows["mlm"]["checkpoint"], "--no-baseline",
                       "--finetune-seeds", "1", "--finetune-lr", "3e-4,1e-3")
    assert [row["row"] for row in scored["rows"]] == ["mlm/step-00000004"]
    grid = scored["rows"][0]["finetune_grid"]["sst2"]
    assert sorted(grid) == ["0.0003", "0.001"] and all(len(seeds) == 1 for seeds in grid.values())
    chosen = scored["rows"][0]["finetune_lr"]["sst2"]
    assert grid[str(chosen)][0]["best"] == max(seeds[0]["best"] for seeds in grid.values())
    assert scored["rows"][0]["finetune"]["sst2"] == grid[str(chosen)]
    assert f"(lr {chosen:g})" in (tmp_path / "c" / "quality.md").read_text()
    # a run's checkpoint reads the run's record: the same tokens, curve and fill-mask accuracy as when pretrained
    for key in ("tokens", "fill_mask_accuracy", "curve"):
        assert scored["rows"][0][key] == rows["mlm"][key], key
    assert "| mlm/step-00000004 | 512 |" in (tmp_path / "c" / "quality.md").read_text()
    assert (tmp_path / "c" / "quality_pretraining.png").stat().st_size > 0

    # a budget trend from one pretraining: each objective scored at every other step, the same run's checkpoints
    trend = benchmark(tmp_path / "t", "--objectives", "mpnet", "--steps", "4", "--budget-points", "2",
                      "--no-baseline", "--finetune-seeds", "1")
    trend_rows = {row["row"]: row for row in trend["rows"]}
    assert list(trend_rows) == ["mpnet/step-00000002", "mpnet/step-00000004"]
    assert [row["tokens"] for row in trend_rows.values()] == [2 * 4 * 32, 4 * 4 * 32]
    assert trend_rows["mpnet/step-00000002"]["curve"] == trend_rows["mpnet/step-00000004"]["curve"][:2]
    assert trend_rows["mpnet/step-00000002"]["fill_mask_accuracy"] == trend_rows["mpnet/step-00000004"]["curve"][1][
        "fill_mask_accuracy"]
    assert all(row["finetune"]["sst2"][0]["seed"] == 1 for row in trend_rows.values())


def test_the_quality_benchmark_reports_its_own_checkout_commit_only(tmp_path, monkeypatch):
    """The report's commit: the project's checkout's HEAD; "unknown" for a copy inside another repository (which
    would otherwise report that repository's commit) or outside git."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import quality_benchmark

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "f").write_text("x")
    git("add", "f")
    git("commit", "-q", "-m", "c")
    monkeypatch.setattr(quality_benchmark, "REPO", tmp_path)
    assert quality_benchmark.git_commit() == git("rev-parse", "--short", "HEAD")
    (tmp_path / "copy").mkdir()
    monkeypatch.setattr(quality_benchmark, "REPO", tmp_path / "copy")
    assert quality_benchmark.git_commit() == "unknown"


def test_the_quality_benchmark_passes_pretrain_overrides_and_refuses_bad_ones_first(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import quality_benchmark

    from fixtures import write_glue

    glue = write_glue("sst2", tmp_path / "glue", n_train=16, n_dev=8)
    base = ["--out", str(tmp_path / "out"), "--steps", "10", "--device", "cpu", "--task", f"sst2={glue}"]
    args = quality_benchmark.parse_args(base + ["--pretrain-set", "training.compile=true"])
    argv = quality_benchmark.pretrain_argv(args, tmp_path, "mpnet", tmp_path / "run", 10)
    assert "training.compile=true" in argv
    with pytest.raises(SystemExit, match="--pretrain-set: unknown config key 'training.nokey'"):
        quality_benchmark.main(base + ["--pretrain-set", "training.nokey=1"])
    assert not (tmp_path / "out" / "pretrain").exists()
    with pytest.raises(SystemExit, match="sets training.max_steps itself .choose it with --steps"):
        quality_benchmark.parse_args(base + ["--pretrain-set", "training.max_steps=5"])
    assert quality_benchmark.parse_args(base + ["--finetune-lr", "1e-4, 3e-4"]).finetune_lrs == [1e-4, 3e-4]
    for bad in ("fast", "0,1e-4"):
        with pytest.raises(SystemExit, match="--finetune-lr"):
            quality_benchmark.parse_args(base + ["--finetune-lr", bad])
