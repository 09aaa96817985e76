"""``int8``: int8 quantization of Linear layers.

``mode=dynamic`` (default): weights int8, symmetric per output channel; activations quantized to
uint8 per tensor at run time (asymmetric); the product runs as an int8 matrix multiplication
(oneDNN's ``qlinear_pointwise`` on plain int8/uint8 tensors, the kernel torch.compile's x86
quantization uses) and is rescaled to float.

On CPUs without VNNI (AVX2 only), oneDNN multiplies uint8 by int8 with ``vpmaddubsw``, which
adds pairs of products into int16 with saturation; full-range int8 weights then give wrong
results. There we quantize weights to 7 bits (±63), as FBGEMM's ``reduce_range`` does, and
record it in the report.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import attrs
from inferopt import Optimizer, hookimpl, option

MODES = ("dynamic",)


def cpu_has_vnni() -> bool:
    from inferopt.plugins.backend_cpu import cpu_flags

    flags = cpu_flags()
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


def quantize_weight_per_channel(weight: Any, qmax: int) -> tuple[Any, Any]:
    """Symmetric per-output-channel int8: (int8 weight [N, K], float32 scale [N])."""
    import torch

    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / qmax).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


class Int8DynamicLinear:  # replaced by a real nn.Module subclass on first use (torch is lazy)
    pass


def _linear_class() -> type:
    global Int8DynamicLinear
    if isinstance(Int8DynamicLinear, type) and hasattr(Int8DynamicLinear, "forward"):
        return Int8DynamicLinear
    import torch

    class _Int8DynamicLinear(torch.nn.Module):
        """A Linear layer with int8 weights and dynamically quantized uint8 activations."""

        def __init__(self, in_features: int, out_features: int, bias: bool, qmax: int) -> None:
            super().__init__()
            self.in_features = in_features
            self.out_features = out_features
            self.register_buffer("weight_int8", torch.zeros(out_features, in_features,
                                                            dtype=torch.int8))
            self.register_buffer("weight_scale", torch.ones(out_features))
            self.register_buffer("qmax", torch.tensor(qmax, dtype=torch.int16))
            self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None
            self._packed: Any = None
            self._zero_points: Any = None

        @classmethod
        def from_linear(cls, linear: Any, qmax: int) -> Any:
            mod = cls(linear.in_features, linear.out_features, linear.bias is not None, qmax)
            q, scale = quantize_weight_per_channel(linear.weight, qmax)
            mod.weight_int8.copy_(q)
            mod.weight_scale.copy_(scale)
            if linear.bias is not None:
                mod.bias.data.copy_(linear.bias.detach().float())
            return mod.to(linear.weight.device)

        def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
            self._packed = None
            super()._load_from_state_dict(*args, **kwargs)

        def _use_onednn(self, x: Any) -> bool:
            return (
                x.device.type == "cpu"
                and torch.backends.mkldnn.is_available()
                and (int(self.qmax) <= 63 or _VNNI)
            )

        def forward(self, x: Any) -> Any:
            shape = x.shape
            x2 = x.reshape(-1, self.in_features)
            if x2.shape[0] == 0 or not self._use_onednn(x2):
                w = self.weight_int8.float() * self.weight_scale[:, None]
                out = torch.nn.functional.linear(x2.float(), w, self.bias)
                return out.to(x.dtype).reshape(*shape[:-1], self.out_features)
            if self._packed is None:
                self._packed = torch.ops.onednn.qlinear_prepack(self.weight_int8, None)
                self._zero_points = torch.zeros(self.out_features, dtype=torch.int64)
            xf = x2.float()
            lo = xf.min().clamp(max=0.0)
            hi = xf.max().clamp(min=0.0)
            scale = ((hi - lo) / 255.0).clamp(min=1e-12)
            zero = torch.round(-lo / scale)
            xq = torch.clamp(torch.round(xf / scale) + zero, 0, 255).to(torch.uint8)
            out = torch.ops.onednn.qlinear_pointwise.tensor(
                xq, scale, zero.to(torch.int64), self._packed, self.weight_scale,
                self._zero_points, self.bias, 1.0, 0, torch.float32, "none", [], "",
            )
            return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

        def extra_repr(self) -> str:
            return (f"in_features={self.in_features}, out_features={self.out_features}, "
                    f"bias={self.bias is not None}, weight_bits={8 if int(self.qmax) > 63 else 7}")

    _Int8DynamicLinear.__name__ = "Int8DynamicLinear"
    _Int8DynamicLinear.__qualname__ = "Int8DynamicLinear"
    Int8DynamicLinear = _Int8DynamicLinear  # type: ignore[misc]
    return _Int8DynamicLinear


_VNNI = False


@attrs.frozen
class Int8Quantizer(Optimizer):
    """int8 quantization of Linear layers (weights per channel, activations per tensor)."""

    name = "int8"
    summary = "int8 weights and activations for Linear layers (int8 matrix products)"

    mode: str = option("dynamic", choices=MODES, help="dynamic: activations quantized at run time")
    skip: tuple[str, ...] = option(
        (), help="layer name patterns (fnmatch) to leave in float, e.g. 'head|*.classifier'"
    )

    def apply(self, model: Any, ctx: Any) -> Any:
        import torch

        global _VNNI
        _VNNI = cpu_has_vnni()
        qmax = 127 if _VNNI else 63
        cls = _linear_class()
        quantized: list[str] = []
        skipped: dict[str, str] = {}
        for name, module in list(model.named_modules()):
            if not isinstance(module, torch.nn.Linear):
                continue
            if any(fnmatch.fnmatchcase(name, pat) for pat in self.skip):
                skipped[name] = "matches skip pattern"
                continue
            _set_submodule(model, name, cls.from_linear(module, qmax))
            quantized.append(name)
        if not quantized:
            ctx.warn("int8: no Linear layer was quantized; the model is unchanged")
        if not _VNNI and not ctx.restoring:
            ctx.warn("int8: this CPU has no VNNI; weights use 7 bits (±63) to avoid int16 "
                     "saturation in the AVX2 int8 kernel")
        ctx.details.update({
            "quantized": quantized,
            "skipped": skipped,
            "weight_bits": 8 if _VNNI else 7,
            "activations": "uint8 per tensor, dynamic",
        })
        return model


def _set_submodule(model: Any, name: str, new: Any) -> None:
    if not name:
        raise ValueError("cannot replace the root module")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@hookimpl
def inferopt_register_optimizers(register: Any) -> None:
    register(Int8Quantizer)
