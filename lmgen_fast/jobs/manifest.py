"""What produced a job's output: the manifest beside it, and the check a rerun must pass.

A result file says which ids are done, not how they were made. Resuming into it with other
sampling settings, another input file or another model would mix results silently, so
``lmgen-fast run`` writes ``OUTPUT.manifest.json`` before its first row and compares it on
every rerun. Compared (a difference refuses the run, exit status 2):

* ``settings``: every option that changes a row's tokens or its result line
  (``--max-tokens``, the sampling options, ``--seed``, ``--n``, the stop options);
* ``input``: the SHA-256 of the input file's bytes (its path is recorded, not compared, so
  a job survives a moved input);
* ``model``: the embedded model's version and the digest of its files, or the digest of a
  ``--model`` directory's config, weight and tokenizer files, and of ``--tokenizer``.

``lmgen-fast score`` writes the same manifest with its own settings and ``"command":
"score"``: an output of one command is never resumed by the other.

Recorded, not compared: the lmgen-fast version (another version warns), the device and the
backend (a job may move between machines; seeded rows sample the same tokens on every
backend).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from lmgen_fast.core.version import PROG, __version__
from lmgen_fast.jobs.inputs import JobError
from lmgen_fast.jobs.jsonl import merge_parts, part_files, write_atomic

FORMAT = 1
SUFFIX = ".manifest.json"
# The options whose values change a row's tokens, by argparse dest; the option is
# "--" + dest with dashes.
RESULT_OPTIONS = (
    "max_tokens", "temperature", "top_k", "repetition_penalty", "penalty_range",
    "penalty_scope", "penalty_mode", "top_p", "min_p", "frequency_penalty",
    "presence_penalty", "seed", "logprobs_mode", "n", "stop", "stop_token_id", "min_tokens",
    "include_stop_str", "json_schema", "regex", "grammar", "logit_bias", "allowed_token_ids",
)
# Result-changing options added after format 1 was fixed, with the value that outputs made
# before them were made with, so that those outputs still resume.
_LATER_OPTIONS = {"logprobs_mode": "raw", "n": None, "stop": None, "stop_token_id": None,
                  "min_tokens": 0, "include_stop_str": False, "json_schema": None,
                  "regex": None, "grammar": None, "logit_bias": None,
                  "allowed_token_ids": None}
# Files of a checkpoint directory that decide its outputs; anything else (a README, logs,
# optimizer state under another name) may change without changing the model.
_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CHUNK = 1 << 20


class ManifestMismatch(JobError):
    """A rerun whose settings, input or model differ from those of the existing output."""


def manifest_path(output: str | Path) -> Path:
    """The manifest of ``output``: ``OUTPUT.manifest.json`` beside it."""
    output = Path(output)
    return output.with_name(output.name + SUFFIX)


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    str
        64 hex digits.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files_digest(files: Mapping[str, Path]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        # Name and content both: two files swapping contents is a different model.
        h.update(name.encode("utf-8") + b"\0" + bytes.fromhex(file_digest(files[name])))
    return h.hexdigest()


def model_identity(model_dir: str | None, tokenizer_file: str | None) -> dict:
    """Who makes the tokens: the embedded model or a checkpoint directory, and the tokenizer.

    Parameters
    ----------
    model_dir : str or None
        ``--model``; ``None`` is the embedded model.
    tokenizer_file : str or None
        ``--tokenizer``; ``None`` is the model's own.

    Returns
    -------
    dict
        ``{"model": {"path", "sha256"[, "version"]}, "tokenizer": {"path", "sha256"} or
        None}``. The model's digest covers its config, weight and tokenizer files.
    """
    if model_dir is None:
        assets = resources.files("lmgen_fast") / "assets"
        files = {name: Path(str(assets / name))
                 for name in ("config.json", "model.safetensors", "tokenizer.json")}
        model = {"path": "embedded", "version": __version__, "sha256": _files_digest(files)}
    else:
        directory = Path(model_dir)
        if not directory.is_dir():
            raise JobError(f"model directory not found: {directory}")
        files = {p.name: p for p in directory.iterdir()
                 if p.is_file() and (p.name in _MODEL_FILES or p.suffix in _WEIGHT_SUFFIXES
                                     or p.name.endswith(".safetensors.index.json"))}
        model = {"path": str(directory.resolve()), "sha256": _files_digest(files)}
    tokenizer = None
    if tokenizer_file is not None:
        if not Path(tokenizer_file).is_file():
            raise JobError(f"tokenizer file not found: {tokenizer_file}")
        tokenizer = {"path": str(Path(tokenizer_file).resolve()),
                     "sha256": file_digest(tokenizer_file)}
    return {"model": model, "tokenizer": tokenizer}


def build_manifest(args, identity: Mapping, *, options: Sequence[str] = RESULT_OPTIONS,
                   command: str = "run") -> dict:
    """The manifest of a ``run`` with options ``args`` and :func:`model_identity` ``identity``.

    Parameters
    ----------
    args : argparse.Namespace
        The options of ``lmgen-fast run`` (or of ``command``).
    identity : mapping
        From :func:`model_identity`.
    options : sequence of str
        The options (argparse dests) whose values change a result: ``settings``.
    command : str
        The command that writes the output; another command's output is never resumed
        (recorded as ``command`` for any but ``run``).

    Returns
    -------
    dict
        ``format``, ``lmgen_fast`` (the version), ``settings``, ``input``, ``model``,
        ``tokenizer`` and ``recorded`` (device and backend, never compared). Nothing in it
        depends on the output path or the rank, so every rank of a job writes the same one.
    """
    manifest = {
        "format": FORMAT,
        "lmgen_fast": __version__,
        "settings": {name: getattr(args, name) for name in options},
        "input": {"path": str(Path(args.input).resolve()), "sha256": file_digest(args.input)},
        "model": dict(identity["model"]),
        "tokenizer": None if identity["tokenizer"] is None else dict(identity["tokenizer"]),
        "recorded": {"device": args.device, "backend": getattr(args, "backend", None)},
    }
    if command != "run":
        manifest["command"] = command
    return manifest


def read_manifest(output: str | Path) -> dict | None:
    """The manifest beside ``output``, or ``None`` when there is none.

    Raises
    ------
    JobError
        A manifest that is not a JSON object of this format.
    """
    path = manifest_path(output)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise JobError(f"{path} is not a valid manifest ({err}); pass --overwrite to start "
                       "afresh") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise JobError(f"{path} is not a manifest of this version of {PROG}; pass --overwrite "
                       "to start afresh")
    return data


def write_manifest(output: str | Path, manifest: Mapping) -> Path:
    """Write ``manifest`` beside ``output`` atomically; return its path."""
    path = manifest_path(output)
    write_atomic(path, [json.dumps(manifest, indent=2, ensure_ascii=False).encode() + b"\n"])
    return path


def _short(digest: str | None) -> str:
    return f"sha256 {digest[:12]}" if digest else "no digest"


def differences(old: Mapping, new: Mapping) -> list[str]:
    """Each way ``new`` would produce other results than ``old``, as a phrase.

    Parameters
    ----------
    old, new : mapping
        Manifests from :func:`build_manifest`: the output's and this run's.

    Returns
    -------
    list of str
        Empty when a rerun may resume: same settings, same input bytes, same model and
        tokenizer bytes.
    """
    found = []
    was_made, now_made = old.get("command", "run"), new.get("command", "run")
    if was_made != now_made:
        found.append(f"the output was made by `{PROG} {was_made}`, not `{PROG} {now_made}`")
    for name in new["settings"]:
        was = old.get("settings", {}).get(name, _LATER_OPTIONS.get(name))
        now = new["settings"][name]
        if was != now:
            found.append(f"--{name.replace('_', '-')} {json.dumps(now)} "
                         f"(the output was made with {json.dumps(was)})")
    old_in, new_in = old.get("input") or {}, new["input"]
    if old_in.get("sha256") != new_in["sha256"]:
        found.append(f"--input {new_in['path']} ({_short(new_in['sha256'])}) is not the input "
                     f"the output was made from ({old_in.get('path')}, "
                     f"{_short(old_in.get('sha256'))})")
    for part, option in (("model", "--model"), ("tokenizer", "--tokenizer")):
        was, now = old.get(part) or None, new[part]
        if (was or {}).get("sha256") != (now or {}).get("sha256"):
            found.append(f"{option} {_describe(now, part)} is not the {part} the output was "
                         f"made with ({_describe(was, part)})")
    return found


def _describe(entry: Mapping | None, part: str) -> str:
    if entry is None:
        return "the model's own" if part == "tokenizer" else "unknown"
    if entry.get("path") == "embedded":
        return f"the embedded model of {PROG} {entry.get('version')}, {_short(entry['sha256'])}"
    return f"{entry.get('path')}, {_short(entry.get('sha256'))}"


def backup_path(output: str | Path) -> Path:
    """The first free backup name of ``output``: ``OUTPUT.bak``, then ``OUTPUT.bak2``, ..."""
    output = Path(output)
    n = 1
    while True:
        candidate = output.with_name(f"{output.name}.bak{n if n > 1 else ''}")
        if not candidate.exists() and not manifest_path(candidate).exists():
            return candidate
        n += 1


def has_results(output: str | Path) -> bool:
    """Whether ``output`` or any of its rank part files holds anything."""
    output = Path(output)
    paths = [output, *(p for p, _rank, _world in part_files(output))]
    return any(p.exists() and p.stat().st_size > 0 for p in paths)


def prepare_output(output: str | Path, manifest: Mapping, *, overwrite: bool) -> str | None:
    """Make ``output`` safe to resume into with ``manifest``, or refuse.

    Parameters
    ----------
    output : str or Path
        The job's output file.
    manifest : mapping
        This run's manifest (:func:`build_manifest`).
    overwrite : bool
        Move an existing output (with its parts, merged in first, and its manifest) to
        :func:`backup_path` and start afresh.

    Returns
    -------
    str or None
        A line for stderr about what was done (a backup, another lmgen-fast version), or
        ``None``.

    Raises
    ------
    ManifestMismatch
        Without ``overwrite``: the output exists without a manifest, or its manifest
        differs from ``manifest``; the message names every difference. Nothing is changed.
    """
    output = Path(output)
    old = read_manifest(output) if not overwrite else None
    exists = has_results(output)
    if overwrite:
        note = None
        if exists or manifest_path(output).exists():
            # Parts are folded in first, so that the backup is the whole old output.
            merge_parts(output)
            backup = backup_path(output)
            if output.exists():
                os.replace(output, backup)
            if manifest_path(output).exists():
                os.replace(manifest_path(output), manifest_path(backup))
            note = f"--overwrite: the old output is now {backup}"
        write_manifest(output, manifest)
        return note
    hint = (f"pass --overwrite to start afresh (the old output is kept as "
            f"{backup_path(output).name}), or choose another --output")
    if old is None or not exists:
        # A manifest without results (a run that stopped before its first row) protects
        # nothing: this run's replaces it.
        if exists:
            raise ManifestMismatch(
                f"{output} holds results but no manifest ({manifest_path(output).name}), so "
                f"what made them is unknown and new rows could not be told apart from them; "
                f"{hint}")
        write_manifest(output, manifest)
        return None
    found = differences(old, manifest)
    if found:
        raise ManifestMismatch(
            f"{output} was made differently, so this run cannot resume it: "
            f"{'; '.join(found)}. Rerun with the output's settings to resume, or {hint}")
    if old.get("lmgen_fast") != manifest["lmgen_fast"]:
        return (f"note: {output} was started by {PROG} {old.get('lmgen_fast')}; resuming "
                f"with {manifest['lmgen_fast']}")
    return None


def print_note(note: str | None) -> None:
    """Print a line from :func:`prepare_output` to stderr, if any."""
    if note:
        print(f"{PROG}: {note}", file=sys.stderr)


__all__ = [
    "ManifestMismatch",
    "backup_path",
    "build_manifest",
    "differences",
    "file_digest",
    "has_results",
    "manifest_path",
    "model_identity",
    "prepare_output",
    "read_manifest",
    "write_manifest",
]
