"""Runs that are killed, terminated or stopped by someone else's sys.exit() leave a state the
next run recovers, and say who stopped them (issue: security and reliability, cases 3 and 4)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import inferopt
from inferopt import _run_dir
from tests.helpers import QUITS_PLUGIN

SMALL = dict(model="demo:digits-mlp-small", metrics=["size"])


def saved_run(out: Path) -> dict[str, bytes]:
    inferopt.run(out=out, **SMALL)
    return {p.name: p.read_bytes() for p in out.iterdir()}


def killed_leftover(parent: Path, name: str, pid: int = 2**22 + 12345) -> Path:
    """A staging folder as a killed run leaves it: an owner file naming a process that is not
    running, half the files."""
    folder = parent / name
    folder.mkdir()
    (folder / _run_dir.OWNER).write_text(str(pid))
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    return folder


def test_overwrite_swaps_atomically_and_leaves_nothing_beside(tmp_path):
    out = tmp_path / "run"
    saved_run(out)
    report = inferopt.run(out=out, overwrite=True, optimize=["prune-l1:structured=true"],
                          **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    manifest = json.loads((out / "inferopt.json").read_text())
    assert [s["name"] for s in manifest["steps"]] == ["prune-l1"]
    assert not report.warnings or not any("killed" in w for w in report.warnings)


def test_an_interrupt_just_before_the_swap_keeps_the_earlier_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    before = saved_run(out)

    def interrupted(a, b):
        raise KeyboardInterrupt

    monkeypatch.setattr(_run_dir, "_exchange", interrupted)
    with pytest.raises(inferopt.Interrupted, match="keeps its previous contents"):
        inferopt.run(out=out, overwrite=True, **SMALL)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_kill_between_the_two_renames_is_recovered_by_the_next_run(tmp_path):
    """What SIGKILL between the renames of the two-rename path leaves: --out missing, the
    earlier run in .replaced-, the new one unfinished in .partial-. The next run puts the
    earlier run back, removes the rest, and says so."""
    out = tmp_path / "run"
    before = saved_run(out)
    out.rename(tmp_path / ".run.replaced-abcd1234")
    killed_leftover(tmp_path, ".run.partial-dead0001")
    with pytest.raises(inferopt.UsageError, match="already exists"):
        # the earlier run is back in place, so a rerun without --overwrite is refused
        inferopt.run(out=out, **SMALL)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_leftovers_of_killed_runs_are_reported_and_removed(tmp_path):
    out = tmp_path / "run"
    saved_run(out)
    killed_leftover(tmp_path, ".run.partial-dead0002")
    replaced = tmp_path / ".run.replaced-dead0003"
    replaced.mkdir()
    (replaced / "inferopt.json").write_text("{}")
    report = inferopt.run(out=out, overwrite=True, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    notes = [w for w in report.warnings if "killed" in w]
    assert len(notes) == 2 and any("an unfinished run" in n for n in notes)
    assert "killed" in json.loads((out / "report.json").read_text())["warnings"][0]


def test_the_staging_folder_of_a_running_process_is_left_alone(tmp_path):
    out = tmp_path / "run"
    saved_run(out)
    busy = killed_leftover(tmp_path, ".run.partial-busy0001", pid=os.getpid())
    inferopt.run(out=out, overwrite=True, **SMALL)
    assert busy.is_dir()


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path):
    out = tmp_path / "run"
    saved_run(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "inferopt", "run", "--model", "demo:digits-mlp-small", "--out",
         str(out), "--overwrite", "--metric", "latency:min_seconds=60,min_runs=100000000"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        if "measuring optimized model" in line or time.monotonic() > deadline:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    assert "interrupted during measuring the optimized model" in rest
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]




def test_sys_exit_in_a_step_is_an_error_naming_the_step(cli, plugin_env):
    env = plugin_env("inferopt-quits", {"quits": "quits_plugin"},
                     {"quits_plugin": QUITS_PLUGIN})
    result = cli("run", "--model", "demo:digits-mlp-small", "--optimize", "quits", "--metric",
                 "size", "--out", "r", env=env)
    assert result.returncode == 2
    assert "step 1 'quits'" in result.stderr and "SystemExit(0)" in result.stderr
    assert not Path("r").exists()
    kept = cli("run", "--model", "demo:digits-mlp-small", "--optimize", "quits", "--optimize",
               "int8", "--keep-going", "--metric", "size", "--out", "k", env=env)
    assert kept.returncode == 1 and Path("k/inferopt.json").is_file()


def test_sys_exit_in_the_models_code_is_an_error_naming_the_phase(cli, tmp_path):
    (tmp_path / "quitter.py").write_text("import sys\ndef build():\n    sys.exit(3)\n")
    result = cli("run", "--model", "quitter.py:build", "--data", "synthetic:shape=4x8",
                 "--metric", "size")
    assert result.returncode == 2
    assert "SystemExit(3)" in result.stderr and "loading the model" in result.stderr


INTERRUPTED_COMMAND = '''
import click, inferopt


@inferopt.hookimpl
def inferopt_register_commands(cli):
    @cli.command("wait")
    def wait():
        raise KeyboardInterrupt
'''


def test_ctrl_c_in_a_command_exits_130_not_aborted(cli, plugin_env):
    env = plugin_env("inferopt-wait", {"wait": "wait_plugin"},
                     {"wait_plugin": INTERRUPTED_COMMAND})
    result = cli("wait", env=env)
    assert result.returncode == 130 and "Aborted" not in result.stderr


def test_a_run_records_how_busy_the_machine_was_and_warns_when_others_compete(tmp_path):
    """A busy process competes for the cores while the run measures latency."""
    import multiprocessing

    quiet = inferopt.run(save=False, **SMALL)
    load = quiet.environment["machine_load"]
    assert load["cores"] >= 1 and "load_average_after" in load
    if "other_processes_cores" not in load:
        pytest.skip("no /proc/stat here: only the load average is recorded")
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,))]
    for spinner in spinners:
        spinner.start()
    try:
        busy = inferopt.run(save=False, model="demo:digits-mlp-small",
                            metrics=["latency:min_seconds=0.5,min_runs=5,warmup=1"])
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join(timeout=10)
    # the spinner's share of a core varies with the scheduler (0.48 of a core seen on a 2-core
    # machine while the run's own threads competed): what matters is that it passes the
    # warning threshold and the run says so
    from inferopt._machine_load import WARN_CORES

    assert busy.environment["machine_load"]["other_processes_cores"] >= WARN_CORES
    assert any("other processes kept" in w for w in busy.warnings)


def _spin(stop) -> None:
    while not stop.is_set():
        pass


OOM = '''
import torch


class Hungry(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 1099511627776 bytes")


def build():
    return Hungry()
'''


def test_out_of_memory_is_an_error_that_says_what_to_do(cli, tmp_path):
    (tmp_path / "hungry.py").write_text(OOM)
    result = cli("run", "--model", "hungry.py:build", "--data", "synthetic:shape=4x8",
                 "--metric", "size")
    assert result.returncode == 2
    assert "out of memory during" in result.stderr and "--batch-size" in result.stderr
