"""A real English text corpus that needs no download: the prose of the Python standard library.

The docstrings of the standard library's modules, classes and functions (read with ``ast``,
nothing imported or run) and the language reference topics ``pydoc`` ships
(``pydoc_data.topics``), cut into sentences, code and tables left out: 11,365 sentences written
by people on Python 3.11.7, against the 83 lines of a model card, to calibrate, fine-tune or
distill a pruned sentence encoder on. The same Python version gives the same corpus.

    python benchmarks/text_corpus.py            # how many sentences, and a sample
"""

from __future__ import annotations

import ast
import random
import re
import sys
import sysconfig
from pathlib import Path

_WORD = re.compile(r"[A-Za-z][a-z]+")


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
        # pydoc_data/topics.py: topics = {'name': 'text', ...}
        if (isinstance(node, ast.Assign) and path.name == "topics.py"
                and isinstance(node.value, ast.Dict)):
            out.extend(v.value for v in node.value.values
                       if isinstance(v, ast.Constant) and isinstance(v.value, str))
    return out


def _prose(paragraph: str) -> list[str]:
    """The sentences of one paragraph that read as English prose."""
    lines = paragraph.splitlines()
    if any(ln.startswith(("    ", "\t", ">>>", "...", "+", "|", "=")) for ln in lines):
        return []  # code, doctests, tables
    text = " ".join(ln.strip() for ln in lines)
    out = []
    for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        words = sent.split()
        if not 6 <= len(words) <= 60 or not sent.endswith((".", "!", "?")):
            continue
        if len(_WORD.findall(sent)) < 0.7 * len(words) or re.search(r"[{}\[\]=<>_\\]", sent):
            continue  # identifiers, signatures, markup
        out.append(sent)
    return out


def stdlib_sentences(seed: int = 0) -> list[str]:
    """Every prose sentence of the standard library's docstrings and ``pydoc`` topics, without
    duplicates, shuffled with ``seed``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: dict[str, None] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3") or (
                "tests" in rel):
            continue
        for doc in _docstrings(path):
            for para in re.split(r"\n\s*\n", doc):
                for sent in _prose(para):
                    seen.setdefault(sent, None)
    out = list(seen)
    random.Random(seed).shuffle(out)
    return out


if __name__ == "__main__":
    corpus = stdlib_sentences()
    print(f"Python {sys.version.split()[0]}: {len(corpus)} sentences, "
          f"{sum(len(s.split()) for s in corpus)} words")
    for s in corpus[:10]:
        print(" ", s)
