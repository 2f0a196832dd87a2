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
    assert len(report["runs"]) == 6  # 3 backends x 2 seeds, from 2 dense trainings
    summary = {row["backend"]: row for row in report["summary"]}
    # Same weights under dense and flex (no window): the same predictions.
    assert summary["flex"]["score_mean"] == pytest.approx(summary["dense"]["score_mean"])
    assert summary["flex"]["score_diff_vs_dense"] == pytest.approx(0.0, abs=1e-9)
    assert summary["dense"]["train_examples_per_s"] > 0 and summary["flex"]["train_examples_per_s"] is None
    assert all(row["eval_examples_per_s"] > 0 for row in summary.values())
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
