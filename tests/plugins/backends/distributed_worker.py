"""Run by the distributed tests under torchrun (2 gloo processes): the data-parallel and the
model-parallel backends on a small model, results written by rank 0 for the test to check.

    python -m torch.distributed.run --nproc-per-node 2 distributed_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from inferopt._contract import Batch, PrepareContext
from inferopt.plugins.backends.data_parallel import DataParallelBackend
from inferopt.plugins.backends.model_parallel import ModelParallelBackend


class IdRecorder(torch.nn.Module):
    """Passes its input through and remembers the sample ids (column 0) it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.extend(int(v) for v in x[:, 0])
        return x


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()


class TwoOutputs(torch.nn.Module):
    """small_model, returning its logits and their softmax (both made by the last stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = small_model()[:-1]
        self.head = small_model()[-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.head(self.body(x))
        return logits, logits.softmax(-1)


def batches() -> list[Batch]:
    """7 batches (the last one short), 0..N-1 ids in column 0."""
    torch.manual_seed(1)
    x = torch.randn(52, 16)
    x[:, 0] = torch.arange(52, dtype=torch.float32)
    return [Batch(part) for part in x.split(8)]


def main(out: Path) -> None:
    data = batches()
    dp = DataParallelBackend()
    recorder = IdRecorder()
    model = torch.nn.Sequential(recorder, small_model())
    outputs = dp.run_all(dp.prepare(model, PrepareContext()), data)
    seen = dp.gather(recorder.seen)
    result = {"rank": dp.rank, "world": dp.world_size, "seen": seen}
    mp_auto = ModelParallelBackend(microbatches=4)
    auto_prepared = mp_auto.prepare(small_model(), PrepareContext())
    auto_out = mp_auto.run_all(auto_prepared, data)
    mp_named = ModelParallelBackend(split=("4",), microbatches=2)
    named_prepared = mp_named.prepare(small_model(), PrepareContext())
    named_out = mp_named.run_all(named_prepared, data)
    mp_pair = ModelParallelBackend(split=("head",), microbatches=2)
    pair_out = mp_pair.run_all(mp_pair.prepare(TwoOutputs(), PrepareContext()), data)
    result["auto_split"] = auto_prepared.split_points
    result["named_split"] = named_prepared.split_points
    if dp.is_main:
        torch.save({"dp": torch.cat(outputs), "mp_auto": torch.cat(auto_out),
                    "mp_named": torch.cat(named_out),
                    "mp_pair_logits": torch.cat([o[0] for o in pair_out]),
                    "mp_pair_probs": torch.cat([o[1] for o in pair_out])},
                   out / "outputs.pt")
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
