"""The installed torch and triton are inside the range the Triton backend is supported in, and every
private Triton API its kernels reach is still there.

The range is constraints.txt's range lines (`torch>=...,<...`; its `==` lines are the versions CI
runs); the private APIs are `triton_internals.PRIVATE_APIS`. A drift fails here, naming the version or
the API and why the backend needs it, instead of as an obscure error inside a kernel. Without triton
(the CPU CI) only torch and the constraints themselves can be checked; the triton test says so when it
skips.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from mpnet.modeling.triton_internals import PRIVATE_APIS, PrivateApi, missing_private_apis, triton

CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"


def _requirements():
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            yield Requirement(line)


def _is_pin(requirement) -> bool:
    return any(spec.operator in ("==", "===") for spec in requirement.specifier)


def supported_ranges() -> dict[str, SpecifierSet]:
    """Package name -> the intersection of its range lines in constraints.txt."""
    ranges = {}
    for requirement in _requirements():
        if not _is_pin(requirement):
            ranges[requirement.name] = ranges.get(requirement.name, SpecifierSet()) & requirement.specifier
    return ranges


def _inside(version: str, name: str) -> bool:
    # A local build (2.13.0+cpu) or a source build (2.11.0a0+git...) is the release it is built from.
    return supported_ranges()[name].contains(Version(version), prereleases=True)


def test_constraints_pin_a_range_for_torch_and_triton_that_holds_ci_s_torch():
    ranges = supported_ranges()
    assert {"torch", "triton"} <= set(ranges), f"constraints.txt has no range line for {({'torch', 'triton'} - set(ranges))}"
    for name, spec in ranges.items():
        operators = {s.operator for s in spec}
        assert operators & {">", ">="} and operators & {"<", "<="}, (
            f"constraints.txt: '{name}{spec}' should be a closed range (>=low,<high)")
    pins = {r.name: r.specifier for r in _requirements() if _is_pin(r)}
    for pinned in pins["torch"]:  # the torch CI runs must be one the backend supports
        assert ranges["torch"].contains(pinned.version), (
            f"constraints.txt pins torch {pinned.version}, outside the supported range {ranges['torch']}")


def test_installed_torch_is_in_the_supported_range():
    assert _inside(torch.__version__, "torch"), (
        f"torch {torch.__version__} is outside the range the Triton backend is supported in "
        f"({supported_ranges()['torch']}, constraints.txt): check its kernels against the dense backend "
        "(tests/modeling/test_triton_attention.py, on a GPU too), then widen the range")


@pytest.mark.skipif(triton is None, reason="triton is not installed (a CPU-only install): its version and the "
                                           "private APIs of triton_internals.PRIVATE_APIS are not checked here; "
                                           "torch's version and constraints.txt's ranges are")
def test_installed_triton_is_in_the_supported_range_with_every_private_api_the_kernels_use():
    assert _inside(triton.__version__, "triton"), (
        f"triton {triton.__version__} is outside the range the Triton backend is supported in "
        f"({supported_ranges()['triton']}, constraints.txt): check the private APIs in triton_internals.py and "
        "the kernels against the dense backend, then widen the range")
    missing = missing_private_apis()
    assert not missing, "the installed triton lacks private APIs the Triton backend needs:\n" + "\n".join(
        f"- {api.qualified_name}: {api.why}" for api in missing)
    gone = PrivateApi("triton.language.standard", "_a_combiner_no_triton_has", "")  # the check itself sees a loss
    assert missing_private_apis((*PRIVATE_APIS, gone)) == [gone]
