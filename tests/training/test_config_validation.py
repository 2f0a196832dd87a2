"""Typed, early config validation: every bad value is one stderr line naming the key, before any data is read.

Each case is a mistake a user makes on the command line or in a YAML file. The run must stop with exit
status != 0, one `error:` line naming the key and what is allowed, no traceback, and nothing written
(no data cache: the corpus was never touched).
"""
from __future__ import annotations

import pytest
import torch

from cli_support import assert_one_line_error_text, call_main, cli_main
from pretrain_support import TINY_RUN
from mpnet.errors import UserError
from mpnet.modeling import MPNetConfig, MPNetForPretraining
from mpnet.training.config import PretrainConfig, load

BAD_OVERRIDES = [
    ("training.batch_size=abc", "'training.batch_size' got 'abc'; it takes an integer"),
    ("training.batch_size=8.5", "'training.batch_size' got '8.5'; it takes an integer"),
    ("optim.lr=fast", "'optim.lr' got 'fast'; it takes a number"),
    ("training.max_steps=abc", "'training.max_steps' got 'abc'"),
    ("data.pred_prob=0", "'data.pred_prob' got 0.0; it must be a fraction in (0, 1)"),
    ("data.pred_prob=1.5", "'data.pred_prob' got 1.5; it must be a fraction in (0, 1)"),
    ("model.use_flex_attention=on", "'model.use_flex_attention' got 'on'; it takes a boolean"),
    ("training.bf16=maybe", "'training.bf16' got 'maybe'; it takes a boolean"),
    ("model.hidden_sise=64", "unknown config key 'model.hidden_sise'"),
    ("model.hidden_size=130", "hidden_size 130 is not a multiple of num_attention_heads 4"),
    ("data.block_size=4096", "'data.block_size' got 4096; it must be at most 512"),
    ("model.sliding_window_size=0", "'model.sliding_window_size' got 0; it must be a positive integer"),
    ("model.attention_pattern=blocky:3", "blocky"),
    ("model.preset=huge", "'model.preset' got 'huge'; choose one of tiny, base"),
    ("optim.schedule=cosine", "'optim.schedule' got 'cosine'; it must be one of linear, polynomial, constant"),
    ("training.grad_accum=0", "'training.grad_accum' got 0; it must be positive"),
    ("logging.keep_last=-1", "'logging.keep_last' got -1"),
    ("optim.betas=0.9", "'optim.betas'"),
    ("nosection=1", "must look like SECTION.KEY=VALUE"),
]


