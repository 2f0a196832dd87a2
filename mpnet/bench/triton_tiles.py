"""`--triton-tiles`: the triton cells of the attention sweep once per tile setting, to choose the kernels'
tiles and to price their parts (docs/benchmarks.md, "The Triton kernels alone").

An entry is `default` (the backend's own tiles, `default_tiles`), or '+'-joined changes to it:

- `fwd=MxN[wW][sS]`, `dkdv=...`, `dq=...`: the forward, dK/dV or dQ kernel's tiles (block_m x block_n,
  W warps, default 4, S pipeline stages, default 2), e.g. `dkdv=32x64s3`, `fwd=128x64w8`;
- `no-bias`, `no-bias-gradient`, `no-mask`: leave that part out of the kernels (`KernelTiles.leave_out`):
  timing only, the results are then wrong.

Tiles change the speed of the kernels, never their result (tests/modeling/test_triton_attention.py).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from ..errors import UserError
from .harness import parse_entries

KERNELS = {"fwd": "forward", "dkdv": "key_gradients", "dq": "query_gradients"}  # entry name -> KernelTiles field
LEFT_OUT = {"no-bias": "bias", "no-bias-gradient": "bias_gradient", "no-mask": "mask"}  # -> KernelTiles.leave_out
_TILES = re.compile(r"(\d+)x(\d+)(?:w(\d+))?(?:s(\d+))?")


@dataclass(frozen=True)
class TileVariant:
    name: str  # the entry as given
    tiles: tuple = ()  # (KernelTiles field, (block_m, block_n, warps, stages)), ...
    leave_out: frozenset = frozenset()

    def kernel_tiles(self, dtype: torch.dtype, single_stream: bool):
        """The launch's KernelTiles: the backend's default for this problem with the entry's changes."""
        from ..modeling.triton_launch import Tiles, default_tiles

        base = default_tiles(dtype, single_stream=single_stream)
        changes = {kernel: Tiles(*numbers) for kernel, numbers in self.tiles}
        return dataclasses.replace(base, **changes, leave_out=self.leave_out)


def _bad(entry: str, problem: str) -> UserError:
    return UserError(f"--triton-tiles entry '{entry}': {problem}. An entry is 'default' or '+'-joined changes: "
                     f"{'=MxN[wW][sS], '.join(KERNELS)}=MxN[wW][sS] (e.g. dkdv=32x64s3) and {', '.join(LEFT_OUT)}")


def parse_tile_variant(entry: str) -> TileVariant:
    text = entry.strip().lower()
    if text == "default":
        return TileVariant(entry.strip())
    tiles, left_out = {}, set()
    for part in filter(None, (p.strip() for p in text.split("+"))):
        if part in LEFT_OUT:
            left_out.add(LEFT_OUT[part])
            continue
        kernel, sep, shape = part.partition("=")
        found = _TILES.fullmatch(shape)
        if not sep or kernel not in KERNELS or not found:
            raise _bad(entry, f"cannot read '{part}'")
        block_m, block_n, warps, stages = (int(x) if x else default
                                           for x, default in zip(found.groups(), (0, 0, 4, 2)))
        if not all(16 <= b <= 256 and b & (b - 1) == 0 for b in (block_m, block_n)):
            raise _bad(entry, f"'{part}': block sizes are powers of two from 16 to 256")
        if warps not in (1, 2, 4, 8, 16) or not 1 <= stages <= 8:
            raise _bad(entry, f"'{part}': warps are 1, 2, 4, 8 or 16 and stages 1 to 8")
        if KERNELS[kernel] in tiles:
            raise _bad(entry, f"'{kernel}' is changed twice")
        tiles[KERNELS[kernel]] = (block_m, block_n, warps, stages)
    if not tiles and not left_out:
        raise _bad(entry, "empty entry")
    return TileVariant(entry.strip(), tuple(sorted(tiles.items())), frozenset(left_out))


def parse_tile_variants(entries) -> list[TileVariant]:
    return parse_entries(entries, parse_tile_variant, "--triton-tiles")
