"""The triton package as the Triton attention backend uses it, and every PRIVATE Triton API it reaches.

Private names may change in any release, so the backend reaches them here and nowhere else:
`PRIVATE_APIS` lists each one with why it is needed, and `missing_private_apis()` says which of them an
installed triton lacks. constraints.txt pins the torch and triton range the backend is supported in;
tests/modeling/test_triton_support.py fails, naming what drifted, when the installed versions leave
that range or a listed API is gone. (The backend uses no private torch API: its torch side is
`torch.library.custom_op` and `torch.compiler.is_compiling`, both public.)

Without the triton package this module still imports, with `triton` None, and the backend's entry
points say what is missing.
"""
from __future__ import annotations

import importlib
import os
import types
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; every entry point says what is missing
    triton = None
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)


@dataclass(frozen=True)
class PrivateApi:
    module: str
    name: str
    why: str

    @property
    def qualified_name(self) -> str:
        return f"{self.module}.{self.name}"


PRIVATE_APIS = (
    PrivateApi("triton.runtime.interpreter", "InterpretedFunction",
               "runs a kernel in Triton's interpreter when the backend decides to (no GPU found), not only when "
               "TRITON_INTERPRET=1 was set before the kernels were defined: triton.jit reads only the variable"),
    PrivateApi("triton.runtime.interpreter", "_patch_lang_tensor",
               "wrapped so that the interpreter converts a loaded scalar through its single element: numpy >= 2.4 "
               "refuses int() of a 1-element array, which breaks every loop with a run-time bound (triton "
               "issue 9171)"),
    PrivateApi("triton.language.standard", "_sum_combine",
               "the combine function of tl.sum, given to tl.reduce/tl.associative_scan: tl.sum itself is a @jit "
               "function made when triton was imported, and one made without TRITON_INTERPRET cannot run in the "
               "interpreter, while tl.reduce with this combiner runs in both"),
    PrivateApi("triton.language.standard", "_elementwise_max", "the combine function of tl.max, for the same reason"),
    PrivateApi("triton.language.standard", "_elementwise_min", "the combine function of tl.min, for the same reason"),
)


def _resolve(api: PrivateApi):
    return getattr(importlib.import_module(api.module), api.name)


def missing_private_apis(apis=PRIVATE_APIS) -> list[PrivateApi]:
    """The APIs the installed triton lacks (none without triton: nothing to check)."""
    if triton is None:
        return []
    missing = []
    for api in apis:
        try:
            _resolve(api)
        except (ImportError, AttributeError):
            missing.append(api)
    return missing


# The kernels run in Triton's interpreter (numpy, CPU tensors) when asked to, or when there is no GPU.
INTERPRET = triton is not None and (os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available())

# tl.reduce's combiners (PRIVATE_APIS says why not tl.sum/max/min); None without triton.
SUM_COMBINE = MAX_COMBINE = MIN_COMBINE = None
if triton is not None:
    SUM_COMBINE, MAX_COMBINE, MIN_COMBINE = (tl.standard._sum_combine, tl.standard._elementwise_max,
                                             tl.standard._elementwise_min)


def _interpreter_accepts_numpy_scalars():
    """Triton 3.6's interpreter converts a loaded scalar (a 1-element numpy array) to a Python int with
    int(array), which numpy >= 2.4 refuses, so a loop with a run-time bound fails (triton issue 9171).
    Convert through the array's single element instead; nothing changes outside the interpreter."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "accepts_numpy_scalars", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch.accepts_numpy_scalars = True
    interpreter._patch_lang_tensor = patch


def kernel(fn):
    """The kernels' decorator: triton.jit, or Triton's interpreter where INTERPRET (the function itself
    without triton, so that the kernels' module still imports)."""
    if triton is None:
        return fn
    if INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction

        _interpreter_accepts_numpy_scalars()
        return InterpretedFunction(fn)
    return triton.jit(fn)
