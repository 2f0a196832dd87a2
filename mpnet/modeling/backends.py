"""The attention backends, each described once: its module, its per-forward state and what it can do.

Every backend is an `nn.Module` with the four shared projections (projections.py) and a state builder
that turns one forward's positions, rules and (buckets, heads) relative-bias table into what every
layer reads. What a backend can do (on which devices it trains and runs, which attention patterns,
document isolation and pretraining objectives it computes) is written in its entry here and nowhere
else: the model factory, `MPNetConfig`, the commands' --attention-backend choices, the pretraining and
fine-tuning checks, compare-mpnet-backends and the step benchmark all read `ATTENTION_BACKENDS`.
tests/modeling/test_backends.py checks each entry against what its backend computes.

Adding a backend: a module beside attention.py (its `nn.Module` subclassing `AttentionProjections` and
its state builder), an entry below, and its tests against the dense backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import UserError
from .attention import FlexTwoStreamAttention, RelativeMultiHeadAttention, dense_state, flex_state
from .patterns import PATTERN_NAMES, PATTERNS, WINDOW_NAMES, AttentionPattern, as_pattern

# (positions, n, m, relative_bias_table, max_distance, *, pattern, document_ids, layer, layout, streams)
# -> the state every layer of one forward reads (masks.py describes the layout)
StateBuilder = Callable[..., object]


class BackendUnavailable(UserError):
    """A backend asked for what it cannot do here: a device, pattern, objective or documents it lacks."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend computes, and where. Device types as torch names them ("cpu", "cuda"); None: any."""

    trains_on: frozenset[str] | None  # devices with a backward pass
    runs_on: frozenset[str] | None  # devices with a forward pass (inference under torch.no_grad())
    # Rules of patterns.py it applies (masks and score mods); the sliding window (sliding_window_size,
    # window:W, neighbourhood:R) is among them: WINDOW_NAMES.
    patterns: frozenset[str]
    documents: bool  # document isolation (packed rows: `document_ids`)
    # Pretraining objectives (model.OBJECTIVES) it computes, None: every one (each is a layout of the same
    # rules, masks.STREAM_RULES); single-stream encoding is the "mlm" layout.
    objectives: frozenset[str] | None
    attention_dropout: bool  # whether it applies config.attention_probs_dropout_prob
    # Packed fine-tuning batches get a multiple of this many rows (rows of padding only, which change no
    # result): a kernel compiled per input shape then meets fewer shapes.
    packed_rows_multiple: int = 1


@dataclass(frozen=True)
class AttentionBackend:
    """One backend: its name (`MPNetConfig.attention_backend`), how to load its module class and state
    builder, what it can do, and, in one clause, why a device it lacks cannot serve."""

    name: str
    load: Callable[[], tuple[type[nn.Module], StateBuilder]]  # imported on first use where that spares a package
    capabilities: Capabilities
    device_limits: str = ""  # e.g. "FlexAttention has no backward pass on CPU in PyTorch"

    @property
    def module_class(self) -> type[nn.Module]:
        return self.load()[0]

    @property
    def make_state(self) -> StateBuilder:
        return self.load()[1]

    def trains_on(self, device) -> bool:
        return _on(self.capabilities.trains_on, device)

    def runs_on(self, device) -> bool:
        return _on(self.capabilities.runs_on, device)

    def unsupported(self, pattern: str | AttentionPattern | None = None, *, documents: bool = False,
                    objective: str | None = None) -> list[str]:
        """What of a job this backend cannot compute (empty: it can): pattern parts as written, then
        "document isolation" and "the <objective> objective"."""
        pattern = as_pattern(pattern)
        missing = pattern.parts_outside(self.capabilities.patterns)
        if documents and not self.capabilities.documents:
            missing.append("document isolation")
        objectives = self.capabilities.objectives
        if objective is not None and objectives is not None and objective not in objectives:
            missing.append(f"the {objective} objective")
        return missing

    def refusal(self, device, *, training: bool, pattern=None, documents: bool = False,
                objective: str | None = None) -> str | None:
        """Why this backend cannot do the job on `device` (one line), or None when it can."""
        device = torch.device(device)
        if not (self.trains_on(device) if training else self.runs_on(device)):
            verb, devices = ("train", self.capabilities.trains_on) if training else ("run", self.capabilities.runs_on)
            return (f"the {self.name} attention backend cannot {verb} on {device.type.upper()}: {self.device_limits}; "
                    f"{verb} it on {' or '.join(sorted(d.upper() for d in devices))}, or use the dense backend here "
                    "(a checkpoint runs under every backend)")
        missing = self.unsupported(pattern, documents=documents, objective=objective)
        if missing:
            able = [name for name, other in ATTENTION_BACKENDS.items()
                    if not other.unsupported(pattern, documents=documents, objective=objective)]
            return (f"the {self.name} attention backend does not compute {', '.join(missing)} (its patterns: "
                    f"{_usages(self.capabilities.patterns)}); use the {' or '.join(able)} backend for that")
        return None

    def check(self, device, *, training: bool, pattern=None, documents: bool = False, objective: str | None = None):
        """Raise BackendUnavailable (one line) unless this backend can do the job on `device`."""
        problem = self.refusal(device, training=training, pattern=pattern, documents=documents, objective=objective)
        if problem:
            raise BackendUnavailable(problem)


