"""fuse-bn: folds every Conv2d -> BatchNorm2d pair, exactly, and refuses a model without any."""

from __future__ import annotations

import pytest
import torch
from convnet import Residual, batches, build
from torch import nn

import inferopt


def test_roundtrip_fuses_every_pair_and_keeps_the_outputs(inferopt_roundtrip):
    report, loaded = inferopt_roundtrip("fuse-bn", model=build, data=batches(),
                                        metrics=["fidelity", "size"], atol=1e-5)
    details = report.steps[0].details
    assert details["fused"] == ["0+1", "3+4"]
    assert details["found_by"] == "torch.fx" and details["skipped"] == {}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())
    assert report.optimized["fidelity"]["max_abs_err"] < 1e-5
    reference = build()
    for batch in batches(seed=1):
        torch.testing.assert_close(loaded(batch.inputs), reference(batch.inputs),
                                   atol=1e-5, rtol=1e-5)


def test_a_conv_whose_output_is_used_elsewhere_is_left_alone():
    model = inferopt.apply(Residual().eval(), "fuse-bn")
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.bn2, nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), Residual().eval()(x), atol=1e-5, rtol=1e-5)


def test_skip_leaves_the_named_pair(inferopt_roundtrip):
    report, loaded = inferopt_roundtrip("fuse-bn", model=build, data=batches(), skip=("4",))
    assert report.steps[0].details["fused"] == ["0+1"]
    assert report.steps[0].details["skipped"] == {"4": "matched skip"}
    assert isinstance(loaded[4], nn.BatchNorm2d)


def test_nothing_to_fuse_is_an_error_that_says_so(inferopt_tiny_model):
    with pytest.raises(inferopt.UsageError, match=r"nothing to fuse .*no BatchNorm2d right after"):
        inferopt.apply(inferopt_tiny_model, "fuse-bn")


def test_nothing_to_fuse_on_the_command_line_is_exit_2(inferopt_cli):
    result = inferopt_cli("run", "-m", "demo:digits-mlp-small", "-O", "fuse-bn",
                          "--metric", "size")
    assert result.returncode == 2, result.stderr
    assert "fuse-bn: nothing to fuse" in result.stderr
