"""``lmgen-fast run``: JSONL batch jobs, resume after SIGKILL, validation, torchrun shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmgen_fast import generate_batch
from lmgen_fast.cli import run as jobs
from lmgen_fast.cli.main import main
from lmgen_fast.cli.run import derive_seed, shard_of
from lmgen_fast.jobs import runner as job_runner
from lmgen_fast.jobs.jsonl import id_key, merge_parts, part_path, scan_results
from lmgen_fast.jobs.manifest import manifest_path

from conftest import write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
WORDS = "the quick brown fox jumps over a lazy dog once upon time model token".split()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model in the layout ``--model DIR`` reads, with its tokenizer."""
    directory = tmp_path_factory.mktemp("ckpt")
    model, tokenizer = write_checkpoint(directory)
    return directory, model, tokenizer


def prompts(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(1 + i % 9)]
        # Both id types, to check that each keeps its JSON type.
        rows.append({"id": i if i % 3 else f"row-{i}", "prompt": " ".join(words)})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_results(path: Path) -> dict[str, dict]:
    # Split on newlines only: str.splitlines would also split texts at U+0085 or U+2028.
    records = [json.loads(line) for line in path.read_bytes().split(b"\n") if line]
    by_key = {id_key(r["id"]): r for r in records}
    assert len(by_key) == len(records), "an id was written twice"
    return by_key


def run(checkpoint, inp: Path, out: Path, *extra: str) -> int:
    directory = checkpoint[0]
    return main(["run", "--input", str(inp), "--output", str(out), "--model", str(directory),
                 "--device", "cpu", "--no-progress", *extra])


def test_run_few_dozen(checkpoint, tmp_path, capsys):
    _, model, tokenizer = checkpoint
    rows = prompts(36)
    rows[4].update(max_tokens=2, temperature=0)
    rows[5].update(seed=123, top_k=3, repetition_penalty=1.3, repetition_penalty_range=0)
    rows[6].update(max_tokens=0)
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert run(checkpoint, inp, out, "--max-tokens", "6", "--seed", "7", "--batch-size", "8") == 0
    err = capsys.readouterr().err
    assert "36 rows" in err and "tokens/s" in err
    results = read_results(out)
    assert set(results) == {id_key(r["id"]) for r in rows}
    for r in rows:
        res = results[id_key(r["id"])]
        assert type(res["id"]) is type(r["id"])
        assert set(res) == {"id", "text", "token_ids", "finish_reason", "num_tokens"}
        assert res["num_tokens"] == len(res["token_ids"]) <= r.get("max_tokens", 6)
        assert res["text"] == tokenizer.decode(res["token_ids"])
        assert res["finish_reason"] in ("eot", "length")
    assert results[id_key(rows[6]["id"])]["token_ids"] == []
    # Each row is what the library gives that prompt alone, with the row's seed.
    for r in (rows[0], rows[5]):
        seed = r.get("seed", derive_seed(7, r["id"]))
        lone = generate_batch(model, tokenizer, [r["prompt"]], 6, top_k=r.get("top_k", 50),
                              repetition_penalty=r.get("repetition_penalty", 1.0),
                              repetition_penalty_range=r.get("repetition_penalty_range", 10),
                              seed=seed, return_details=True)[0]
        res = results[id_key(r["id"])]
        assert (res["token_ids"], res["finish_reason"]) == (lone.token_ids, lone.finish_reason)


def test_seeded_rows_do_not_depend_on_batch_size(checkpoint, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(24))
    outs = []
    for size in ("1", "5", "24"):
        out = tmp_path / f"out{size}.jsonl"
        assert run(checkpoint, inp, out, "--max-tokens", "5", "--seed", "3",
                   "--batch-size", size) == 0
        outs.append(read_results(out))
    assert outs[0] == outs[1] == outs[2]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_killed_run_resumes_to_the_uninterrupted_result(checkpoint, tmp_path):
    n = 300
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(n))
    out = tmp_path / "out.jsonl"
    common = ["--max-tokens", "12", "--seed", "11"]
    cmd = [sys.executable, "-m", "lmgen_fast.cli", "run", "--input", str(inp), "--output",
           str(out), "--model", str(checkpoint[0]), "--device", "cpu", "--no-progress",
           "--batch-size", "4", *common]  # 4 slots: rows in flight at the kill
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    written = out.read_bytes().count(b"\n")
    assert 3 <= written < n

    assert run(checkpoint, inp, out, "--batch-size", "8", *common) == 0
    full = tmp_path / "full.jsonl"
    assert run(checkpoint, inp, full, "--batch-size", "16", *common) == 0
    resumed = read_results(out)
    assert out.read_bytes().count(b"\n") == n
    assert resumed == read_results(full)
    # Complete, so in input order, though written in batch order around the kill.
    assert _ids_in_file_order(out) == [r["id"] for r in prompts(n)]


