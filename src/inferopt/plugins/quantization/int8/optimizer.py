"""``int8``: int8 quantization of Linear, Conv2d and MultiheadAttention layers.

Modes:

* ``auto`` (default): ``static`` when calibration data is given and the model has Conv2d layers
  or runs on the ``openvino`` backend (which runs the exported per-call quantization of dynamic
  layers slowly), else ``dynamic``.
* ``dynamic``: int8 weights (symmetric, per output channel); activations quantized at run time,
  one scale per row (token); int8 x int8 -> int32 products rescaled in float. Linear layers and
  the projections of ``nn.MultiheadAttention``; Conv2d needs ``static``.
* ``static``: activation ranges calibrated on the run's calibration data (``minmax`` or
  ``percentile`` observer); Linear and Conv2d. Attention projections stay dynamic.
* ``weight-only``: int8 weights, float activations (4x smaller; speed depends on the device).

``smooth=ALPHA`` (SmoothQuant) moves activation outliers into the weights before quantizing:
per input channel ``s = max|X|^ALPHA / max|W|^(1-ALPHA)``, ``W' = W s``, ``X' = X / s``;
``smooth=auto`` (the default; it needs calibration data and is off without it) tries several
alphas. Channels unseen in calibration are guarded, and a layer
keeps its smoothing only where it lowers the layer's int8 error on calibration inputs (see
:mod:`inferopt.plugins.quantization.int8.smoothing`).

With calibration data, each layer's int8 output error is measured on calibration inputs and
layers above ``fallback`` stay in float (:mod:`inferopt.plugins.quantization.int8.sensitivity`):
in bf16 on CPUs with native bf16 matmuls, else in fp32.

The modules and kernels are in :mod:`inferopt.plugins.quantization.int8.modules`; this module
stays light so
that listing plugins does not import torch.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import attrs

from inferopt import Optimizer, UsageError, hookimpl, option
from inferopt.plugins.quantization.layers import (
    as_linear,
    linear_like,
    nothing_to_quantize,
    unhandled_reason,
    untie,
    weight_owners,
)
from inferopt.utils import (
    device_of,
    require_swappable,
    set_submodule,
)

MODES = ("auto", "dynamic", "static", "weight-only")
GRANULARITY = ("per-channel", "per-tensor")
OBSERVERS = ("minmax", "percentile")
ACTIVATIONS = ("auto", "per-row", "per-tensor")
KERNEL_CHOICES = ("auto", "fbgemm", "onednn", "cuda", "reference")


@attrs.frozen
class Int8Quantizer(Optimizer):
    """int8 weights, and int8 activations in dynamic/static modes, for Linear, Conv2d (static)
    and MultiheadAttention layers."""

    name = "int8"
    kind = "quantization"
    #: 2: per-row FBGEMM activations (``layers[...].activations``), resolved ``mode`` and
    #: layers left in float by the sensitivity check in the state; version 1 runs reload with
    #: per-tensor FBGEMM activations, as they were saved
    version = 2
    summary = "int8 quantization (dynamic, static or weight-only) with int8 matrix products"

    mode: str = option("auto", choices=MODES, searchable=("dynamic", "static"),
                       help="auto: static when the model has Conv2d layers and calibration "
                            "data is given, else dynamic; dynamic: activations quantized at "
                            "run time; static: calibrated activation ranges (also Conv2d); "
                            "weight-only: float activations")
    skip: tuple[str, ...] = option(
        (), help="layer name patterns (fnmatch) to leave in float, e.g. 'head|*.classifier'")
    granularity: str = option("per-channel", choices=GRANULARITY, searchable=GRANULARITY,
                              help="weight scales per output channel or one per tensor")
    smooth: float | str = option(
        "auto", min=0.0, max=1.0, searchable=("auto", 0.0),
        help="SmoothQuant migration strength ALPHA (0 = off; 0.5 is typical; needs calibration "
             "data) or auto (with calibration data: try 0.25/0.5/0.75 and none per layer, keep "
             "the most faithful; without: off)")
    observer: str = option("minmax", choices=OBSERVERS,
                           help="static mode: activation range from min/max or a percentile")
    percentile: float = option(99.99, min=50.0, max=100.0,
                               help="percentile observer: the percentile kept (both tails)")
    calibration_batches: int = option(32, min=1, help="calibration batches to observe")
    kernel: str = option("auto", choices=KERNEL_CHOICES,
                         help="int8 kernel; auto picks the fastest that runs here")
    activations: str = option(
        "auto", choices=ACTIVATIONS,
        help="dynamic mode on FBGEMM: one activation scale per row (token), or per tensor "
             "(FBGEMM's own range: fewer passes over the input, loses precision on outlier "
             "tokens), or auto (with calibration data: per tensor for the layers where its "
             "output error is within 1.5x and 0.005 of per row's, else per row)")
    embeddings: bool = option(
        True,
        help="int8 embedding tables too (one scale per row; a head tied to a table shares its "
             "int8 rows, so the tie holds)")
    fallback: float = option(
        0.1, min=0.0, max=10.0,
        help="with calibration data: a layer whose int8 output error (relative, on calibration "
             "inputs) is above this stays in float (bf16 on CPUs with native bf16), named in "
             "the report; 0 = never")

    def __attrs_post_init__(self) -> None:
        if isinstance(self.smooth, str) and self.smooth != "auto":
            raise ValueError(f"smooth must be a number from 0 to 1 or 'auto', not {self.smooth!r}")

    @property
    def smoothing(self) -> bool:
        return self.smooth == "auto" or float(self.smooth) > 0

    def apply(self, model: Any, ctx: Any) -> Any:
        require_swappable(model, "int8")
        device = device_of(model)
        per_channel = self.granularity == "per-channel"
        data = None if ctx.restoring else ctx.data
        has_calibration = data is not None and bool(data.calibration)
        mode = self._resolve_mode(model, ctx, has_calibration)
        ctx.state["mode"] = mode
        if mode != self.mode:
            ctx.details["mode_chosen"] = (
                f"auto -> {mode}: " + (
                    "it runs on openvino and calibration data is given" if mode == "static"
                    and _on_openvino(ctx) else "the model has Conv2d layers and calibration data "
                    "is given" if mode == "static" else "no Conv2d layer int8 can take"
                    if has_calibration or ctx.restoring else "no calibration data"))
            return attrs.evolve(self, mode=mode)._apply(model, ctx, device, per_channel)
        return self._apply(model, ctx, device, per_channel)

    def _resolve_mode(self, model: Any, ctx: Any, has_calibration: bool) -> str:
        """``auto``: static when calibration data is given and the model has a convolution int8
        can take (the conv kernels need calibrated ranges) or runs on OpenVINO (demo MLP: x2.88
        static against x0.92 dynamic; MiniLM: x3.86 against x1.76), else dynamic. A saved run
        says which mode it resolved to."""
        if self.mode != "auto":
            return self.mode
        if ctx.restoring:
            saved = ctx.state.get("mode")
            if saved not in ("dynamic", "static", "weight-only"):
                raise UsageError(f"saved state 'mode' must be dynamic, static or weight-only, "
                                 f"not {saved!r}; was the run edited?")
            return str(saved)
        import torch

        from inferopt.plugins.quantization.int8.modules import Int8Conv2d

        convs = [m for _, m in model.named_modules()
                 if type(m) is torch.nn.Conv2d and Int8Conv2d.supported(m) is None]
        return "static" if has_calibration and (convs or _on_openvino(ctx)) else "dynamic"

    def _apply(self, model: Any, ctx: Any, device: Any, per_channel: bool) -> Any:
        import torch

        from inferopt.plugins.quantization.int8 import batchnorm
        from inferopt.plugins.quantization.int8 import modules as q

        targets, skipped = self._select(model, ctx)
        if not targets:
            raise UsageError(nothing_to_quantize(
                "int8", "Linear, MultiheadAttention and, with mode=static, Conv2d", model,
                skipped))
        # static: the convolutions to quantize calibrate and quantize folded weights (once the
        # step has what it needs, so that a refused step leaves the model as it was)
        folded: list[list[str]] = []
        if self.mode == "static" and (ctx.restoring or (ctx.data is not None
                                                        and bool(ctx.data.calibration))):
            folded = (batchnorm.saved(ctx.state, model) if ctx.restoring else
                      [p for p in batchnorm.foldable(model) if p[0] in targets])
            batchnorm.fold(model, folded)
            if folded:
                targets, skipped = self._select(model, ctx)
        ctx.state["folded_batchnorms"] = folded

        saved = _saved_layers(ctx.state) if ctx.restoring else None
        smooth_scales: dict[str, Any] = {}
        act_ranges: dict[str, tuple[float, int]] = {}
        has_data = ctx.data is not None and bool(ctx.data.calibration)
        # smooth=auto (the default) smooths when there is calibration data; a number insists
        smoothing = self.smoothing and (has_data or self.smooth != "auto")
        if self.smooth == "auto" and self.mode == "weight-only":
            smoothing = False  # float activations have no range to win back
        if self.smooth == "auto" and not has_data and not ctx.restoring:
            ctx.details["smoothing"] = {"alphas": {},
                                        "summary": "not smoothed (no calibration data)"}
        # activations=auto: the layers on FBGEMM's dynamic kernel get per-tensor or per-row
        # activation scales by their calibration error (per row without data)
        choosing = (self.activations == "auto" and self.mode == "dynamic" and has_data
                    and q.plan_kernel(self.kernel, "dynamic", "linear", device)[0] == "fbgemm")
        acts: dict[str, str] = {}
        groups: list[list[str]] = []  # layers called on the same input: run as one
        needs_data = self.mode == "static" or smoothing or choosing
        if needs_data and not ctx.restoring:
            data = ctx.data
            if data is None or not data.calibration:
                raise UsageError(
                    f"step 'int8' with mode={self.mode}, smooth={self.smooth} needs calibration "
                    "data; give --data (the run's calibration split is used)")
            batches = data.calibration[: self.calibration_batches]
            if smoothing or choosing:
                smooth_scales, acts, groups = self._smoothing(model, targets, batches, device,
                                                              ctx, smoothing, choosing)
            if self.mode == "static":
                act_ranges, unseen = self._calibrate(model, targets, batches, device,
                                                     smooth_scales)
                for name in unseen:
                    skipped[name] = "no calibration input reached it"
                    targets.pop(name)
                if not targets:
                    raise UsageError(
                        "int8 mode=static: no calibration input reached any layer to quantize; "
                        f"skipped: {skipped}. Check the calibration data fits the model")
            ctx.details["calibration"] = {
                "batches": len(batches),
                "observer": self.observer if self.mode == "static" else None,
                "source": "eval data (no separate split)" if data.calibration_is_eval
                else "calibration split",
            }
        if saved is not None:  # rebuilding a saved model: the same layers, the same structure
            targets = {n: m for n, m in targets.items() if n in saved}
            smooth_scales = {n: torch.ones(as_linear(targets[n]).in_features)
                             for n, info in saved.items() if info.get("smooth") and n in targets
                             and _kind(targets[n]) != "embedding"}
            act_ranges = {n: (1.0, 0) for n, info in saved.items()
                          if info.get("static") and n in targets}
            groups = list({tuple(info["shares_input"]): info["shares_input"]
                           for info in saved.values() if info.get("shares_input")}.values())

        samples: dict[str, Any] = {}
        if not ctx.restoring and ctx.data is not None and ctx.data.calibration:
            from inferopt.plugins.quantization.int8 import sensitivity

            measured = {n: m for n, m in targets.items() if _kind(m) in ("linear", "conv")}
            samples = sensitivity.collect(model, measured, list(ctx.data.calibration), device)
        errors: dict[str, float] = {}
        fell_back: dict[str, float] = {}
        kept_bf16: list[str] = []
        bf16_here = device.type == "cpu" and q.cpu_has_bf16()
        shared: dict[int, int] = {}  # weight storage -> how many parameters use it
        for _n, p in model.named_parameters(remove_duplicate=False):
            ptr = p.untyped_storage().data_ptr()
            shared[ptr] = shared.get(ptr, 0) + 1
        if saved is not None:  # the layers the run kept in bf16: the saved weights are bf16
            kept_bf16 = _saved_bf16(ctx.state, model)
            for name in kept_bf16:
                set_submodule(model, name, q.Bf16Layer(model.get_submodule(name)))

        layers: dict[str, dict[str, Any]] = {}
        bits: set[int] = set()
        tables: dict[int, tuple[str, Any]] = {}  # float table storage -> (name, Int8Embedding)
        table_smooth: dict[str, str] = {}  # table -> the tied head whose smoothing it holds
        # tables first, so that a head tied to one (GPT-2's lm_head) can share its int8 rows
        ordered = sorted(targets.items(), key=lambda kv: _kind(kv[1]) != "embedding")
        for name, module in ordered:
            kind = _kind(module)
            mode = "dynamic" if kind == "attention" else self.mode
            plan_kind = "linear" if kind == "embedding" else kind or "linear"
            _kernel, qmax = q.plan_kernel(self.kernel, mode, plan_kind, device)
            if saved is not None and "qmax" in saved.get(name, {}):
                qmax = saved[name]["qmax"]
            bits.add(8 if qmax == 127 else 7)
            activations = acts.get(name, "per-row" if self.activations == "auto"
                                   else self.activations)
            if saved is not None:  # runs saved before per-row existed (version 1): per tensor
                activations = saved.get(name, {}).get("activations", "per-tensor")
            tied_table = None
            if kind == "embedding":
                # a smoothed head tied to this table: the table takes the head's scales, so
                # that both read the same int8 rows (the lookup divides them out again)
                ptr = module.weight.untyped_storage().data_ptr()
                head = next((n for n, m in targets.items() if n in smooth_scales
                             and isinstance(m, torch.nn.Linear)
                             and m.weight.untyped_storage().data_ptr() == ptr
                             and m.weight.shape == module.weight.shape), None)
                new = q.Int8Embedding.from_float(
                    module, qmax, None if head is None else smooth_scales[head])
                tables[module.weight.untyped_storage().data_ptr()] = (name, new)
                kernel = "gather"
                set_submodule(model, name, new)
                layers[name] = {"type": type(module).__name__, "kernel": kernel, "qmax": qmax,
                                "smooth": head is not None, "static": False}
                if head is not None:
                    table_smooth[name] = head
                continue
            if isinstance(module, torch.nn.Linear):
                tied_table = tables.get(module.weight.untyped_storage().data_ptr())
                if tied_table is not None and (
                        tied_table[1].weight_int8.shape != module.weight.shape
                        or not per_channel
                        or table_smooth.get(tied_table[0])
                        != (name if name in smooth_scales else None)):
                    # its int8 weight would differ from the table's rows: its own copy
                    tied_table = None
            if isinstance(module, torch.nn.MultiheadAttention):
                new = q.Int8MultiheadAttention.from_float(
                    module, kernel=self.kernel, qmax=qmax, per_channel=per_channel,
                    activations=activations)
                kernel = new.in_proj.active_kernel
            elif isinstance(module, torch.nn.Conv2d):
                new = q.Int8Conv2d.from_float(module, kernel=self.kernel, qmax=qmax,
                                              per_channel=per_channel,
                                              act_range=act_ranges.get(name))
                kernel = new.active_kernel
            else:
                new = q.Int8Linear.from_float(
                    as_linear(module), mode=self.mode, kernel=self.kernel, qmax=qmax,
                    per_channel=per_channel, smooth_scale=smooth_scales.get(name),
                    act_range=act_ranges.get(name), activations=activations)
                kernel = new.active_kernel
            if name in samples:
                from inferopt.plugins.quantization.int8 import sensitivity

                errors[name] = sensitivity.layer_error(module, new, samples[name])
                if 0 < self.fallback < errors[name] and tied_table is None:
                    fell_back[name] = errors[name]
                    # bf16 where the CPU multiplies it natively (faster than fp32, 0.4%
                    # rounding), unless the weight is shared (a cast would break the tie)
                    keep = "bf16" if bf16_here and shared.get(
                        module.weight.untyped_storage().data_ptr(), 0) == 1 else "float"
                    if keep == "bf16":
                        set_submodule(model, name, q.Bf16Layer(module))
                        kept_bf16.append(name)
                    skipped[name] = (f"int8 output error {errors[name]:.3f} on calibration "
                                     f"inputs is above fallback={self.fallback:g}; kept in "
                                     f"{keep}")
                    continue
            if tied_table is not None:
                tied_table[1].share_with(new)
            set_submodule(model, name, new)
            layers[name] = {"type": type(module).__name__, "kernel": kernel, "qmax": qmax,
                            "smooth": name in smooth_scales, "static": name in act_ranges,
                            "activations": activations}
            if tied_table is not None:
                layers[name]["shares_table"] = tied_table[0]
        q.disable_transformer_fast_path(model)
        fused = self._share_inputs(model, groups, layers, ctx)
        ctx.state["layers"] = layers
        ctx.state["bf16"] = kept_bf16
        kernels = sorted({info["kernel"] for info in layers.values()})
        if self.kernel not in ("auto", *kernels):
            ctx.warn(f"int8: kernel={self.kernel} cannot run here; used {', '.join(kernels)}")
        if "reference" in kernels and self.mode != "weight-only" and not ctx.restoring:
            ctx.warn("int8: some layers run on the reference kernel (dequantize + float "
                     "matmul): correct numbers, no speedup")
        if 7 in bits and not ctx.restoring:
            ctx.warn("int8: this CPU has no VNNI; weights use 7 bits (|q| <= 63) so that the "
                     "AVX2 int8 kernel cannot saturate")
        by_kernel: dict[str, int] = {}
        for info in layers.values():
            by_kernel[info["kernel"]] = by_kernel.get(info["kernel"], 0) + 1
        summary = f"{len(layers)} layers quantized ({self.mode}; " + ", ".join(
            f"{n} on {k}" for k, n in sorted(by_kernel.items())) + ")"
        if "smoothing" in ctx.details:
            summary += "; " + ctx.details["smoothing"]["summary"]
        if fused:
            summary += (f"; {sum(len(g) for g in fused)} layers in {len(fused)} groups that "
                        "share their input run as one GEMM each")
        if folded:
            summary += f"; {len(folded)} BatchNorms folded into the convolutions before them"
            ctx.details["folded_batchnorms"] = [bn for _conv, bn in folded]
        if fell_back:
            summary += (f"; {len(fell_back)} too sensitive for int8 kept in float (error above "
                        f"{self.fallback:g}"
                        + (f"; {len(kept_bf16)} of them in bf16)" if kept_bf16 else ")"))
        if skipped:
            summary += "; left in float: " + ", ".join(
                f"{n} ({why})" for n, why in list(skipped.items())[:5])
            if len(skipped) > 5:
                summary += f" and {len(skipped) - 5} more"
        ctx.details.update({
            "summary": summary,
            "mode": self.mode,
            "quantized": list(layers),
            "kernels": {n: info["kernel"] for n, info in layers.items()},
            "skipped": skipped,
            "weight_bits": sorted(bits),
            "activations": _activation_note(self.mode, kernels, [
                info.get("activations") for info in layers.values()
                if info["kernel"] == "fbgemm"]),
        })
        if errors:
            worst = sorted(errors.items(), key=lambda kv: -kv[1])
            ctx.details["sensitivity"] = {
                "measure": "relative output error of each layer against its float layer on "
                           "calibration inputs",
                "fallback": self.fallback,
                "kept_in_float": {n: round(e, 4) for n, e in fell_back.items()},
                "kept_in_bf16": kept_bf16,
                "errors": {n: round(e, 4) for n, e in worst},
            }
            # read by the collapse guard to name the layers most likely to blame
            ctx.details["worst_layers"] = [[n, round(e, 4)] for n, e in worst[:5]]
        elif not ctx.restoring:
            ctx.details["sensitivity"] = "not measured: no calibration data"
        return model

    def _share_inputs(self, model: Any, groups: list[list[str]], layers: dict[str, Any],
                      ctx: Any) -> list[list[str]]:
        """Let each group of int8 layers that the model calls on the same input tensor run as
        one layer (:class:`~inferopt.plugins.quantization.int8.modules.SharedInput`), where
        every member became an int8 layer with the same input transform. Their outputs are
        then views of one stacked output; a model whose code cannot take those (checked on a
        calibration batch) keeps its layers apart."""
        from inferopt.plugins.quantization.int8 import modules as q

        fused = []
        for group in groups:
            members = [model.get_submodule(n) if n in layers else None for n in group]
            if all(type(m) is q.Int8Linear for m in members) and (
                    ctx.restoring or q.SharedInput.stackable(members)):
                q.SharedInput(members)
                fused.append(group)
        if fused and not ctx.restoring:
            from inferopt.utils import run_with_input_hooks

            try:
                run_with_input_hooks(model, {}, ctx.data.calibration[:1], device_of(model))
            except Exception as exc:
                for group in fused:
                    for name in group:
                        member = model.get_submodule(name)
                        member.__dict__.pop("_shared", None)
                        member._cache.pop("shared", None)
                ctx.details["shared_inputs"] = (
                    f"not fused: the model failed on the stacked outputs ({type(exc).__name__}"
                    f": {exc}); its layers run apart")
                return []
        for group in fused:
            for name in group:
                layers[name]["shares_input"] = group
        if fused:
            ctx.details["shared_inputs"] = fused
        return fused

    # -- selection and calibration ----------------------------------------------------------

    def _select(self, model: Any, ctx: Any) -> tuple[dict[str, Any], dict[str, str]]:
        import torch

        from inferopt.plugins.quantization.int8.modules import (
            Int8Conv2d,
            Int8Embedding,
            Int8MultiheadAttention,
        )

        targets: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        matched: set[str] = set()
        inside_attention: set[str] = set()
        for name, module in model.named_modules():
            kind = _kind(module)
            reason = unhandled_reason(module)
            if reason and name:
                skipped[name] = reason
            if kind is None or not name:
                continue
            if name in inside_attention:
                continue
            hit = [p for p in self.skip if fnmatch.fnmatchcase(name, p)]
            if hit:
                matched.update(hit)
                skipped[name] = f"matches skip pattern {hit[0]!r}"
                if kind == "attention":
                    inside_attention.add(f"{name}.out_proj")
                continue
            if kind == "attention":
                inside_attention.add(f"{name}.out_proj")
                if self.mode == "weight-only":
                    skipped[name] = "MultiheadAttention is quantized in dynamic/static modes"
                    continue
                reason = Int8MultiheadAttention.supported(module)
                if reason:
                    skipped[name] = reason
                    continue
            elif kind == "conv":
                if self.mode != "static":
                    skipped[name] = ("Conv2d needs mode=static (its int8 kernel packs the "
                                     "activation scale with the weights)")
                    continue
                reason = Int8Conv2d.supported(module)
                if reason:
                    skipped[name] = reason
                    continue
            elif kind == "embedding":
                if not self.embeddings:
                    continue
                reason = Int8Embedding.supported(module)
                if reason:
                    skipped[name] = reason
                    continue
            elif kind == "linear" and isinstance(
                    module, torch.nn.modules.linear.NonDynamicallyQuantizableLinear):
                skipped[name] = "read directly by its MultiheadAttention"
                continue
            targets[name] = module
        untie(targets, weight_owners(model), skipped)
        for name in inside_attention:  # out_proj of a skipped attention: reason above
            skipped.setdefault(name, "part of a MultiheadAttention that was left in float")
        for name in list(skipped):
            if name in inside_attention and name not in targets:
                parent = name.rsplit(".", 1)[0]
                if parent in targets:
                    skipped.pop(name)  # converted together with its attention
        unused = [p for p in self.skip if p not in matched]
        if unused and not ctx.restoring:
            ctx.warn(f"int8: skip pattern(s) {', '.join(unused)} matched no quantizable layer")
        return targets, skipped

    def _smoothing(self, model: Any, targets: dict[str, Any], batches: list[Any],
                   device: Any, ctx: Any, smoothing_on: bool, choosing: bool
                   ) -> tuple[dict[str, Any], dict[str, str], list[list[str]]]:
        """(SmoothQuant scales, activations) per layer, each chosen by the layer's int8 output
        error on calibration inputs: smoothing where it lowers the error (``smooth=auto``: the
        best of several alphas per layer), per-tensor activations (``activations=auto``)
        where their error is within ``smoothing.TOLERANCE`` of per-row's. Layers called on
        the same input tensor (returned as groups) are chosen together, as one layer with
        their weights stacked, so that they can run as one."""
        import torch

        from inferopt.plugins.quantization.int8 import modules as q
        from inferopt.plugins.quantization.int8 import smoothing

        linears = {n: m for n, m in targets.items() if _kind(m) == "linear"}
        seen, groups = smoothing.collect(model, linears, batches, device)
        for group in groups:  # one layer with the stacked weights stands for the group
            parts = [as_linear(linears[n]) for n in group]
            if len({p.bias is None for p in parts}) > 1:
                continue  # never one layer: each is chosen on its own
            stacked = torch.nn.Linear(parts[0].in_features, sum(p.out_features for p in parts),
                                      bias=parts[0].bias is not None, device="meta")
            stacked.weight = torch.nn.Parameter(
                torch.cat([p.weight.detach().float().cpu() for p in parts]), False)
            if parts[0].bias is not None:
                stacked.bias = torch.nn.Parameter(
                    torch.cat([p.bias.detach().float().cpu() for p in parts]), False)
            linears[" + ".join(group)] = stacked
            seen[" + ".join(group)] = seen[group[0]]
            for name in group:
                seen.pop(name)
        qmax = q.plan_kernel(self.kernel, self.mode, "linear", device)[1]

        def build(linear: Any, scales: Any, sample: Any, activations: str | None,
                  channel_range: Any) -> Any:
            act_range = None
            if self.mode == "static":
                # the range static calibration will find for this smoothing: over every
                # calibration row, so that the choice sees the outlier rows (a few tokens) that
                # set it, not only the sample's (the percentile observer clips those rows:
                # there the judged rows' own range)
                low, high = (channel_range if self.observer == "minmax"
                             else (sample.amin(dim=0), sample.amax(dim=0)))
                if scales is not None:
                    low, high = low / scales, high / scales
                act_range = affine_uint8(float(low.min()), float(high.max()))
            return q.Int8Linear.from_float(
                linear, mode=self.mode, kernel=self.kernel, qmax=qmax,
                per_channel=self.granularity == "per-channel", smooth_scale=scales,
                act_range=act_range, activations=activations or self.activations)

        alphas: tuple[float, ...] = ()
        if smoothing_on:
            alphas = smoothing.AUTO_ALPHAS if self.smooth == "auto" else (float(self.smooth),)
        variants = ("per-tensor", "per-row") if choosing else (None,)
        scales, chosen, acts = {}, {}, {}
        for name, (absmax, fit_absmax, sample, low, high) in seen.items():
            variant, alpha, s = smoothing.choose(linears[name], absmax, fit_absmax, sample,
                                                 alphas, build, variants, (low, high))
            for member in name.split(" + "):  # a group: every member takes the choice
                if variant is not None:
                    acts[member] = variant
                if smoothing_on:
                    chosen[member] = alpha
                if s is not None:
                    scales[member] = s
        if smoothing_on:
            kept = sum(1 for a in chosen.values() if a > 0)
            ctx.details["smoothing"] = {
                "alphas": chosen,
                "summary": f"smoothed {kept} of {len(chosen)} layers"
                           + (f" (the other {len(chosen) - kept} were more faithful without)"
                              if kept < len(chosen) else ""),
            }
        groups = [g for g in groups if " + ".join(g) in seen]
        return scales, acts, groups

    def _calibrate(self, model: Any, targets: dict[str, Any], batches: list[Any],
                   device: Any, smooth_scales: dict[str, Any]
                   ) -> tuple[dict[str, tuple[float, int]], list[str]]:
        from inferopt.utils import observe_inputs

        static = {n: m for n, m in targets.items() if _kind(m) in ("linear", "conv")}
        dims = {n: (1 if _kind(m) == "conv" else -1) for n, m in static.items()}
        obs = observe_inputs(model, static, batches, channel_dims=dims,
                             keep_sample=self.observer == "percentile", device=device,
                             scales={n: 1.0 / s for n, s in smooth_scales.items()})
        ranges = {}
        unseen = []
        for name in static:
            if obs[name].batches == 0:
                unseen.append(name)
                continue
            low, high = obs[name].range(self.observer, self.percentile)
            ranges[name] = affine_uint8(low, high)
        return ranges, unseen


def _kind(module: Any) -> str | None:
    import torch

    if isinstance(module, torch.nn.MultiheadAttention):
        return "attention"
    if linear_like(module):  # Linear, transformers' Conv1D; not a subclass with its own forward
        return "linear"
    if type(module) is torch.nn.Conv2d:
        return "conv"
    if type(module) is torch.nn.Embedding:
        return "embedding"
    return None


def _activation_note(mode: str, kernels: list[str], fbgemm: list[str | None]) -> str:
    """How activations are quantized; ``fbgemm``: each FBGEMM layer's activations."""
    if mode == "weight-only":
        return "float (weight-only)"
    notes = []
    if "fbgemm" in kernels:
        from inferopt.plugins.quantization.int8.modules import fbgemm_reduce_range

        bits = "7-bit" if fbgemm_reduce_range() else "8-bit"
        rows = sum(a == "per-row" for a in fbgemm)
        tensors = len(fbgemm) - rows
        notes.append("fbgemm: " + ", ".join(
            part for part in (rows and f"per row on {rows} layers",
                              tensors and f"uint8 per tensor on {tensors} layers") if part)
            + f" ({bits}), dynamic")
    if {"onednn", "cuda", "reference"} & set(kernels):
        notes.append("per row, dynamic" if mode == "dynamic" else "uint8 per tensor, calibrated")
    return "; ".join(notes)


