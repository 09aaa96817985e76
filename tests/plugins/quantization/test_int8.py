"""The int8 optimizer: what it does to the tensors, the outputs, the report and the saved model."""

from __future__ import annotations

import copy

import pytest
import torch

import inferopt
from inferopt._contract import StepContext
from inferopt._logging import get_logger
from inferopt.plugins.quantization.int8 import modules as q
from inferopt.plugins.quantization.int8.optimizer import Int8Quantizer
from tests.helpers import demo_correct, tiny_gpt2

KERNELS = [k for k, ok in [("fbgemm", q.fbgemm_available()), ("onednn", q.onednn_available()),
                           ("reference", True)] if ok]


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(
        a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float()).min())


def calib(*shapes: tuple[int, ...], n: int = 4, outlier: bool = False) -> inferopt.Data:
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        x = torch.randn(*shapes, generator=g)
        if outlier:
            x[..., 3] *= 50.0
        batches.append(inferopt.Batch(x))
    return inferopt.Data(eval=batches, calibration=batches)


def apply(model, data=None, **opts):
    ctx = StepContext(log=get_logger(), data=data)
    return Int8Quantizer(**opts).apply(model, ctx), ctx


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    ).eval()


def test_weight_quantization_is_symmetric_per_channel_or_per_tensor():
    w = torch.tensor([[1.0, -0.5, 0.25], [10.0, 5.0, -10.0]])
    qw, scale = q.quantize_weight(w, 127)
    assert qw.dtype == torch.int8
    assert torch.allclose(scale, torch.tensor([1 / 127, 10 / 127]))
    assert qw[0].tolist() == [127, -64, 32] and qw[1].tolist() == [127, 64, -127]
    qt, st = q.quantize_weight(w, 127, per_channel=False)
    assert torch.allclose(st, torch.tensor([10 / 127, 10 / 127]))
    assert qt[0].tolist() == [13, -6, 3]


def test_weights_are_7_bit_only_for_onednn_on_cpus_without_vnni():
    cpu = torch.device("cpu")
    kernel, qmax = q.plan_kernel("onednn", "dynamic", "linear", cpu)
    assert (kernel, qmax) == ("onednn", 127 if q.cpu_has_vnni() else 63)
    if q.fbgemm_available():  # FBGEMM keeps activations to 7 bits instead: 8-bit weights
        assert q.plan_kernel("auto", "dynamic", "linear", cpu) == ("fbgemm", 127)
    assert q.plan_kernel("auto", "dynamic", "linear", torch.device("cuda"))[1] == 127


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(5, 64), (2, 7, 64), (1, 64)])
def test_dynamic_outputs_stay_close_for_2d_and_3d_inputs(kernel, shape):
    model = mlp()
    x = torch.randn(*shape)
    ref = model(x).detach()
    qm, ctx = apply(model, kernel=kernel)
    assert qm[0].active_kernel == kernel
    assert ctx.details["kernels"] == {"0": kernel, "2": kernel}
    with torch.inference_mode():
        out = qm(x)
    assert out.shape == ref.shape
    assert cos(out, ref) > 0.998


def test_kernels_agree_with_the_reference_numerics():
    model = mlp()
    x = torch.randn(16, 64)
    outs = {}
    for kernel in KERNELS:
        qm, _ = apply(mlp(), kernel=kernel)
        with torch.inference_mode():
            outs[kernel] = qm(x)
    ref = model(x).detach()
    for kernel, out in outs.items():
        assert (out - ref).abs().max() < 0.03 * ref.abs().max(), kernel


def test_quantized_layers_hold_int8_weights_and_report_details():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    qm, ctx = apply(model, skip=("1",))
    assert qm[0].weight_int8.dtype == torch.int8
    assert not any(t.dtype == torch.float32 and t.dim() == 2
                   for k, t in qm.state_dict().items() if k.startswith("0."))
    assert isinstance(qm[1], torch.nn.Linear)
    assert ctx.details["quantized"] == ["0"]
    assert ctx.details["skipped"] == {"1": "matches skip pattern '1'"}
    assert ctx.details["mode"] == "dynamic"


def test_weight_only_keeps_float_activations():
    model = mlp()
    x = torch.randn(4, 64)
    ref = model(x).detach()
    qm, ctx = apply(model, mode="weight-only")
    assert qm[0].mode == "weight-only" and ctx.details["activations"] == "float (weight-only)"
    # only weight rounding: closer than activation quantization would allow
    assert cos(qm(x), ref) > 0.9995


def test_static_mode_calibrates_linear_and_conv():
    model = cnn()
    data = calib(8, 3, 16, 16)
    x = data.eval[0].inputs
    ref = model(x).detach()
    qm, ctx = apply(model, data=data, mode="static")
    assert type(qm[0]).__name__ == "Int8Conv2d" and type(qm[7]).__name__ == "Int8Linear"
    assert float(qm[0].act_scale) > 0
    assert ctx.details["calibration"]["batches"] == 4
    with torch.inference_mode():
        out = qm(x)
    assert cos(out, ref) > 0.99


