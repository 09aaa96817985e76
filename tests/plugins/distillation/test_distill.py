"""Knowledge distillation: students, losses, training, save/load, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import inferopt
from inferopt._contract import SourceContext, StepContext
from inferopt._logging import get_logger
from inferopt.plugins.distillation.optimizer import Distiller
from inferopt.plugins.distillation.training import TrainConfig, distillation_loss, shrink
from tests.helpers import demo_correct

FAST = "epochs=15,patience=5"


def test_shrink_scales_hidden_widths_of_an_mlp():
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 1000), torch.nn.ReLU(),
                                  torch.nn.Sequential(torch.nn.Linear(1000, 500), torch.nn.ReLU()),
                                  torch.nn.Linear(500, 10))
    student = shrink(teacher, 0.1, round_to=8)
    widths = [(m.in_features, m.out_features) for m in student if isinstance(m, torch.nn.Linear)]
    assert widths == [(64, 96), (96, 48), (48, 10)]
    assert student(torch.randn(2, 64)).shape == (2, 10)


def test_shrink_follows_conv_batchnorm_and_flatten():
    teacher = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(64 * 4 * 4, 10))
    student = shrink(teacher, 0.25)
    assert student[0].out_channels == 8 and student[1].num_features == 8
    assert student[3].out_channels == 16 and student[6].in_features == 16 * 4 * 4
    assert student(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_shrink_refuses_what_it_cannot_follow():
    with pytest.raises(inferopt.UsageError, match=r"works on nn\.Sequential MLPs and CNNs"):
        shrink(torch.nn.TransformerEncoderLayer(16, 2), 0.5)
    with pytest.raises(inferopt.UsageError, match="cannot follow layer LSTM"):
        shrink(torch.nn.Sequential(torch.nn.LSTM(4, 4)), 0.5)


def cfg(**kw):
    base = dict(mode="soft", temperature=2.0, alpha=1.0, epochs=1, lr=1e-3, weight_decay=0.0,
                val_fraction=0.1, patience=1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_soft_loss_is_t_squared_kl_and_labels_mix_by_alpha():
    torch.manual_seed(0)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    y = torch.tensor([0, 1, -100, 3])
    kd = torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.softmax(t / 2, -1),
                                    reduction="batchmean") * 4
    assert torch.isclose(distillation_loss(s, t, y, cfg()), kd)
    ce = torch.nn.functional.cross_entropy(s, y, ignore_index=-100)
    mixed = distillation_loss(s, t, y, cfg(alpha=0.3))
    assert torch.isclose(mixed, 0.3 * kd + 0.7 * ce)
    # no labels at all: the teacher term alone, whatever alpha says
    assert torch.isclose(distillation_loss(s, t, None, cfg(alpha=0.3)), kd)
    hard = distillation_loss(s, t, None, cfg(mode="hard"))
    assert torch.isclose(hard, torch.nn.functional.cross_entropy(s, t.argmax(-1)))


def test_demo_student_is_tiny_close_to_the_teacher_and_reloads(tmp_path):
    report = inferopt.run(model="demo:digits-mlp-small", out=tmp_path / "r",
                          optimize=[f"distill:ratio=0.25,{FAST}"],
                          metrics=["accuracy", "size"])
    details = report.steps[0].details
    assert details["student_parameters"] < 0.3 * details["teacher_parameters"]
    assert 1 <= details["best_epoch"] <= details["epochs_run"] <= 15
    assert report.verdict["accuracy_drop_points"] <= 5.0
    assert report.verdict["size_ratio"] < 0.3
    loaded = inferopt.load(tmp_path / "r")
    assert loaded[0].out_features == 32
    assert demo_correct(loaded) == report.optimized["accuracy"]["correct"]


def test_training_is_seeded():
    reports = [inferopt.run(model="demo:digits-mlp-small", optimize=[f"distill:{FAST}"],
                            metrics=["accuracy"], save=False) for _ in range(2)]
    assert reports[0].optimized["accuracy"] == reports[1].optimized["accuracy"]


def teacher_and_data(labels: bool):
    sctx = SourceContext(log=get_logger(), batch_size=64)
    from inferopt.plugins.sources.demo import DemoData, DemoModels

    teacher = DemoModels().load("demo:digits-mlp-small", sctx)
    data = DemoData().load("demo:digits", sctx)
    if not labels:
        data = inferopt.Data(eval=[inferopt.Batch(b.inputs) for b in data.eval],
                             calibration=[inferopt.Batch(b.inputs) for b in data.calibration])
    return teacher, data


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_unlabelled_data_is_enough(mode):
    teacher, data = teacher_and_data(labels=False)
    ctx = StepContext(log=get_logger(), data=data)
    student = Distiller(mode=mode, epochs=15, patience=5).apply(copy.deepcopy(teacher), ctx)
    x = torch.cat([b.inputs for b in data.eval])
    with torch.inference_mode():
        agreement = (student(x).argmax(-1) == teacher(x).argmax(-1)).float().mean()
    assert agreement > 0.9


def test_bad_students_fail_before_training(tmp_path):
    teacher, data = teacher_and_data(labels=True)
    (tmp_path / "students.py").write_text(
        "import torch\n"
        "def wrong_classes():\n    return torch.nn.Linear(64, 7)\n"
        "def wrong_inputs():\n    return torch.nn.Linear(10, 10)\n")
    from inferopt._registry import load_plugins
    from inferopt._sources import model_loader

    _manager, registry = load_plugins()
    ctx = StepContext(log=get_logger(), data=data,
                      model_loader=model_loader(registry, get_logger(), 0, trust_model=False))
    with pytest.raises(inferopt.UsageError, match=r"teacher outputs \(64, 10\) but the student"):
        Distiller(student=f"{tmp_path}/students.py:wrong_classes").apply(teacher, ctx)
    with pytest.raises(inferopt.UsageError, match="fails on the teacher's inputs"):
        Distiller(student=f"{tmp_path}/students.py:wrong_inputs").apply(teacher, ctx)
    with pytest.raises(inferopt.UsageError, match="no installed model source reads it"):
        Distiller(student="nowhere").apply(teacher, ctx)
    regressor = torch.nn.Sequential(torch.nn.Linear(64, 1), torch.nn.Flatten(0))
    with pytest.raises(inferopt.UsageError, match="distill needs class logits"):
        Distiller().apply(regressor, ctx)
    with pytest.raises(inferopt.UsageError, match="needs training data"):
        Distiller().apply(teacher, StepContext(log=get_logger()))


def test_int32_labels_and_diverging_training():
    teacher, data = teacher_and_data(labels=True)
    data32 = inferopt.Data(
        eval=data.eval,
        calibration=[inferopt.Batch(b.inputs, b.labels.int()) for b in data.calibration])
    ctx = StepContext(log=get_logger(), data=data32)
    Distiller(epochs=2, patience=2).apply(copy.deepcopy(teacher), ctx)
    with pytest.raises(inferopt.UsageError, match="never produced a finite validation loss"):
        Distiller(epochs=2, lr=1e30).apply(copy.deepcopy(teacher),
                                           StepContext(log=get_logger(), data=data))
