"""Saving and loading optimized models without pickle.

A run directory holds:

* ``model.safetensors``: the optimized model's weights and buffers;
* ``inferopt.json``: the manifest: model spec, steps with their options and saved state
  (with the ``Optimizer.version`` that wrote it), plugin versions; :func:`load` rebuilds the
  module from it (load the original model source, re-apply each step's structural transform,
  load the weights);
* ``report.json``, ``report.md``: the report; ``recipe.json``: the resolved recipe;
* ``backend/<role>/...``: what the backend saved while preparing each role's model
  (``PrepareContext.artifact_path``), listed in the report's ``artifacts["backend"]``.

The directory is written under a temporary name and renamed into place, so an interrupted run
never leaves a half-written model that :func:`load` would accept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from inferopt._contract import SourceContext, StepContext
from inferopt._errors import UsageError
from inferopt._logging import get_logger

from . import _options as options

if TYPE_CHECKING:
    import torch

    from inferopt._prepare import Preparer
    from inferopt._registry import Registry
    from inferopt._report import Report

class SavingRun(Protocol):
    """What saving needs of the run in progress (the pipeline's run context)."""

    recipe: Any
    model_source: Any
    log: Any
    phase: str


MANIFEST = "inferopt.json"
WEIGHTS = "model.safetensors"
FORMAT = "inferopt.model/1"


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights and buffers, deduplicated where tensors share storage (tied weights)."""
    state = model.state_dict(keep_vars=False)
    out: dict[str, Any] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident in seen and tensor.numel() > 0:
            continue
        seen[ident] = key
        out[key] = tensor.detach().contiguous().cpu()
    return out


def weights_bytes(model: torch.nn.Module) -> bytes:
    """The model's weights serialized as safetensors (what ``size`` measures)."""
    from safetensors.torch import save

    return save(state_dict_for_saving(model))


def save_model(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(state_dict_for_saving(model), str(path), metadata={"format": FORMAT})


def save_run(
    out_dir: Path, model: torch.nn.Module, report: Report, ctx: SavingRun, overwrite: bool,
    backend_artifacts: Preparer | None = None,
) -> None:
    from inferopt._run_dir import put_in_place, staging_dir

    out_dir = Path(out_dir)
    tmp = staging_dir(out_dir)
    old: Path | None = None
    try:
        save_model(model, tmp / WEIGHTS)
        manifest = {
            "format": FORMAT,
            "model": (ctx.model_source.obj().portable_spec(ctx.recipe.model)
                      if ctx.model_source is not None else ctx.recipe.model),
            "batch_size": ctx.recipe.batch_size,
            "seed": ctx.recipe.seed,
            "steps": [
                {"name": r.name, "options": r.options, "state": r.state,
                 "optimizer_version": r.optimizer_version, "plugin": r.plugin,
                 "distribution": r.distribution, "version": r.version}
                # undone by --keep-going, or skipped because the backend cannot run them
                for r in report.steps if not r.failed and not r.refused
            ],
        }
        report.artifacts = {
            "dir": str(out_dir),
            "model": str(out_dir / WEIGHTS),
            "manifest": str(out_dir / MANIFEST),
            "report": str(out_dir / "report.json"),
            "markdown": str(out_dir / "report.md"),
            "recipe": str(out_dir / "recipe.json"),
        }
        if backend_artifacts is not None:
            listing = backend_artifacts.move_into(tmp, out_dir)
            if listing:
                report.artifacts["backend"] = listing
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "recipe.json").write_text(
            json.dumps({"recipe": report.recipe, "plugins": report.plugins}, indent=2) + "\n"
        )
        _plot_into(tmp, out_dir, report, ctx)
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        (tmp / "report.md").write_text(report.to_markdown())
        if out_dir.exists() and any(out_dir.iterdir()) and not (
                overwrite and (out_dir / MANIFEST).is_file()):
            raise UsageError(f"{out_dir} appeared while the run was going; not overwriting it")
        # one atomic swap where the OS has it; a kill at any instant leaves the earlier run or
        # the new one in place, and whatever is left beside it is found by the next run
        old = put_in_place(tmp, out_dir)
        ctx.phase = "saved"  # from here on the new run is in place, whatever happens next
        if old is not None:
            try:
                shutil.rmtree(old, ignore_errors=True)
            except KeyboardInterrupt:  # finish removing the earlier run, then stop
                shutil.rmtree(old, ignore_errors=True)
                raise
    except BaseException:
        # the staging folder (unfinished, or the replaced earlier run after a swap) goes;
        # put_in_place has already put the earlier run back if it was interrupted midway
        if tmp.exists() and out_dir.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() and not (tmp / MANIFEST).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _plot_into(tmp: Path, out_dir: Path, report: Report, ctx: SavingRun) -> None:
    """``plot.png`` when matplotlib is installed; a failed plot costs the plot, not the run."""
    from . import _plotting as plotting

    if not plotting.available():
        return
    try:
        plotting.plot_reports([report.to_dict()], tmp / "plot.png",
                              f"inferopt run {report.run_id}")
    except Exception as exc:  # a plotting problem must never lose the saved model
        report.warnings.append(f"the plot could not be drawn: {exc!r}")
        ctx.log.warning("plot failed", error=repr(exc))
        return
    report.artifacts["plot"] = str(out_dir / "plot.png")


def load(
    path: str | Path, model: torch.nn.Module | None = None, *, trust_model: bool = False,
    registry: Registry | None = None,
) -> torch.nn.Module:
    """Rebuild an optimized model saved by ``inferopt run`` (or :func:`save`) without pickle.

    ``model`` is needed only when the run started from an in-memory module: pass a fresh,
    un-optimized instance of the same architecture. ``trust_model`` must be given again when
    the run's model (or a distillation student) is built by code (``python:``, ``PATH.py:``,
    a pickled file): the saved manifest never grants trust by itself, since anyone who can
    write to the run directory can edit it.

    Everything read from the directory is checked before it is used: the manifest's fields and
    types, that ``inferopt.json`` and ``model.safetensors`` are regular files inside the
    directory, and that every saved tensor has the dtype and shape of the rebuilt model's.
    ``registry`` holds the plugins to rebuild with (a Session's); default: the installed ones.
    A step saved by another ``Optimizer.version`` is restored with ``ctx.saved_version`` set, or
    refused when the optimizer does not read that version (:func:`unreadable_version`).
    """
    import copy

    from inferopt._registry import load_plugins
    from inferopt._sources import model_loader, resolve_saved_model_source

    root = Path(path)
    if not (root / MANIFEST).exists() or not (root / WEIGHTS).exists():
        raise UsageError(
            f"{str(root)!r} is not a saved inferopt model (needs {MANIFEST} and {WEIGHTS}); "
            "give the directory an `inferopt run` wrote"
        )
    manifest_path = _inside_run(root, MANIFEST)
    weights_path = _inside_run(root, WEIGHTS)
    manifest = read_manifest(manifest_path)
    where = str(root / MANIFEST)
    log = get_logger(load=str(root))
    if registry is None:
        _manager, registry = load_plugins()
    if model is None:
        spec = manifest["model"]
        if spec.startswith("<"):
            raise UsageError(
                f"{str(root)!r} was optimized from an in-memory module; pass model=<a fresh "
                "instance of the same architecture> to inferopt.load"
            )
        source = resolve_saved_model_source(registry, spec, f"{where}: field 'model'",
                                            trust_model=trust_model)
        sctx = SourceContext(log=log, batch_size=manifest["batch_size"],
                             seed=manifest["seed"], restoring=True, trust_model=trust_model)
        model = source.obj().load(spec, sctx)
    else:
        model = copy.deepcopy(model)
    for i, step in enumerate(manifest["steps"], start=1):
        what = f"{where}: steps[{i - 1}] ({step['name']!r})"
        try:
            entry = registry.get("optimizer", step["name"])
        except UsageError as exc:
            raise UsageError(f"{what}: {exc}") from exc
        refused = unreadable_version(entry.obj, step["optimizer_version"])
        if refused:
            raise UsageError(f"{what}: {refused}")
        optimizer = options.build(entry.obj, step["options"], f"{what} options")
        ctx = StepContext(log=log.bind(step=i, optimizer=step["name"]), restoring=True,
                          state=copy.deepcopy(step["state"]), seed=manifest["seed"],
                          trust_model=trust_model, saved_version=step["optimizer_version"],
                          model_loader=model_loader(registry, log, manifest["seed"], trust_model,
                                                    saved_run=""))  # "what" above names the file
        try:
            model = optimizer.restore(model, ctx)
        except UsageError as exc:
            raise UsageError(f"{what}: {exc}") from exc
        except Exception as exc:  # a saved state the step cannot rebuild from
            raise UsageError(
                f"{what}: the step could not be rebuilt from its saved options and state "
                f"({type(exc).__name__}: {exc}); was the run directory edited, or the plugin "
                "that saved it changed?"
            ) from exc
    state = _read_weights(weights_path)
    _check_saved_tensors(model, state, weights_path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights were saved once; anything else missing means the structure differs
    missing = [k for k in missing if not _is_tied(model, k, state)]
    if missing or unexpected:
        raise UsageError(
            f"{str(root)!r}: the rebuilt model does not match the saved weights "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}); were the plugins that "
            "saved it upgraded or removed?"
        )
    return model.eval()


