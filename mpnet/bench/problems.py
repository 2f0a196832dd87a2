"""What the attention cells run: the sweep's settings (`AttentionSettings`, the cells it may name), its
inputs (two-stream positions and layouts, random q/k/v and tables), the attention modules under test
with identity projections, and SDPA as a module of the same interface. attention.py builds and times
the cells from these."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..modeling.config import MPNetConfig
from .harness import DTYPES, check_attention_sweep
from .flex_variants import parse_flex_variants
from .triton_tiles import parse_tile_variants

# The cells `--backends` may name. A cell is a way of computing one layer's attention: SDPA (the ceiling and
# a user's own materialised bias), the dense module with its state built per call or once, and the flex and
# triton backends without and with each --windows entry. The model's backends are modeling/backends.py's.
ATTENTION_CELLS = ("sdpa", "sdpa-bias", "dense", "dense-once", "flex", "flex-window", "triton", "triton-window")
WINDOWED = {"flex-window": "flex", "triton-window": "triton"}  # one cell per --windows entry
STREAMS = {"two": "attention", "one": "single"}  # streams -> section key
SINGLE_STREAM_LENGTHS = [128, 512]


@dataclass
class AttentionSettings:
    streams: str = "two"  # "two": the pretraining pair; "one": single stream (fine-tuning, inference)
    lengths: list = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192])
    tokens_per_batch: int = 16384
    heads: int = 12
    head_dim: int = 64
    windows: list = field(default_factory=lambda: [256, 1024])
    backends: list = field(default_factory=lambda: list(ATTENTION_CELLS))
    dtype: str = "bf16"
    device: str | None = None  # cpu, cuda, cuda:N; None: the GPU if there is one
    backward: bool = True  # forward + backward (GPU); forward only on CPU
    warmup: int = 3
    repeats: int = 20
    max_seconds: float = 3.0  # stop repeating a cell after this much timing (at least 3 runs)
    with_projections: bool = False  # time the q/k/v/o Linear layers too
    attention_dropout: float = 0.1  # the dense module's attention dropout, as in mpnet-base training
    layers: int = 12  # sdpa-bias: its per-forward build and gradient reduction are shared by this many layers
    pred_ratio: float = 0.15
    num_buckets: int = 32
    max_distance: int = 128
    seed: int = 0
    flex_kernel_options: dict | None = None  # override of the project's flex kernel options (experiments)
    cuda_graphs: bool = False  # also time GRAPHED_CELLS' fwd+bwd replayed as one CUDA graph (no host time)
    profile: bool = False  # break PROFILED_CELLS' runs down by GPU kernel (torch.profiler; CUDA only)
    # The triton cells once per entry (triton_tiles.py): the kernels' own tiles ("default"), other tiles for
    # one kernel ("dkdv=32x64s3"), or a part left out to price it ("no-bias"). Empty: the backend as it runs.
    triton_tiles: list = field(default_factory=list)
    # The flex cells once per entry (flex_variants.py): "default", parts left out, bias-table copies, kernel options.
    flex_variants: list = field(default_factory=list)

    def validate(self, device: torch.device):
        check_attention_sweep(self, device, "heads", "head_dim", "layers")
        if self.streams not in STREAMS:
            raise UserError(f"streams must be one of {', '.join(STREAMS)}, got {self.streams!r}")
        if any(w <= 0 for w in self.windows):
            raise UserError(f"--windows must be positive integers, got {self.windows}")
        unknown = [b for b in self.backends if b not in ATTENTION_CELLS]
        if unknown or not self.backends:
            raise UserError(f"unknown attention cell(s) {unknown or '(none)'} in --backends; pick from "
                            f"{', '.join(ATTENTION_CELLS)}")
        if self.cuda_graphs and device.type != "cuda":
            raise UserError("--cuda-graphs times CUDA-graph replays: it needs a CUDA device (drop it on CPU)")
        if set(WINDOWED) & set(self.backends) and not self.windows:
            raise UserError("backends flex-window and triton-window need --windows (e.g. 256,1024)")
        if self.triton_tiles:
            if device.type != "cuda":
                raise UserError("--triton-tiles times the Triton kernels, which run on CUDA GPUs only: drop it on CPU")
            if not {"triton", "triton-window"} & set(self.backends):
                raise UserError("--triton-tiles varies the triton cells: add triton or triton-window to --backends")
            parse_tile_variants(self.triton_tiles)
        if self.flex_variants:
            if device.type != "cuda":
                raise UserError("--flex-variants times flex's compiled kernels, which train on CUDA GPUs only: drop it "
                                "on CPU")
            if not {"flex", "flex-window"} & set(self.backends):
                raise UserError("--flex-variants varies the flex cells: add flex or flex-window to --backends")
            variants = parse_flex_variants(self.flex_variants)  # a bad entry: one line
            if self.flex_kernel_options and any(v.options for v in variants):
                raise UserError("kernel options come from --flex-kernel-options or from --flex-variants entries "
                                "(over the backend's own), not both")


def pred_size(length: int, ratio: float = 0.15) -> int:
    return max(1, int(round(ratio * length)))


# ------------------------------------------------------------------------------------------ inputs


@dataclass
class AttentionProblem:
    """One length's inputs, shared by every cell of it."""

    length: int
    batch: int
    n: int
    m: int
    positions: torch.Tensor  # (B, n + 2m) original positions
    hidden: torch.Tensor  # (B, n + 2m, heads x head_dim): q = hidden, k = v = its content rows
    grad_out: torch.Tensor
    table: torch.Tensor  # (buckets, heads) relative-bias table, requires grad

    @property
    def rows(self) -> int:
        return self.n + 2 * self.m

    @property
    def kv_len(self) -> int:
        return self.n + self.m


