"""A wheel install works outside the checkout: the run configs and the GLUE recipes ship inside the package.

Before, configs/ was not package data: outside the checkout `finetune-mpnet` skipped the task's recipe without a
word (lr 2e-5 and clipping 1.0 instead of configs/glue/sst2.yaml's 1e-5 and no clipping) and `--config
configs/mpnet-tiny.yaml` worked only from the repository root. Here the wheel is built, installed into a fresh
virtual environment (it sees this environment's torch and transformers, not this checkout), and both commands
run from a folder outside the checkout, naming a packaged config.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _run(argv, cwd, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                            **kwargs)
    assert result.returncode == 0, (argv, result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.mark.slow
def test_a_wheel_install_runs_the_packaged_configs_from_any_directory(tmp_path):
    from fixtures import write_glue
    from pretrain_support import embedded_prefix

    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
          REPO], cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("mpnet-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], cwd=tmp_path)
    bin_dir = venv / "bin"
    _run([bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", wheel],
         cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([bin_dir / "python", "-c", "import mpnet, mpnet.training.config as c; "
                  "print(mpnet.__file__); print(c.config_dir())"], cwd=elsewhere).stdout.split()
    assert all(str(venv) in line for line in where), where  # the wheel's package and its configs, not the checkout

    corpus = embedded_prefix(elsewhere / "corpus.txt")
    _run([bin_dir / "pretrain-mpnet", "--config", "mpnet-tiny", "--output-dir", "run", "--data", corpus,
          "--max-steps", 2, "--no-progress", "model.hidden_size=32", "model.num_attention_heads=2",
          "model.intermediate_size=64", "data.block_size=32", "training.batch_size=2", "logging.valid_batches=1"],
         cwd=elsewhere)
    recorded = yaml.safe_load((elsewhere / "run" / "config.yaml").read_text())
    assert recorded["optim"]["lr"] == 2e-3 and recorded["optim"]["warmup_steps"] == 30  # configs/mpnet-tiny.yaml's

    glue = write_glue("sst2", elsewhere / "glue", n_train=16, n_dev=8)
    _run([bin_dir / "finetune-mpnet", "--checkpoint", elsewhere / "run" / "checkpoints" / "step-00000002",
          "--task", "sst2", "--data-dir", glue, "--output-dir", "ft", "--epochs", 1, "--max-length", 32,
          "--no-progress"], cwd=elsewhere)
    training = json.loads((elsewhere / "ft" / "results.json").read_text())["config"]["training"]
    assert training["lr"] == 1e-5 and training["clip_grad_norm"] == 0.0  # configs/glue/sst2.yaml's recipe
