"""What the ``onnxruntime`` and ``openvino`` backends share: exporting a model to ONNX with the
dynamo exporter (batch dimension dynamic), mapping the run's inputs and outputs onto a graph's
flat lists, and counting the quantized operators in a graph.

Quantized inferopt modules export as QDQ graphs: under ``torch.export`` they compute their int8
math from PyTorch's ``quantized_decomposed`` quantize/dequantize ops, which the exporter turns
into ``QuantizeLinear``/``DequantizeLinear``. Its own translation of the ``.tensor`` overloads
(scale and zero point given as tensors, as calibrated buffers and dynamic scales are) reads the
zero point as a Python number; :func:`translations` gives it one that keeps it a tensor.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from inferopt import UsageError

#: the extra that installs each runtime, for the "not installed" messages
EXTRAS = {"onnxruntime": "inferopt[onnxruntime]", "openvino": "inferopt[openvino]"}

#: ONNX operators that compute in 8-bit integers (after a runtime's fusions) and the QDQ ops
INT8_OPS = ("QGemm", "QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger",
            "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits", "QAttention",
            "DynamicQuantizeLinear")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    """The modules of ``modules`` that cannot be imported (checked without importing them)."""
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


@attrs.frozen
class GraphIO:
    """How the run's inputs and the model's outputs map onto an exported graph's flat lists."""

    input_names: tuple[str, ...]
    input_keys: tuple[str, ...]  # the dict keys of the inputs, in graph order ("" if positional)
    output_kind: str  # "tensor", "tuple" or "dict"
    output_keys: tuple[str, ...]
    #: quantizers shared by :func:`share_quantized_activations`: residual sums that read an
    #: int8 tensor, poolings moved after a quantizer
    shared: dict[str, int] = attrs.field(factory=dict)

    def feed(self, inputs: Any) -> dict[str, Any]:
        """The graph's inputs as numpy arrays, by graph input name."""
        args, kwargs = as_args(inputs)
        values = [kwargs[k] for k in self.input_keys] if kwargs else list(args)
        return {name: value.detach().cpu().numpy()
                for name, value in zip(self.input_names, values, strict=True)}

    def outputs(self, arrays: list[Any]) -> Any:
        """The runtime's output arrays as torch tensors, in the model's own structure."""
        import numpy as np
        import torch

        tensors = [torch.from_numpy(np.asarray(a)) for a in arrays]
        if self.output_kind == "tensor":
            return tensors[0]
        if self.output_kind == "dict":
            return dict(zip(self.output_keys, tensors, strict=True))
        return tuple(tensors)


