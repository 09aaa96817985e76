"""Saving and loading optimized models without pickle.

A run directory holds:

* ``model.safetensors``: the optimized model's weights and buffers;
* ``inferopt.json``: the manifest: model spec, steps with their options and saved state,
  plugin versions; :func:`load` rebuilds the module from it (load the original model source,
  re-apply each step's structural transform, load the weights);
* ``report.json``, ``report.md``: the report; ``recipe.json``: the resolved recipe.

The directory is written under a temporary name and renamed into place, so an interrupted run
never leaves a half-written model that :func:`load` would accept.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import options
from .contract import SourceContext, StepContext
from .errors import UsageError
from .logging import get_logger

if TYPE_CHECKING:
    import torch

    from .pipeline import RunContext
    from .report import Report

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
    out_dir: Path, model: torch.nn.Module, report: Report, ctx: RunContext, overwrite: bool
) -> None:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
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
                {"name": r.name, "options": r.options, "state": r.state, "plugin": r.plugin,
                 "distribution": r.distribution, "version": r.version}
                for r in report.steps if not r.failed  # undone by --keep-going
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
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "recipe.json").write_text(
            json.dumps({"recipe": report.recipe, "plugins": report.plugins}, indent=2) + "\n"
        )
        _plot_into(tmp, out_dir, report, ctx)
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        (tmp / "report.md").write_text(report.to_markdown())
        old = None
        if out_dir.exists():
            if any(out_dir.iterdir()) and not (overwrite and (out_dir / MANIFEST).is_file()):
                raise UsageError(f"{out_dir} appeared while the run was going; not overwriting it")
            # move the earlier run aside, put the new one in place, then delete the old one
            old = out_dir.with_name(f".{out_dir.name}.replaced-{tmp.name[-8:]}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        ctx.phase = "saved"  # from here on the new run is in place, whatever happens next
        if old is not None:
            try:
                shutil.rmtree(old, ignore_errors=True)
            except KeyboardInterrupt:  # finish removing the earlier run, then stop
                shutil.rmtree(old, ignore_errors=True)
                raise
    except BaseException:
        # interrupted between moving the earlier run aside and putting the new one in place:
        # put the earlier run back, so that nothing the user had is lost
        if old is not None and old.exists() and not out_dir.exists():
            old.rename(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _plot_into(tmp: Path, out_dir: Path, report: Report, ctx: RunContext) -> None:
    """``plot.png`` when matplotlib is installed; a failed plot costs the plot, not the run."""
    from . import plotting

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
    path: str | Path, model: torch.nn.Module | None = None, *, trust_model: bool = False
) -> torch.nn.Module:
    """Rebuild an optimized model saved by ``inferopt run`` (or :func:`save`) without pickle.

    ``model`` is needed only when the run started from an in-memory module: pass a fresh,
    un-optimized instance of the same architecture. ``trust_model`` must be given again when
    the run's model was a pickled file: the saved manifest never grants trust by itself.
    """
    import copy

    from safetensors.torch import load_file

    from .pipeline import resolve_model_source
    from .registry import load_plugins

    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file() or not (root / WEIGHTS).is_file():
        raise UsageError(
            f"{str(root)!r} is not a saved inferopt model (needs {MANIFEST} and {WEIGHTS}); "
            "give the directory an `inferopt run` wrote"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise UsageError(f"{manifest_path}: unknown format {manifest.get('format')!r}")
    log = get_logger(load=str(root))
    _manager, registry = load_plugins()
    if model is None:
        spec = manifest["model"]
        if spec.startswith("<"):
            raise UsageError(
                f"{str(root)!r} was optimized from an in-memory module; pass model=<a fresh "
                "instance of the same architecture> to inferopt.load"
            )
        source = resolve_model_source(registry, spec)
        sctx = SourceContext(log=log, batch_size=manifest.get("batch_size", 64),
                             seed=manifest.get("seed", 0), restoring=True,
                             trust_model=trust_model)
        model = source.obj().load(spec, sctx)
    else:
        model = copy.deepcopy(model)
    for i, step in enumerate(manifest["steps"], start=1):
        entry = registry.get("optimizer", step["name"])
        optimizer = options.build(entry.obj, step["options"], f"step {i} {step['name']!r}")
        ctx = StepContext(log=log.bind(step=i, optimizer=step["name"]), restoring=True,
                          state=dict(step.get("state") or {}), seed=manifest.get("seed", 0))
        model = optimizer.restore(model, ctx)
    state = load_file(str(root / WEIGHTS))
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


def _is_tied(model: torch.nn.Module, key: str, state: dict[str, Any]) -> bool:
    own = model.state_dict()
    target = own[key]
    ptr = target.untyped_storage().data_ptr()
    return any(
        k in state and v.untyped_storage().data_ptr() == ptr for k, v in own.items() if k != key
    )
