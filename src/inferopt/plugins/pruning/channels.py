"""Structured pruning, the torch side: which channels are coupled, and removing them for real.

Removing output channel ``c`` of a layer is only correct if everything that reads or shares that
channel loses it too: BatchNorm statistics along the channel, the input columns of the next
Linear/Conv (several columns per channel after a Flatten), and every other layer whose output is
added to it (residual connections, gated feed-forward blocks). Following the ideas of
Torch-Pruning's dependency graph, :func:`find_groups` traces the model with ``torch.fx`` and puts
tensors that must keep the same channels into one *group* (union-find over the graph); a group is
pruned as a whole by :func:`prune_group`, which slices the real parameters, so the result is an
ordinary, smaller ``nn.Module`` of the user's own classes.

A group is *blocked* when its channels reach something that cannot be sliced: the model's
output, its input, a LayerNorm, a reshape, an unknown function; the reason names the layer and the
operation. Transformer encoder/decoder layers are opaque to tracing (their fused inference path
branches on the input); their feed-forward block (``linear1`` -> ``linear2``) is a group of its
own, found by module type.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import torch
import torch.fx
from torch import nn

from inferopt import UsageError
from inferopt.utils import call_model, move_to, no_fast_path

PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardswish,
    nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_SPATIAL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                    nn.AdaptiveMaxPool3d)
_OPAQUE_LEAVES = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                  nn.TransformerDecoder, nn.Transformer, nn.MultiheadAttention)
_F = torch.nn.functional
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, _F.relu, _F.relu6, _F.gelu, _F.silu, _F.mish, torch.tanh, torch.sigmoid,
    _F.hardswish, _F.leaky_relu, _F.elu, _F.selu, _F.dropout, torch.nn.functional.softplus,
    operator.neg, torch.neg,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "neg", "float",
                        "detach"}
_BINARY_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul,
                     operator.imul, operator.truediv, torch.add, torch.sub, torch.mul}
_BINARY_METHODS = {"add", "add_", "sub", "mul", "mul_"}
_FLATTEN_FUNCTIONS = {torch.flatten}


@attrs.define
class ChannelGroup:
    """Channels that must be removed together.

    ``producers`` lose output channels, ``norms`` lose features, ``consumers`` lose input columns
    (``(name, repeat)``: ``repeat`` columns per channel after a Flatten). ``probes[i]`` says where
    the input of ``consumers[i]`` is observed: an fx node name, or ``module:NAME`` for the input
    of a module (groups found by module type). ``channel_dim`` is 1 for convolutions, -1 for
    Linear features.
    """

    producers: list[str]
    channels: int
    channel_dim: int
    norms: list[str] = attrs.field(factory=list)
    consumers: list[tuple[str, int]] = attrs.field(factory=list)
    probes: list[str] = attrs.field(factory=list)
    blocked: str | None = None

    @property
    def name(self) -> str:
        return "+".join(self.producers)

    def add_consumer(self, name: str, repeat: int, probe: str) -> None:
        self.consumers.append((name, repeat))
        self.probes.append(probe)


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _OPAQUE_LEAVES) or super().is_leaf_module(m, module_qualified_name)


def positional(model: nn.Module, inputs: Any) -> list[Any]:
    """``inputs`` (a tensor, a tuple, or keyword arguments) as positional arguments of
    ``model.forward``, defaults filled in; what an fx graph's placeholders take."""
    if isinstance(inputs, dict):
        bound = inspect.signature(model.forward).bind(**inputs)
        bound.apply_defaults()
        return list(bound.args)
    if isinstance(inputs, tuple | list):
        return list(inputs)
    return [inputs]


def trace(model: nn.Module, given: Iterable[str] = ()) -> torch.fx.GraphModule:
    """``model`` as an fx GraphModule that shares its submodules (nothing copied). Arguments
    that default to None and are not in ``given`` are traced as None, so that ``if mask is not
    None`` takes the path the data takes."""
    params = inspect.signature(model.forward).parameters
    concrete = {n: None for n, p in params.items() if p.default is None and n not in set(given)}
    try:
        graph = _Tracer().trace(model, concrete_args=concrete or None)
    except Exception as exc:
        raise UsageError(
            f"structured pruning follows channels through the model's graph, and torch.fx could "
            f"not trace {type(model).__name__}: {type(exc).__name__}: {exc}. Models with "
            "data-dependent control flow cannot be pruned structurally; use unstructured "
            "pruning (prune-l1 without structured=true) instead") from exc
    return torch.fx.GraphModule(model, graph)


