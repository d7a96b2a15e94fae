"""The constrained-sampling options of ``lmgen-fast generate`` and ``run``, and job lines."""

from __future__ import annotations

import argparse
import json
import re

import jsonschema
import pytest

from lmgen_fast.cli.main import main
from lmgen_fast.cli.structured import logit_bias, token_ids
from lmgen_fast.jobs.manifest import manifest_path

from conftest import write_checkpoint

pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"name": {"enum": ["ann", "bob"]},
                                           "age": {"type": "integer", "minimum": 1,
                                                   "maximum": 9}},
          "required": ["name", "age"]}
REGEX = r"[a-z]{1,5} [a-z]{1,5}\."


def test_run_constrains_rows_and_refuses_bad_lines_before_generating(tmp_path, capsys):
    """--json-schema applies to every row, a line's regex replaces it; a schema that does
    not compile and an id outside the vocabulary are refused before generating (the errors
    file names them with --skip-invalid); the manifest records the schema's text."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    _, tokenizer = write_checkpoint(directory)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    lines = [{"id": 1, "prompt": "the quick fox"},
             {"id": 2, "prompt": "a lazy dog", "regex": REGEX},
             {"id": 3, "prompt": "once", "json_schema": {"type": "nonsense"}},
             {"id": 4, "prompt": "upon", "logit_bias": {"9999": 1}},
             {"id": 5, "prompt": "time", "json_schema": None, "logit_bias": {"7": 2.5}}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    args = ["run", "--input", str(inp), "--output", str(out), "--model", str(directory),
            "--device", "cpu", "--no-progress", "--seed", "3", "--max-tokens", "40",
            "--json-schema", str(schema)]
    assert main(args) == 2
    assert "in.jsonl:3: json_schema" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--skip-invalid"]) == 0
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(got) == [1, 2, 5]
    jsonschema.validate(json.loads(got[1]["text"]), SCHEMA)
    assert got[1]["finish_reason"] == "stop"
    assert re.fullmatch(REGEX, got[2]["text"]), got[2]["text"]
    errors = {r["id"]: r["error"] for r in
              map(json.loads, (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines())}
    assert "json_schema" in errors[3] and "nonsense" in errors[3]
    assert "9999" in errors[4] and "vocabulary" in errors[4]
    settings = json.loads(manifest_path(out).read_text())["settings"]
    assert json.loads(settings["json_schema"]) == SCHEMA and settings["logit_bias"] is None


def test_option_values_are_parsed_or_refused(capsys):
    assert logit_bias("42:-5, 7:2.5") == [[7, 2.5], [42, -5.0]]
    assert logit_bias('{"42": -5, "7": 2.5}') == [[7, 2.5], [42, -5.0]]
    assert token_ids("9,1,5,1") == [1, 5, 9] and token_ids("[3, 2]") == [2, 3]
    for bad in ("42", "x:1", "1:inf", "-1:2", "{\"a\": 1}"):
        with pytest.raises(argparse.ArgumentTypeError, match="bias list"):
            logit_bias(bad)
    for bad in ("", "a,b", "-3"):
        with pytest.raises(argparse.ArgumentTypeError, match="token ids"):
            token_ids(bad)
    assert main(["generate", "hi", "--logit-bias", "1:nan"]) == 2
    assert "--logit-bias" in capsys.readouterr().err
    assert main(["generate", "hi", "--json-schema", "/nonexistent/schema.json"]) == 2
    assert "--json-schema" in capsys.readouterr().err
