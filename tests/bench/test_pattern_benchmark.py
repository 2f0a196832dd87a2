"""`benchmark-mpnet patterns` (mpnet/bench/patterns.py): what its columns compute, and a CPU smoke run.

- Not a timing: for every pattern the benchmark times, its flex cell (the real module, the BlockMask
  from the pattern's mask_mod) and its SDPA cell (the mask it materialises for SDPA) give the same
  output from the same q, k, v, with the relative bias switched off or zero in both, and that SDPA
  mask is the dense backend's own mask. So the two columns time the same attention.
- The command end to end on CPU at tiny sizes: report files, a number or an explained n/a in every
  cell, --resume, and one-line errors for a bad pattern.
"""
from __future__ import annotations

import json

import pytest
import torch

from mpnet.bench.harness import Timer
from mpnet.modeling.attention import make_dense_attention_state
from mpnet.bench.patterns import (
    QUICK_PATTERNS,
    PatternSettings,
    build_cell,
    case_inputs,
    make_pattern_problem,
    resolve_pattern,
    sdpa_mask,
)
from cli_support import run_cli

CPU = torch.device("cpu")
LENGTH = 256  # two 128-row tiles per side: block patterns leave whole tiles out
ENTRIES = QUICK_PATTERNS.split(",") + ["prefix:100", "global:8:0:130", "block:64+alibi", "documents:3+window:8",
                                       "alibi+softcap:5"]


def _settings(relative_bias):
    return PatternSettings(lengths=[LENGTH], tokens_per_batch=2 * LENGTH, heads=4, head_dim=8, dtype="fp32",
                           device="cpu", backward=False, relative_bias=relative_bias, warmup=1, repeats=1,
                           max_seconds=0.1)


def _outputs(settings, case):
    problem = make_pattern_problem(settings, LENGTH, CPU)
    with torch.no_grad():
        problem.table.zero_()  # the bias "included in both": zero, so SDPA (which has none) matches
    out, density = {}, None
    for column in ("flex",) if case.sdpa_na else ("flex", "sdpa-mask"):
        forward, _, facts = build_cell(settings, problem, case, column, CPU, Timer(CPU))
        density = facts.get("density", density)
        with torch.no_grad():
            out[column] = forward()
    return problem, out, density


