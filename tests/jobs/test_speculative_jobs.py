"""``lmgen-fast run --speculative`` through slots (continuous batching): plain ``run``'s
results, each row written as it finishes, and a killed run resumes without loss or repeat."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmgen_fast.cli.main import main
from lmgen_fast.speculative import slots as speculative_slots

from conftest import write_checkpoint

WORDS = "the quick brown fox jumps over a lazy dog once upon time model token".split()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(directory)
    return directory


def write_rows(path: Path, n: int) -> Path:
    """``n`` rows of mixed prompt lengths (some repeating themselves) and caps."""
    lines = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(1 + i % 5)]
        prompt = " ".join(words * (1 + i % 2))
        lines.append(json.dumps({"id": i, "prompt": prompt, "max_tokens": (2, 9, 14)[i % 3]}))
    path.write_text("".join(line + "\n" for line in lines))
    return path


def run(checkpoint: Path, inp: Path, out: Path, *extra: str) -> int:
    return main(["run", "--input", str(inp), "--output", str(out), "--model", str(checkpoint),
                 "--device", "cpu", "--no-progress", "--seed", "5", "--temperature", "0.9",
                 "--top-k", "20", "--repetition-penalty", "1.2", *extra])


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_bytes().split(b"\n") if x]


def test_speculative_run_goes_through_slots_and_resumes(checkpoint, tmp_path, monkeypatch,
                                                        capsys):
    n = 14
    inp = write_rows(tmp_path / "in.jsonl", n)
    plain, static, out = (tmp_path / f"{name}.jsonl" for name in ("plain", "static", "spec"))
    assert run(checkpoint, inp, plain, "--batch-size", "4") == 0
    assert run(checkpoint, inp, static, "--batch-size", "4", "--static-batches",
               "--speculative", "ngram") == 0
    real, calls, handed = speculative_slots.generate_slots, [], []

    def killed(*args, on_row, slots, **kwargs):
        calls.append(slots)

        def row(*a):
            on_row(*a)
            handed.append(a[0])
            if len(handed) == 5:  # rows are still running in the other slots
                raise KeyboardInterrupt
        return real(*args, on_row=row, slots=slots, **kwargs)

    monkeypatch.setattr(speculative_slots, "generate_slots", killed)
    capsys.readouterr()
    assert run(checkpoint, inp, out, "--batch-size", "4", "--speculative", "ngram",
               "--num-speculative-tokens", "3") == 130
    assert calls == [4] and len(lines(out)) == 5  # each row written as it finished
    monkeypatch.setattr(speculative_slots, "generate_slots", real)
    summary = tmp_path / "summary.json"
    assert run(checkpoint, inp, out, "--batch-size", "3", "--speculative", "ngram",
               "--num-speculative-tokens", "3", "--summary", str(summary)) == 0
    assert "tokens per target forward" in capsys.readouterr().err
    assert json.loads(summary.read_text())["batching"] == "continuous"
    assert lines(out) == lines(plain) == lines(static)  # nothing lost or doubled, in order
