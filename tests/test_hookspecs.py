"""Meta-tests that keep the hook contract honest (after datasette): every hook is documented
with its exact signature, and every hook is exercised by some test."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from inferopt import _hookspecs as hookspecs
from inferopt._manager import hook_names

ROOT = Path(__file__).resolve().parent.parent
HOOKS = hook_names()


def test_hook_names_share_one_prefix():
    assert HOOKS and all(h.startswith("inferopt_") for h in HOOKS)
    assert {"inferopt_register_optimizers", "inferopt_register_backends",
            "inferopt_register_metrics", "inferopt_register_models",
            "inferopt_register_datasets", "inferopt_register_commands", "inferopt_run_start",
            "inferopt_step_end",
            "inferopt_run_end"} == set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_signature(hook):
    doc = (ROOT / "docs" / "hooks.md").read_text()
    params = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert f"{hook}({params})" in doc
    assert getattr(hookspecs, hook).__doc__, f"{hook} has no docstring"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_exercised_by_a_test(hook):
    tests = ROOT / "tests"
    here = Path(__file__).resolve()
    sources = "".join(p.read_text() for p in tests.rglob("test_*.py") if p.resolve() != here)
    plugins = "".join(p.read_text() for p in (ROOT / "src" / "inferopt" / "plugins").rglob("*.py"))
    # discovery hooks are exercised by every run through the built-in plugins
    assert hook in sources or hook in plugins, f"no test uses {hook}"


def test_hookimpl_is_the_public_marker():
    import inferopt

    assert inferopt.hookimpl is hookspecs.hookimpl
