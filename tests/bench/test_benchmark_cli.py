"""`benchmark-mpnet` end to end on CPU at tiny sizes (a smoke run of the command, not a timed test)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_support import cli_env, cli_main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env():
    """Environment in which `python -m mpnet_cli.benchmark` works; `mpnet_cli` importable here too."""
    cli_main("benchmark")
    return cli_env(MPLBACKEND="Agg")


def run(args, env, cwd, timeout=120):
    return subprocess.run([sys.executable, "-m", "mpnet_cli.benchmark", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_help(env, tmp_path, capsys):
    out = run(["--help"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    for word in ("attention", "step", "all"):
        assert word in out.stdout
    from mpnet_cli.benchmark import main

    for sub, flag in (("attention", "--tokens-per-batch"), ("step", "--peak-tflops"), ("all", "--windows")):
        with pytest.raises(SystemExit) as exit_info:
            main([sub, "--help"])
        assert exit_info.value.code == 0
        assert flag in capsys.readouterr().out


@pytest.mark.slow
def test_attention_quick_cpu_writes_report(env, tmp_path):
    out_dir = tmp_path / "bench"
    out = run(["attention", "--device", "cpu", "--quick", "--lengths", "64,128", "--output-dir", str(out_dir)],
              env, tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    text = out.stdout
    # device, versions and settings come first; then tables in tabulate's github format
    assert text.index("torch") < text.index("== attention")
    assert "FORWARD ONLY" in text
    assert "| backend" in text and "|----" in text
    assert "Relative throughput" in text
    for name in ("benchmark.md", "benchmark.json", "attention_time.png", "attention_memory.png"):
        assert (out_dir / name).is_file() and (out_dir / name).stat().st_size > 0, name
    assert (out_dir / "attention_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out_dir / "benchmark.json").read_text())
    cells = data["attention"]["cells"]
    backends = {c["backend"] for c in cells}
    assert backends == {"sdpa", "dense", "dense-once", "flex", "flex-w16"}
    assert {c["L"] for c in cells} == {64, 128}
    for cell in cells:
        assert cell["status"] == "ok", cell
        assert cell["ms"] > 0 and cell["tflops"] > 0
    flex = [c for c in cells if c["backend"].startswith("flex")]
    assert all(0 < c["density"] <= 1 and c["mask_ms"] > 0 for c in flex)
    md = (out_dir / "benchmark.md").read_text()
    assert "## Attention" in md and "forward only" in md.lower() and "![attention_time.png]" in md
    assert data["environment"]["torch"] in md


def test_step_tiny_cpu_beside_bert(tmp_path, capsys):
    from mpnet.benchmark import StepSettings, benchmark

    settings = StepSettings(model="tiny", seq_len=32, batch_size=2, backends=["dense"], dtype="fp32", device="cpu",
                            warmup=1, repeats=3, max_seconds=2.0)
    benchmark(None, settings, out_dir=tmp_path)
    printed = capsys.readouterr().out
    assert "peak for MFU: 989" in printed and "| model" in printed
    data = json.loads((tmp_path / "benchmark.json").read_text())
    rows = data["step"]["rows"]
    assert [r["model"] for r in rows] == ["MPNet-tiny", "BERT-tiny"]
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows), rows
    assert rows[1]["vs_bert"] == pytest.approx(1.0)
    assert "## Pretraining step" in (tmp_path / "benchmark.md").read_text()


def test_flop_counts():
    from mpnet.benchmark import attention_flops, bert_step_flops, mpnet_step_flops
    from mpnet.modeling.config import MPNetConfig

    assert attention_flops(2, 12, 64, 100, 80, backward=False) == 4 * 2 * 12 * 100 * 80 * 64
    assert attention_flops(2, 12, 64, 100, 80, backward=True) == 3.5 * 4 * 2 * 12 * 100 * 80 * 64
    cfg = MPNetConfig.base()
    # with m = 0 the two-stream count is BERT's layer count (same shapes) minus BERT's all-row MLM head
    h, v = cfg.hidden_size, cfg.vocab_size
    assert mpnet_step_flops(cfg, 1, 512, 0) == pytest.approx(bert_step_flops(cfg, 1, 512) - 3 * 2 * 512 * (h * h + h * v))


@pytest.mark.parametrize("args, needle", [
    (["attention", "--device", "cpu", "--windows", "0"], "--windows"),
    (["attention", "--device", "cpu", "--lengths", "512", "--tokens-per-batch", "100"], "--tokens-per-batch"),
    (["step", "--device", "cpu", "--backend", "flex"], "CUDA"),
    (["attention", "--device", "cpu", "--backends", "sdpa,nope"], "nope"),
])
def test_bad_input_is_one_line(env, capsys, args, needle):
    from mpnet_cli.benchmark import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert needle in err.strip().splitlines()[-1]
