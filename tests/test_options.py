"""Typed plugin options: conversion from CLI strings and TOML values, and the error messages."""

from __future__ import annotations

import enum
import json
from pathlib import Path

import attrs
import pytest

from inferopt import UsageError, option
from inferopt._options import build, describe


@attrs.frozen
class Example:
    mode: str = option("fast", choices=("fast", "exact"), help="how")
    ratio: float = option(0.5, min=0.0, max=1.0)
    steps: int = option(10, min=1)
    verbose: bool = option(False)
    skip: tuple[str, ...] = option(())
    limit: int | None = option(None)


def test_strings_are_converted_by_type():
    ex = build(Example, {"mode": "exact", "ratio": "0.25", "steps": "3", "verbose": "yes",
                         "skip": "head|*.fc", "limit": "none"}, "step 1 'x'")
    assert ex == Example("exact", 0.25, 3, True, ("head", "*.fc"), None)


def test_typed_values_from_toml_are_accepted():
    ex = build(Example, {"ratio": 1, "skip": ["a", "b"], "limit": 7}, "step 1 'x'")
    assert ex.ratio == 1.0 and ex.skip == ("a", "b") and ex.limit == 7


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"mode": "slow"}, "step 2 'x': option 'mode' got 'slow'; allowed: one of fast, exact"),
        ({"ratio": "2"}, "option 'ratio' got '2'; allowed: float >= 0.0 and <= 1.0"),
        ({"steps": "many"}, "option 'steps' got 'many'"),
        ({"verbose": "maybe"}, "option 'verbose' got 'maybe' (expected true or false)"),
        ({"mdoe": "fast"}, "unknown option 'mdoe'. Options: mode, ratio, steps, verbose, skip, "
                           "limit. Did you mean 'mode'?"),
    ],
)
def test_bad_values_name_step_option_value_and_allowed(raw, expected):
    with pytest.raises(UsageError) as info:
        build(Example, raw, "step 2 'x'")
    assert expected in str(info.value)


def test_bool_is_not_an_int():
    with pytest.raises(UsageError, match="option 'steps' got True"):
        build(Example, {"steps": True}, "s")


def test_describe_lists_options_for_plugins_listing():
    doc = {d["name"]: d for d in describe(Example)}
    assert doc["mode"]["choices"] == ["fast", "exact"]
    assert doc["mode"]["help"] == "how"
    assert doc["ratio"]["min"] == 0.0 and doc["ratio"]["max"] == 1.0
    assert doc["skip"]["default"] == []


def test_non_finite_numbers_are_rejected():
    for raw in ({"ratio": "nan"}, {"ratio": float("inf")}):
        with pytest.raises(UsageError, match="not a finite number"):
            build(Example, raw, "s")


class Color(enum.Enum):
    RED = "red"


@attrs.frozen
class Typed:
    where: Path = option(Path("/tmp"))
    color: Color = option(Color.RED)


def test_other_simple_types_are_built_from_strings_and_listed_as_json():
    t = build(Typed, {"where": "/x", "color": "red"}, "s")
    assert t.where == Path("/x") and t.color is Color.RED
    json.dumps(describe(Typed))  # paths and enums become strings
    assert {d["name"]: d["default"] for d in describe(Typed)} == {"where": "/tmp",
                                                                  "color": "red"}


def test_unresolvable_annotations_do_not_break_listing():
    namespace: dict = {}
    exec(  # an annotation naming something imported only for type checking
        "from __future__ import annotations\n"
        "import attrs\nfrom inferopt import option\n"
        "@attrs.frozen\nclass Odd:\n    thing: Missing | None = option(None)\n", namespace)
    assert describe(namespace["Odd"])[0]["name"] == "thing"
    assert build(namespace["Odd"], {"thing": "x"}, "s").thing == "x"


def _even(value: int) -> str | None:
    return None if value % 2 == 0 else "must be even"


def _known_layer(value: str) -> None:
    if not value.startswith("layer"):
        raise ValueError("not a layer name; names start with 'layer'")


@attrs.frozen
class Validated:
    groups: int = option(2, min=1, validator=_even)
    target: str = option("layer1", validator=_known_layer)


def test_a_validator_checks_the_converted_value_and_names_step_option_value():
    assert build(Validated, {"groups": "4", "target": "layer3"}, "step 1 'x'") == \
        Validated(4, "layer3")
    with pytest.raises(UsageError, match=r"step 1 'x': option 'groups' got '3': must be even"):
        build(Validated, {"groups": "3"}, "step 1 'x'")
    with pytest.raises(UsageError, match=r"option 'target' got 'head': not a layer name"):
        build(Validated, {"target": "head"}, "step 1 'x'")
    # the declared range is checked before the validator sees the value
    with pytest.raises(UsageError, match=r"option 'groups' got 0; allowed: int >= 1"):
        build(Validated, {"groups": 0}, "step 1 'x'")


def test_an_option_spelled_as_a_keyword_is_listed_and_read_by_its_key():
    import attrs

    import inferopt
    from inferopt._options import build, describe

    @attrs.frozen
    class Spec:
        cls: str = inferopt.option("", key="class", help="class to load")

    assert describe(Spec)[0]["name"] == "class"
    assert build(Spec, {"class": "AutoModel"}, "here").cls == "AutoModel"
    assert build(Spec, {"cls": "AutoModel"}, "here").cls == "AutoModel"
    with pytest.raises(inferopt.UsageError, match="Options: class"):
        build(Spec, {"klass": "x"}, "here")
