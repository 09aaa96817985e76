"""Model sources a user points at their own files: python specs with arguments and weights,
torch.export programs, TorchScript, pickled modules (refused unless trusted)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

import inferopt

QUICK = ["--metric", "fidelity", "--metric", "latency:min_runs=3,min_seconds=0,warmup=1"]

MODELS_PY = '''
import torch

class Net(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.a = torch.nn.Linear(16, width)
        self.b = torch.nn.Linear(width, 4)
    def forward(self, x):
        return self.b(torch.relu(self.a(x)))

def build(width=32, seed=0):
    torch.manual_seed(seed)
    return Net(width)
'''


def net_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.py"
    path.write_text(MODELS_PY)
    return path


def report_of(tmp_path: Path, out: str) -> dict:
    return json.loads((tmp_path / out / "report.json").read_text())


def test_python_spec_passes_arguments_and_loads_weights(cli, tmp_path):
    import importlib.util

    py = net_file(tmp_path)
    spec = importlib.util.spec_from_file_location("user_models", py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trained = module.build(width=24, seed=5)  # weights a run with seed=0 would not make
    from safetensors.torch import save_file

    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    for weights in ("w.safetensors", "ckpt.pt"):
        result = cli("run", "--model", f"models.py:build:width=24,weights={weights}",
                     "--data", "synthetic:shape=8x16,batches=2", "--optimize", "none",
                     *QUICK, "--out", f"run-{weights}")
        assert result.returncode == 0, result.stderr
        loaded = inferopt.load(tmp_path / f"run-{weights}", trust_model=True)
        x = torch.randn(3, 16)
        assert torch.equal(loaded(x), trained(x))  # the saved weights, not a fresh init
        manifest = json.loads((tmp_path / f"run-{weights}" / "inferopt.json").read_text())
        assert str(tmp_path / weights) in manifest["model"]  # absolute: loads from anywhere


def test_weights_that_do_not_fit_name_the_keys(cli, tmp_path):
    net_file(tmp_path)
    torch.save({"other.weight": torch.zeros(2)}, tmp_path / "bad.pt")
    result = cli("run", "--model", "models.py:build:weights=bad.pt",
                 "--data", "synthetic:shape=8x16", *QUICK)
    assert result.returncode == 2
    assert "unexpected ['other.weight']" in result.stderr
    result = cli("run", "--model", "models.py:build:depth=3",
                 "--data", "synthetic:shape=8x16", *QUICK)
    assert result.returncode == 2 and "depth" in result.stderr


class Branchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 32)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x, img):
        return {"logits": self.head(torch.relu(self.fc(x))), "maps": self.conv(img)}


def export_branchy(path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = Branchy().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.randn(4, 16), torch.randn(4, 3, 8, 8)),
                                  dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, str(path))
    return model


def branchy_data() -> list:
    g = torch.Generator().manual_seed(1)
    return [inferopt.Batch(inputs=(torch.randn(8, 16, generator=g),
                                   torch.randn(8, 3, 8, 8, generator=g))) for _ in range(3)]


def test_pt2_program_round_trips_optimized_saved_reloaded(tmp_path):
    from inferopt._contract import SourceContext
    from inferopt._logging import get_logger
    from inferopt.plugins.sources.export import ExportedProgramModels

    path = tmp_path / "branchy.pt2"
    original = export_branchy(path)
    data = branchy_data()
    data_py = tmp_path / "data.py"
    data_py.write_text("import torch, inferopt\n"
                       "def batches():\n"
                       "    g = torch.Generator().manual_seed(1)\n"
                       "    return [inferopt.Batch(inputs=(torch.randn(8, 16, generator=g),\n"
                       "            torch.randn(8, 3, 8, 8, generator=g))) for _ in range(3)]\n")
    report = inferopt.run(model=str(path), data=f"{data_py}:batches",
                          optimize=["int8:mode=static"], metrics=["fidelity"],
                          out=tmp_path / "run")
    assert sorted(report.steps[0].details["quantized"]) == ["conv", "fc", "head"]
    assert report.optimized["fidelity"]["cosine"] > 0.99

    # what the run measured: the same source, the same step on the same calibration data
    fresh = ExportedProgramModels().load(str(path), SourceContext(log=get_logger()))
    optimized = inferopt.apply(fresh, "int8", mode="static", data=data)
    reloaded = inferopt.load(tmp_path / "run")
    assert "Int8Linear" in {type(m).__name__ for m in reloaded.modules()}
    with torch.inference_mode():
        for batch in data:
            got, want = reloaded(*batch.inputs), optimized(*batch.inputs)
            assert torch.equal(got["logits"], want["logits"])
            assert torch.equal(got["maps"], want["maps"])
            # and it is still the model that was exported, to int8 precision
            ref = original(*batch.inputs)["logits"]
            assert torch.nn.functional.cosine_similarity(got["logits"], ref).min() > 0.99


def test_pt2_archive_with_pickled_parts_needs_trust(cli, tmp_path):
    path = tmp_path / "m.pt2"
    export_branchy(path)
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    result = cli("run", "--model", str(tampered), "--data", "synthetic:shape=4x16", *QUICK)
    assert result.returncode == 2
    assert "--trust-model" in result.stderr and "pickled" in result.stderr


def test_torchscript_is_measured_and_int8_says_why_it_cannot(cli, tmp_path):
    torch.manual_seed(0)
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()))
    scripted.save(str(tmp_path / "model.ts"))
    result = cli("run", "--model", "model.ts", "--data", "synthetic:shape=8x16,batches=2",
                 "--optimize", "none", *QUICK, "--out", "ts")
    assert result.returncode == 0, result.stderr
    assert report_of(tmp_path, "ts")["baseline"]["metrics"]["latency"]["p50_ms"] > 0
    result = cli("run", "--model", "model.ts", "--data", "synthetic:shape=8x16", *QUICK)
    assert result.returncode == 2
    assert "TorchScript" in result.stderr and ".pt2" in result.stderr


def test_state_dict_as_model_says_how_to_add_the_architecture(cli, tmp_path):
    torch.save(torch.nn.Linear(4, 4).state_dict(), tmp_path / "sd.pt")
    result = cli("run", "--model", "sd.pt", "--data", "synthetic:shape=8x4", *QUICK)
    assert result.returncode == 2
    assert "state dict" in result.stderr and "weights=" in result.stderr


class WritesAFile:
    """Unpickling this would create a file: the proof that code in a pickle ran."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def test_untrusted_pickle_is_refused_and_nothing_in_it_runs(cli, tmp_path):
    marker = tmp_path / "ran.txt"
    for name, payload in (("evil.pt", {"model": WritesAFile(str(marker))}),
                          ("evil.pth", WritesAFile(str(marker)))):
        with open(tmp_path / name, "wb") as handle:
            torch.save(payload, handle, pickle_protocol=2)
        result = cli("run", "--model", name, "--data", "synthetic:shape=8x4", *QUICK)
        assert result.returncode == 2, result.stderr
        assert "--trust-model" in result.stderr
        assert not marker.exists()
    # the same refusal for data files: they are only read with weights_only=True
    net_file(tmp_path)
    result = cli("run", "--model", "models.py:build", "--data", "evil.pt", *QUICK)
    assert result.returncode == 2 and "weights_only=True" in result.stderr
    assert not marker.exists()


