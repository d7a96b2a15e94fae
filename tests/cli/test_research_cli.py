"""``lmgen-fast generate`` with samples, stops, token-id and chat prompts, and ``--threads``."""

from __future__ import annotations

import json

import pytest
import torch

from lmgen_fast import generate_batch, load_default
from lmgen_fast.api.tokenization import adapt_tokenizer
from lmgen_fast.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "A list is"
SETTINGS = ["--max-tokens", "16", "--temperature", "0.9", "--seed", "5", "--device", "cpu"]


def test_samples_and_stops_print_what_the_library_returns(capsys):
    model, tokenizer = load_default()
    want = generate_batch(model, tokenizer, [PROMPT], 16, temperature=0.9, seed=5, n=3,
                          stop=[" the", "."], return_details=True)
    torch.set_num_threads(2)
    try:
        assert main(["generate", PROMPT, *SETTINGS, "--n", "3", "--stop", " the", "--stop",
                     ".", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 2  # restored for the caller
    finally:
        torch.set_num_threads(1)
    got = capsys.readouterr()
    lines = []
    for j, g in enumerate(want):
        why = g.finish_reason + ("" if g.stop_reason is None else f" {json.dumps(g.stop_reason)}")
        lines += [f"--- sample {j + 1} of 3: {len(g.token_ids)} tokens, {why} ---", g.text]
    assert got.out == "\n".join(lines) + "\n"
    assert "(1 CPU thread)" in got.err
    # One sample: the text alone; the speed line says why it ended.
    ids = adapt_tokenizer(tokenizer).encode_prompt(PROMPT)
    assert main(["generate", "--prompt-token-ids", json.dumps(ids), *SETTINGS, "--stop", " the",
                 "--stop", ".", "--stream"]) == 0
    got = capsys.readouterr()
    assert got.out == want[0].text + "\n"
    assert f"finish: {want[0].finish_reason}" in got.err


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["generate", "x", "--chat", "y"], "give exactly one of PROMPT, --chat and --prompt-token-ids"),
    (["generate", "x", "--system", "y"], "--system needs --chat"),
    (["generate", "--prompt-token-ids", "1,x"], "--prompt-token-ids must be token ids >= 0"),
    (["generate", "--prompt-token-ids", "[]"], "--prompt-token-ids must be token ids >= 0"),
    (["generate", "x", "--n", "2", "--stream"], "--stream prints one sample"),
    (["generate", "x", "--n", "0"], "--n must be >= 1, got 0"),
    (["generate", "x", "--stop", ""], "--stop strings must not be empty"),
    (["generate", "x", "--min-tokens", "9", "--max-tokens", "4"],
     "--min-tokens 9 is above --max-tokens 4"),
    (["generate", "x", "--stop-token-id", "99999", "--device", "cpu"],
     "stop_token_ids has token id 99999, outside the vocabulary"),
    (["generate", "--chat", "hi", "--device", "cpu"], "chat template"),
    (["generate", "--prompt-token-ids", "1,99999", "--device", "cpu"],
     "prompt_token_ids has token id 99999, outside the vocabulary"),
    (["bench", "--threads", "-1"], "--threads must be >= 1, got -1"),
    (["run", "--input", "a", "--output", "b", "--stop-token-id", "-1"],
     "--stop-token-id must be >= 0, got -1"),
])
def test_bad_research_options_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmgen-fast: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


class ChatTokenizer:
    """The embedded tokenizer with a chat template, as a transformers tokenizer has one."""

    chat_template = "{role}: {content} lines, then assistant:"

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def apply_chat_template(self, messages, add_generation_prompt: bool, tokenize: bool):
        assert add_generation_prompt and tokenize
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return [self.inner.token_to_id("[BOT]"), *self.inner.encode(text).ids]


def test_chat_equals_the_templates_ids_in_generate_and_run(tmp_path, capsys, monkeypatch):
    model, tokenizer = load_default()
    chat_tokenizer = ChatTokenizer(tokenizer)
    for module in ("generate", "run"):
        monkeypatch.setattr(f"lmgen_fast.cli.{module}.load_model_and_tokenizer",
                            lambda *_: (model, chat_tokenizer))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ids = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert main(["generate", "--chat", "hi", "--system", "be brief", *SETTINGS]) == 0
    chat = capsys.readouterr().out
    assert main(["generate", "--prompt-token-ids", ",".join(map(str, ids)), *SETTINGS]) == 0
    assert capsys.readouterr().out == chat
    rows = [{"id": "chat", "messages": messages, "seed": 3},
            {"id": "ids", "prompt_token_ids": ids, "seed": 3}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["run", "--input", str(inp), "--output", str(out), "--no-progress",
                 *SETTINGS]) == 0
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert got["chat"]["token_ids"] == got["ids"]["token_ids"]
