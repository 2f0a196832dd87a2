"""The numerics tests again under 1 and 2 intra-op threads (OMP_NUM_THREADS), in fresh processes.

A CPU's thread count changes how torch splits its reductions, so float sums come out in another order. A
tolerance that holds only for the order of the machine a test was written on fails elsewhere (it did: the
packed-evaluation test on another 2-core machine). Every tolerance of these tests comes from the arithmetic;
running them at two thread counts here shows a machine-dependent one before it lands.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMERICS_TESTS = [
    "tests/modeling/test_hf_parity.py",  # our forward against transformers' MPNet
    "tests/modeling/test_packing.py",  # packed rows against one sequence at a time
    "tests/training/test_finetune_packing.py",  # packed evaluation and training against padded
    "tests/training/test_golden_loss.py",  # the recorded losses of a fixed run
]


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_the_numerics_tests_hold_at_another_thread_count(threads):
    import torch

    if threads == torch.get_num_threads():
        pytest.skip(f"{threads} threads is this run's own count: the suite itself ran these tests so")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
                           *NUMERICS_TESTS], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
