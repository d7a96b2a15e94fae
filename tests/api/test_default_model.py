"""The embedded default model: it loads, generates, and has learned the held-out text."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from lmgen_fast import load_default
from lmgen_fast.api.default_model import load_model
from lmgen_fast.api.generate import generate
from lmgen_fast.models import LlamaConfig, LlamaForPretraining
from lmgen_fast.train import loop as T

ASSETS = resources.files("lmgen_fast") / "assets"
SHIPPED = ("model.safetensors", "config.json", "tokenizer.json")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def default():
    return load_default()


def test_shipped_files_fit_in_20_mb():
    sizes = {name: (ASSETS / name).stat().st_size for name in SHIPPED}
    assert sum(sizes.values()) <= 20 * 1024 * 1024, sizes


def test_loads_as_the_article_model_with_its_tokenizer(default):
    model, tokenizer = default
    assert isinstance(model, LlamaForPretraining)
    assert model.lm_head.weight.dtype == torch.float32
    assert model.lm_head.weight.device.type == "cpu"
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert tokenizer.get_vocab_size() == cfg.vocab_size
    for name in ("[UNK]", "[BOT]", "[EOT]", "[PAD]"):
        assert tokenizer.token_to_id(name) is not None, name
    text = "def f(x):\n    return {'a': 1} # \u00e9t\u00e9"
    assert tokenizer.decode(tokenizer.encode(" " + text).ids) == " " + text


def test_generates_on_the_cpu_reproducibly(default):
    model, tokenizer = default
    first = generate(model, tokenizer, "The list type", max_tokens=24, seed=3)
    again = generate(model, tokenizer, "The list type", max_tokens=24, seed=3)
    assert first == again
    assert first.strip()
    greedy = generate(model, tokenizer, "Return the number of", max_tokens=12, temperature=0)
    assert greedy.strip()


def test_held_out_loss_is_far_below_the_unigram_loss(default):
    """Scored here from the shipped files, on the documents the training never saw."""
    model, tokenizer = default
    metrics = json.loads((ASSETS / "metrics.json").read_text())
    split_seed = metrics["settings"]["split_seed"]
    train_docs, held_docs = T.split_documents(T.build_documents(), split_seed)
    # Documents keep their side of the split by a hash of their text; a different Python
    # version changes some docstrings, but the split must still be a real one.
    assert len(held_docs) >= 100
    assert 0.02 < len(held_docs) / (len(held_docs) + len(train_docs)) < 0.1
    train_ids = T.encode_documents(tokenizer, train_docs)
    held_ids = T.encode_documents(tokenizer, held_docs)
    unigram = T.unigram_losses(train_ids, held_ids, tokenizer.get_vocab_size())
    loss = T.held_out_loss(model, held_ids, metrics["settings"]["seq_len"])
    assert loss <= min(unigram.values()) - 1.5, (loss, unigram)


def _save_article_checkpoint(model: LlamaForPretraining, directory, name: str = "model.pt"):
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    state = model.state_dict()
    # The article's state dicts carry the rotary tables; they must be accepted.
    state["base_model.rotary_emb.cos"] = model.base_model.rotary_emb.cos
    state["base_model.rotary_emb.sin"] = model.base_model.rotary_emb.sin
    torch.save(state, directory / name)


def _tiny() -> LlamaForPretraining:
    torch.manual_seed(0)
    return LlamaForPretraining(LlamaConfig(
        vocab_size=64, max_position_embeddings=32, hidden_size=16, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    ))


@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin", "weights.pth"])
def test_load_model_reads_an_article_checkpoint(tmp_path, name):
    model = _tiny().eval()
    _save_article_checkpoint(model, tmp_path / "ckpt", name)
    loaded = load_model(tmp_path / "ckpt")
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_load_model_reads_safetensors(tmp_path):
    from safetensors.torch import save_file

    model = _tiny().eval()
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    ids = torch.randint(0, 64, (1, 5))
    torch.testing.assert_close(load_model(tmp_path)(ids), model(ids), rtol=0, atol=0)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_model(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    model = _tiny()
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    with pytest.raises(ValueError, match="no weights"):
        load_model(tmp_path)
    state = model.state_dict()
    state.pop("lm_head.weight")
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="does not match its config.*lm_head"):
        load_model(tmp_path)
    torch.save({"a": 1}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="state dict"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(tmp_path)


def test_load_model_sends_transformers_checkpoints_to_the_adapter(tmp_path):
    try:
        import lmgen_fast.models.hf as hf
    except ImportError:
        hf = None
    if getattr(hf, "load_hf_checkpoint", None) is not None:
        pytest.skip("the transformers adapter is installed; its own tests cover it")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="transformers checkpoint"):
        load_model(tmp_path)
