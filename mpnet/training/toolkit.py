"""What every training loop and benchmark shares, defined once: device, autocast, seeding and RNG state,
the optimizer with its weight-decay rule, the learning-rate schedule, the optimizer step with its non-finite
policy, and peak memory.

Pretraining (pretrain.py), fine-tuning (finetune.py), the backend comparison and the benchmarks
(mpnet/bench/) all import from here, so a rule changed here changes everywhere at once.
"""
from __future__ import annotations

import functools
import random
import warnings

import numpy as np
import torch

from ..errors import UserError
from .distributed import DistEnv
from .safety import NonFiniteGuard


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


# What torch.compile covers: "model" (one graph of the whole forward) or "layers" (regional compilation:
# each repeated block compiled in place, the rest eager; one compile serves every layer of one shape but the
# last, which gets its own: `behind_own_code`). On a 2-core CPU, mpnet-base's first compiled step (dense
# backend, 2 x 128, fresh compile caches): 101 s as one graph, 37 s by layers; on an H100 (triton backend,
# 32 x 512) 138 s and 15.2 s, for a step of 51.6 and 55.4 ms (docs/benchmarks.md).
COMPILE_SCOPES = ("model", "layers")


def scope_fits_mode(scope: str, mode: str) -> bool:
    """By layers, each layer is compiled on its own; CUDA graphs (CUDA_GRAPH_MODES) are replayed for the whole
    model only."""
    return not (scope == "layers" and mode in CUDA_GRAPH_MODES)


def repeated_blocks(model) -> list:
    """The model's repeated blocks: the members of its longest ModuleList whose members share one class (a
    transformer's layers: MPNet's mpnet.encoder.layer, BERT's bert.encoder.layer)."""
    lists = [m for m in model.modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) > 1 and len({type(x) for x in m}) == 1]
    return list(max(lists, key=len)) if lists else []


def compile_model(model, mode: str = "default", scope: str = "model"):
    """torch.compile in one of COMPILE_MODES ("default": torch's default, inductor without CUDA graphs) over
    one of COMPILE_SCOPES. "layers" compiles each block's forward in place and returns the model itself: the
    parameter names stay the model's (checkpoints), and module hooks (FSDP2's gathers) run around the
    compiled forward, outside the graph."""
    mode = None if mode == "default" else mode
    if scope == "model":
        return torch.compile(model, mode=mode)
    blocks = repeated_blocks(model)
    if not blocks:
        raise UserError(f"compile scope 'layers': {type(model).__name__} has no repeated layers to compile")
    *others, last = blocks
    for block in others:
        block.forward = torch.compile(block.forward, mode=mode)
    last.forward = torch.compile(behind_own_code(last.forward), mode=mode)
    return model


def behind_own_code(forward):
    """`forward` called through a function of its own. Dynamo keeps its compiled graphs, and the argument
    values it has seen, per code object: a last block called with an argument the others never get (MPNet's
    last layer computes only the rows the loss reads, from `first_row` on; every other layer gets 0) would
    fail the others' guard, and its recompile would make that argument a symbol (automatic dynamic shapes),
    tracing the row slices and the triton backend's row plan over symbolic sizes. Behind its own code the last
    block compiles with the value it gets, a constant in its graph. MPNet compiles two layer graphs either way
    (its last layer was a recompile); a model whose layers all get the same arguments (BERT) compiles one
    layer's graph more."""
    @functools.wraps(forward)
    def last_block_forward(*args, **kwargs):
        return forward(*args, **kwargs)
    return last_block_forward


def compiles(setting: bool | str, device: torch.device) -> bool:
    """Whether training.compile = setting compiles here: "auto" compiles on CUDA, in one process or under torchrun
    (one process measured: H200, mpnet-base 32 x 512, triton backend, in the trainer: 19.9% MFU eager, 25.4%
    compiled, 25.6% with CUDA graphs; docs/benchmarks.md). Under torchrun the compiled DDP and FSDP2 runs equal
    the eager one (tests/training/test_multinode.py, gloo on CPU). The CPU stays eager unless asked: compiling
    takes longer than the short runs a CPU is used for."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


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


# --------------------------------------------------------------------------------- the optimizer step


class OptimizerStep:
    """The one optimizer step of every loop: pretraining's Trainer, fine-tuning and the step benchmark
    (mpnet/bench/step.py) run their steps through it, so a step does the same in all three:

        start()                        once per step (CUDA graphs: the previous replay's outputs may be overwritten)
        out = forward(compute)         compute() under `autocast` (bf16 on CUDA; float32 on CPU)
        backward(loss, micro_batches)  gradients of loss / micro_batches, accumulated over a step's micro-batches
        update(step, loss_sum)         clip the gradient norm (clip_grad_norm <= 0: measured, not clipped), the
                                       non-finite guard around optimizer.step(), the schedule's step, zero_grad

    The non-finite policy, one for every loop: a step whose loss or gradient norm is NaN or infinite makes no
    update (weights, AdamW moments and step count stay as they were) while the schedule still advances, so the
    step number stays the data position. `poll` counts the skipped steps, passing a line on each to `note`,
    and raises safety.NonFiniteError, naming the likely cause, once `max_nonfinite_steps` came in a row
    (pretraining and fine-tuning: training.max_nonfinite_steps; the step benchmark: 1, since a skipped step
    is not the step it measures). safety.NonFiniteGuard says how the check costs no host sync with fused AdamW.
    """

    def __init__(self, model, optimizer, scheduler, device: torch.device, bf16: bool, clip_grad_norm: float,
                 max_nonfinite_steps: int, compile_mode: str = "default", env=None, skipped: int = 0,
                 lr_name: str = "optim.lr", warmup_name: str | None = "optim.warmup_steps"):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device, self.bf16, self.compile_mode = device, bf16, compile_mode
        self.max_norm = clip_grad_norm if clip_grad_norm > 0 else float("inf")
        env = env or DistEnv(device=device)
        self.guard = NonFiniteGuard(max_nonfinite_steps, env, optimizer.defaults["lr"], skipped=skipped,
                                    on_device=bool(optimizer.defaults.get("fused")) and not env.fsdp,
                                    lr_name=lr_name, warmup_name=warmup_name)

    def start(self):
        if self.compile_mode in CUDA_GRAPH_MODES:  # a CUDA-graph replay overwrites the previous one's outputs
            torch.compiler.cudagraph_mark_step_begin()

    def forward(self, compute):
        with autocast(self.device, self.bf16):
            return compute()

    def backward(self, loss: torch.Tensor, micro_batches: int = 1):
        (loss / micro_batches).backward()

    def update(self, step: int, loss_sum: torch.Tensor):
        """Returns the gradient norm before clipping and whether the step was finite (device tensors with
        fused AdamW: no host sync here)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        finite = self.guard.step(self.optimizer, step, loss_sum, grad_norm)
        if self.scheduler is not None:
            with warnings.catch_warnings():  # torch warns of a scheduler step after a skipped update: meant
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, finite

    def poll(self, note, last_good_checkpoint=None):
        """Count the skipped steps since the last poll (safety.NonFiniteGuard.poll)."""
        self.guard.poll(last_good_checkpoint, note)


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