@pytest.mark.parametrize("override,fragment", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_a_bad_value_is_one_line_before_any_data_is_read(tmp_path, override, fragment):
    out = tmp_path / "run"
    code, err = call_main(cli_main("pretrain"), "--config", "configs/mpnet-tiny.yaml", "--output-dir", out, override)
    assert_one_line_error_text(code, err, fragment)
    assert not out.exists(), "the run wrote something before refusing its config"


def test_a_model_section_that_is_not_a_mapping(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model: tiny\n")
    code, err = call_main(cli_main("pretrain"), "--config", config, "--output-dir", tmp_path / "run")
    assert_one_line_error_text(code, err, "config key 'model' got 'tiny'; it takes a section")


def test_a_yaml_syntax_error_names_its_line_and_column(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  hidden_size: 64\n   num_attention_heads: 2\n")
    code, err = call_main(cli_main("pretrain"), "--config", config, "--output-dir", tmp_path / "run")
    assert_one_line_error_text(code, err, "is not valid YAML (line 3, column 23): mapping values are not allowed")


def test_a_warmup_longer_than_the_run_is_said(tmp_path, caplog, prefix_shards):
    import logging

    with caplog.at_level(logging.WARNING, logger="mpnet.pretrain"):
        code, err = call_main(cli_main("pretrain"), "--data", prefix_shards, "--output-dir", tmp_path / "run",
                              "--max-steps", 2, *TINY_RUN, "optim.warmup_steps=8")
    assert code in (0, None), err
    expected = "optim.warmup_steps 8 is longer than training.max_steps 2: the learning rate peaks at 25% of optim.lr"
    assert expected in caplog.text, caplog.text


def test_values_are_coerced_to_their_types():
    cfg = load(PretrainConfig, "configs/mpnet-tiny.yaml",
               {"training": {"batch_size": "4", "bf16": "no"}, "optim": {"lr": "1e-4", "betas": "0.9,0.95"},
                "model": {"use_flex_attention": "false", "hidden_size": "64", "num_attention_heads": "2"}})
    assert cfg.training.batch_size == 4 and cfg.training.bf16 is False
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.model["use_flex_attention"] is False and cfg.model["hidden_size"] == 64


def test_overrides_are_accepted_on_both_sides_of_a_flag(tmp_path):
    """Intermixed parsing: `C model.x=.. --output-dir R training.y=..` parses (and here stops on the bad lr)."""
    code, err = call_main(cli_main("pretrain"), "--config", "configs/mpnet-tiny.yaml", "model.hidden_size=32",
                          "--output-dir", tmp_path / "run", "optim.lr=fast")
    assert_one_line_error_text(code, err, "'optim.lr' got 'fast'")


def test_special_token_ids_must_lie_in_the_vocabulary():
    with pytest.raises(UserError, match="mask_token_id 300 is outside the vocabulary"):
        MPNetConfig.tiny(vocab_size=211, mask_token_id=300)
    with pytest.raises(UserError, match="pad_token_id 500 is outside the vocabulary"):
        MPNetConfig.tiny(vocab_size=211, pad_token_id=500)


def test_a_small_vocabulary_without_a_mask_id_refuses_two_stream_pretraining_clearly():
    """Before: an IndexError from the embedding (the default <mask> id 30526 >= vocab_size)."""
    model = MPNetForPretraining(MPNetConfig.tiny(vocab_size=211))
    ids = torch.randint(5, 211, (1, 16))
    assert model.mlm_logits(ids).shape == (1, 16, 211)  # single-stream encoding needs no <mask>
    with pytest.raises(UserError, match="no mask_token_id"):
        model(ids, torch.arange(16)[None], 3)


@pytest.mark.parametrize("module,args,fragment", [
    ("pretrain", ["--max-steps", "4", "training.max_steps=3"], "training.max_steps=3 and its command-line flag (4)"),
    ("finetune", ["--epochs", "1", "training.epochs=2"], "training.epochs=2 and its command-line flag (1)"),
])
def test_a_flag_and_an_override_that_disagree_are_refused(tmp_path, module, args, fragment):
    """One precedence rule: a flag and a SECTION.KEY=VALUE for the same key agree or the command stops in one
    line before any work (before, the flag won silently)."""
    from cli_support import assert_one_line_error_text, call_main, cli_main

    out = tmp_path / "out"
    common = (["--output-dir", out] if module == "pretrain"
              else ["--checkpoint", tmp_path / "ckpt", "--task", "sst2", "--data-dir", tmp_path, "--output-dir", out])
    code, err = call_main(cli_main(module), *common, *args)
    assert_one_line_error_text(code, err, fragment, "give one of them")
    assert not out.exists()


def test_a_flag_and_an_override_that_agree_are_one_setting():
    from mpnet.training.config import add_flags, parse_overrides

    overrides = add_flags(parse_overrides(["optim.lr=1e-4", "training.max_steps=3", "logging.progress_bar=false"]),
                          {"optim": {"lr": 0.0001}, "training": {"max_steps": 3}, "logging": {"progress_bar": False}})
    assert overrides == {"optim": {"lr": 0.0001}, "training": {"max_steps": 3}, "logging": {"progress_bar": False}}


def test_a_config_is_a_file_or_a_packaged_name_from_any_directory(tmp_path, monkeypatch):
    from mpnet.training.config import config_file

    monkeypatch.chdir(tmp_path)  # outside the checkout: the README's `--config configs/mpnet-tiny.yaml` still works
    for spec in ("mpnet-tiny", "mpnet-tiny.yaml", "configs/mpnet-tiny.yaml"):
        assert config_file(spec).name == "mpnet-tiny.yaml" and config_file(spec).is_file()
    assert config_file("glue/sentiment").parent.name == "glue"
    own = tmp_path / "mine.yaml"
    own.write_text("training:\n  max_steps: 3\n")
    assert config_file(own) == own and config_file("mine.yaml") == own.relative_to(tmp_path)
    with pytest.raises(UserError, match="config file mpnet-huge does not exist; .* mpnet-base, mpnet-long"):
        config_file("mpnet-huge")


def test_hf_habits_on_the_command_line(tmp_path, prefix_shards):
    """--output_dir (HF Trainer's spelling) is --output-dir, and pretrain-mpnet takes --lr, --batch-size and
    --warmup-steps as shortcuts for their keys, under the one rule for a flag and its key."""
    import yaml

    out = tmp_path / "run"
    tiny = [a for a in TINY_RUN if not a.startswith(("training.batch_size", "optim.warmup_steps"))]
    code, err = call_main(cli_main("pretrain"), "--data", prefix_shards, "--output_dir", out, "--max_steps", 1,
                          *tiny, "--lr", "3e-3", "--batch_size", 3, "--warmup-steps", 1, "optim.lr=0.003")
    assert code in (0, None), err
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["optim"]["lr"] == 3e-3 and recorded["optim"]["warmup_steps"] == 1
    assert recorded["training"]["batch_size"] == 3
    code, err = call_main(cli_main("pretrain"), "--output-dir", tmp_path / "other", "--lr", "1e-3", "optim.lr=2e-3")
    assert_one_line_error_text(code, err, "optim.lr=2e-3 and its command-line flag (0.001) disagree")
    code, err = call_main(cli_main("preprocess"), tmp_path / "missing.txt", "--output_dir", tmp_path / "shards")
    assert_one_line_error_text(code, err, "corpus not found")  # the flag was understood; the corpus is missing
    code, err = call_main(cli_main("pretrain"), "--output-dir", tmp_path / "x", "--no_such_flag", 1)
    assert_one_line_error_text(code, err, "unrecognized arguments: --no_such_flag")
