"""The int4 optimizer: packing, group-wise quantization, GPTQ, inference paths, save/load."""

from __future__ import annotations

import pytest
import torch

import inferopt
from inferopt._contract import StepContext
from inferopt._logging import get_logger
from inferopt.plugins.quantization.int4 import modules as q4
from inferopt.plugins.quantization.int4.optimizer import Int4Quantizer
from tests.helpers import demo_correct, tiny_gpt2


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_roundtrip_is_exact_and_really_packed(bits):
    codes = torch.randint(0, 1 << bits, (5, 64))
    packed = q4.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, 64 * bits // 8)  # 4 bits: two codes per byte
    assert torch.equal(q4.unpack(packed, bits, 64), codes)


def test_four_bit_packing_layout_is_two_codes_per_byte_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]])
    assert q4.pack(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0xF7]]


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_rtn_error_is_bounded_by_half_a_step(scheme):
    torch.manual_seed(0)
    w = torch.randn(8, 256)
    codes, scales, zeros = q4.quantize_rtn(w, 4, 64, scheme == "symmetric")
    deq = ((codes.reshape(8, 4, 64) - zeros[..., None]) * scales[..., None]).reshape(8, 256)
    step = scales.repeat_interleave(64, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert codes.min() >= 0 and codes.max() <= 15


def apply(model, data=None, **opts):
    ctx = StepContext(log=get_logger(), data=data)
    return Int4Quantizer(**opts).apply(model, ctx), ctx


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                               torch.nn.Linear(512, 64))


@pytest.mark.parametrize("path", ["int8", "dequant"])
def test_outputs_stay_close_and_storage_is_packed(path):
    model = mlp()
    x = torch.randn(16, 256)
    ref = model(x).detach()
    qm, _ctx = apply(model, path=path)
    layer = qm[0]
    assert type(layer).__name__ == "Int4Linear"
    assert layer.weight_packed.dtype == torch.uint8
    assert layer.weight_packed.shape == (512, 128)
    assert layer.scales.dtype == torch.float16 and layer.scales.shape == (512, 2)
    with torch.inference_mode():
        out = qm(x)
    cos = torch.nn.functional.cosine_similarity(out, ref).min()
    assert cos > 0.99
    # nothing float-sized is saved for the weights
    saved = {k: v for k, v in qm.state_dict().items() if k.startswith("0.")}
    assert set(saved) == {"0.weight_packed", "0.scales", "0.zeros", "0.bias"}


def test_saved_size_is_about_an_eighth():
    from inferopt._artifacts import weights_bytes

    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))
    base = len(weights_bytes(model))
    qm, _ = apply(model)
    assert len(weights_bytes(qm)) / base < 0.16


def test_input_size_not_divisible_by_group_is_padded_and_reported():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(100, 32))
    x = torch.randn(4, 100)
    ref = model(x).detach()
    qm, ctx = apply(model, group_size=64)
    assert ctx.details["padded"] == {"0": "100 -> 128 input channels"}
    assert torch.nn.functional.cosine_similarity(qm(x), ref).min() > 0.99


def test_gptq_beats_round_to_nearest_on_held_out_data():
    # a trained model (the demo classifier) and its real data: calibration on the training
    # split, error measured on the held-out split
    from inferopt._contract import SourceContext
    from inferopt.plugins.sources.demo import DemoData, DemoModels

    sctx = SourceContext(log=get_logger(), batch_size=128)
    data = DemoData().load("demo:digits", sctx)
    base = DemoModels().load("demo:digits-mlp-small", sctx)
    x = torch.cat([b.inputs for b in data.eval])
    with torch.inference_mode():
        ref = base(x)
    errors = {}
    for method in ("rtn", "gptq"):
        import copy

        qm, _ = apply(copy.deepcopy(base), data=data, method=method, bits=3, group_size=32,
                      path="dequant")
        with torch.inference_mode():
            errors[method] = float((qm(x) - ref).pow(2).mean())
    assert errors["gptq"] < 0.75 * errors["rtn"]


def test_method_auto_uses_gptq_with_calibration_data_and_says_when_it_cannot():
    from inferopt._contract import Batch, Data

    torch.manual_seed(1)
    batches = [Batch(torch.randn(16, 256)) for _ in range(4)]
    _, with_data = apply(mlp(), data=Data(eval=batches, calibration=batches))
    assert set(with_data.details["methods"].values()) == {"gptq"}
    assert "(gptq, group" in with_data.details["summary"]
    _, without = apply(mlp())
    assert set(without.details["methods"].values()) == {"rtn"}
    assert "no calibration data" in without.details["method_note"]


