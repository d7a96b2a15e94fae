"""``lmgen-fast score``: JSONL pairs and texts in, the values of score()/score_rolling() out,
resumable with run's manifest rule."""

from __future__ import annotations

import json

import pytest

from lmgen_fast import score, score_rolling
from lmgen_fast.cli.main import main
from lmgen_fast.jobs.manifest import differences, read_manifest

from conftest import write_checkpoint

LINES = [
    {"id": 1, "context": "The list type", "continuation": " holds items"},
    {"id": "b", "context": "The list type", "continuation": " is a sequence"},
    {"id": 3, "text": "A dict maps keys to values and the list type holds items."},
    {"id": 4, "context": [1, 5, 9], "continuation": [7, 8]},
]


def test_score_command_writes_scores_and_resumes(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model, tokenizer = write_checkpoint(model_dir)
    inp, out, summary = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "s.json"
    inp.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    base = ["score", "--input", str(inp), "--output", str(out), "--model", str(model_dir),
            "--device", "cpu", "--no-progress", "--max-length", "6"]
    assert main(base + ["--summary", str(summary)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == [1, "b", 3, 4]  # input order
    pairs = [x for x in LINES if "text" not in x]
    want = score(model, tokenizer, [x["context"] for x in pairs],
                 [x["continuation"] for x in pairs])
    want.insert(2, score_rolling(model, tokenizer, [LINES[2]["text"]], max_length=6)[0])
    for g, w in zip(got, want, strict=True):
        assert g["token_ids"] == w.token_ids and g["num_tokens"] == len(w.token_ids)
        assert g["logprobs"] == pytest.approx(w.logprobs, abs=1e-5)
        assert g["total"] == pytest.approx(w.total, abs=1e-4)
        assert g["is_greedy"] == w.is_greedy
    assert json.loads(summary.read_text())["rows"] == 4

    # An interrupted job (its last line lost) resumes: only the missing row runs.
    out.write_text("".join(line + "\n" for line in out.read_text().splitlines()[:-1]))
    assert main(base + ["--summary", str(summary)]) == 0
    assert json.loads(summary.read_text())["already_done"] == 3
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert again[:3] == got[:3]  # kept as written
    # Rescored alone, the last row may differ from its batched run in the last bits.
    assert again[3]["token_ids"] == got[3]["token_ids"]
    assert again[3]["logprobs"] == pytest.approx(got[3]["logprobs"], abs=1e-5)
    capsys.readouterr()

    # Another --max-length may not resume it, nor may score resume an output of run.
    assert main(base[:-1] + ["7"]) == 2
    assert "--max-length 7" in capsys.readouterr().err
    made = read_manifest(out)
    by_run = {k: v for k, v in made.items() if k != "command"}
    assert differences(by_run, made) == [
        "the output was made by `lmgen-fast run`, not `lmgen-fast score`"]
    inp.write_text(json.dumps({"id": 9, "context": "x", "continuation": [10**9]}) + "\n")
    assert main(base + ["--overwrite"]) == 2
    assert "in.jsonl:1:" in capsys.readouterr().err