def test_static_mode_folds_a_batchnorm_into_the_conv_before_it_and_a_saved_run_reloads():
    """The convolution and its BatchNorm ran as two layers; folded (as NNCF and ONNX Runtime's
    quantizer do before quantizing), the int8 convolution quantizes the folded weights and the
    model runs one layer (ResNet-18 eager static int8: 15-20% faster, the same cosine)."""
    model = cnn()
    data = calib(8, 3, 16, 16)
    x = data.eval[0].inputs
    ref = model(x).detach()
    qm, ctx = apply(model, data=data, mode="static")
    assert isinstance(qm[1], torch.nn.Identity) and type(qm[0]).__name__ == "Int8Conv2d"
    assert ctx.state["folded_batchnorms"] == [["0", "1"]]
    assert ctx.details["folded_batchnorms"] == ["1"]
    assert "1 BatchNorms folded into the convolutions" in ctx.details["summary"]
    with torch.inference_mode():
        assert cos(qm(x), ref) > 0.99
        # a saved run rebuilds the same structure from its state and loads its buffers
        # (a freshly built model is in training mode: the fold must not need eval mode)
        restore = StepContext(log=get_logger(), data=None, restoring=True, state=ctx.state)
        rebuilt = Int8Quantizer(mode="static").apply(cnn().train(), restore)
        rebuilt.load_state_dict(qm.state_dict())
        torch.testing.assert_close(rebuilt.eval()(x), qm(x))
    edited = {**ctx.state, "folded_batchnorms": [["0", "3"]]}  # "3" is a convolution
    with pytest.raises(inferopt.UsageError, match="folded_batchnorms"):
        Int8Quantizer(mode="static").apply(cnn(), StepContext(
            log=get_logger(), data=None, restoring=True, state=edited))
    # dynamic mode leaves convolutions (and their BatchNorms) alone; so does static where a
    # hook would be lost with the BatchNorm, or where the user skips the convolution
    qm, ctx = apply(cnn(), data=data, mode="dynamic")
    assert isinstance(qm[1], torch.nn.BatchNorm2d) and ctx.state["folded_batchnorms"] == []
    hooked = cnn()
    hooked[1].register_forward_hook(lambda _m, _i, out: out.clamp(min=0))
    qm, ctx = apply(hooked, data=data, mode="static")
    assert isinstance(qm[1], torch.nn.BatchNorm2d) and ctx.state["folded_batchnorms"] == []
    qm, ctx = apply(cnn(), data=data, mode="static", skip=["0"])
    assert isinstance(qm[1], torch.nn.BatchNorm2d) and ctx.state["folded_batchnorms"] == []


def test_percentile_observer_clips_outliers_more_than_minmax():
    model = mlp()
    data = calib(32, 64, outlier=True)
    # fallback=0: the x50 outlier channel makes layer 0 too sensitive for the default check
    a, _ = apply(mlp(), data=data, mode="static", observer="minmax", fallback=0)
    b, _ = apply(mlp(), data=data, mode="static", observer="percentile", percentile=99.0,
                 fallback=0)
    assert float(b[0].act_scale) < float(a[0].act_scale)
    del model


def test_conv_in_dynamic_mode_is_skipped_with_reason():
    qm, ctx = apply(cnn())
    assert isinstance(qm[0], torch.nn.Conv2d)
    assert "Conv2d needs mode=static" in ctx.details["skipped"]["0"]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_smoothquant_reduces_error_on_activation_outliers(mode):
    data = calib(64, 64, outlier=True)
    x = data.eval[0].inputs

    def layer() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 256))

    ref = layer()(x).detach()
    errors = {}
    for alpha in (0.0, 0.5, "auto"):
        qm, _ctx = apply(layer(), data=data, mode=mode, smooth=alpha)
        with torch.inference_mode():
            errors[alpha] = float((qm(x) - ref).pow(2).mean())
    assert errors[0.5] < 0.5 * errors[0.0]
    assert errors["auto"] < 0.5 * errors[0.0]


def test_static_smoothing_is_judged_on_the_range_rare_outlier_tokens_set():
    """A few tokens (one row per batch, as a [CLS] or separator token can be) carry a x200
    outlier channel: they set the static activation range, but the rows held out to judge the
    smoothing candidates hold none of them. Judged on those rows' own range, plain int8 looks
    fine and smoothing is refused; judged on the range calibration sets, smoothing wins, and
    the layer is far more faithful on ordinary tokens."""
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(4):
        x = torch.randn(64, 64, generator=g)
        x[0, 3] = 200.0  # an even row: fitted on, never in the held-out sample
        batches.append(inferopt.Batch(x))
    data = inferopt.Data(eval=batches, calibration=batches)

    def layer() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 64))

    qm, ctx = apply(layer(), data=data, mode="static")
    assert ctx.details["smoothing"]["alphas"]["0"] > 0
    plain, _ctx = apply(layer(), data=data, mode="static", smooth=0.0)
    ordinary = torch.randn(256, 64, generator=g)
    ref = layer()(ordinary).detach()
    with torch.inference_mode():
        smoothed_error = float((qm(ordinary) - ref).pow(2).mean())
        plain_error = float((plain(ordinary) - ref).pow(2).mean())
    assert smoothed_error < 0.5 * plain_error


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_attention_and_ffn_are_quantized(batch_first):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=batch_first)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 10, 64) if batch_first else torch.randn(10, 3, 64)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 7:] = True
    with torch.inference_mode():
        ref = model(x, src_key_padding_mask=pad)
    qm, ctx = apply(model)
    assert type(qm.layers[0].self_attn).__name__ == "Int8MultiheadAttention"
    assert type(qm.layers[0].linear1).__name__ == "Int8Linear"
    assert "layers.0.self_attn.out_proj" not in ctx.details["skipped"]
    with torch.inference_mode():
        out = qm(x, src_key_padding_mask=pad)
    keep = ~pad if batch_first else ~pad.t()
    assert cos(out[keep], ref[keep]) > 0.99


