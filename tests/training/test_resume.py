"""The --resume contract (docs/resume.md): what the checkpoint fixes, what may change, one line for a
conflict, config.yaml = what the run uses; and vocabulary mismatches whose suggested fix really works.
In-process runs of a tiny model (CPU)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from mpnet.modeling import triton_plan
from helpers import compiled_target
from pretrain_support import TINY_RUN, checkpoint_steps, error_line, pretrain, train_losses


def run(out, shards, *extra):
    return pretrain("--output-dir", out, "--data", shards, "--log-every", 1, *TINY_RUN, *extra)


@pytest.fixture(scope="module")
def finished_run(prefix_shards, tmp_path_factory):
    """A 4-step run with checkpoints at 2 and 4 (lr 2e-3, not the default), copied afresh for each test."""
    out = tmp_path_factory.mktemp("resume") / "run"
    code, stderr = run(out, prefix_shards, "--max-steps", 4, "--save-every", 2, "optim.lr=2e-3", "logging.keep_last=0")
    assert code == 0, stderr
    return out


@pytest.fixture
def resumable(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def config_yaml(out) -> dict:
    return yaml.safe_load((Path(out) / "config.yaml").read_text())


def test_resume_continues_exactly_as_the_uninterrupted_run(prefix_shards, tmp_path):
    straight = tmp_path / "straight"
    common = ["--max-steps", 6, "--save-every", 3, "logging.keep_last=0"]
    assert run(straight, prefix_shards, *common)[0] == 0
    interrupted = tmp_path / "interrupted"
    shutil.copytree(straight, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "step-00000006")  # as if killed between step 3 and step 6
    code, stderr = run(interrupted, prefix_shards, "--resume", *common)
    assert code == 0, stderr
    assert train_losses(interrupted) == train_losses(straight)  # bit for bit, steps 4-6 recomputed


def test_resume_needs_no_config_and_keeps_the_checkpoints_settings(prefix_shards, resumable, caplog):
    """Only the data and the new length are given: the rest (lr 2e-3, the tiny shape) is the checkpoint's."""
    caplog.set_level(logging.INFO, logger="mpnet.pretrain")
    code, stderr = pretrain("--output-dir", resumable, "--data", prefix_shards, "--resume", "--max-steps", 6,
                            "--save-every", 2, "--no-progress")
    assert code == 0, stderr
    used = config_yaml(resumable)
    assert used["optim"]["lr"] == 2e-3 and used["model"]["hidden_size"] == 32 and used["training"]["max_steps"] == 6
    assert checkpoint_steps(resumable) == [2, 4, 6]
    assert "the learning-rate schedule now ends at step 6" in caplog.text


def test_resume_applies_the_settings_that_may_change(prefix_shards, resumable):
    code, stderr = run(resumable, prefix_shards, "--resume", "--max-steps", 6, "--save-every", 3,
                       "logging.keep_last=1", "training.max_nonfinite_steps=5", "data.num_workers=0")
    assert code == 0, stderr
    used = config_yaml(resumable)
    assert used["logging"]["save_every"] == 3 and used["logging"]["keep_last"] == 1
    assert used["training"]["max_nonfinite_steps"] == 5
    assert checkpoint_steps(resumable) == [6]
    saved = yaml.safe_load((resumable / "checkpoints" / "step-00000006" / "training_state" / "run_config.yaml")
                           .read_text())
    assert saved == used


@pytest.mark.parametrize("override,key", [("optim.lr=1e6", "optim.lr"), ("model.hidden_size=256", "model.hidden_size"),
                                          ("model.num_hidden_layers=4", "model.num_hidden_layers"),
                                          ("data.block_size=64", "data.block_size"), ("--seed=3", "training.seed"),
                                          ("training.batch_size=4", "training.batch_size")])
def test_a_conflicting_override_is_refused_naming_the_key(prefix_shards, resumable, override, key):
    before = (resumable / "config.yaml").read_text()
    line = error_line(*run(resumable, prefix_shards, "--resume", "--max-steps", 6, override))
    assert f"--resume: {key}=" in line and "conflicts with the checkpoint's" in line, line
    assert "training.init_from=" in line and "docs/resume.md" in line
    assert (resumable / "config.yaml").read_text() == before and checkpoint_steps(resumable) == [2, 4]