class _Spaces:
    """Union-find over fx nodes whose tensors share one channel axis."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.info: dict[str, ChannelGroup] = {}

    def new(self, node: str, group: ChannelGroup) -> None:
        self.parent[node] = node
        self.info[node] = group

    def root(self, node: str) -> str:
        while self.parent[node] != node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def group(self, node: str) -> ChannelGroup:
        return self.info[self.root(node)]

    def alias(self, node: str, of: str) -> None:
        self.parent[node] = self.root(of)

    def block(self, node: str, reason: str) -> None:
        group = self.group(node)
        if group.blocked is None:
            group.blocked = reason

    def union(self, a: str, b: str) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra == rb:
            return
        ga, gb = self.info[ra], self.info[rb]
        self.parent[rb] = ra
        del self.info[rb]
        if ga.blocked is None and gb.blocked is not None:
            ga.blocked = gb.blocked
        if ga.blocked is None and ga.producers and gb.producers and (
                ga.channels != gb.channels or ga.channel_dim != gb.channel_dim):
            ga.blocked = (f"{ga.name} and {gb.name} are combined element-wise but have "
                          f"{ga.channels} and {gb.channels} channels")
        if not ga.producers:
            ga.channels, ga.channel_dim = gb.channels, gb.channel_dim
        ga.producers += gb.producers
        ga.norms += gb.norms
        ga.consumers += gb.consumers
        ga.probes += gb.probes


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _describe(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_method":
        return f"method .{node.target}() at '{node.name}'"
    target = getattr(node.target, "__name__", str(node.target))
    return f"function {target}() at '{node.name}'"


def _ndim(node: torch.fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def find_groups(model: nn.Module, example: Any = None
                ) -> tuple[list[ChannelGroup], torch.fx.GraphModule | None, str | None]:
    """Every channel group of ``model`` (blocked ones included, with the reason), the traced
    graph, and why tracing failed (if it did). ``example`` (one batch of inputs) lets the
    analysis check tensor ranks where it matters (BatchNorm after a Linear); without it such
    cases are blocked. A model that cannot be traced still has its transformer feed-forward
    groups (found by module type; the graph is then None); with none of those the tracing
    error is raised."""
    given = example.keys() if isinstance(example, dict) else ()
    try:
        gm = trace(model, given)
    except UsageError as exc:
        ffn = _transformer_ffn_groups(model)
        known = {g.name for g in ffn}
        ffn += [g for g in exported_ffn_groups(model, example) if g.name not in known]
        if not ffn:
            raise
        cause = str(exc.__cause__ or exc).splitlines()[0][:200]
        return ffn, None, (f"torch.fx could not trace {type(model).__name__} ({cause}); only its "
                           "feed-forward blocks (Linear -> activation -> Linear, found in its "
                           "torch.export graph or by module type) can lose channels")
    if example is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*positional(model, example))
        except Exception:  # shapes are a refinement; without them the analysis is stricter
            pass
    modules = dict(model.named_modules())
    spaces = _Spaces()
    flat: dict[str, str] = {}  # flattened node -> the node whose channels it carries
    calls: dict[str, int] = {}

    def fresh(node: torch.fx.Node, reason: str | None) -> None:
        spaces.new(node.name, ChannelGroup([], 0, 0, blocked=reason))

    def block_inputs(node: torch.fx.Node, what: str) -> None:
        for arg in _tensor_args(node):
            base = flat.get(arg.name, arg.name)
            if base in spaces.parent:
                spaces.block(base, f"its channels reach {what}, which structured pruning "
                                   "cannot follow")

    for node in gm.graph.nodes:
        args = _tensor_args(node)
        first = args[0] if args else None
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        flat_args = [a for a in args if a.name in flat]
        if node.op == "placeholder":
            fresh(node, "its channels are the model's input")
        elif node.op == "get_attr":
            fresh(node, f"it is combined with the stored tensor '{node.target}'")
        elif node.op == "output":
            block_inputs(node, "the model's output")
        elif flat_args and (len(args) > 1 or first is not flat_args[0]):
            block_inputs(node, _describe(node))  # flattened channels mixed with other tensors
            fresh(node, f"it comes from {_describe(node)}")
        elif flat_args:
            _follow_flat(node, flat_args[0], flat, spaces, modules, block_inputs, fresh)
        elif node.op == "call_module":
            _follow_module(node, modules[str(node.target)], first, spaces, block_inputs, fresh,
                           flat)
        elif node.op in ("call_function", "call_method"):
            _follow_function(node, args, first, spaces, block_inputs, fresh, flat)
        else:
            block_inputs(node, _describe(node))
            fresh(node, f"it comes from {_describe(node)}")

    groups = [g for root, g in spaces.info.items() if g.producers]
    for group in groups:
        shared = [p for p in group.producers + [c for c, _ in group.consumers]
                  + group.norms if calls.get(p, 0) > 1]
        if shared and group.blocked is None:
            group.blocked = f"module '{shared[0]}' is called more than once"
    groups += _transformer_ffn_groups(model)
    return groups, gm, None


def _follow_module(node: torch.fx.Node, module: nn.Module, first: torch.fx.Node | None,
                   spaces: _Spaces, block_inputs: Callable[..., None],
                   fresh: Callable[..., None], flat: dict[str, str]) -> None:
    name = str(node.target)
    if isinstance(module, PRODUCERS):
        conv = isinstance(module, _CONV)
        if first is not None:
            in_group = spaces.group(first.name)
            wants = 1 if conv else -1
            if conv and module.groups != 1:
                block_inputs(node, f"grouped convolution '{name}'")
            elif in_group.producers and in_group.channel_dim != wants:
                block_inputs(node, f"'{name}', which reads another axis than the channels")
            else:
                in_group.add_consumer(name, 1, first.name)
        channels = module.out_channels if conv else module.out_features
        blocked = f"grouped convolution '{name}'" if conv and module.groups != 1 else None
        spaces.new(node.name, ChannelGroup([name], channels, 1 if conv else -1,
                                           blocked=blocked))
    elif isinstance(module, _NORMS) and first is not None:
        spaces.alias(node.name, first.name)
        group = spaces.group(node.name)
        group.norms.append(name)
        if group.channel_dim == -1 and _ndim(first) != 2:
            # BatchNorm normalises dim 1; a Linear's features are the last dim: the same axis
            # only for 2-D tensors, which only the shapes of real data can show
            spaces.block(node.name, f"BatchNorm '{name}' follows a Linear on a tensor that is "
                                    "not known to be 2-D (give --data so shapes are known)")
    elif isinstance(module, _ELEMENTWISE_MODULES) and first is not None:
        spaces.alias(node.name, first.name)
    elif isinstance(module, _SPATIAL_MODULES) and first is not None:
        spaces.alias(node.name, first.name)
        if spaces.group(node.name).channel_dim == -1:
            spaces.block(node.name, f"pooling '{name}' runs over the feature axis")
    elif isinstance(module, nn.Flatten) and first is not None:
        _flatten(node, first, module.start_dim, module.end_dim, spaces, flat, fresh)
    else:
        block_inputs(node, f"{type(module).__name__} '{name}'")
        fresh(node, f"it comes from {type(module).__name__} '{name}'")


def _follow_function(node: torch.fx.Node, args: list[torch.fx.Node], first: torch.fx.Node | None,
                     spaces: _Spaces, block_inputs: Callable[..., None],
                     fresh: Callable[..., None], flat: dict[str, str]) -> None:
    function = node.op == "call_function"
    target = node.target
    if first is None:
        fresh(node, f"it comes from {_describe(node)}")
    elif (target in _ELEMENTWISE_FUNCTIONS if function else target in _ELEMENTWISE_METHODS):
        spaces.alias(node.name, first.name)
    elif (target in _BINARY_FUNCTIONS if function else target in _BINARY_METHODS):
        spaces.alias(node.name, first.name)
        for other in args[1:]:
            spaces.union(first.name, other.name)
    elif (target in _FLATTEN_FUNCTIONS if function else target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        _flatten(node, first, start if isinstance(start, int) else -99,
                 end if isinstance(end, int) else -99, spaces, flat, fresh)
    else:
        block_inputs(node, _describe(node))
        fresh(node, f"it comes from {_describe(node)}")


def _flatten(node: torch.fx.Node, first: torch.fx.Node, start_dim: int, end_dim: int,
             spaces: _Spaces, flat: dict[str, str], fresh: Callable[..., None]) -> None:
    if start_dim == 1 and end_dim == -1 and spaces.group(first.name).channel_dim == 1:
        flat[node.name] = first.name
    else:
        spaces.block(first.name, f"it is flattened at '{node.name}' in a way structured "
                                 "pruning cannot follow (only start_dim=1, end_dim=-1 after "
                                 "channels)")
        fresh(node, f"it comes from the flatten at '{node.name}'")


def _follow_flat(node: torch.fx.Node, arg: torch.fx.Node, flat: dict[str, str],
                 spaces: _Spaces, modules: dict[str, nn.Module],
                 block_inputs: Callable[..., None], fresh: Callable[..., None]) -> None:
    base = flat[arg.name]
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    if isinstance(module, nn.Linear):
        group = spaces.group(base)
        channels = group.channels
        if not group.producers or module.in_features % channels:
            spaces.block(base, f"the flattened features reaching '{node.target}' are not a "
                               "whole number per channel")
        else:
            group.add_consumer(str(node.target), module.in_features // channels, arg.name)
        spaces.new(node.name, ChannelGroup([str(node.target)], module.out_features, -1))
    elif isinstance(module, _ELEMENTWISE_MODULES) or (
            node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS) or (
            node.op == "call_method" and node.target in _ELEMENTWISE_METHODS):
        flat[node.name] = base
    else:
        block_inputs(node, _describe(node))
        fresh(node, f"it comes from {_describe(node)}")


#: elementwise aten ops a feed-forward block's hidden tensor may pass between its two Linears
_EXPORTED_ELEMENTWISE = {"relu", "relu_", "gelu", "gelu_", "silu", "silu_", "tanh", "sigmoid",
                         "mish", "hardswish", "leaky_relu", "elu", "selu", "celu", "softplus",
                         "dropout", "clone", "contiguous", "alias"}


def exported_ffn_groups(model: nn.Module, example: Any) -> list[ChannelGroup]:
    """Feed-forward pairs ``Linear -> elementwise ops -> Linear`` of a model torch.fx cannot
    trace (``transformers`` models), found in its ``torch.export`` graphs on ``example``, in
    eval and in train mode (pairs found in both). The graph holds every read of every tensor,
    so a hidden tensor that only the second Linear reads (through activations, dropout) can lose
    channels safely; anything else reading it (a residual, a keyword argument, an output), a
    Linear whose parameters have other names too (tied) or are used twice (called twice), or one
    not called as a module, leaves the pair alone. The batch dimension is exported as dynamic,
    and a model whose graph depends on the batch size is not grouped; branches on other sizes
    are those of ``example``. A model with hooks is not exported (they would run on fake
    tensors). None found (or no export): []."""
    if example is None or any(m._forward_hooks or m._forward_pre_hooks
                              for m in model.modules()):
        return []
    was_training = model.training
    found = []
    try:
        for training in (False, True):
            model.train(training)
            program = _export_dynamic_batch(model, example)
            if program is None:
                return []
            found.append(_pairs_in(model, program))
    finally:
        model.train(was_training)
    both = {(g.producers[0], g.consumers[0][0]) for g in found[1]}
    return [g for g in found[0] if (g.producers[0], g.consumers[0][0]) in both]


def _export_dynamic_batch(model: nn.Module, example: Any) -> Any:
    """``torch.export`` of ``model`` on ``example`` with its batch dimension dynamic; None when
    it cannot be exported or its graph holds only for some batch sizes."""
    from torch.export import Dim

    args, kwargs = ((), dict(example)) if isinstance(example, dict) else (
        (tuple(example) if isinstance(example, tuple | list) else (example,)), {})
    tensors = [v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor)]
    batched = bool(tensors) and all(t.dim() > 0 and t.shape[0] == tensors[0].shape[0] > 1
                                    for t in tensors)

    def spec(v: Any) -> Any:
        return {0: Dim.DYNAMIC} if batched and isinstance(v, torch.Tensor) else None

    shapes = {k: spec(v) for k, v in kwargs.items()} if kwargs else tuple(spec(v) for v in args)
    try:
        with torch.no_grad(), no_fast_path():
            program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes,
                                          strict=False)
    except Exception:  # not exportable (or the batch size is baked in): no groups from it
        return None
    for bounds in program.range_constraints.values():
        if bounds.lower > 2 or bounds.upper < 2**62:  # a branch on the batch size
            return None
    return program


def _pairs_in(model: nn.Module, program: Any) -> list[ChannelGroup]:
    parameters = program.graph_signature.inputs_to_parameters
    modules = dict(model.named_modules())
    names: dict[int, int] = {}
    for _name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)] = names.get(id(p), 0) + 1

    def linear(node: Any) -> str | None:
        """The nn.Linear module a ``linear`` node runs as a module call, when its parameters
        have no other name and are read only there."""
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            return None
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        name = stack[-1][0] if stack else ""
        module = modules.get(name)
        weights = [a for a in node.args[1:] if isinstance(a, torch.fx.Node)]
        if type(module) is not nn.Linear or [parameters.get(w.name) for w in weights] != [
                f"{name}.{k}" for k in ("weight", "bias")[:len(weights)]]:
            return None
        if any(len(w.users) != 1 for w in weights) or any(
                names.get(id(p), 0) != 1 for p in module.parameters(recurse=False)):
            return None
        return name

    def elementwise(node: Any) -> bool:
        target = node.target
        return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
                and target.namespace == "aten"
                and target._schema.name.split("::")[-1] in _EXPORTED_ELEMENTWISE)

    groups = []
    for node in program.graph.nodes:
        if (first := linear(node)) is None:
            continue
        hidden = node
        while len(hidden.users) == 1:
            (user,) = hidden.users
            if not elementwise(user) or user.args[0] is not hidden:
                break
            hidden = user
        readers = list(hidden.users)
        second = linear(readers[0]) if len(readers) == 1 else None
        if second is None or readers[0].args[0] is not hidden \
                or modules[second].in_features != modules[first].out_features:
            continue
        groups.append(ChannelGroup([first], modules[first].out_features, -1,
                                   consumers=[(second, 1)], probes=[f"module:{second}"]))
    return groups


def _transformer_ffn_groups(model: nn.Module) -> list[ChannelGroup]:
    groups = []
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
            first, second = f"{name}.linear1", f"{name}.linear2"
            groups.append(ChannelGroup([first], module.linear1.out_features, -1,
                                       consumers=[(second, 1)], probes=[f"module:{second}"]))
    return groups


# --- scoring ---------------------------------------------------------------------------------


def weight_scores(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """L1 norm of each output channel's weights, each producer normalised by its mean so that
    layers of different scale weigh alike, summed over the group's producers."""
    total = torch.zeros(group.channels)
    for name in group.producers:
        weight = model.get_submodule(name).weight.detach().float().cpu()
        norms = weight.abs().reshape(weight.shape[0], -1).sum(dim=1)
        total += norms / norms.mean().clamp_min(1e-12)
    return total


