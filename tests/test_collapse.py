"""The collapse guard: a step that leaves finite outputs of the right shape but no longer
resembling the baseline's stops the run, naming the step, unless the user allows it."""

from __future__ import annotations

import json
import re

import pytest

SHRINKER = '''
import attrs, inferopt

@attrs.frozen
class Shrinker(inferopt.Optimizer):
    """Scales every weight by 1e-3 and adds noise (a technique gone wrong)."""
    name = "shrink-weights"
    def apply(self, model, ctx):
        import torch
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1e-3).add_(torch.randn(p.shape, generator=g) * p.abs().mean() * 5)
        return model

@inferopt.hookimpl
def inferopt_register_optimizers(register):
    register(Shrinker)
'''

RUN = ["run", "--model", "demo:digits-mlp-small", "--metric", "size"]


@pytest.fixture
def shrinker(plugin_env):
    return plugin_env("inferopt-shrinker", {"shrinker": "inferopt_shrinker"},
                      {"inferopt_shrinker": SHRINKER})


def test_a_step_that_wrecks_the_model_is_refused_with_the_step_named(cli, shrinker, tmp_path):
    result = cli(*RUN, "-O", "shrink-weights", "--out", str(tmp_path / "r"), env=shrinker)
    assert result.returncode == 2, result.stderr
    assert "step 1 'shrink-weights' collapsed the model's outputs: cosine" in result.stderr
    assert "--allow-collapse" in result.stderr
    assert not (tmp_path / "r").exists()


def test_allow_collapse_runs_the_step_with_a_warning(cli, shrinker, tmp_path):
    result = cli(*RUN, "-O", "shrink-weights", "--allow-collapse", "--json", env=shrinker)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert any("collapsed" in w and "--allow-collapse" in w for w in report["warnings"])


def test_allow_collapse_from_a_recipe_file(cli, shrinker, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('model = "demo:digits-mlp-small"\nallow_collapse = true\n'
                      'metrics = ["size"]\n[[optimize]]\nname = "shrink-weights"\n')
    result = cli("run", str(recipe), "--json", env=shrinker)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["recipe"]["allow_collapse"] is True


def test_a_normal_int8_step_passes_the_guard_and_the_api_takes_the_flag():
    import inferopt

    report = inferopt.run(model="demo:digits-mlp-small", optimize=["int8"], metrics=["size"],
                          save=False)
    assert not any("collapsed" in w for w in report.warnings)
    report = inferopt.run(model="demo:digits-mlp-small", optimize=["int8"], metrics=["size"],
                          save=False, allow_collapse=True)
    assert report.recipe["allow_collapse"] is True


def test_output_cosine_compares_every_float_output():
    import torch

    from inferopt._collapse import output_cosine

    base = {"logits": torch.ones(2, 4), "ids": torch.tensor([1, 2])}
    assert output_cosine(base, base) == pytest.approx(1.0)
    assert output_cosine({"logits": -torch.ones(2, 4), "ids": torch.tensor([0, 0])},
                         base) == pytest.approx(-1.0)
    assert output_cosine(torch.zeros(3), torch.zeros(3)) is None


def test_a_collapsing_int8_step_names_the_step_and_its_worst_layers():
    import torch

    import inferopt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        x = torch.randn(16, 32, generator=g)
        x[:, :4] *= 100.0  # the channels that carry the signal
        batches.append(inferopt.Batch(x))
    data = inferopt.Data(eval=batches, calibration=batches)
    # a median range clips the loud channels away: the step wrecks the outputs
    bad = "int8:mode=static,observer=percentile,percentile=50,fallback=0"
    with pytest.raises(inferopt.StepFailed) as failed:
        inferopt.run(model=model, data=data, optimize=[bad], metrics=["size"], save=False)
    message = str(failed.value)
    assert "step 1 'int8' collapsed the model's outputs" in message
    assert re.search(r"worst layers: [02] \(error 0\.\d+\), [02] \(error", message)


def test_worst_layers_are_read_from_the_step_details_when_given():
    from inferopt._collapse import worst_layers

    assert worst_layers({"worst_layers": [["a.b", 0.51234], ["c", 0.2]]}) == (
        "; worst layers: a.b (error 0.512), c (error 0.2)")
    assert worst_layers({}) == "" and worst_layers(None) == ""
