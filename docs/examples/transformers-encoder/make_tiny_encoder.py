"""Save a tiny BERT encoder and its tokenizer to a folder (argument; default tiny-bert), built
from a config and a word list: no download. Stands in for the folder a user's own
save_pretrained() wrote. Used by docs/model-sources.md (and its test)."""

import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizer

WORDS = ("the a an cat dog bird sat ran flew on under over mat tree house fast slow big small "
         "red blue green is was and but with quick lazy brown fox jumps".split())

out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-bert")
out.mkdir(parents=True, exist_ok=True)
vocab = out / "vocab.txt"
vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
tokenizer = BertTokenizer(vocab_file=str(vocab))
config = BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=512, max_position_embeddings=128)
torch.manual_seed(0)
BertModel(config).eval().save_pretrained(out)
tokenizer.save_pretrained(out)
print(f"wrote {out}/")
