"""The ``model-parallel`` backend: the model cut into stages, each on its own device or process,
with micro-batches flowing through them as a pipeline.

Two ways to run, chosen by how inferopt was started:

* under ``torchrun --nproc-per-node N``: one stage per process, built and run by
  ``torch.distributed.pipelining`` (the tracer ``pipeline()`` cuts the model, ``ScheduleGPipe``
  runs the micro-batches; gloo between CPU processes, NCCL between GPUs). The last stage's output
  is broadcast so that every process sees it (as plain tensors once its shapes are known);
* in one process with ``devices=cuda:0|cuda:1`` (or ``cpu|cpu``): the same cut, each stage
  moved to its device, one thread per micro-batch, and a stage works on one micro-batch at a
  time; ``microbatches=1`` is the device-map style split where one stage works at a time.

Stage boundaries are module names (``split=encoder.layers.6``) or chosen to balance parameters
or measured time. The traced stages are specialised to a micro-batch shape, so each distinct
input shape is traced once and cached.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import attrs

from inferopt import Backend, PrepareContext, UsageError, hookimpl, option
from inferopt.plugins.backends import process_group

MODES_HELP = (
    "launch one process per stage with torchrun --nproc-per-node N -m inferopt run "
    "--backend model-parallel ..., or give in-process devices, e.g. "
    "model-parallel:devices=cuda:0|cuda:1 (or cpu|cpu)"
)


def microbatch_count(batch: int, wanted: int) -> int:
    """The largest count up to ``wanted`` that divides the batch into equal micro-batches."""
    return max(d for d in range(1, min(wanted, batch) + 1) if batch % d == 0)


def split_inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


def _microbatch(obj: Any, count: int, index: int) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.tensor_split(count)[index]
    if isinstance(obj, dict):
        return {k: _microbatch(v, count, index) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_microbatch(v, count, index) for v in obj)
    return obj


def _concat(parts: list[Any]) -> Any:
    import torch

    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, tuple | list):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    raise UsageError(
        f"model-parallel needs a model that returns tensors (or tuples/dicts of them); "
        f"it returned {type(first).__name__}")


def _plain(obj: Any) -> Any:
    """A copy usable outside inference mode (tracing cannot take inference tensors)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _only_tensors(obj: Any) -> bool:
    """Whether ``obj`` is a tensor, or tuples/lists/dicts of nothing but tensors."""
    import torch

    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, dict):
        return all(_only_tensors(v) for v in obj.values())
    if type(obj) in (tuple, list):
        return all(_only_tensors(v) for v in obj)
    return False


def _restructure(out: Any, spec: Any) -> Any:
    """The stages' flat outputs in the structure the unsplit model returns."""
    from torch.utils._pytree import tree_unflatten

    leaves = list(out) if type(out) in (tuple, list) else [out]
    if len(leaves) != spec.num_leaves:
        raise UsageError(
            f"model-parallel: the model returns {spec.num_leaves} tensor(s) but its last stage "
            f"gives {len(leaves)}; outputs made by an earlier stage (a hidden state returned "
            "alongside the logits) cannot be passed on. Return only what the last layers make, "
            "or use data-parallel")
    return tree_unflatten(leaves, spec)


def _empty_like(template: Any) -> Any:
    """Fresh tensors of the template's shapes and dtypes, in the template's structure."""
    import torch

    if isinstance(template, torch.Tensor):
        return torch.empty_like(template)
    if isinstance(template, dict):
        return {k: _empty_like(v) for k, v in template.items()}
    return type(template)(_empty_like(v) for v in template)


def _check_like(out: Any, template: Any) -> None:
    if _signature(out) != _signature(template) or not _only_tensors(out):
        # every other process is about to receive tensors of the template's shapes; this
        # worker failing makes torchrun stop them all rather than leave them waiting
        raise RuntimeError(
            "model-parallel: the last stage's output changed structure or shape between two "
            f"batches of the same input shape ({_signature(template)} -> {_signature(out)}); "
            "the traced stages should make it fixed")


def _signature(inputs: Any) -> tuple[Any, ...]:
    from inferopt.utils import iter_tensors

    return tuple((tuple(t.shape), t.dtype) for t in iter_tensors(inputs))


def trace_stages(model: Any, example_microbatch: Any, split_points: list[str]) -> Any:
    """``torch.distributed.pipelining.pipeline`` on a copy of ``model`` (the tracer marks the
    split modules in place), cut at the beginning of each split point."""
    import torch
    from torch.distributed.pipelining import SplitPoint, pipeline

    args, kwargs = split_inputs(example_microbatch)
    with torch.inference_mode(False):
        args, kwargs = _plain(args), _plain(kwargs)
        try:
            return pipeline(
                copy.deepcopy(model), mb_args=args, mb_kwargs=kwargs or None,
                split_spec={name: SplitPoint.BEGINNING for name in split_points},
            )
        except Exception as exc:
            raise UsageError(
                f"torch.distributed.pipelining could not trace the model at split points "
                f"{split_points}: {type(exc).__name__}: {str(exc)[:400]}. The model must be "
                "traceable by torch.export; try other split points") from exc


