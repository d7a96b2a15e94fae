"""The embedded model's training data: Python's own documentation, split and tokenized.

The corpus is English text that every CPython install carries: the ``pydoc_data`` topics
(the language reference behind ``help()``) and the docstrings of the standard library,
read with :mod:`ast` so that no module is imported. Each document becomes
``[BOT]`` + ``encode(" " + text)`` + ``[EOT]``, the article's pretraining layout.
:mod:`lmgen_fast.train` re-exports every public name.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

SPECIAL_TOKENS = ("[UNK]", "[BOT]", "[EOT]", "[PAD]")
# Directories of the standard library that hold test data or vendored code rather than
# documentation; their docstrings are mostly "Test that ..." noise.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "_bundled"}
)
_MIN_DOC_CHARS = 40
_TOPIC_CHUNK_CHARS = 1500


# --------------------------------------------------------------------------- corpus


def _normalise(text: str) -> str:
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return "\n".join(lines)


def pydoc_topic_documents() -> list[str]:
    """The ``pydoc_data`` topics, cut at blank lines into chunks of about 1500 characters.

    Returns
    -------
    list of str
        Chunks in topic-name order. Topics are long (several pages); cutting them gives
        the held-out split documents of a size similar to docstrings.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        return []
    docs: list[str] = []
    for name in sorted(topics):
        paragraphs = [p for p in _normalise(topics[name]).split("\n\n") if p.strip()]
        chunk: list[str] = []
        size = 0
        for para in paragraphs:
            if chunk and size + len(para) > _TOPIC_CHUNK_CHARS:
                docs.append("\n\n".join(chunk))
                chunk, size = [], 0
            chunk.append(para)
            size += len(para) + 2
        if chunk:
            docs.append("\n\n".join(chunk))
    return docs


def _stdlib_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                yield Path(dirpath, name)


def stdlib_docstrings(root: str | Path | None = None) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions.

    Parameters
    ----------
    root : str or Path, optional
        The library directory; defaults to ``sysconfig.get_paths()["stdlib"]``.

    Returns
    -------
    list of str
        Docstrings of at least 40 characters, in a deterministic (path, source) order.
        Files are parsed with :mod:`ast`, never imported.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs: list[str] = []
    for path in _stdlib_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, RecursionError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, kinds):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc.strip()) >= _MIN_DOC_CHARS:
                    docs.append(_normalise(doc))
    return docs


def build_documents() -> list[str]:
    """The whole corpus: topics then docstrings, exact duplicates (up to spacing) removed.

    Returns
    -------
    list of str
        Unique documents, first occurrence kept, in a deterministic order.
    """
    seen: set[str] = set()
    out: list[str] = []
    for doc in pydoc_topic_documents() + stdlib_docstrings():
        key = " ".join(doc.split())
        if key not in seen:
            seen.add(key)
            out.append(doc)
    return out


def is_held_out(text: str, split_seed: int = 0, fraction: float = 0.05) -> bool:
    """Whether a document belongs to the held-out part.

    Parameters
    ----------
    text : str
        The document.
    split_seed : int
        Seeds the split; the same seed gives the same split.
    fraction : float
        About this fraction of documents is held out.

    Returns
    -------
    bool
        Decided by a seeded hash of the text rather than by position, so a document keeps
        its side of the split on every Python version even when other documents differ.
    """
    digest = hashlib.blake2b(f"{split_seed}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def split_documents(
    docs: Sequence[str], split_seed: int = 0, fraction: float = 0.05
) -> tuple[list[str], list[str]]:
    """Split ``docs`` into (train, held_out) with :func:`is_held_out`."""
    train, held = [], []
    for doc in docs:
        (held if is_held_out(doc, split_seed, fraction) else train).append(doc)
    return train, held


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``" " + text`` for every text.

    Parameters
    ----------
    texts : sequence of str
        Training documents.
    vocab_size : int
        Target size, special tokens included.

    Returns
    -------
    tokenizers.Tokenizer
        Specials ``[UNK]``, ``[BOT]``, ``[EOT]``, ``[PAD]`` at ids 0..3; no post-processor,
        so ``encode`` adds nothing and ``decode(encode(" " + s).ids) == " " + s``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((" " + t for t in texts), trainer=trainer, length=len(texts))
    return tok


def encode_documents(tokenizer, docs: Sequence[str]) -> list[list[int]]:
    """``[BOT]`` + ``encode(" " + doc).ids`` + ``[EOT]`` for each document."""
    bot, eot = tokenizer.token_to_id("[BOT]"), tokenizer.token_to_id("[EOT]")
    encoded = tokenizer.encode_batch([" " + d for d in docs], add_special_tokens=False)
    return [[bot, *e.ids, eot] for e in encoded]
