"""Bad data and bad values are caught before anything is measured, reported as the data's (or
the flag's) fault, in one line naming the input (issue: security and reliability, case 8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

QUICK = ["--metric", "accuracy", "--metric", "latency:min_runs=3,min_seconds=0,warmup=1"]


def labelled(tmp_path: Path, labels: np.ndarray, x: np.ndarray | None = None) -> str:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(labels), 64)).astype(np.float32) if x is None else x
    np.savez(tmp_path / "data.npz", x=x, y=labels)
    return "data.npz"


def one_error(result) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.parametrize(("labels", "message"), [
    (np.full(32, 12), "has the label 12, but the model gives 10 classes"),
    (np.full(32, -3), "negative label -3"),
    (np.linspace(0, 9, 32).astype(np.float32), "float32 labels"),
])
def test_labels_that_are_not_the_models_classes_are_refused(cli, tmp_path, labels, message):
    data = labelled(tmp_path, labels)
    result = cli("run", "--model", "demo:digits-mlp-small", "--data", data, *QUICK)
    err = one_error(result)
    assert message in err and "data.npz" in err


def test_labels_out_of_range_are_not_blamed_on_a_training_step(cli, tmp_path):
    data = labelled(tmp_path, np.full(32, 11))
    err = one_error(cli("run", "--model", "demo:digits-mlp-small", "--data", data,
                        "--optimize", "distill:epochs=1", *QUICK))
    assert "the label 11" in err and "distill" not in err


def test_the_ignore_index_is_allowed(cli, tmp_path):
    labels = np.arange(32) % 10
    labels[:4] = -100
    result = cli("run", "--model", "demo:digits-mlp-small", "--data",
                 labelled(tmp_path, labels), "--optimize", "none", *QUICK)
    assert result.returncode == 0, result.stderr


def test_nan_in_the_data_is_the_datas_fault(cli, tmp_path):
    x = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    x[5, 7] = np.nan
    err = one_error(cli("run", "--model", "demo:digits-mlp-small", "--data",
                        labelled(tmp_path, np.arange(32) % 10, x), *QUICK))
    assert "NaN or infinite input" in err and "the data is at fault" in err
    assert "data.npz" in err


def test_an_option_given_twice_is_refused(cli):
    err = one_error(cli("run", "--model", "demo:digits-mlp-small", "--optimize",
                        "int8:mode=static,mode=dynamic", *QUICK))
    assert "'mode' is given twice" in err and "--optimize" in err


def test_a_seed_torch_cannot_take_names_the_flag(cli):
    err = one_error(cli("run", "--model", "demo:digits-mlp-small", "--seed", str(2**70),
                        *QUICK))
    assert "--seed" in err


def test_out_under_a_file_is_refused_before_the_run(cli, tmp_path):
    (tmp_path / "afile").write_text("x")
    err = one_error(cli("run", "--model", "demo:digits-mlp-small", "--out", "afile/run",
                        "--metric", "latency:min_seconds=60,min_runs=100000000"))
    assert "is a file" in err and "afile" in err


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".npy"])
def test_a_truncated_data_file_names_the_file(cli, tmp_path, suffix):
    import torch
    from safetensors.torch import save_file

    x = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    path = tmp_path / f"data{suffix}"
    if suffix == ".safetensors":
        save_file({"x": torch.from_numpy(x)}, str(path))
    elif suffix == ".npz":
        np.savez(path, x=x)
    else:
        np.save(path, x)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    err = one_error(cli("run", "--model", "demo:digits-mlp-small", "--data", path.name,
                        "--metric", "size"))
    assert path.name in err and "complete" in err


def test_synthetic_data_larger_than_memory_is_refused(cli):
    err = one_error(cli("run", "--model", "demo:digits-mlp-small", "--data",
                        "synthetic:shape=100000x100000x64", "--metric", "size"))
    assert "synthetic:shape=100000x100000x64" in err and "memory" in err


def test_torch_log_records_reach_the_user_without_tracebacks():
    """torch.export's loader logs warnings with exc_info; the user sees the line, not the
    traceback (unless --log-level debug)."""
    import io
    import logging

    from inferopt._logging import configure

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # stands for the handlers torch installs
    torch_logger = logging.getLogger("torch.export")
    torch_logger.addHandler(handler)
    try:
        for level in ("info", "debug"):
            configure("console", level)
            try:
                raise RuntimeError("deep inside torch")
            except RuntimeError:
                logging.getLogger("torch.export").warning("Ran into an error (%s)", level,
                                                          exc_info=True)
    finally:
        torch_logger.removeHandler(handler)
        configure("console", "info")
    shown = stream.getvalue()
    quiet, loud = shown.split("Ran into an error (debug)")
    assert "Ran into an error (info)" in quiet and "Traceback" not in quiet
    assert "Traceback" in loud
