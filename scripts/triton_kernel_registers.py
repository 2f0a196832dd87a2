"""Registers and spills of the Triton backend's kernels, compiled for a GPU without one (no GPU needed).

    python scripts/triton_kernel_registers.py [--arch 90] [--leave-out bias,mask] [--natural]
        [--forward M,N,WARPS,STAGES] [--key-gradients ...] [--query-gradients ...]

Compiles the forward, dK/dV and dQ kernels as the launchers do for a bf16 problem with 12 heads x 64 and
the 32-bucket table (the same compile-time constants, tiles and launch options; pointers and strides
marked divisible by 16, as Triton specializes them for torch's allocations), then asks ptxas for each
kernel's registers and spill bytes. A kernel at 255 registers that spills is slower than the same
kernel without: on the H200 the forward spilled with the bias and the rule mask together (255
registers, 60 spilled as the driver reported them) until the masks went first (docs/benchmarks.md).
Here, for the same kernels: 255 registers and 296 bytes of spill stores before, 4 bytes after; without
bias and mask 182 / 188 / 90 registers for forward / dK,dV / dQ, the H200's own counts. --natural
compiles the dK/dV kernel's single-stream variant (NATURAL). Needs the triton package (its bundled
ptxas); nothing runs on a GPU.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

torch.cuda.is_available = lambda: True  # before the kernels' module is imported: compiled, not interpreted
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from mpnet.modeling import triton_launch as T  # noqa: E402
from mpnet.modeling import triton_plan as P  # noqa: E402
from mpnet.modeling import triton_kernels as K  # noqa: E402

HEADS, HEAD_DIM, BUCKETS, MAX_DISTANCE = 12, 64, 32, 128
POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "DO": "*bf16", "DQ": "*bf16", "DK": "*bf16",
            "DV": "*bf16", "LSE": "*fp32", "DELTA": "*fp32", "BIAS": "*fp32", "DB": "*fp32", "BUCKET": "*i32",
            "PLAN": "*i32"}


def launch_constants(leave_out: frozenset, natural: bool, tiles: dict | None = None) -> dict:
    """kernel name -> (compile-time constants, Tiles), as _launch_forward / _launch_backward pass them;
    tiles: KernelTiles field -> Tiles replacing the default's."""
    q = torch.empty(1, HEADS, 512, HEAD_DIM, dtype=torch.bfloat16, device="meta")
    bias = torch.empty(HEADS, 2 * MAX_DISTANCE + 1, device="meta")
    buckets = P.bucket_layout(BUCKETS, MAX_DISTANCE)
    base = T.default_tiles(torch.bfloat16, single_stream=natural)
    chosen = {"forward": base.forward, "key_gradients": base.key_gradients, "query_gradients": base.query_gradients,
              **(tiles or {})}
    tiles = T.KernelTiles(**chosen, leave_out=leave_out)
    settings = T.LaunchSettings(0, False, False, BUCKETS, MAX_DISTANCE, HEAD_DIM ** -0.5, tiles)
    common = T._common(settings, buckets, HEADS, q, q, bias)
    scales = dict(qk_scale=settings.scale * K.LOG2E, sm_scale=settings.scale)
    key_gradients = dict(BUCKET_LEFT=buckets.bucket_left, BUCKET_RIGHT=buckets.bucket_right,
                         BUCKETS=P.bucket_slots(BUCKETS), NATURAL=natural, **T._left_out(tiles, gradient=True))
    return {"_forward_kernel": ({**common, **scales, **T._left_out(tiles)}, tiles.forward),
            "_key_gradients_kernel": ({**common, **scales, **key_gradients}, tiles.key_gradients),
            "_query_gradients_kernel": ({**common, **scales, **T._left_out(tiles)}, tiles.query_gradients)}


def ptxas_report(kernel, constants: dict, tiles, arch: int) -> str:
    constants = {**constants, "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n}
    names = [param.name for param in kernel.params]
    # What the kernel declares tl.constexpr is compiled in; the rest (LQ, LK, strides) are run-time
    # arguments, as in a launch.
    signature = {param.name: "constexpr" if param.is_constexpr else POINTERS.get(param.name, "i32")
                 for param in kernel.params}
    divisible = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
                 if signature[name] != "constexpr" and (name in POINTERS or name.startswith("stride"))}
    compiled_in = {name: value for name, value in constants.items() if signature.get(name) == "constexpr"}
    source = triton.compiler.ASTSource(kernel, signature, compiled_in, divisible)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as ptx:
        ptx.write(compiled.asm["ptx"])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    result = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}a", ptx.name, "-o", os.devnull], capture_output=True,
                            text=True)
    os.unlink(ptx.name)
    lines = [line.split("info    : ")[-1].strip() for line in result.stderr.splitlines()
             if "registers" in line or "spill" in line or "Performance" in line]
    return " / ".join(lines) or result.stderr.strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--leave-out", default="", help=f"parts to leave out, timing only: {', '.join(T.LEAVE_OUT_PARTS)}")
    parser.add_argument("--natural", action="store_true", help="the dK/dV kernel's single-stream variant")
    for kernel in ("forward", "key-gradients", "query-gradients"):
        parser.add_argument(f"--{kernel}", metavar="M,N,WARPS,STAGES", default=None,
                            help=f"the {kernel} kernel's tiles instead of the default ones")
    args = parser.parse_args(argv)
    tiles = {}
    for field in ("forward", "key_gradients", "query_gradients"):
        value = getattr(args, field)
        if value is not None:
            try:
                tiles[field] = T.Tiles(*(int(x) for x in value.split(",")))
            except (TypeError, ValueError):
                parser.error(f"--{field.replace('_', '-')} takes four integers M,N,WARPS,STAGES; got {value}")
    leave_out = frozenset(part for part in args.leave_out.split(",") if part)
    if not leave_out <= set(T.LEAVE_OUT_PARTS):
        parser.error(f"--leave-out takes {', '.join(T.LEAVE_OUT_PARTS)}; got {args.leave_out}")
    for name, (constants, tiles) in launch_constants(leave_out, args.natural, tiles).items():
        print(f"{name} ({tiles.block_m}x{tiles.block_n}, {tiles.num_warps} warps, {tiles.num_stages} stages): "
              f"{ptxas_report(getattr(K, name), constants, tiles, args.arch)}")


if __name__ == "__main__":
    main()
