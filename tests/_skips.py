"""Skips that name what is missing, and fail instead where the env exists to test it.

A test that cannot run because something is not installed here (a package, a tool, an upstream
source folder) skips, naming the thing and how to get it. That is right on a developer's
machine and wrong in a tox env whose purpose is that very thing: a broken install there would
otherwise pass as "skipped". So every such skip goes through `missing(name, reason)`, and each
tox env lists in ``CALPLUG_REQUIRE`` (comma-separated) the names it exists to test; where the
variable names it, `missing` fails the test with the same reason.

Skips of what does not apply here (a class this transformers release lacks, a contrast a decoder
refuses by design) stay plain ``pytest.skip``: nothing is missing. tests/skip_report.py lists, per
env, every skip by reason and fails CI on one its table does not expect.

Names (what ``CALPLUG_REQUIRE`` may list): the package or tool itself (``deepspeed``, ``peft``,
``trl``, ``accelerate``, ``tensorboard``, ``hypothesis``, ``pillow``, ``tokenizers``, ``timm``,
``scipy``, ``git``, ``chromium``, ``gloo``) or an upstream codebase (``llava``, ``llava-next``, ``mgm``) or
``patches`` (the patch files' upstream files and the wheel install `tox -e patches` makes).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import NoReturn

import pytest

REQUIRE = "CALPLUG_REQUIRE"


def required() -> frozenset[str]:
    """The names ``$CALPLUG_REQUIRE`` lists (empty when unset)."""
    return frozenset(n.strip() for n in os.environ.get(REQUIRE, "").split(",") if n.strip())


def missing(name: str, reason: str) -> NoReturn:
    """Skip because ``name`` is missing here (``reason`` says what it is and how to get it); fail
    instead where ``$CALPLUG_REQUIRE`` names it."""
    if name in required():
        pytest.fail(f"{reason} [{REQUIRE} names {name!r}: this env exists to run it, so a skip "
                    "would hide a broken install]", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def is_the_package(error: ModuleNotFoundError, module: str) -> bool:
    """Whether ``error`` says ``module`` itself (or its top-level package) is not installed, and not
    that something it imports is missing."""
    return error.name is not None and (module == error.name or module.startswith(error.name + "."))


def importorskip(module: str, name: str, hint: str):
    """Import ``module``; if it is not installed, `missing` (``name``, "<module> is not installed:
    <hint>"). Any other failure, a missing dependency of an installed package included, is raised
    as it is: it must not pass as "not installed"."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if not is_the_package(error, module):
            raise
        missing(name, f"{module} is not installed: {hint}")


def needs(name: str, available: bool, reason: str):
    """A marker for a whole test or module: where ``available`` is False the test skips naming
    ``reason`` (tests/conftest.py applies it at setup), or fails where ``$CALPLUG_REQUIRE`` names
    ``name``."""
    return pytest.mark.calplug_needs(name=name, available=bool(available), reason=reason)


def apply_needs(item) -> None:
    """tests/conftest.py's setup hook: every `needs` marker of ``item`` that is not available."""
    for mark in item.iter_markers("calplug_needs"):
        if not mark.kwargs["available"]:
            missing(mark.kwargs["name"], mark.kwargs["reason"])


def module_found(module: str) -> bool:
    """Whether ``module`` is installed (its spec found), without importing it."""
    return importlib.util.find_spec(module) is not None


def skip_unrunnable_family(family) -> None:
    """Skip a family of tests/_hf_families.py this environment cannot run: plainly where this
    transformers release lacks it or breaks it (nothing to install), through `missing` where
    what it needs (``family.needs``, e.g. timm) is not installed."""
    reason = family.skip_reason()
    if reason is None:
        return
    if family.available() and getattr(family, "needs", None):
        missing(family.needs, reason)
    pytest.skip(reason, allow_module_level=True)
