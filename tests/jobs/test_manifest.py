"""The manifest of ``lmgen-fast run``: a rerun that would make other results is refused, one
that would make the same results resumes (README, "Batch jobs"; lmgen_fast.jobs.manifest).

Every option of ``lmgen-fast run`` is classified here as result-changing (compared) or not
(device, backend, batching, speculation: recorded or ignored), and the sampling options are
derived from ``dataclasses.fields(SamplingParams)``, so a new field or option fails
:func:`test_every_run_option_is_classified` until it is given a side. Most cases go through
the manifest functions (``build_manifest`` on a Namespace from the command's own parser,
``prepare_output``), which is what ``lmgen-fast run`` does before it loads a model; one
end-to-end case runs the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from lmgen_fast.cli import build_parser, main
from lmgen_fast.cli.run import add_run_arguments
from lmgen_fast.core.params import SamplingParams
from lmgen_fast.jobs.inputs import PARAM_FIELDS
from lmgen_fast.jobs.manifest import (
    ManifestMismatch,
    build_manifest,
    differences,
    manifest_path,
    model_identity,
    prepare_output,
    read_manifest,
    write_manifest,
)

from conftest import write_checkpoint

SAMPLING_FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]
# SamplingParams field -> the `run` option's argparse dest, where the two names differ.
DEST = {"repetition_penalty_range": "penalty_range", "stop_token_ids": "stop_token_id",
        "include_stop_str_in_output": "include_stop_str"}


def _text_file(name: str, text: str) -> str:
    """The path of a file holding ``text``, made once for the module."""
    path = Path(tempfile.gettempdir()) / f"lmgen-fast-test-manifest-{os.getpid()}-{name}"
    path.write_text(text)
    return str(path)


# Fields whose other value `other_value` cannot guess: (the value as the option's dest or a
# line holds it, the option's arguments).
OTHER_VALUES = {
    "stop": (["</answer>"], ["</answer>"]), "stop_token_ids": ([5], ["5"]),
    "include_stop_str_in_output": (True, []), "logit_bias": ([[5, 1.0]], ["5:1"]),
    "allowed_token_ids": ([5, 6], ["6,5"]), "regex": ("a+", ["a+"]),
    # --json-schema and --grammar name files; the manifest records their text.
    "json_schema": ('{"type": "object"}', [_text_file("schema.json", '{"type": "object"}')]),
    "grammar": ('root ::= "a"', [_text_file("grammar.ebnf", 'root ::= "a"')]),
}
# Result-changing options that are not SamplingParams fields, with another valid value.
OTHER_RESULT_OPTIONS = {"max_tokens": "7"}
# Options that do not change a seeded row's tokens (README: "The device and backend are
# recorded but not compared"; a seeded row's tokens depend on neither the batch size nor the
# batching; --speculative gives the same tokens for seeded and greedy rows), each with a
# value other than the default, or None for a flag. Also the run's own plumbing (paths,
# progress, overwrite), which only decides where and how results are written.
NOT_RESULT_OPTIONS = {
    "device": "cpu", "backend": "reference", "batch_size": "3", "static_batches": None,
    "no_cuda_graph": None, "sync_every": "5", "speculative": "ngram",
    "num_speculative_tokens": "2", "no_progress": None, "summary": "SUMMARY",
    "skip_invalid": None,
}
PLUMBING = {"input", "output", "overwrite", "errors", "model", "tokenizer"}


def run_actions() -> dict[str, argparse.Action]:
    """The options of ``lmgen-fast run`` by dest."""
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def other_value(name: str) -> object:
    """A valid value of SamplingParams field ``name`` other than its default: from the
    option's choices for a string, else the first of a few numbers SamplingParams takes."""
    if name in OTHER_VALUES:
        return OTHER_VALUES[name][0]
    field = next(f for f in dataclasses.fields(SamplingParams) if f.name == name)
    default = field.default
    action = run_actions().get(DEST.get(name, name))
    if action is not None and action.choices:
        return next(c for c in action.choices if c != default)
    for candidate in (0.5, 2, 3, 0.25, 7, 0):
        value = int(candidate) if default is None or isinstance(default, int) else candidate
        if value == default:
            continue
        try:
            SamplingParams(**{name: value})
        except ValueError:
            continue
        return value
    raise AssertionError(f"no other valid value found for SamplingParams.{name}")


@pytest.fixture(scope="module")
def embedded():
    """The embedded model's identity (hashing its files once for the module)."""
    return model_identity(None, None)


@pytest.fixture
def job(tmp_path):
    """An input file and the path of an output beside it."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "the fox"}\n{"id": 2, "prompt": "a dog"}\n')
    return inp, tmp_path / "out.jsonl"


def parse(inp: Path, out: Path, *extra: str) -> argparse.Namespace:
    """The Namespace ``lmgen-fast run`` gets for these arguments, from the command's parser."""
    return build_parser().parse_args(["run", "--input", str(inp), "--output", str(out), *extra])


