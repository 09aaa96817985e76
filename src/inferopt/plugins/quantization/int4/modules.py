"""Low-bit (2/3/4-bit) weight-only quantization: packing, round-to-nearest, GPTQ, and the
``Int4Linear`` module (imports torch; loaded only when a model is quantized or rebuilt).

Storage (what is saved, and what stays in memory besides the compute cache):

* ``weight_packed`` (uint8 ``[out, in_padded * bits / 8]``): the codes, truly packed. Every 8
  codes take ``bits`` bytes (two 4-bit codes per byte, four 2-bit codes, 8 three-bit codes in 3
  bytes);
* ``scales`` (float16 ``[out, groups]``) and, when asymmetric, ``zeros`` (uint8 ``[out, groups]``);
* ``bias`` (float32).

``in_padded`` is the input size rounded up to the group size (padded columns are zero and never
read). Codes are unsigned: symmetric quantization stores ``q + 2**(bits-1)``.

Inference paths (``path``):

* ``int8`` (default): on first use the codes are unpacked and re-quantized per output channel to
  int8 and run through
  :class:`~inferopt.plugins.quantization.int8.modules.Int8Linear`'s kernels with dynamic
  int8 activations (W4A8 compute, 4-bit storage on disk). The int8 copy is a cache, never saved.
* ``dequant``: dequantize to float on every call; memory stays at 4 bits, speed does not.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from inferopt.plugins.quantization.int8.modules import Int8Linear, PackedWeightModule, plan_kernel

BITS = (2, 3, 4)
GROUP_SIZES = (32, 64, 128, 256)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[rows, n]`` (n a multiple of 8, values < 2**bits) into uint8
    ``[rows, n * bits / 8]``: each run of 8 codes becomes ``bits`` bytes, little-endian."""
    rows, n = codes.shape
    if n % 8:
        raise ValueError(f"pack needs a multiple of 8 codes per row, got {n}")
    c = codes.to(torch.int64).reshape(rows, n // 8, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (c << shifts).sum(dim=-1)  # up to 8 * bits <= 24 bits
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.reshape(rows, n // 8 * bits).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[rows, n * bits / 8]`` -> int64 codes ``[rows, n]``."""
    rows = packed.shape[0]
    if 8 % bits == 0:  # 2 and 4 bits: whole codes per byte, shift the bytes themselves
        per = 8 // bits
        shifts = (torch.arange(per, device=packed.device) * bits).to(torch.uint8)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(rows, n).to(torch.int64)
    b = packed.to(torch.int64).reshape(rows, n // 8, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (b << byte_shifts).sum(dim=-1)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(rows, n)


def unpack_arithmetic(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """:func:`unpack` with integer division and remainder instead of bit shifts (the same
    codes), for exported graphs. The ONNX exporter computes integer floor division through
    float32, so every dividend stays below 2**24: single bytes for 2 and 4 bits, 3-byte words
    for 3 bits."""
    rows = packed.shape[0]
    p = packed.to(torch.int64)
    if 8 % bits:
        bytes_at = torch.tensor([256 ** i for i in range(bits)], device=packed.device)
        p = (p.reshape(rows, n // 8, bits) * bytes_at).sum(-1)  # 8 codes: 8 * bits <= 24 bits
        per = 8
    else:
        per = 8 // bits
    codes_at = torch.tensor([(1 << bits) ** i for i in range(per)], device=packed.device)
    return torch.remainder(torch.div(p.unsqueeze(-1), codes_at, rounding_mode="floor"),
                           1 << bits).reshape(rows, n)


def group_params(w: torch.Tensor, bits: int, symmetric: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (as floats) per row of ``w`` (``[rows, group]``)."""
    levels = (1 << bits) - 1
    if symmetric:
        half = (1 << (bits - 1)) - 1  # e.g. 7 for 4 bits: codes 1..15 around 8
        scale = (w.abs().amax(dim=1) / half).clamp(min=1e-8)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        lo = w.amin(dim=1).clamp(max=0)
        hi = w.amax(dim=1).clamp(min=0)
        scale = ((hi - lo) / levels).clamp(min=1e-8)
        zero = torch.round(-lo / scale).clamp(0, levels)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
                   ) -> torch.Tensor:
    """Codes of ``w`` (``[rows, k]``) with per-row ``scale``/``zero`` (``[rows]``)."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, (1 << bits) - 1)


def padded(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size) * group_size


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes ``[out, in_padded]``, scales, zeros ``[out, groups]``)."""
    out_f, in_f = weight.shape
    k = padded(in_f, group_size)
    w = F.pad(weight.detach().float(), (0, k - in_f))
    groups = w.reshape(out_f * (k // group_size), group_size)
    scale, zero = group_params(groups, bits, symmetric)
    codes = quantize_codes(groups, scale, zero, bits).reshape(out_f, k)
    return codes, scale.reshape(out_f, -1), zero.reshape(out_f, -1)


def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                  symmetric: bool, damp: float = 0.01, block: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al., 2022, Algorithm 1): quantize columns left to right, spreading each
    column's rounding error over the not-yet-quantized columns through the inverse Hessian of the
    layer's reconstruction loss ``H = 2 X^T X``, in blocks with lazy batch updates. Group
    parameters are taken from the (already updated) weights when a group starts."""
    out_f, in_f = weight.shape
    k = padded(in_f, group_size)
    w = F.pad(weight.detach().float().clone(), (0, k - in_f))
    h = torch.zeros(k, k, dtype=torch.float64)
    h[:in_f, :in_f] = hessian.double()
    dead = torch.diag(h) == 0  # inputs that were always zero (and the padding)
    live_mean = torch.diag(h)[~dead].mean() if bool((~dead).any()) else torch.tensor(1.0)
    # dead inputs (and the padding) get the live columns' scale, so that neither they nor the
    # dampening depend on the magnitude of the activations
    h[dead, dead] = live_mean
    w[:, dead] = 0.0
    h += damp * live_mean * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    hinv = hinv.float()
    block = max(block, group_size)  # a group never straddles two blocks (sizes are 2**n)
    codes = torch.zeros(out_f, k)
    scales = torch.zeros(out_f, k // group_size)
    zeros = torch.zeros(out_f, k // group_size)
    for start in range(0, k, block):
        end = min(start + block, k)
        w1 = w[:, start:end].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            g = col // group_size
            if col % group_size == 0:  # parameters from the group's updated weights
                scales[:, g], zeros[:, g] = group_params(w1[:, i:i + group_size], bits,
                                                         symmetric)
            c = quantize_codes(w1[:, i:i + 1], scales[:, g], zeros[:, g], bits)[:, 0]
            codes[:, col] = c
            q = (c - zeros[:, g]) * scales[:, g]
            e = (w1[:, i] - q) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, start:end] = w1
        w[:, end:] -= err1 @ hinv[start:end, end:]
    return codes, scales, zeros


class Int4Linear(PackedWeightModule):
    """A Linear layer whose weights are stored as packed 2/3/4-bit codes with per-group scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, bits: int,
                 group_size: int, symmetric: bool, path: str = "int8",
                 kernel: str = "auto") -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.path = path
        self.kernel = kernel
        k = padded(in_features, group_size)
        groups = k // group_size
        self.register_buffer("weight_packed",
                             torch.zeros(out_features, k // 8 * bits, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("zeros", None if symmetric else
                             torch.zeros(out_features, groups, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_codes(cls, linear: torch.nn.Linear, codes: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor, *, bits: int, group_size: int, symmetric: bool,
                   path: str, kernel: str) -> Int4Linear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, bits=bits,
                  group_size=group_size, symmetric=symmetric, path=path, kernel=kernel)
        mod.weight_packed.copy_(pack(codes.to(torch.int64), bits))
        mod.scales.copy_(scales.to(torch.float16))
        if not symmetric:
            mod.zeros.copy_(zeros.to(torch.uint8))
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().float())
        return mod.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        k = padded(self.in_features, self.group_size)
        codes = unpack(self.weight_packed, self.bits, k).float()
        n_groups = k // self.group_size
        if self.symmetric:
            zero = torch.full((self.out_features, n_groups), float(1 << (self.bits - 1)),
                              device=codes.device)
        else:
            zero = self.zeros.float()
        scale = self.scales.float()
        w = (codes.reshape(self.out_features, n_groups, self.group_size) - zero[..., None])
        w = (w * scale[..., None]).reshape(self.out_features, k)
        return w[:, : self.in_features]

    def int8_layer(self) -> Any:
        """The W4A8 compute cache: the 4-bit weights re-quantized per channel to int8."""
        layer = self._cache.get("int8")
        if layer is None:
            device = self.weight_packed.device
            tmp = torch.nn.Linear(self.in_features, self.out_features,
                                  bias=self.bias is not None, device="meta")
            tmp.weight = torch.nn.Parameter(self.dequantized_weight(), requires_grad=False)
            if self.bias is not None:
                tmp.bias = torch.nn.Parameter(self.bias.clone(), requires_grad=False)
            layer = Int8Linear.from_float(tmp, mode="dynamic", kernel=self.kernel,
                                          qmax=plan_kernel(self.kernel, "dynamic", "linear",
                                                           device)[1])
            self._cache["int8"] = layer
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            return self._exported(x)
        if self.path == "int8":
            return self.int8_layer()(x)
        w = self.dequantized_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _exported(self, x: torch.Tensor) -> torch.Tensor:
        """For torch.export: the weights unpacked and dequantized by graph ops from the packed
        codes (the int8 compute cache is built outside tracing and is not used), so an export
        holds the 4-bit codes; runtimes that constant-fold it run the product in float. The
        codes are unpacked with division and remainder, not bit shifts, which ONNX lacks for
        these types."""
        k = padded(self.in_features, self.group_size)
        codes = unpack_arithmetic(self.weight_packed, self.bits, k).float()
        n_groups = k // self.group_size
        zero = (torch.full((self.out_features, n_groups), float(1 << (self.bits - 1)),
                           device=codes.device) if self.symmetric else self.zeros.float())
        w = codes.reshape(self.out_features, n_groups, self.group_size) - zero[..., None]
        w = (w * self.scales.float()[..., None]).reshape(self.out_features, k)
        w = w[:, : self.in_features].to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, "
                f"symmetric={self.symmetric}, path={self.path}")


def collect_hessians(model: torch.nn.Module, layers: dict[str, torch.nn.Module],
                     batches: list[Any], device: Any) -> dict[str, torch.Tensor]:
    """``H = 2/n * sum x x^T`` over every input row each layer sees on the calibration batches."""
    from inferopt.utils import run_with_input_hooks

    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def accumulate(name: str) -> Any:
        def add(x: torch.Tensor) -> None:
            rows = x.detach().reshape(-1, x.shape[-1]).double().cpu()
            if name not in sums:  # sized from the input: Linear and Conv1D alike
                sums[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
            sums[name] += rows.t() @ rows
            counts[name] += rows.shape[0]

        return add

    run_with_input_hooks(model, {n: (m, accumulate(n)) for n, m in layers.items()}, batches,
                         device)
    return {n: (2.0 * sums[n] / max(counts[n], 1)).float() for n in layers if counts[n]}