def test_attention_weights_match_float_attention():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 32)
    ref_out, ref_w = mha(x, x, x, need_weights=True)
    qm = q.Int8MultiheadAttention.from_float(mha, kernel="auto", qmax=63, per_channel=True)
    out, w = qm(x, x, x, need_weights=True)
    assert w.shape == ref_w.shape and (w - ref_w).abs().max() < 0.02
    assert cos(out, ref_out.detach()) > 0.995


def test_bad_input_is_clear():
    with pytest.raises(inferopt.UsageError, match="int8 found no layer to quantize"):
        apply(torch.nn.Sequential(torch.nn.ReLU()))
    with pytest.raises(inferopt.UsageError, match="needs calibration data"):
        apply(mlp(), mode="static")
    _, ctx = apply(mlp(), skip=("head",))
    assert "skip pattern(s) head matched no quantizable layer" in " ".join(ctx.warnings)


def test_static_smoothed_model_saves_loads_and_keeps_kernel_and_outputs(tmp_path):
    report = inferopt.run(model="demo:digits-mlp-small", out=tmp_path / "r",
                          optimize=["int8:mode=static,smooth=0.5,observer=percentile"],
                          metrics=["accuracy", "fidelity"])
    details = report.steps[0].details
    assert details["mode"] == "static"
    loaded = inferopt.load(tmp_path / "r")
    # the guard keeps smoothing only where it helps (on the demo: nowhere); the rebuilt layers
    # carry exactly what was chosen
    smoothed = details["smoothing"]["alphas"]["0"] > 0
    assert (loaded[0].smooth_inv is not None) == smoothed and float(loaded[0].act_scale) != 1.0
    assert loaded[0].active_kernel == details["kernels"]["0"]
    assert demo_correct(loaded) == report.optimized["accuracy"]["correct"]


@pytest.mark.parametrize("mode", ["dynamic", "static", "weight-only"])
def test_demo_accuracy_within_half_a_point(mode, tmp_path):
    report = inferopt.run(model="demo:digits-mlp-small", optimize=[f"int8:mode={mode}"],
                          metrics=["accuracy", "size"], save=False)
    drop = report.verdict["accuracy_drop_points"]
    assert drop <= 0.5
    # 0.25 for the int8 weights; smoothed layers add a float32 scale per input channel, which
    # on this 38 KB demo model is 2-2.5 KB (0.303-0.311 measured with smooth=auto, the
    # default); on real models it is under 0.5% (MiniLM: 0.254)
    assert report.verdict["size_ratio"] < 0.32


@pytest.mark.cuda
def test_cuda_dynamic_and_static_kernels():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = mlp().cuda()
    x = torch.randn(40, 64, device="cuda")
    ref = model(x).detach()
    for mode in ("dynamic", "weight-only"):
        qm, ctx = apply(mlp().cuda(), mode=mode)
        assert set(ctx.details["kernels"].values()) == {"cuda" if mode == "dynamic"
                                                        else "reference"}
        assert cos(qm(x), ref) > 0.998
    data = inferopt.Data(eval=[inferopt.Batch(x)])
    qm, ctx = apply(mlp().cuda(), mode="static", data=data)
    assert cos(qm(x), ref) > 0.99


# --- regressions found in review -------------------------------------------------------------


def test_linear_subclass_with_its_own_forward_is_left_alone():
    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 10

    model = torch.nn.Sequential(Scaled(8, 8), torch.nn.Linear(8, 4))
    qm, ctx = apply(model)
    assert isinstance(qm[0], Scaled)
    assert ctx.details["skipped"]["0"] == "a Linear subclass with its own forward"


