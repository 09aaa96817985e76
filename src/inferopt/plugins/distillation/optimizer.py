"""``distill``: knowledge distillation. The run's model is the teacher; the step returns a
student trained to imitate it on the run's calibration (training) data.

Students: ``student=shrink`` (default) rebuilds the teacher's architecture (nn.Sequential MLPs
and CNNs) with hidden widths scaled by ``ratio``; or any model spec (``python:MODULE:CALLABLE``,
``PATH.py:CALLABLE``, ``demo:...``). When a saved run is loaded, a student spec whose source
runs code (``python:``, ``PATH.py:``, pickled files) needs ``trust_model=True``, like the
run's own model spec.

Losses (Hinton et al., 2015), ``alpha`` weighting the teacher term:

* ``mode=soft``: ``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) +
  (1 - alpha) * CE(student, labels)``;
* ``mode=hard``: the student learns the teacher's argmax labels:
  ``alpha * CE(student, argmax teacher) + (1 - alpha) * CE(student, labels)``.

Samples without labels (label -100, or data with no labels at all) get only the teacher term,
so unlabelled data works. The torch side is in :mod:`inferopt.plugins.distillation.training`.
"""

from __future__ import annotations

from typing import Any

import attrs

from inferopt import Optimizer, UsageError, hookimpl, option

MODES = ("soft", "hard")


@attrs.frozen
class Distiller(Optimizer):
    """Train a smaller student on the teacher's outputs (soft or hard targets)."""

    name = "distill"
    kind = "distillation"
    summary = "knowledge distillation into a smaller student (soft or hard teacher targets)"

    student: str = option("shrink", help="'shrink', or a model spec building the student")
    ratio: float = option(0.25, min=0.001, max=1.0, searchable=(0.25, 0.5),
                          help="shrink: hidden widths scaled by this factor")
    round_to: int = option(1, min=1, help="shrink: round hidden widths to a multiple of this")
    mode: str = option("soft", choices=MODES, help="soft: KL on T-softened outputs; "
                                                   "hard: cross-entropy on the teacher's argmax")
    temperature: float = option(4.0, min=0.05, max=100.0, help="soft mode: temperature T")
    alpha: float = option(0.7, min=0.0, max=1.0,
                          help="weight of the teacher term; 1 - alpha goes to the labels")
    epochs: int = option(100, min=1, help="maximum training epochs")
    lr: float = option(3e-3, min=0.0, help="AdamW learning rate (cosine decay)")
    weight_decay: float = option(1e-4, min=0.0, help="AdamW weight decay")
    val_fraction: float = option(0.1, min=0.01, max=0.5,
                                 help="share of the calibration batches held out for validation")
    patience: int = option(15, min=1, help="early stopping: epochs without validation gain")

    def apply(self, model: Any, ctx: Any) -> Any:
        import torch

        from inferopt.plugins.distillation import training as dt
        from inferopt.utils import device_of, parameter_count

        teacher = model
        torch.manual_seed(ctx.seed)
        student = self._build_student(teacher, ctx)
        if ctx.restoring:
            return student.eval()
        data = ctx.data
        if data is None or not data.train:
            raise UsageError("step 'distill' needs training data; give --data (the run's "
                             "training split, else its calibration split, is what the student "
                             "learns from)")
        device = ctx.backend.device if ctx.backend is not None else device_of(teacher)
        self._check_compatible(teacher, student, data.train[0], device, ctx.output)
        cfg = dt.TrainConfig(self.mode, self.temperature, self.alpha, self.epochs, self.lr,
                             self.weight_decay, self.val_fraction, self.patience, ctx.seed,
                             ctx.output)
        from inferopt.utils import progress

        with progress(self.epochs, "distillation (epochs)") as advance:
            result = dt.train_student(student, teacher, list(data.train), cfg, device,
                                      ctx.log, progress=lambda _epoch, _total: advance(1))
        t_params, s_params = parameter_count(teacher), parameter_count(student)
        last = result.history[result.best_epoch - 1] if result.best_epoch else {}
        ctx.details.update({
            "summary": (f"student with {s_params:,} parameters ({s_params / t_params:.2%} of "
                        f"the teacher's {t_params:,}); {self.mode} targets, best epoch "
                        f"{result.best_epoch} of {result.epochs_run}, validation agreement "
                        f"with the teacher {last.get('val_teacher_agreement', 0):.2%}"),
            "student": self.student,
            "teacher_parameters": t_params,
            "student_parameters": s_params,
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss,
            "train_seconds": round(result.seconds, 2),
            "history": result.history[-5:],
            "training_data": "eval data (no separate split)" if data.train_is_eval
            else "calibration split" if data.train is data.calibration else "training split",
        })
        if data.train_is_eval:
            ctx.warn("distill: the data has no separate training split, so the student was "
                     "trained on the data it is measured on; accuracy will be optimistic")
        return student.eval()

    def _build_student(self, teacher: Any, ctx: Any) -> Any:
        import torch

        if self.student == "shrink":
            from inferopt.plugins.distillation.training import shrink

            return shrink(teacher, self.ratio, self.round_to)
        student = ctx.load_model(self.student, "option 'student'")
        if not isinstance(student, torch.nn.Module):
            raise UsageError(f"student {self.student!r} is not an nn.Module")
        return student

    def _check_compatible(self, teacher: Any, student: Any, batch: Any, device: Any,
                          output: str | None) -> None:
        import torch

        from inferopt.utils import call_model, move_to, primary_output

        inputs = move_to(batch.inputs, device)
        with torch.inference_mode():
            t = primary_output(call_model(teacher.to(device).eval(), inputs), output)
            try:
                s = primary_output(call_model(student.to(device).eval(), inputs), output)
            except Exception as exc:
                raise UsageError(f"the student ({self.student}) fails on the teacher's inputs: "
                                 f"{type(exc).__name__}: {exc}") from exc
        if t.shape != s.shape:
            raise UsageError(f"teacher outputs {tuple(t.shape)} but the student "
                             f"({self.student}) outputs {tuple(s.shape)}; they must match")
        if not t.is_floating_point() or t.dim() < 2 or t.shape[-1] < 2:
            raise UsageError(f"distill needs class logits [..., classes]; the teacher outputs "
                             f"{t.dtype} {tuple(t.shape)}")


@hookimpl
def inferopt_register_optimizers(register: Any) -> None:
    register(Distiller)
