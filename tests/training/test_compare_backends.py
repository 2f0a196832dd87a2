"""compare-mpnet-backends on CPU: an evaluation-only comparison that says so, with table, PNG and JSON."""
from __future__ import annotations

import json

import pytest
import torch

from fixtures import make_checkpoint, write_glue
from cli_support import assert_one_line_error_text, call_main, cli_main, run_cli


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (evaluation-only) path")
def test_compare_on_cpu_writes_table_plot_and_json(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    write_glue("sst2", tmp_path / "glue", n_train=24, n_dev=12)
    out = tmp_path / "cmp"
    result = run_cli("compare", "--checkpoint", ckpt, "--tasks", "sst2", "--data-dir", tmp_path / "glue",
                     "--backends", "dense,flex,flex:8", "--seeds", "1,2", "--output-dir", out, "--epochs", 1,
                     "--lr", 1e-3, "--batch-size", 8, "--max-length", 48, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "evaluation-only" in result.stdout and "FlexAttention has no backward pass on CPU" in result.stdout

    table = (out / "comparison.md").read_text()
    assert "| backend | task | dev score | Δ vs dense | train ex/s | eval ex/s |" in table
    assert "evaluation-only" in table and "FlexAttention has no backward pass on CPU" in table
    rows = [line for line in table.splitlines() if line.startswith(("| dense |", "| flex |", "| flex:8 |"))]
    assert [r.split("|")[1].strip() for r in rows[:3]] == ["dense", "flex", "flex:8"]
    assert "(n=2)" in rows[0] and "eval-only" in rows[1]

    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "comparison.json").read_text())
    assert report["mode"] == "evaluation-only" and report["seeds"] == [1, 2]
    assert report["backends"] == ["dense", "flex", "flex:8"] and report["tasks"] == ["sst2"]
    # 3 backends x 2 seeds, from 2 dense trainings: each run names the training it evaluated.
    trainings = {seed: json.loads((out / "runs" / "sst2" / "dense-train" / f"seed{seed}" / "results.json").read_text())
                 for seed in (1, 2)}
    assert sorted((r["backend"], r["seed"]) for r in report["runs"]) == sorted(
        (b, s) for b in ("dense", "flex", "flex:8") for s in (1, 2))
    for run in report["runs"]:
        trained = trainings[run["seed"]]
        assert run["run_dir"] == str(out / "runs" / "sst2" / "dense-train" / f"seed{run['seed']}")
        assert run["metrics"].keys() == {"accuracy"} and run["score"] == run["metrics"]["accuracy"]
        if run["backend"] == "dense":  # the saved best model, evaluated again, scores what training recorded
            assert run["mode"] == "trained (dense)" and run["score"] == pytest.approx(trained["best"]["score"])
            assert run["train_examples_per_s"] == trained["train_examples_per_s"]
        else:
            assert run["mode"] == "eval-only" and run["train_examples_per_s"] is None
    summary = {row["backend"]: row for row in report["summary"]}
    for backend, row in summary.items():  # each row summarises its backend's runs
        mine = [r for r in report["runs"] if r["backend"] == backend]
        assert row["seeds"] == [1, 2] and row["task"] == "sst2"
        assert row["score_mean"] == pytest.approx(sum(r["score"] for r in mine) / 2)
        assert row["eval_examples_per_s"] == pytest.approx(sum(r["eval_examples_per_s"] for r in mine) / 2)
    assert summary["dense"]["train_examples_per_s"] == pytest.approx(
        sum(t["train_examples_per_s"] for t in trainings.values()) / 2)
    assert summary["flex"]["train_examples_per_s"] is None and summary["flex:8"]["train_examples_per_s"] is None
    # Same weights under dense and flex (no window): the same predictions.
    assert summary["flex"]["score_mean"] == pytest.approx(summary["dense"]["score_mean"])
    assert summary["flex"]["score_diff_vs_dense"] == pytest.approx(0.0, abs=1e-9)
    # The table shows the summary's numbers: dense's training rate, a dash where nothing trained.
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows[:3]]
    assert cells[0][4] == f"{summary['dense']['train_examples_per_s']:.1f}" and cells[1][4] == cells[2][4] == "—"
    assert [c[5] for c in cells] == [f"{summary[b]['eval_examples_per_s']:.1f}" for b in ("dense", "flex", "flex:8")]
    assert (out / "runs" / "sst2" / "dense-train" / "seed2" / "best" / "config.json").is_file()


def test_compare_rejects_bad_arguments_in_one_line(tmp_path):
    main = cli_main("compare")

    ckpt = make_checkpoint(tmp_path / "ckpt")
    write_glue("sst2", tmp_path / "glue")
    common = ["--checkpoint", ckpt, "--data-dir", tmp_path / "glue", "--output-dir", tmp_path / "o"]
    assert_one_line_error_text(*call_main(main, *common, "--tasks", "sst2", "--backends", "dense,sparse"), "unknown backend 'sparse'")
    assert_one_line_error_text(*call_main(main, *common, "--tasks", "sst2", "--seeds", "1,x"), "--seeds")
    assert_one_line_error_text(*call_main(main, *common, "--tasks", "sst2,nope"), "unknown task 'nope'")
    assert_one_line_error_text(*call_main(main, *common, "--tasks", "sst2", "--backends", "flex,flex"), "twice")
    assert not (tmp_path / "o").exists()