def test_empty_calibration_inputs_are_ignored():
    class Router(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(8, 8)
            self.idle = torch.nn.Linear(8, 8)  # an expert that never gets a token

        def forward(self, x):
            return self.used(x) + self.idle(x[:0]).sum()

    _qm, ctx = apply(Router(), data=calib(4, 8), mode="static")
    assert ctx.details["skipped"]["idle"] == "no calibration input reached it"


def test_half_copy_and_unbatched_conv_after_quantization():
    import copy

    qm, _ = apply(mlp(), kernel="onednn" if q.onednn_available() else "reference")
    x = torch.randn(3, 64)
    with torch.inference_mode():
        qm(x)  # packs the kernel's opaque weights
    clone = copy.deepcopy(qm)  # used to fail on oneDNN's opaque packed tensor
    assert torch.equal(clone(x), qm(x))
    half = copy.deepcopy(qm).half()
    assert half[0].weight_scale.dtype == torch.float32
    out = half(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    conv, _ = apply(cnn(), data=calib(4, 3, 16, 16), mode="static")
    single = torch.randn(3, 16, 16)
    assert torch.allclose(conv[0](single), conv[0](single[None])[0])


def test_causal_flag_combines_with_key_padding():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 6, 32)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    ref, _ = mha(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False)
    qm = q.Int8MultiheadAttention.from_float(mha, kernel="reference", qmax=127,
                                             per_channel=True)
    out, _ = qm(x, x, x, key_padding_mask=pad, is_causal=True, need_weights=False)
    assert cos(out, ref.detach()) > 0.995


def test_static_mode_with_no_reachable_layer_is_an_error():
    class Unused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return x * 2

    with pytest.raises(inferopt.UsageError, match="no calibration input reached any layer"):
        apply(Unused(), data=calib(4, 8), mode="static")


def test_a_shared_layer_is_replaced_under_every_name():
    shared = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    qm, ctx = apply(model)
    assert qm[0] is qm[2] and type(qm[2]).__name__ == "Int8Linear"
    assert ctx.details["quantized"] == ["0"]


# --- coverage: transformers' Conv1D, Linear subclasses, tied weights ---------------------------


def gpt2_data(n: int = 4) -> inferopt.Data:
    g = torch.Generator().manual_seed(2)
    batches = [inferopt.Batch(torch.randint(0, 512, (2, 16), generator=g)) for _ in range(n)]
    return inferopt.Data(eval=batches, calibration=batches)


@pytest.mark.parametrize("mode", ["dynamic", "static", "weight-only"])
def test_gpt2_conv1d_layers_embeddings_and_the_tied_head_are_quantized(mode):
    from inferopt.utils import weights_bytes

    model = tiny_gpt2()
    ids = torch.randint(0, 512, (2, 16))
    ref = model(ids).detach()
    fp32_bytes = len(weights_bytes(model))
    qm, ctx = apply(model, data=gpt2_data(), mode=mode, fallback=0)
    blocks = [f"lm.transformer.h.{i}.{layer}" for i in range(2)
              for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    tables = ["lm.transformer.wte", "lm.transformer.wpe", "lm.lm_head"]
    assert sorted(ctx.details["quantized"]) == sorted(blocks + tables)
    assert ctx.details["summary"].startswith("11 layers quantized")
    assert ctx.state["layers"]["lm.lm_head"]["shares_table"] == "lm.transformer.wte"
    # still tied: the head reads the table's int8 rows, stored once
    assert qm.lm.lm_head.weight_int8 is qm.lm.transformer.wte.weight_int8
    assert len(weights_bytes(qm)) < 0.3 * fp32_bytes
    with torch.inference_mode():
        out = qm(ids)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    if mode != "static":  # static: per-tensor ranges on x50 outliers lose more; see smooth
        assert float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(),
                                                           dim=0)) > 0.95


def test_without_embeddings_the_tied_head_stays_in_float_with_its_table():
    model = tiny_gpt2()
    qm, ctx = apply(model, embeddings=False)
    assert len(ctx.details["quantized"]) == 8
    assert ctx.details["skipped"]["lm.lm_head"].startswith("weight tied to lm.transformer.wte")
    assert qm.lm.lm_head.weight is qm.lm.transformer.wte.weight  # still tied


def test_a_saved_gpt2_with_int8_tables_reloads_tied_and_equal(tmp_path):
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    data = inferopt.Data(eval=[inferopt.Batch(ids)], calibration=gpt2_data().calibration)
    inferopt.run(model=tiny_gpt2(), data=data, optimize=["int8"], metrics=["size"],
                 out=tmp_path / "r")
    loaded = inferopt.load(tmp_path / "r", model=tiny_gpt2())
    assert type(loaded.lm.transformer.wte).__name__ == "Int8Embedding"
    assert loaded.lm.lm_head.weight_int8 is loaded.lm.transformer.wte.weight_int8
    qm, _ = apply(tiny_gpt2(), data=gpt2_data())
    with torch.inference_mode():
        assert torch.allclose(loaded(ids), qm(ids), atol=1e-4)


def test_int8_embedding_lookup_is_close_and_a_quarter_of_the_size():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(100, 32, padding_idx=0)
    ids = torch.tensor([[0, 5, 99], [3, 3, 7]])
    new = q.Int8Embedding.from_float(emb, 127)
    out = new(ids)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32)
    assert (out - emb(ids)).abs().max() <= emb.weight.abs().amax(dim=1).max() / 127
    assert new.weight_int8.dtype == torch.int8 and new.weight_scale.shape == (100,)


