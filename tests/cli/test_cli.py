"""The ``lmgen-fast`` command: same text as the Python call, one-line errors, full --help."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib import metadata

import pytest

from lmgen_fast import load_default
from lmgen_fast.api.generate import generate
from lmgen_fast.cli.main import COMMANDS, main

SETTINGS = [
    "--max-tokens", "40", "--temperature", "0.9", "--top-k", "40",
    "--repetition-penalty", "1.3", "--penalty-range", "16", "--seed", "5", "--device", "cpu",
]
PROMPT = "A list is"


pytestmark = pytest.mark.usefixtures("one_thread")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "lmgen_fast.cli", *args],
        capture_output=True, text=True, encoding="utf-8", env=env, timeout=120,
    )


@pytest.fixture(scope="module")
def expected() -> str:
    model, tokenizer = load_default()
    return generate(model, tokenizer, PROMPT, max_tokens=40, temperature=0.9,
                    repetition_penalty=1.3, repetition_penalty_range=16, top_k=40, seed=5)


def test_command_line_gives_the_python_call_text(expected):
    done = _run_cli("generate", PROMPT, *SETTINGS)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"
    assert "tokens/s" in done.stderr


def test_stream_prints_the_same_text(expected, capsys):
    assert main(["generate", PROMPT, *SETTINGS, "--stream"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_process_error_is_one_line_without_traceback(tmp_path):
    done = _run_cli("generate", "hi", "--model", str(tmp_path / "absent"))
    assert done.returncode != 0
    absent = tmp_path / "absent"
    assert done.stderr.strip() == f"lmgen-fast: error: model directory not found: {absent}"
    assert "Traceback" not in done.stderr


def test_main_matches_the_python_call_in_process(expected, capsys):
    assert main(["generate", PROMPT, *SETTINGS]) == 0
    assert capsys.readouterr().out == expected + "\n"
    # Engine options change when the host looks, never the text.
    assert main(["generate", PROMPT, *SETTINGS, "--no-cuda-graph", "--sync-every", "7"]) == 0
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "x", "--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
        (["generate", "x", "--top-k", "many"], "argument --top-k: invalid int value: 'many'"),
        (["generate", "x", "--max-tokens", "-1"], "--max-tokens must be >= 0, got -1"),
        (["generate", "x", "--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
        (["generate", "x", "--penalty-range", "-3"], "--penalty-range must be >= 0, got -3"),
        (["generate", "x", "--seed", "-2"], "--seed must be in"),
        (["generate", "x", "--device", "tpu9"], "unknown device 'tpu9'"),
        (["generate", "x", "--device", "cuda:99"], "device 'cuda:99' requested but"),
        (["generate", "x", "--backend", "nope"], "argument --backend: invalid choice: 'nope'"),
        (["generate"], "give exactly one of PROMPT, --chat and --prompt-token-ids"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["bench", "--max-tokens", "0"], "--max-tokens must be > 0"),
        (["generate", "x", "--sync-every", "0"], "--sync-every must be >= 1, got 0"),
        (["run", "--input", "a", "--output", "b", "--sync-every", "-2"],
         "--sync-every must be >= 1, got -2"),
    ],
)
def test_bad_values_print_one_line_and_fail(args, message, capsys):
    assert main(args) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("lmgen-fast: error: ")
    assert message in err


def test_missing_files_print_one_line_and_fail(tmp_path, capsys):
    cases = [
        (["--model", str(tmp_path / "absent")], "model directory not found"),
        (["--model", str(tmp_path)], "no config.json in"),
        (["--tokenizer", str(tmp_path / "tok.json")], "tokenizer file not found"),
    ]
    for extra, message in cases:
        assert main(["generate", "x", *extra]) != 0
        err = capsys.readouterr().err
        assert err.startswith("lmgen-fast: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 64}))
    assert main(["generate", "x", "--model", str(tmp_path)]) != 0
    assert "no weights in" in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    for name in ("generate", "bench"):
        assert name in top
    for name, command in COMMANDS.items():
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)
        assert main([name, "--help"]) == 0
        text = capsys.readouterr().out
        for action in parser._actions:
            assert action.help, (name, action.dest)
            for flag in action.option_strings:
                assert flag in text, (name, flag)
    listed = {flag for a in _generate_actions() for flag in a.option_strings}
    for option in ("--max-tokens", "--temperature", "--top-k", "--repetition-penalty",
                   "--penalty-range", "--seed", "--model", "--tokenizer", "--device",
                   "--backend", "--stream"):
        assert option in listed, option


def _generate_actions():
    parser = argparse.ArgumentParser()
    COMMANDS["generate"].add_arguments(parser)
    return parser._actions


def test_console_script_is_declared():
    scripts = metadata.entry_points(group="console_scripts")
    assert any(ep.name == "lmgen-fast" and ep.value == "lmgen_fast.cli.main:main" for ep in scripts)


def test_bench_prints_a_table(capsys):
    assert main(["bench", "--device", "cpu", "--max-tokens", "8", "--calls", "2"]) == 0
    out = capsys.readouterr().out
    assert "article loop" in out and "lmgen-fast generate" in out
    assert "reference.sample" in out and "device:" in out
    # A figure copied from the table carries its command, machine and model with it.
    lines = out.splitlines()
    assert lines[0] == "command: lmgen-fast bench --device cpu --max-tokens 8 --calls 2"
    assert lines[1].startswith("device: ") and lines[2].startswith("model: embedded default")
    assert "speed-up (embedded model, this device)" in out


def test_prompt_that_is_not_utf8_is_a_usage_error():
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1", LC_ALL="C.UTF-8")
    done = subprocess.run(
        [sys.executable, "-m", "lmgen_fast.cli", "generate", b"caf\xe9 au lait", "--max-tokens",
         "2", "--device", "cpu"],
        capture_output=True, env=env, timeout=120,
    )
    err = done.stderr.decode("utf-8", "replace").strip()
    assert done.returncode == 2, err
    assert err == ("lmgen-fast: error: the prompt is not valid UTF-8 (byte 0xe9 at offset 3); "
                   "pass UTF-8 text, e.g. with a UTF-8 terminal or LANG=C.UTF-8")


@pytest.mark.parametrize("args, help_of", [
    (["run", "--input", "a", "--output", "b", "--frobnicate"], "lmgen-fast run --help"),
    (["generate", "x", "--temprature", "1"], "lmgen-fast generate --help"),
    (["bench", "--fast"], "lmgen-fast bench --help"),
])
def test_unknown_option_points_at_the_subcommand_help(args, help_of, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmgen-fast: error: unrecognized arguments: ")
    assert err.endswith(f"(see `{help_of}`)"), err


@pytest.mark.parametrize("args", [
    ["generate", "x", "--temperature", "-1"],       # a bad value
    ["generate", "x", "--top-k", "many"],            # a bad type
    ["frobnicate"],                                  # no such command
    ["run", "--input", "absent.jsonl", "--output", "b.jsonl"],  # a missing file
])
def test_every_user_error_exits_2(args, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("lmgen-fast: error: ")


def test_missing_model_directory_is_a_usage_error(tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path / "absent")]) == 2
    assert "model directory not found" in capsys.readouterr().err


def test_help_documents_the_exit_statuses(capsys):
    for args in (["--help"], ["run", "--help"], ["generate", "--help"], ["bench", "--help"]):
        assert main(args) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "exit status: 0 done; 1 a runtime failure" in text, args
        assert "2 a user error" in text and "130 interrupted" in text, args