def _on(devices: frozenset[str] | None, device) -> bool:
    return devices is None or torch.device(device).type in devices


def _usages(names: frozenset[str]) -> str:
    if names == PATTERN_NAMES:
        return "all of patterns.py"
    return ", ".join(dict.fromkeys(entry.usage for entry in PATTERNS.values() if entry.name in names))


def _triton():
    # Imported on first use: its kernels need the triton package, which a CPU install may not have.
    from .triton_attention import TritonTwoStreamAttention, make_triton_attention_state

    return TritonTwoStreamAttention, make_triton_attention_state


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    backend.name: backend for backend in (
        AttentionBackend(
            "dense", lambda: (RelativeMultiHeadAttention, dense_state),
            Capabilities(trains_on=None, runs_on=None, patterns=PATTERN_NAMES, documents=True,
                         objectives=None, attention_dropout=True)),
        AttentionBackend(
            "flex", lambda: (FlexTwoStreamAttention, flex_state),
            Capabilities(trains_on=frozenset({"cuda"}), runs_on=frozenset({"cpu", "cuda"}), patterns=PATTERN_NAMES,
                         documents=True, objectives=None, attention_dropout=False, packed_rows_multiple=4),
            device_limits="FlexAttention has no backward pass on CPU in PyTorch (its CPU forward serves inference)"),
        AttentionBackend(
            "triton", _triton,
            Capabilities(trains_on=frozenset({"cuda"}), runs_on=frozenset({"cuda"}), patterns=WINDOW_NAMES,
                         documents=True, objectives=None, attention_dropout=False, packed_rows_multiple=4),
            device_limits="its Triton kernels run on CUDA GPUs only (on CPU only in Triton's interpreter, for tests)"),
    )
}
ATTENTION_BACKEND_NAMES = tuple(ATTENTION_BACKENDS)


def attention_backend(name: str) -> AttentionBackend:
    """The registry entry of a backend named in `MPNetConfig.attention_backend`."""
    if name not in ATTENTION_BACKENDS:
        raise UserError(f"unknown attention backend '{name}'; choose one of {', '.join(ATTENTION_BACKEND_NAMES)}")
    return ATTENTION_BACKENDS[name]


def two_stream_self_attention_factory(config) -> nn.Module:
    """The attention module of one layer, by `config.attention_backend`: the dense reference, FlexAttention
    or the Triton kernels. Every backend has the same parameters, so checkpoints move between them."""
    return attention_backend(config.attention_backend).module_class(config)