def test_conv1d_output_matches_the_float_layer_and_rebuilds_from_saved_state():
    from transformers.pytorch_utils import Conv1D

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(Conv1D(48, 32), torch.nn.GELU(), Conv1D(8, 48))

    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(5))
    ref = build()(x).detach()
    qm, ctx = apply(build(), data=calib(8, 32), mode="static", smooth=0.5)
    assert type(qm[0]).__name__ == "Int8Linear" and qm[0].in_features == 32
    assert qm[0].out_features == 48 and ctx.details["quantized"] == ["0", "2"]
    assert float(torch.nn.functional.cosine_similarity(qm(x).flatten(), ref.flatten(),
                                                       dim=0)) > 0.98
    restore = StepContext(log=get_logger(), data=None, restoring=True, state=ctx.state)
    rebuilt = Int8Quantizer(mode="static", smooth=0.5).apply(build(), restore)
    rebuilt.load_state_dict(qm.state_dict())
    assert torch.equal(rebuilt(x), qm(x))


def test_linear_subclass_with_the_standard_forward_is_quantized():
    class Tagged(torch.nn.Linear):  # e.g. a library's marker subclass
        pass

    model = torch.nn.Sequential(Tagged(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    _qm, ctx = apply(model)
    assert ctx.details["quantized"] == ["0", "2"] and not ctx.details["skipped"]


def test_linear_like_layers_left_alone_are_named_with_the_reason():
    from transformers.pytorch_utils import Conv1D

    class Gated(Conv1D):
        def forward(self, x):
            return super().forward(x).relu()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gated = Gated(8, 8)
            self.pair = torch.nn.Bilinear(8, 8, 8)
            self.out = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.out(self.pair(self.gated(x), x))

    _qm, ctx = apply(Net())
    assert ctx.details["quantized"] == ["out"]
    assert ctx.details["skipped"] == {
        "gated": "a Conv1D subclass with its own forward",
        "pair": "Bilinear (two inputs) is not supported"}


def test_layers_sharing_one_weight_are_quantized_together_or_not_at_all():
    def build():
        emb = torch.nn.Embedding(16, 8)
        head = torch.nn.Linear(8, 16, bias=False)
        head.weight = emb.weight
        return torch.nn.ModuleDict({"emb": emb, "head": head, "other": torch.nn.Linear(8, 8)})

    _qm, ctx = apply(build(), embeddings=False)
    assert ctx.details["quantized"] == ["other"]
    assert ctx.details["skipped"]["head"].startswith("weight tied to emb")
    qm, ctx = apply(build())  # the table quantized too: the head shares its int8 rows
    assert sorted(ctx.details["quantized"]) == ["emb", "head", "other"]
    assert qm["head"].weight_int8 is qm["emb"].weight_int8
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.weight = a.weight  # two linears tied together: both can be quantized
    _qm, ctx = apply(torch.nn.Sequential(a, torch.nn.ReLU(), b))
    assert ctx.details["quantized"] == ["0", "2"]


# --- SmoothQuant that never makes things worse ------------------------------------------------


def test_smoothing_calibrated_on_single_samples_is_never_worse_than_plain_int8():
    # 8 calibration batches of 1 sample: some ReLU units are never positive, and unguarded
    # SmoothQuant multiplied their inputs by up to 40x (cosine 0.2 instead of 0.9997)
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(),
                                   torch.nn.Linear(4096, 1024)).eval()

    g = torch.Generator().manual_seed(1)
    batches = [inferopt.Batch(torch.randn(1, 1024, generator=g)) for _ in range(8)]
    data = inferopt.Data(eval=batches, calibration=batches)
    x = torch.randn(64, 1024, generator=g)
    ref = build()(x).detach()
    fidelity = {}
    for smooth in (0.0, 0.5, "auto"):
        qm, ctx = apply(build(), data=data, smooth=smooth)
        with torch.inference_mode():
            fidelity[smooth] = float(torch.nn.functional.cosine_similarity(
                qm(x).flatten(), ref.flatten(), dim=0))
    assert fidelity[0.0] > 0.999
    assert fidelity[0.5] >= fidelity[0.0] - 1e-4
    assert fidelity["auto"] >= fidelity[0.0] - 1e-4
    assert "smoothing" in ctx.details and "smoothed" in ctx.details["summary"]


def test_channels_unseen_in_calibration_get_a_typical_multiplier():
    from inferopt.plugins.quantization.int8 import smoothing

    act = torch.rand(256) + 0.5
    act[:10] = 0.0  # never active during calibration
    act[10] = 1e-4  # nearly never
    scales = smoothing.guarded_scales(act, torch.rand(256) + 0.5, 0.5)
    multiplier = 1.0 / scales
    typical = multiplier[20:].median()
    assert torch.allclose(multiplier[:11], typical.expand(11), rtol=0.3)
    assert float(multiplier.max()) <= smoothing.LOW * float(typical) * 1.01


def test_gpt2_with_outlier_channels_gains_from_smoothing():
    model_ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(9))
    ref = tiny_gpt2()(model_ids).detach()
    fidelity = {}
    for smooth in (0.0, "auto"):
        qm, _ctx = apply(tiny_gpt2(), data=gpt2_data(), smooth=smooth)
        with torch.inference_mode():
            fidelity[smooth] = float(torch.nn.functional.cosine_similarity(
                qm(model_ids).flatten(), ref.flatten(), dim=0))
    assert fidelity["auto"] > fidelity[0.0]


