"""The benchmark report, written here for every benchmark: the environment it ran in, the progress line,
the tables (markdown) and plots, and DIR/STEM.md + .json. mpnet/bench/harness.py runs the cells; a
benchmark module says what its section holds (`Section`: method lines, `Table`s and `Figure`s built from
its cells) and this module writes it.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch._dynamo

from ..errors import UserError
from ..outputs import versions, write_json_atomic, write_text_atomic

GiB = 2**30


def ok(cell: dict) -> bool:
    return cell.get("status") == "ok"


# ------------------------------------------------------------------------------------ environment


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / GiB:.0f} GiB, {props.multi_processor_count} SMs)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment(device: torch.device) -> dict:
    """Date, device, versions and the command line: printed first and written into every report."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device_description(device)}
    info.update({k: v for k, v in versions().items() if k != "device_name"})
    try:
        info["triton"] = __import__("triton").__version__
    except ImportError:
        info["triton"] = "not installed"
    info["command"] = " ".join(["benchmark-mpnet"] + sys.argv[1:])
    settings = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MPNET_"))
    if settings:  # the project's MPNET_* switches change what is measured
        info["environment variables"] = " ".join(settings)
    return info


ENVIRONMENT_KEYS = ("date", "device", "mpnet", "torch", "cuda", "triton", "transformers", "python", "command",
                    "environment variables", "resumed_from")


def print_header(env: dict, settings_list, log=print):
    """The environment, then every settings dataclass of the run, field by field."""
    log("benchmark-mpnet")
    for key in ENVIRONMENT_KEYS:
        if key in env:
            log(f"  {key:<12} {env[key]}")
    for settings in settings_list:
        log(f"  {type(settings).__name__}:")
        for key, value in dataclasses.asdict(settings).items():
            log(f"    {key:<18} {value}")
    sys.stdout.flush()


# ------------------------------------------------------------------------------ progress and tables


def tflops_text(value) -> str:
    """TFLOP/s with a precision that stays readable from CPU (0.004) to GPU (512.3) figures."""
    if value is None:
        return ""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def fmt(value, spec=".2f", missing="—") -> str:
    return missing if value is None else format(value, spec)


def ratio_text(value) -> str:
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"  # CPU smoke runs give ratios like 0.004x


def tiles_text(tiles) -> str:
    computed, total = tiles
    return f"{computed}/{total} ({computed / total:.3f})"


# What the progress line shows of an ok cell, in this order, each where the cell has it.
PROGRESS_FIELDS = (
    ("ms", lambda v: f"{v:9.3f} ms"),
    ("tflops", lambda v: f"{tflops_text(v):>7} TFLOP/s"),
    ("examples_per_s", lambda v: f"{v:9.1f} ex/s"),
    ("tokens_per_s", lambda v: f"{v:10.0f} tokens/s"),
    ("padding_share", lambda v: f"padding {100 * v:4.1f}%"),
    ("loss", lambda v: f"loss {v:.3f}"),
    ("peak_gib", lambda v: f"peak {v:6.2f} GiB"),
    ("first_call_s", lambda v: f"first call {v:.1f} s"),
    ("tiles", lambda v: f"tiles {tiles_text(v)}"),
    ("graph_ms", lambda v: f"graph {v:.3f} ms"),  # --cuda-graphs: in the log too, where a cut run leaves only that
    ("graph_status", str),
    ("relative", lambda v: f"{ratio_text(v[0])} {v[1]}"),
)


def progress_line(cell: dict) -> str:
    """One line per cell, for every benchmark: its name, then its status or its figures."""
    if not ok(cell):
        text = f"{cell['name']} {cell['status']}" + (f" (at {cell['raised_at']})" if cell.get("raised_at") else "")
    else:
        parts = [show(cell[key]) for key, show in PROGRESS_FIELDS if cell.get(key) is not None]
        if "mask_ms" in cell:
            parts.append(f"mask {cell['mask_ms']:.2f} ms (first {cell['mask_first_s']:.1f} s)")
        text = " ".join([cell["name"]] + parts)
    if cell.get("resumed"):
        text += "  [from the earlier run]"
    if cell.get("note"):
        text += f"  [{cell['note']}]"
    return text