BASE = ("--max-tokens", "4", "--seed", "5")


def started(out: Path, manifest: dict) -> bytes:
    """Make ``out`` an output with one result made under ``manifest``; return its bytes."""
    write_manifest(out, manifest)
    out.write_text('{"id": 1, "text": "x", "token_ids": [3], "finish_reason": "length", '
                   '"num_tokens": 1}\n')
    return out.read_bytes()


def assert_refused(out: Path, old: dict, new: dict, named: str) -> None:
    """``new`` may not resume ``out`` (made under ``old``): refused naming ``named``, and
    neither the output nor its manifest is touched."""
    before, kept = started(out, old), manifest_path(out).read_bytes()
    found = differences(old, new)
    assert any(named in d for d in found), (named, found)
    with pytest.raises(ManifestMismatch, match="was made differently") as err:
        prepare_output(out, new, overwrite=False)
    assert named in str(err.value)
    assert out.read_bytes() == before and manifest_path(out).read_bytes() == kept


def assert_resumes(out: Path, old: dict, new: dict) -> None:
    before = started(out, old)
    assert differences(old, new) == []
    assert prepare_output(out, new, overwrite=False) is None
    assert out.read_bytes() == before


def test_every_run_option_is_classified():
    dests = set(run_actions())
    fields = {DEST.get(f, f) for f in SAMPLING_FIELDS}
    classified = fields | set(OTHER_RESULT_OPTIONS) | set(NOT_RESULT_OPTIONS) | PLUMBING
    assert dests <= classified, f"unclassified run options: {sorted(dests - classified)}"
    # Each SamplingParams field is a run option or at least a per-row field of the input.
    for name in SAMPLING_FIELDS:
        assert DEST.get(name, name) in dests or name in PARAM_FIELDS, name
    assert not (set(NOT_RESULT_OPTIONS) & (fields | set(OTHER_RESULT_OPTIONS)))


@pytest.mark.parametrize("name", SAMPLING_FIELDS)
def test_a_changed_sampling_field_is_refused(name, job, embedded):
    inp, out = job
    dest = DEST.get(name, name)
    old = build_manifest(parse(inp, out, *BASE), embedded)
    if dest in run_actions():
        value = other_value(name)
        given = (option(dest), *(OTHER_VALUES[name][1] if name in OTHER_VALUES
                                 else [str(value)]))
        new = build_manifest(parse(inp, out, *BASE, *given), embedded)
        assert getattr(parse(inp, out, *given), dest) == value
        assert_refused(out, old, new, option(dest))
        # The output made with the changed setting resumes under that setting only.
        manifest_path(out).unlink()
        out.unlink()
        assert_resumes(out, new, build_manifest(parse(inp, out, *BASE, *given), embedded))
    else:
        # Only a per-row field (e.g. logprobs): another value is another input file.
        row = {"id": 1, "prompt": "the fox", name: other_value(name)}
        inp.write_text(json.dumps(row) + "\n" + inp.read_text().split("\n", 1)[1])
        new = build_manifest(parse(inp, out, *BASE), embedded)
        assert_refused(out, old, new, "is not the input the output was made from")


@pytest.mark.parametrize("dest", sorted(OTHER_RESULT_OPTIONS))
def test_other_result_options_are_refused(dest, job, embedded):
    inp, out = job
    old = build_manifest(parse(inp, out, *BASE), embedded)
    new = build_manifest(parse(inp, out, *BASE, option(dest), OTHER_RESULT_OPTIONS[dest]),
                         embedded)
    assert_refused(out, old, new, option(dest))


def test_the_seed_and_its_absence_differ(job, embedded):
    inp, out = job
    seeded = build_manifest(parse(inp, out, "--seed", "0"), embedded)
    unseeded = build_manifest(parse(inp, out), embedded)
    assert_refused(out, seeded, unseeded, "--seed")


def test_another_input_is_refused_a_moved_one_resumes(job, embedded, tmp_path):
    inp, out = job
    old = build_manifest(parse(inp, out, *BASE), embedded)
    moved = tmp_path / "elsewhere" / "in.jsonl"
    moved.parent.mkdir()
    shutil.copy(inp, moved)
    assert_resumes(out, old, build_manifest(parse(moved, out, *BASE), embedded))
    # One byte more: another input, though its path is the same.
    inp.write_text(inp.read_text() + "\n")
    assert_refused(out, old, build_manifest(parse(inp, out, *BASE), embedded),
                   "is not the input the output was made from")


def model_dir(path: Path) -> Path:
    """A directory laid out like a checkpoint (only its bytes matter to the manifest)."""
    path.mkdir()
    (path / "config.json").write_text('{"hidden_size": 64}')
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "tokenizer.json").write_text('{"model": "bpe"}')
    return path


@pytest.mark.parametrize("changed", ["config.json", "model.safetensors", "tokenizer.json",
                                     "extra.safetensors", "tokenizer_config.json"])
