"""preprocess-mpnet end to end, through `python -m mpnet_cli.preprocess` in a subprocess.

User mistakes must end in exactly one stderr line and a non-zero exit, never a traceback, and an existing output
directory is never touched.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_support import cli_env
from mpnet.data import EMBEDDED_CORPUS
from mpnet.data.corpus import iter_documents

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env():
    return cli_env()


def single_error_line(returncode, stderr):
    assert returncode != 0
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    docs = []
    for doc in iter_documents([EMBEDDED_CORPUS]):
        docs.append(doc)
        if len(docs) == 4:
            break
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(env, small_corpus, tmp_path_factory):
    """All subprocess runs start at once (each pays the torch import; in parallel they overlap)."""
    root = tmp_path_factory.mktemp("runs")
    (root / "empty.txt").write_text("\n   \n\n")
    cases = {
        "ok": [small_corpus, "--output-dir", root / "shards", "--valid-fraction", "0.3", "--workers", "2"],
        "missing": [root / "nope.txt", "--output-dir", root / "out-missing"],
        "empty": [root / "empty.txt", "--output-dir", root / "out-empty"],
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "mpnet_cli.preprocess", *map(str, args)], env=env,
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in cases.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out, err)
    return root, results


def test_preprocess_writes_shards(runs):
    root, results = runs
    returncode, out, err = results["ok"]
    assert returncode == 0, err
    assert "Traceback" not in err and "wrote" in out
    assert (out + err).count(" tokens, valid ") == 1, out + err  # the summary, printed once
    meta = json.loads((root / "shards" / "metadata.json").read_text())
    assert meta["num_documents"]["train"] + meta["num_documents"]["valid"] == 4
    assert meta["vocab_size"] == 30527 and (root / "shards" / "tokenizer" / "tokenizer.json").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_missing_corpus(runs):
    root, results = runs
    line = single_error_line(*results["missing"][::2])
    assert "corpus not found" in line and "nope.txt" in line
    assert not (root / "out-missing").exists()


def test_empty_corpus(runs):
    root, results = runs
    line = single_error_line(*results["empty"][::2])
    assert "empty" in line
    assert not (root / "out-empty").exists()


def call_main(argv, capsys):
    """The same entry point in-process (cheaper than another interpreter): -> (exit code, stderr)."""
    from mpnet_cli.preprocess import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture
def cli_importable(env, monkeypatch):
    if importlib.util.find_spec("mpnet_cli") is None:
        for entry in reversed(env["PYTHONPATH"].split(os.pathsep)[:2]):
            monkeypatch.syspath_prepend(entry)


def test_jsonl_without_the_text_field_and_unknown_tokenizer(cli_importable, tmp_path, small_corpus, capsys):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"content": "Some text."}) + "\n")
    line = single_error_line(*call_main([tmp_path / "docs.jsonl", "--output-dir", tmp_path / "out"], capsys))
    assert "'text'" in line and "--text-field" in line
    line = single_error_line(*call_main([small_corpus, "-o", tmp_path / "out", "--tokenizer", tmp_path / "tok"], capsys))
    assert "tokenizer not found" in line
    (tmp_path / "bad.txt.gz").write_bytes(b"not gzip at all")
    line = single_error_line(*call_main([tmp_path / "bad.txt.gz", "-o", tmp_path / "out"], capsys))
    assert "cannot read" in line
    (tmp_path / "latin1.txt").write_bytes("A first line.\nA second one.\nCaf\u00e9 au lait.\n".encode("latin-1"))
    line = single_error_line(*call_main([tmp_path / "latin1.txt", "-o", tmp_path / "out"], capsys))
    assert "it is not UTF-8 text (byte 0xe9, from line 1 on); convert it first, e.g. iconv -f latin1" in line, line
    assert not (tmp_path / "out").exists()


def test_help(cli_importable, capsys):
    from mpnet_cli.preprocess import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--output-dir", "--tokenizer", "--sentencepiece-vocab-size", "--valid-fraction", "--workers",
                 "--text-field", "--line-per-document"):
        assert flag in out


def test_existing_output_is_never_touched(cli_importable, small_corpus, tmp_path, capsys):
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("precious")
    line = single_error_line(*call_main([small_corpus, "--output-dir", tmp_path / "existing"], capsys))
    assert "already exists" in line
    assert [p.name for p in (tmp_path / "existing").iterdir()] == ["keep.txt"]
    assert (tmp_path / "existing" / "keep.txt").read_text() == "precious"