def test_an_override_equal_to_the_checkpoint_is_not_a_conflict(prefix_shards, resumable):
    code, stderr = run(resumable, prefix_shards, "--resume", "--max-steps", 5, "optim.lr=0.002",
                       "model.num_hidden_layers=2", "model.use_flex_attention=false")
    assert code == 0, stderr


def test_a_model_key_alone_is_checked_against_the_runs_own_shape(prefix_shards, resumable):
    """`--resume model.hidden_size=32` with no --config: the value is the run's (hidden 32, 2 heads), but it used
    to be validated against the built-in base preset and refused for "num_attention_heads 12"."""
    code, stderr = pretrain("--output-dir", resumable, "--resume", "--max-steps", 5, "model.hidden_size=32")
    assert code in (0, None), stderr
    line = error_line(*pretrain("--output-dir", resumable, "--resume", "--max-steps", 6, "model.hidden_size=48"))
    assert "model.hidden_size=48 conflicts with the checkpoint's 32" in line, line


def test_a_model_override_without_a_config_keeps_the_built_in_tiny_preset():
    from mpnet.training.config import PretrainConfig, load, model_config

    cfg = load(PretrainConfig, None, {"model": {"hidden_size": 64}})
    assert cfg.model == {"preset": "tiny", "hidden_size": 64}
    assert model_config(cfg.model).num_attention_heads == 4  # tiny's heads; base's 12 would not divide 64


@pytest.mark.parametrize("steps", [4, 2])
def test_max_steps_at_or_below_the_checkpoint_says_so(prefix_shards, resumable, steps):
    before = (resumable / "config.yaml").read_text()
    line = error_line(*run(resumable, prefix_shards, "--resume", "--max-steps", steps))
    assert f"is {steps}, at or below the checkpoint's step 4" in line and "larger --max-steps" in line, line
    assert (resumable / "config.yaml").read_text() == before


def test_a_finished_run_resumed_without_a_new_length_says_so(prefix_shards, resumable):
    line = error_line(*pretrain("--output-dir", resumable, "--data", prefix_shards, "--resume"))
    assert "is 4, at or below the checkpoint's step 4" in line, line


# ---------------------------------------------------------------------------------- vocabulary


@pytest.fixture(scope="module")
def small_vocab_checkpoint(tmp_path_factory):
    """An MPNet checkpoint with its own 50-token WordPiece tokenizer (not the data's 30527 tokens)."""
    from transformers import MPNetTokenizer

    from fixtures import TINY_VOCAB
    from mpnet import MPNetConfig, MPNetForPretraining

    tokenizer = MPNetTokenizer(vocab={token: i for i, token in enumerate(TINY_VOCAB)})
    path = tmp_path_factory.mktemp("small-vocab") / "ckpt"
    model = MPNetForPretraining(MPNetConfig.tiny(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                                                 hidden_size=32, num_attention_heads=2, intermediate_size=64))
    model.save_pretrained(path, tokenizer=tokenizer)
    return path


def test_vocabulary_mismatch_on_preprocessed_data_suggests_a_working_preprocess(prefix_shards, small_vocab_checkpoint,
                                                                               tmp_path):
    from cli_support import call_main, cli_main

    line = error_line(*run(tmp_path / "a", prefix_shards, "--max-steps", 1, f"training.init_from={small_vocab_checkpoint}"))
    assert "vocabulary mismatch" in line and "is already tokenized" in line, line
    assert f"preprocess-mpnet CORPUS --tokenizer {small_vocab_checkpoint} --output-dir NEW_DIR" in line
    new_dir = tmp_path / "retokenized"  # the advice, followed literally
    code, stderr = call_main(cli_main("preprocess"), prefix_shards.parent / "austen-prefix.txt", "--tokenizer",
                             small_vocab_checkpoint, "--output-dir", new_dir, "--workers", 1)
    assert code == 0, stderr
    code, stderr = run(tmp_path / "b", new_dir, "--max-steps", 1, f"training.init_from={small_vocab_checkpoint}")
    assert code == 0, stderr