class StagedModel:
    """A model prepared for model-parallel runs: the whole model (for tracing and for the
    report), the split points once chosen, and the traced pipeline per input shape."""

    def __init__(self, model: Any, backend: ModelParallelBackend) -> None:
        self.model = model
        self.backend = backend
        self.split_points: list[str] | None = None
        self.runners: dict[Any, Any] = {}
        self.output_spec: Any = None  # the unsplit model's output structure (a pytree spec)
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs: Any = kwargs if kwargs else (args[0] if len(args) == 1 else args)
        return self.backend.run_staged(self, inputs)

    # the pipeline hands prepared models to metrics, which may ask for these
    def parameters(self) -> Any:
        return self.model.parameters()

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.state_dict(*args, **kwargs)

    def eval(self) -> StagedModel:
        return self


@attrs.frozen
class ModelParallelBackend(process_group.SeveralWorkers, Backend):
    """Cut the model into stages on several devices or processes and pipeline micro-batches
    through them (``torch.distributed.pipelining`` under torchrun; threads in one process)."""

    name = "model-parallel"
    summary = "pipeline stages across processes (torchrun) or devices, with micro-batches"

    split: tuple[str, ...] = option(
        (), help="module names where a new stage begins (| between names); empty: chosen "
                 "automatically to balance the stages")
    balance: str = option("params", choices=("params", "time"),
                          help="what automatic split points balance: parameters or measured time")
    microbatches: int = option(4, min=1, help="micro-batches per batch (1: no pipelining)")
    device_type: str = option(
        "cpu", choices=("cpu", "cuda"),
        help="under torchrun: CPU processes (gloo) or one GPU per process (NCCL)")
    timeout_s: float = option(
        process_group.DEFAULT_TIMEOUT_S, min=1.0,
        help="under torchrun: seconds a worker waits for the others before the run fails")
    devices: tuple[str, ...] = option(
        (), help="in one process: a device per stage, e.g. cuda:0|cuda:1 or cpu|cpu")

    # --- where it runs ------------------------------------------------------------------

    def available(self) -> str | None:
        return process_group.setup_problem(
            self.distributed, self.devices, self.device_type,
            "each process runs one stage on device=cpu or device=cuda",
            f"it needs at least two stages: {MODES_HELP}")

    @property
    def stages(self) -> int:
        return self.world_size if self.distributed else len(self.devices)

    def synchronize(self) -> None:
        import torch

        for dev in {self.device, *self.devices}:
            if str(dev).startswith("cuda"):
                torch.cuda.synchronize(dev)

    def gather(self, obj: Any) -> list[Any]:
        if self.distributed and self.world_size > 1:
            return process_group.all_gather_objects(obj)
        return [obj]

    def aggregate(self, metric: Any, result: dict[str, Any]) -> dict[str, Any]:
        # every process ran the same batches through the same pipeline; the report shows
        # what the first stage's process measured, on every worker alike
        if self.distributed and self.world_size > 1:
            return dict(process_group.broadcast_object(result, src=0))
        return result

    def prepare(self, model: Any, ctx: PrepareContext) -> Any:
        self.rank  # noqa: B018 (joins the process group now, before any tracing)
        return StagedModel(model.to("cpu").eval(), self)  # stages move when traced

    def forward(self, prepared: Any, inputs: Any) -> Any:
        return self.run_staged(prepared, inputs)

    # --- cutting and running ------------------------------------------------------------

    def choose_split_points(self, staged: StagedModel, inputs: Any) -> list[str]:
        import torch

        from inferopt.plugins.backends import stage_split
        from inferopt.utils import call_model

        model = staged.model
        example = _plain(inputs)

        def run() -> None:
            with torch.inference_mode():
                call_model(model, example)

        calls = stage_split.profile_calls(model, run, repeats=3 if self.balance == "time" else 1)
        if self.split:
            names = stage_split.order_split_points(model, self.split, calls)
            if len(names) + 1 != self.stages:
                where = (f"torchrun started {self.stages} processes" if self.distributed
                         else f"devices= lists {self.stages} devices")
                raise UsageError(
                    f"split= gives {len(names)} split point(s), which make {len(names) + 1} "
                    f"stages, but {where}; give {self.stages - 1} split point(s)")
            return names
        return stage_split.choose_split_points(calls, self.stages, self.balance)

    def run_staged(self, staged: StagedModel, inputs: Any) -> Any:
        with staged.lock:
            if staged.split_points is None:
                names = self.choose_split_points(staged, inputs)
                if self.distributed and self.world_size > 1:
                    # measured times differ between processes: the first one decides
                    names = process_group.broadcast_object(names, src=0)
                staged.split_points = names
            key = _signature(inputs)
            runner = staged.runners.get(key)
            if runner is None:
                from inferopt.utils import first_tensor

                batch = int(first_tensor(inputs).shape[0])
                count = microbatch_count(batch, self.microbatches)
                from inferopt.utils import move_to

                example = move_to(_microbatch(inputs, count, 0), "cpu")
                pipe = trace_stages(staged.model, example, staged.split_points)
                if staged.output_spec is None:
                    import torch
                    from torch.utils._pytree import tree_flatten

                    from inferopt.utils import call_model

                    with torch.inference_mode():
                        out = call_model(staged.model, example)
                    # the stages hand back a flat tuple; the model's own structure (a tensor,
                    # a dict of logits and hidden states, ...) is put back from this
                    staged.output_spec = tree_flatten(out)[1]
                build = self._build_distributed if self.distributed else self._build_local
                runner = staged.runners[key] = build(pipe, count)
        return _restructure(runner(inputs), staged.output_spec)

    def _build_distributed(self, pipe: Any, count: int) -> Any:
        import torch
        from torch.distributed.pipelining import ScheduleGPipe

        from inferopt.utils import iter_tensors, move_to

        rank, world = self.rank, self.world_size
        if pipe.num_stages != world:
            raise UsageError(
                f"the split made {pipe.num_stages} stages but torchrun started {world} "
                "processes; each process runs one stage")
        device = torch.device(self.device)
        stage = pipe.build_stage(rank, device)
        schedule = ScheduleGPipe(stage, count)
        last = world - 1

        # the output lives on the last stage; every process needs it to measure alike. The
        # traced stages are specialised to this input shape, so the output's structure,
        # shapes and dtypes are the same on every call: the first call sends it pickled and
        # keeps it as a template, later calls send only the tensors (one collective each,
        # straight into buffers allocated from the template, no pickling)
        template: list[Any] = []

        def run(inputs: Any) -> Any:
            with process_group.collective("the pipeline's hand-off between stages"):
                if rank == 0:
                    args, kwargs = split_inputs(move_to(inputs, device))
                    out = schedule.eval(*args, **kwargs)
                else:
                    out = schedule.eval()
            if not template:
                out = move_to(process_group.broadcast_object(
                    move_to(out, "cpu") if rank == last else None, src=last), device)
                template.append(out if _only_tensors(out) else None)
                return out
            if template[0] is None:  # non-tensor parts: only pickling carries them
                return move_to(process_group.broadcast_object(
                    move_to(out, "cpu") if rank == last else None, src=last), device)
            if rank == last:
                _check_like(out, template[0])
                process_group.broadcast_tensors(
                    [t.contiguous() for t in iter_tensors(out)], src=last)
            else:
                out = _empty_like(template[0])
                process_group.broadcast_tensors(list(iter_tensors(out)), src=last)
            return out

        return run

    def _build_local(self, pipe: Any, count: int) -> Any:
        import torch

        from inferopt.utils import move_to

        busy = [threading.Lock() for _ in range(pipe.num_stages)]
        for i, device in enumerate(self.devices):
            module = pipe.get_stage_module(i).to(device)
            module.register_forward_pre_hook(_enter_stage(busy[i], device), with_kwargs=True)
            module.register_forward_hook(_leave_stage(busy[i]), always_call=True)

        placeholders = [n.target for n in pipe.split_gm.graph.nodes if n.op == "placeholder"]

        def one(microbatch: Any) -> Any:
            args, kwargs = split_inputs(microbatch)
            if kwargs:
                args = tuple(kwargs[name] for name in placeholders if name in kwargs)
            # a fresh interpreter per micro-batch: Pipe's own keeps its values on itself, so
            # threads cannot share it
            with torch.inference_mode():
                return torch.fx.Interpreter(pipe.split_gm).run(*args)

        def run(inputs: Any) -> Any:
            parts = [_microbatch(inputs, count, i) for i in range(count)]
            if count == 1:
                outs = [one(parts[0])]
            else:
                results: list[Any] = [None] * count
                errors: list[BaseException] = []

                def work(i: int) -> None:
                    try:
                        results[i] = one(parts[i])
                    except BaseException as exc:  # re-raised in the caller's thread
                        errors.append(exc)

                threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if errors:
                    raise errors[0]
                outs = results
            return move_to(_concat(outs), self.devices[-1])

        return run

    def describe(self) -> dict[str, Any]:
        import torch

        facts: dict[str, Any] = {
            "backend": self.name,
            "mode": "torchrun" if self.distributed else "in-process",
            "stages": self.stages,
            "microbatches": self.microbatches,
            "split": list(self.split) or f"automatic ({self.balance})",
            "threads_per_process": torch.get_num_threads(),
        }
        if self.distributed:
            facts["process_group"] = process_group.join(self.device_type).get_backend()
            facts["device"] = self.device
        else:
            facts["devices"] = list(self.devices)
        return facts


def _enter_stage(busy: threading.Lock, device: str) -> Any:
    from inferopt.utils import move_to

    def hook(_module: Any, args: Any, kwargs: Any) -> Any:
        busy.acquire()  # one micro-batch in a stage at a time, as on a real device
        return move_to(args, device), move_to(kwargs, device)

    return hook


def _leave_stage(busy: threading.Lock) -> Any:
    def hook(_module: Any, _args: Any, _out: Any) -> None:
        busy.release()

    return hook


@hookimpl
def inferopt_register_backends(register: Any) -> None:
    register(ModelParallelBackend)
