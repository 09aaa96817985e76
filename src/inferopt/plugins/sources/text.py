"""``text:FILE``: raw text, one example per line, tokenized for a language model.

The tokenizer is the model's own (an ``hf:`` model hands it over), or ``tokenizer=DIR`` names
one. Every line is cut to ``max_length`` tokens and all are padded to the longest one kept, so
every batch has the same shape (and latency compares like with like): batches are dicts of
``input_ids``, ``attention_mask`` and whatever else the tokenizer returns for the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from inferopt import Data, DataSource, UsageError, hookimpl, option
from inferopt.utils import build_options as build
from inferopt.utils import parse_target_spec


@attrs.frozen
class TextSpec:
    """Options of a ``text:`` data spec."""

    max_length: int = option(128, min=1, help="cut each line to this many tokens")
    tokenizer: str = option("", help="a tokenizer directory (default: the model's tokenizer)")


class TextLines(DataSource):
    """Lines of a text file, tokenized into ``input_ids``/``attention_mask`` batches."""

    scheme = "text"
    spec_options = TextSpec
    summary = "text:FILE[:max_length=128,tokenizer=DIR]: one example per line, tokenized"

    def load(self, spec: str, ctx: Any) -> Data:
        from inferopt import Batch

        target, raw = parse_target_spec(spec, "text", "--data")
        opts = build(TextSpec, raw, f"--data {spec!r}")
        path = Path(target).expanduser()
        if not path.is_file():
            raise UsageError(f"--data {spec!r}: file {str(path)!r} does not exist")
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError as exc:
            raise UsageError(f"--data {spec!r}: {str(path)!r} is not UTF-8 text: {exc}") from None
        lines = [line for line in lines if line]
        if not lines:
            raise UsageError(f"--data {spec!r}: {str(path)!r} has no non-empty line")
        tokenizer = self._tokenizer(spec, opts, ctx)
        if getattr(tokenizer, "pad_token", None) is None:
            # GPT-style tokenizers have no pad token; the attention mask hides padding anyway
            fill = getattr(tokenizer, "eos_token", None) or getattr(tokenizer, "unk_token", None)
            if fill is None:
                raise UsageError(f"--data {spec!r}: the tokenizer has no pad, end or unknown "
                                 "token to pad lines with; give tokenizer=DIR with one")
            tokenizer.pad_token = fill
        lengths = tokenizer(lines, truncation=True, max_length=opts.max_length)["input_ids"]
        longest = max(len(ids) for ids in lengths)
        encoded = tokenizer(lines, padding="max_length", truncation=True, max_length=longest,
                            return_tensors="pt")
        columns = {k: v for k, v in dict(encoded).items() if hasattr(v, "shape")}
        batches = [
            Batch(inputs={k: v[i:i + ctx.batch_size] for k, v in columns.items()})
            for i in range(0, len(lines), ctx.batch_size)
        ]
        return Data(eval=batches, description=(
            f"{len(lines)} lines of {path.name}, tokenized to {longest} tokens "
            f"({type(tokenizer).__name__})"))

    def _tokenizer(self, spec: str, opts: TextSpec, ctx: Any) -> Any:
        if opts.tokenizer:
            from inferopt.plugins.sources.hf import load_tokenizer

            folder = Path(opts.tokenizer).expanduser()
            try:
                return load_tokenizer(str(folder), spec, folder.is_dir(), "--data")
            except UsageError:
                raise
            except Exception as exc:
                raise UsageError(f"--data {spec!r}: cannot load tokenizer {opts.tokenizer!r}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        if ctx.tokenizer is None:
            raise UsageError(
                f"--data {spec!r}: text needs a tokenizer, and the model has none. Use a model "
                "that comes with one (--model hf:DIR) or name one: "
                f"--data text:{spec.removeprefix('text:')}:tokenizer=DIR"
            )
        return ctx.tokenizer


@hookimpl
def inferopt_register_datasets(register: Any) -> None:
    register(TextLines)
