"""``synthetic:shape=64x1024,...``: random data of a given shape, for models without data.

Good for speed and fidelity; accuracy on random labels means nothing, so labels are only made
when ``classes`` is given.
"""

from __future__ import annotations

from typing import Any

import attrs

from inferopt import Data, DataSource, UsageError, hookimpl, option
from inferopt.utils import build_options as build
from inferopt.utils import parse_spec

DTYPES = ("float32", "float16", "bfloat16", "int64", "int32")


@attrs.frozen
class SyntheticSpec:
    """Options of a synthetic data spec."""

    shape: str = option(help="batch shape, dimensions separated by x (first is the batch size)")
    dtype: str = option("float32", choices=DTYPES, help="element type; integers are token ids")
    batches: int = option(8, min=1, help="number of eval batches")
    seed: int = option(0, help="random seed")
    high: int = option(1000, min=1, help="exclusive upper bound of integer values (vocab size)")
    classes: int = option(0, min=0, help="make random labels in [0, classes) when > 0")

    def dims(self) -> tuple[int, ...]:
        try:
            dims = tuple(int(d) for d in self.shape.lower().split("x"))
        except ValueError:
            dims = ()
        if not dims or any(d < 1 for d in dims):
            raise UsageError(
                f"synthetic shape {self.shape!r}: write positive sizes separated by x, "
                "for example shape=64x1024 or shape=8x3x32x32"
            )
        return dims


class SyntheticData(DataSource):
    """Random batches of a given shape and dtype."""

    scheme = "synthetic"
    spec_options = SyntheticSpec
    summary = "random batches: synthetic:shape=64x1024[,dtype=...,batches=8,seed=0,classes=N]"

    def load(self, spec: str, ctx: Any) -> Data:
        import torch

        from inferopt import Batch

        parsed = parse_spec(spec, "--data")
        opts = build(SyntheticSpec, parsed.options, f"--data {spec!r}")
        dims = opts.dims()
        gen = torch.Generator().manual_seed(opts.seed)
        dtype = getattr(torch, opts.dtype)
        _check_fits(spec, dims, dtype.itemsize, 2 * opts.batches)

        def one() -> Batch:
            if dtype.is_floating_point:
                x = torch.randn(dims, generator=gen).to(dtype)
            else:
                x = torch.randint(0, opts.high, dims, generator=gen, dtype=dtype)
            y = (
                torch.randint(0, opts.classes, (dims[0],), generator=gen)
                if opts.classes
                else None
            )
            return Batch(inputs=x, labels=y)

        eval_batches = [one() for _ in range(opts.batches)]
        calibration = [one() for _ in range(opts.batches)]
        return Data(
            eval=eval_batches,
            calibration=calibration,
            description=f"synthetic {opts.dtype} batches of shape {dims}",
        )


def _check_fits(spec: str, dims: tuple[int, ...], itemsize: int, count: int) -> None:
    """Refuse, naming the spec, data that cannot fit in this machine's memory (rather than a
    bare allocation error, or the machine swapping itself to a halt)."""
    import math
    import os

    needed = math.prod(dims) * itemsize * count
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if needed > total // 2:
        raise UsageError(
            f"--data {spec!r}: {count} batches of shape {'x'.join(map(str, dims))} take "
            f"{needed / 2**30:.1f} GiB, more than half of this machine's memory "
            f"({total / 2**30:.1f} GiB); use a smaller shape or fewer batches")


@hookimpl
def inferopt_register_datasets(register: Any) -> None:
    register(SyntheticData)
