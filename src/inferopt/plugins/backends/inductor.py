"""The ``inductor`` backend: the model exported with ``torch.export`` (saved as the run's artifact
``backend/<role>/model.pt2``) and compiled by ``torch.compile`` (TorchInductor) on the CPU, with
weight freezing on.

Freezing folds the weights into the compiled graph as constants, which is what lets Inductor's
x86 int8 lowering replace quantize/dequantize patterns with oneDNN int8 kernels
(``qlinear_pointwise``/``qconv2d_pointwise``). inferopt's int8 layers export in the form the ONNX
runtimes fuse; :func:`pt2e_form` rewrites their statically quantized products into the form
that lowering matches. Dynamic int8 layers compile to float arithmetic. The report's environment
counts, per role, the rewritten groups and the int8 kernels Inductor lowered. A model that
``torch.export`` cannot trace is compiled as it is (no ``.pt2``; the report says so).
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from inferopt import Backend, PrepareContext, hookimpl, option

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@attrs.frozen
class InductorBackend(Backend):
    """torch.compile (TorchInductor) on the CPU, of the model exported with torch.export."""

    name = "inductor"
    summary = "torch.compile (Inductor, CPU, frozen weights) of the torch.export-ed model (.pt2)"
    # what runs is generated code with the weights frozen into it: the module's parameters no
    # longer describe it, so metrics that look inside modules are skipped with that reason
    exposes_modules = False

    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        option("default", choices=MODES, help="torch.compile mode"))
    freezing: bool = option(
        True, help="fold weights into the compiled graph (needed for the x86 int8 lowering)")
    export: bool = option(
        True, help="compile the torch.export-ed program and save it as model.pt2; false "
                   "compiles the module as it is")
    threads: int = option(0, min=0, help="torch intra-op threads; 0 keeps torch's default")

    #: per role: the artifact, whether torch.export worked, the int8 kernels lowered
    facts: dict[str, Any] = attrs.field(factory=dict, init=False, eq=False, repr=False)

    def prepare(self, model: Any, ctx: PrepareContext) -> Any:
        import torch
        from torch._dynamo.utils import counters

        from inferopt.utils import call_model

        if self.threads:
            torch.set_num_threads(self.threads)
        model = model.to("cpu").eval()
        facts: dict[str, Any] = {"export": "off"}
        target = model
        if self.export and ctx.example_inputs is not None:
            target, facts = self._export(model, ctx)
        compiled = torch.compile(target, mode=self.mode)
        before = dict(counters["inductor"])
        # Inductor compiles on the first calls, here (untimed): the example batch, then one
        # row, so that the batch size is dynamic afterwards. Freezing is set in the global
        # config around them: passed as a torch.compile option it does not reach the x86
        # int8 weight-prepack pass (measured: the prepack then fails in fake tensors).
        # Warm-up and forward both run in inference mode: a call in another grad mode would
        # fail the compiled code's guards and recompile, timed and without freezing.
        with torch._inductor.config.patch(freezing=self.freezing), torch.inference_mode():
            call_model(compiled, ctx.example_inputs)
            smaller = _first_rows(ctx.example_inputs, 1)
            if smaller is not None:
                call_model(compiled, smaller)
        lowered = {k: v - before.get(k, 0) for k, v in counters["inductor"].items()
                   if ("qlinear" in k or "qconv" in k) and v - before.get(k, 0) > 0}
        facts["int8_lowerings"] = dict(sorted(lowered.items()))
        facts["freezing"] = self.freezing
        self.facts[ctx.role] = facts
        ctx.log.info("inductor compiled", export=facts["export"], int8_lowerings=lowered)
        return compiled

    def _export(self, model: Any, ctx: PrepareContext) -> tuple[Any, dict[str, Any]]:
        import torch

        inputs = ctx.example_inputs
        if isinstance(inputs, dict):
            args, kwargs = (), dict(inputs)
        elif isinstance(inputs, (tuple, list)):
            args, kwargs = tuple(inputs), {}
        else:
            args, kwargs = (inputs,), {}
        dim = torch.export.Dim.AUTO
        shapes: Any = ({k: {0: dim} for k in kwargs} if kwargs else tuple({0: dim} for _ in args))
        try:
            program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes)
        except Exception as exc:
            first = str(exc).strip().splitlines()
            ctx.warn(f"torch.export could not trace the model ({type(exc).__name__}: "
                     f"{first[0] if first else ''}); compiled the module as it is, no model.pt2")
            return model, {"export": "failed"}
        path = ctx.artifact_path("model.pt2")
        torch.export.save(program, str(path))
        module = program.module()
        rewritten = pt2e_form(module)
        return module, {"export": "ok", "artifact": "model.pt2", "pt2e_groups": rewritten}

    def forward(self, prepared: Any, inputs: Any) -> Any:
        import torch

        from inferopt.utils import call_model

        with torch.inference_mode():
            return call_model(prepared, inputs)

    def describe(self) -> dict[str, Any]:
        import torch

        return {"backend": self.name, "torch": torch.__version__, "mode": self.mode,
                "freezing": self.freezing, "threads": torch.get_num_threads(),
                "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "prepared": dict(self.facts)}


def pt2e_form(gm: Any) -> int:
    """Rewrite the statically quantized products of an exported graph into the form Inductor's
    x86 int8 lowering matches (that of PT2E quantization); return how many were rewritten.

    inferopt's int8 layers export for the ONNX runtimes: activation quantize/dequantize with
    tensor scale and zero point, the weight dequantized as ``[in, out]`` for a ``matmul``, the
    bias as int32 at the product's scale. Inductor wants the ``.default`` overloads with the
    scale and zero point as numbers, the ``[out, in]`` weight in ``linear`` (or ``conv2d``)
    and a float bias. Only groups whose activation scale is a constant (static mode) are
    rewritten: the lowering has no pattern for a scale computed in the graph.
    """
    import torch
    import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops

    qd = torch.ops.quantized_decomposed
    aten = torch.ops.aten
    graph = gm.graph

    def constant(node: Any) -> Any:
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        return value

    def float_bias(node: Any) -> Any:
        """The float bias buffer an int32 bias dequantize was computed from, or None."""
        if (node is None or node.target is not qd.dequantize_per_channel.default
                or node.args[4] != -(2 ** 31)):
            return None
        source = node.args[0]
        while source.op == "call_function" and source.target is not aten.div.Tensor:
            source = source.args[0]
        bias = source.args[0] if source.op == "call_function" else None
        return bias if bias is not None and bias.op == "get_attr" else None

    count = 0
    for dq in list(graph.nodes):
        if dq.target is not qd.dequantize_per_tensor.tensor:
            continue
        q, scale, zero = dq.args[0], dq.args[1], dq.args[2]
        if (q.target is not qd.quantize_per_tensor.tensor or scale.op != "get_attr"
                or zero.op != "get_attr" or len(dq.users) != 1):
            continue
        (user,) = dq.users
        weight = user.args[1] if len(user.args) > 1 else None
        if weight is None or weight.target is not qd.dequantize_per_channel.default:
            continue
        if user.target is aten.matmul.default:
            transposed = weight.args[0]
            if (user.args[0] is not dq or weight.args[3] != 1
                    or transposed.target is not aten.t.default):
                continue
            add = next(iter(user.users)) if len(user.users) == 1 else None
            bias = float_bias(add.args[1]) if (add is not None and add.target is aten.add.Tensor
                                               and add.args[0] is user) else None
            replaced = user if bias is None else add
        elif user.target is aten.conv2d.default and user.args[0] is dq:
            bias = float_bias(user.args[2] if len(user.args) > 2 else None)
            if bias is None and len(user.args) > 2 and user.args[2] is not None:
                continue
            replaced = user
        else:
            continue
        s, z = float(constant(scale)), int(constant(zero))
        with graph.inserting_before(replaced):
            q_new = graph.call_function(qd.quantize_per_tensor.default,
                                        (q.args[0], s, z, *q.args[3:]))
            dq_new = graph.call_function(qd.dequantize_per_tensor.default,
                                         (q_new, s, z, *dq.args[3:]))
            if user.target is aten.matmul.default:
                w = graph.call_function(qd.dequantize_per_channel.default,
                                        (transposed.args[0], weight.args[1], weight.args[2], 0,
                                         *weight.args[4:]))
                new = graph.call_function(aten.linear.default, (dq_new, w, bias))
            else:
                new = graph.call_function(aten.conv2d.default,
                                          (dq_new, weight, bias, *user.args[3:]))
        replaced.replace_all_uses_with(new)
        count += 1
    if count:
        graph.eliminate_dead_code()
        gm.recompile()
    return count


def _first_rows(inputs: Any, n: int) -> Any:
    """``inputs`` cut to their first ``n`` rows, or None when the batch has no more."""
    import torch

    if isinstance(inputs, torch.Tensor):
        return inputs[:n] if inputs.dim() and inputs.shape[0] > n else None
    if isinstance(inputs, dict):
        cut = {k: _first_rows(v, n) if isinstance(v, torch.Tensor) else v
               for k, v in inputs.items()}
        return None if any(v is None for v in cut.values()) else cut
    if isinstance(inputs, (tuple, list)):
        parts = [_first_rows(v, n) if isinstance(v, torch.Tensor) else v for v in inputs]
        return None if any(p is None for p in parts) else type(inputs)(parts)
    return None


@hookimpl
def inferopt_register_backends(register: Any) -> None:
    register(InductorBackend)
