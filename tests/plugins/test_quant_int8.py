"""The int8 optimizer: what it does to the tensors and to the outputs."""

from __future__ import annotations

import inferopt
import pytest
import torch
from inferopt.plugins.quant_int8 import quantize_weight_per_channel


def test_weight_quantization_is_per_channel_symmetric():
    w = torch.tensor([[1.0, -0.5, 0.25], [10.0, 5.0, -10.0]])
    q, scale = quantize_weight_per_channel(w, 127)
    assert q.dtype == torch.int8
    assert torch.allclose(scale, torch.tensor([1 / 127, 10 / 127]))
    assert q[0].tolist() == [127, -64, 32] and q[1].tolist() == [127, 64, -127]


@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64), (1, 64)])
def test_outputs_stay_close_for_2d_and_3d_inputs(shape):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    x = torch.randn(*shape)
    ref = model(x).detach()
    q = inferopt.apply(model, "int8")
    out = q(x)
    assert out.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(out.reshape(-1, 32), ref.reshape(-1, 32))
    assert cos.min() > 0.998
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_quantized_layers_hold_int8_weights_and_report_details():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    from inferopt.contract import StepContext
    from inferopt.logging import get_logger
    from inferopt.plugins.quant_int8 import Int8Quantizer

    ctx = StepContext(log=get_logger())
    q = Int8Quantizer(skip=("1",)).apply(model, ctx)
    assert q[0].weight_int8.dtype == torch.int8
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in q[0].parameters())
    assert ctx.details["quantized"] == ["0"]
    assert ctx.details["skipped"] == {"1": "matches skip pattern"}


def test_model_without_linear_layers_gets_a_warning():
    from inferopt.contract import StepContext
    from inferopt.logging import get_logger
    from inferopt.plugins.quant_int8 import Int8Quantizer

    ctx = StepContext(log=get_logger())
    Int8Quantizer().apply(torch.nn.Sequential(torch.nn.ReLU()), ctx)
    assert "int8: no Linear layer was quantized; the model is unchanged" in ctx.warnings