def test_vocabulary_mismatch_on_raw_text_suggests_a_working_data_tokenizer(prefix_shards, small_vocab_checkpoint,
                                                                          tmp_path):
    text = prefix_shards.parent / "austen-prefix.txt"
    line = error_line(*run(tmp_path / "a", text, "--max-steps", 1, f"training.init_from={small_vocab_checkpoint}"))
    assert f"add data.tokenizer={small_vocab_checkpoint}" in line, line
    assert not (tmp_path / "a" / "data-cache").exists()  # refused before the text was tokenized
    code, stderr = run(tmp_path / "b", text, "--max-steps", 1, f"training.init_from={small_vocab_checkpoint}",
                       f"data.tokenizer={small_vocab_checkpoint}")
    assert code == 0, stderr


def test_a_model_vocab_size_that_is_not_the_datas(prefix_shards, tmp_path):
    line = error_line(*run(tmp_path / "a", prefix_shards, "--max-steps", 1, "model.vocab_size=500",
                           "model.mask_token_id=499"))
    assert "vocabulary mismatch: model.vocab_size has 500 tokens" in line and "drop model.vocab_size" in line, line


def test_compiled_training_follows_the_eager_run_and_resumes(prefix_shards, tmp_path, monkeypatch):
    """training.compile=true: the training model runs through torch.compile and the losses are the eager
    run's; a compiled run resumes (the checkpoint holds the model's own parameter names, not the compiled
    wrapper's) and a change of training.compile on --resume is allowed. torch.compile goes through
    aot_eager here (the graph dynamo and AOTAutograd build, without code generation: seconds on a CPU)."""
    import torch

    real_compile = torch.compile
    compiled_models = []

    def compile_for_test(model, **kwargs):
        compiled_models.append(type(model).__name__)
        return real_compile(model, backend="aot_eager", **kwargs)

    code, stderr = run(tmp_path / "eager", prefix_shards, "--max-steps", 4)
    assert code == 0, stderr
    monkeypatch.setattr(torch, "compile", compile_for_test)
    torch._dynamo.reset()
    code, stderr = run(tmp_path / "compiled", prefix_shards, "--max-steps", 2, "--save-every", 2,
                       "training.compile=true")
    assert code == 0, stderr
    code, stderr = run(tmp_path / "compiled", prefix_shards, "--max-steps", 4, "--resume", "training.compile=false")
    assert code == 0, stderr
    assert compiled_models == ["MPNetForPretraining"]  # the first run only: the resumed one is eager
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3, 4]
    assert compiled == pytest.approx(eager, rel=1e-5)


def test_compiled_layers_follow_the_eager_run(prefix_shards, tmp_path, monkeypatch):
    """training.compile_scope=layers: each encoder layer's forward goes through torch.compile (one compile
    serves all but the last, which has its own), the rest stays eager, and the losses are the eager run's
    (aot_eager, as above)."""
    import torch

    real_compile = torch.compile
    compiled = []

    def compile_for_test(fn, **kwargs):
        compiled.append(compiled_target(fn))
        return real_compile(fn, backend="aot_eager", **kwargs)

    code, stderr = run(tmp_path / "eager", prefix_shards, "--max-steps", 3)
    assert code == 0, stderr
    monkeypatch.setattr(torch, "compile", compile_for_test)
    torch._dynamo.reset()
    code, stderr = run(tmp_path / "layers", prefix_shards, "--max-steps", 3, "training.compile=true",
                       "training.compile_scope=layers")
    assert code == 0, stderr
    layers = yaml.safe_load((tmp_path / "layers" / "config.yaml").read_text())["model"]["num_hidden_layers"]
    assert compiled == ["MPNetLayer"] * layers
    assert train_losses(tmp_path / "layers") == pytest.approx(train_losses(tmp_path / "eager"), rel=1e-5)


def test_cuda_graph_compile_mode_reaches_torch_compile_and_marks_each_step(prefix_shards, tmp_path, monkeypatch):
    """training.compile_mode=reduce-overhead: torch.compile gets the mode, every optimizer step starts with
    torch.compiler.cudagraph_mark_step_begin (a CUDA-graph replay overwrites the previous one's outputs),
    and the losses are the eager run's. On a CPU no CUDA graph is replayed and this test compiles with
    aot_eager: it checks the plumbing; the GPU test below runs the graphs."""
    import torch

    real_compile = torch.compile
    modes, marks = [], []

    def compile_for_test(model, mode=None, **kwargs):
        modes.append(mode)
        return real_compile(model, backend="aot_eager", **kwargs)

    code, stderr = run(tmp_path / "eager", prefix_shards, "--max-steps", 3)
    assert code == 0, stderr
    monkeypatch.setattr(torch, "compile", compile_for_test)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    torch._dynamo.reset()
    code, stderr = run(tmp_path / "graphs", prefix_shards, "--max-steps", 3, "training.compile=true",
                       "training.compile_mode=reduce-overhead")
    assert code == 0, stderr
    assert modes == ["reduce-overhead"] and len(marks) == 3
    assert train_losses(tmp_path / "graphs") == pytest.approx(train_losses(tmp_path / "eager"), rel=1e-5)


