"""The inputs the attention cells run on: two-stream positions and layouts, random q/k/v and tables, the
attention modules under test with identity projections, and SDPA as a module of the same interface."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.config import MPNetConfig
from .harness import (
    DTYPES,
)

if TYPE_CHECKING:
    from .attention import AttentionSettings


def pred_size(length: int, ratio: float = 0.15) -> int:
    return max(1, int(round(ratio * length)))


# ------------------------------------------------------------------------------------------ inputs


@dataclass
class Problem:
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


def make_problem(settings: AttentionSettings, length: int, device) -> Problem:
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
    return Problem(length, batch, n, m, positions.to(device), hidden, grad_out, table)


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