def time_text(cell: dict, spec=".3f") -> str:
    """Table text of a cell's time: median [p20, p80], or its status."""
    if not ok(cell):
        return cell["status"]
    return f"{cell['ms']:{spec}} [{cell['p20_ms']:{spec}}, {cell['p80_ms']:{spec}}]"


CELL_HEADERS = ["time ms median [p20, p80]", "TFLOP/s", "tiles computed/total (share)", "eff. TFLOP/s", "peak GiB",
                "mask build ms (first s)", "first call s"]


def cell_columns(cell: dict) -> list:
    """The columns of CELL_HEADERS for one attention cell (blank where it has no such figure)."""
    if not ok(cell):
        return [cell["status"]] + [""] * (len(CELL_HEADERS) - 1)
    return [time_text(cell), tflops_text(cell.get("tflops")), tiles_text(cell["tiles"]) if "tiles" in cell else "",
            tflops_text(cell.get("eff_tflops")), fmt(cell.get("peak_gib"), ".2f", "n/a"),
            f"{cell['mask_ms']:.2f} ({cell['mask_first_s']:.1f} s)" if "mask_ms" in cell else "",
            fmt(cell.get("first_call_s"), ".1f")]


def short_status(cell: dict) -> str:
    """Table text of a cell that did not run: OOM, FAIL, SKIP, n/a."""
    return cell["status"].split(":")[0]


def github_table(rows, headers) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def failure_notes(cells) -> list:
    notes = [f"- {cell['name'].strip()}: {cell['status']}"
             + (f" (after {cell['failed_after_s']:.0f} s)" if cell.get("failed_after_s") else "")
             + f"\n  `{cell['error']}`"
             + (f"\n  raised at `{cell['raised_at']}`" if cell.get("raised_at") else "")
             for cell in cells if cell.get("error")]
    return ["Failures (full messages):", ""] + notes + [""] if notes else []


# ---------------------------------------------------------------------------------- report sections


@dataclass
class Table:
    """A table of a section: markdown under an optional heading, notes after it."""

    headers: list
    rows: list
    title: str | None = None
    notes: list = field(default_factory=list)  # markdown lines after the table
    printed: bool = True  # also printed when the section ends (False: in the report file only)

    def lines(self) -> list:
        heading = [f"### {self.title}", ""] if self.title else []
        return heading + [github_table(self.rows, self.headers), ""] + (self.notes + [""] if self.notes else [])


@dataclass
class Section:
    """One benchmark's part of a report: its settings and cells, and what the report shows of them."""

    key: str  # its JSON key: attention, single, step, finetune, patterns, packing, masks
    title: str  # its heading in the markdown report
    settings: object  # a dataclass
    method: Callable[["Section"], list]  # markdown lines (bullets): how it measures, from its settings
    tables: Callable[["Section"], list]  # its Tables, from its cells
    figures: Callable[["Section"], list] | None = None  # its Figures, from its cells
    cells: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # more JSON beside settings and cells (e.g. the inputs)
    plots: list = field(default_factory=list)
    plotted: int = 0  # cells when last plotted

    def to_json(self) -> dict:
        return {"settings": dataclasses.asdict(self.settings), **self.extra, "cells": self.cells}

    def table_lines(self, printed_only: bool = False) -> list:
        return [line for table in self.tables(self) if table.printed or not printed_only for line in table.lines()]

    def markdown(self) -> list:
        options = getattr(self.settings, "flex_kernel_options", None)
        overridden = ([f"**flex kernel_options overridden by the benchmark** (`--flex-kernel-options`): `{options}`; "
                       "the project's flex backend passes its own.", ""] if options else [])
        return (["", f"## {self.title}", ""] + settings_lines(self.settings) + overridden
                + ["Method:", ""] + self.method(self) + [""] + self.table_lines() + failure_notes(self.cells)
                + [line for name in self.plots for line in (f"![{name}]({name})", "")])


