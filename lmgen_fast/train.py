"""Train the embedded default model: corpus, tokenizer, model, loss curve, held-out loss.

The corpus is English text that every CPython install carries: the ``pydoc_data`` topics
(the language reference behind ``help()``) and the docstrings of the standard library,
read with :mod:`ast` so that no module is imported. Each document becomes
``[BOT]`` + ``encode(" " + text)`` + ``[EOT]``, the article's pretraining layout.

Run::

    python -m lmgen_fast.train --out lmgen_fast/assets --seed 0

It writes ``model.safetensors`` (float16), ``config.json``, ``tokenizer.json`` and
``metrics.json`` to ``--out`` and a loss-curve PNG to ``--plot``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import struct
import sys
import sysconfig
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .models import LlamaConfig, LlamaForPretraining

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


# --------------------------------------------------------------------------- losses


def unigram_losses(
    train_ids: Sequence[Sequence[int]], held_ids: Sequence[Sequence[int]], vocab_size: int
) -> dict[str, float]:
    """Losses (nats per token) of the unigram frequencies of the training text.

    Targets are every token after ``[BOT]`` (text tokens and ``[EOT]``), as for the model.

    Returns
    -------
    dict
        ``train_entropy``: the training targets under their own frequencies;
        ``held_out``: the held-out targets under add-one smoothed training frequencies.
    """
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for seq in train_ids:
        counts += torch.bincount(torch.tensor(seq[1:]), minlength=vocab_size).double()
    total = counts.sum()
    p = counts / total
    nz = p > 0
    entropy = float(-(p[nz] * p[nz].log()).sum())
    smooth = (counts + 1) / (total + vocab_size)
    held = torch.cat([torch.tensor(seq[1:]) for seq in held_ids])
    return {"train_entropy": entropy, "held_out": float(-smooth[held].log().mean())}


def _eval_chunks(docs_ids: Sequence[Sequence[int]], seq_len: int) -> list[list[int]]:
    # Long documents are cut into windows of seq_len + 1 ids that overlap by one, so that
    # every target after [BOT] is scored exactly once.
    chunks = []
    for ids in docs_ids:
        for start in range(0, len(ids) - 1, seq_len):
            chunks.append(list(ids[start : start + seq_len + 1]))
    return chunks


@torch.no_grad()
def held_out_loss(
    model: LlamaForPretraining,
    docs_ids: Sequence[Sequence[int]],
    seq_len: int = 256,
    pad_id: int = 3,
    batch_tokens: int = 2048,
) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over documents of ids.

    Parameters
    ----------
    model : LlamaForPretraining
    docs_ids : sequence of sequence of int
        Each ``[BOT] ... [EOT]``; every id after the first is a target.
    seq_len : int
        Context window; longer documents are scored in consecutive windows.
    pad_id : int
        Fills short rows on the right (never a target; causal attention keeps it out of
        the real positions).
    batch_tokens : int
        Rows are batched up to about this many tokens.

    Returns
    -------
    float
    """
    was_training = model.training
    model.eval()
    chunks = sorted(_eval_chunks(docs_ids, seq_len), key=len)
    total, count, i = 0.0, 0, 0
    device = model.lm_head.weight.device
    while i < len(chunks):
        width = len(chunks[min(len(chunks) - 1, i)])
        rows = max(1, batch_tokens // width)
        group = chunks[i : i + rows]
        width = max(len(c) for c in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        for r, c in enumerate(group):
            ids[r, : len(c)] = torch.tensor(c)
        ids = ids.to(device)
        logits = model(ids[:, :-1]).float()
        targets = ids[:, 1:].clone()
        lengths = torch.tensor([len(c) - 1 for c in group], device=device)
        targets[torch.arange(width - 1, device=device) >= lengths.unsqueeze(1)] = -100
        total += float(F.cross_entropy(logits.transpose(1, 2), targets, reduction="sum",
                                       ignore_index=-100))
        count += int((targets != -100).sum())
        i += rows
    model.train(was_training)
    return total / max(count, 1)


# --------------------------------------------------------------------------- plotting


def _png_bytes(pixels: list[bytearray], width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


# A 3x5 bitmap font, enough for axis numbers.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", "k": "100101110101101",
}


def write_loss_png(
    path: str | Path,
    steps: Sequence[int],
    train_loss: Sequence[float],
    eval_steps: Sequence[int] = (),
    eval_loss: Sequence[float] = (),
    unigram: float | None = None,
) -> None:
    """Write a loss curve PNG: training loss (blue), held-out loss (red dots), unigram (grey).

    Parameters
    ----------
    path : str or Path
        The PNG to write (its folder is created).
    steps, train_loss : sequence
        The (smoothed) training loss at these steps.
    eval_steps, eval_loss : sequence
        Held-out losses.
    unigram : float, optional
        Drawn as a dashed horizontal line.

    Notes
    -----
    Uses matplotlib when it is installed, otherwise a small built-in rasteriser, so that
    the training script needs nothing beyond torch and tokenizers.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, train_loss, label="train (smoothed)")
        if eval_steps:
            ax.plot(eval_steps, eval_loss, "o-", label="held-out")
        if unigram is not None:
            ax.axhline(unigram, color="grey", linestyle="--", label="unigram")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return

    width, height, left, bottom, top, right = 640, 360, 40, 24, 10, 20
    pixels = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]

    def put(x: int, y: int, rgb: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            pixels[y][3 * x : 3 * x + 3] = bytes(rgb)

    def text(x: int, y: int, s: str) -> None:
        for ch in s:
            glyph = _GLYPHS.get(ch)
            if glyph:
                for k, bit in enumerate(glyph):
                    if bit == "1":
                        put(x + k % 3, y + k // 3, (0, 0, 0))
            x += 4

    values = list(train_loss) + list(eval_loss) + ([unigram] if unigram is not None else [])
    y_lo, y_hi = math.floor(min(values)), math.ceil(max(values))
    x_hi = max(list(steps) + list(eval_steps) + [1])

    def to_px(step: float, loss: float) -> tuple[int, int]:
        px = left + round((width - left - right - 1) * step / x_hi)
        py = height - bottom - round((height - top - bottom - 1) * (loss - y_lo) / (y_hi - y_lo))
        return px, py

    def line(a: tuple[int, int], b: tuple[int, int], rgb: tuple[int, int, int]) -> None:
        n = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
        for t in range(n + 1):
            put(round(a[0] + (b[0] - a[0]) * t / n), round(a[1] + (b[1] - a[1]) * t / n), rgb)

    line(to_px(0, y_lo), to_px(x_hi, y_lo), (0, 0, 0))
    line(to_px(0, y_lo), to_px(0, y_hi), (0, 0, 0))
    for v in range(y_lo, y_hi + 1):
        x, y = to_px(0, v)
        line((x - 3, y), (x, y), (0, 0, 0))
        text(x - 6 - 4 * len(str(v)), y - 2, str(v))
    for k in range(5):
        s = round(x_hi * k / 4)
        x, y = to_px(s, y_lo)
        line((x, y), (x, y + 3), (0, 0, 0))
        label = f"{s / 1000:.1f}k" if s >= 1000 else str(s)
        text(x - 2 * len(label), y + 6, label)
    if unigram is not None:
        for x in range(left, width - right, 6):
            line((x, to_px(0, unigram)[1]), (x + 2, to_px(0, unigram)[1]), (128, 128, 128))
    pts = [to_px(s, v) for s, v in zip(steps, train_loss, strict=True)]
    for a, b in zip(pts, pts[1:], strict=False):
        line(a, b, (31, 119, 180))
    ept = [to_px(s, v) for s, v in zip(eval_steps, eval_loss, strict=True)]
    for a, b in zip(ept, ept[1:], strict=False):
        line(a, b, (214, 39, 40))
    for x, y in ept:
        for dx in range(-2, 3):
            for dy in range(-2, 3):
                put(x + dx, y + dy, (214, 39, 40))
    path.write_bytes(_png_bytes(pixels, width, height))


# --------------------------------------------------------------------------- training


@dataclass
class TrainSettings:
    """Hyper-parameters of one run (the defaults built the shipped model)."""

    seed: int = 0
    split_seed: int = 0
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 700
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    eval_every: int = 175
    # One thread: on a machine shared with other jobs, two threads spend most of their time
    # waiting for each other at every op (measured 5-20x slower than one).
    threads: int = 1
    # bfloat16 autocast for the forward pass: about 1.5x faster on CPUs with AMX/AVX512-BF16;
    # weights, optimizer and loss stay in float32.
    bf16: bool = True


class _Progress:
    """tqdm when it is installed, else a plain text bar on stderr."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.total, self.n, self.last = total, 0, 0.0
        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True) if tqdm else None

    def update(self, loss: float) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if now - self.last > 2 or self.n == self.total:
            self.last = now
            done = int(30 * self.n / self.total)
            bar = "#" * done + "-" * (30 - done)
            print(f"\r[{bar}] {self.n}/{self.total} loss {loss:.3f}", end="", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


def _init_weights(model: LlamaForPretraining, num_layers: int) -> None:
    # GPT-2 style: small normal weights, and residual projections scaled down with depth so
    # that the residual stream does not grow with the number of layers.
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std /= math.sqrt(2 * num_layers)
            torch.nn.init.normal_(p, 0.0, std)


def _batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])