def test_partial_last_line_and_leftover_parts_are_repaired(checkpoint, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(12))
    full = tmp_path / "full.jsonl"
    common = ["--max-tokens", "4", "--seed", "5"]
    assert run(checkpoint, inp, full, *common) == 0
    lines = [x + b"\n" for x in full.read_bytes().split(b"\n") if x]
    out = tmp_path / "out.jsonl"
    # The manifest the crashed run had written first (it names no output path).
    shutil.copy(manifest_path(full), manifest_path(out))
    # A crash mid-write: five whole lines, then half of the sixth.
    out.write_bytes(b"".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    # And a part file left by an earlier torchrun run, overlapping the output.
    part_path(out, 1, 3).write_bytes(b"".join(lines[3:8]))
    assert run(checkpoint, inp, out, *common) == 0
    assert read_results(out) == read_results(full)
    assert out.read_bytes().count(b"\n") == 12
    assert not part_path(out, 1, 3).exists()


def test_rank_part_files_resume_on_their_own_then_merge(checkpoint, tmp_path, monkeypatch):
    # The ranks run one after the other here, so the barriers have nothing to wait for.
    monkeypatch.setattr(jobs, "barrier", lambda env, last=True: None)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(20))
    common = ["--max-tokens", "4", "--seed", "9", "--batch-size", "3"]
    full = tmp_path / "full.jsonl"
    assert run(checkpoint, inp, full, *common) == 0
    shard1 = [x + b"\n" for x in full.read_bytes().split(b"\n")
              if x and shard_of(id_key(json.loads(x)["id"]), 2) == 1]
    out = tmp_path / "out.jsonl"
    shutil.copy(manifest_path(full), manifest_path(out))
    part1 = part_path(out, 1, 2)
    # Rank 1 was killed after two rows and half of a third.
    part1.write_bytes(shard1[0] + shard1[1] + shard1[2][:10])
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert run(checkpoint, inp, out, *common) == 0
        if rank == "1":
            assert not out.exists()
            assert sorted(part1.read_bytes().splitlines(keepends=True)) == sorted(shard1)
    assert read_results(out) == read_results(full)
    assert not part1.exists() and not part_path(out, 0, 2).exists()


def test_merge_is_idempotent(tmp_path):
    out = tmp_path / "r.jsonl"
    recs = [json.dumps({"id": i, "text": str(i)}).encode() + b"\n" for i in range(6)]
    out.write_bytes(recs[0] + b'{"id": 1, "te')
    part_path(out, 0, 2).write_bytes(recs[0] + recs[2] + recs[4])
    part_path(out, 1, 2).write_bytes(recs[1] + recs[3] + recs[5] + b'{"id"')
    assert merge_parts(out) == (2, 5)
    assert merge_parts(out) == (0, 0)
    assert sorted(json.loads(x)["id"] for x in out.read_bytes().split(b"\n") if x) == list(range(6))
    assert scan_results(out, repair=False).tail_bytes == 0


GOOD = [{"id": 1, "prompt": "the fox"}, {"id": "b", "prompt": "a dog"}]


