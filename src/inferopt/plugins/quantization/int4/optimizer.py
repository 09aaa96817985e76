"""``int4``: weight-only 2/3/4-bit quantization of Linear (and transformers ``Conv1D``) layers
with per-group scales.

Weights are packed (two 4-bit codes per byte) in memory and on disk, with float16 scales (and
uint8 zero points when asymmetric) per group of ``group_size`` input channels. ``method=gptq``
uses the run's calibration data to place each rounding error where it hurts the layer's output
least (Frantar et al., 2022); ``rtn`` rounds to nearest. ``path=int8`` (default) computes with
int8 kernels and dynamic int8 activations from a per-channel int8 copy made on first use (W4A8);
``path=dequant`` keeps only the 4-bit weights in memory and dequantizes on every call.

The modules and algorithms are in :mod:`inferopt.plugins.quantization.int4.modules` (imports torch).
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

BITS = (2, 3, 4)
GROUP_SIZES = (32, 64, 128, 256)
METHODS = ("auto", "rtn", "gptq")
SCHEMES = ("asymmetric", "symmetric")
PATHS = ("int8", "dequant")
KERNELS = ("auto", "fbgemm", "onednn", "cuda", "reference")


@attrs.frozen
class Int4Quantizer(Optimizer):
    """Weight-only low-bit quantization (2/3/4 bits, group-wise), RTN or GPTQ."""

    name = "int4"
    kind = "quantization"
    summary = "packed 4-bit (or 2/3-bit) group-wise weights; RTN or GPTQ; W4A8 or dequant compute"

    bits: int = option(4, choices=BITS, searchable=(4, 3), help="bits per weight")
    group_size: int = option(128, choices=GROUP_SIZES, searchable=(128, 32),
                             help="input channels sharing one scale (and zero point)")
    scheme: str = option("asymmetric", choices=SCHEMES,
                         help="asymmetric: scale and zero point per group; symmetric: scale only")
    method: str = option("auto", choices=METHODS, searchable=("rtn", "gptq"),
                         help="rtn: round to nearest; gptq: error-compensating, needs data; "
                              "auto: gptq when the run has calibration data, else rtn")
    path: str = option("int8", choices=PATHS,
                       help="int8: W4A8 via int8 kernels (int8 copy cached in memory); "
                            "dequant: dequantize per call (4-bit in memory, slower)")
    skip: tuple[str, ...] = option((), help="layer name patterns (fnmatch) to leave in float")
    calibration_batches: int = option(32, min=1, help="gptq: calibration batches to use")
    damp: float = option(0.01, min=1e-4, max=1.0,
                         help="gptq: dampening added to the Hessian diagonal (fraction of mean)")
    kernel: str = option("auto", choices=KERNELS, help="int8 kernel for path=int8")

    def apply(self, model: Any, ctx: Any) -> Any:
        from inferopt.plugins.quantization.int4 import modules as q4

        require_swappable(model, "int4")
        symmetric = self.scheme == "symmetric"
        targets, skipped = self._select(model, ctx)
        if not targets:
            raise UsageError(nothing_to_quantize("int4", "Linear and Conv1D", model, skipped))
        device = device_of(model)
        hessians: dict[str, Any] = {}
        has_data = ctx.data is not None and bool(ctx.data.calibration)
        wanted = self.method if self.method != "auto" else "gptq" if has_data else "rtn"
        if self.method == "auto" and not has_data and not ctx.restoring:
            ctx.details["method_note"] = ("method=auto rounded to nearest: no calibration data "
                                          "for gptq (give --data)")
        if wanted == "gptq" and not ctx.restoring:
            data = ctx.data
            if data is None or not data.calibration:
                raise UsageError("step 'int4' with method=gptq needs calibration data; give "
                                 "--data (the run's calibration split is used) or method=rtn")
            batches = data.calibration[: self.calibration_batches]
            hessians = q4.collect_hessians(model, targets, batches, device)
            ctx.details["calibration"] = {
                "batches": len(batches),
                "source": "eval data (no separate split)" if data.calibration_is_eval
                else "calibration split",
            }
        padded: dict[str, str] = {}
        methods: dict[str, str] = {}
        for name, module in targets.items():
            linear = as_linear(module)  # Conv1D: its weight transposed, once, here
            weight = linear.weight.detach().float().cpu()
            if ctx.restoring:  # structure only: the saved codes are loaded over it
                codes, scales, zeros = q4.quantize_rtn(weight * 0, self.bits,
                                                       self.group_size, symmetric)
                method = wanted
            elif wanted == "gptq" and name in hessians:
                codes, scales, zeros = q4.quantize_gptq(weight, hessians[name], self.bits,
                                                        self.group_size, symmetric, self.damp)
                method = "gptq"
            else:
                if wanted == "gptq":
                    ctx.warn(f"int4: {name} saw no calibration input; rounded to nearest")
                codes, scales, zeros = q4.quantize_rtn(weight, self.bits, self.group_size,
                                                       symmetric)
                method = "rtn"
            k = q4.padded(linear.in_features, self.group_size)
            if k != linear.in_features:
                padded[name] = f"{linear.in_features} -> {k} input channels"
            new = q4.Int4Linear.from_codes(
                linear, codes, scales, zeros, bits=self.bits, group_size=self.group_size,
                symmetric=symmetric, path=self.path, kernel=self.kernel).to(device)
            set_submodule(model, name, new)
            methods[name] = method
        kernels = {}
        if self.path == "int8" and not ctx.restoring:
            for name in targets:
                kernels[name] = model.get_submodule(name).int8_layer().active_kernel
        summary = (f"{len(targets)} layers to {self.bits}-bit ({wanted}, group "
                   f"{self.group_size}, {self.scheme}, path={self.path})")
        if padded:
            summary += f"; {len(padded)} padded to the group size"
        if skipped:
            summary += "; left in float: " + ", ".join(
                f"{n} ({why})" for n, why in list(skipped.items())[:5])
        ctx.details.update({
            "summary": summary,
            "quantized": list(targets),
            "methods": methods,
            "padded": padded,
            "skipped": skipped,
            "kernels": kernels,
            "bits": self.bits,
            "group_size": self.group_size,
        })
        from inferopt.plugins.quantization.int8.modules import disable_transformer_fast_path

        disable_transformer_fast_path(model)
        if self.path == "dequant" and not ctx.restoring:
            ctx.warn("int4: path=dequant dequantizes the weights on every call: smallest memory, "
                     "slower than fp32 on most hardware")
        return model

    def _select(self, model: Any, ctx: Any) -> tuple[dict[str, Any], dict[str, str]]:
        import torch

        targets: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        matched: set[str] = set()
        for name, module in model.named_modules():
            if not name:
                continue
            reason = unhandled_reason(module)
            if reason:
                skipped[name] = reason
                continue
            if not linear_like(module):
                continue
            hit = [p for p in self.skip if fnmatch.fnmatchcase(name, p)]
            if hit:
                matched.update(hit)
                skipped[name] = f"matches skip pattern {hit[0]!r}"
            elif isinstance(module, torch.nn.modules.linear.NonDynamicallyQuantizableLinear):
                skipped[name] = "read directly by its MultiheadAttention"
            else:
                targets[name] = module
        untie(targets, weight_owners(model), skipped)
        unused = [p for p in self.skip if p not in matched]
        if unused and not ctx.restoring:
            ctx.warn(f"int4: skip pattern(s) {', '.join(unused)} matched no linear layer")
        return targets, skipped


@hookimpl
def inferopt_register_optimizers(register: Any) -> None:
    register(Int4Quantizer)