def train(settings: TrainSettings, out: Path, plot: Path | None) -> dict:
    """Build the corpus, train the tokenizer and the model, write the assets.

    Parameters
    ----------
    settings : TrainSettings
        The run's hyper-parameters and seeds; the same settings give the same files.
    out : Path
        Receives ``model.safetensors`` (float16), ``config.json``, ``tokenizer.json`` and
        ``metrics.json``.
    plot : Path, optional
        Where to write the loss-curve PNG.

    Returns
    -------
    dict
        The metrics written to ``metrics.json`` (held-out and unigram losses, sizes, times).
    """
    t0 = time.monotonic()
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    docs = build_documents()
    train_docs, held_docs = split_documents(docs, settings.split_seed)
    tokenizer = train_tokenizer(train_docs, settings.vocab_size)
    train_ids = encode_documents(tokenizer, train_docs)
    held_ids = encode_documents(tokenizer, held_docs)
    vocab = tokenizer.get_vocab_size()
    uni = unigram_losses(train_ids, held_ids, vocab)
    stream = torch.tensor([t for seq in train_ids for t in seq], dtype=torch.long)
    print(
        f"corpus: {len(docs)} documents ({len(train_docs)} train, {len(held_docs)} held out), "
        f"{len(stream)} training tokens, vocab {vocab}; unigram loss: train entropy "
        f"{uni['train_entropy']:.3f}, held out {uni['held_out']:.3f}",
        file=sys.stderr,
    )

    config = LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=settings.max_position_embeddings,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads,
    )
    model = LlamaForPretraining(config)
    _init_weights(model, config.num_hidden_layers)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return settings.lr * (step + 1) / settings.warmup
        frac = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cos)

    gen = torch.Generator().manual_seed(settings.seed)
    curve_steps, curve_loss, eval_steps, eval_loss = [], [], [], []
    smooth = None
    progress = _Progress(settings.steps)
    model.train()
    t_train = time.monotonic()
    for step in range(settings.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = _batch(stream, settings.batch_size, settings.seq_len, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
        progress.update(smooth)
        if step % 10 == 0 or step == settings.steps - 1:
            curve_steps.append(step + 1)
            curve_loss.append(smooth)
        if (step + 1) % settings.eval_every == 0 and step + 1 < settings.steps:
            eval_steps.append(step + 1)
            eval_loss.append(held_out_loss(model, held_ids, settings.seq_len))
    progress.close()
    train_seconds = time.monotonic() - t_train

    # Ship float16 weights and score exactly what ships: reload them into float32.
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes it owner-only
    shipped = LlamaForPretraining(config)
    shipped.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    final = held_out_loss(shipped, held_ids, settings.seq_len)
    eval_steps.append(settings.steps)
    eval_loss.append(final)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))

    metrics = {
        "held_out_loss": round(final, 4),
        "unigram_loss_train_entropy": round(uni["train_entropy"], 4),
        "unigram_loss_held_out": round(uni["held_out"], 4),
        "final_train_loss_smoothed": round(smooth, 4),
        "documents": len(docs),
        "held_out_documents": len(held_docs),
        "train_tokens": len(stream),
        "held_out_tokens": sum(len(s) - 1 for s in held_ids),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.monotonic() - t0, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "settings": settings.__dict__,
        "curve": {"eval_steps": eval_steps, "eval_loss": [round(v, 4) for v in eval_loss]},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if plot is not None:
        write_loss_png(plot, curve_steps, curve_loss, eval_steps, eval_loss, uni["held_out"])
    return metrics


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m lmgen_fast.train --out DIR [--seed N] [--steps N] ...``."""
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(
        prog="python -m lmgen_fast.train",
        description="Train the embedded default model on Python's own documentation (CPU).",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the assets")
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/results/train_loss.png"),
                        help="loss-curve PNG path (default: %(default)s)")
    for name, value in defaults.__dict__.items():
        kind = _parse_bool if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value,
                            help=f"(default: {value})")
    args = parser.parse_args(argv)
    settings = TrainSettings(**{k: getattr(args, k) for k in defaults.__dict__})
    metrics = train(settings, args.out, args.plot)
    print(json.dumps({k: metrics[k] for k in ("held_out_loss", "unigram_loss_train_entropy",
                                              "unigram_loss_held_out", "train_seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
