"""The lm-evaluation-harness backend end to end, offline: tasks defined here from local JSON
files, run on one local transformers directory by the ``lmgen-fast`` backend and by the
harness's own ``hf`` backend."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from tokenizers import pre_tokenizers, processors  # noqa: E402

from conftest import CHAT_TEMPLATE, make_tokenizer  # noqa: E402

MC = [
    {"question": "The list type holds", "choices": ["items in order", "a key", "nothing"],
     "answer": 0},
    {"question": "A dict maps keys to", "choices": ["values", "lists of lists", "the file"],
     "answer": 0},
    {"question": "Python's for loop", "choices": ["walks an iterable", "returns", "x"],
     "answer": 1},
]
GEN = [{"prompt": "The list type", "target": " holds"},
       {"prompt": "A dict maps keys to values and", "target": " then"}]


def save_model(directory) -> None:
    """A tiny random Llama and a tokenizer that adds [BOT] itself and a leading space, so
    that its own encoding, the article's ([BOT] + " " + text) and the hf backend's with
    add_bos_token agree."""
    tok = make_tokenizer()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.post_processor = processors.TemplateProcessing(
        single="[BOT] $A", special_tokens=[("[BOT]", tok.token_to_id("[BOT]"))])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOT]", eos_token="[EOT]", unk_token="[UNK]",
        pad_token="[PAD]")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, initializer_range=0.3, bos_token_id=1, eos_token_id=2,
        pad_token_id=3)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(directory)


def write_tasks(directory) -> None:
    for name, rows in (("mc", MC), ("gen", GEN)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
              "test_split: test\n")
    (directory / "mc.yaml").write_text(
        "task: lmgen_test_mc\n" + common.format(path=directory / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\n"
          "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    (directory / "gen.yaml").write_text(
        "task: lmgen_test_gen\n" + common.format(path=directory / "gen.jsonl")
        + "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: target\n"
          "generation_kwargs:\n  until: [\"e\", \"\\n\"]\n  max_gen_toks: 6\n"
          "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")


@pytest.fixture
def offline_run(tmp_path, monkeypatch):
    """Offline: the model directory (:func:`save_model`) and a task manager of the tasks
    defined here only (indexing the harness's own thousands takes long)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    model_dir, task_dir = tmp_path / "model", tmp_path / "tasks"
    model_dir.mkdir()
    task_dir.mkdir()
    save_model(model_dir)
    write_tasks(task_dir)
    return model_dir, TaskManager(include_path=str(task_dir), include_defaults=False)


def test_lmgen_fast_backend_matches_the_hf_backend(offline_run):
    """Per-sample log-likelihoods within 1e-4, the same is_greedy flags and accuracies, and
    the same greedy generations as the harness's own hf backend on the same directory."""
    import lm_eval

    import lmgen_fast.integrations.lm_eval  # noqa: F401  (registers lmgen-fast)

    model_dir, manager = offline_run
    runs = {}
    for backend, args in (("lmgen-fast", {"pretrained": str(model_dir), "dtype": "float32"}),
                          ("hf", {"pretrained": str(model_dir), "dtype": "float32",
                                  "add_bos_token": True})):
        runs[backend] = lm_eval.simple_evaluate(
            model=backend, model_args=args, tasks=["lmgen_test_mc", "lmgen_test_gen"],
            task_manager=manager, device="cpu",
            batch_size=1 if backend == "hf" else 4, bootstrap_iters=0, log_samples=True)
    ours, theirs = runs["lmgen-fast"], runs["hf"]
    for task in ("lmgen_test_mc", "lmgen_test_gen"):
        a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert len(a) == len(b) == len(MC if task.endswith("mc") else GEN)
        for x, y in zip(a, b, strict=True):
            if task.endswith("mc"):
                got = [r[0] for r in x["resps"]]
                want = [r[0] for r in y["resps"]]
                assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
                assert [g[1] for g in got] == [w[1] for w in want]
            else:
                assert x["resps"] == y["resps"]
        if task.endswith("gen"):  # something was generated (until "e": a common letter)
            assert any(x["resps"][0][0] for x in a)
        metric = "acc,none" if task.endswith("mc") else "exact_match,none"
        assert ours["results"][task][metric] == theirs["results"][task][metric]


def test_backend_calls_truncate_long_contexts_and_roll_long_texts(tmp_path):
    """generate_until keeps a long context's last max_length - max_gen_toks tokens (the
    harness's rule); loglikelihood_rolling is score_rolling's total over windows; options
    are checked by name."""
    from lm_eval.api.instance import Instance

    from lmgen_fast import generate_batch, score_rolling
    from lmgen_fast.integrations.lm_eval import LmgenFastLM

    save_model(tmp_path)
    lm = LmgenFastLM(pretrained=str(tmp_path), device="cpu", batch_size="auto",
                     dtype="float32")
    long = " ".join(["the list type holds items in order"] * 30)
    ids = lm.adapter.encode_prompt(long)
    assert len(ids) > 128
    kwargs = {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}
    [text] = lm.generate_until([Instance("generate_until", {}, (long, kwargs), 0)])
    [want] = generate_batch(lm.model, lm.tokenizer, prompt_token_ids=[ids[-(128 - 5):]],
                            max_tokens=5, temperature=0.0, stop=["\n"])
    assert text == want
    [total] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long,), 0)])
    assert total == pytest.approx(score_rolling(lm.model, lm.tokenizer, [long])[0].total,
                                  abs=1e-4)
    with pytest.raises(ValueError, match="dtype='float64'"):
        LmgenFastLM(pretrained=str(tmp_path), device="cpu", dtype="float64")



def test_chat_template_runs_give_the_hf_backends_prompts_and_generations(offline_run):
    """With ``apply_chat_template=True`` (the harness's --apply_chat_template) both backends
    format the same chat prompts and generate the same greedy text from them; a tokenizer
    without a template is refused with the reason."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from lmgen_fast.integrations.lm_eval import LmgenFastLM

    model_dir, manager = offline_run
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model_dir)
    ours = LmgenFastLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=4)
    theirs = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=1,
                  add_bos_token=True)
    history = [{"role": "system", "content": "Be short."},
               {"role": "user", "content": "The list type"}]
    for gen_prompt in (True, False):
        assert ours.apply_chat_template(history, gen_prompt) == \
            theirs.apply_chat_template(history, gen_prompt)
    runs = [lm_eval.simple_evaluate(model=lm, tasks=["lmgen_test_gen"], task_manager=manager,
                                    apply_chat_template=True, bootstrap_iters=0,
                                    log_samples=True)
            for lm in (ours, theirs)]
    a, b = (sorted(r["samples"]["lmgen_test_gen"], key=lambda s: s["doc_id"]) for r in runs)
    assert [x["arguments"] for x in a] == [y["arguments"] for y in b]
    assert "<assistant>" in a[0]["arguments"][0][0]
    assert [x["resps"] for x in a] == [y["resps"] for y in b]
    assert any(x["resps"][0][0] for x in a)  # something was generated
    with pytest.raises(ValueError, match="chat template"):
        LmgenFastLM(pretrained="default", device="cpu").apply_chat_template(history)
