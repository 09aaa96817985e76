"""hf: transformers models from a local folder, fed raw text through their own tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import inferopt

transformers = pytest.importorskip("transformers")

WORDS = "the a cat dog sat on mat ran fast slow big small red blue is was and".split()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BertModel and a BertTokenizer from a word list, saved as save_pretrained does:
    built here from a config, nothing downloaded."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizer(vocab_file=str(vocab))
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=64,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def sentences(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),),
                                                           generator=gen))
             for n in torch.randint(3, 15, (24,), generator=gen)]
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(lines) + "\n\n")
    return path


def test_encoder_on_text_reports_fidelity_and_speedup(cli, tmp_path, tiny_bert, sentences):
    result = cli("run", "--model", f"hf:{tiny_bert}", "--data", f"text:{sentences}",
                 # smooth=0, activations=per-row: the fresh copy below has no calibration data
                 # to choose them with
                 "--optimize", "int8:smooth=0,activations=per-row", "--metric", "fidelity",
                 "--metric", "latency:min_runs=3,min_seconds=0,warmup=1", "--batch-size", "8",
                 "--out", "bert")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bert" / "report.json").read_text())
    fidelity = report["optimized"]["metrics"]["fidelity"]
    assert fidelity["samples"] == 24 and fidelity["cosine"] > 0.99
    assert report["verdict"]["speedup"] > 0
    assert "speedup" in result.stdout or "faster" in result.stdout or "slower" in result.stdout
    quantized = report["steps"][0]["details"]["quantized"]
    assert "encoder.layer.0.attention.self.query" in quantized
    # rebuilt from the folder, offline, with the int8 layers: same outputs as a fresh int8
    reloaded = inferopt.load(tmp_path / "bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    batch = dict(tokenizer(["the cat sat on the mat"], return_tensors="pt"))
    fresh = inferopt.apply(transformers.AutoModel.from_pretrained(tiny_bert).eval(), "int8",
                           smooth=0, activations="per-row")
    with torch.inference_mode():
        assert torch.equal(reloaded(**batch).last_hidden_state,
                           fresh(**batch).last_hidden_state)


def test_text_batches_are_padded_token_ids(tiny_bert, sentences):
    from inferopt._contract import SourceContext
    from inferopt._logging import get_logger
    from inferopt.plugins.sources.text import TextLines

    ctx = SourceContext(log=get_logger(), batch_size=10)
    data = TextLines().load(f"text:{sentences}:max_length=8,tokenizer={tiny_bert}", ctx)
    assert [b.size for b in data.eval] == [10, 10, 4]  # the blank line is skipped
    first = data.eval[0].inputs
    assert {"input_ids", "attention_mask"} <= set(first)
    assert first["input_ids"].shape == (10, 8) and first["input_ids"].dtype == torch.long


def test_pooler_output_can_be_compared_instead(cli, tmp_path, tiny_bert, sentences):
    result = cli("run", "--model", f"hf:{tiny_bert}", "--data", f"text:{sentences}",
                 "--output", "pooler_output", "--optimize", "none", "--metric", "fidelity",
                 "--out", "pooled", "--json")
    assert result.returncode == 0, result.stderr
    # the same model twice: equal up to the CPU's rounding (kernels differ between machines;
    # an AVX-512 machine gave 0.9999999205 here)
    assert json.loads(result.stdout)["optimized"]["metrics"]["fidelity"]["cosine"] > 0.99999


def test_text_data_without_a_tokenizer_says_what_to_do(cli, tmp_path, sentences):
    (tmp_path / "m.py").write_text("import torch\ndef build():\n"
                                   "    return torch.nn.Embedding(10, 4)\n")
    result = cli("run", "--model", "m.py:build", "--data", f"text:{sentences}",
                 "--metric", "fidelity")
    assert result.returncode == 2
    assert "needs a tokenizer" in result.stderr and "tokenizer=DIR" in result.stderr


def test_missing_folder_is_a_usage_error(cli):
    result = cli("run", "--model", "hf:./no-such-folder", "--data", "synthetic:shape=2x4,"
                 "dtype=int64", "--metric", "fidelity")
    assert result.returncode == 2 and "does not exist" in result.stderr
