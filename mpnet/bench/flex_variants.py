"""`--flex-variants`: the flex cells of the attention sweep once per entry, to price the parts of the flex
pair and to choose its kernel options and bias-table copies (docs/benchmarks.md, "The flex path's parts").

An entry is `default` (the backend as it trains), or '+'-joined changes to it:

- `no-bias-gradient`, `no-bias`, `no-mask`: leave that part out (the table without a gradient, no
  score_mod, no BlockMask): timing only, the results are then wrong;
- `copies=QxK`: the relative-bias table copied Q x K times, the score of (query row q, key k) reading copy
  (q % Q) * K + k % K, so the kernel's atomic adds of the table's gradient spread over more addresses
  (the backend's own: `BIAS_GRAD_REPLICAS` x 1); the copies' gradients are summed back into the table;
- `OPTION=VALUE`: a flex kernel option (torch's FlexKernelOptions, e.g. `BLOCK_M1=64`, `num_stages=2`,
  `PRESCALE_QK=1`; `fwd_` / `bwd_` before num_warps, num_stages or a block size set it for one pass):
  the backend's `CUDA_KERNEL_OPTIONS` with these changed.

Copies and kernel options change the speed, never the result (the forward is tested equal on CPU).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import UserError
from .harness import parse_entries

LEFT_OUT = ("no-bias-gradient", "no-bias", "no-mask")
_COPIES = re.compile(r"copies=(\d+)x(\d+)")
_OPTION = re.compile(r"([a-z_0-9]+)=(\d+|true|false)", re.IGNORECASE)
PER_PASS = ("num_warps", "num_stages", "BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")


def kernel_option_names() -> set:
    from torch.nn.attention.flex_attention import FlexKernelOptions

    names = set(FlexKernelOptions.__annotations__)
    return names | {f"{p}_{name}" for p in ("fwd", "bwd") for name in PER_PASS}


@dataclass(frozen=True)
class FlexVariant:
    name: str  # the entry as given
    copies: tuple | None = None  # (Q, K) or None: the backend's own
    options: tuple = ()  # ((name, value), ...) over the backend's kernel options
    leave_out: frozenset = frozenset()

    def kernel_options(self, dtype: torch.dtype) -> dict | None:
        """The flex call's kernel_options: the backend's own with this entry's changes (None: unchanged)."""
        if not self.options:
            return None
        from ..modeling.attention import CUDA_KERNEL_OPTIONS

        return {**CUDA_KERNEL_OPTIONS.get(dtype, CUDA_KERNEL_OPTIONS[torch.float32]), **dict(self.options)}


def _bad(entry: str, problem: str) -> UserError:
    return UserError(f"--flex-variants entry '{entry}': {problem}. An entry is 'default' or '+'-joined changes: "
                     f"{', '.join(LEFT_OUT)}, copies=QxK (e.g. copies=16x16) and OPTION=VALUE flex kernel options "
                     "(e.g. BLOCK_M1=64, bwd_num_warps=8, PRESCALE_QK=1)")


def _value(text: str):
    lowered = text.lower()
    return lowered == "true" if lowered in ("true", "false") else int(text)


def parse_flex_variant(entry: str) -> FlexVariant:
    text = entry.strip()
    if text.lower() == "default":
        return FlexVariant(text)
    copies, options, left_out = None, {}, set()
    known = None
    for part in filter(None, (p.strip() for p in text.split("+"))):
        if part.lower() in LEFT_OUT:
            left_out.add(part.lower())
        elif part.lower().startswith("copies="):
            found = _COPIES.fullmatch(part.lower())
            if not found:
                raise _bad(entry, f"cannot read '{part}' (copies=QxK, e.g. copies=16x16)")
            q, k = int(found.group(1)), int(found.group(2))
            if copies is not None:
                raise _bad(entry, "copies= is given twice")
            if not (1 <= q <= 4096 and 1 <= k <= 4096 and q * k <= 16384):
                raise _bad(entry, f"'{part}': Q and K from 1 to 4096, Q x K at most 16384")
            copies = (q, k)
        elif found := _OPTION.fullmatch(part):
            known = known or kernel_option_names()
            name = next((n for n in known if n.lower() == found.group(1).lower()), None)
            if name is None:
                raise _bad(entry, f"'{found.group(1)}' is not a flex kernel option (torch's FlexKernelOptions)")
            if name in options:
                raise _bad(entry, f"'{name}' is changed twice")
            options[name] = _value(found.group(2))
        else:
            raise _bad(entry, f"cannot read '{part}'")
    if copies is None and not options and not left_out:
        raise _bad(entry, "empty entry")
    if copies is not None and left_out & {"no-bias", "no-bias-gradient"}:
        raise _bad(entry, "copies= spreads the bias gradient: it cannot go with no-bias or no-bias-gradient")
    return FlexVariant(text, copies, tuple(sorted(options.items())), frozenset(left_out))


def parse_flex_variants(entries) -> list[FlexVariant]:
    return parse_entries(entries, parse_flex_variant, "--flex-variants")
