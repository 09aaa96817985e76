"""Quantized layers export with torch.export: under export they compute their int8 math from
``quantized_decomposed`` quantize/dequantize ops (what runtimes and compilers fuse into int8
kernels), and the exported program gives the eager model's outputs."""

from __future__ import annotations

import copy

import pytest
import torch

import inferopt


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _ops(program: torch.export.ExportedProgram) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(),
                               torch.nn.Linear(128, 32)).eval()


def _cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()


@pytest.mark.parametrize(("mode", "smooth", "activations"), [
    ("dynamic", 0.0, "per-tensor"), ("dynamic", 0.0, "per-row"), ("static", 0.0, "auto"),
    ("weight-only", 0.0, "auto"), ("static", 0.5, "auto")])
def test_int8_linear_layers_export_as_quantize_dequantize_ops(mode, smooth, activations,
                                                              tmp_path):
    torch.manual_seed(1)
    batches = [torch.randn(8, 64) for _ in range(4)]
    model = inferopt.apply(_mlp(), "int8", data=batches, mode=mode, smooth=smooth,
                           activations=activations)
    x = torch.randn(8, 64)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    ops = _ops(program)
    assert ops.count("quantized_decomposed.dequantize_per_channel.default") >= 2  # weights
    if mode == "weight-only" or activations == "per-row":
        # per-row activations have no per-tensor QDQ form: float activations, int8 weights
        assert not any("quantize_per_tensor" in op for op in ops)
    else:
        assert ops.count("quantized_decomposed.quantize_per_tensor.tensor") == 2
    with torch.inference_mode():
        eager = model(x)
    assert _cos(program.module()(x), eager) > 0.999
    # the int8 weights are in the program, as int8, and it saves and loads (model.pt2)
    assert any(t.dtype == torch.int8 for t in program.state_dict.values())
    torch.export.save(program, str(tmp_path / "model.pt2"))
    loaded = torch.export.load(str(tmp_path / "model.pt2")).module()
    assert _cos(loaded(x[:3]), eager[:3]) > 0.999


def test_int8_conv_layers_export_with_calibrated_activations():
    torch.manual_seed(1)
    batches = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    model = inferopt.apply(_cnn(), "int8", data=batches, mode="static")
    x = torch.randn(4, 3, 16, 16)
    program = torch.export.export(model, (x,))
    ops = _ops(program)
    assert ops.count("quantized_decomposed.quantize_per_tensor.tensor") == 3  # 2 convs, 1 fc
    with torch.inference_mode():
        assert _cos(program.module()(x), model(x)) > 0.999


def test_exporting_leaves_the_eager_kernels_alone():
    torch.manual_seed(1)
    model = inferopt.apply(_mlp(), "int8", data=[torch.randn(8, 64)], mode="dynamic")
    x = torch.randn(8, 64)
    with torch.inference_mode():
        before = model(x)
    torch.export.export(copy.deepcopy(model), (x,))
    with torch.inference_mode():
        assert torch.equal(model(x), before)


def test_int4_layers_export_with_their_packed_codes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 64)).eval()
    reference = copy.deepcopy(model)
    quantized = inferopt.apply(model, "int4", group_size=128)
    x = torch.randn(4, 256)
    program = torch.export.export(quantized, (x,))
    assert any(t.dtype == torch.uint8 for t in program.state_dict.values())
    with torch.inference_mode():
        ref = reference(x)
        exported = program.module()(x)
        # the export dequantizes the 4-bit codes exactly, without the int8 compute cache's
        # activation rounding: at least as close to the float model as the eager int4 model
        assert _cos(exported, ref) > 0.99
        assert _cos(exported, quantized(x)) > 0.999


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_int4_codes_unpack_the_same_without_bit_shifts(bits):
    from inferopt.plugins.quantization.int4.modules import pack, unpack, unpack_arithmetic

    codes = torch.randint(0, 1 << bits, (5, 64))
    packed = pack(codes, bits)
    assert torch.equal(unpack_arithmetic(packed, bits, 64), unpack(packed, bits, 64))
    assert torch.equal(unpack_arithmetic(packed, bits, 64), codes)