def two_stream_positions(batch, n, m, generator) -> torch.Tensor:
    """What the collator produces: a random permutation per row, the last m predicted, then the m
    appended <mask> entries of each stream at the predicted tokens' original positions."""
    perm = torch.stack([torch.randperm(n, generator=generator) for _ in range(batch)])
    return torch.cat([perm, perm[:, n - m:], perm[:, n - m:]], dim=1)


def make_attention_problem(settings: AttentionSettings, length: int, device) -> AttentionProblem:
    gen = torch.Generator().manual_seed(settings.seed + length)
    batch = settings.tokens_per_batch // length
    n = length
    m = pred_size(length, settings.pred_ratio) if settings.streams == "two" else 0
    size = settings.heads * settings.head_dim
    # Under bf16 autocast q/k/v leave the projections in bf16; the residual stream entering them is fp32.
    dtype = torch.float32 if settings.with_projections else DTYPES[settings.dtype]
    hidden = torch.randn(batch, n + 2 * m, size, generator=gen).to(device, dtype).requires_grad_(settings.backward)
    grad_out = torch.randn(batch, n + 2 * m, size, generator=gen).to(device, dtype)
    table = (torch.randn(settings.num_buckets, settings.heads, generator=gen) * 0.02).to(device).requires_grad_(True)
    if m:
        positions = two_stream_positions(batch, n, m, gen)
    else:
        positions = torch.arange(n).expand(batch, n).contiguous()
    return AttentionProblem(length, batch, n, m, positions.to(device), hidden, grad_out, table)


def module_config(settings: AttentionSettings) -> MPNetConfig:
    hidden = settings.heads * settings.head_dim
    return MPNetConfig(hidden_size=hidden, num_attention_heads=settings.heads, num_hidden_layers=1,
                       intermediate_size=4 * hidden, attention_probs_dropout_prob=settings.attention_dropout,
                       relative_attention_num_buckets=settings.num_buckets,
                       relative_attention_max_distance=settings.max_distance)


def attention_module(cls, settings: AttentionSettings, device) -> nn.Module:
    """The backend's module, in training mode (the dense one applies its attention dropout); without
    `with_projections` q/k/v/o become identities, so q = hidden and k = v = its content rows."""
    module = cls(module_config(settings)).to(device).train()
    return module if settings.with_projections else identity_projections(module)


def identity_projections(module: nn.Module) -> nn.Module:
    """The attention core only: q/k/v/o become identities, so q = hidden and k = v = its content rows."""
    for name in ("q", "k", "v", "o"):
        setattr(module, name, nn.Identity())
    return module


class SDPAAttention(nn.Module):
    """All rows in ONE `scaled_dot_product_attention` call (n + 2m query rows against the n + m
    content keys), with the modules' head split and merge; `attn_mask` (B, H, rows, keys) or None."""

    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, hidden // config.num_attention_heads
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, hidden, kv_len, kernels, attn_mask=None):
        from torch.nn.attention import sdpa_kernel

        b, length, _ = hidden.shape
        split = lambda x: x.view(b, x.shape[1], self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        content = hidden[:, :kv_len]
        q, k, v = split(self.q(hidden)), split(self.k(content)), split(self.v(content))
        with sdpa_kernel(kernels):
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o(context.transpose(1, 2).reshape(b, length, -1))
