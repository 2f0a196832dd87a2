"""The attention parameters every backend shares: four linear maps with HF MPNet's names.

Each backend's module (dense and flex in attention.py, Triton in triton_attention.py) subclasses
`AttentionProjections` and adds only its `forward`, so the parameters, their names and therefore the
checkpoints are the same under every backend.
"""
from __future__ import annotations

from torch import nn


class AttentionProjections(nn.Module):
    """The four linear maps shared by both streams (HF names: attn.q, attn.k, attn.v, attn.o)."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q = nn.Linear(config.hidden_size, config.hidden_size)
        self.k = nn.Linear(config.hidden_size, config.hidden_size)
        self.v = nn.Linear(config.hidden_size, config.hidden_size)
        self.o = nn.Linear(config.hidden_size, config.hidden_size)

    def _heads(self, x):
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

    def project(self, hidden, kv_len, first_row: int = 0):
        """Queries for the rows from first_row on (default every row); keys and values from the content
        stream (first kv_len rows)."""
        content = hidden[:, :kv_len]
        return self._heads(self.q(hidden[:, first_row:])), self._heads(self.k(content)), self._heads(self.v(content))

    def merge(self, context):
        b, _, length, _ = context.shape
        return self.o(context.transpose(1, 2).reshape(b, length, -1))