def _saved_layers(state: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The saved ``layers`` state, checked: it comes from a run's ``inferopt.json``, which may
    have been edited, and ``qmax`` becomes the quantization range of the rebuilt layers."""
    saved = state.get("layers")
    if saved is None:
        return None
    if not isinstance(saved, dict):
        raise UsageError(f"saved state 'layers' must be an object, not {type(saved).__name__}")
    for name, info in saved.items():
        if not isinstance(info, dict):
            raise UsageError(f"saved state 'layers'[{name!r}] must be an object, not "
                             f"{type(info).__name__}")
        qmax = info.get("qmax", 127)
        if not isinstance(qmax, int) or isinstance(qmax, bool) or not 1 <= qmax <= 127:
            raise UsageError(f"saved state 'layers'[{name!r}].qmax must be an integer from 1 "
                             f"to 127, not {qmax!r}; was the run edited?")
    return saved


def _saved_bf16(state: dict[str, Any], model: Any) -> list[str]:
    """The saved ``bf16`` state (layers kept in bf16), checked against the model."""
    names = state.get("bf16", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UsageError("saved state 'bf16' must be a list of layer names; was the run edited?")
    modules = dict(model.named_modules())
    if missing := [n for n in names if not n or n not in modules]:
        raise UsageError(f"saved state 'bf16' names layers this model does not have: "
                         f"{', '.join(missing[:5])}; was the run edited?")
    return names


def affine_uint8(low: float, high: float) -> tuple[float, int]:
    """Scale and zero point mapping [low, high] (widened to include 0) onto uint8."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / 255.0, 1e-8)
    zero = round(-low / scale)
    return scale, max(0, min(255, zero))


@hookimpl
def inferopt_register_optimizers(register: Any) -> None:
    register(Int8Quantizer)


def _on_openvino(ctx: Any) -> bool:
    """Whether the step's model will run on the built-in openvino backend."""
    return getattr(ctx.backend, "name", None) == "openvino"
