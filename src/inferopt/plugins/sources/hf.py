"""``hf:PATH_OR_ID``: a Hugging Face transformers model (needs ``pip install 'inferopt[hf]'``).

A local directory (what ``save_pretrained`` writes) is loaded offline (``local_files_only``);
a hub id goes through transformers' own resolution (its cache, then the hub when there is a
network). The class is the one the checkpoint's config names (``architectures``), so a
sequence classifier keeps its head; ``class=AutoModel`` (or any transformers class name) picks
another. Weights are read as transformers reads them (safetensors by default; it refuses
pickled ``.bin`` weights unless told otherwise). ``trust_remote_code`` is always False: a
checkpoint whose config points at its own modelling code is refused, so ``hf:`` is a data-only
source and a saved run of it loads without ``trust_model``.

The model's tokenizer, when the checkpoint has one, is handed to the data source, so that
``--data text:FILE`` turns lines of text into ``input_ids``/``attention_mask`` batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from inferopt import ModelSource, UsageError, hookimpl, option
from inferopt.utils import build_options as build
from inferopt.utils import parse_target_spec

INSTALL_HINT = "install the extra: pip install 'inferopt[hf]'"


@attrs.frozen
class HfSpec:
    """Options of an ``hf:`` model spec."""

    cls: str = option("", key="class", help="transformers class to load with (default: the "
                                            "config's architecture, else AutoModel)")


def import_transformers(spec: str, flag: str = "--model") -> Any:
    try:
        import transformers
    except ImportError:
        raise UsageError(f"{flag} {spec!r} needs Hugging Face transformers; "
                         f"{INSTALL_HINT}") from None
    return transformers


def _options(spec: str) -> tuple[str, HfSpec]:
    target, raw = parse_target_spec(spec, "hf", "--model")
    return target, build(HfSpec, raw, f"--model {spec!r}")


def load_tokenizer(target: str, spec: str, local: bool, flag: str) -> Any:
    transformers = import_transformers(spec, flag)
    return transformers.AutoTokenizer.from_pretrained(target, local_files_only=local,
                                                      trust_remote_code=False)


class HuggingFaceModels(ModelSource):
    """A transformers model from a local directory (offline) or a hub id."""

    scheme = "hf"
    spec_options = HfSpec
    # config.json and safetensors weights, read with trust_remote_code=False: a checkpoint's
    # own modelling code (auto_map) is never imported
    runs_code = False
    summary = "Hugging Face transformers: hf:DIR or hf:ORG/NAME[:class=AutoModel] (extra [hf])"

    def portable_spec(self, spec: str) -> str:
        target, _raw = parse_target_spec(spec, "hf", "--model")
        if Path(target).is_dir():
            return spec.replace(target, str(Path(target).resolve()), 1)
        return spec

    def default_data(self, spec: str) -> str | None:
        """Random token ids within the model's vocabulary, when its config says how big."""
        target, _raw = parse_target_spec(spec, "hf", "--model")
        config = Path(target) / "config.json"
        if config.is_file():
            vocab = json.loads(config.read_text()).get("vocab_size")
            if isinstance(vocab, int) and vocab > 0:
                return f"synthetic:shape=8x32,dtype=int64,high={vocab}"
        return None

    def load(self, spec: str, ctx: Any) -> Any:
        target, opts = _options(spec)
        transformers = import_transformers(spec)
        local = Path(target).expanduser().is_dir()
        if local:
            target = str(Path(target).expanduser())
        elif target.startswith((".", "/", "~")) or target.count("/") > 1:
            raise UsageError(f"--model {spec!r}: directory {target!r} does not exist; give the "
                             "folder save_pretrained wrote, or a hub id ORG/NAME")
        try:
            config = transformers.AutoConfig.from_pretrained(target, local_files_only=local,
                                                             trust_remote_code=False)
        except Exception as exc:
            raise UsageError(
                f"--model {spec!r}: transformers cannot read a config for {target!r}: "
                f"{type(exc).__name__}: {str(exc)[:300]}. Give a directory written by "
                "save_pretrained (this machine may have no network to reach the hub)"
            ) from exc
        name = opts.cls or next(
            (a for a in (config.architectures or []) if hasattr(transformers, a)), "AutoModel")
        model_class = getattr(transformers, name, None)
        if model_class is None or not hasattr(model_class, "from_pretrained"):
            raise UsageError(f"--model {spec!r}: transformers has no model class {name!r}; "
                             "give class=AutoModel, class=AutoModelForSequenceClassification, ...")
        try:
            model = model_class.from_pretrained(target, local_files_only=local,
                                                trust_remote_code=False)
        except Exception as exc:
            raise UsageError(f"--model {spec!r}: loading {name} from {target!r} failed: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        try:
            ctx.tokenizer = load_tokenizer(target, spec, local, "--model")
        except Exception as exc:  # a model without a tokenizer still runs on token ids
            ctx.log.info("no tokenizer with the model", reason=f"{type(exc).__name__}: {exc}")
        ctx.log.info("loaded transformers model", model=name, path=target,
                     tokenizer=type(ctx.tokenizer).__name__ if ctx.tokenizer else None)
        return model.eval()


@hookimpl
def inferopt_register_models(register: Any) -> None:
    register(HuggingFaceModels)