def test_smooth_takes_a_number_or_auto():
    with pytest.raises(inferopt.UsageError, match="'auto'"):
        inferopt.apply(mlp(), "int8", data=calib(4, 64), smooth="sometimes")


# --- real-model outliers: per-row activations, sensitivity fallback, mode=auto ----------------


def outlier_tokens(n: int = 64, dim: int = 64) -> torch.Tensor:
    """Rows as a transformer's hidden states have them: a few tokens (here every 8th) with a
    norm 30x the others', and one channel x20 in every token."""
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(3))
    x[::8] *= 30.0
    x[:, 5] *= 20.0
    return x


@pytest.mark.skipif(not q.fbgemm_available(), reason="FBGEMM is not available here")
def test_default_fbgemm_activations_are_per_row_and_keep_quiet_tokens():
    x = outlier_tokens()
    ref = mlp()(x).detach()
    row, ctx = apply(mlp())
    tensor, _ = apply(mlp(), activations="per-tensor")
    assert row[0].activations == "per-row" and ctx.details["kernels"]["0"] == "fbgemm"
    assert ctx.state["layers"]["0"]["activations"] == "per-row"
    with torch.inference_mode():
        quiet = torch.ones(64, dtype=torch.bool)
        quiet[::8] = False
        err_row = float((row(x) - ref)[quiet].norm() / ref[quiet].norm())
        err_tensor = float((tensor(x) - ref)[quiet].norm() / ref[quiet].norm())
    # per tensor, the loud tokens set the one scale and the quiet ones lose their precision
    assert err_row < 0.3 * err_tensor
    assert cos(row(x)[quiet], ref[quiet]) > 0.999


def test_a_layer_too_sensitive_for_int8_stays_in_float_and_is_named():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    # channel 3 x50, clipped by a 99th-percentile range: layer 0 loses that channel
    data = calib(32, 64, outlier=True)
    qm, ctx = apply(model, data=data, mode="static", observer="percentile", percentile=99.0)
    # in bf16 where the CPU multiplies bf16 natively, else in fp32
    kept = qm[0].layer if q.cpu_has_bf16() else qm[0]
    assert type(kept) is torch.nn.Linear
    assert kept.weight.dtype == (torch.bfloat16 if q.cpu_has_bf16() else torch.float32)
    assert ctx.details["skipped"]["0"].startswith("int8 output error")
    assert "0" in ctx.details["sensitivity"]["kept_in_float"]
    assert ctx.details["worst_layers"][0][0] == "0"
    assert "too sensitive for int8 kept in float" in ctx.details["summary"]
    _qm, ctx = apply(torch.nn.Sequential(torch.nn.Linear(64, 64)), data=data, mode="static",
                     observer="percentile", percentile=99.0, fallback=0)
    assert ctx.details["quantized"] == ["0"]  # measured, named, but kept in int8
    assert ctx.details["sensitivity"]["errors"]["0"] > 0.1


def test_auto_mode_is_static_for_conv_nets_with_calibration_data_else_dynamic():
    data = calib(4, 3, 16, 16)
    qm, ctx = apply(cnn(), data=data)
    assert ctx.details["mode"] == "static" and ctx.state["mode"] == "static"
    assert type(qm[0]).__name__ == "Int8Conv2d"
    assert ctx.details["mode_chosen"].startswith("auto -> static")
    _qm, ctx = apply(cnn())
    assert ctx.details["mode"] == "dynamic" and "no calibration data" in ctx.details["mode_chosen"]
    _qm, ctx = apply(mlp(), data=calib(4, 64))
    assert ctx.details["mode"] == "dynamic"
    # on OpenVINO, which runs exported dynamic layers' per-call quantization slowly: static
    from inferopt.plugins.backends.openvino import OpenVinoBackend

    on_ov = StepContext(log=get_logger(), data=calib(4, 64), backend=OpenVinoBackend())
    Int8Quantizer().apply(mlp(), on_ov)
    assert on_ov.details["mode"] == "static"
    assert on_ov.details["mode_chosen"] == ("auto -> static: it runs on openvino and "
                                            "calibration data is given")


def test_a_version_1_run_reloads_with_per_tensor_fbgemm_activations():
    lin = torch.nn.Sequential(torch.nn.Linear(64, 32))
    _qm, ctx = apply(lin)
    state = {"layers": {n: {k: v for k, v in info.items() if k != "activations"}
                        for n, info in ctx.state["layers"].items()}}  # as version 1 saved it
    restore = StepContext(log=get_logger(), data=None, restoring=True, state=state,
                          saved_version=1)
    rebuilt = Int8Quantizer(mode="dynamic").apply(torch.nn.Sequential(torch.nn.Linear(64, 32)),
                                                  restore)
    assert rebuilt[0].activations == "per-tensor"


def test_quantized_layers_run_outside_inference_mode_on_inputs_that_require_grad():
    model = mlp()
    qm, _ = apply(mlp())
    x = torch.randn(4, 64, requires_grad=True)  # e.g. after a float layer that is trainable
    assert cos(qm(x).detach(), model(x).detach()) > 0.998