def settings_lines(settings) -> list:
    return ["Settings:", ""] + [f"- `{k}`: {v}" for k, v in dataclasses.asdict(settings).items()] + [""]


class Report:
    """DIR/STEM.md and DIR/STEM.json (and the sections' plots), rewritten after every cell, so a run
    that is cut short (or killed) keeps what it measured and --resume can go on from there."""

    def __init__(self, out_dir, stem: str, env: dict):
        self.dir = Path(out_dir) if out_dir else None
        self.stem, self.env, self.sections = stem, env, []
        if self.dir is not None:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UserError(f"cannot create --output-dir {self.dir}: {err.strerror}") from None

    @property
    def json_path(self) -> Path | None:
        return None if self.dir is None else self.dir / f"{self.stem}.json"

    def earlier_cells(self, section: Section) -> dict:
        """--resume: the section's cells of DIR/STEM.json, by key, if that run had the same settings
        (SKIP cells left out: they are measured now)."""
        if self.dir is None:
            raise UserError("--resume needs --output-dir (the run to resume is DIR/" + f"{self.stem}.json)")
        if not self.json_path.is_file():
            return {}
        data = json.loads(self.json_path.read_text())
        earlier = data.get(section.key)
        if earlier is None:
            return {}
        ours = json.loads(json.dumps(dataclasses.asdict(section.settings), default=str))
        theirs = earlier.get("settings", {})
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if differ:
            raise UserError(f"--resume: {self.json_path} has {section.key} cells measured with other settings "
                            f"(they differ in {', '.join(differ)}); give the same options or another --output-dir")
        self.env["resumed_from"] = data.get("environment", {}).get("date")
        return {cell["key"]: cell for cell in earlier.get("cells", []) if not cell["status"].startswith("SKIP")}

    def write(self, plot: bool = False):
        if self.dir is None:
            return
        if plot:  # only what changed since its last plot: plotting takes seconds on a CPU
            for section in self.sections:
                if section.figures is not None and section.cells and section.plotted != len(section.cells):
                    section.plots = [write_figure(figure, self.dir) for figure in section.figures(section)]
                    section.plotted = len(section.cells)
        data = {"environment": self.env, **{s.key: s.to_json() for s in self.sections}}
        write_json_atomic(self.json_path, data)
        write_text_atomic(self.dir / f"{self.stem}.md", self.markdown())

    def markdown(self) -> str:
        title = "benchmark-mpnet" + ("" if self.stem == "benchmark" else f" {self.stem}")
        out = [f"# {title}: {self.env['date']}", "", "| | |", "|---|---|"]
        out += [f"| {key} | `{self.env[key]}` |" for key in ENVIRONMENT_KEYS if key in self.env]
        out += [line for section in self.sections for line in section.markdown()]
        return "\n".join(out) + "\n"

    def files(self) -> list:
        if self.dir is None:
            return []
        return [self.dir / f"{self.stem}.md", self.json_path] + [self.dir / p for s in self.sections for p in s.plots]




# ------------------------------------------------------------------------------------------- plots


@dataclass
class Panel:
    """One plot of a figure: lines (x, y) per label, or groups of bars (one group per category, one bar per
    label). A bar's value may be a text (OOM, n/a, ...), written where its bar would stand."""

    title: str = ""
    ylabel: str = ""
    xlabel: str = ""
    lines: dict | None = None  # label -> [(x, y), ...]
    failed: dict = field(default_factory=dict)  # lines: label -> [(x, text)], marked at the top of the panel
    categories: list | None = None  # bars: the groups, left to right
    bars: dict | None = None  # label -> a value (or text, or None: no bar) per category
    bar_notes: dict = field(default_factory=dict)  # label -> a text above each bar ("" for none)
    ceiling: tuple | None = None  # (label, y): a dashed horizontal line
    log_x: int | None = None  # the x axis' log base (None: linear)
    log_y: bool = False
    y_limits: tuple | None = None
    empty: str = "no data"  # written on a panel with nothing to draw