def test_bad_options_are_clear():
    with pytest.raises(inferopt.UsageError, match="option 'bits' got '5'; allowed: one of 2, 3, 4"):
        inferopt.apply(mlp(), "int4", bits="5")
    with pytest.raises(inferopt.UsageError, match="allowed: one of 32, 64, 128, 256"):
        inferopt.apply(mlp(), "int4", group_size=100)
    with pytest.raises(inferopt.UsageError, match="method=gptq needs calibration data"):
        apply(mlp(), method="gptq")
    with pytest.raises(inferopt.UsageError, match="found no layer to quantize"):
        apply(torch.nn.Sequential(torch.nn.ReLU()))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_demo_run_saves_loads_and_keeps_accuracy(tmp_path, method):
    report = inferopt.run(model="demo:digits-mlp-small", out=tmp_path / "r",
                          optimize=[f"int4:method={method}"],
                          metrics=["accuracy", "size"])
    assert report.verdict["accuracy_drop_points"] <= 1.5
    loaded = inferopt.load(tmp_path / "r")
    assert type(loaded[0]).__name__ == "Int4Linear"
    assert demo_correct(loaded) == report.optimized["accuracy"]["correct"]


@pytest.mark.cuda
def test_cuda_paths():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = mlp().cuda()
    x = torch.randn(40, 256, device="cuda")
    ref = model(x).detach()
    for path in ("int8", "dequant"):
        qm, _ = apply(mlp().cuda(), path=path)
        out = qm(x)
        assert out.device.type == "cuda"
        assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.99


# --- regressions found in review -------------------------------------------------------------


def test_transformer_layers_run_after_int4():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 64)
    with torch.inference_mode():
        ref = layer(x)
    qm, ctx = apply(layer, group_size=32)
    with torch.inference_mode():
        out = qm(x)  # used to fail: the fused fast path read linear1.weight
    cos = torch.nn.functional.cosine_similarity(out.reshape(-1, 64), ref.reshape(-1, 64))
    assert cos.min() > 0.98
    assert "self_attn.out_proj" in ctx.details["skipped"]


def test_gptq_on_a_padded_layer_does_not_depend_on_activation_scale():
    torch.manual_seed(0)
    layer = torch.nn.Linear(100, 64)  # padded to 128 at group 64
    mixing = torch.randn(20, 100)  # correlated inputs, where GPTQ has something to exploit
    for scale in (1.0, 0.001):
        x = torch.randn(512, 20) @ mixing * scale
        data = inferopt.Data(eval=[inferopt.Batch(x)], calibration=[inferopt.Batch(x)])
        with torch.inference_mode():
            ref = layer(x)
        errors = {}
        for method in ("rtn", "gptq"):
            qm, _ = apply(torch.nn.Sequential(copy_of(layer)), data=data, method=method,
                          group_size=64, path="dequant")
            with torch.inference_mode():
                errors[method] = float((qm(x) - ref).pow(2).mean())
        assert errors["gptq"] < 0.5 * errors["rtn"], (scale, errors)


def copy_of(module):
    import copy

    return copy.deepcopy(module)


def test_gptq_leaves_a_training_model_untouched():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.Linear(16, 4)).train()
    data = inferopt.Data(eval=[inferopt.Batch(torch.randn(32, 16))])
    before = model[1].running_mean.clone()
    apply(model, data=data, method="gptq", group_size=32)
    assert torch.equal(model[1].running_mean, before) and model.training


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_gpt2_conv1d_layers_are_quantized_and_the_tied_head_is_skipped(method):
    from inferopt.utils import weights_bytes

    model = tiny_gpt2(outliers=False)
    ids = torch.randint(0, 512, (2, 16))
    ref = model(ids).detach()
    fp32_bytes = len(weights_bytes(model))
    g = torch.Generator().manual_seed(2)
    batches = [inferopt.Batch(torch.randint(0, 512, (4, 32), generator=g)) for _ in range(4)]
    qm, ctx = apply(model, data=inferopt.Data(eval=batches, calibration=batches),
                    method=method, group_size=32)
    assert len(ctx.details["quantized"]) == 8
    assert all(type(qm.get_submodule(n)).__name__ == "Int4Linear"
               for n in ctx.details["quantized"])
    assert ctx.details["skipped"]["lm.lm_head"].startswith("weight tied to lm.transformer.wte")
    assert qm.lm.lm_head.weight is qm.lm.transformer.wte.weight
    assert len(weights_bytes(qm)) < fp32_bytes
    with torch.inference_mode():
        out = qm(ids)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.9
