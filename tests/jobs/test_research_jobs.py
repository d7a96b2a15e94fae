"""``lmgen-fast run`` with the research-job fields (SPEC section 7): samples per line, stop
strings and ids, token-id prompts; each line checked against plain lines of the same job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmgen_fast.api.generate import GenerationError, generate_batch
from lmgen_fast.api.tokenization import adapt_tokenizer
from lmgen_fast.cli.main import main
from lmgen_fast.core.params import SamplingParams
from lmgen_fast.engine import RowPair
from lmgen_fast.jobs.inputs import JobFailed, JobRow
from lmgen_fast.jobs.jsonl import ResultWriter
from lmgen_fast.jobs.manifest import read_manifest
from lmgen_fast.jobs.runner import run_rows

from conftest import write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

P, Q = "the quick brown fox", "once upon a time"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    model, tokenizer = write_checkpoint(directory)
    return directory, model, tokenizer


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_results(path: Path) -> dict:
    return {r["id"]: r for r in (json.loads(x) for x in path.read_bytes().split(b"\n") if x)}


def run(checkpoint, inp: Path, out: Path, *extra: str) -> int:
    return main(["run", "--input", str(inp), "--output", str(out), "--model",
                 str(checkpoint[0]), "--device", "cpu", "--no-progress", "--threads", "1",
                 *extra])


def test_samples_stops_and_id_prompts_agree_with_plain_lines(checkpoint, tmp_path, capsys):
    _, model, tokenizer = checkpoint
    # A plain run of Q picks the stop string and stop id: both occur, after the first token.
    [plain] = generate_batch(model, tokenizer, [Q], 12, seed=9, top_k=0, return_details=True)
    text = plain.text
    stop = next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 1)
                if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
    stop_id = plain.token_ids[3]
    ids_of_p = adapt_tokenizer(tokenizer).encode_prompt(P)
    lp = {"logprobs": 1, "logprobs_mode": "processed"}
    rows = [
        {"id": "a", "prompt": P, "seed": 7, "n": 3, **lp},
        *({"id": f"a{j}", "prompt": P, "seed": 7 + j, **lp} for j in range(3)),
        {"id": "ids", "prompt_token_ids": ids_of_p, "seed": 8},
        {"id": "plain", "prompt": Q, "seed": 9},
        {"id": "stop", "prompt": Q, "seed": 9, "stop": ["\u2603", stop]},
        {"id": "keep", "prompt": Q, "seed": 9, "stop": stop, "include_stop_str_in_output": True},
        {"id": "stopid", "prompt": Q, "seed": 9, "stop_token_ids": [stop_id]},
    ]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    assert run(checkpoint, inp, out, "--max-tokens", "12", "--top-k", "0",
               "--batch-size", "4") == 0
    assert "(1 CPU thread)" in capsys.readouterr().err
    got = read_results(out)
    # Sample j of a line seeded s is the line's n=1 result with seed s + j.
    samples = got["a"]["samples"]
    assert set(got["a"]) == {"id", "samples"} and len(samples) == 3
    for j, sample in enumerate(samples):
        lone = got[f"a{j}"]
        # Tokens exactly; log-probabilities up to the rounding of another batch's forward.
        exact = ("text", "token_ids", "finish_reason", "num_tokens", "logprobs_mode")
        assert {k: sample[k] for k in exact} == {k: lone[k] for k in exact}
        assert sample["stop_reason"] is None and set(sample) == set(lone) - {"id"} | {"stop_reason"}
        assert sample["logprobs"] == pytest.approx(lone["logprobs"], abs=1e-4)
        assert [[t for t, _ in top] for top in sample["top_logprobs"]] == \
            [[t for t, _ in top] for top in lone["top_logprobs"]]
    assert got["ids"]["token_ids"] == got["a1"]["token_ids"]
    # Lines without n or a stop keep their old form.
    assert set(got["plain"]) == {"id", "text", "token_ids", "finish_reason", "num_tokens"}
    assert (got["plain"]["token_ids"], got["plain"]["text"]) == (plain.token_ids, text)
    # A stop string: the plain text cut before its first match; the plain tokens up to the
    # one that completed the match.
    cut, kept = got["stop"], got["keep"]
    at = text.index(stop)
    assert cut["text"] == text[:at] and kept["text"] == text[:at + len(stop)]
    for res in (cut, kept):
        assert (res["finish_reason"], res["stop_reason"]) == ("stop", stop)
        k = res["num_tokens"]
        assert res["token_ids"] == plain.token_ids[:k]
        assert stop in tokenizer.decode(plain.token_ids[:k])
        assert stop not in tokenizer.decode(plain.token_ids[:k - 1])
    # A stop id ends the row where the plain run drew it; it is not returned.
    first = plain.token_ids.index(stop_id)
    assert got["stopid"]["token_ids"] == plain.token_ids[:first]
    assert (got["stopid"]["finish_reason"], got["stopid"]["stop_reason"]) == ("stop", stop_id)
    # The manifest records the new options; a rerun resumes every line as done.
    settings = read_manifest(out)["settings"]
    assert (settings["n"], settings["stop"], settings["min_tokens"]) == (None, None, 0)
    before = out.read_bytes()
    assert run(checkpoint, inp, out, "--max-tokens", "12", "--top-k", "0",
               "--batch-size", "4") == 0
    assert f"{len(rows)} already done" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_global_n_writes_samples_for_every_line(checkpoint, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": P}, {"id": 2, "prompt": Q,
                                                                        "n": 1}])
    out = tmp_path / "out.jsonl"
    assert run(checkpoint, inp, out, "--max-tokens", "3", "--seed", "1", "--n", "2",
               "--stop", "zz", "--static-batches") == 0
    got = read_results(out)
    assert [len(got[1]["samples"]), len(got[2]["samples"])] == [2, 1]
    settings = read_manifest(out)["settings"]
    assert (settings["n"], settings["stop"]) == (2, ["zz"])


@pytest.mark.parametrize("bad, reason", [
    ({"id": 3, "prompt": "x", "n": 0}, "n must be >= 1, got 0"),
    ({"id": 3, "prompt": "x", "n": 2, "seed": 2**63 - 1}, "leaves no room for n=2 samples"),
    ({"id": 3, "prompt": "x", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"id": 3, "prompt": "x", "stop": ""}, "stop strings must not be empty"),
    ({"id": 3, "prompt": "x", "stop_token_ids": [100000]}, "stop_token_ids has token id 100000"),
    ({"id": 3, "prompt": "x", "min_tokens": 9, "max_tokens": 4},
     "min_tokens 9 is above max_tokens 4"),
    ({"id": 3, "prompt": "x", "messages": [{"role": "user", "content": "x"}]},
     "give one of prompt, prompt_token_ids and messages, got prompt and messages"),
    ({"id": 3, "messages": [{"role": "user"}]}, "needs a string 'content'"),
    ({"id": 3, "prompt_token_ids": [1, -2]}, "not a token id"),
    ({"id": 3, "prompt_token_ids": [1, 100000]}, "prompt_token_ids has token id 100000"),
    ({"id": 3, "messages": [{"role": "user", "content": "x"}]}, "chat template"),
])
def test_bad_research_fields_name_the_line(checkpoint, tmp_path, capsys, bad, reason):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": P}, {"id": 2, "prompt": Q},
                                              bad])
    out = tmp_path / "out.jsonl"
    assert run(checkpoint, inp, out, "--max-tokens", "4") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmgen-fast: error: ") and "\n" not in err
    assert f"{inp}:3: " in err and reason in err, err
    assert not out.exists()


def test_a_line_of_samples_is_written_whole_or_not_at_all(tmp_path):
    """A failure between two samples of a line leaves the line out (resume redoes it)."""
    class Adapter:
        eos_id = 0

        @staticmethod
        def decode(ids):
            return " ".join(map(str, ids))

    rows = [JobRow(1, 1, "x", SamplingParams(seed=1), 2),
            JobRow(2, 2, "y", SamplingParams(seed=1, n=2), 2, samples=True)]

    def generate(decoder, prompts, params, caps, eos, *, on_row, **_):
        assert [p.seed for p in params] == [1, 1, 2] and len(prompts) == 3
        on_row(0, RowPair([5, 6], "length"), None)
        on_row(1, RowPair([7], "stop", 9), None)
        raise GenerationError("boom", [[5, 6], [7], [8]])

    path = tmp_path / "out.jsonl"
    with ResultWriter(path) as writer, pytest.raises(JobFailed, match="ids 2: boom"):
        run_rows(None, Adapter(), rows, [[1], [1]], writer, batch_size=8, static=True,
                 generate=generate)
    [line] = [json.loads(x) for x in path.read_bytes().split(b"\n") if x]
    assert line == {"id": 1, "text": "5 6", "token_ids": [5, 6], "finish_reason": "length",
                    "num_tokens": 2}
