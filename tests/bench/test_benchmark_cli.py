"""`benchmark-mpnet` end to end on CPU at tiny sizes (a smoke run of the command, not a timed test)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cli_support import assert_one_line_error_text, call_main, run_cli

from mpnet.errors import UserError


def test_help(benchmark_main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark_main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("all", "attention", "step", "finetune", "patterns", "packing", "--device cpu --quick"):
        assert word in text
    for sub, flag in (("attention", "--single-lengths"), ("step", "--peak-tflops"), ("all", "--sections"),
                      ("finetune", "--models"), ("all", "--finetune-models")):
        with pytest.raises(SystemExit) as exit_info:
            benchmark_main([sub, "--help"])
        assert exit_info.value.code == 0
        assert flag in capsys.readouterr().out


@pytest.mark.slow
def test_without_subcommand_runs_every_cell_on_cpu(tmp_path):
    """`benchmark-mpnet --device cpu --quick`, what the command's own hints suggest: `all`, one report."""
    out_dir = tmp_path / "bench"
    out = run_cli("benchmark", "--device", "cpu", "--quick", "--output-dir", out_dir, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    text = out.stdout
    assert text.index("torch") < text.index("== Attention: one two-stream call pair") < text.index(
        "== Attention: single stream") < text.index("== Pretraining step") < text.index("== Fine-tuning step")
    assert "FORWARD ONLY" in text and "| backend" in text and "Relative throughput" in text
    for name in ("benchmark.md", "benchmark.json", "attention_time.png", "attention_memory.png", "single_time.png"):
        assert (out_dir / name).is_file() and (out_dir / name).stat().st_size > 0, name
    assert (out_dir / "attention_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out_dir / "benchmark.json").read_text())
    assert set(data) == {"environment", "attention", "single", "step", "finetune", "targets"}
    targets = data["targets"]["cells"]  # a CPU measures none of them (no MFU, attention forward only)
    assert len(targets) == 4 and all(row["verdict"] == "not measured" for row in targets)
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["device"].startswith("CPU") and env["date"] and env["transformers"]
    for key in ("attention", "single"):
        cells = data[key]["cells"]
        assert {c["backend"] for c in cells} == {"sdpa", "sdpa-bias", "dense", "dense-once", "flex", "flex-w16",
                                                 "triton", "triton-w16"}
        triton = [c for c in cells if c["backend"].startswith("triton")]  # CUDA only: n/a with its reason
        assert all(c["status"].startswith("n/a: the triton backend cannot run on CPU") for c in triton), triton
        cells = [c for c in cells if c not in triton]
        assert all(c["status"] == "ok" and c["ms"] > 0 and c["tflops"] > 0 for c in cells), cells
        for c in cells:
            if c["backend"].startswith("flex"):
                computed, total = c["tiles"]
                assert 0 < computed <= total and c["density"] == computed / total and c["mask_ms"] > 0
            if c["backend"] == "sdpa-bias":  # per layer + (build + gradient reduction) / layers
                assert c["ms"] == pytest.approx(c["layer_ms"] + c["build_ms"] / data[key]["settings"]["layers"])
        assert data[key]["settings"]["streams"] == ("two" if key == "attention" else "one")
    assert {c["m"] for c in data["single"]["cells"]} == {0}
    step = data["step"]["cells"]
    assert [(c["model"], c["backend"]) for c in step] == [("BERT-tiny", "sdpa-sparse"), ("BERT-tiny", "sdpa"),
                                                          ("MPNet-tiny", "dense")]
    assert all(c["status"] == "ok" for c in step)
    assert "relative" not in step[0] and step[2]["relative"][1] == "sparse-head BERT step time" and step[2]["flops"] > 0
    # torch's FlopCounterMode count of each step equals the analytic one (MPNet's counted with the dense backend)
    assert all(c["counted_flops"] == c["flops"] for c in step)
    finetune = data["finetune"]["cells"]
    assert [c["model"] for c in finetune] == ["transformers", "dense"] and all(c["status"] == "ok" for c in finetune)
    assert finetune[1]["relative"][0] == pytest.approx(finetune[1]["examples_per_s"] / finetune[0]["examples_per_s"])
    md = (out_dir / "benchmark.md").read_text()
    for heading in ("## Attention: one two-stream call pair", "## Attention: single stream", "## Pretraining step",
                    "## Fine-tuning step", "![attention_time.png]", "x transformers examples/s", "tiles computed/total",
                    "## Targets"):
        assert heading in md, heading


def test_step_micro_batch_sweep_in_process(benchmark_main, tmp_path):
    """--batch-sizes: every cell once per batch, each MPNet cell against the sparse-head BERT of its own batch."""
    code, err = call_main(benchmark_main, "step", "--device", "cpu", "--quick", "--backend", "dense",
                          "--batch-sizes", "1,2", "--output-dir", tmp_path)
    assert code == 0, err
    cells = json.loads((tmp_path / "benchmark.json").read_text())["step"]["cells"]
    assert [(c["backend"], c["batch"]) for c in cells] == [(b, batch) for batch in (1, 2)
                                                            for b in ("sdpa-sparse", "sdpa", "dense")]
    for batch in (1, 2):
        reference, *others = [c for c in cells if c["batch"] == batch]
        for c in others:
            assert c["relative"] == [pytest.approx(c["ms"] / reference["ms"]), "sparse-head BERT step time"]
            assert c["tokens"] == batch * 32 and c["counted_flops"] == c["flops"]
    for c in cells:  # the first step by part, each part ended by a sync: within the first step's wall time
        parts = c["first_step_parts_s"]
        assert sorted(parts) == ["backward", "forward", "optimizer"] and min(parts.values()) >= 0
        assert sum(parts.values()) <= c["first_call_s"]
    md = (tmp_path / "benchmark.md").read_text()
    assert "MFU % counted (FlopCounterMode)" in md and "| 2x32 " in md


def test_also_all_rows_prices_the_last_layers_unread_rows(benchmark_main, tmp_path):
    """--also-all-rows: the named backend's cell once more with the last layer on every row, after the others;
    the same loss function (the first step's loss equal to fp32 rounding: the m predicted rows are computed
    the same way, with more rows beside them in the matmuls), more FLOPs (that layer on n + 2m rows), and a
    table of the step time saved."""
    from mpnet.modeling.config import MPNetConfig
    from mpnet.training.metrics import estimate_flops_per_example

    code, err = call_main(benchmark_main, "step", "--device", "cpu", "--quick", "--backend", "dense", "--no-bert",
                          "--also-all-rows", "dense", "--output-dir", tmp_path)
    assert code == 0, err
    cells = json.loads((tmp_path / "benchmark.json").read_text())["step"]["cells"]
    assert [(c["key"], c["all_rows"]) for c in cells] == [("mpnet-dense@2", False), ("mpnet-dense+all-rows@2", True)]
    config, n = MPNetConfig.tiny(), cells[0]["seq_len"]
    m = cells[0]["m"]
    assert cells[0]["flops"] == 2 * estimate_flops_per_example(config, n, m, last_layer_rows=m)
    assert cells[1]["flops"] == 2 * estimate_flops_per_example(config, n, m)
    assert cells[1]["counted_flops"] == cells[1]["flops"]  # torch's count sees the extra rows too
    md = (tmp_path / "benchmark.md").read_text()
    assert "The last layer's rows the loss never reads" in md and "dense all rows" in md


def test_every_row_in_last_layer_is_the_same_loss():
    """every_row_in_last_layer changes the work, never the function: the logits equal the model's own to
    float32 rounding of the longer matmuls (dropout off)."""
    from mpnet.bench.step import every_row_in_last_layer
    from mpnet.modeling.config import MPNetConfig
    from mpnet.modeling.model import MPNetForPretraining

    torch.manual_seed(0)
    model = MPNetForPretraining(MPNetConfig.tiny()).eval()
    ids, positions = torch.randint(5, 100, (2, 16)), torch.stack([torch.randperm(16) for _ in range(2)])
    expected = model(ids, positions, 3)
    every_row_in_last_layer(model)
    # The last layer's matmuls now run on more rows, which BLAS may block and sum in another order: a reordered
    # float32 dot of k <= 512 terms (the FFN's) of sum |terms| ~ 8 (LayerNorm'd inputs, 0.02-std weights) moves
    # by ~ sqrt(k) * 2^-24 * 8 ~ 1e-5 (seen: 2-5e-7 on 1 and 2 threads)
    torch.testing.assert_close(model(ids, positions, 3), expected, rtol=0, atol=1e-5)


def test_first_step_text_splits_a_compiled_cells_first_step():
    from mpnet.bench.step import first_step_text

    parts = {"forward": 90.04, "backward": 45.0, "optimizer": 0.2}
    assert first_step_text({"compile": True, "first_call_s": 138.4, "first_step_parts_s": parts}) == \
        "138.4 (fwd 90.0, bwd 45.0)"
    assert first_step_text({"compile": False, "first_call_s": 0.14, "first_step_parts_s": parts}) == "0.1"
    assert first_step_text({"compile": True, "first_call_s": 2.0}) == "2.0"  # a report written before the parts


def test_finetune_cell_in_process(benchmark_main, tmp_path, capsys):
    code, err = call_main(benchmark_main, "finetune", "--device", "cpu", "--quick", "--models", "dense",
                          "--output-dir", tmp_path)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmark.json", "benchmark.md"]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(report) == {"environment", "finetune"}
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["device"].startswith("CPU")
    settings = report["finetune"]["settings"]
    assert settings["models"] == ["dense"] and settings["device"] == "cpu"
    [cell] = report["finetune"]["cells"]
    assert cell["status"] == "ok" and cell["model"] == "dense" and "(dense)" in cell["attention"]
    assert cell["batch"] == settings["batch_size"] == 2 and cell["seq_len"] == settings["seq_len"] == 32  # --quick
    # The rates are the counts over the median step: consistent with each other and with the batch.
    seconds = cell["ms"] / 1e3
    assert cell["tokens"] == 2 * 32 and cell["tokens_per_s"] == pytest.approx(cell["tokens"] / seconds)
    assert cell["examples_per_s"] == pytest.approx(2 / seconds)
    assert cell["tflops"] == pytest.approx(cell["flops"] / seconds / 1e12)
    assert cell["gflop_per_token"] == pytest.approx(cell["flops"] / cell["tokens"] / 1e9)
    assert cell["p20_ms"] <= cell["ms"] <= cell["p80_ms"] and 1 <= cell["runs"] <= settings["repeats"]
    assert cell["mfu"] is None and math.isfinite(cell["loss"])  # no MFU on a CPU: its peak is not the GPU's
    md = (tmp_path / "benchmark.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| dense "))
    assert "## Fine-tuning step" in md and "2x32" in row and cell["attention"] in row
    assert "ours dense" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["attention", "--device", "cpu", "--windows", "0"], "--windows"),
    (["attention", "--device", "cpu", "--lengths", "512", "--tokens-per-batch", "100"], "--tokens-per-batch"),
    (["step", "--device", "cpu", "--backend", "flex"], "CUDA"),
    (["finetune", "--device", "cpu", "--models", "flex"], "CUDA"),
    (["attention", "--device", "cpu", "--backends", "sdpa,nope"], "nope"),
    (["--device", "cpu", "--dtype", "bf16"], "--dtype fp32"),
    (["--device", "gpu"], "unknown device"),
    (["--device", "cpu", "--resume"], "--resume needs --output-dir"),
    (["step", "--device", "cpu", "--also-compile", "transformers"], "--also-compile"),
    (["step", "--device", "cpu", "--backend", "dense", "--also-all-rows", "triton"], "--also-all-rows"),
    (["step", "--device", "cpu", "--backend", "dense", "--compile-scope", "layers", "--compile-mode",
      "reduce-overhead"], "--compile-scope model, or --compile-mode default"),
    (["attention", "--device", "cpu", "--cuda-graphs"], "--cuda-graphs"),
    (["attention", "--device", "cpu", "--triton-tiles", "dkdv=32x64s3"], "CUDA GPUs only"),
    (["mask-build", "--device", "cpu", "--builders", "summaries,nope"], "nope"),
    (["mask-build", "--device", "cpu", "--windows", "none,x"], "--windows"),
])
def test_bad_input_is_one_line(benchmark_main, args, needle):
    code, err = call_main(benchmark_main, *args)
    assert code == 2
    assert_one_line_error_text(code, err, needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the hint is for machines without CUDA")
def test_cuda_hint_names_the_cpu_smoke_run(benchmark_main):
    code, err = call_main(benchmark_main, "attention", "--device", "cuda")
    assert_one_line_error_text(code, err, "pass --device cpu", "--quick")


def test_subcommand_may_come_after_the_options():
    from mpnet_cli.benchmark import with_subcommand

    assert with_subcommand([]) == []  # argparse then asks for a subcommand
    assert with_subcommand(["--device", "cpu", "--quick"]) == ["all", "--device", "cpu", "--quick"]
    assert with_subcommand(["--device", "cpu", "step", "--quick"]) == ["step", "--device", "cpu", "--quick"]
    assert with_subcommand(["step", "--device", "cpu"]) == ["step", "--device", "cpu"]
    assert with_subcommand(["--help"]) == ["--help"]


def test_also_compile_runs_the_named_cells_again_after_the_others():
    """The order the step and fine-tuning sections run their cells in: every cell as asked, then the
    --also-compile ones compiled, references first (each compiled cell is compared with them)."""
    from mpnet.bench.step import compile_plan, references

    assert compile_plan(["bert", "dense", "triton"], ["triton", "bert"], every=False) == [
        ("bert", False), ("dense", False), ("triton", False), ("bert", True), ("triton", True)]
    assert compile_plan(["bert", "dense"], ["dense"], every=True) == [("bert", True), ("dense", True)]
    assert references("bert", compiled=True) == ["bert+compile", "bert"]
    assert references("transformers", compiled=False) == ["transformers"]


def test_profile_families_name_each_attention_backend():
    """The step profile's families: the triton backend's kernels by their whole names (a kernel of
    another library whose name merely contains one of them stays in its own family)."""
    from mpnet.bench.step import kernel_family

    assert kernel_family("_key_gradients_kernel") == "triton attention (fwd+bwd)"
    assert kernel_family("triton_tem_fused_flex_attention_backward_2") == "flex attention (fwd+bwd)"
    assert kernel_family("fmha_cutlassB_f16_aligned_64x64_k64_sm80_forward_kernel") == "SDPA flash attention"
    assert kernel_family("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul (GEMM)"


@pytest.mark.slow
def test_mask_build_labels_every_tile_as_torchs_own_builder(benchmark_main, tmp_path):
    """`benchmark-mpnet mask-build` on CPU: the project's BlockMask builder (tile summaries) and torch's
    create_block_mask on the same rules give the same tiles, and the report, json and plot are written."""
    code, err = call_main(benchmark_main, "mask-build", "--device", "cpu", "--quick", "--lengths", "256", "--windows",
                          "none", "--builders", "summaries,eager", "--repeats", "1", "--output-dir", tmp_path)
    assert code == 0, err
    cells = json.loads((tmp_path / "mask_build.json").read_text())["mask_build"]["cells"]
    by = {c["builder"]: c for c in cells}
    assert set(by) == {"summaries", "eager"} and all(c["status"] == "ok" and c["ms"] > 0 for c in cells), cells
    summaries, eager = by["summaries"], by["eager"]
    assert (summaries["full_differs"], summaries["wrongly_skipped"], summaries["left_partial"]) == (0, 0, 0)
    assert summaries["tiles_content"] == eager["tiles_content"] and summaries["tiles_query"] == eager["tiles_query"]
    assert eager["tiles_content"][1] == 9  # 256 + 38 content rows: 3 x 3 tiles of 128
    assert "FULL differs 0" in (tmp_path / "mask_build.md").read_text()
    assert (tmp_path / "mask_build.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compile_scope_layers_compiles_each_repeated_layer_in_place():
    """--compile-scope layers (toolkit.compile_model): the transformer's layers, found as the longest ModuleList
    of one class (MPNet's and BERT's, the sparse-head wrapper's too), each one's forward compiled in place; the
    model itself comes back (its other modules stay eager). A model without repeated layers is refused in one
    line."""
    import transformers

    from mpnet.bench.step import MaskedRowsBertMLM
    from mpnet.modeling.config import MPNetConfig
    from mpnet.modeling.model import MPNetForPretraining
    from mpnet.training.toolkit import compile_model, repeated_blocks

    mpnet = MPNetForPretraining(MPNetConfig.tiny())
    assert repeated_blocks(mpnet) == list(mpnet.mpnet.encoder.layer)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(hidden_size=64, num_hidden_layers=3,
                                                                num_attention_heads=2, intermediate_size=128))
    assert repeated_blocks(MaskedRowsBertMLM(bert)) == list(bert.bert.encoder.layer)
    assert compile_model(mpnet, "default", "layers") is mpnet
    assert all("forward" in vars(layer) for layer in mpnet.mpnet.encoder.layer)  # each layer's forward compiled
    assert "forward" not in vars(mpnet.mpnet.embeddings) and "forward" not in vars(mpnet)
    with pytest.raises(UserError, match="no repeated layers"):
        compile_model(torch.nn.Linear(2, 2), "default", "layers")
