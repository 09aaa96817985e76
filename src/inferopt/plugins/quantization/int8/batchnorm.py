"""BatchNorm folded into the convolution before it, for static int8 (imports torch).

A ``Conv2d`` followed by a ``BatchNorm2d`` in eval mode is one affine map: the BatchNorm's scale
and shift fold into the convolution's weight and bias (the same outputs, up to float rounding),
as NNCF, ONNX Runtime's quantizer and PyTorch's own ``fuse_conv_bn_eval`` do before
quantizing. The int8 convolution then calibrates and quantizes the folded weights, and the model
runs one layer where it ran two (ResNet-18 static int8, eager, on an AMX CPU: 12.3 -> 10.5 ms at
batch 1, 172 -> 138 ms at batch 16, the same cosine). ONNX Runtime also needs it to fuse a
convolution into ``QLinearConv``. Pairs are found in the ``torch.fx`` graph of a copy of the
model (tracing runs ``forward`` on proxies, which must not touch the user's model); a model fx
cannot trace keeps its BatchNorms.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

from inferopt import UsageError
from inferopt.utils import set_submodule


def foldable(model: Any) -> list[list[str]]:
    """``[conv, batchnorm]`` names where a BatchNorm2d in eval mode with running statistics
    reads the output of a plain Conv2d that nothing else reads, each module called once, no
    other code reading either's tensors, no hooks on either (a hook would be lost or would
    run on the folded output)."""
    import torch

    modules = dict(model.named_modules())
    kinds = {type(m) for m in modules.values()}
    if torch.nn.Conv2d not in kinds or torch.nn.BatchNorm2d not in kinds:
        return []
    try:
        graph = torch.fx.symbolic_trace(copy.deepcopy(model)).graph
    except Exception:
        return []  # not traceable (or not copyable): nothing is folded
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    attributes = [str(n.target) for n in graph.nodes if n.op == "get_attr"]
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        conv_node = node.args[0] if bn is not None and len(node.args) == 1 else None
        if type(bn) is not torch.nn.BatchNorm2d or node.kwargs \
                or not isinstance(conv_node, torch.fx.Node) or conv_node.op != "call_module":
            continue
        conv = modules.get(conv_node.target)
        names = (str(conv_node.target), str(node.target))
        if (type(conv) is torch.nn.Conv2d and len(conv_node.users) == 1
                and calls[conv_node.target] == calls[node.target] == 1
                and not conv.training and not bn.training and bn.running_mean is not None
                and bn.num_features == conv.out_channels
                and type(conv.weight) is torch.nn.Parameter
                and not any(m._forward_hooks or m._forward_pre_hooks for m in (conv, bn))
                and not any(a == n or a.startswith(n + ".") for a in attributes for n in names)):
            pairs.append(list(names))
    return pairs


def fold(model: Any, pairs: list[list[str]]) -> None:
    """Fold each pair's BatchNorm into its convolution and put an Identity in its place (in
    whatever mode the model is: a saved run's fresh model may be in training mode, and its
    weights are loaded afterwards)."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        fused = copy.deepcopy(conv)
        fused.weight, fused.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight,
            bn.bias)
        set_submodule(model, conv_name, fused)
        set_submodule(model, bn_name, torch.nn.Identity())


def saved(state: dict[str, Any], model: Any) -> list[list[str]]:
    """The saved ``folded_batchnorms`` state, checked against the rebuilt model (it comes from a
    run's ``inferopt.json``, which may have been edited); runs saved before folding have none."""
    import torch

    pairs = state.get("folded_batchnorms", [])
    modules = dict(model.named_modules())
    names = [n for p in pairs for n in p] if isinstance(pairs, list) else []
    if not isinstance(pairs, list) or len(names) != len(set(names)) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) for n in p)
            and type(modules.get(p[0])) is torch.nn.Conv2d
            and type(modules.get(p[1])) is torch.nn.BatchNorm2d
            and modules[p[1]].running_mean is not None for p in pairs):
        raise UsageError("saved state 'folded_batchnorms' must list [convolution, BatchNorm2d] "
                         "name pairs of this model, each once; was the run edited?")
    return pairs
