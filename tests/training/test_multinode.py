"""Several processes on CPU (gloo): every rank reads its own disjoint share of the data, and two torchrun
"nodes" rendezvousing over c10d train exactly like one process with the same global batch."""
from __future__ import annotations

import gzip
import itertools
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_support import cli_env
from pretrain_support import assert_same_run, train_losses

TINY = ["model.hidden_size=32", "model.num_attention_heads=2", "model.intermediate_size=64",
        "model.num_hidden_layers=2", "data.block_size=64", "training.batch_size=2", "logging.valid_every=5",
        "logging.valid_batches=2", "logging.progress_bar=false", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """~150 kB of the embedded Austen corpus, preprocessed (under a second)."""
    from mpnet.data import EMBEDDED_CORPUS, preprocess_corpus

    source = Path(EMBEDDED_CORPUS)
    files = sorted(source.glob("*.gz")) if source.is_dir() else [source]
    with gzip.open(files[0], "rt") as f:
        text = f.read(150_000)
    root = tmp_path_factory.mktemp("multinode")
    (root / "austen.txt").write_text(text.rsplit("\n\n", 1)[0])
    preprocess_corpus(root / "austen.txt", root / "data", tokenizer="default", valid_fraction=0.05, workers=1)
    return root / "data"


# ------------------------------------------------------------------------------- data per rank


class ReadRecorder:
    """Stands in for TokenBlocks' memory-mapped token array and records every [start, stop) read from it."""

    def __init__(self, tokens):
        self.array, self.reads = tokens, []

    def __getitem__(self, piece):
        self.reads.append((piece.start, piece.stop))
        return self.array[piece]


class FirstBlocks:
    """The first `count` blocks of a TokenBlocks: an epoch that a whole number of global batches covers."""

    def __init__(self, blocks, count):
        self.blocks, self.count, self.indices = blocks, count, []

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        self.indices.append(i)
        return self.blocks[i]


def read_by(world_size, rank, grad_accum, batch_size, shards, steps_in_epoch):
    """(block indices, token ranges read from the shard, collator calls) of one rank over one epoch."""
    from mpnet.data import TokenBlocks
    from mpnet.training.pretrain import StepBatches

    tokens = TokenBlocks(shards, "train", block_size=64)
    recorder = ReadRecorder(tokens.tokens)
    tokens._tokens = recorder
    blocks = FirstBlocks(tokens, steps_in_epoch * batch_size * grad_accum * world_size)
    calls = []

    def collator(examples, step, rank):
        calls.append((step, rank, [e.tolist() for e in examples]))
        return calls[-1]

    batches = StepBatches(blocks, collator, batch_size, grad_accum, world_size, rank, seed=3)
    for t in range(steps_in_epoch * grad_accum):
        batches[t]
    return blocks.indices, recorder.reads, calls


@pytest.mark.parametrize("world_size,grad_accum", [(2, 1), (2, 3), (4, 2)])
def test_ranks_read_disjoint_shares_that_cover_the_epoch(shards, world_size, grad_accum):
    batch_size, steps = 2, 5
    per_rank = [read_by(world_size, r, grad_accum, batch_size, shards, steps) for r in range(world_size)]
    epoch = steps * batch_size * grad_accum * world_size

    indices = [set(i) for i, _, _ in per_rank]
    assert all(len(i) == len(rank[0]) for i, rank in zip(indices, per_rank))  # no block read twice by a rank
    assert sum(len(i) for i in indices) == epoch and set().union(*indices) == set(range(epoch))

    # The bytes: each rank's reads from the memory-mapped shard are disjoint from every other rank's, and
    # together they are exactly the tokens of the epoch's blocks (a contiguous run from the shard's start).
    reads = sorted(r for _, rank_reads, _ in per_rank for r in rank_reads)
    assert reads[0][0] == 0
    for (_, stop), (start, _) in itertools.pairwise(reads):
        assert stop == start, "two reads overlap or leave a gap"
    from mpnet.data import TokenBlocks

    end = epoch * (64 - 2)  # stream position after the epoch's blocks; separators are not stored tokens
    assert reads[-1][1] == end - TokenBlocks(shards, "train", block_size=64).separators_before(end)

    # And micro-batch a of rank r is micro-batch a * world_size + r of one process accumulating over all of them
    # (same examples, same collator seed), which is why the losses match.
    _, _, single = read_by(1, 0, grad_accum * world_size, batch_size, shards, steps)
    for r, (_, _, calls) in enumerate(per_rank):
        for k, (step, micro, examples) in enumerate(calls):
            accum = k % grad_accum
            assert micro == accum * world_size + r
            assert single[step * grad_accum * world_size + micro] == (step, micro, examples)


def test_token_blocks_do_not_load_the_document_index(shards, tmp_path):
    """A corpus of many documents: the blocks equal the brute-force separated stream, and a TokenBlocks (what
    every rank and every DataLoader worker holds) keeps a 1/512 sample of the index, not all of it."""
    import shutil

    from mpnet.data import TokenBlocks

    out = tmp_path / "many-docs"
    shutil.copytree(shards, out)
    meta = json.loads((out / "metadata.json").read_text())
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 12, size=8_000)  # short documents, some empty; 16 strides of the index sample
    tokens = rng.integers(5, 1000, size=int(lengths.sum())).astype(meta["dtype"])
    tokens.tofile(out / "train.bin")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(out / "train.idx.npy", offsets)
    meta["num_tokens"]["train"] = len(tokens)
    (out / "metadata.json").write_text(json.dumps(meta))

    eos, bos = meta["eos_token_id"], meta["bos_token_id"]
    stream = np.concatenate([np.append(tokens[s:e], eos) for s, e in itertools.pairwise(offsets)])[:-1]
    for n in (5, 64, 509):
        blocks = TokenBlocks(out, "train", block_size=n)
        assert len(blocks) == -(-len(stream) // (n - 2))
        for i in range(len(blocks)):
            np.testing.assert_array_equal(blocks[i], np.concatenate([[bos], stream[i * (n - 2):(i + 1) * (n - 2)],
                                                                     [eos]]))
    import pickle

    assert len(blocks.sampled_separators) == -(-(len(lengths) - 1) // 512)
    assert len(pickle.dumps(blocks)) < offsets.nbytes // 10  # the workers' copy: no index inside


# ----------------------------------------------------------------------------- two torchrun nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_over_c10d_equal_one_process_with_same_global_batch(shards, tmp_path):
    common = ["--data", shards, "--max-steps", 4, "--log-every", 1, "--save-every", 100, *TINY]
    env = cli_env(OMP_NUM_THREADS="1")
    single = tmp_path / "single"
    result = subprocess.run([sys.executable, "-m", "mpnet_cli.pretrain", "--output-dir", str(single),
                             *map(str, common), "training.grad_accum=2"],
                            capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]

    # Two launches as on two machines (here both on 127.0.0.1): one process each, the rendezvous over c10d.
    nodes = tmp_path / "nodes"
    port = free_port()
    launches = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                                  "--nproc-per-node", "1", "--node-rank", str(rank), "--rdzv-backend", "c10d",
                                  "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "multinode-test",
                                  "-m", "mpnet_cli.pretrain", "--output-dir", str(nodes), *map(str, common)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                for rank in (0, 1)]
    outputs = []
    try:
        for launch in launches:
            outputs.append(launch.communicate(timeout=300))
    finally:
        for launch in launches:
            if launch.poll() is None:
                launch.kill()
    for launch, (_, stderr) in zip(launches, outputs):
        assert launch.returncode == 0, stderr[-3000:]

    assert sorted(train_losses(single)) == [1, 2, 3, 4]
    assert_same_run(single, nodes, step=4)


# ------------------------------------------------------------------ compiled under torchrun (DDP and FSDP2)


def torchrun(out: Path, shards, *overrides) -> str:
    """Two processes on this machine (gloo), 4 steps; returns the launch's stderr."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(free_port()), "-m", "mpnet_cli.pretrain", "--output-dir", str(out),
                             "--data", str(shards), "--max-steps", "4", "--log-every", "1", "--save-every", "100",
                             *TINY, *NO_DROPOUT, *overrides],
                            capture_output=True, text=True, timeout=600, env=cli_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


# Compiled code draws dropout masks from its own random stream, so with dropout the runs differ by design.
NO_DROPOUT = ["model.hidden_dropout_prob=0", "model.attention_probs_dropout_prob=0"]


@pytest.mark.slow
def test_compiled_ddp_and_fsdp2_runs_equal_the_eager_run(shards, tmp_path):
    """training.compile under torchrun (what `auto` does on CUDA): the compiled DDP and FSDP2 runs take the eager
    DDP run's steps, FSDP2 also with its layers compiled one by one (compile_scope=layers: FSDP2's per-layer
    gathers run around each compiled forward). Measured on CPU (torch 2.13): equal to the last bit; the bound allows inductor to reassociate
    the fp32 sums (at most 64 terms here: ~1e-6 relative). With dropout on, the compiled DDP run's losses
    differed from eager ones by 2e-3 to 1e-2 (another random stream): the bound is far below that."""
    torchrun(tmp_path / "eager", shards)
    eager = train_losses(tmp_path / "eager")
    for name, overrides in (("ddp", []), ("fsdp2", ["distributed.fsdp=true"]),
                            ("fsdp2-layers", ["distributed.fsdp=true", "training.compile_scope=layers"])):
        stderr = torchrun(tmp_path / name, shards, "training.compile=true", *overrides)
        assert stderr.count("torch.compile: the training model") == 2, stderr[-3000:]  # each rank compiled
        assert train_losses(tmp_path / name) == pytest.approx(eager, rel=1e-5), name
