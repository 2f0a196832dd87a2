"""What every benchmark shares (mpnet/bench/harness.py): device and dtype checks, failure-to-cell, the
time budget, the progress line, the one report writer and --resume. Fast: no model runs."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from mpnet.bench import harness
from mpnet.bench.harness import Deadline, Session, Timer, failure, phase
from mpnet.bench.report import Report, Section, Table, progress_line
from mpnet.errors import UserError

CPU = torch.device("cpu")


@dataclass
class Toy:
    size: int = 4
    device: str = "cpu"

    def validate(self, device):
        if self.size < 1:
            raise UserError("--size must be positive")


def toy_section(settings=None) -> Section:
    return Section("toy", "Toy cells", settings or Toy(), method=lambda s: ["- toy cells"],
                   tables=lambda s: [Table(["cells"], [[f"{len(s.cells)} cells"]])])


def session(tmp_path, resume=False, seconds=None) -> Session:
    env = {"date": "2026-01-01 00:00 UTC", "device": "CPU", "torch": torch.__version__}
    return Session(CPU, Report(tmp_path, "toy", env), Deadline(seconds), log=lambda line: None, resume=resume)


def raise_in(name, exc):
    with phase(name):
        raise exc


def test_failures_become_cells():
    with pytest.raises(RuntimeError) as info:
        raise_in("backward", RuntimeError("boom\nsecond line"))
    assert failure(info.value) == ("FAIL (backward): RuntimeError: boom", "RuntimeError: boom second line")
    assert failure(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried"))[0] == "OOM"
    # inductor's compile workers: an announcement, the worker's traceback, its reason on the last line
    from torch._inductor.compile_worker.subproc_pool import SubprocException
    worker = SubprocException("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                              "triton.compiler.errors.CompilationError: at 12:4: out of registers\n")
    with pytest.raises(SubprocException) as info:
        raise_in("backward", worker)
    assert failure(info.value)[0] == ("FAIL (backward): SubprocException: "
                                      "triton.compiler.errors.CompilationError: at 12:4: out of registers")
    for message in ("out of resource: shared memory, Required: 242000, Hardware limit: 232448. Reducing block",
                    "out of resource: triton_tem_fused_0 Required: 242000 Hardware limit:232448 Reducing block"):
        try:
            try:
                raise ValueError(message)
            except ValueError as inner:
                raise RuntimeError("compile failed") from inner
        except RuntimeError as exc:
            assert failure(exc)[0] == "FAIL: triton kernel needs 242000 B shared memory > 232448"


def test_session_measures_skips_and_records(tmp_path):
    s = session(tmp_path)
    section = toy_section()
    s.open(section)
    s.measure(section, {"key": "a", "name": "cell a"}, lambda: {"ms": 2.0, "p20_ms": 1.0, "p80_ms": 3.0, "tflops": 0.5})
    s.measure(section, {"key": "b", "name": "cell b"}, lambda: raise_in("forward", RuntimeError("no kernel")))
    s.measure(section, {"key": "c", "name": "cell c", "status": "n/a: not here"})
    s.measure(section, {"key": "d", "name": "cell d"}, lambda: {"ms": 1.0}, deadline=Deadline(-1))
    assert [c["status"] for c in section.cells] == ["ok", "FAIL (forward): RuntimeError: no kernel", "n/a: not here",
                                                    "SKIP: time budget"]
    assert progress_line(section.cells[0]) == "cell a     2.000 ms     0.5 TFLOP/s"
    graphed = {**section.cells[0], "graph_ms": 1.25}
    assert progress_line(graphed) == "cell a     2.000 ms     0.5 TFLOP/s graph 1.250 ms"
    failed = {**section.cells[0], "graph_status": "capture failed: RuntimeError: no"}
    assert progress_line(failed).endswith("TFLOP/s capture failed: RuntimeError: no")
    data = json.loads((tmp_path / "toy.json").read_text())
    assert data["environment"]["device"] == "CPU" and data["toy"]["settings"] == {"size": 4, "device": "cpu"}
    assert [c["key"] for c in data["toy"]["cells"]] == ["a", "b", "c", "d"]
    md = (tmp_path / "toy.md").read_text()
    assert md.startswith("# benchmark-mpnet toy: 2026-01-01") and "## Toy cells" in md and "4 cells" in md
    assert "Failures (full messages):" in md and "no kernel" in md


def test_resume_keeps_measured_cells_and_refuses_other_settings(tmp_path):
    first = session(tmp_path)
    section = toy_section()
    first.open(section)
    first.measure(section, {"key": "a", "name": "a"}, lambda: {"ms": 2.0})
    first.measure(section, {"key": "b", "name": "b"}, lambda: {"ms": 2.0}, deadline=Deadline(-1))  # SKIP
    again = session(tmp_path, resume=True)
    section = toy_section()
    again.open(section)
    calls = []
    for key in ("a", "b"):
        again.measure(section, {"key": key, "name": key}, lambda: calls.append(1) or {"ms": 1.0})
    assert len(calls) == 1 and section.cells[0]["resumed"] and section.cells[0]["ms"] == 2.0
    assert section.cells[1]["status"] == "ok" and "resumed" not in section.cells[1]
    with pytest.raises(UserError, match="differ in size"):
        session(tmp_path, resume=True).open(toy_section(Toy(size=5)))
    with pytest.raises(UserError, match="--resume needs --output-dir"):
        Session(CPU, Report(None, "toy", {}), resume=True, log=lambda line: None).open(toy_section())


def test_timer_runs_at_least_three_and_at_most_repeats():
    calls = []
    times, peak = Timer(CPU).measure(lambda: calls.append(1), repeats=1, max_seconds=0.0)
    assert len(times) == len(calls) == 3 and peak is None
    times, _ = Timer(CPU).measure(lambda: None, repeats=7, max_seconds=60.0)
    assert len(times) == 7


def test_device_and_dtype_checks():
    assert harness.open_device("cpu") == CPU
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        harness.open_device("gpu")
    with pytest.raises(UserError, match="--dtype bf16 needs a CUDA device"):
        harness.check_dtype("bf16", CPU)
    if not torch.cuda.is_available():
        with pytest.raises(UserError) as info:
            harness.open_device("cuda:1")
        assert "pass --device cpu" in str(info.value) and "--quick" in str(info.value)


def test_a_compiling_first_call_records_where_its_time_went():
    """time_runs' first call records torch's compile phases (compile_phases_s) when it compiles, nothing when
    it does not; the step report lists a compiled cell's phases, longest first."""
    from mpnet.bench.step import compile_phase_tables

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: (x.sin() * 2 + 1).sum(), backend="aot_eager")
    x = torch.randn(16)
    timer = Timer(torch.device("cpu"))
    first = harness.time_runs(timer, lambda: compiled(x), 0, 3, 1.0)
    phases = first["compile_phases_s"] if "compile_phases_s" in first else {}
    with harness.compile_phases({}, at_least_s=0.0) as recorded:
        torch._dynamo.reset()
        compiled(x)
    assert recorded and all(s >= 0 for s in recorded.values())
    assert list(recorded.values()) == sorted(recorded.values(), reverse=True)
    assert all(s >= 0.5 for s in phases.values())  # the cell keeps phases of 0.5 s or more only
    again = harness.time_runs(timer, lambda: compiled(x), 0, 3, 1.0)  # compiled already: nothing recorded
    assert "compile_phases_s" not in again
    cells = [{"name": "MPNet-base triton +compile B=32", "compile": True, "status": "ok", "first_call_s": 138.4,
              "compile_phases_s": {"_compile.compile_inner": 130.0, "async_compile.wait": 90.5}},
             {"name": "BERT-base sdpa B=32", "compile": False, "status": "ok", "first_call_s": 1.5}]
    (table,) = compile_phase_tables(cells)
    assert table.rows == [["MPNet-base triton +compile B=32", "138.4", "async_compile.wait 90.5"]]  # the wrapper left out


def test_a_failed_cell_says_where_it_was_raised(tmp_path):
    """A FAIL cell keeps the innermost frames of the exception that failed it (`raised_at`, package paths, no
    machine paths), in the progress line and in the report's failure notes: the message alone ("shape '[616,
    768]' is invalid for input of size 0") does not say which part of the step raised it."""
    def view_of_nothing():
        return torch.empty(0).view(616, 768)

    def measure():
        with phase("backward"):
            view_of_nothing()

    s = session(tmp_path)
    section = toy_section()
    s.open(section)
    lines = []
    s.log = lines.append
    cell = s.measure(section, {"key": "a", "name": "cell a"}, measure)
    assert cell["status"].startswith("FAIL (backward): RuntimeError: shape '[616, 768]' is invalid")
    innermost, caller = cell["raised_at"].split(" <- ")[:2]
    assert innermost.startswith("tests/bench/test_bench_harness.py:") and innermost.endswith(" view_of_nothing")
    assert caller.endswith(" measure") and "/work" not in cell["raised_at"] and "/root" not in cell["raised_at"]
    assert f"(at {cell['raised_at']})" in lines[-1]
    s.report.write()
    assert f"raised at `{cell['raised_at']}`" in (tmp_path / "toy.md").read_text()
