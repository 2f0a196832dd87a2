"""What every training loop and benchmark shares, defined once: device, autocast, seeding and RNG state,
the optimizer with its weight-decay rule, the learning-rate schedule, atomic file writes, peak memory,
and the versions recorded beside every result.

Pretraining (pretrain.py), fine-tuning (finetune.py), the backend comparison and the benchmarks
(mpnet/bench/) all import from here, so a rule changed here changes everywhere at once.
"""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError


# ------------------------------------------------------------------------------------------ device


def resolve_device(name: str | None = None) -> torch.device:
    """`name` ('cpu', 'cuda', 'cuda:1') or, when None/empty, the GPU if there is one."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}': CUDA is not available on this machine")
    return device


# torch.compile's modes. "reduce-overhead" and "max-autotune" replay CUDA graphs: no host launch time
# between the kernels (on an H200, in the trainer, mpnet-base 32 x 512 with the triton backend: 25.4% MFU
# in the default mode, 25.6% with CUDA graphs; docs/benchmarks.md). A replay overwrites the
# previous one's outputs, so a training loop marks each step, and gradients accumulated over micro-batches
# would be overwritten: the training configs allow CUDA graphs with grad_accum 1 only.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_model(model, mode: str = "default"):
    """torch.compile in one of COMPILE_MODES ("default": torch's default, inductor without CUDA graphs)."""
    return torch.compile(model, mode=None if mode == "default" else mode)


def compiles(setting: bool | str, device: torch.device, world_size: int = 1) -> bool:
    """Whether training.compile = setting compiles here: "auto" compiles on CUDA in one process, the case
    measured (H200, mpnet-base 32 x 512, triton backend, in the trainer: 19.9% MFU eager, 25.4% compiled,
    25.6% with CUDA graphs; docs/benchmarks.md); several processes and the CPU stay eager unless asked."""
    if setting == "auto":
        return device.type == "cuda" and world_size == 1
    return bool(setting)


def mark_step(mode: str):
    """Start of a training step under CUDA graphs: the previous replay's outputs may be overwritten."""
    if mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, bf16: bool = True):
    """bf16 autocast on CUDA; on CPU training stays in float32 (bf16 CPU matmuls are slower, not faster)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------- seeding


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, device: torch.device):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------- optimizer, schedule


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """BERT/RoBERTa practice: no weight decay on biases and LayerNorm weights, i.e. on the 1-d parameters."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, lr: float, betas, eps: float, weight_decay: float, device: torch.device):
    """AdamW over `weight_decay_groups`; the fused CUDA kernel on GPUs (one launch for all parameters)."""
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(weight_decay_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, **fused)


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, schedule: str = "linear", power: float = 1.0,
                  floor: float = 0.0) -> float:
    """Linear warmup to the peak over warmup_steps, then linear/polynomial decay to `floor` x peak at
    max_steps, or constant. `schedule`: linear | polynomial | constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    power = 1.0 if schedule == "linear" else power
    return floor + (1 - floor) * (1 - progress) ** power


SCHEDULES = ("linear", "polynomial", "constant")


def lr_scheduler(optimizer, warmup_steps: int, max_steps: int, schedule: str = "linear", power: float = 1.0,
                 floor: float = 0.0):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, max_steps, schedule, power, floor))


# ------------------------------------------------------------------------------------------ files


def write_json_atomic(path, data: dict):
    """Write to PATH.tmp, then rename: a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def check_output_dir(out_dir, overwrite: bool, what: str = "this output") -> Path:
    """out_dir as a Path, refused in one line when it is a file, holds something and overwrite is not set,
    or is or holds a training run or checkpoint anywhere below it (even with overwrite: its training state
    would be lost). The one rule of every command that writes a directory; `what` names the output, e.g.
    'the conversion'."""
    out_dir = Path(out_dir).expanduser()
    found = training_checkpoint_in(out_dir)
    if found is not None:
        raise UserError(f"{out_dir} holds a training checkpoint ({found}); write {what} to a new directory "
                        "(nothing was changed)")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output directory {out_dir} is a file; choose a directory")
    if out_dir.exists() and not overwrite and any(out_dir.iterdir()):
        raise UserError(f"output directory {out_dir} already exists and is not empty "
                        f"(choose another one, or overwrite it with --overwrite)")
    return out_dir


def training_checkpoint_in(path) -> Path | None:
    """The training checkpoint that `path` is, holds anywhere below it, or would pose as (None if none): a
    directory with training_state/, a run directory with checkpoints/step-*, any folder below `path` that is
    one of these (what --overwrite would delete), or a new checkpoints/step-* that --resume would take for the
    newest step of that run. Nothing but pretraining ever writes there."""
    from .checkpointing import PREFIX, STATE_FILE, checkpoint_root

    def run_part(folder: Path) -> Path | None:
        if (folder / STATE_FILE.parent).exists():
            return folder / STATE_FILE.parent
        root = checkpoint_root(folder)
        if root.is_dir():
            steps = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX))
            if steps:
                return steps[-1]
        return None

    path = Path(path)
    found = run_part(path)
    if found is None and path.is_dir():
        for root, folders, _ in os.walk(path):
            found = next((f for f in (run_part(Path(root) / name) for name in folders) if f is not None), None)
            if found is not None:
                break
    if found is None and path.parent.name == checkpoint_root(Path()).name and path.name.startswith(PREFIX):
        found = path
    return found


def fsync_tree(directory):
    """Flush every file under `directory`, then the directory entries themselves, to the disk: after a
    rename that follows, a power loss cannot leave the new name pointing at empty files."""
    directory = Path(directory)
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_directory(path)  # (a file's descriptor flushes the same way)
    fsync_directory(directory)


def fsync_directory(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_directory_atomic(target, write):
    """The one way a directory is (re)written: `write(tmp)` fills .tmp-NAME beside TARGET, which is flushed
    to the disk and renamed into place; a previous TARGET stays (as .old-NAME) until the new one is complete.
    On any error the partial directory is removed and the previous TARGET is back under its name."""
    target = Path(target)
    tmp, old = target.with_name(f".tmp-{target.name}"), target.with_name(f".old-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        fsync_tree(tmp)  # file contents and entries on the disk before the name says "complete"
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_directory(target.parent)  # the rename itself
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_model_atomic(model, tokenizer, target):
    """An HF model directory (weights, config, tokenizer) written by `write_directory_atomic`."""
    write_directory_atomic(target, lambda tmp: model.save_pretrained(tmp, tokenizer=tokenizer))


def versions() -> dict:
    import transformers

    from .. import __version__

    return {"mpnet": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"}


# ----------------------------------------------------------------------------------- memory meter


class PeakMemory:
    """Peak memory of a phase: CUDA max allocated, or on Linux CPUs the process's peak RSS (VmHWM),
    which writing "5" to /proc/self/clear_refs resets. None where neither is available."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.kind = None

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind is None:
            return None
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None
