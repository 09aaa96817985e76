"""Pruning: exact unstructured sparsity, structured removal that follows every coupled layer,
activation-based selection, fine-tuning, save/load, and what cannot be pruned."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from torch import nn

import inferopt
from inferopt.plugins.pruning import channels as pc
from inferopt.plugins.pruning.weights import masks_for
from tests.helpers import SMALL


class ResidualBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(ResidualBlock(16), ResidualBlock(16))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(16 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.head(torch.flatten(self.pool(x), 1))


class GatedFFN(nn.Module):
    """A SwiGLU feed-forward block: gate and up projections are coupled by the product."""

    def __init__(self, d: int = 12, hidden: int = 32) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, hidden), nn.Linear(d, hidden), \
            nn.Linear(hidden, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x)))


def _randomize_norms(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 24),
                                  nn.GELU(), nn.Linear(24, 4)), (6, 8)),
    "cnn-bn-flatten": (lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(12 * 4 * 4, 5)),
        (3, 3, 8, 8)),
    "residual": (ResNetish, (3, 3, 8, 8)),
    "gated-ffn": (GatedFFN, (2, 5, 12)),
    "transformer": (lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 48, dropout=0.0, batch_first=True), 2,
        enable_nested_tensor=False), (2, 5, 16)),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_structured_pruning_equals_the_model_with_those_channels_silenced(kind):
    """Removing channels must change the model exactly as zeroing the weights that read them
    would: anything else means a coupled layer was missed or sliced wrongly."""
    build, shape = MODELS[kind]
    torch.manual_seed(0)
    model = build().eval()
    _randomize_norms(model)
    x = torch.randn(*shape)
    groups, _gm, _error = pc.find_groups(model, x)
    free = [g for g in groups if g.blocked is None]
    assert free, [g.blocked for g in groups]
    reference = copy.deepcopy(model)
    for group in free:
        keep = torch.randperm(group.channels)[: group.channels // 2]
        dropped = torch.ones(group.channels, dtype=torch.bool)
        dropped[keep] = False
        for name, repeat in group.consumers:
            weight = reference.get_submodule(name).weight
            cols = dropped.repeat_interleave(repeat)
            with torch.no_grad():
                weight[:, cols] = 0
        pc.prune_group(model, group, keep)
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < \
        sum(p.numel() for p in reference.parameters())


def test_coupled_layers_are_found():
    groups = pc.find_groups(ResNetish())[0]
    by_name = {g.name: g for g in groups}
    stream = by_name["stem+blocks.0.conv2+blocks.1.conv2"]
    assert stream.blocked is None
    assert stream.norms == ["bn", "blocks.0.bn2", "blocks.1.bn2"]
    assert ("head", 4) in stream.consumers  # 4 pooled positions per channel after Flatten
    assert "model's output" in by_name["head"].blocked
    gated = {g.name: g for g in pc.find_groups(GatedFFN())[0]}
    assert gated["gate+up"].consumers == [("down", 1)]
    assert "model's input" in gated["down"].blocked  # x + down(...): the residual


def test_what_cannot_be_followed_is_named():
    class Concat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(16, 2)

        def forward(self, x):
            return self.out(torch.cat([self.a(x), self.b(x)], dim=-1))

    groups = {g.name: g.blocked for g in pc.find_groups(Concat())[0]}
    assert "function cat()" in groups["a"] and "function cat()" in groups["b"]
    with pytest.raises(inferopt.UsageError, match=r"no layer whose output channels can be "
                                                  r"removed.*a: its channels reach function cat"):
        inferopt.apply(Concat(), "prune-l1", structured=True)

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(inferopt.UsageError, match=r"torch\.fx could not trace Branchy"):
        inferopt.apply(Branchy(), "prune-l1", structured=True)


def test_unstructured_sparsity_is_exact_and_leaves_no_hooks(inferopt_tiny_model_factory):
    model = inferopt.apply(inferopt_tiny_model_factory(), "prune-l1", sparsity=0.5)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for layer in layers:
        zeros = int((layer.weight == 0).sum())
        assert zeros == round(0.5 * layer.weight.numel())
        assert not layer._forward_pre_hooks and not hasattr(layer, "weight_orig")
    model = inferopt.apply(inferopt_tiny_model_factory(), "prune-l1", sparsity=0.3, scope="global")
    weights = torch.cat([m.weight.reshape(-1) for m in model.modules()
                         if isinstance(m, nn.Linear)])
    assert int((weights == 0).sum()) == round(0.3 * weights.numel())


def test_masks_are_exact_even_with_ties():
    scores = {"a": torch.zeros(7, 9), "b": torch.ones(3, 3)}
    masks = masks_for(scores, 0.5, "layer")
    assert int((~masks["a"]).sum()) == round(0.5 * 63) and int((~masks["b"]).sum()) == 4
    rows = masks_for({"a": torch.rand(5, 10)}, 0.4, "row")["a"]
    assert ((~rows).sum(dim=1) == 4).all()


def test_wanda_weighs_weights_by_their_input_norm():
    layer = nn.Linear(2, 1, bias=False)
    layer.weight.data = torch.tensor([[1.0, 0.5]])
    model = nn.Sequential(layer)
    # the second input is 10x larger, so its smaller weight matters more
    data = inferopt.Data(eval=[inferopt.Batch(torch.tensor([[1.0, 10.0], [-1.0, 10.0]]))])
    l1 = inferopt.apply(copy.deepcopy(model), "prune-l1", sparsity=0.5)
    wanda = inferopt.apply(copy.deepcopy(model), "prune-l1", data=data, sparsity=0.5,
                           score="wanda")
    assert l1[0].weight.tolist() == [[1.0, 0.0]]
    assert wanda[0].weight.tolist() == [[0.0, 0.5]]


def _dead_and_constant_mlp() -> tuple[nn.Module, inferopt.Data]:
    """Hidden neurons 0-3 never fire (APoZ 1), 4-5 output a constant 5, the rest vary."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    with torch.no_grad():
        model[0].bias[:4] = -100.0
        model[0].weight[4:6] = 0.0
        model[0].bias[4:6] = 5.0
    x = torch.randn(64, 4)
    return model, inferopt.Data(eval=[inferopt.Batch(x[i:i + 16]) for i in range(0, 64, 16)])


