"""A third-party backend that is not torch-shaped (backend spec v1): its prepared object is a
plain Python callable, it exposes no modules, it refuses int8 and it saves an artifact while
preparing; and a backend written before the spec, whose prepare takes the model alone."""

from __future__ import annotations

import json
from pathlib import Path

RUNTIME_PLUGIN = '''
import json

import attrs
import inferopt


def record(entry):
    with open("prepare-calls.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\\n")


@attrs.frozen
class PlainCallableBackend(inferopt.Backend):
    """Runs a plain function that wraps the model: what a runtime session looks like."""

    name = "plain-callable"
    exposes_modules = False

    def refuses(self, optimizer):
        if optimizer.name == "int8":
            return "this runtime has no int8 kernels; quantize with the runtime's own tools"
        return None

    def prepare(self, model, ctx):
        import torch

        model = model.eval()
        with torch.inference_mode():  # the "export": trace once with the example inputs
            model(ctx.example_inputs)
        params = sum(int(torch.count_nonzero(p)) for p in model.parameters())
        ctx.artifact_path("graph/model.txt").write_text(f"{ctx.role} nonzero={params}\\n")
        if ctx.role == "optimized":
            ctx.warn("exported with a fixed batch size")
        record({"role": ctx.role, "example_shape": list(ctx.example_inputs.shape)})

        def run(inputs):
            return model(inputs)

        return run

    def forward(self, prepared, inputs):
        import torch

        with torch.inference_mode():
            return prepared(inputs)


@attrs.frozen
class OldStyleBackend(inferopt.Backend):
    """A backend written before PrepareContext: prepare(self, model)."""

    name = "old-style"

    def prepare(self, model):
        record({"role": "old"})
        return model.eval()


@inferopt.hookimpl
def inferopt_register_backends(register):
    register(PlainCallableBackend)
    register(OldStyleBackend)
'''

RUN = ["run", "--model", "demo:digits-mlp-small", "--metric", "accuracy", "--metric", "size",
       "--metric", "latency:min_runs=5,min_seconds=0,warmup=1", "--json"]


def _install(plugin_env) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return plugin_env("inferopt-plain-callable", {"plain_callable": "plain_callable_backend"},
                      {"plain_callable_backend": RUNTIME_PLUGIN})


def _calls(cwd: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in (cwd / "prepare-calls.jsonl").read_text().splitlines()]


def test_a_runtime_backend_runs_end_to_end(cli, plugin_env, tmp_path: Path) -> None:
    result = cli(*RUN, "--backend", "plain-callable", "--metric", "memory", "--metric",
                 "compute", "-O", "prune-l1", "-O", "int8", "--out", "run",
                 env=_install(plugin_env))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    # prepared once per role, outside the timings, with the first eval batch as example
    calls = _calls(tmp_path)
    assert sorted(c["role"] for c in calls) == ["baseline", "optimized"]
    assert all(c["example_shape"][0] == 64 and len(c["example_shape"]) == 2 for c in calls)
    assert set(report["prepare_seconds"]) == {"baseline", "optimized"}
    assert all(s >= 0 for s in report["prepare_seconds"].values())

    # the refused step is skipped before it runs, and the backend is blamed, not the step
    prune, int8 = report["steps"]
    assert prune["refused"] is None and int8["refused"] is not None
    assert "plain-callable" in int8["refused"] and "no int8 kernels" in int8["refused"]
    finding = next(f for f in report["verdict"]["findings"] if "skipped" in f["finding"])
    assert "int8" in finding["finding"] and "plain-callable" in finding["cause"]
    assert not any("failed" in f["finding"] for f in report["verdict"]["findings"])
    manifest = json.loads((tmp_path / "run" / "inferopt.json").read_text())
    assert [s["name"] for s in manifest["steps"]] == ["prune-l1"]

    # metrics that look inside torch modules are skipped with a reason, not reported as 0
    for name in ("memory", "compute"):
        assert name not in report["baseline"]["metrics"]
        assert "plain-callable" in report["skipped_metrics"][name]
    # the ones that only run the model are measured through the backend
    assert report["baseline"]["metrics"]["accuracy"]["top1"] > 0.5
    assert report["optimized"]["metrics"]["size"]["bytes"] > 0
    assert report["optimized"]["metrics"]["latency"]["p50_ms"] > 0

    # each role's artifact is in the run directory and listed in the report
    listed = report["artifacts"]["backend"]
    for role in ("baseline", "optimized"):
        path = Path(listed[role]["graph/model.txt"])
        assert path == (Path("run") / "backend" / role / "graph" / "model.txt")
        assert (tmp_path / path).read_text().startswith(role)
    # the optimized artifact is the pruned model's, not the baseline's
    nonzero = {role: int((tmp_path / listed[role]["graph/model.txt"]).read_text()
                         .split("nonzero=")[1]) for role in ("baseline", "optimized")}
    assert nonzero["optimized"] < nonzero["baseline"]
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["artifacts"]["backend"] == listed
    assert any("fixed batch size" in w for w in report["warnings"])