@pytest.mark.parametrize("bad, reason", [
    ('{"id": 3, "prompt": "x"', "malformed JSON"),
    ("[1, 2]", "expected a JSON object, got array"),
    ({"prompt": "x"}, "missing id"),
    ({"id": 1.5, "prompt": "x"}, "id must be a string or an integer, got 1.5"),
    ({"id": True, "prompt": "x"}, "id must be a string or an integer, got true"),
    ({"id": 1, "prompt": "x"}, "duplicate id 1 (first on line 1)"),
    ({"id": "b", "prompt": 5}, 'duplicate id "b" (first on line 2)'),
    ({"id": 3}, "missing prompt"),
    ({"id": 3, "prompt": ["x"]}, "prompt must be a string, got array"),
    ({"id": 3, "prompt": "x", "temperature": -1}, "temperature must be >= 0, got -1"),
    ({"id": 3, "prompt": "x", "top_k": 2.5}, "top_k must be an integer, got 2.5"),
    ({"id": 3, "prompt": "x", "repetition_penalty": 0}, "repetition_penalty must be > 0"),
    ({"id": 3, "prompt": "x", "repetition_penalty_range": -2}, "repetition_penalty_range"),
    ({"id": 3, "prompt": "x", "seed": -1}, "seed must be in [0, 2**63)"),
    ({"id": 3, "prompt": "x", "max_tokens": -1}, "max_tokens must be >= 0, got -1"),
    ({"id": 3, "prompt": "x", "max_tokens": "9"}, 'max_tokens must be an integer, got "9"'),
    ({"id": 3, "prompt": "x", "temp": 0.5}, "unknown field 'temp'"),
    ({"id": 3, "prompt": "x", "max_tokens": 400}, "beyond the model's max_position_embeddings"),
])
def test_bad_input_stops_before_generating(checkpoint, tmp_path, capsys, bad, reason):
    inp = write_jsonl(tmp_path / "in.jsonl", [*GOOD, bad, {"id": 4, "prompt": "ok"}])
    out = tmp_path / "out.jsonl"
    assert run(checkpoint, inp, out) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmgen-fast: error: ") and "\n" not in err
    assert f"{inp}:3: " in err and reason in err
    assert not out.exists()


def test_bad_input_leaves_an_existing_output_alone(checkpoint, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [*GOOD, {"id": 3, "prompt": "x", "top_k": "5"}])
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": 1, "text": "t", "token_ids": [], "finish_reason": "eot", "num_to')
    before = out.read_bytes()
    assert run(checkpoint, inp, out) == 2
    assert "in.jsonl:3: top_k must be an integer" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_skip_invalid_writes_the_errors_file(checkpoint, tmp_path, capsys):
    rows = [*GOOD, "not json", {"id": 3, "prompt": "x", "temperature": "hot"},
            {"id": 1, "prompt": "again"}, {"id": 5, "prompt": "fine"}, ""]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    assert run(checkpoint, inp, out, "--max-tokens", "3", "--skip-invalid",
               "--errors", str(errors)) == 0
    assert "3 invalid lines skipped" in capsys.readouterr().err
    assert set(read_results(out)) == {"1", '"b"', "5"}
    bad = [json.loads(x) for x in errors.read_bytes().split(b"\n") if x]
    assert [(b["id"], b["line"]) for b in bad] == [(None, 3), (3, 4), (1, 5)]
    assert all(set(b) == {"id", "line", "error"} for b in bad)
    assert "temperature must be a real number" in bad[1]["error"]


def test_usage_errors(checkpoint, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", GOOD)
    out = tmp_path / "out.jsonl"
    assert run(checkpoint, inp, out, "--batch-size", "0") == 2
    assert run(checkpoint, inp, out, "--temperature", "-1") == 2
    assert run(checkpoint, inp, inp) == 2
    assert run(checkpoint, tmp_path / "missing.jsonl", out) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(x.startswith("lmgen-fast: error: ") for x in lines)
    assert "--temperature must be >= 0" in lines[1]
    assert not out.exists()


def test_sharding_is_stable_and_covers_every_id():
    keys = [id_key(r["id"]) for r in prompts(50)]
    shards = [shard_of(k, 3) for k in keys]
    assert shards == [shard_of(k, 3) for k in keys] and set(shards) == {0, 1, 2}
    assert all(shard_of(k, 1) == 0 for k in keys)


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)
def test_two_ranks_under_torchrun_match_one_process(checkpoint, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(30))
    common = ["--max-tokens", "5", "--seed", "2", "--batch-size", "4"]
    single = tmp_path / "single.jsonl"
    assert run(checkpoint, inp, single, *common) == 0
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "lmgen_fast.cli", "run", "--input", str(inp), "--output", str(out),
           "--model", str(checkpoint[0]), "--device", "cpu", "--no-progress", *common]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "[rank 0/2]" in proc.stderr and "[rank 1/2]" in proc.stderr
    assert "merged 2 part files" in proc.stderr
    assert read_results(out) == read_results(single)
    assert out.read_bytes().count(b"\n") == 30
    assert not list(tmp_path.glob("out.jsonl.rank*"))


