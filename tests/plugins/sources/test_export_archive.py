"""A ``.pt2`` the user has not said they trust never runs code from the file.

Each crafted archive carries a payload that writes a file when it runs; every test checks that
the file never appears, and that the refusal names ``--trust-model``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from inferopt.plugins.sources import export_archive
from tests.plugins.sources import pt2_attacks as attacks

DATA = Path(__file__).parents[2] / "data"
QUICK = ["--metric", "fidelity", "--metric", "latency:min_runs=3,min_seconds=0,warmup=1"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return attacks.export_plain(tmp_path_factory.mktemp("pt2") / "plain.pt2")


def refused(cli, path: Path, *extra: str):
    result = cli("run", "--model", str(path), "--data", "synthetic:shape=4x4", *QUICK, *extra)
    assert result.returncode == 2, result.stderr
    assert "--trust-model" in result.stderr and result.stderr.count("error:") == 1
    assert "Traceback" not in result.stderr
    return result


def test_the_reported_legacy_loader_bypass_runs_nothing(cli, tmp_path):
    """The reproduction file of the report: torch.export.load itself runs its payload."""
    shutil.copy(DATA / "legacy_bypass.pt2", tmp_path / "bypass.pt2")
    result = refused(cli, tmp_path / "bypass.pt2")
    assert not (tmp_path / "PWNED.txt").exists()
    assert "not all under one folder" in result.stderr


def test_legacy_bypass_under_one_folder_is_refused_too(cli, tmp_path, plain):
    evil = attacks.legacy_bypass(tmp_path / "flat.pt2", str(tmp_path / "ran.txt"), plain)
    nested = attacks.rewrite(evil, tmp_path / "nested.pt2", lambda _n, d: d)
    # the same entries moved under one folder, as a newer torch would look for them
    import zipfile

    with zipfile.ZipFile(evil) as src, zipfile.ZipFile(nested, "w") as dst:
        for name in src.namelist():
            dst.writestr(f"model/{name}", src.read(name))
    result = refused(cli, nested)
    assert "old (torch <= 2.7) layout" in result.stderr
    assert not (tmp_path / "ran.txt").exists()


def test_a_shape_expression_is_never_evaluated(cli, tmp_path, plain):
    marker = tmp_path / "ran.txt"
    evil = attacks.shape_expression_runs(plain, tmp_path / "sym.pt2", str(marker))
    result = refused(cli, evil)
    assert "shape expression" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("target", ["torch.hub.load", "builtins.exec", "#custom.op",
                                    "torch.ops.aten.__dict__", "torch.utils.cpp_extension"])
def test_graph_nodes_may_only_call_registered_operators(cli, tmp_path, plain, target):
    result = refused(cli, attacks.graph_calls(plain, tmp_path / "calls.pt2", target))
    assert "not a registered operator" in result.stderr


def test_pickled_weights_are_refused_and_not_unpickled(cli, tmp_path, plain):
    marker = tmp_path / "ran.txt"
    result = refused(cli, attacks.pickled_weight(plain, tmp_path / "w.pt2", str(marker)))
    assert "pickled" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["data/aotinductor/model/model.so", "data/weights/model.pt",
                                   "data/constants/custom_obj_0", "something/else"])
def test_entries_outside_a_plain_program_are_refused(cli, tmp_path, plain, entry):
    result = refused(cli, attacks.with_entry(plain, tmp_path / "extra.pt2", entry, b"\x7fELF"))
    assert entry in result.stderr


def test_the_guarded_loader_refuses_to_unpickle_even_without_the_checks(tmp_path, plain):
    """Second layer: a path to an unpickler that the checks missed fails, it does not run."""
    marker = tmp_path / "ran.txt"
    evil = attacks.pickled_weight(plain, tmp_path / "w.pt2", str(marker))
    assert export_archive.refusals(evil.read_bytes())  # the first layer sees it ...
    with pytest.raises(ValueError, match="refused"):  # ... and the second one holds alone
        export_archive.load_untrusted(evil.read_bytes())
    assert not marker.exists()
    # and torch's own loaders are back in place afterwards
    assert torch.load is not None and export_archive._GUARD.acquire(blocking=False)
    export_archive._GUARD.release()


def test_a_plain_dynamic_program_still_loads_and_runs_untrusted(cli, tmp_path, plain):
    assert export_archive.refusals(plain.read_bytes()) == []
    program = export_archive.load_untrusted(plain.read_bytes())
    out = program.module()(torch.randn(5, 4))
    assert out.shape == (5, 3)
    result = cli("run", "--model", str(plain), "--data", "synthetic:shape=4x4,batches=2",
                 *QUICK, "--out", "ok")
    assert result.returncode == 0, result.stderr


def test_trusted_archives_still_go_through_torch_export_load(cli, tmp_path, plain):
    marker = tmp_path / "ran.txt"
    evil = attacks.pickled_weight(plain, tmp_path / "w.pt2", str(marker))
    cli("run", "--model", str(evil), "--trust-model", "--data", "synthetic:shape=4x4",
        *QUICK)
    assert marker.exists()  # what --trust-model means: the user said the file may run code
