"""Several ``inferopt tune`` workers on one Optuna study: two processes share a SQLite study
(and a PostgreSQL one) with no trial run twice; a worker killed mid-trial leaves its trial to be
run again by another; Ctrl-C (SIGINT) stops a worker so that a rerun continues. The trials are
"naps" (a test optimizer that sleeps), long enough that both workers get some."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

NAPS_PLUGIN = """
import time
import attrs
import inferopt


@attrs.frozen
class Naps(inferopt.Optimizer):
    '''Sleeps, then leaves the model as it is: a trial of a known length.'''
    name = "naps"
    seconds: float = inferopt.option(0.5, min=0.0, searchable=(0.5, 0.6, 0.7, 0.8))

    def apply(self, model, ctx):
        time.sleep(self.seconds)
        return model


@inferopt.hookimpl
def inferopt_register_optimizers(register):
    register(Naps)
"""
FAST = ["--model", "demo:digits-mlp-small", "--metric",
        "latency:min_runs=20,min_seconds=0,warmup=1", "--heartbeat-seconds", "1",
        "--objective", "size", "--json"]


@pytest.fixture
def naps_env(plugin_env: Any) -> dict[str, str]:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    env.update(plugin_env("inferopt-naps", {"naps": "naps_plugin"},
                          {"naps_plugin": NAPS_PLUGIN}))
    return env


def _worker(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "inferopt", "tune", *args], env=env,
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _trials(storage: str) -> list[dict[str, Any]]:
    import optuna

    from inferopt.plugins.commands.tune.search import attrs_of

    study = optuna.load_study(study_name="inferopt-tune", storage=storage)
    return [attrs_of(t) for t in study.get_trials()]


def _measured(storage: str) -> list[dict[str, Any]]:
    return [t for t in _trials(storage) if "status" in t and "skipped" not in t
            and t["state"] in ("COMPLETE", "FAIL")]


def _wait_for_running(storage: str, phase: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(t["state"] == "RUNNING" and t.get("phase") == phase for t in _trials(storage)):
                return
        except Exception:  # the study is not created yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"no {phase} trial started within {timeout} s")


def _two_workers_share(storage_args: list[str], storage: str, tmp_path: Path,
                       env: dict[str, str]) -> None:
    args = [*FAST, "-t", "naps", *storage_args]
    workers = [_worker([*args, "--out", str(tmp_path / f"w{i}")], env, tmp_path)
               for i in range(2)]
    results = [w.communicate(timeout=240) for w in workers]
    for w, (_out, err) in zip(workers, results, strict=True):
        assert w.returncode == 1, err  # naps never make the model smaller: no candidate
    measured = _measured(storage)
    keys = [t["key"] for t in measured]
    assert len(keys) == len(set(keys)), keys  # no trial ran twice
    assert set(keys) == {"none", "naps", "naps:seconds=0.6", "naps:seconds=0.7",
                         "naps:seconds=0.8"}  # the whole space, once
    assert len({t["worker"] for t in measured}) == 2  # both workers ran trials
    docs = [json.loads(out) for out, _err in results]
    # the worker that finished last saw every trial, whoever ran it
    assert max(len(d["trials"]) for d in docs) == 5
    assert all(t["status"] == "ok" for d in docs for t in d["trials"])
    assert any(t["replayed"] for d in docs for t in d["trials"])  # run by the other worker


def test_two_workers_share_one_sqlite_study(naps_env: dict[str, str], tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    _two_workers_share(["--storage", f"sqlite:///{db}"], f"sqlite:///{db}", tmp_path, naps_env)


def test_two_workers_on_a_grid_run_the_trials_of_one(naps_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    """--sampler grid: two workers run the trials one worker runs. With --objective size no
    measured result changes the plan (naps never make the model smaller: no pairs, no
    sensitivity runs), so the trials depend only on the grid's order and the trial limit, which
    leaves the last point of the space out."""
    args = [*FAST, "-t", "naps", "--sampler", "grid", "--trials", "3"]
    keys = {}
    for n in (1, 2):
        storage = f"sqlite:///{tmp_path / f'grid{n}.db'}"
        workers = [_worker([*args, "--storage", storage, "--out", str(tmp_path / f"g{n}-{i}")],
                           naps_env, tmp_path) for i in range(n)]
        for w in workers:
            _out, err = w.communicate(timeout=240)
            assert w.returncode == 1, err
        keys[n] = [t["key"] for t in sorted(_measured(storage), key=lambda t: t["number"])]
    assert keys[1] == ["none", "naps", "naps:seconds=0.6", "naps:seconds=0.7"]
    assert sorted(keys[2]) == sorted(keys[1])  # the same trials, none twice


@pytest.mark.slow
def test_two_workers_in_one_out_dir_share_its_study(naps_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    out = tmp_path / "tune"
    args = [*FAST, "-t", "naps", "--trials", "3", "--out", str(out)]
    workers = [_worker(args, naps_env, tmp_path) for _ in range(2)]
    for w in workers:
        _out, err = w.communicate(timeout=240)
        assert w.returncode == 1, err
    keys = [t["key"] for t in _measured(f"sqlite:///{out}/study.db")]
    assert len(keys) == len(set(keys)) == 4  # the A/A trial and 3 trials: the study's limit
    doc = json.loads((out / "tune.json").read_text())
    assert doc["stopped"] == "trial limit reached (3 trials)" and len(doc["trials"]) == 4


@pytest.mark.slow
def test_a_killed_workers_trial_is_run_again_by_another(naps_env: dict[str, str],
                                                        tmp_path: Path) -> None:
    out = tmp_path / "tune"
    storage = f"sqlite:///{out}/study.db"
    args = [*FAST, "-t", "naps:seconds=4", "--out", str(out)]
    first = _worker(args, naps_env, tmp_path)
    _wait_for_running(storage, "single")
    first.kill()  # SIGKILL: no chance to clean up
    first.wait(timeout=30)
    stale = next(t for t in _trials(storage) if t.get("phase") == "single")
    assert stale["state"] == "RUNNING"
    second = _worker(args, naps_env, tmp_path)
    _out, err = second.communicate(timeout=240)
    assert second.returncode == 1, err
    trials = _trials(storage)
    assert not any(t["state"] in ("RUNNING", "WAITING") for t in trials)
    assert next(t for t in trials if t["number"] == stale["number"])["state"] == "FAIL"
    runs = [t for t in _measured(storage) if t["key"] == "naps:seconds=4.0"]
    assert len(runs) == 1 and runs[0]["worker"] != stale["worker"]
    doc = json.loads((out / "tune.json").read_text())
    assert [t["key"] for t in doc["trials"]] == ["none", "naps:seconds=4.0"]


@pytest.mark.slow
def test_ctrl_c_stops_a_worker_and_a_rerun_continues(naps_env: dict[str, str],
                                                     tmp_path: Path) -> None:
    out = tmp_path / "tune"
    storage = f"sqlite:///{out}/study.db"
    args = [*FAST, "-t", "naps:seconds=3", "--out", str(out)]
    worker = _worker(args, naps_env, tmp_path)
    _wait_for_running(storage, "single")
    worker.send_signal(signal.SIGINT)
    _out, err = worker.communicate(timeout=60)
    assert worker.returncode == 130 and "rerun the same command to continue" in err
    assert [t["key"] for t in _measured(storage)] == ["none"]
    rerun = _worker(args, naps_env, tmp_path)
    stdout, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 1, err
    doc = json.loads(stdout)
    assert [(t["key"], t["replayed"]) for t in doc["trials"]] == [("none", True),
                                                                  ("naps:seconds=3.0", False)]


# --- PostgreSQL ------------------------------------------------------------------------------

PG_BIN = Path("/usr/local/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server (unix socket in a temporary directory), as a storage URL.
    PostgreSQL refuses to run as root: as root, the server runs as ``nobody``."""
    initdb = shutil.which("initdb") or str(PG_BIN / "initdb")
    if not Path(initdb).is_file():
        pytest.skip("PostgreSQL's initdb is not installed")
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed (test extra)")
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL unprivileged")
        prefix = [runuser, "-u", "nobody", "--"]
    root = Path(tempfile.mkdtemp(prefix="inferopt-pg-"))
    root.chmod(0o755)
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if prefix:
        shutil.chown(root, "nobody")
        shutil.chown(sock, "nobody")
    port = _free_port()
    try:
        init = subprocess.run([*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "tune"],
                              capture_output=True, text=True, timeout=120)
        if init.returncode != 0:
            pytest.skip(f"initdb failed: {init.stderr.strip()[-300:]}")
        start = subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-w", "-l", str(root / "log"), "-o",
             f"-k {sock} -p {port} -c listen_addresses=''", "start"],
            capture_output=True, text=True, timeout=120)
        if start.returncode != 0:
            pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[-300:]}")
        yield f"postgresql+psycopg://tune@/postgres?host={sock}&port={port}"
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_postgresql_study(naps_env: dict[str, str], tmp_path: Path,
                                                postgres: str) -> None:
    _two_workers_share(["--storage", postgres], postgres, tmp_path, naps_env)
