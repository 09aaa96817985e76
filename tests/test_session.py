"""inferopt.Session: plugins registered in code, configs as values, optimizer versions."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import attrs
import pytest
import torch

import inferopt

#: (optimizer version, ctx.saved_version) of every restore() call of the test optimizers
RESTORED: list[tuple[int, int | None]] = []


@attrs.frozen
class Scale(inferopt.Optimizer):
    """Multiplies every weight by a factor (a structure-free step, easy to check)."""

    name = "scale"
    factor: float = inferopt.option(2.0, min=0.0, help="what to multiply the weights by")

    def apply(self, model: Any, ctx: inferopt.StepContext) -> Any:
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(self.factor)
        ctx.state["factor"] = self.factor
        return model

    def restore(self, model: Any, ctx: inferopt.StepContext) -> Any:
        RESTORED.append((self.version, ctx.saved_version))
        return model


@attrs.frozen
class ScaleV2(Scale):
    version: ClassVar[int] = 2


@attrs.frozen
class ScaleV2ReadsOnly2(Scale):
    version: ClassVar[int] = 2
    reads_versions: ClassVar[tuple[int, ...]] = (2,)


@attrs.frozen
class ScaleV3(Scale):
    version: ClassVar[int] = 3


def plugin_for(optimizer: type) -> Any:
    class Plugin:
        @inferopt.hookimpl
        def inferopt_register_optimizers(self, register: Any) -> None:
            register(optimizer)

    return Plugin()


def session_with(optimizer: type = Scale) -> inferopt.Session:
    session = inferopt.Session()
    session.register(plugin_for(optimizer), name="scale-plugin")
    return session


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def save_scaled_run(session: inferopt.Session, out: Any) -> None:
    session.run(model=mlp(), data=torch.randn(16, 8), optimize=["scale:factor=3"],
                metrics=["size"], out=out)


def test_a_plugin_registered_in_code_is_used_by_apply_run_and_load(tmp_path):
    session = session_with()
    x = torch.randn(4, 8)
    ref = mlp()(x).detach()

    by_name = session.apply(mlp(), "scale", factor=0.5)
    by_value = session.apply(mlp(), session.optimizer("scale", factor="0.5"))
    for model in (by_name, by_value):
        assert torch.allclose(model[0].weight, mlp()[0].weight * 0.5)

    save_scaled_run(session, tmp_path / "run")
    loaded = session.load(tmp_path / "run", model=mlp())
    assert torch.allclose(loaded[0].weight, mlp()[0].weight * 3)
    assert not torch.allclose(loaded(x), ref)

    # the installed plugins alone do not have it: registration belongs to the session
    with pytest.raises(inferopt.UsageError, match="unknown optimizer 'scale'"):
        inferopt.load(tmp_path / "run", model=mlp())
    assert "scale" not in inferopt.Session().names("optimizer")


def test_a_step_loads_other_models_through_its_sessions_sources():
    @attrs.frozen
    class Swap(inferopt.Optimizer):
        name = "swap"
        other: str = inferopt.option(help="the model to return instead")

        def apply(self, model: Any, ctx: inferopt.StepContext) -> Any:
            return ctx.load_model(self.other, "option 'other'")

    class ToyModels(inferopt.ModelSource):
        scheme = "toy"

        def load(self, spec: str, ctx: inferopt.SourceContext) -> Any:
            return torch.nn.Linear(2, int(spec.partition(":")[2]))

    class Plugin:
        @inferopt.hookimpl
        def inferopt_register_optimizers(self, register: Any) -> None:
            register(Swap)

        @inferopt.hookimpl
        def inferopt_register_models(self, register: Any) -> None:
            register(ToyModels)

    session = inferopt.Session()
    session.register(Plugin(), name="toy-plugin")
    assert session.apply(mlp(), "swap", other="toy:5").out_features == 5


def test_a_plugin_that_cannot_be_registered_says_why_and_leaves_the_session_working():
    session = inferopt.Session()

    class Misspelled:
        @inferopt.hookimpl
        def inferopt_register_optimisers(self, register: Any) -> None:
            register(Scale)

    with pytest.raises(inferopt.PluginError, match=r"unknown hook.*inferopt_register_optimisers"):
        session.register(Misspelled(), name="misspelled")

    @attrs.frozen
    class FakeInt8(Scale):
        name = "int8"

    with pytest.raises(inferopt.PluginError, match="'int8' is registered twice"):
        session.register(plugin_for(FakeInt8), name="fake-int8")
    assert "fake-int8" not in {f.name for f in session.manager.failures}
    assert type(session.optimizer("int8")).__module__.startswith("inferopt.plugins.")

    session.register(plugin_for(Scale), name="scale-plugin")
    with pytest.raises(inferopt.PluginError, match="already loaded"):
        session.register(plugin_for(Scale), name="scale-plugin")
    assert "scale" in session.names("optimizer")


def test_the_session_lists_what_is_installed_with_options_for_every_kind():
    session = inferopt.Session()
    assert {"int8", "prune-l1"} <= set(session.names("optimizer"))
    assert "synthetic" in session.names("data source")
    int8 = session.describe("optimizer", "int8")
    assert int8["plugin"] and int8["optimizer_version"] == 2
    assert {"mode", "skip"} <= {o["name"] for o in int8["options"]}
    synthetic = session.describe("data source", "synthetic")
    shape = next(o for o in synthetic["options"] if o["name"] == "shape")
    assert "batch shape" in shape["help"]
    with pytest.raises(inferopt.UsageError, match="unknown plugin kind 'optimizers'"):
        session.names("optimizers")


def test_configs_are_values_for_the_module_level_api():
    x = torch.randn(4, 32)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    config = inferopt.optimizer("int8", skip=["2"])
    assert config == inferopt.optimizer_class("int8")(skip=("2",))
    assert config.skip == ("2",)
    import copy

    by_value = inferopt.apply(copy.deepcopy(net), config)
    by_name = inferopt.apply(copy.deepcopy(net), "int8", skip="2")
    assert type(by_value[0]).__name__ == type(by_name[0]).__name__ == "Int8Linear"
    assert isinstance(by_value[2], torch.nn.Linear)
    assert torch.allclose(by_value(x), by_name(x))


def test_a_config_value_is_checked_like_options_given_by_name():
    Int8 = inferopt.optimizer_class("int8")
    with pytest.raises(inferopt.UsageError, match="optimizer 'int8': option 'mode' got 'fastest'"):
        inferopt.apply(mlp(), Int8(mode="fastest"))
    with pytest.raises(inferopt.UsageError, match="pass either the object or the name"):
        inferopt.apply(mlp(), Int8(), mode="static")
    with pytest.raises(inferopt.UsageError, match="optimizer name or an optimizer object"):
        inferopt.apply(mlp(), 8)


def test_the_default_session_is_reused_until_the_plugin_environment_changes(monkeypatch):
    from inferopt._session import default_session

    first = default_session()
    assert default_session() is first
    monkeypatch.setenv("INFEROPT_BLOCK_PLUGINS", "prune")
    blocked = default_session()
    assert blocked is not first
    assert "prune-l1" not in blocked.names("optimizer")


def test_restore_gets_the_saved_version_so_the_plugin_can_migrate(tmp_path):
    save_scaled_run(session_with(Scale), tmp_path / "run")
    step = json.loads((tmp_path / "run" / "inferopt.json").read_text())["steps"][0]
    assert step["optimizer_version"] == 1

    RESTORED.clear()
    loaded = session_with(ScaleV2).load(tmp_path / "run", model=mlp())
    assert RESTORED == [(2, 1)]
    assert torch.allclose(loaded[0].weight, mlp()[0].weight * 3)


def test_runs_saved_before_versions_load_as_version_1(tmp_path):
    save_scaled_run(session_with(Scale), tmp_path / "run")
    manifest_path = tmp_path / "run" / "inferopt.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["steps"][0]["optimizer_version"]
    manifest_path.write_text(json.dumps(manifest))
    RESTORED.clear()
    session_with(ScaleV2).load(tmp_path / "run", model=mlp())
    assert RESTORED == [(2, 1)]


@pytest.mark.parametrize(
    ("saved_by", "loaded_by", "message"),
    [
        (ScaleV3, ScaleV2, r"saved by version 3 of optimizer 'scale', but the installed "
                           r"optimizer is version 2 and reads versions 1 to 2; install"),
        (Scale, ScaleV2ReadsOnly2, r"saved by version 1 .* is version 2 and reads versions 2; "
                                   r"run the optimization again"),
    ],
)
def test_a_version_the_optimizer_cannot_read_is_refused_naming_the_step(
        tmp_path, saved_by, loaded_by, message):
    save_scaled_run(session_with(saved_by), tmp_path / "run")
    RESTORED.clear()
    with pytest.raises(inferopt.UsageError, match=r"steps\[0\] \('scale'\): " + message):
        session_with(loaded_by).load(tmp_path / "run", model=mlp())
    assert RESTORED == []


def test_a_bad_saved_version_is_a_clear_error(tmp_path):
    save_scaled_run(session_with(Scale), tmp_path / "run")
    manifest_path = tmp_path / "run" / "inferopt.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["steps"][0]["optimizer_version"] = "two"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(inferopt.UsageError, match=r"steps\[0\].optimizer_version.*'two'"):
        session_with(Scale).load(tmp_path / "run", model=mlp())


def test_load_inputs_gives_what_run_measures_for_many_runs_on_it():
    session = inferopt.Session()
    model, data, recipe = session.load_inputs(model="demo:digits-mlp-small",
                                              split="calibration=64,eval=128,seed=0")
    assert recipe["model"] == "demo:digits-mlp-small" and recipe["data"] == "demo:digits"
    assert data.num_samples == 128 and not recipe["batch_size_explicit"]
    first = session.run(model=model, data=data, optimize=["int8"], metrics=["accuracy"],
                        save=False)
    again = session.run(model=model, data=data, optimize=[], metrics=["accuracy"], save=False)
    assert first.baseline["accuracy"]["samples"] == 128  # the split data, not split twice
    assert again.baseline["accuracy"] == first.baseline["accuracy"]  # the model is not changed
    with pytest.raises(inferopt.UsageError, match="--batch-size 500 is larger than the data"):
        session.load_inputs(model="demo:digits-mlp-small", batch_size=500,
                            split="calibration=64,eval=128,seed=0")