def test_compile_auto_compiles_on_cuda_only(prefix_shards, tmp_path, monkeypatch):
    """training.compile=auto (configs/mpnet-base.yaml): compiled on CUDA (one process or torchrun: the compiled
    multi-process runs equal eager ones, test_multinode.py); here on a CPU the run stays eager (no torch.compile call, no CUDA-graph step marks even with
    compile_mode=reduce-overhead) and config.yaml keeps "auto"."""
    import torch

    from mpnet.training import toolkit
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert toolkit.compiles("auto", cuda)  # in one process and under torchrun alike
    assert not toolkit.compiles("auto", cpu) and toolkit.compiles(True, cpu) and not toolkit.compiles(False, cuda)
    calls = []
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: calls.append("compile"))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append("mark"))
    code, stderr = run(tmp_path / "auto", prefix_shards, "--max-steps", 2, "training.compile=auto",
                       "training.compile_mode=reduce-overhead")
    assert code == 0, stderr
    assert calls == []
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["training"]
    assert (saved["compile"], saved["compile_mode"]) == ("auto", "reduce-overhead")


@pytest.mark.parametrize("settings, needle", [
    (["training.compile=maybe"], "true, false or auto"),
    (["training.compile=true", "training.compile_mode=fast"], "one of default, reduce-overhead"),
    (["training.compile_mode=reduce-overhead"], "training.compile=true"),
    (["training.compile=true", "training.compile_mode=reduce-overhead", "training.grad_accum=2"],
     "needs training.grad_accum=1"),
    (["training.compile_scope=layers"], "training.compile=true"),
    (["training.compile=true", "training.compile_scope=rows"], "one of model, layers"),
    (["training.compile=true", "training.compile_scope=layers", "training.compile_mode=reduce-overhead"],
     "use compile_scope=model"),
])
def test_compile_mode_mistakes_are_one_line(prefix_shards, tmp_path, settings, needle):
    line = error_line(*run(tmp_path / "run", prefix_shards, "--max-steps", 1, *settings))
    assert needle in line, line


@pytest.mark.gpu
def test_cuda_graph_training_follows_the_eager_run_and_resumes(prefix_shards, tmp_path):
    """On a GPU, the triton backend with training.compile_mode=reduce-overhead (inductor, CUDA graphs)
    trains what the eager run trains: the same train losses over 6 steps (fp32, no dropout, so that no
    random draw differs), run in two halves with --resume."""
    common = ("--attention-backend", "triton", "training.bf16=false", "logging.keep_last=0",
              "model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0")
    code, stderr = run(tmp_path / "eager", prefix_shards, "--max-steps", 6, *common)
    assert code == 0, stderr
    graphs = ("training.compile=true", "training.compile_mode=reduce-overhead")
    # As in a run whose first call is the compiled one: nothing cached by the eager run above (a tensor
    # first made during inductor's warm-up would sit in the CUDA graphs' memory pool).
    triton_plan._bucket_tables_on.cache_clear()
    code, stderr = run(tmp_path / "graphs", prefix_shards, "--max-steps", 3, "--save-every", 3, *common, *graphs)
    assert code == 0, stderr
    code, stderr = run(tmp_path / "graphs", prefix_shards, "--max-steps", 6, "--resume", *common, *graphs)
    assert code == 0, stderr
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "graphs")
    assert sorted(compiled) == [1, 2, 3, 4, 5, 6]
    # fp32 throughout; inductor's fused kernels sum in another order than eager's: 1e-4 relative
    assert compiled == pytest.approx(eager, rel=1e-4)