# --------------------------------------------------------------------------- manifest


def _ids_in_file_order(path: Path) -> list:
    return [json.loads(x)["id"] for x in path.read_bytes().split(b"\n") if x]


def test_results_come_out_in_input_order(checkpoint, tmp_path):
    rows = prompts(20)
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    # Batches are planned by prompt length, which is not the input order here.
    assert run(checkpoint, inp, out, "--max-tokens", "3", "--seed", "1", "--batch-size", "4") == 0
    assert _ids_in_file_order(out) == [r["id"] for r in rows]


def test_mismatched_rerun_is_refused_naming_each_difference(checkpoint, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(10))
    out = tmp_path / "out.jsonl"
    common = ["--max-tokens", "4", "--seed", "5"]
    assert run(checkpoint, inp, out, *common) == 0
    before = out.read_bytes()
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["settings"]["max_tokens"] == 4 and manifest["settings"]["seed"] == 5
    assert manifest["input"]["sha256"] and manifest["model"]["sha256"]
    capsys.readouterr()

    assert run(checkpoint, inp, out, "--temperature", "0", "--max-tokens", "10",
               "--seed", "5") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmgen-fast: error: ") and "\n" not in err
    assert "--temperature 0.0 (the output was made with 1.0)" in err
    assert "--max-tokens 10 (the output was made with 4)" in err
    assert "--seed" not in err.split("resume")[0].replace("--seed 5", "")
    assert "--overwrite" in err
    assert out.read_bytes() == before

    other = write_jsonl(tmp_path / "other.jsonl", prompts(11))
    assert run(checkpoint, other, out, *common) == 2
    err = capsys.readouterr().err
    assert f"--input {other}" in err and "is not the input the output was made from" in err
    assert out.read_bytes() == before

    # Another model: the same checkpoint with one weight changed.
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "ckpt2"
    shutil.copytree(checkpoint[0], changed)
    state = load_file(str(changed / "model.safetensors"))
    state["lm_head.weight"][0, 0] += 1
    save_file(state, str(changed / "model.safetensors"))
    assert main(["run", "--input", str(inp), "--output", str(out), "--model", str(changed),
                 "--device", "cpu", "--no-progress", *common]) == 2
    err = capsys.readouterr().err
    assert f"--model {changed.resolve()}" in err and "is not the model the output was made" in err
    assert out.read_bytes() == before

    # The identical rerun resumes (here: finds everything done).
    assert run(checkpoint, inp, out, *common) == 0
    assert "10 already done" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_logprobs_mode_is_a_result_setting(checkpoint, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(4))
    out = tmp_path / "out.jsonl"
    common = ["--max-tokens", "3", "--seed", "2"]
    assert run(checkpoint, inp, out, *common) == 0
    before = out.read_bytes()
    assert json.loads(manifest_path(out).read_text())["settings"]["logprobs_mode"] == "raw"
    capsys.readouterr()
    assert run(checkpoint, inp, out, *common, "--logprobs-mode", "processed") == 2
    err = capsys.readouterr().err
    assert '--logprobs-mode "processed" (the output was made with "raw")' in err
    assert out.read_bytes() == before
    # An output made before the option existed was made with raw log-probabilities: it
    # resumes under the default and is refused under "processed".
    manifest = json.loads(manifest_path(out).read_text())
    del manifest["settings"]["logprobs_mode"]
    manifest_path(out).write_text(json.dumps(manifest))
    assert run(checkpoint, inp, out, *common) == 0
    assert "4 already done" in capsys.readouterr().err
    assert run(checkpoint, inp, out, *common, "--logprobs-mode", "processed") == 2


