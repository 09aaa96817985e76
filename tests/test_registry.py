"""The registry: provenance, duplicates, unknown names."""

from __future__ import annotations

import pytest

from inferopt import UsageError
from inferopt._registry import Registry


class A:
    name = "quantize"


class B:
    name = "quantize"


class C:
    name = "prune"


def test_duplicate_name_names_both_plugins():
    reg = Registry()
    reg.add("optimizer", A, plugin="first", distribution="dist-one")
    with pytest.raises(UsageError) as info:
        reg.add("optimizer", B, plugin="second", distribution="dist-two")
    msg = str(info.value)
    assert "'quantize' is registered twice" in msg
    assert "'first' (dist-one)" in msg and "'second' (dist-two)" in msg


def test_unknown_name_lists_known_and_closest():
    reg = Registry()
    reg.add("optimizer", A, plugin="p")
    reg.add("optimizer", C, plugin="p")
    with pytest.raises(UsageError) as info:
        reg.get("optimizer", "quantise")
    assert str(info.value) == (
        "unknown optimizer 'quantise'. Available: prune, quantize. Did you mean 'quantize'?"
    )


def test_entries_remember_provenance():
    reg = Registry()
    entry = reg.add("optimizer", C, plugin="pr", distribution="d", version="2.0")
    assert (entry.plugin, entry.distribution, entry.version) == ("pr", "d", "2.0")
    assert reg.get("optimizer", "prune") is entry


def test_class_without_name_is_rejected():
    class Nameless:
        pass

    with pytest.raises(TypeError, match="without a string 'name' attribute"):
        Registry().add("metric", Nameless, plugin="p")
