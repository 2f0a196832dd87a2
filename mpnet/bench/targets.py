"""The performance targets, checked from the cells of one `benchmark-mpnet all` run: its last section.

Each target is a small named function of the report's sections that returns rows (what was compared,
the figure, the goal, met or not); where its cells did not run, or ran where the target does not apply
(a CPU: no MFU, attention forward only), the row says so instead of a verdict. The goals are those of
the performance round (docs/benchmarks.md): the sparse-head BERT-base step as the yardstick of MPNet's
MFU and 35% at the best micro-batch, the triton attention pair within 1.3x SDPA flash, the flex pair
within 4x and the flex step within 1.5x of the triton one.
"""
from __future__ import annotations

from dataclasses import dataclass

from .report import Section, Table, ok

NOT_MEASURED = "not measured"


@dataclass
class TargetSettings:
    """The goals (each row of the section compares one figure with one of these)."""

    mfu: float = 0.35  # mpnet-base step MFU at its best micro-batch
    pair_vs_flash: float = 1.3  # triton two-stream pair time / SDPA flash time, at every length
    flex_pair_vs_flash: float = 4.0  # the same for flex
    flex_step_vs_triton: float = 1.5  # flex step time / triton step time, same batch and compile mode
    device: str | None = None

    def validate(self, device):
        pass


def _cells(sections: dict, key: str) -> list:
    section = sections.get(key)
    return [c for c in section.cells if ok(c)] if section is not None else []


def _row(what: str, figure: str, goal: str, met: bool | None, note: str = "") -> dict:
    verdict = NOT_MEASURED if met is None else ("met" if met else "NOT met")
    return {"target": what, "measured": figure, "goal": goal, "verdict": verdict, "note": note}


def _mode(cell: dict, sections: dict) -> str:
    """eager, compiled, or compiled by layers (the step section's --compile-scope: the mode changes the yardstick,
    a sparse-head BERT compiled as one graph being slower than eager and by layers faster)."""
    if not cell["compile"]:
        return "eager"
    by_layers = getattr(sections["step"].settings, "compile_scope", "model") == "layers"
    return "compiled by layers" if by_layers else "compiled"


def step_mfu(sections: dict, goals: TargetSettings) -> list:
    """mpnet-base (triton) MFU against the sparse-head BERT's at each micro-batch, in each compile mode both ran
    (compiling helps them differently: one mode alone could flatter either), and the best one >= goal."""
    cells = _cells(sections, "step")
    at = {c["key"]: c for c in cells}
    rows, best = [], None
    for batch in sorted({c["batch"] for c in cells}):
        for suffix in ("", "+compile"):
            mpnet, bert = at.get(f"mpnet-triton{suffix}@{batch}"), at.get(f"bert-sparse{suffix}@{batch}")
            if mpnet is None or mpnet.get("mfu") is None:
                continue
            if best is None or mpnet["mfu"] > best["mfu"]:
                best = mpnet
            if bert is not None:
                rows.append(_row(f"mpnet-base step MFU >= sparse-head BERT-base's, B={batch}x{mpnet['seq_len']}",
                                 f"{100 * mpnet['mfu']:.1f}% vs {100 * bert['mfu']:.1f}% ({_mode(mpnet, sections)})",
                                 ">= BERT's", mpnet["mfu"] >= bert["mfu"],
                                 f"step time {mpnet['ms'] / bert['ms']:.2f}x BERT's"))
    if best is None:
        return [_row("mpnet-base step MFU (triton)", "", f">= {100 * goals.mfu:.0f}%", None,
                     "needs the step section's triton cells on a GPU (MFU is relative to a GPU's peak)")]
    return rows + [_row("mpnet-base step MFU at its best micro-batch (triton)",
                        f"{100 * best['mfu']:.1f}% at B={best['batch']} ({_mode(best, sections)})",
                        f">= {100 * goals.mfu:.0f}%", best["mfu"] >= goals.mfu)]


def _pair_ratio(sections: dict, backend: str, goal: float, name: str) -> list:
    section = sections.get("attention")
    cells = _cells(sections, "attention")
    if section is None or not section.settings.backward:
        return [_row(f"{name} pair / SDPA flash", "", f"<= {goal:g}x", None,
                     "needs the two-stream attention section forward + backward (a GPU)")]
    rows = []
    for length in sorted({c["L"] for c in cells}):
        at = {c["backend"]: c for c in cells if c["L"] == length}
        cell = at.get(backend) or at.get(f"{backend}/default")  # with --triton-tiles / --flex-variants: "default"
        if cell is not None and "sdpa" in at:
            ratio = cell["ms"] / at["sdpa"]["ms"]
            rows.append(_row(f"{name} pair / SDPA flash, L={length}", f"{ratio:.2f}x ({cell['ms']:.2f} / "
                             f"{at['sdpa']['ms']:.2f} ms)", f"<= {goal:g}x", ratio <= goal))
    return rows or [_row(f"{name} pair / SDPA flash", "", f"<= {goal:g}x", None, f"no {backend} and sdpa cells")]


def triton_pair(sections: dict, goals: TargetSettings) -> list:
    return _pair_ratio(sections, "triton", goals.pair_vs_flash, "triton")


def flex_pair(sections: dict, goals: TargetSettings) -> list:
    return _pair_ratio(sections, "flex", goals.flex_pair_vs_flash, "flex")


def flex_step(sections: dict, goals: TargetSettings) -> list:
    """The flex step against the triton one, same batch and compile mode."""
    cells = _cells(sections, "step")
    at = {c["key"]: c for c in cells}
    rows = []
    for batch in sorted({c["batch"] for c in cells}):
        for compiled in (False, True):
            suffix = ("+compile" if compiled else "") + f"@{batch}"
            flex, triton = at.get("mpnet-flex" + suffix), at.get("mpnet-triton" + suffix)
            if flex and triton:
                ratio = flex["ms"] / triton["ms"]
                rows.append(_row(f"flex step / triton step, B={batch}x{flex['seq_len']} ({_mode(flex, sections)})",
                                 f"{ratio:.2f}x ({flex['ms']:.1f} / {triton['ms']:.1f} ms)",
                                 f"<= {goals.flex_step_vs_triton:g}x", ratio <= goals.flex_step_vs_triton))
    return rows or [_row("flex step / triton step", "", f"<= {goals.flex_step_vs_triton:g}x", None,
                         "needs the step section's flex and triton cells (a GPU)")]


TARGETS = (step_mfu, triton_pair, flex_pair, flex_step)


def _tables(section: Section) -> list:
    rows = [[c["target"], c["measured"], c["goal"], c["verdict"], c["note"]] for c in section.cells]
    return [Table(["target", "measured", "goal", "verdict", "note"], rows)]


def _method(section: Section) -> list:
    return ["- Each row compares figures of the sections above, of this run (same device, same commit): "
            "step MFU from the analytic count (the step section shows torch's FlopCounterMode count beside it), "
            "each compile mode that ran; attention pair times are the median ms of forward + backward."]


def run_targets(session, settings: TargetSettings, deadline=None) -> Section:
    """The Targets section: every TARGETS function over the sections this run measured."""
    section = Section("targets", "Targets", settings, _method, _tables)
    measured = {s.key: s for s in session.report.sections}
    session.open(section)
    for target in TARGETS:
        section.cells += target(measured, settings)
    session.finish(section)
    return section
