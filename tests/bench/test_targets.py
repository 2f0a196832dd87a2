"""The targets table of `benchmark-mpnet all`: each verdict against the figures it compares, on cells shaped
as the attention and step sections write them (a GPU run's), and 'not measured' where they did not run."""
from __future__ import annotations

from types import SimpleNamespace

from mpnet.bench.report import Section
from mpnet.bench.targets import TARGETS, TargetSettings, flex_pair, flex_step, step_mfu, triton_pair


def section(key, cells, **settings):
    return Section(key, key, SimpleNamespace(**settings), lambda s: [], lambda s: [],
                   cells=[{"status": "ok", **c} for c in cells])


def step_cell(model, batch, ms, mfu, compiled=True):
    return {"key": f"{model}{'+compile' if compiled else ''}@{batch}", "batch": batch, "seq_len": 512, "ms": ms,
            "mfu": mfu, "compile": compiled}


STEP = section("step", [step_cell("bert-sparse", 32, 45.0, 0.30), step_cell("mpnet-triton", 32, 50.0, 0.28),
                        step_cell("mpnet-flex", 32, 90.0, 0.15), step_cell("mpnet-triton", 32, 80.0, 0.17, False),
                        step_cell("mpnet-flex", 32, 110.0, 0.12, False),
                        step_cell("bert-sparse", 32, 40.0, 0.34, False),
                        step_cell("bert-sparse", 64, 88.0, 0.31), step_cell("mpnet-triton", 64, 76.0, 0.36)])
ATTENTION = section("attention", [{"L": length, "backend": backend, "ms": ms} for length, backend, ms in (
    (512, "sdpa", 1.0), (512, "triton", 1.2), (512, "flex", 5.0), (2048, "sdpa", 2.0), (2048, "triton", 2.8),
    (2048, "flex", 7.0))], backward=True)
GOALS = TargetSettings()


def test_step_mfu_against_the_sparse_bert_per_batch_and_the_best_batch_against_35_percent():
    rows = step_mfu({"step": STEP}, GOALS)
    assert [row["verdict"] for row in rows] == ["NOT met", "NOT met", "met", "met"]
    assert "B=32x512" in rows[0]["target"] and rows[0]["measured"] == "17.0% vs 34.0% (eager)"
    assert rows[1]["measured"] == "28.0% vs 30.0% (compiled)" and rows[1]["note"] == "step time 1.11x BERT's"
    assert rows[3]["measured"] == "36.0% at B=64 (compiled)" and rows[3]["goal"] == ">= 35%"


def test_attention_pairs_against_flash_at_every_length():
    assert [row["verdict"] for row in triton_pair({"attention": ATTENTION}, GOALS)] == ["met", "NOT met"]  # 1.2, 1.4
    flex = flex_pair({"attention": ATTENTION}, GOALS)
    assert [row["verdict"] for row in flex] == ["NOT met", "met"] and flex[0]["measured"].startswith("5.00x")
    # a run with --flex-variants / --triton-tiles: the targets read each backend's "default" entry
    variants = section("attention", [{"L": 512, "backend": backend, "ms": ms} for backend, ms in (
        ("sdpa", 1.0), ("flex/copies=16x16", 3.0), ("flex/default", 5.0), ("triton/default", 1.2))], backward=True)
    assert flex_pair({"attention": variants}, GOALS)[0]["measured"].startswith("5.00x")
    assert triton_pair({"attention": variants}, GOALS)[0]["verdict"] == "met"


def test_flex_step_against_triton_in_the_same_compile_mode():
    rows = flex_step({"step": STEP}, GOALS)
    assert [(row["measured"][:5], row["verdict"]) for row in rows] == [("1.38x", "met"), ("1.80x", "NOT met")]
    assert "(eager)" in rows[0]["target"] and "(compiled)" in rows[1]["target"]


def test_rows_say_when_the_step_section_compiled_by_layers():
    by_layers = section("step", STEP.cells, compile_scope="layers")
    assert "(compiled by layers)" in flex_step({"step": by_layers}, GOALS)[1]["target"]
    rows = step_mfu({"step": by_layers}, GOALS)
    assert rows[0]["measured"].endswith("(eager)") and rows[1]["measured"].endswith("(compiled by layers)")


def test_missing_or_cpu_sections_are_not_measured():
    cpu_attention = section("attention", ATTENTION.cells, backward=False)
    cpu_step = section("step", [{**c, "mfu": None} for c in STEP.cells])
    for sections in ({}, {"attention": cpu_attention, "step": section("step", [])}):
        rows = [row for target in TARGETS for row in target(sections, GOALS)]
        assert rows and all(row["verdict"] == "not measured" and row["note"] for row in rows)
    assert [row["verdict"] for row in step_mfu({"step": cpu_step}, GOALS)] == ["not measured"]
