"""`benchmark-mpnet packing` on CPU at tiny sizes (a smoke run of the command, not a timed test), and
the pieces it is built from: sentence splitting, the input sources, the padded and packed layouts."""
from __future__ import annotations

import json

import pytest
import torch

from mpnet.errors import UserError
from mpnet.bench.packing import PackingSettings, load_sentences, packed_batch, padded_batch, split_sentences
from cli_support import call_main


def test_split_sentences():
    text = 'He came.  "Are you well?" she asked him! Then nothing\nmore was said. Ok. The end of it.'
    assert split_sentences(text) == ['"Are you well?"', "she asked him!", "Then nothing more was said.",
                                     "The end of it."]


def test_sources(tmp_path):
    sentences, source = load_sentences("embedded")
    assert len(sentences) > 10000 and "embedded corpus" in source
    tsv = tmp_path / "train.tsv"
    tsv.write_text("sentence\tlabel\na fine film indeed\t1\nnot good at all\t0\n")
    sentences, source = load_sentences(str(tmp_path))  # a folder holding train.tsv
    assert sentences == ["a fine film indeed", "not good at all"] and str(tsv) in source
    (tmp_path / "bad.tsv").write_text("text\tlabel\nx\t1\n")
    with pytest.raises(UserError, match="no 'sentence' column"):
        load_sentences(str(tmp_path / "bad.tsv"))


def test_layouts_hold_the_same_tokens():
    examples = [[0, *range(5, 5 + n), 2] for n in (3, 40, 17, 9, 60)]
    padded = padded_batch(examples, pad_id=1, multiple=32, max_length=64)
    assert padded["input_ids"].shape == (5, 64)  # longest 62 -> 64
    packed = packed_batch(examples, pad_id=1, row_length=64, rows_multiple=4)
    assert packed["input_ids"].shape == (4, 64)  # 3 rows of examples, rounded up to 4
    assert int(padded["attention_mask"].sum()) == int(packed["attention_mask"].sum()) == sum(map(len, examples))
    starts = packed["starts"]
    assert packed["input_ids"][starts[:, 0], starts[:, 1]].tolist() == [0] * 5  # every example's <s>


def test_settings_are_checked():
    with pytest.raises(UserError, match="row-length"):
        PackingSettings(max_length=128, row_length=64, dtype="fp32").validate(torch.device("cpu"))
    with pytest.raises(UserError, match="unknown variant"):
        PackingSettings(variants=["packed-sdpa"], dtype="fp32").validate(torch.device("cpu"))


def test_cli_quick_cpu_writes_the_report(benchmark_main, tmp_path, capsys):
    out = tmp_path / "packing"
    code, err = call_main(benchmark_main, "packing", "--device", "cpu", "--quick", "--examples-per-step", 4,
                          "--batches", 1, "--max-length", 32, "--max-seconds", 0.1, "--data", "embedded",
                          "--output-dir", out)
    assert code == 0, err
    printed = capsys.readouterr().out
    assert "FORWARD ONLY" in printed and "| variant" in printed and "embedded corpus" in printed
    for name in ("packing.md", "packing.json", "packing.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "packing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "packing.json").read_text())["packing"]
    cells = data["cells"]
    assert [c["variant"] for c in cells] == ["padded-dense", "packed-flex", "padded-flex", "packed-dense"]
    inputs = data["inputs"]
    for cell in cells:
        assert cell["status"] == "ok", cell
        assert cell["examples"] == inputs["examples_drawn"] == 4
        # the same 4 examples in every layout: their real tokens per step, whatever the padding
        assert cell["real_tokens_per_step"] == pytest.approx(4 * inputs["mean_tokens"])
        positions = sum(rows * width for rows, width in cell["shapes"])
        assert cell["positions_per_step"] == positions >= cell["real_tokens_per_step"]
        assert cell["padding_share"] == pytest.approx(1 - cell["real_tokens_per_step"] / positions)
        # both rates are over the same timed steps: their ratio is the tokens per example
        assert cell["real_tokens_per_s"] == pytest.approx(cell["examples_per_s"] * inputs["mean_tokens"])
        assert cell["vs_padded_dense"] == pytest.approx(cell["examples_per_s"] / cells[0]["examples_per_s"])
        assert all(width == 32 for _, width in cell["shapes"])  # --max-length 32: padded to it, packed rows of it
        if cell["layout"] == "packed":
            assert all(rows % data["settings"]["rows_multiple"] == 0 for rows, _ in cell["shapes"])
        assert cell["backend"] == cell["variant"].split("-")[1] and cell["layout"] == cell["variant"].split("-")[0]
    assert inputs["source"].startswith("the embedded corpus") or "sentiment" in inputs["source"]
    md = (out / "packing.md").read_text()
    assert "## Packed vs padded" in md and "![packing.png](packing.png)" in md and "x padded-dense" in md
    for cell in cells:  # one results row per variant, with its shape (--batches 1: one)
        [(rows, width)] = cell["shapes"]
        assert any(line.startswith("| 4 ") and f"| {cell['variant']} " in line and f"| {rows}x{width} " in line
                   for line in md.splitlines()), cell["variant"]
    assert all(line in md for line in data["headline"])
    assert torch.__version__ in md


def test_bad_input_is_one_line(benchmark_main):
    code, err = call_main(benchmark_main, "packing", "--device", "cpu", "--max-length", "4")
    assert code == 2 and "benchmark-mpnet: error:" in err and "--max-length" in err
