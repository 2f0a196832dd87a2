"""What the pretraining input pipeline sustains per CPU core, to size `data.num_workers` for a GPU.

Runs the training loop's own data path (StepBatches: block reads from the memory-mapped shard, then the
MPNet collator: permutation, 80/10/10 corruption, padding) through a torch DataLoader exactly as
pretrain-mpnet builds it, with nothing else consuming the batches, and prints a table:

    python scripts/input_pipeline_throughput.py                          # embedded corpus, 128 and 512, 0-2 workers
    python scripts/input_pipeline_throughput.py --data data/my-corpus --block-sizes 512 --workers 0,4,8,16

- tokens/s (wall): batches delivered to the training process per second (median of the runs, and the range);
  on a machine shared with other work this moves with the load.
- tokens/s per busy core: tokens per CPU-second spent by the producers (the workers' own CPU time read from
  /proc, or the training process's at num_workers=0), i.e. what one dedicated core sustains; it hardly
  depends on the load.
- training-process CPU ms per batch: what the training process itself pays per batch (building it at
  num_workers=0; receiving it from shared memory otherwise).

num_workers=0 builds batches in the training process itself, on one thread (torch.set_num_threads(1));
DataLoader workers are single-threaded by default. A GPU consuming T tokens/s needs at least
T / (tokens/s per busy core) workers, plus headroom (see docs/distributed.md). Linux only (/proc).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_seconds(pid) -> float:
    """User + system CPU time of a process so far (Linux /proc; the workers are other processes)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(blocks, collator, batch_size, num_workers, seconds) -> dict:
    """Steady-state production: the first batches (worker start-up, the prefetch queue filling, the epoch's
    shuffle) are drawn before the clocks start. Returns batches, wall seconds, and CPU seconds spent by the
    producers (the workers, or the training process itself at num_workers=0) and by the training process."""
    from mpnet.training.pretrain import StepBatches

    micro = StepBatches(blocks, collator, batch_size, 1, 1, 0, seed=0)
    loader = torch.utils.data.DataLoader(micro, batch_size=None, num_workers=num_workers, generator=torch.Generator(),
                                         sampler=range(10**9))
    batches = iter(loader)
    for _ in range(2 * 2 * max(1, num_workers) + 2):  # 2 = DataLoader's prefetch_factor
        next(batches)
    workers = [w.pid for w in getattr(batches, "_workers", [])]
    count, start, consumer = 0, time.perf_counter(), time.process_time()
    producers = sum(cpu_seconds(pid) for pid in workers)
    while time.perf_counter() - start < seconds:
        next(batches)
        count += 1
    elapsed, consumer = time.perf_counter() - start, time.process_time() - consumer
    producers = sum(cpu_seconds(pid) for pid in workers) - producers if workers else consumer
    del batches  # shuts the workers down
    return {"batches": count, "wall": elapsed, "producer_cpu": producers, "consumer_cpu": consumer}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="embedded",
                        help="raw text or a preprocessed directory (default: the embedded Austen corpus)")
    parser.add_argument("--cache-dir", default=None, help="where raw text is preprocessed (default: a temp dir)")
    parser.add_argument("--block-sizes", type=int_list, default=[128, 512])
    parser.add_argument("--workers", type=int_list, default=[0, 1, 2], help="num_workers values to run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per cell; the median is reported")
    parser.add_argument("--whole-word-mask", action="store_true")
    parser.add_argument("--document-isolation", action="store_true")
    args = parser.parse_args(argv)

    from tabulate import tabulate

    from mpnet.data import MPNetCollator, TokenBlocks, load_tokenizer, read_metadata, resolve_data, word_starts
    from mpnet.errors import UserError

    torch.set_num_threads(1)
    scratch = None if args.cache_dir else tempfile.TemporaryDirectory(prefix="input-pipeline-")
    try:
        shard_dir = resolve_data(args.data, Path(args.cache_dir or scratch.name), tokenizer="default")
    except UserError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    meta = read_metadata(shard_dir)
    tokenizer = load_tokenizer(str(Path(shard_dir) / "tokenizer"))
    collator = MPNetCollator(meta["vocab_size"], meta["pad_token_id"], meta["mask_token_id"],
                             meta["special_token_ids"], whole_word_mask=args.whole_word_mask,
                             word_starts=word_starts(tokenizer) if args.whole_word_mask else None,
                             document_separator_id=meta["eos_token_id"] if args.document_isolation else None)

    print(f"{datetime.date.today()} · {cpu_name()} · {os.cpu_count()} cores visible · load average "
          f"{os.getloadavg()[0]:.1f} · Python {platform.python_version()}, torch {torch.__version__}, "
          f"numpy {np.__version__}")
    print(f"data: {shard_dir} ({meta['num_tokens']['train']:,} training tokens) · batch {args.batch_size} · "
          f"whole-word mask {args.whole_word_mask} · document isolation {args.document_isolation} · "
          f"{args.repeats} x {args.seconds:g} s per cell, median", flush=True)

    rows = []
    for n in args.block_sizes:
        blocks = TokenBlocks(shard_dir, "train", block_size=n)
        for workers in args.workers:
            runs = [measure(blocks, collator, args.batch_size, workers, args.seconds) for _ in range(args.repeats)]
            tokens = args.batch_size * n
            rates = [r["batches"] * tokens / r["wall"] for r in runs]
            per_cpu_second = statistics.median(r["batches"] * tokens / r["producer_cpu"] for r in runs)
            consumer_ms = statistics.median(r["consumer_cpu"] / r["batches"] for r in runs) * 1e3
            rows.append([n, workers, f"{statistics.median(rates):,.0f}", f"{min(rates):,.0f}-{max(rates):,.0f}",
                         f"{per_cpu_second:,.0f}", f"{tokens / per_cpu_second * 1e3:.2f}", f"{consumer_ms:.2f}"])
            print(f"  block {n}, num_workers {workers}: {statistics.median(rates):,.0f} tokens/s, "
                  f"{per_cpu_second:,.0f} tokens per producer CPU-second", file=sys.stderr, flush=True)
    headers = ["block size", "num_workers", "tokens/s (wall)", "range over runs", "tokens/s per busy core",
               "producer CPU ms per batch", "training-process CPU ms per batch"]
    print(tabulate(rows, headers, tablefmt="github", disable_numparse=True))
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