def test_old_one_argument_prepare_still_works(cli, plugin_env, tmp_path: Path) -> None:
    result = cli(*RUN, "--backend", "old-style", "-O", "none", "--out", "run",
                 env=_install(plugin_env))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["baseline"]["metrics"]["accuracy"]["top1"] > 0.5
    assert [c["role"] for c in _calls(tmp_path)] == ["old", "old"]  # one per role
    assert any("prepare(model) without a context" in w and "deprecated" in w
               for w in report["warnings"])
    assert "backend" not in report["artifacts"]
    assert not (tmp_path / "run" / "backend").exists()


def test_the_baseline_can_run_on_another_backend(cli, plugin_env, tmp_path: Path) -> None:
    # the optimized model where it will be deployed, against the model as it runs today
    env = _install(plugin_env)
    result = cli(*RUN, "--backend", "plain-callable", "--baseline-backend", "old-style",
                 "-O", "prune-l1", "-O", "int8", "--out", "run", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # each role prepared by its own backend (the baseline's in its old one-argument form)
    assert [c["role"] for c in _calls(tmp_path)] == ["old", "optimized"]
    assert any("'old-style' implements prepare(model) without a context" in w
               for w in report["warnings"])
    assert report["recipe"]["backend"] == "plain-callable"
    assert report["recipe"]["baseline_backend"] == "old-style"
    assert report["environment"]["baseline_backend"]["backend"] == "old-style"
    # the run's backend decides what runs: its refusal of int8 still holds
    assert [s["refused"] is not None for s in report["steps"]] == [False, True]
    assert list(report["artifacts"]["backend"]) == ["optimized"]
    assert report["optimized"]["metrics"]["latency"]["p50_ms"] > 0
    assert report["baseline"]["metrics"]["accuracy"]["top1"] > 0.5
    saved = (tmp_path / "run" / "report.md").read_text()
    assert "the baseline ran on old-style, the optimized model on plain-callable" in saved

    unknown = cli(*RUN, "--baseline-backend", "no-such", env=env)
    assert unknown.returncode == 2 and "--baseline-backend no-such" in unknown.stderr


def test_a_baseline_backend_keeps_its_own_threads_and_exposes_its_modules(tmp_path: Path) -> None:
    import torch

    import inferopt

    before = torch.get_num_threads()
    if before < 2:
        torch.set_num_threads(2)
    try:
        start = torch.get_num_threads()
        report = inferopt.run(model="demo:digits-mlp-small", optimize=["none"], backend="cpu",
                              baseline_backend="cpu:threads=1", save=False,
                              metrics=["memory", "latency:min_runs=5,min_seconds=0,warmup=1"])
        # the baseline's threads option applies to the baseline only, and ends with the run
        assert report.environment["baseline_backend"]["threads"] == 1
        assert report.environment["threads"] == start
        assert torch.get_num_threads() == start
        # a metric that reads the torch modules sees the baseline through its wrapper
        assert "memory" not in report.skipped_metrics
        assert report.baseline["memory"] and report.optimized["memory"]
        same = inferopt.run(model="demo:digits-mlp-small", optimize=["none"], save=False,
                            baseline_backend="cpu", metrics=["size"])
        assert same.recipe["baseline_backend"] is None  # the baseline runs there anyway
    finally:
        torch.set_num_threads(before)