def test_output_without_manifest_is_refused(checkpoint, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(6))
    # Any JSONL with ids, e.g. a copy of the input itself.
    out = tmp_path / "copy.jsonl"
    shutil.copy(inp, out)
    before = out.read_bytes()
    assert run(checkpoint, inp, out, "--max-tokens", "3") == 2
    err = capsys.readouterr().err
    assert f"{out} holds results but no manifest" in err and "--overwrite" in err
    assert out.read_bytes() == before and not manifest_path(out).exists()


def test_a_manifest_without_results_does_not_block_a_new_run(checkpoint, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "the fox", "max_tokens": 400}])
    out = tmp_path / "out.jsonl"
    # Refused after the manifest was written: the row does not fit the model.
    assert run(checkpoint, inp, out) == 2
    assert "max_position_embeddings" in capsys.readouterr().err
    assert manifest_path(out).exists() and not out.exists()
    fixed = write_jsonl(tmp_path / "fixed.jsonl", [{"id": 1, "prompt": "the fox"}])
    assert run(checkpoint, fixed, out, "--max-tokens", "3") == 0
    assert set(read_results(out)) == {"1"}


def test_overwrite_keeps_the_old_output_and_starts_afresh(checkpoint, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(8))
    out = tmp_path / "out.jsonl"
    assert run(checkpoint, inp, out, "--max-tokens", "3", "--seed", "1") == 0
    before, old_manifest = out.read_bytes(), manifest_path(out).read_bytes()
    assert run(checkpoint, inp, out, "--max-tokens", "5", "--seed", "1", "--overwrite") == 0
    assert "the old output is now" in capsys.readouterr().err
    backup = tmp_path / "out.jsonl.bak"
    assert backup.read_bytes() == before
    assert manifest_path(backup).read_bytes() == old_manifest
    assert json.loads(manifest_path(out).read_text())["settings"]["max_tokens"] == 5
    fresh = tmp_path / "fresh.jsonl"
    assert run(checkpoint, inp, fresh, "--max-tokens", "5", "--seed", "1") == 0
    assert out.read_bytes() == fresh.read_bytes()
    # A second --overwrite keeps the first backup too.
    assert run(checkpoint, inp, out, "--max-tokens", "5", "--seed", "1", "--overwrite") == 0
    assert backup.read_bytes() == before and (tmp_path / "out.jsonl.bak2").exists()


# --------------------------------------------------------------------------- errors


def test_truncated_json_line_points_at_its_end(checkpoint, tmp_path, capsys):
    line = '{"id": 3, "prompt": "x"'
    inp = write_jsonl(tmp_path / "in.jsonl", [*GOOD, line])
    assert run(checkpoint, inp, tmp_path / "out.jsonl") == 2
    err = capsys.readouterr().err
    assert f"in.jsonl:3: malformed JSON: Expecting ',' delimiter at column {len(line) + 1}" in err
    assert "is it cut short?" in err
    # A mistake inside the line: the column of the character where the colon is missing.
    line = '{"id": 3, "prompt" "x"}'
    inp = write_jsonl(tmp_path / "in2.jsonl", [line])
    assert run(checkpoint, inp, tmp_path / "out2.jsonl") == 2
    err = capsys.readouterr().err
    column = line.index('"x"') + 1
    assert f"Expecting ':' delimiter at column {column} (--skip" in err


def test_runtime_failure_exits_1_and_interrupt_130(checkpoint, tmp_path, capsys, monkeypatch):
    from lmgen_fast.api.generate import GenerationError

    inp = write_jsonl(tmp_path / "in.jsonl", prompts(6))
    out = tmp_path / "out.jsonl"
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise GenerationError("row 0 had nothing to sample at step 2", [[]])
        return real(*args, **kwargs)

    real = job_runner.generate_ids
    monkeypatch.setattr(job_runner, "generate_ids", failing)
    assert run(checkpoint, inp, out, "--max-tokens", "2", "--batch-size", "3",
               "--static-batches") == 1
    err = capsys.readouterr().err
    assert "generation failed for ids" in err and "a rerun resumes there" in err
    assert len(read_results(out)) == 3  # the first batch is kept

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job_runner, "generate_ids", interrupted)
    assert run(checkpoint, inp, out, "--max-tokens", "2", "--batch-size", "3") == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    assert len(read_results(out)) == 3


