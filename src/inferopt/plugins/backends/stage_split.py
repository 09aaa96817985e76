"""Where to cut a model into pipeline stages: module names given by the user (checked), or
chosen so that the stages hold about equal parameters or take about equal measured time.

A cut is made at the *beginning* of a module call (``SplitPoint.BEGINNING`` in
``torch.distributed.pipelining``): stage k runs from the k-th cut up to the next one.
Candidates are modules that run exactly once per forward pass, in the order they run, starting
from the model's children and opening the costliest one until there are enough to choose from.
"""

from __future__ import annotations

import difflib
import time
from typing import Any

import attrs

from inferopt import UsageError


@attrs.define
class ModuleCall:
    """One submodule as a forward pass used it: when it first ran, how often, and its cost."""

    name: str
    order: int
    calls: int = 0
    seconds: float = 0.0
    params: int = 0


def profile_calls(model: Any, run: Any, repeats: int = 1) -> dict[str, ModuleCall]:
    """Run ``run()`` (a forward pass of ``model``) with hooks on every submodule, recording
    call order, call counts per pass and inclusive time."""
    calls: dict[str, ModuleCall] = {}
    started: dict[str, list[float]] = {}
    handles = []

    def pre(name: str) -> Any:
        def hook(_module: Any, _args: Any) -> None:
            if name not in calls:
                calls[name] = ModuleCall(name, len(calls))
            calls[name].calls += 1
            started.setdefault(name, []).append(time.perf_counter())
        return hook

    def post(name: str) -> Any:
        def hook(_module: Any, _args: Any, _out: Any) -> None:
            calls[name].seconds += time.perf_counter() - started[name].pop()
        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(pre(name)))
            handles.append(module.register_forward_hook(post(name)))
    try:
        for _ in range(repeats):
            run()
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    for call in calls.values():
        call.calls //= repeats
        call.params = sum(p.numel() for p in modules[call.name].parameters())
    return calls


def check_split_points(model: Any, names: list[str] | tuple[str, ...]) -> None:
    """Every name must be a submodule of ``model``; otherwise a clear error with candidates."""
    known = [n for n, _ in model.named_modules() if n]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            top = [n for n in known if "." not in n]
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UsageError(
                f"split point {name!r} is not a module name of the model; {hint}"
                f"its top-level modules are: {', '.join(top[:20]) or '(none)'}"
            )


def order_split_points(
    model: Any, names: list[str] | tuple[str, ...], calls: dict[str, ModuleCall]
) -> list[str]:
    """The user's split points in the order they run; each must run exactly once."""
    check_split_points(model, names)
    for name in names:
        call = calls.get(name)
        if call is None or call.calls != 1:
            ran = "never runs" if call is None else f"runs {call.calls} times"
            raise UsageError(
                f"split point {name!r} {ran} in a forward pass; a stage boundary must be a "
                "module that runs exactly once"
            )
    if len(set(names)) != len(names):
        raise UsageError(f"split points {list(names)} name a module twice")
    return sorted(names, key=lambda n: calls[n].order)


def candidates(calls: dict[str, ModuleCall], stages: int, cost: str) -> list[ModuleCall]:
    """Modules that run once, in run order, each with its (inclusive) cost; the costliest is
    opened into its children until there are at least ``2 * stages`` or none can be opened."""

    def children(prefix: str) -> list[ModuleCall]:
        depth = prefix.count(".") + 1 if prefix else 0
        kids = [c for c in calls.values()
                if c.name.count(".") == depth and (not prefix or c.name.startswith(prefix + "."))]
        return sorted(kids, key=lambda c: c.order)

    def value(call: ModuleCall) -> float:
        return call.seconds if cost == "time" else float(call.params)

    frontier = children("")
    while len(frontier) < 2 * stages:
        openable = [c for c in frontier if children(c.name)]
        if not openable:
            break
        biggest = max(openable, key=value)
        at = frontier.index(biggest)
        frontier[at:at + 1] = children(biggest.name)
    return [c for c in frontier if c.calls == 1]


def choose_split_points(calls: dict[str, ModuleCall], stages: int, cost: str) -> list[str]:
    """``stages - 1`` module names that cut the model into stages of about equal cost."""
    cands = candidates(calls, stages, cost)
    if len(cands) < stages:
        raise UsageError(
            f"the model has {len(cands)} module(s) that run once in sequence "
            f"({', '.join(c.name for c in cands) or 'none'}); it cannot be cut into {stages} "
            "stages. Ask for fewer stages, or name split points in a model with more layers"
        )
    costs = [c.seconds if cost == "time" else float(c.params) for c in cands]
    total = sum(costs) or 1.0
    prefix = [0.0]
    for value in costs:
        prefix.append(prefix[-1] + value)
    cuts: list[int] = []
    for k in range(1, stages):
        lo = (cuts[-1] + 1) if cuts else 1
        hi = len(cands) - (stages - k)  # leave one candidate for each later stage
        target = total * k / stages
        cuts.append(min(range(lo, hi + 1), key=lambda j: abs(prefix[j] - target)))
    return [cands[j].name for j in cuts]