def as_args(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def output_structure(output: Any, backend: str) -> tuple[str, tuple[str, ...]]:
    import torch

    if isinstance(output, torch.Tensor):
        return "tensor", ()
    if isinstance(output, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in output):
        return "tuple", ()
    if isinstance(output, dict) and all(isinstance(o, torch.Tensor) for o in output.values()):
        return "dict", tuple(output)
    if hasattr(output, "to_tuple") and hasattr(output, "keys"):  # transformers' ModelOutput
        return "dict", tuple(output.keys())
    raise UsageError(
        f"{backend}: the model returns a {type(output).__name__}; this backend hands back a "
        "tensor, a flat tuple or a flat dict of tensors")


def translations(backend: str) -> dict[Any, Any]:
    """ONNX translations of the ``quantized_decomposed`` per-tensor ops whose scale and zero
    point are tensors (the exporter's own reads the zero point as a Python int), of attention,
    and of ``inferopt::dynamic_int8_matmul`` (an int8 product with activations quantized per
    call), in the form ``backend`` runs in int8."""
    import onnx
    import torch
    import torch.ao.quantization.fx._decomposed
    from onnx import TensorProto
    from onnxscript import opset21 as op

    types = {torch.uint8: TensorProto.UINT8, torch.int8: TensorProto.INT8}

    def onnx_type(dtype: Any) -> int:  # a torch dtype, or already an ONNX type (the exporter)
        return types[dtype] if dtype in types else int(dtype)

    def quantize(input: Any, scale: Any, zero_point: Any, quant_min: int, quant_max: int,
                 dtype: Any) -> Any:
        return op.QuantizeLinear(input, scale, op.Cast(zero_point, to=onnx_type(dtype)))

    def dequantize(input: Any, scale: Any, zero_point: Any, quant_min: int, quant_max: int,
                   dtype: Any, out_dtype: Any = None) -> Any:
        return op.DequantizeLinear(input, scale, op.Cast(zero_point, to=onnx_type(dtype)))

    def dynamic_matmul(input: Any, weight: Any, weight_scale: Any) -> Any:
        # the chain ONNX Runtime's own dynamic quantizer writes, which it fuses (with a
        # following bias Add) into one DynamicQuantizeMatMul
        q, scale, zero = op.DynamicQuantizeLinear(input)
        product = op.Cast(op.MatMulInteger(q, weight, zero), to=TensorProto.FLOAT)
        return op.Mul(product, op.Mul(scale, weight_scale))

    def symmetric_matmul(input: Any, weight: Any, weight_scale: Any) -> Any:
        # one activation scale from the tensor's largest magnitude, zero point 128: the QDQ
        # form OpenVINO's int8 layers take
        scale = op.Div(op.ReduceMax(op.Abs(input), keepdims=0), op.Constant(value_float=127.0))
        scale = op.Max(scale, op.Constant(value_float=1e-12))
        zero = op.Constant(value=onnx.helper.make_tensor("zero", TensorProto.UINT8, [], [128]))
        activations = op.DequantizeLinear(op.QuantizeLinear(input, scale, zero), scale, zero)
        return op.MatMul(activations, op.DequantizeLinear(weight, weight_scale, axis=1))

    qd = torch.ops.quantized_decomposed
    table = {qd.quantize_per_tensor.tensor: quantize, qd.dequantize_per_tensor.tensor: dequantize,
             torch.ops.aten.scaled_dot_product_attention.default: attention}
    # an optimizer plugin's op, registered when its modules are loaded (the int8 plugin:
    # dynamic activations under ONNX export)
    with contextlib.suppress(AttributeError, RuntimeError):
        table[torch.ops.inferopt.dynamic_int8_matmul.default] = (
            dynamic_matmul if backend == "onnxruntime" else symmetric_matmul)
    return table


def attention(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> Any:
    """``scaled_dot_product_attention`` as the plain chain that ONNX Runtime and OpenVINO
    recognize as attention: ``MatMul(Q, K^T) * scale + mask -> Softmax -> MatMul(V)``.

    OpenVINO's CPU plugin fuses that chain into one attention kernel. The exporter's own
    translation scales Q and K apart and puts ``IsNaN``/``Where`` after the Softmax, which breaks
    the fusion: on a MiniLM encoder at batch 32 its unfused attention took about a third of
    OpenVINO's time. Like that translation, a boolean mask becomes an additive mask of the
    lowest finite value, so a query whose keys are all masked gets the mean of the values
    where PyTorch gives zeros.
    """
    import math

    import onnx_ir as ir
    from onnxscript import opset21 as op

    rank = len(query.shape)
    if enable_gqa and rank >= 3 and query.shape[-3] != key.shape[-3]:
        # grouped-query attention: each key/value head (dimension -3) serves several query
        # heads, as repeat_interleave would give them
        heads = rank - 3
        shape = op.Concat(op.Shape(key, start=0, end=heads + 1),
                          op.Constant(value_ints=[query.shape[-3] // key.shape[-3]]),
                          op.Shape(key, start=heads + 1), axis=0)
        flat = op.Concat(op.Shape(key, start=0, end=heads), op.Constant(value_ints=[-1]),
                         op.Shape(key, start=heads + 1), axis=0)
        key, value = (op.Reshape(op.Expand(op.Unsqueeze(t, op.Constant(value_ints=[heads + 1])),
                                           shape), flat) for t in (key, value))
    lowest = op.Constant(value=ir.tensor(query.dtype.min, dtype=query.dtype))
    zero = op.Constant(value=ir.tensor(0.0, dtype=query.dtype))
    if is_causal:
        size = op.Concat(op.Shape(query, start=-2, end=-1), op.Shape(key, start=-2, end=-1),
                         axis=0)
        lower = op.Trilu(op.Expand(op.Constant(value_ints=[1]), size), upper=0)
        attn_mask = op.Where(op.Cast(lower, to=ir.DataType.BOOL), zero, lowest)
    elif attn_mask is not None and attn_mask.dtype == ir.DataType.BOOL:
        attn_mask = op.Where(attn_mask, zero, lowest)
    head = query.shape[-1]
    factor = (op.Constant(value=ir.tensor(scale if scale is not None else 1 / math.sqrt(head),
                                          dtype=query.dtype))
              if scale is not None or isinstance(head, int)
              else op.Reciprocal(op.Sqrt(op.CastLike(op.Shape(query, start=-1), query))))
    key_t = op.Transpose(key, perm=[*range(rank - 2), rank - 1, rank - 2])
    scores = op.Mul(op.MatMul(query, key_t), factor)
    if attn_mask is not None:
        scores = op.Add(scores, attn_mask)
    weights = op.Softmax(scores, axis=-1)
    if dropout_p:
        weights, _ = op.Dropout(weights, op.Constant(value_float=dropout_p))
    return op.MatMul(weights, value)


def export_onnx(model: Any, inputs: Any, path: Path, *, opset: int, backend: str) -> GraphIO:
    """Export ``model`` (on the CPU, in eval mode) to ``path`` with the dynamo exporter, every
    input's first dimension dynamic; return how inputs and outputs map onto the graph."""
    import onnx
    import torch

    from inferopt.utils import call_model

    with torch.inference_mode():
        reference = call_model(model, inputs)
    kind, keys = output_structure(reference, backend)
    args, kwargs = as_args(inputs)
    dim = torch.export.Dim.DYNAMIC
    shapes: Any = ({k: {0: dim} for k in kwargs} if kwargs else tuple({0: dim} for _ in args))
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    try:
        with quiet_exporter():
            torch.onnx.export(model, args, str(path), kwargs=kwargs or None,
                              dynamic_shapes=shapes, opset_version=opset, dynamo=True,
                              custom_translation_table=translations(backend), verbose=False,
                              # one self-contained file unless past protobuf's 2 GB limit
                              external_data=weight_bytes > 1_500_000_000)
    except Exception as exc:
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
        raise UsageError(
            f"{backend}: torch.onnx could not export the model ({type(exc).__name__}: "
            f"{first[0] if first else ''}); run it on --backend cpu") from exc
    proto = onnx.load(str(path), load_external_data=False)
    shared = share_quantized_activations(proto.graph)
    scalars = scalar_weight_scales(proto.graph, path.parent)
    if any(shared.values()) or scalars:
        onnx.save(proto, str(path))  # the weights (external data, if any) stay where they are
    graph = proto.graph
    names = tuple(i.name for i in graph.input)
    input_keys: tuple[str, ...] = ()
    if kwargs:
        # the exporter names graph inputs after the forward's parameters; keep the batch's
        # keys that made it into the graph, in graph order
        if set(names) - set(kwargs):
            raise UsageError(f"{backend}: the exported graph takes inputs {list(names)} that "
                             f"the batch does not have ({sorted(kwargs)})")
        input_keys = names
    elif len(names) != len(args):
        raise UsageError(
            f"{backend}: the exported graph takes {len(names)} inputs ({', '.join(names)}) "
            f"but the batch has {len(args)}; inputs the model ignores or turns into constants "
            "cannot be fed")
    return GraphIO(names, input_keys, kind, keys, shared)


def share_quantized_activations(graph: Any) -> dict[str, int]:
    """Quantize a convolutional network's feature maps once, as the runtimes' int8 kernels want
    them (and as NNCF and ONNX Runtime's own quantizer place their quantizers); return how many
    residual sums and poolings changed. Each int8 layer quantizes its own input, so two
    rewrites apply where a calibrated (constant-scale) ``QuantizeLinear`` reads the output of a
    ``Relu`` or ``MaxPool``:

    - a residual ``Add`` that reads the same tensor reads it through that quantizer's
      ``DequantizeLinear`` (the residual sum then starts from the int8 tensor the next layer
      reads, so the runtime keeps the tensor in int8 instead of also keeping a float copy);
    - a ``MaxPool`` whose output only quantizers read gets the same quantizer on its input too
      (the same values: a per-tensor quantizer is monotonic, so it commutes with the max), so
      the pooling runs on int8 and the layer before it can write int8.

    Transformer graphs are left as they are: their quantized tensors come out of LayerNorms
    and matmuls, and their residual stream stays in float. So are graphs with subgraphs
    (``If``, ``Loop``), whose reads of outer tensors this pass does not follow."""
    from onnx import helper

    changed = {"residual_adds": 0, "pools": 0}
    if _has_subgraphs(graph):
        return changed
    constants = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    names = set(producer) | {i.name for i in graph.input} | constants | {
        n.name for n in graph.node}
    results = {o.name for o in graph.output}
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        tensor, params = q.input[0], list(q.input[1:])
        source = producer.get(tensor)
        dq = next((n for n in readers.get(q.output[0], ()) if n.op_type == "DequantizeLinear"
                   and list(n.input[1:]) == params), None)
        if source is None or source.op_type not in ("Relu", "MaxPool") or dq is None \
                or not set(params) <= constants:
            continue
        for add in readers[tensor]:
            # a residual sum of two activations (not a bias or another constant)
            if add.op_type == "Add" and not set(add.input) & constants:
                for i in (i for i, name in enumerate(add.input) if name == tensor):
                    add.input[i] = dq.output[0]
                    changed["residual_adds"] += 1
        others = [n for n in readers[tensor] if tensor in n.input]  # the Adds now read dq
        pooled = source.input[0]
        # the pooled values only (no indices output), read by nothing but such quantizers
        if source.op_type == "MaxPool" and len([o for o in source.output if o]) == 1 \
                and tensor not in results and all(
                    n.op_type == "QuantizeLinear" and list(n.input[1:]) == params
                    for n in others) \
                and getattr(producer.get(pooled), "op_type", "") != "DequantizeLinear":
            quantized = _new_name(f"{tensor}_input_int8", names)
            dequantized = _new_name(f"{tensor}_input_int8_dq", names)
            graph.node.extend([
                helper.make_node("QuantizeLinear", [pooled, *params], [quantized],
                                 name=_new_name(f"{source.name}_quantize", names)),
                helper.make_node("DequantizeLinear", [quantized, *params], [dequantized],
                                 name=_new_name(f"{source.name}_dequantize", names))])
            source.input[0] = dequantized
            changed["pools"] += 1
    if any(changed.values()):
        _sort_nodes(graph)
    return changed


def _has_subgraphs(graph: Any) -> bool:
    return any(a.g.node or len(a.graphs) for n in graph.node for a in n.attribute)


def _new_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_2``, ``base_3``, ... : a name no tensor or node of the graph has."""
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def scalar_weight_scales(graph: Any, base_dir: Path) -> bool:
    """Give a dynamic int8 product whose weight columns all have the same scale (``int8:
    granularity=per-tensor``) that scale as a scalar: ONNX Runtime's DynamicQuantizeMatMul
    takes a per-tensor path for it (the same values; on a 1024-4096-1024 MLP at batch 1 about
    30 us of 390 us per call faster). Return whether any changed. ``base_dir``: where a
    model's external data lies."""
    import numpy as np
    from onnx import numpy_helper

    if _has_subgraphs(graph):
        return False
    scales = {n.output[1] for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
    weights = {i.name: i for i in graph.initializer}
    # an initializer read only by those products' scalings (not a per-channel dequantization)
    readers: Counter[str] = Counter(x for n in graph.node for x in n.input)
    scalings = [n for n in graph.node if n.op_type == "Mul" and set(n.input) & scales]
    only = Counter(x for n in scalings for x in n.input)
    changed = False
    for node in scalings:
        for name in (x for x in node.input if x in weights and weights[x].dims
                     and readers[x] == only[x]):
            value = numpy_helper.to_array(weights[name], base_dir=str(base_dir))
            if value.ndim == 1 and value.dtype == np.float32 and (value == value[0]).all():
                weights[name].CopyFrom(numpy_helper.from_array(value[:1].reshape(()), name))
                changed = True
    return changed


def _sort_nodes(graph: Any) -> None:
    """Order the nodes so that each comes after the producers of its inputs (as ONNX requires),
    keeping the present order where it already does (Kahn's algorithm)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    needs = [{producer[x] for x in n.input if x in producer} for n in graph.node]
    readers: dict[int, list[int]] = {}
    for i, deps in enumerate(needs):
        for d in deps:
            readers.setdefault(d, []).append(i)
    waiting = [len(deps) for deps in needs]
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for r in readers.get(i, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(graph.node):
        raise UsageError("onnx export: sharing quantizers left a cycle in the graph")
    nodes = [type(graph.node[i])() for i in order]
    for node, i in zip(nodes, order, strict=True):
        node.CopyFrom(graph.node[i])
    del graph.node[:]
    graph.node.extend(nodes)


def op_counts(model_proto: Any) -> dict[str, int]:
    """How many nodes of each quantized or QDQ operator type a graph holds (subgraphs and
    functions included)."""
    counts: Counter[str] = Counter()

    def walk(nodes: Any) -> None:
        for node in nodes:
            if node.op_type in INT8_OPS or node.op_type in QDQ_OPS:
                counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node):
                    walk(attr.g.node)

    walk(model_proto.graph.node)
    for function in model_proto.functions:
        walk(function.node)
    return dict(sorted(counts.items()))


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """torch.onnx logs a line per optional library it lacks and warns about its own
    internals; none of it is the user's business during a run."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.setLevel(level)