def test_a_smoothed_tied_head_and_its_table_share_one_int8_table(tmp_path):
    def build():
        model = tiny_gpt2()
        with torch.no_grad():  # outlier channels reach the head too, as in trained GPT-2
            model.lm.transformer.ln_f.weight[:3] *= 50.0
        return model

    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(9))
    ref = build()(ids).detach()
    qm, ctx = apply(build(), data=gpt2_data())
    layers = ctx.state["layers"]
    assert layers["lm.lm_head"]["smooth"] and layers["lm.transformer.wte"]["smooth"]
    assert layers["lm.lm_head"]["shares_table"] == "lm.transformer.wte"
    assert qm.lm.lm_head.weight_int8 is qm.lm.transformer.wte.weight_int8
    plain, _ = apply(build(), data=gpt2_data(), smooth=0)
    with torch.inference_mode():
        smoothed, unsmoothed = qm(ids), plain(ids)
    assert cos(smoothed, ref) > cos(unsmoothed, ref)
    # the table's lookups are unchanged by holding the head's smoothing
    emb = build().lm.transformer.wte
    assert torch.allclose(qm.lm.transformer.wte(ids), emb(ids).detach(), atol=0.02)
    restore = StepContext(log=get_logger(), data=None, restoring=True, state=ctx.state)
    rebuilt = Int8Quantizer().apply(build(), restore)
    rebuilt.load_state_dict(qm.state_dict())
    assert rebuilt.lm.lm_head.weight_int8 is rebuilt.lm.transformer.wte.weight_int8
    with torch.inference_mode():
        assert torch.allclose(rebuilt(ids), smoothed, atol=1e-4)