def test_old_layout_pt2_with_a_pickle_under_a_json_name_runs_nothing(cli, tmp_path):
    """torch.export.load's fallback for the torch <= 2.7 layout unpickles its payloads with
    weights_only=False when the safe load fails; such an archive needs --trust-model."""
    import io

    marker = tmp_path / "ran.txt"
    payload = io.BytesIO()
    torch.save({"x": WritesAFile(str(marker))}, payload, pickle_protocol=2)
    evil = tmp_path / "old.pt2"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("old/version", "1")
        archive.writestr("old/serialized_exported_program.json", "{}")
        archive.writestr("old/serialized_state_dict.json", payload.getvalue())
    result = cli("run", "--model", str(evil), "--data", "synthetic:shape=4x16", *QUICK)
    assert result.returncode == 2 and "--trust-model" in result.stderr
    assert "old (torch <= 2.7) layout" in result.stderr
    assert not marker.exists()


def test_trusted_pickle_loads_with_the_flag(cli, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    torch.save(model, tmp_path / "full.pt")
    refused = cli("run", "--model", "full.pt", "--data", "synthetic:shape=8x16", *QUICK)
    assert refused.returncode == 2 and "--trust-model" in refused.stderr
    result = cli("run", "--model", "full.pt", "--trust-model", "--data",
                 "synthetic:shape=8x16,batches=2", *QUICK, "--out", "trusted")
    assert result.returncode == 0, result.stderr
    assert report_of(tmp_path, "trusted")["steps"][0]["details"]["quantized"] == ["0", "2"]
    with pytest.raises(inferopt.UsageError, match="--trust-model"):
        inferopt.load(tmp_path / "trusted")  # the saved run does not grant trust
    assert isinstance(inferopt.load(tmp_path / "trusted", trust_model=True), torch.nn.Module)
