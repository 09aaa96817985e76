"""The ``fidelity`` metric: how closely the model's outputs follow the baseline's, on the same
inputs. Needs no labels, so it works for any model."""

from __future__ import annotations

import math
from typing import Any

import attrs

from inferopt import Metric, Quantity, hookimpl


@attrs.frozen
class FidelityMetric(Metric):
    """Agreement with the baseline's outputs: mean per-sample cosine similarity, max and mean
    absolute error, signal-to-noise ratio in dB, and top-1 agreement (for outputs with a class
    dimension)."""

    name = "fidelity"
    summary = "agreement with the baseline outputs (cosine, max abs error, SNR, top-1 agreement)"
    unit = ""
    primary = "cosine"
    higher_is_better = True
    aspect = "quality"
    quantities = {
        "agreement": Quantity("fraction", "higher", "points", "top-1 agreement with baseline"),
        # below 1e-4 of cosine the outputs are the same to the rounding of low-precision kernels
        "cosine": Quantity("", "higher", "difference", "cosine", same_within=1e-4),
        "snr_db": Quantity("dB", "higher", "difference", "output SNR vs baseline"),
    }

    def measure(self, model: Any, backend: Any, data: Any, ctx: Any) -> dict[str, Any]:
        import torch

        from inferopt.utils import primary_output

        if ctx.baseline_outputs is None:
            raise RuntimeError("fidelity needs the baseline outputs; the pipeline provides them")
        cos_sum = 0.0
        n = 0
        max_abs = 0.0
        abs_sum = 0.0
        elems = 0
        agree = 0
        positions = 0
        signal = noise = 0.0
        for batch, ref_out in zip(data.eval, ctx.baseline_outputs, strict=True):
            out = primary_output(backend.forward(model, backend.to_device(batch.inputs)),
                                 ctx.output)
            ref = primary_output(ref_out, ctx.output).to(out.device)
            per_sample = out.dim() >= 2 and out.shape[1:].numel() > 1
            # one value per sample (or a scalar): a per-sample cosine would only compare signs,
            # so compare the batch as one vector
            a = out.float().reshape(out.shape[0], -1) if per_sample else out.float().reshape(1, -1)
            b = ref.float().reshape(a.shape)
            rows = out.shape[0] if out.dim() >= 1 else 1
            cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
            # identical rows agree fully, all-zero ones too (whose cosine is otherwise 0)
            cos = torch.where((a == b).all(dim=1), torch.ones_like(cos), cos)
            cos_sum += float(cos.sum()) if per_sample else float(cos) * rows
            n += rows
            diff = (a - b).abs()
            signal += float(b.double().pow(2).sum())
            noise += float(diff.double().pow(2).sum())
            max_abs = max(max_abs, float(diff.max()))
            abs_sum += float(diff.sum())
            elems += diff.numel()
            if not out.is_floating_point():  # predictions (class indices): exact matches
                same = out == ref
            elif out.dim() >= 2:
                same = out.argmax(-1) == ref.argmax(-1)
            else:
                continue
            agree += int(same.sum())
            positions += same.numel()
        result = {
            "cosine": cos_sum / n,
            "max_abs_err": max_abs,
            "mean_abs_err": abs_sum / elems,
            "agreement": agree / positions if positions else float("nan"),
            # signal-to-noise ratio of the outputs, the baseline being the signal and the
            # difference the noise (infinite, null in JSON, when they are identical)
            "snr_db": _snr_db(signal, noise),
            "signal_energy": signal,
            "noise_energy": noise,
            "samples": n,
            "elements": elems,
            "positions": positions,
        }
        ctx.log.info("fidelity", cosine=round(result["cosine"], 5),
                     agreement=round(result["agreement"], 4))
        return result

    def combine(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Workers saw disjoint shares of the data: averages weighted by what each counted."""
        samples = sum(r["samples"] for r in results)
        elements = sum(r["elements"] for r in results)
        positions = sum(r["positions"] for r in results)
        agree = sum(r["agreement"] * r["positions"] for r in results if r["positions"])
        return {
            "cosine": sum(r["cosine"] * r["samples"] for r in results) / samples,
            "max_abs_err": max(r["max_abs_err"] for r in results),
            "mean_abs_err": sum(r["mean_abs_err"] * r["elements"] for r in results) / elements,
            "agreement": agree / positions if positions else float("nan"),
            "snr_db": _snr_db(sum(r["signal_energy"] for r in results),
                              sum(r["noise_energy"] for r in results)),
            "signal_energy": sum(r["signal_energy"] for r in results),
            "noise_energy": sum(r["noise_energy"] for r in results),
            "samples": samples,
            "elements": elements,
            "positions": positions,
        }


def _snr_db(signal: float, noise: float) -> float:
    """Signal-to-noise ratio in dB, the baseline's outputs being the signal and the difference
    the noise (infinite, null in JSON, when they are identical)."""
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


@hookimpl
def inferopt_register_metrics(register: Any) -> None:
    register(FidelityMetric)