def test_activation_pruning_removes_dead_and_constant_neurons_without_changing_outputs():
    model, data = _dead_and_constant_mlp()
    x = torch.cat([b.inputs for b in data.eval])
    expected = model(x)
    pruned = inferopt.apply(copy.deepcopy(model), "prune-activations", data=data, sparsity=0.5)
    assert pruned[0].out_features == 6 and pruned[2].in_features == 6
    # the dead ones contribute nothing, the constant ones are folded into the next bias
    torch.testing.assert_close(pruned(x), expected, atol=1e-4, rtol=1e-4)
    apoz = inferopt.apply(copy.deepcopy(model), "prune-activations", data=data,
                          sparsity=4 / 12, criterion="apoz")
    assert apoz[0].out_features == 8
    kept_bias = apoz[0].bias.detach()
    assert bool((kept_bias > -50).all())  # every dead neuron went
    folded = inferopt.apply(copy.deepcopy(model), "prune-activations", data=data,
                            sparsity=0.5, criterion="variance")
    torch.testing.assert_close(folded(x), expected, atol=1e-4, rtol=1e-4)
    no_fold = inferopt.apply(copy.deepcopy(model), "prune-activations", data=data,
                             sparsity=0.5, criterion="variance", compensate=False)
    assert not torch.allclose(no_fold(x), expected, atol=1e-3)