@pytest.mark.parametrize("relative_bias", [False, True], ids=["bias-off", "bias-zero"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_flex_cell_computes_what_the_sdpa_cell_computes(entry, relative_bias):
    settings = _settings(relative_bias)
    case = resolve_pattern(entry, LENGTH)
    problem, out, density = _outputs(settings, case)
    if case.sdpa_na:
        # SDPA cannot express it (softcap): check flex against the scores transformed by the same
        # pattern functions instead (these entries have no mask).
        assert not case.has_mask
        positions, _ = case_inputs(problem, case, CPU)
        x = problem.hidden.view(problem.batch, LENGTH, settings.heads, -1).transpose(1, 2)
        scores = x @ x.transpose(-1, -2) * settings.head_dim**-0.5
        head = torch.arange(settings.heads)[None, :, None, None]
        scores = case.pattern.modify_score(scores, head, positions[:, None, :, None], positions[:, None, None, :],
                                           settings.heads)
        expected = (scores.softmax(-1) @ x).transpose(1, 2).reshape(problem.hidden.shape)
    else:
        expected = out["sdpa-mask"]
    assert torch.isfinite(out["flex"]).all()
    assert (out["flex"] - expected).abs().max().item() <= 1e-5, entry
    if entry.startswith("block:32"):
        assert density == pytest.approx(0.5)  # the off-diagonal tiles are skipped, and reported so


@pytest.mark.parametrize("entry", ["window:16", "dilated:8:2", "global:8:0:130", "swin:32", "prefix", "documents:4",
                                   "block:64+alibi"])
def test_sdpa_mask_is_the_dense_backends_mask(entry):
    settings = _settings(False)
    case = resolve_pattern(entry, LENGTH)
    problem = make_pattern_problem(settings, LENGTH, CPU)
    positions, document_ids = case_inputs(problem, case, CPU)
    mask = sdpa_mask(case, positions, document_ids, settings.heads, torch.float32)
    allowed = make_dense_attention_state(positions, LENGTH, 0, torch.zeros(settings.heads, 1), 0, pattern=case.pattern,
                                         document_ids=document_ids, layer=case.layer).allowed
    if mask.dtype != torch.bool:  # a float bias (ALiBi): -inf exactly where the mask hides
        mask = torch.isfinite(mask)
    assert torch.equal(*torch.broadcast_tensors(mask, allowed))
    assert not bool(mask.all())  # every pattern here hides something at this length


def test_entries_resolve_per_length():
    assert resolve_pattern("prefix", 1024).spec == "prefix:256"
    assert resolve_pattern("swin:64", 1024).layer == 1 and "odd layers" in resolve_pattern("swin:64", 1024).label
    docs = resolve_pattern("documents", 512)
    assert docs.documents == 4 and docs.has_mask and docs.spec == ""
    assert resolve_pattern("block:64+softcap:30", 512).spec == "block:64,softcap:30"
    assert resolve_pattern("softcap:30", 512).sdpa_na.startswith("n/a: ")
    assert resolve_pattern("alibi", 512).sdpa_na is None


@pytest.mark.slow
def test_patterns_quick_cpu_writes_report(benchmark_main, tmp_path, capsys):
    out_dir = tmp_path / "patterns"
    args = ["patterns", "--device", "cpu", "--quick", "--lengths", "64", "--patterns", "none,block:32,softcap:30",
            "--max-seconds", "0.2", "--output-dir", str(out_dir)]
    out = run_cli("benchmark", *args, cwd=tmp_path, timeout=300)  # generous: CI machines are shared
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    text = out.stdout
    assert text.index("torch") < text.index("== Attention patterns") < text.index("| pattern")
    assert "FORWARD ONLY" in text and "L=   64" in text  # a progress line per cell
    for name in ("patterns.md", "patterns.json", "patterns_time.png"):
        assert (out_dir / name).is_file() and (out_dir / name).stat().st_size > 0, name
    assert (out_dir / "patterns_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cells = json.loads((out_dir / "patterns.json").read_text())["patterns"]["cells"]
    assert sorted((c["pattern"] or "", c["column"]) for c in cells) == sorted(
        [("", "sdpa")] + [(p, col) for p in ("none", "block:32", "softcap:30") for col in ("flex", "sdpa-mask")])
    for cell in cells:  # a number, or n/a with its reason
        if cell["status"] == "ok":
            assert cell["ms"] > 0 and cell["tflops"] > 0, cell
        else:
            assert cell["status"].startswith("n/a: ") and len(cell["status"]) > 20, cell
    assert {c["pattern"] for c in cells if c["status"] != "ok"} == {"none", "softcap:30"}
    flex = {c["pattern"]: c for c in cells if c["column"] == "flex"}
    assert flex["none"]["density"] == 1.0 and flex["block:32"]["mask_ms"] > 0
    assert flex["none"]["tiles"] == [flex["none"]["B"], flex["none"]["B"]]  # one 128-tile per row at L = 64
    md = (out_dir / "patterns.md").read_text()
    assert "### Summary" in md and "SDPA cannot apply softcap" in md and "![patterns_time.png]" in md

    # --resume keeps every measured cell; other options are refused in one line
    main = benchmark_main
    main(args + ["--resume"])
    again = json.loads((out_dir / "patterns.json").read_text())["patterns"]["cells"]
    assert all(c.get("resumed") for c in again if c["status"] == "ok")
    assert [c["status"] for c in again] == [c["status"] for c in cells]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--resume", "--heads", "4"])
    assert exit_info.value.code == 2 and "heads" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("patterns, needle", [
    ("window:x", "window:x"),
    ("block:64,nope:3", "nope"),
    ("documents:0", "documents:0"),
    ("block:8,block:8", "twice"),
])
def test_bad_pattern_is_one_line(benchmark_main, capsys, patterns, needle):
    with pytest.raises(SystemExit) as exit_info:
        benchmark_main(["patterns", "--device", "cpu", "--quick", "--patterns", patterns])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert needle in err


def test_help_lists_patterns(benchmark_main, capsys):
    main = benchmark_main
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "patterns" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["patterns", "--help"])
    text = capsys.readouterr().out
    assert "--patterns" in text and "--resume" in text and "--time-budget" in text
