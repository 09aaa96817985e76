"""The ``inductor`` backend: the model exported with ``torch.export`` (saved as the run's artifact
``backend/<role>/model.pt2``) and compiled by ``torch.compile`` (TorchInductor) on the CPU, with
weight freezing on.

Freezing folds the weights into the compiled graph as constants, which is what lets Inductor's
x86 int8 lowering replace the quantize/dequantize patterns of inferopt's int8 layers (their
``torch.export`` form) with oneDNN int8 kernels (``qlinear_pointwise``/``qconv2d_pointwise``);
without it they run as float arithmetic. The report's environment counts, per role, the int8
kernels Inductor lowered. A model that ``torch.export`` cannot trace is compiled as it is
(no ``.pt2``; the report says so).
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
        with torch._inductor.config.patch(freezing=self.freezing), torch.no_grad():
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
        return program.module(), {"export": "ok", "artifact": "model.pt2"}

    def forward(self, prepared: Any, inputs: Any) -> Any:
        import torch

        from inferopt.utils import call_model

        with torch.no_grad():
            return call_model(prepared, inputs)

    def describe(self) -> dict[str, Any]:
        import torch

        return {"backend": self.name, "torch": torch.__version__, "mode": self.mode,
                "freezing": self.freezing, "threads": torch.get_num_threads(),
                "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "prepared": dict(self.facts)}


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
