"""``PATH.pt``, ``PATH.pth``, ``PATH.ts``: a model file written by ``torch.jit.save`` or
``torch.save``; what it holds decides what happens.

* TorchScript (``torch.jit.save``; the archive has compiled ``code/``): loaded with
  ``torch.jit.load``. Measuring works; techniques that swap layers cannot change compiled code
  and say so.
* A state dict (``torch.save(model.state_dict())``): read with ``weights_only=True``, but weights
  alone do not say how to build the model, so the error says how to give the code that does
  (``python:MODULE:CALLABLE:weights=PATH``).
* A pickled ``nn.Module`` (``torch.save(model)``): unpickling it runs whatever code the file
  names, so it is refused unless the user passes ``--trust-model`` (``trust_model = true`` in a
  recipe, ``trust_model=True`` in the API). Whether a file needs unpickling is found out with
  ``torch.load(weights_only=True)``, whose unpickler builds nothing but tensors and containers.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

from inferopt import UsageError, hookimpl
from inferopt.plugins.sources.model_file import ModelFileSource

SUFFIXES = (".pt", ".pth", ".ts")
TRUST_HINT = ("Loading it means unpickling, which runs code named in the file. Pass "
              "--trust-model (trust_model = true in a recipe, trust_model=True in the API) only "
              "if you trust where the file came from; or save the state dict instead and give "
              "--model python:MODULE:CALLABLE:weights=PATH")



def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save`` writes compiled code)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


def refusal_reason(exc: BaseException) -> str:
    """The line of a ``weights_only=True`` refusal that says what the file holds (torch's first
    line advises turning the safety off, which is not advice to pass on)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if "global" in line.lower()),
                lines[0] if lines else type(exc).__name__)


class TorchFileModels(ModelFileSource):
    """A TorchScript file, or a ``torch.save`` file holding a pickled ``nn.Module`` (only with
    ``--trust-model``)."""

    scheme = "torch"
    # TorchScript archives and pickled modules are code: a saved run naming one needs trust
    runs_code = True
    summary = ("PATH.pt/.pth/.ts: TorchScript; a pickled nn.Module only with --trust-model "
               "(state dicts: python:MODULE:CALLABLE:weights=PATH)")

    def claims(self, spec: str) -> bool:
        return spec.endswith(SUFFIXES)

    def load(self, spec: str, ctx: Any) -> Any:
        import torch

        path = self.existing_path(spec)
        if is_torchscript(path):
            try:
                model = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:
                raise UsageError(f"--model {spec!r}: torch.jit.load failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
            ctx.log.info("loaded TorchScript module", path=str(path))
            return model.eval()
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
            if not ctx.trust_model:
                reason = refusal_reason(exc)
                raise UsageError(
                    f"--model {spec!r} holds pickled Python objects, not only tensors "
                    f"(torch.load with weights_only=True refused: {reason[:200]}). {TRUST_HINT}"
                ) from None
            obj = None
        except Exception as exc:
            raise UsageError(f"--model {spec!r}: cannot read {str(path)!r} as a torch file: "
                             f"{type(exc).__name__}: {exc}") from exc
        if obj is not None:
            if isinstance(obj, dict):
                raise UsageError(
                    f"--model {spec!r} holds a state dict (weights only), which does not say how "
                    "to build the model. Give the code that builds it and the weights: --model "
                    f"python:MODULE:CALLABLE:weights={path} (or PATH.py:CALLABLE:weights={path})"
                )
            raise UsageError(f"--model {spec!r} holds a {type(obj).__name__}, not a model")
        ctx.log.warning("unpickling a model file the user trusts (--trust-model)", path=str(path))
        model = torch.load(str(path), map_location="cpu", weights_only=False)
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"--model {spec!r} unpickled to a {type(model).__name__}, not a "
                             "torch.nn.Module")
        return model.eval()


@hookimpl
def inferopt_register_models(register: Any) -> None:
    register(TorchFileModels)