def mixed_lengths(n: int) -> list[dict]:
    rows = prompts(n)
    for i, r in enumerate(rows):
        r["max_tokens"] = (2, 9, 17)[(i * 5) % 3]
    return rows


def test_continuous_run_reports_slot_utilization_and_matches_static(checkpoint, tmp_path,
                                                                     capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", mixed_lengths(30))
    got = {}
    for mode in ("continuous", "static"):
        out, summary = tmp_path / f"{mode}.jsonl", tmp_path / f"{mode}.summary.json"
        extra = ["--static-batches"] if mode == "static" else []
        assert run(checkpoint, inp, out, "--seed", "4", "--batch-size", "4",
                   "--summary", str(summary), *extra) == 0
        err = capsys.readouterr().err
        got[mode] = json.loads(summary.read_text())
        s = got[mode]
        assert s["batching"] == mode and s["rows"] == 30 and s["batch_size"] == 4
        assert s["tokens"] == sum(r["num_tokens"] for r in read_results(out).values())
        assert s["slot_utilization"] == pytest.approx(100 * s["tokens"] / s["slot_steps"])
        assert f"{mode} batching, {s['steps']} steps, slot utilization " \
               f"{s['slot_utilization']:.1f}%" in err
        got[mode + " results"] = read_results(out)
    assert got["continuous results"] == got["static results"]
    # At most 4 slots a step (fewer once the tail compacts); static batches run to their
    # longest row.
    assert got["continuous"]["slot_steps"] <= 4 * got["continuous"]["steps"]
    assert got["continuous"]["steps"] < got["static"]["steps"]
    assert got["continuous"]["slot_utilization"] > got["static"]["slot_utilization"]


def test_continuous_run_killed_midway_resumes_without_loss_or_repeat(checkpoint, tmp_path,
                                                                     monkeypatch):
    n = 40
    inp = write_jsonl(tmp_path / "in.jsonl", mixed_lengths(n))
    out, full = tmp_path / "out.jsonl", tmp_path / "full.jsonl"
    common = ["--seed", "9", "--batch-size", "6"]
    real = job_runner.generate_ids
    seen = []

    def killed(*args, on_row, **kwargs):
        def row(*a):
            on_row(*a)
            seen.append(a[0])
            if len(seen) == 7:  # rows are in flight in the other slots
                raise KeyboardInterrupt
        return real(*args, on_row=row, **kwargs)

    monkeypatch.setattr(job_runner, "generate_ids", killed)
    assert run(checkpoint, inp, out, *common) == 130
    assert len(read_results(out)) == 7
    monkeypatch.setattr(job_runner, "generate_ids", real)
    assert run(checkpoint, inp, out, "--batch-size", "3", *common[:2]) == 0
    assert run(checkpoint, inp, full, "--static-batches", *common) == 0
    assert out.read_bytes().count(b"\n") == n  # nothing doubled (read_results checks ids)
    assert read_results(out) == read_results(full)
    assert _ids_in_file_order(out) == [r["id"] for r in mixed_lengths(n)]


# --------------------------------------------------------------------------- progress


def test_progress_rate_in_a_log_matches_the_summary(checkpoint, tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(24))
    out = tmp_path / "out.jsonl"
    directory = checkpoint[0]
    assert main(["run", "--input", str(inp), "--output", str(out), "--model", str(directory),
                 "--device", "cpu", "--max-tokens", "8", "--seed", "1"]) == 0
    err = capsys.readouterr().err  # not a terminal: plain progress lines
    progress = [x for x in err.splitlines() if x.startswith("rows ")]
    assert progress and progress[-1].startswith("rows 24/24 (100%)")
    shown = float(progress[-1].split(" tok, ")[1].split(" tok/s")[0])
    summary = float(err.split("tokens in ")[1].split("(")[1].split(" tokens/s")[0])
    assert abs(shown - summary) <= 0.05 * summary, (shown, summary)