def test_another_model_is_refused(changed, job, tmp_path):
    inp, out = job
    directory = model_dir(tmp_path / "ckpt")
    args = parse(inp, out, *BASE, "--model", str(directory))
    old = build_manifest(args, model_identity(args.model, args.tokenizer))
    target = directory / changed
    target.write_bytes((target.read_bytes() if target.exists() else b"") + b" ")
    new = build_manifest(args, model_identity(args.model, args.tokenizer))
    assert_refused(out, old, new, f"--model {directory.resolve()}")


def test_the_embedded_model_and_a_directory_differ(job, embedded, tmp_path):
    inp, out = job
    directory = model_dir(tmp_path / "ckpt")
    old = build_manifest(parse(inp, out, *BASE), embedded)
    args = parse(inp, out, *BASE, "--model", str(directory))
    assert_refused(out, old, build_manifest(args, model_identity(args.model, None)), "--model")


def test_another_tokenizer_is_refused(job, embedded, tmp_path):
    inp, out = job
    tok = tmp_path / "tok.json"
    tok.write_text('{"model": "bpe"}')
    plain = build_manifest(parse(inp, out, *BASE), embedded)
    args = parse(inp, out, *BASE, "--tokenizer", str(tok))
    with_tok = build_manifest(args, model_identity(None, args.tokenizer))
    assert_refused(out, plain, with_tok, "--tokenizer")
    tok.write_text('{"model": "wordpiece"}')
    changed = build_manifest(args, model_identity(None, args.tokenizer))
    assert_refused(out, with_tok, changed, "--tokenizer")


def test_files_that_do_not_make_the_model_may_change(job, tmp_path):
    inp, out = job
    directory = model_dir(tmp_path / "ckpt")
    args = parse(inp, out, *BASE, "--model", str(directory))
    old = build_manifest(args, model_identity(args.model, None))
    (directory / "README.md").write_text("notes")
    (directory / "train.log").write_text("loss 1.0")
    assert_resumes(out, old, build_manifest(args, model_identity(args.model, None)))


@pytest.mark.parametrize("dest", sorted(NOT_RESULT_OPTIONS))
def test_options_that_do_not_change_results_resume(dest, job, embedded):
    inp, out = job
    old = build_manifest(parse(inp, out, *BASE), embedded)
    value = NOT_RESULT_OPTIONS[dest]
    extra = [option(dest)] if value is None else [option(dest), value]
    args = parse(inp, out, *BASE, *extra)
    assert getattr(args, dest) != getattr(parse(inp, out, *BASE), dest)
    assert_resumes(out, old, build_manifest(args, embedded))


@pytest.mark.parametrize("backend", sorted(run_actions()["backend"].choices))
def test_device_and_backend_are_recorded_not_compared(backend, job, embedded):
    inp, out = job
    old = build_manifest(parse(inp, out, *BASE, "--device", "cuda:1"), embedded)
    new = build_manifest(parse(inp, out, *BASE, "--device", "cpu", "--backend", backend),
                         embedded)
    assert new["recorded"] == {"device": "cpu", "backend": backend}
    assert_resumes(out, old, new)


def test_another_version_resumes_with_a_note(job, embedded):
    inp, out = job
    new = build_manifest(parse(inp, out, *BASE), embedded)
    old = dict(new, lmgen_fast="0.0.1")
    started(out, old)
    note = prepare_output(out, new, overwrite=False)
    assert note is not None and "0.0.1" in note and new["lmgen_fast"] in note


def test_the_manifest_holds_every_compared_setting(job, embedded):
    """What is written is what is compared: every result option, by its own value."""
    inp, out = job
    args = parse(inp, out, *BASE, "--top-p", "0.9")
    manifest = build_manifest(args, embedded)
    write_manifest(out, manifest)
    saved = read_manifest(out)
    assert saved == json.loads(json.dumps(manifest))
    for name in SAMPLING_FIELDS:
        dest = DEST.get(name, name)
        if dest in run_actions():
            assert saved["settings"][dest] == getattr(args, dest), dest
    assert saved["settings"]["top_p"] == 0.9 and saved["settings"]["max_tokens"] == 4


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(directory)
    return directory


def test_command_refuses_another_top_p_and_resumes_on_another_batching(checkpoint, job,
                                                                        capsys, one_thread):
    inp, out = job

    def run(*extra: str) -> int:
        return main(["run", "--input", str(inp), "--output", str(out), "--model",
                     str(checkpoint), "--device", "cpu", "--no-progress", *BASE, *extra])

    assert run("--top-p", "0.8") == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert run("--top-p", "0.9") == 2
    err = capsys.readouterr().err
    assert "--top-p 0.9 (the output was made with 0.8)" in err
    assert out.read_bytes() == before
    assert run("--top-p", "0.8", "--batch-size", "1", "--static-batches", "--backend",
               "reference", "--sync-every", "3") == 0
    assert "2 already done" in capsys.readouterr().err
    assert out.read_bytes() == before