@pytest.mark.skipif(not q.fbgemm_available(), reason="FBGEMM is not available here")
def test_auto_activations_mix_per_tensor_and_per_row_and_reload_equal(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids = [inferopt.Batch(torch.randint(1, 512, (4, 32), generator=g)) for _ in range(4)]
    data = inferopt.Data(eval=ids, calibration=ids)
    report = inferopt.run(model=tiny_gpt2(), data=data, optimize=["int8"], out=tmp_path / "r",
                          metrics=["fidelity"])
    layers = report.steps[0].details["quantized"]
    in_process = inferopt.apply(tiny_gpt2(), "int8", data=data)
    acts = {n: m.activations for n, m in in_process.named_modules() if hasattr(m, "activations")}
    # per row where per tensor would lose the outlier channels' precision (the first block's
    # attention input, unsmoothed), FBGEMM's cheaper per-tensor range elsewhere
    assert {"per-row", "per-tensor"} <= set(acts.values()) and len(layers) >= 8, acts
    assert "per row on" in report.steps[0].details["activations"]
    loaded = inferopt.load(tmp_path / "r", model=tiny_gpt2())
    assert {n: m.activations for n, m in loaded.named_modules()
            if hasattr(m, "activations")} == acts
    with torch.inference_mode():
        assert torch.equal(loaded(ids[0].inputs), in_process(ids[0].inputs))


@pytest.mark.parametrize("native_bf16", [True, False])
def test_a_sensitive_layer_kept_in_bf16_or_fp32_saves_and_reloads(tmp_path, monkeypatch,
                                                                     native_bf16):
    monkeypatch.setattr(q, "cpu_has_bf16", lambda: native_bf16)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    data = calib(32, 64, outlier=True)
    opts = ["int8:mode=static,observer=percentile,percentile=99"]
    report = inferopt.run(model=model, data=data, optimize=opts, out=tmp_path / "r",
                          metrics=["fidelity"])
    sens = report.steps[0].details["sensitivity"]
    assert "0" in sens["kept_in_float"]
    assert sens["kept_in_bf16"] == (list(sens["kept_in_float"]) if native_bf16 else [])
    torch.manual_seed(1)  # other weights: the saved ones must replace them
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    loaded = inferopt.load(tmp_path / "r", model=fresh)
    assert isinstance(loaded[0], q.Bf16Layer) == native_bf16
    x = data.eval[0].inputs
    with torch.inference_mode():
        ref = model(x)
        out = loaded(x)
    assert out.dtype == torch.float32 and cos(out, ref) > 0.99


def test_a_bf16_kept_layer_follows_half_and_float_and_computes_in_fp32_without_native_bf16(
        monkeypatch):
    torch.manual_seed(0)
    layer = q.Bf16Layer(torch.nn.Linear(16, 8))
    x = torch.randn(4, 16)
    want = layer(x)
    assert layer.layer.weight.dtype == torch.bfloat16 and want.dtype == torch.float32
    # .half() / .float() on the model convert the kept layer too, and it still runs
    assert layer.half()(x.half()).dtype == torch.float16
    assert layer.float()(x).dtype == torch.float32
    # saved where bf16 is native, loaded where it is emulated: fp32 compute
    monkeypatch.setattr(q, "cpu_has_bf16", lambda: False)
    torch.manual_seed(0)
    layer = q.Bf16Layer(torch.nn.Linear(16, 8))
    out = layer(x)
    assert layer.layer.weight.dtype == torch.float32 and cos(out, want) > 0.999


@pytest.mark.parametrize(("flags", "forced", "reduce"), [
    ({"avx512_vnni", "avx2"}, "", False), ({"avx_vnni", "avx2"}, "", True),
    ({"avx2"}, "", True), ({"avx512_vnni", "avx2"}, "AVX2", True)])
def test_fbgemm_uses_8_bit_activations_only_with_its_avx512_vnni_kernels(monkeypatch, flags,
                                                                          forced, reduce):
    import inferopt.utils

    monkeypatch.setattr(inferopt.utils, "cpu_flags", lambda: flags)
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", forced)
    q.fbgemm_reduce_range.cache_clear()
    try:
        assert q.fbgemm_reduce_range() == reduce
    finally:
        q.fbgemm_reduce_range.cache_clear()


def test_activations_auto_without_smoothing_still_reports_its_calibration():
    _qm, ctx = apply(mlp(), data=calib(8, 64), smooth=0)
    acts = {n: info.get("activations") for n, info in ctx.state["layers"].items()}
    assert set(acts.values()) <= {"per-row", "per-tensor"}
    if q.fbgemm_available():
        assert ctx.details["calibration"]["batches"] == 4


class SelfAttention(torch.nn.Module):
    """A BERT-style attention block: separate query, key and value projections of one input."""

    def __init__(self, dim: int = 64, heads: int = 4, flatten: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.heads, self.flatten = heads, flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.flatten:  # code that needs contiguous outputs (a view across every dimension)
            q = q.view(-1).view(b, s, d)
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(ctx.transpose(1, 2).reshape(b, s, d)) + x


def apart(model: torch.nn.Module) -> torch.nn.Module:
    """The same quantized layers, each run on its own."""
    model = copy.deepcopy(model)
    for m in model.modules():
        m.__dict__.pop("_shared", None)
    return model


@pytest.mark.skipif(not q.fbgemm_available(), reason="FBGEMM is not available here")
def test_projections_of_one_input_run_as_one_gemm_and_reload_equal(tmp_path, monkeypatch):
    data = calib(4, 16, 64, outlier=True)
    x = data.eval[0].inputs
    qm, ctx = apply(SelfAttention(), data)
    assert ctx.details["shared_inputs"] == [["q", "k", "v"]]
    assert "3 layers in 1 groups that share their input" in ctx.details["summary"]
    # chosen together: one smoothing (or none) and one activation setting for the three
    assert q.SharedInput.stackable([qm.q, qm.k, qm.v])
    calls = []
    monkeypatch.setattr(q.Int8Linear, "_alone", lambda self, t, f=q.Int8Linear._alone:
                        calls.append(self.out_features) or f(self, t))
    with torch.inference_mode():
        fused, separate = qm(x), apart(qm)(x)
        assert calls[:2] == [192, 64]  # one GEMM for q, k and v, then o
        assert torch.allclose(fused, separate, atol=1e-5)
        assert cos(fused, SelfAttention()(x)) > 0.99
        other = torch.randn(2, 64)  # a member called on another tensor computes alone
        assert torch.allclose(qm.k(other), apart(qm).k(other), atol=1e-5)
        assert torch.allclose(copy.deepcopy(qm)(x), fused, atol=1e-5)
        # a shallow copy of a member (as DataParallel replicas are) computes alone
        assert torch.allclose(copy.copy(qm.k)(x), apart(qm).k(x), atol=1e-5)
    monkeypatch.undo()
    inferopt.run(model=SelfAttention(), data=data, optimize=["int8"], out=tmp_path / "r",
                 metrics=["fidelity"])
    loaded = inferopt.load(tmp_path / "r", model=SelfAttention())
    assert loaded.q.__dict__.get("_shared") is not None
    with torch.inference_mode():
        assert torch.allclose(loaded(x), fused, atol=1e-5)


@pytest.mark.skipif(not q.fbgemm_available(), reason="FBGEMM is not available here")
def test_a_model_that_cannot_take_the_stacked_outputs_keeps_its_layers_apart():
    data = calib(4, 16, 64, outlier=True)
    qm, ctx = apply(SelfAttention(flatten=True), data)
    assert ctx.details["shared_inputs"].startswith("not fused: the model failed")
    assert all("_shared" not in m.__dict__ for m in qm.modules())
    with torch.inference_mode():
        x = data.eval[0].inputs
        assert cos(qm(x), SelfAttention(flatten=True)(x)) > 0.99


class ChangesItsInput(SelfAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + 0
        q = self.q(h)
        h.neg_()  # in place between the projections: same tensor, other values
        return q + self.k(h) + self.v(h)


@pytest.mark.skipif(not q.fbgemm_available(), reason="FBGEMM is not available here")
def test_layers_whose_shared_input_changes_in_place_between_calls_are_not_grouped():
    data = calib(4, 16, 64, outlier=True)
    qm, ctx = apply(ChangesItsInput(), data)
    assert ctx.details.get("shared_inputs", []) in ([], [["k", "v"]])
    with torch.inference_mode():
        x = data.eval[0].inputs
        assert torch.allclose(qm(x), apart(qm)(x), atol=1e-5)
