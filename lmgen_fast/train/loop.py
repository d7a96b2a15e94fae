"""Train the embedded default model: corpus, tokenizer, model, loss curve, held-out loss.

The corpus (:mod:`lmgen_fast.train.data`) is English text that every CPython install
carries: the ``pydoc_data`` topics (the language reference behind ``help()``) and the
docstrings of the standard library, read with :mod:`ast` so that no module is imported.
Each document becomes ``[BOT]`` + ``encode(" " + text)`` + ``[EOT]``, the article's
pretraining layout.

Run::

    python -m lmgen_fast.train --out lmgen_fast/assets --seed 0

It writes ``model.safetensors`` (float16), ``config.json``, ``tokenizer.json`` and
``metrics.json`` to ``--out`` and a loss-curve PNG to ``--plot`` (matplotlib, the ``plot``
extra; ``--no-plot`` skips it).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmgen_fast.core.plot import PlotExtraMissing, loss_figure, pyplot, save_png
from lmgen_fast.core.progress import Progress
from lmgen_fast.models import LlamaConfig, LlamaForPretraining
from lmgen_fast.train.data import (  # noqa: F401  (re-exported: the names users import from here)
    SPECIAL_TOKENS,
    build_documents,
    encode_documents,
    is_held_out,
    pydoc_topic_documents,
    split_documents,
    stdlib_docstrings,
    train_tokenizer,
)

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


@dataclass
class Corpus:
    """What a run trains and scores on: the documents and their split, the tokenizer
    trained on the training part, both parts' ids, every training id in one int64 stream,
    and the unigram losses (:func:`unigram_losses`)."""

    docs: list[str]
    train_docs: list[str]
    held_docs: list[str]
    tokenizer: object
    train_ids: list[list[int]]
    held_ids: list[list[int]]
    stream: torch.Tensor
    unigram: dict[str, float]


def build_corpus(settings: TrainSettings) -> Corpus:
    """Build the documents, split them, train the tokenizer, encode both parts; print a
    summary line on stderr."""
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
    return Corpus(docs, train_docs, held_docs, tokenizer, train_ids, held_ids, stream, uni)


def _new_model(settings: TrainSettings, vocab: int
               ) -> tuple[LlamaConfig, LlamaForPretraining, torch.optim.Optimizer]:
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
    return config, model, opt


def lr_at(settings: TrainSettings, step: int) -> float:
    """The learning rate of ``step``: linear warm-up, then cosine decay to
    ``min_lr_ratio * lr``."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    frac = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cos)


@dataclass
class Curves:
    """The loss curves of a run: the smoothed training loss every 10 steps (and the last),
    the held-out loss every ``eval_every`` steps; ``smooth``: the last smoothed loss."""

    steps: list[int]
    loss: list[float]
    eval_steps: list[int]
    eval_loss: list[float]
    smooth: float | None = None


def _fit(settings: TrainSettings, model: LlamaForPretraining, opt: torch.optim.Optimizer,
         corpus: Corpus) -> Curves:
    """Run the training steps on random windows of the corpus's stream."""
    vocab = corpus.tokenizer.get_vocab_size()
    gen = torch.Generator().manual_seed(settings.seed)
    curves = Curves([], [], [], [])
    progress = Progress(settings.steps, label="train", unit="step")
    tokens_per_step = settings.batch_size * settings.seq_len
    model.train()
    for step in range(settings.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(settings, step)
        batch = _batch(corpus.stream, settings.batch_size, settings.seq_len, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        smooth = value if curves.smooth is None else 0.95 * curves.smooth + 0.05 * value
        curves.smooth = smooth
        progress.advance(1, note=f"loss {smooth:.3f}", tokens=tokens_per_step)
        if step % 10 == 0 or step == settings.steps - 1:
            curves.steps.append(step + 1)
            curves.loss.append(smooth)
        if (step + 1) % settings.eval_every == 0 and step + 1 < settings.steps:
            curves.eval_steps.append(step + 1)
            curves.eval_loss.append(held_out_loss(model, corpus.held_ids, settings.seq_len))
    progress.close()
    return curves


def _ship(model: LlamaForPretraining, config: LlamaConfig, out: Path) -> LlamaForPretraining:
    """Write ``model.safetensors`` (float16) to ``out``; return those weights reloaded into
    float32, so that what ships is what is scored."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes it owner-only
    shipped = LlamaForPretraining(config)
    shipped.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return shipped


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
        Where to write the loss-curve PNG (needs matplotlib, the ``plot`` extra; checked
        before training starts, so that a missing extra costs no training run).

    Returns
    -------
    dict
        The metrics written to ``metrics.json`` (held-out and unigram losses, sizes, times).
    """
    if plot is not None:
        pyplot()  # raises PlotExtraMissing, naming the extra, before any work
    t0 = time.monotonic()
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    corpus = build_corpus(settings)
    uni, held_ids = corpus.unigram, corpus.held_ids
    config, model, opt = _new_model(settings, corpus.tokenizer.get_vocab_size())
    t_train = time.monotonic()
    curves = _fit(settings, model, opt, corpus)
    train_seconds = time.monotonic() - t_train

    # Ship float16 weights and score exactly what ships: reload them into float32.
    final = held_out_loss(_ship(model, config, out), held_ids, settings.seq_len)
    curves.eval_steps.append(settings.steps)
    curves.eval_loss.append(final)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    corpus.tokenizer.save(str(out / "tokenizer.json"))

    metrics = {
        "held_out_loss": round(final, 4),
        "unigram_loss_train_entropy": round(uni["train_entropy"], 4),
        "unigram_loss_held_out": round(uni["held_out"], 4),
        "final_train_loss_smoothed": round(curves.smooth, 4),
        "documents": len(corpus.docs),
        "held_out_documents": len(corpus.held_docs),
        "train_tokens": len(corpus.stream),
        "held_out_tokens": sum(len(s) - 1 for s in held_ids),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.monotonic() - t0, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "settings": settings.__dict__,
        "curve": {"eval_steps": curves.eval_steps,
                  "eval_loss": [round(v, 4) for v in curves.eval_loss]},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if plot is not None:
        save_png(loss_figure(curves.steps, curves.loss, curves.eval_steps, curves.eval_loss,
                             uni["held_out"]), plot)
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
                        help="loss-curve PNG path; needs matplotlib, the plot extra "
                             "(default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true",
                        help="write no loss-curve PNG (training then needs no matplotlib)")
    for name, value in defaults.__dict__.items():
        kind = _parse_bool if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value,
                            help=f"(default: {value})")
    args = parser.parse_args(argv)
    settings = TrainSettings(**{k: getattr(args, k) for k in defaults.__dict__})
    try:
        metrics = train(settings, args.out, None if args.no_plot else args.plot)
    except PlotExtraMissing as err:
        parser.error(f"{err}; or pass --no-plot")
    print(json.dumps({k: metrics[k] for k in ("held_out_loss", "unigram_loss_train_entropy",
                                              "unigram_loss_held_out", "train_seconds")}))
    return 0