@dataclass
class Figure:
    """A PNG of the report: panels side by side under one title, one legend."""

    name: str  # the file name, e.g. attention_time.png
    panels: list
    title: str = ""
    size: tuple = (7, 4.5)  # inches


def write_figure(figure: Figure, out_dir: Path) -> str:
    """Draw `figure` into out_dir (matplotlib, no display); returns its file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(figure.panels), figsize=figure.size, dpi=110, squeeze=False)
    for ax, panel in zip(axes[0], figure.panels):
        _draw_lines(ax, panel) if panel.lines is not None else _draw_bars(ax, panel)
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
    legend = {}  # one entry per label across the panels
    for ax in axes[0]:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    top = 1.0
    if len(figure.panels) > 1 and legend:  # above the panels, where it hides nothing
        fig.legend(legend.values(), legend.keys(), loc="upper center", ncol=min(4, len(legend)), fontsize=8,
                   bbox_to_anchor=(0.5, 0.94))
        top = 0.86
    elif legend:
        axes[0][0].legend(fontsize=8)
    if figure.title:
        fig.suptitle(figure.title, fontsize=9)
        top = min(top, 0.94)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(out_dir / figure.name)
    plt.close(fig)
    return figure.name


def _draw_lines(ax, panel: Panel):
    colors = {}
    for label, points in panel.lines.items():
        if points:
            line, = ax.plot(*zip(*points), marker="o", label=label)
            colors[label] = line.get_color()
    if panel.log_x:
        ax.set_xscale("log", base=panel.log_x)
    if panel.log_y:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    if not colors:
        ax.text(0.5, 0.5, panel.empty, transform=ax.transAxes, ha="center")
        return
    top = ax.get_ylim()[1]  # where a drawn label ran out of memory or failed: at the top of the plot
    for label, marks in panel.failed.items():
        for x, text in marks if label in colors else ():
            ax.scatter([x], [top], marker="x", color=colors[label])
            ax.annotate(text, (x, top), fontsize=7, color=colors[label], ha="center", va="top", xytext=(0, -6),
                        textcoords="offset points")


def _draw_bars(ax, panel: Panel):
    numbers = [v for values in panel.bars.values() for v in values if isinstance(v, (int, float))]
    floor = (min(numbers) / 3 if numbers else 1.0) if panel.log_y else 0.0
    width = 0.8 / max(1, len(panel.bars))
    for k, (label, values) in enumerate(panel.bars.items()):
        notes = panel.bar_notes.get(label, [""] * len(values))
        for i, (value, note) in enumerate(zip(values, notes)):
            x = i + (k - (len(panel.bars) - 1) / 2) * width
            if isinstance(value, str):
                ax.text(x, floor * 1.1 if panel.log_y else 0, value, rotation=90, ha="center", va="bottom",
                        fontsize=7, color=f"C{k}")
            elif value is not None:
                ax.bar(x, value, width, color=f"C{k}", label=label)
                if note:
                    ax.annotate(note, (x, value), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                                textcoords="offset points")
    if panel.ceiling is not None:
        ax.axhline(panel.ceiling[1], color="black", linestyle="--", linewidth=1, label=panel.ceiling[0])
    if panel.log_y:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
    if panel.y_limits is not None:
        ax.set_ylim(*panel.y_limits)
    ax.set_xticks(range(len(panel.categories)))
    tilted = sum(len(str(c)) for c in panel.categories) > 12 * max(3, len(panel.categories))  # else they overlap
    ax.set_xticklabels(panel.categories, rotation=40 if tilted else 0, ha="right" if tilted else "center",
                       fontsize=7 if tilted else 8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    if not numbers:
        ax.text(0.5, 0.5, panel.empty, transform=ax.transAxes, ha="center")