def _redundant_mlp() -> tuple[nn.Module, inferopt.Data, torch.Tensor]:
    """32 hidden neurons made of 8 independent ones: 8 exact copies and 16 mixes of pairs (a
    mix of two ReLUs is no ReLU, so these are real Linear inputs the next layer reads)."""
    torch.manual_seed(0)
    base = nn.Linear(6, 8)
    model = nn.Sequential(nn.Linear(6, 32), nn.Identity(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        mix = torch.zeros(32, 8)
        mix[:8] = torch.eye(8)
        mix[8:16] = 2.0 * torch.eye(8)
        mix[16:] = torch.rand(16, 8) * (torch.rand(16, 8) < 0.25)
        model[0].weight.copy_(mix @ base.weight)
        model[0].bias.copy_(mix @ base.bias)
    # many rows against the 32 channels: the covariance is then damped by its floor only
    x = torch.randn(9600, 6)
    data = inferopt.Data(eval=[inferopt.Batch(x[i:i + 1200]) for i in range(0, 9600, 1200)])
    return model, data, x


def test_reconstruction_keeps_outputs_where_other_channels_carry_the_removed_ones():
    model, data, x = _redundant_mlp()
    expected = model(x)
    pruned = inferopt.apply(copy.deepcopy(model), "prune-activations", data=data, sparsity=0.75)
    assert pruned[0].out_features == 8 and pruned[2].in_features == 8
    # 8 independent directions span all 32 neurons: the refit next layer loses nothing
    torch.testing.assert_close(pruned(x), expected, atol=1e-3, rtol=1e-3)
    ranked = inferopt.apply(copy.deepcopy(model), "prune-activations", data=data,
                            sparsity=0.75, criterion="variance")
    assert (ranked(x) - expected).abs().max() > 100 * (pruned(x) - expected).abs().max()
    report = inferopt.run(model=copy.deepcopy(model), data=data, save=False,
                          optimize=["prune-activations:sparsity=0.75"], metrics=["fidelity"])
    details = report.steps[0].details
    assert details["criterion"] == "reconstruct" and details["not_refit"] == {}
    assert "reconstruction of the next layer's output" in details["summary"]
    assert "in 1 of 1 group(s)" in details["summary"]


def _errors_on_fresh_rows(d_in: int, hidden: int, d_out: int, rows: int, seed: int
                          ) -> dict[str, float]:
    """Mean squared output error of each criterion at 50%, calibrated on ``rows`` random rows
    and judged on 2,000 others."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out)).eval()
    calib = torch.randn(rows, d_in)
    data = inferopt.Data(eval=[inferopt.Batch(calib[i:i + 32]) for i in range(0, rows, 32)])
    fresh = torch.randn(2000, d_in)
    with torch.no_grad():
        expected = model(fresh)
        return {c: float((inferopt.apply(copy.deepcopy(model), "prune-activations", data=data,
                                         sparsity=0.5, criterion=c)(fresh) - expected)
                         .pow(2).mean())
                for c in ("reconstruct", "variance")}


def test_reconstruction_generalizes_past_the_calibration_rows():
    """Refit on 96 rows, judged on 2,000 others: the least squares must not fit noise."""
    errors = _errors_on_fresh_rows(16, 64, 8, rows=96, seed=1)
    assert errors["reconstruct"] < 0.5 * errors["variance"], errors


def test_reconstruction_falls_back_to_variance_where_it_cannot_refit(monkeypatch):
    model = ResNetish().eval()
    _randomize_norms(model)
    data = inferopt.Data(eval=[inferopt.Batch(torch.randn(4, 3, 8, 8)) for _ in range(2)])
    by_variance = inferopt.apply(copy.deepcopy(model), "prune-activations", data=data,
                                 sparsity=0.25, criterion="variance")
    report = inferopt.run(model=copy.deepcopy(model), data=data, save=False,
                          optimize=["prune-activations:sparsity=0.25"], metrics=["fidelity"])
    not_refit = report.steps[0].details["not_refit"]
    assert not_refit and all("not a Linear" in why or "layers, not one" in why
                             for why in not_refit.values())
    assert "in 0 of" in report.steps[0].details["summary"]
    # with nothing to refit, the same channels go and the same means are folded
    pruned = inferopt.apply(copy.deepcopy(model), "prune-activations", data=data, sparsity=0.25)
    x = torch.randn(3, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(pruned(x), by_variance(x))
    # a group past the memory allowed for second moments falls back too, and says why
    model, data, _x = _redundant_mlp()
    monkeypatch.setattr(pc, "REFIT_MEMORY", 100)
    report = inferopt.run(model=model, data=data, save=False,
                          optimize=["prune-activations:sparsity=0.5"], metrics=["fidelity"])
    assert "MiB allowed" in next(iter(report.steps[0].details["not_refit"].values()))


def test_reconstruction_adds_a_bias_and_round_trips(tmp_path):
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4, bias=False)).eval()

    data = inferopt.Data(eval=[inferopt.Batch(torch.randn(16, 6) + 1.0) for _ in range(3)])
    inferopt.run(model=build(), data=data, optimize=["prune-activations:sparsity=0.5"],
                 metrics=["fidelity"], out=tmp_path / "run")
    loaded = inferopt.load(tmp_path / "run", model=build())
    assert loaded[2].in_features == 16 and loaded[2].bias is not None
    direct = inferopt.apply(build(), "prune-activations", data=data, sparsity=0.5)
    x = torch.randn(5, 6)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), direct(x))


def test_finetuning_keeps_pruned_weights_at_zero_and_lowers_the_loss(inferopt_tiny_model_factory,
                                                                     inferopt_tiny_data):
    step_ctx = {}

    report = inferopt.run(model=inferopt_tiny_model_factory(), data=inferopt_tiny_data, save=False,
                          optimize=["prune-l1:sparsity=0.6,finetune_steps=60,lr=0.01"],
                          metrics=["accuracy"])
    details = report.steps[0].details
    step_ctx.update(details["rounds"][0]["finetune"])
    assert step_ctx["last_loss"] < step_ctx["first_loss"]
    assert abs(details["sparsity"] - 0.6) < 0.005
    assert "no speedup expected" in details["summary"]


def test_iterative_structured_pruning_reaches_the_target(inferopt_tiny_model_factory,
                                                        inferopt_tiny_data):
    model = inferopt.apply(inferopt_tiny_model_factory(), "prune-l1", data=inferopt_tiny_data,
                           structured=True, sparsity=0.5, iterations=3, finetune_steps=5,
                           round_to=4)
    hidden = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    originals = [m.out_features for m in inferopt_tiny_model_factory().modules()
                 if isinstance(m, nn.Linear)][:-1]
    assert hidden == [max(4, round(o / 2 / 4) * 4) for o in originals]


@pytest.mark.parametrize("options", [
    {"structured": True, "round_to": 8},
    {"sparsity": 0.4},
])
def test_pruned_models_round_trip_through_inferopt_load(inferopt_roundtrip, options):
    report, _loaded = inferopt_roundtrip("prune-l1", metrics=["fidelity", "size"], **options)
    cost = report.steps[0].details["cost"]
    if options.get("structured"):
        assert cost["after"]["parameters"] < cost["before"]["parameters"]
        assert cost["after"]["macs_per_sample"] < cost["before"]["macs_per_sample"]
    else:
        assert cost["after"] == cost["before"]


def test_activation_pruned_transformer_round_trips(tmp_path):
    def build():
        torch.manual_seed(0)
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 64, batch_first=True),
                                     2, enable_nested_tensor=False).eval()

    data = inferopt.Data(eval=[inferopt.Batch(torch.randn(4, 6, 16)) for _ in range(3)])
    report = inferopt.run(model=build(), data=data, optimize=["prune-activations"],
                          metrics=["fidelity"], out=tmp_path / "run")
    loaded = inferopt.load(tmp_path / "run", model=build())
    assert [layer.linear1.out_features for layer in loaded.layers] == [32, 32]
    assert report.steps[0].details["groups"]["layers.0.linear1"]["kept"] == 32
    with torch.inference_mode():
        assert loaded(data.eval[0].inputs).shape == (4, 6, 16)


def test_cli_structured_run_reports_cost_and_bad_options_exit_2(cli):
    result = cli("run", *SMALL, "--optimize", "prune-l1:structured=true", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    step = report["steps"][0]
    assert step["details"]["groups"]["0"] == {"channels": 128, "kept": 64, "consumers": ["2"],
                                              "norms": []}
    assert step["details"]["cost"]["after"]["parameters"] < \
        step["details"]["cost"]["before"]["parameters"]
    bad = cli("run", *SMALL, "--optimize", "prune-l1:structured=true,score=wanda")
    assert bad.returncode == 2
    assert "score=wanda scores single weights" in bad.stderr
    no_data = cli("run", "--model", "demo:digits-mlp-small", "--data",
                  "synthetic:shape=8x64,batches=2", "--optimize",
                  "prune-activations:finetune_steps=3", "--metric", "fidelity")
    assert no_data.returncode == 0, no_data.stderr  # unlabelled data: MSE to the dense outputs


class _Broken(nn.Module):
    """Patterns that once slipped through the dependency analysis."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(4 * 64 if kind != "cat" else 10 * 64, 10)
        self.lin = nn.Linear(16, 8)
        self.norm = nn.BatchNorm1d(5)

    def forward(self, x):
        if self.kind == "cat":  # flattened tensors that are not the first argument
            return self.fc(torch.cat([torch.flatten(self.a(x), 1),
                                      torch.flatten(self.b(x), 1)], 1))
        if self.kind == "shared":  # the same Linear after a flatten and again later
            h = self.fc(torch.flatten(self.a(x), 1))
            return h + self.fc(torch.flatten(self.a(x * 2), 1))
        if self.kind == "end_dim":  # Flatten(1, 2) keeps the last axis apart
            return torch.flatten(self.a(x), 1, 2)
        if self.kind == "bn3d":  # Linear on [B, T, F], BatchNorm1d over T (not the features)
            return self.norm(self.lin(x)).sum(-1)
        raise AssertionError(self.kind)


@pytest.mark.parametrize(("kind", "shape"), [("cat", (2, 3, 8, 8)), ("shared", (2, 3, 8, 8)),
                                             ("end_dim", (2, 3, 8, 8)), ("bn3d", (2, 5, 16))])
def test_tricky_couplings_never_give_a_broken_model(kind, shape):
    model = _Broken(kind).eval()
    x = torch.randn(*shape)
    data = inferopt.Data(eval=[inferopt.Batch(x)])
    expected = model(x).shape
    try:
        pruned = inferopt.apply(model, "prune-l1", data=data, structured=True)
    except inferopt.UsageError as exc:
        assert "found no layer whose output channels can be removed" in str(exc)
        return
    assert pruned(x).shape == expected


def test_activation_pruning_takes_keyword_inputs():
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(4, 16), nn.Linear(16, 2)

        def forward(self, features, mask=None):
            h = torch.relu(self.up(features))
            return self.down(h if mask is None else h * mask)

    torch.manual_seed(0)
    data = inferopt.Data(eval=[inferopt.Batch({"features": torch.randn(8, 4)})
                               for _ in range(2)])
    pruned = inferopt.apply(Keyword(), "prune-activations", data=data)
    assert pruned.up.out_features == 8 and pruned(features=torch.randn(3, 4)).shape == (3, 2)


def test_constant_channels_of_a_residual_stream_go_at_no_cost():
    """Each consumer gets the mean of its own input folded in, also where one stream is read at
    several points (the stream's values differ after every addition)."""

    class Stream(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.f1, self.f2 = nn.Linear(8, 8), nn.Linear(8, 8)
            self.r1, self.r2, self.head = nn.Linear(8, 3), nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x):
            h = self.inp(x)
            a = self.r1(h)
            h = h + self.f1(h)
            b = self.r2(h)
            h = h + self.f2(h)
            return self.head(h) + a + b

    torch.manual_seed(0)
    model = Stream().eval()
    with torch.no_grad():  # channels 0-3 constant everywhere on the stream
        for layer in (model.inp, model.f1, model.f2):
            layer.weight[:4] = 0.0
            layer.bias[:4] = torch.tensor([5.0, -2.0, 1.5, 3.0])
    x = torch.randn(64, 4)
    data = inferopt.Data(eval=[inferopt.Batch(x[i:i + 16]) for i in range(0, 64, 16)])
    pruned = inferopt.apply(copy.deepcopy(model), "prune-activations", data=data)
    assert pruned.inp.out_features == 4
    torch.testing.assert_close(pruned(x), model(x), atol=1e-4, rtol=1e-4)


def test_macs_of_transformers_are_counted_and_shrink():
    from inferopt._model_cost import count_macs

    layer = nn.TransformerEncoderLayer(16, 2, 64, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    before = count_macs(model, x)
    assert before is not None and before.complete and before.per_sample > 0
    pruned = inferopt.apply(model, "prune-l1", structured=True)
    after = count_macs(pruned, x)
    assert after is not None and 0 < after.per_sample < before.per_sample


def test_wanda_on_grouped_convolutions_and_exact_counts_over_rounds():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4), nn.ReLU(), nn.Conv2d(8, 4, 1))
    data = inferopt.Data(eval=[inferopt.Batch(torch.randn(2, 8, 6, 6))])
    pruned = inferopt.apply(model, "prune-l1", data=data, score="wanda", sparsity=0.5)
    assert int((pruned[0].weight == 0).sum()) == pruned[0].weight.numel() // 2
    layer = nn.Sequential(nn.Linear(5, 1, bias=False))
    pruned = inferopt.apply(layer, "prune-l1", sparsity=0.1, iterations=3)
    assert int((pruned[0].weight == 0).sum()) == round(0.1 * 5)


def test_skipping_a_layer_keeps_its_inputs_too():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    pruned = inferopt.apply(model, "prune-l1", structured=True, skip="2")
    assert (pruned[2].in_features, pruned[2].out_features) == (8, 8)
    assert pruned[0].out_features == 8  # its channels feed the skipped layer
    assert (pruned[4].out_features, pruned[6].in_features) == (4, 4)


class Untraceable(nn.Module):
    """What transformers models do to torch.fx (an item assignment on a traced tensor), with a
    feed-forward pair, a pair whose hidden tensor is also read elsewhere, and a layer called
    twice: only the first may lose channels."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)
        self.side, self.side2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.twice = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, 0] = 0.0  # torch.fx: 'Proxy' object does not support item assignment
        y = x + self.down(nn.functional.dropout(nn.functional.gelu(self.up(x)), 0.1,
                                                self.training))
        s = self.side(x)
        y = y + self.side2(torch.relu(s)) + s.mean(-1, keepdim=True)
        return self.twice(self.twice(y))


def test_a_model_fx_cannot_trace_loses_channels_of_its_feed_forward_pairs_only(tmp_path):
    def build():
        torch.manual_seed(0)
        return Untraceable().eval()

    example = torch.randn(4, 8)
    with pytest.raises(inferopt.UsageError):
        pc.trace(build())
    groups = pc.exported_ffn_groups(build(), example)
    assert [(g.producers, g.consumers) for g in groups] == [(["up"], [("down", 1)])]
    data = inferopt.Data(eval=[inferopt.Batch(torch.randn(16, 8)) for _ in range(3)])
    report = inferopt.run(model=build(), data=data, optimize=["prune-activations:sparsity=0.5"],
                          metrics=["fidelity"], out=tmp_path / "run")
    details = report.steps[0].details
    assert details["groups"]["up"]["kept"] == 16 and list(details["groups"]) == ["up"]
    assert "torch.export graph" in details["not_pruned"]["(rest of the model)"]
    loaded = inferopt.load(tmp_path / "run", model=build())
    assert (loaded.up.out_features, loaded.down.in_features) == (16, 16)
    assert (loaded.side.out_features, loaded.twice.out_features) == (16, 8)
    with torch.inference_mode():
        assert loaded(example).shape == (4, 8)


@torch.library.custom_op("inferopt_test::mix", mutates_args=())
def _mix(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1).cumsum(-1)  # mixes channels: never a place to prune across


@_mix.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _Pair(nn.Module):
    """``up -> hidden -> down`` that torch.fx cannot trace, the hidden step given."""

    def __init__(self, hidden: Any, tie: bool = False) -> None:
        super().__init__()
        self.up, self.down, self.hidden = nn.Linear(8, 32), nn.Linear(32, 8), hidden
        if tie:  # a module that is never called holds the same weight
            self.dec = nn.Linear(8, 32)
            self.dec.weight = self.up.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, 0] = 0.0
        return self.hidden(self, x)


@pytest.mark.parametrize(("hidden", "tie", "grouped"), [
    (lambda m, x: m.down(torch.relu(m.up(x))), False, True),
    (lambda m, x: m.down(input=torch.relu(m.up(x))), False, True),  # a keyword call
    (lambda m, x: m.down(torch.relu(m.up(x))), True, False),  # tied to an uncalled module
    (lambda m, x: m.down(torch.ops.inferopt_test.mix(m.up(x))), False, False),  # not aten
    (lambda m, x: nn.functional.linear(torch.relu(m.up(x)), m.down.weight, m.down.bias),
     False, False),  # not called as a module: no hook sees its input
    (lambda m, x: m.down(torch.relu(m.up(x))) * (2 if x.shape[0] > 4 else 1), False, False),
    (lambda m, x: m.down(torch.relu(m.up(x))) + (0.1 * m.up(x).sum() if m.training else 0),
     False, False),  # the train-mode graph reads up again
], ids=["pair", "keyword", "tied", "custom-op", "functional", "batch-branch", "train-branch"])
def test_exported_pairs_are_only_those_nothing_else_reads(hidden, tie, grouped):
    torch.manual_seed(0)
    model = _Pair(hidden, tie).eval()
    groups = pc.exported_ffn_groups(model, torch.randn(6, 8))
    assert bool(groups) == grouped
    if grouped:
        data = inferopt.Data(eval=[inferopt.Batch(torch.randn(6, 8))],
                             calibration=[inferopt.Batch(torch.randn(6, 8))])
        pruned = inferopt.apply(copy.deepcopy(model), "prune-activations", data=data,
                                sparsity=0.5)
        assert pruned.up.out_features == 16
        with torch.inference_mode():
            assert pruned(torch.randn(3, 8)).shape == (3, 8)


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(input_ids)))


def test_activation_statistics_leave_out_padding_tokens():
    model = _Tokens().eval()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    groups, gm, _ = pc.find_groups(model, {"input_ids": x, "attention_mask": mask})
    batch = inferopt.Batch({"input_ids": x, "attention_mask": mask})
    stats = pc.activation_stats(model, gm, groups, [batch], "cpu")
    (probe,) = stats
    assert stats[probe].count == 5  # the 5 real tokens, not the 10 positions
    with torch.no_grad():
        real = torch.relu(model.up(x[mask.bool()]))
    assert torch.allclose(stats[probe].mean, real.mean(0), atol=1e-5)


class _TiedReader(nn.Module):
    """fc2 reads the pruned channels; another layer uses fc2's very weight on other inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.side = nn.Linear(8, 32), nn.Linear(32, 4), nn.Linear(32, 4)
        self.side.weight = self.fc2.weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc2(torch.relu(self.fc1(x))), self.side(x.new_ones(x.shape[0], 32))


def test_reconstruction_leaves_shared_weights_and_thin_data_to_variance():
    torch.manual_seed(0)
    model = _TiedReader().eval()
    x = torch.randn(256, 8)
    data = inferopt.Data(eval=[inferopt.Batch(x[i:i + 64]) for i in range(0, 256, 64)])
    with torch.no_grad():
        side = model(x)[1]
    report = inferopt.run(model=copy.deepcopy(model), data=data, save=False,
                          optimize=["prune-activations:sparsity=0.5"], metrics=["fidelity"])
    assert "shared with another layer" in report.steps[0].details["not_refit"]["fc1"]
    pruned = inferopt.apply(copy.deepcopy(model), "prune-activations", data=data, sparsity=0.5)
    with torch.no_grad():  # the other user of the weight is not rewritten
        torch.testing.assert_close(pruned(x)[1], side)
    # 16 rows for 32 channels: a least-squares refit would fit noise
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    thin = inferopt.Data(eval=[inferopt.Batch(torch.randn(16, 8))])
    report = inferopt.run(model=model, data=thin, save=False,
                          optimize=["prune-activations:sparsity=0.5"], metrics=["fidelity"])
    assert "16 rows observed, fewer than its 32 channels" in \
        report.steps[0].details["not_refit"]["0"]


def test_reconstruction_with_as_many_rows_as_channels_is_no_worse_than_variance():
    """Full-rank activations and rows = channels, where an undamped refit fits the rows'
    noise: the damping that grows as rows get fewer keeps it at least as good as ranking."""
    errors = _errors_on_fresh_rows(128, 128, 32, rows=128, seed=0)
    assert errors["reconstruct"] <= errors["variance"], errors


def test_a_group_refit_in_a_later_round_is_not_reported_as_refused():
    """28 rows: too few for 32 channels in round 1 (ranked by variance), enough for the 24
    left in round 2 (refit); the report says what happened last."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    data = inferopt.Data(eval=[inferopt.Batch(torch.randn(28, 8))])
    report = inferopt.run(model=model, data=data, save=False, metrics=["fidelity"],
                          optimize=["prune-activations:sparsity=0.5,iterations=2"])
    details = report.steps[0].details
    assert details["not_refit"] == {}
    assert "in 1 of 1 group(s)" in details["summary"] and "others" not in details["summary"]


def test_second_moments_of_channels_far_from_zero_keep_their_precision():
    torch.manual_seed(0)
    x = torch.randn(5000, 16) * 0.01 + 300.0  # a large mean, a small spread
    stats = pc.ActivationStats.empty(16, outer=True)
    for i in range(0, 5000, 700):
        stats.add(x[i:i + 700], -1)
    exact = torch.cov(x.double().T, correction=0)
    assert float((stats.covariance() - exact).abs().max()) < 1e-3 * float(exact.abs().max())