@attrs.define
class ActivationStats:
    """Per-column sums over every sample and position of one consumer's input: |a|, a, a^2,
    and zeros (for APoZ). Columns are a Linear's input features (channel x position after a
    Flatten) or a convolution's input channels."""

    abs_sum: torch.Tensor
    total: torch.Tensor
    sq_sum: torch.Tensor
    zeros: torch.Tensor
    count: int = 0
    #: sum of (a - mean)(a - mean)^T over the rows (columns x columns), for
    #: ``criterion=reconstruct`` only
    outer: torch.Tensor | None = None

    @classmethod
    def empty(cls, columns: int, outer: bool = False) -> ActivationStats:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64)

        return cls(zeros(columns), zeros(columns), zeros(columns), zeros(columns),
                   outer=zeros(columns, columns) if outer else None)

    def add(self, x: torch.Tensor, dim: int) -> None:
        x = x.detach().movedim(dim, -1).reshape(-1, x.shape[dim])
        if self.outer is not None and len(x):
            # one float32 product per batch, where the data is, of the batch centred on its
            # own mean (no cancellation for channels with a large mean), merged with the
            # batches before as in Chan et al.'s parallel variance
            x32 = x.float()
            mean = x32.mean(dim=0)
            centred = x32 - mean
            self.outer += (centred.T @ centred).double().cpu()
            if self.count:
                delta = mean.double().cpu() - self.total / self.count
                self.outer += torch.outer(delta, delta) * (
                    self.count * len(x) / (self.count + len(x)))
        x = x.double().cpu()
        self.abs_sum += x.abs().sum(dim=0)
        self.total += x.sum(dim=0)
        self.sq_sum += x.pow(2).sum(dim=0)
        self.zeros += (x == 0).sum(dim=0)
        self.count += x.shape[0]

    def covariance(self) -> torch.Tensor:
        """The covariance of the columns over the rows (float64; needs ``outer``)."""
        assert self.outer is not None
        return self.outer / max(self.count, 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()

    @property
    def mean(self) -> torch.Tensor:
        return (self.total / max(self.count, 1)).float()

    @property
    def variance(self) -> torch.Tensor:
        n = max(self.count, 1)
        return (self.sq_sum / n - (self.total / n).pow(2)).clamp_min(0).float()

    @property
    def apoz(self) -> torch.Tensor:
        return (self.zeros / max(self.count, 1)).float()


def _consumer_dim(model: nn.Module, name: str) -> int:
    return -1 if isinstance(model.get_submodule(name), nn.Linear) else 1


def activation_stats(model: nn.Module, gm: torch.fx.GraphModule | None, groups: list[ChannelGroup],
                     batches: Iterable[Any], device: Any, outer: Iterable[str] = ()
                     ) -> dict[str, ActivationStats]:
    """Observe the input of every consumer of ``groups`` on ``batches``; keyed by probe. The
    probes in ``outer`` also keep the second moments of their input (for :func:`reconstruct`).
    """
    stats: dict[str, ActivationStats] = {}
    wanted: dict[str, int] = {}  # probe -> axis of its consumer's columns
    with_outer = set(outer)
    for group in groups:
        for (name, _repeat), probe in zip(group.consumers, group.probes, strict=True):
            wanted[probe] = _consumer_dim(model, name)

    mask: list[torch.Tensor | None] = [None]  # the batch's attention mask, [batch, tokens]

    def record(probe: str, x: Any) -> None:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            dim = wanted[probe]
            m = mask[0]
            if m is not None and dim == -1 and x.dim() == 3 and tuple(x.shape[:2]) == m.shape:
                x = x[m]  # padding positions say nothing about the channels real tokens use
            stats.setdefault(probe, ActivationStats.empty(
                x.shape[dim], probe in with_outer)).add(x, dim)

    class Observer(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            result = super().run_node(n)
            if n.name in wanted:
                record(n.name, result)
            return result

    handles = []
    for probe in wanted:
        if probe.startswith("module:"):
            def hook(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     probe: str = probe) -> None:
                record(probe, args[0] if args else next(iter(kwargs.values()), None))
            handles.append(model.get_submodule(probe[7:]).register_forward_pre_hook(
                hook, with_kwargs=True))
    graph_probes = any(not p.startswith("module:") for p in wanted)
    observer = Observer(gm) if graph_probes and gm is not None else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), no_fast_path():
            for batch in batches:
                inputs = move_to(batch.inputs, device)
                given = inputs.get("attention_mask") if isinstance(inputs, dict) else None
                mask[0] = given.bool() if isinstance(given, torch.Tensor) and given.dim() == 2 \
                    else None
                if observer is None:
                    call_model(model, inputs)
                else:
                    observer.run(*positional(model, inputs))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return stats


def _columns_by_channel(model: nn.Module, group: ChannelGroup, index: int
                        ) -> tuple[nn.Module, torch.Tensor]:
    """Consumer ``index`` and its weight as [outputs, channels, repeat, kernel...] flattened to
    [outputs, channels, -1]."""
    name, _repeat = group.consumers[index]
    module = model.get_submodule(name)
    weight = module.weight.detach().float().cpu()
    return module, weight.reshape(weight.shape[0], group.channels, -1)


def _per_channel(values: torch.Tensor, channels: int, reduce: str) -> torch.Tensor:
    grid = values.reshape(channels, -1)
    return grid.sum(dim=1) if reduce == "sum" else grid.mean(dim=1)


def activation_scores(model: nn.Module, group: ChannelGroup, stats: dict[str, ActivationStats],
                      criterion: str) -> torch.Tensor:
    """Higher means keep, over the group's consumers (each with the statistics of its own
    input).

    * ``variance``: variance of each input column times the squared norm of the weights that
      read it, summed per channel: the error removing the channel causes in the consumers once
      its mean is folded into their biases (:func:`fold_means`);
    * ``mean``: mean |activation|;
    * ``apoz``: fewer zeros is better (Hu et al., 2016), mean |activation| breaking ties
      (activations such as GELU are never exactly zero).
    """
    c = group.channels
    total = torch.zeros(c)
    seen = 0
    for i, probe in enumerate(group.probes):
        stat = stats.get(probe)
        if stat is None:
            continue
        seen += 1
        if criterion == "variance":
            _module, weight = _columns_by_channel(model, group, i)
            reach = weight.pow(2).sum(dim=0)  # [channels, repeat x kernel]
            per_col = stat.variance.reshape(c, -1)
            total += (per_col * reach.reshape(c, per_col.shape[1], -1).sum(dim=2)).sum(dim=1)
        elif criterion == "mean":
            total += _per_channel(stat.mean_abs, c, "mean")
        else:
            mean_abs = _per_channel(stat.mean_abs, c, "mean")
            total += (1.0 - _per_channel(stat.apoz, c, "mean")) + \
                1e-3 * mean_abs / mean_abs.max().clamp_min(1e-12)
    if not seen:
        raise UsageError(f"no activations reached the layers reading {group.name}; check that "
                         "the data runs through them")
    return total


def fold_means(model: nn.Module, group: ChannelGroup, keep: torch.Tensor,
               stats: dict[str, ActivationStats]) -> None:
    """Add what the channels about to go contributed on average to each consumer's output to
    its bias (creating a bias where there is none), so that removing them shifts nothing on
    average. Exact per input column for Linear consumers (after a Flatten too); for a
    convolution the channel mean is over all positions, so it is right on average over space."""
    dropped = torch.ones(group.channels, dtype=torch.bool)
    dropped[keep] = False
    for i, probe in enumerate(group.probes):
        stat = stats.get(probe)
        if stat is None:
            continue
        module, weight = _columns_by_channel(model, group, i)
        if isinstance(module, nn.Linear):
            means = stat.mean.reshape(group.channels, -1) * dropped[:, None]
            shift = torch.einsum("ocr,cr->o", weight, means)
        else:
            means = stat.mean * dropped
            shift = torch.einsum("ocr,c->o", weight, means)
        with torch.no_grad():
            if module.bias is None:
                param = module.weight
                module.bias = nn.Parameter(torch.zeros(param.shape[0], dtype=param.dtype,
                                                       device=param.device))
            module.bias += shift.to(module.bias.device, module.bias.dtype)


#: the widest group ``criterion=reconstruct`` refits: its greedy search updates a
#: (channels)^2 float64 matrix once per removed channel (4096 at 50%: about 15 s on
#: 2 cores)
REFIT_MAX_CHANNELS = 4096
#: the second moments of all refitted groups are observed in one pass over the data; past
#: this many bytes of them, the remaining groups fall back to ``variance``
REFIT_MEMORY = 2 << 30
#: ``reconstruct``'s damping of the covariance: at least the first share of its mean diagonal,
#: and the second times channels / rows observed
REFIT_DAMP = (1e-3, 0.3)


def refit_plan(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, str | None]:
    """For each group, why ``criterion=reconstruct`` cannot refit it (None: it can). It can
    when one Linear whose weight no other layer shares reads the channels as its input
    features, one column each (a transformer's or an MLP's hidden layer), up to
    :data:`REFIT_MAX_CHANNELS` channels and :data:`REFIT_MEMORY` bytes of second moments for
    all groups together."""
    names_of: dict[int, int] = {}
    for _name, param in model.named_parameters(remove_duplicate=False):
        names_of[id(param)] = names_of.get(id(param), 0) + 1
    plan: dict[str, str | None] = {}
    used = 0
    for group in groups:
        name, repeat = group.consumers[0] if group.consumers else ("", 0)
        module = model.get_submodule(name) if group.consumers else None
        size = group.channels ** 2 * 8
        if len(group.consumers) != 1:
            plan[group.name] = f"read by {len(group.consumers)} layers, not one"
        elif not isinstance(module, nn.Linear) or repeat != 1:
            plan[group.name] = (f"read by layer '{name}' ({type(module).__name__}), not a "
                                "Linear taking one input per channel")
        elif any(names_of.get(id(p), 0) > 1 for p in module.parameters(recurse=False)):
            plan[group.name] = f"the weights of layer '{name}' are shared with another layer"
        elif group.channels > REFIT_MAX_CHANNELS:
            plan[group.name] = (f"{group.channels} channels, more than the "
                                f"{REFIT_MAX_CHANNELS} refitted")
        elif used + size > REFIT_MEMORY:
            plan[group.name] = (f"the second moments of the groups before it took the "
                                f"{REFIT_MEMORY / 2**20:,.0f} MiB allowed")
        else:
            plan[group.name] = None
            used += size
    return plan


def reconstruct(model: nn.Module, group: ChannelGroup, stats: dict[str, ActivationStats],
                keep_n: int) -> torch.Tensor | None:
    """Choose the ``keep_n`` channels to keep and refit the Linear reading them, so that its
    output on the observed activations changes as little as possible (least squares); return
    the kept channels, or None where the data has too few rows to refit on. Optimal Brain
    Surgeon applied to whole input columns (as in ZipLM): with ``H`` the covariance of the
    input, removing column ``j`` while the others make up for it costs
    ``|w_j|^2 / [H^-1]_jj``; the cheapest column goes, the others absorb what of it correlates
    with them, and ``H^-1`` loses its row and column, until ``keep_n`` remain. The bias then
    takes the mean of what changed (as :func:`fold_means` does). ``H`` is damped by a share of
    its mean diagonal that grows as the rows get fewer against the channels (a least-squares
    fit on few rows fits their noise); fewer rows than channels are not refit at all. Writes
    the consumer's new weight (the removed columns zero, for :func:`prune_group` to cut) and
    bias."""
    module = model.get_submodule(group.consumers[0][0])
    assert isinstance(module, nn.Linear)  # refit_plan let only Linear readers through
    stat = stats[group.probes[0]]
    c = group.channels
    if stat.count < c:
        return None
    h = stat.covariance()
    damp = max(REFIT_DAMP[0], REFIT_DAMP[1] * c / stat.count)
    h += damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(c, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    weight = module.weight.detach()
    before = weight.double().cpu()
    w = before.clone()
    columns = torch.arange(c)  # the original column of each column of w (and row of hinv)
    gone = torch.zeros(c, dtype=torch.bool)
    for _ in range(c - keep_n):
        cost = w.pow(2).sum(dim=0) / hinv.diagonal()
        cost[gone] = float("inf")
        j = int(torch.argmin(cost))
        row = hinv[j] / hinv[j, j]
        w.addr_(w[:, j].clone(), row, alpha=-1.0)
        hinv.addr_(hinv[:, j].clone(), row, alpha=-1.0)
        gone[j] = True
        if int(gone.sum()) >= max(64, len(gone) // 4):  # drop the removed rows and columns
            alive = ~gone
            w, hinv, columns = w[:, alive], hinv[alive][:, alive], columns[alive]
            gone = torch.zeros(len(columns), dtype=torch.bool)
    keep = columns[~gone]
    refit = torch.zeros_like(before)
    refit[:, keep] = w[:, ~gone]
    shift = (before - refit) @ (stat.total / max(stat.count, 1))
    with torch.no_grad():
        module.weight.copy_(refit.to(weight.dtype))
        if module.bias is None:
            module.bias = nn.Parameter(shift.to(weight.device, weight.dtype))
        else:
            module.bias.add_(shift.to(module.bias.device, module.bias.dtype))
    return keep


def channels_to_keep(channels: int, sparsity: float, round_to: int) -> int:
    """How many channels stay when ``sparsity`` of ``channels`` go, rounded to ``round_to``."""
    keep = channels - round(channels * sparsity)
    if round_to > 1:
        keep = round(keep / round_to) * round_to
    return int(min(channels, max(keep, min(round_to, channels), 1)))


# --- slicing ---------------------------------------------------------------------------------


def _replace(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    old = getattr(module, name)
    if old is None or isinstance(old, nn.Parameter):  # None: a bias that fold_means added
        setattr(module, name, nn.Parameter(tensor.contiguous(),
                                           requires_grad=old is None or old.requires_grad))
    else:
        setattr(module, name, tensor.contiguous())


def prune_group(model: nn.Module, group: ChannelGroup, keep: torch.Tensor) -> None:
    """Keep only channels ``keep`` (sorted indices) of ``group``, in place."""
    keep = keep.sort().values
    for name in group.producers:
        module = model.get_submodule(name)
        idx = keep.to(module.weight.device)
        _replace(module, "weight", module.weight.detach().index_select(0, idx))
        if module.bias is not None:
            _replace(module, "bias", module.bias.detach().index_select(0, idx))
        if isinstance(module, nn.Linear):
            module.out_features = len(keep)
        else:
            module.out_channels = len(keep)
    for name in dict.fromkeys(group.norms):
        norm = model.get_submodule(name)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(norm, attr, None)
            if tensor is not None:
                _replace(norm, attr, tensor.detach().index_select(0, keep.to(tensor.device)))
        norm.num_features = len(keep)
    for name, repeat in dict.fromkeys(group.consumers):
        module = model.get_submodule(name)
        columns = (keep[:, None] * repeat + torch.arange(repeat)).reshape(-1)
        _replace(module, "weight",
                 module.weight.detach().index_select(1, columns.to(module.weight.device)))
        if isinstance(module, nn.Linear):
            module.in_features = len(columns)
        else:
            module.in_channels = len(columns)


SIZE_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "num_features")


def structure_of(model: nn.Module, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The shapes and size attributes of modules ``names``: what :func:`resize` rebuilds."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        module = model.get_submodule(name)
        tensors = {k: list(v.shape) for k, v in list(module.named_parameters(recurse=False))
                   + list(module.named_buffers(recurse=False)) if v.dim() > 0}
        sizes = {k: getattr(module, k) for k in SIZE_ATTRS if hasattr(module, k)}
        out[name] = {"tensors": tensors, "sizes": sizes}
    return out


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_structure(model: nn.Module, structure: Any) -> None:
    """Refuse a saved structure (from a run's ``inferopt.json``, which may have been edited)
    that :func:`resize` could not apply as pruning does: layers the model has, only its own
    parameter/buffer slots and size attributes, sizes that are integers >= 0 and no larger than
    the unpruned layer's (pruning only removes channels)."""
    def bad(where: str, problem: str) -> UsageError:
        return UsageError(f"saved state 'structure'{where}: {problem}; was the run edited?")

    if not isinstance(structure, dict):
        raise bad("", f"must be an object, not {type(structure).__name__}")
    for name, spec in structure.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise UsageError(f"the saved pruning step refers to layer '{name}', which the model "
                             "does not have; was it built by a different model spec?") from exc
        if (not isinstance(spec, dict) or not isinstance(spec.get("tensors"), dict)
                or not isinstance(spec.get("sizes"), dict)):
            raise bad(f"[{name!r}]", "must be an object with 'tensors' and 'sizes' objects")
        weight = getattr(module, "weight", None)
        for attr, shape in spec["tensors"].items():
            where = f"[{name!r}].tensors[{attr!r}]"
            if attr not in module._parameters and attr not in module._buffers:
                raise bad(where, f"{type(module).__name__} has no parameter or buffer {attr!r}")
            current = getattr(module, attr)
            if current is not None:
                limit = list(current.shape)
            elif isinstance(weight, torch.Tensor) and weight.dim() > 0:  # a bias fold_means adds
                limit = [weight.shape[0]]
            else:
                raise bad(where, f"{type(module).__name__} has no {attr!r} to resize")
            if (not isinstance(shape, list) or len(shape) != len(limit)
                    or not all(_is_size(n) for n in shape)):
                raise bad(where, f"must be a list of {len(limit)} integers >= 0, not {shape!r}")
            if any(n > m for n, m in zip(shape, limit, strict=True)):
                raise bad(where, f"shape {shape} is larger than the layer's {limit}; pruning "
                                 "only removes channels")
        for attr, value in spec["sizes"].items():
            where = f"[{name!r}].sizes[{attr!r}]"
            if attr not in SIZE_ATTRS or not _is_size(getattr(module, attr, None)):
                raise bad(where, f"not a size attribute of {type(module).__name__}")
            if not _is_size(value) or value > getattr(module, attr):
                raise bad(where, f"must be an integer from 0 to {getattr(module, attr)}, "
                                 f"not {value!r}")


def resize(model: nn.Module, structure: dict[str, dict[str, Any]]) -> None:
    """Give modules the shapes recorded by :func:`structure_of` (values are loaded afterwards).
    The structure is checked first (:func:`check_structure`), so nothing is changed when it is
    not one pruning could have made."""
    check_structure(model, structure)
    for name, spec in structure.items():
        module = model.get_submodule(name)
        for attr, shape in spec["tensors"].items():
            like = getattr(module, attr, None)
            like = like if like is not None else module.weight
            _replace(module, attr, torch.zeros(shape, dtype=like.dtype, device=like.device))
        for attr, value in spec["sizes"].items():
            setattr(module, attr, value)