@pytest.mark.gpu
def test_triton_compiled_by_layers_follows_the_eager_run(prefix_shards, tmp_path):
    """On a GPU, the triton backend with training.compile_scope=layers (inductor compiling each encoder layer in
    place, the triton kernels opaque ops in each layer's graph) trains what the eager run trains: the same train
    losses over 4 steps (fp32, no dropout)."""
    common = ("--attention-backend", "triton", "training.bf16=false", "logging.keep_last=0",
              "model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0", "--max-steps", 4)
    code, stderr = run(tmp_path / "eager", prefix_shards, *common)
    assert code == 0, stderr
    code, stderr = run(tmp_path / "layers", prefix_shards, *common, "training.compile=true",
                       "training.compile_scope=layers")
    assert code == 0, stderr
    eager, layers = train_losses(tmp_path / "eager"), train_losses(tmp_path / "layers")
    assert sorted(layers) == [1, 2, 3, 4]
    # fp32 throughout; inductor's fused kernels sum in another order than eager's: 1e-4 relative, as above
    assert layers == pytest.approx(eager, rel=1e-4)


def test_resume_before_the_first_checkpoint_uses_the_runs_own_config(prefix_shards, tmp_path):
    """A run stopped before its first checkpoint has only its config.yaml: --resume without --config trains that
    config (here a 32-wide model at lr 1e-3), not the built-in defaults, exactly as the first attempt did; a
    conflicting setting is refused by name."""
    run = tmp_path / "run"
    settings = ["--data", prefix_shards, *TINY_RUN, "optim.lr=1e-3", "--max-steps", 2, "--save-every", 2,
                "--log-every", 1]
    assert pretrain("--output-dir", run, *settings)[0] == 0
    first = train_losses(run)
    shutil.rmtree(run / "checkpoints")  # as if stopped before its first save
    (run / "metrics.jsonl").unlink()
    line = error_line(*pretrain("--output-dir", run, "--resume", "--data", prefix_shards, "optim.lr=0.01"))
    assert "optim.lr=0.01 conflicts with the run's 0.001" in line and "config.yaml" in line
    code, stderr = pretrain("--output-dir", run, "--resume", "--data", prefix_shards)
    assert code == 0, stderr
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["hidden_size"] == 32 and config["optim"]["lr"] == 1e-3
    assert config["training"]["max_steps"] == 2
    assert train_losses(run) == first


def test_a_metrics_log_cut_off_mid_line_does_not_block_resume(resumable, prefix_shards):
    """A crash while a row was being written leaves half a JSON line at the end of metrics.jsonl: --resume
    drops it (and every row after the checkpoint) instead of stopping with a JSONDecodeError."""
    jsonl = resumable / "metrics.jsonl"
    jsonl.write_text(jsonl.read_text() + '{"step": 5, "train/lo')
    code, stderr = run(resumable, prefix_shards, "--resume", "--max-steps", 6, "--save-every", 2)
    assert code == 0, stderr
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    assert sorted({r["step"] for r in rows if "train/loss" in r}) == list(range(1, 7))


def test_resume_takes_a_run_or_one_of_its_checkpoints(prefix_shards, resumable):
    """--resume PATH (HF's --resume_from_checkpoint, fairseq's --restore-file): the run directory alone (no
    --output-dir), or an older checkpoint of it to go back to once the newer ones are moved away."""
    import shutil

    code, stderr = pretrain("--resume", resumable, "--max-steps", 5)
    assert code in (0, None), stderr
    assert max(train_losses(resumable)) == 5
    older = resumable / "checkpoints" / "step-00000002"
    line = error_line(*pretrain("--resume", older, "--max-steps", 6))
    assert "2 newer checkpoint(s) are in the run (step-00000005 the newest); move them out of" in line, line
    for newer in ("step-00000004", "step-00000005"):
        shutil.move(resumable / "checkpoints" / newer, resumable / newer)
    code, stderr = pretrain("--resume", older, "--output-dir", resumable, "--max-steps", 3)
    assert code in (0, None), stderr
    assert max(train_losses(resumable)) == 3  # the metrics after step 2 were the abandoned branch's
    line = error_line(*pretrain("--resume", older, "--output-dir", resumable.parent / "elsewhere"))
    assert "belongs to the run" in line and "training.init_from" in line, line
    line = error_line(*pretrain("--resume", resumable.parent))
    assert "not a run directory" in line, line
    line = error_line(*pretrain("--max-steps", 3))
    assert "--output-dir is required" in line, line
