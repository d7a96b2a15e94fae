"""The command line's constrained-sampling options (SPEC section 7): ``--json-schema FILE``,
``--regex``, ``--grammar FILE``, ``--logit-bias`` and ``--allowed-token-ids``.

Each option's value is read and normalised by argparse itself (a schema or grammar file
becomes its text, a bias a list of ``[id, bias]`` pairs), so what the run's manifest
records is what the rows sample under, not a path. Whether a schema or grammar compiles
for the model's tokenizer is checked once the model is loaded, before generating.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

# SamplingParams' keywords and the options that give them, for error messages.
STRUCTURED_OPTION_NAMES = (
    ("json_schema", "--json-schema"),
    ("regex", "--regex"),
    ("grammar", "--grammar"),
    ("logit_bias", "--logit-bias"),
    ("allowed_token_ids", "--allowed-token-ids"),
)


def _text_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {err}") from None


def schema_file(path: str) -> str:
    """The JSON text of the schema file ``path`` (argparse type of ``--json-schema``)."""
    text = _text_file(path)
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{path} is not JSON ({err})") from None
    return text


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def logit_bias(text: str) -> list[list]:
    """``[[id, bias], ...]`` from a JSON object (``{"42": -5}``) or an ``ID:BIAS,...`` list
    (argparse type of ``--logit-bias``); biases finite, ids non-negative integers."""
    try:
        if text.lstrip().startswith("{"):
            pairs = list(json.loads(text).items())
        else:
            pairs = [item.split(":") for item in text.split(",") if item.strip()]
        out = {}
        for pair in pairs:
            token, bias = pair  # exactly two parts
            token = int(token)
            out[token] = _number(bias) if isinstance(bias, str) else float(bias)
            if token < 0 or not math.isfinite(out[token]):
                raise ValueError(pair)
    except (ValueError, TypeError, AttributeError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a bias list: give ID:BIAS pairs separated by commas "
            "(42:-5,7:2.5) or a JSON object ({\"42\": -5}), with finite biases") from None
    return [[t, out[t]] for t in sorted(out)]


def token_ids(text: str) -> list[int]:
    """Sorted distinct ids from ``1,5,9`` or a JSON list (argparse type of
    ``--allowed-token-ids``)."""
    try:
        items = json.loads(text) if text.lstrip().startswith("[") else text.split(",")
        ids = sorted({int(i) for i in items if str(i).strip()})
        if not ids or ids[0] < 0:
            raise ValueError(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of token ids: give non-negative integers separated by "
            "commas (1,5,9) or a JSON list") from None
    return ids


def add_structured_arguments(p: argparse.ArgumentParser) -> None:
    """Add the constrained-sampling options to ``p``."""
    p.add_argument("--json-schema", type=schema_file, default=None, metavar="FILE",
                   help="every row's output is a JSON value valid against the schema in FILE "
                        "(xgrammar, the structured extra); a row its schema completes ends "
                        "with finish_reason 'stop' (default: none)")
    p.add_argument("--regex", default=None, metavar="PATTERN",
                   help="every row's output fully matches PATTERN (default: none)")
    p.add_argument("--grammar", type=_text_file, default=None, metavar="FILE",
                   help="every row's output follows the EBNF grammar in FILE (GBNF style, "
                        "'root ::= ...') (default: none)")
    p.add_argument("--logit-bias", type=logit_bias, default=None, metavar="ID:BIAS,...",
                   help="add BIAS to token ID's logit before anything else, e.g. "
                        "'42:-100,7:2.5' or a JSON object (default: none)")
    p.add_argument("--allowed-token-ids", type=token_ids, default=None, metavar="ID,...",
                   help="sample only among these token ids (default: all)")


def structured_params(args: argparse.Namespace) -> dict:
    """The SamplingParams keywords of the options of :func:`add_structured_arguments`
    (absent ones at their defaults)."""
    return dict(json_schema=getattr(args, "json_schema", None),
                regex=getattr(args, "regex", None), grammar=getattr(args, "grammar", None),
                logit_bias=getattr(args, "logit_bias", None) or (),
                allowed_token_ids=getattr(args, "allowed_token_ids", None))