def unreadable_version(cls: Any, saved: int) -> str | None:
    """Why optimizer class ``cls`` cannot restore a state saved by its version ``saved``, or
    None when it can: ``cls.reads_versions`` lists what it reads (None: 1 to ``cls.version``;
    a version newer than the installed optimizer is never one it can know)."""
    current = getattr(cls, "version", 1)
    readable = getattr(cls, "reads_versions", None)
    if saved in (readable if readable is not None else range(1, current + 1)):
        return None
    reads = (", ".join(str(v) for v in sorted(readable)) if readable is not None
             else f"1 to {current}")
    advice = ("install the plugin version that saved the run" if saved > current
              else "run the optimization again, or load it with the plugin version that saved it")
    return (f"saved by version {saved} of optimizer {getattr(cls, 'name', cls.__name__)!r}, but "
            f"the installed optimizer is version {current} and reads versions {reads}; {advice}")


def _inside_run(root: Path, name: str) -> Path:
    """``root / name`` resolved, refused unless it is a regular file inside ``root`` (a symlink
    pointing out of the run directory could make :func:`load` read any file)."""
    import stat

    path = root / name
    try:
        resolved = path.resolve(strict=True)
        inside = resolved.is_relative_to(root.resolve(strict=True))
        regular = stat.S_ISREG(resolved.stat().st_mode)
    except (OSError, RuntimeError) as exc:  # a dangling or looping symlink
        raise UsageError(f"{str(path)!r} cannot be read: {exc}") from exc
    if not inside:
        raise UsageError(
            f"{str(path)!r} is a link to {str(resolved)!r}, outside the run directory; a saved "
            "run's files must be inside it. Copy the file in if you trust it"
        )
    if not regular:
        raise UsageError(f"{str(path)!r} is not a regular file")
    return resolved


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest at ``path``, checked field by field: every problem is a :class:`UsageError`
    naming the file and the field. Optional fields get their defaults filled in."""
    shown = str(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise UsageError(f"{shown}: not a readable JSON manifest ({exc})") from exc

    def bad(field: str, problem: str) -> UsageError:
        return UsageError(f"{shown}: field {field!r} {problem}; was the file edited? Save the "
                          "model again with `inferopt run`")

    if not isinstance(doc, dict):
        raise UsageError(f"{shown}: the manifest must be a JSON object, not "
                         f"{type(doc).__name__}")
    if "format" not in doc:
        raise bad("format", "is missing")
    if doc["format"] != FORMAT:
        raise UsageError(f"{shown}: unknown format {doc['format']!r} (field 'format'; this "
                         f"version reads {FORMAT!r})")
    if not isinstance(doc.get("model"), str) or not doc["model"]:
        raise bad("model", "must be a non-empty string (the model spec)"
                  if "model" in doc else "is missing")
    for field, default, low in (("batch_size", 64, 1), ("seed", 0, 0)):
        value = doc.setdefault(field, default)
        if not _is_int(value) or value < low:
            raise bad(field, f"must be an integer >= {low}, not {value!r}")
    steps = doc.get("steps")
    if not isinstance(steps, list):
        raise bad("steps", "must be a list" if "steps" in doc else "is missing")
    for i, step in enumerate(steps):
        field = f"steps[{i}]"
        if not isinstance(step, dict):
            raise bad(field, f"must be an object, not {type(step).__name__}")
        if not isinstance(step.get("name"), str) or not step["name"]:
            raise bad(f"{field}.name", "must be a non-empty string (the optimizer's name)"
                      if "name" in step else "is missing")
        for key in ("options", "state"):
            if step.get(key) is None:
                step[key] = {}
            elif not isinstance(step[key], dict):
                raise bad(f"{field}.{key}", f"must be an object, not {type(step[key]).__name__}")
        # runs saved before optimizers had versions hold version 1's state
        version = step.setdefault("optimizer_version", 1)
        if not _is_int(version) or version < 1:
            raise bad(f"{field}.optimizer_version", f"must be an integer >= 1, not {version!r}")
    return doc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' own error type for a truncated or edited file
        raise UsageError(f"{str(path)!r} is not a readable safetensors file: "
                         f"{type(exc).__name__}: {exc}") from exc


def _check_saved_tensors(model: torch.nn.Module, state: dict[str, torch.Tensor],
                         path: Path) -> None:
    """Every saved tensor must have the dtype and shape of the rebuilt model's: ``load_state_dict``
    would otherwise cast silently (a float 300.0 loaded into an int8 weight wraps to 44)."""
    own = model.state_dict()
    for key, saved in state.items():
        expected = own.get(key)
        if expected is None:
            continue  # reported as unexpected by the caller
        if saved.dtype != expected.dtype or saved.shape != expected.shape:
            raise UsageError(
                f"{str(path)!r}: tensor {key!r} is saved as {saved.dtype} "
                f"{tuple(saved.shape)} but the rebuilt model holds {expected.dtype} "
                f"{tuple(expected.shape)}; the weights do not belong to this model and its "
                "saved steps (was the run directory edited?)"
            )


def _is_tied(model: torch.nn.Module, key: str, state: dict[str, Any]) -> bool:
    own = model.state_dict()
    target = own[key]
    ptr = target.untyped_storage().data_ptr()
    return any(
        k in state and v.untyped_storage().data_ptr() == ptr for k, v in own.items() if k != key
    )
