"""The embedded default model, and a loader for article-style checkpoint directories.

:func:`load_default` reads the model shipped inside the package (trained by
:mod:`lmgen_fast.train` on Python's own documentation); nothing is downloaded.
:func:`load_model` reads a user's checkpoint directory.
"""

from __future__ import annotations

import importlib
import json
from importlib import resources
from pathlib import Path

import torch

from lmgen_fast.models import LlamaConfig, LlamaForPretraining

ASSET_FILES = ("model.safetensors", "config.json", "tokenizer.json")
STATE_DICT_NAMES = ("pytorch_model.bin", "model.pt", "model.pth", "model.bin")
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _build(config: LlamaConfig, state: dict, device, dtype: torch.dtype, source: str):
    model = LlamaForPretraining(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        # torch lists every key on one line per kind of problem; keep the first, shortened.
        lines = str(err).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        detail = detail if len(detail) <= 300 else detail[:300] + "..."
        raise ValueError(f"{source} does not match its config: {detail}") from None
    return model.to(device=_device(device), dtype=dtype).eval()


def load_default(
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForPretraining, object]:
    """Load the model and tokenizer that ship inside the package.

    Parameters
    ----------
    device : torch.device or str, optional
        Where to put the model (default: the CPU).
    dtype : torch.dtype
        The model's dtype; the weights are stored in float16 and converted.

    Returns
    -------
    (LlamaForPretraining, tokenizers.Tokenizer)
        The model in eval mode and its byte-level BPE tokenizer (``[UNK]``, ``[BOT]``,
        ``[EOT]``, ``[PAD]``).

    Examples
    --------
    >>> from lmgen_fast import generate, load_default
    >>> model, tokenizer = load_default()
    >>> text = generate(model, tokenizer, "The list type", max_tokens=20, seed=0)
    """
    from safetensors.torch import load as load_safetensors
    from tokenizers import Tokenizer

    assets = resources.files("lmgen_fast") / "assets"
    missing = [name for name in ASSET_FILES if not (assets / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the embedded model is missing {', '.join(missing)} in lmgen_fast/assets; "
            "reinstall lmgen-fast or retrain with `python -m lmgen_fast.train --out "
            "lmgen_fast/assets`"
        )
    config = LlamaConfig.from_dict(json.loads((assets / "config.json").read_text()))
    state = load_safetensors((assets / "model.safetensors").read_bytes())
    tokenizer = Tokenizer.from_str((assets / "tokenizer.json").read_text(encoding="utf-8"))
    model = _build(config, state, device, dtype, "the embedded model")
    return model, tokenizer


def _is_transformers_config(data: dict) -> bool:
    return "model_type" in data or "architectures" in data


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # SafetensorError is not a ValueError
            raise ValueError(f"cannot read {path}: {err}") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad or foreign pickle
        raise ValueError(f"cannot read the state dict {path}: {err}") from None
    # Training scripts often save {"model": state_dict, "optimizer": ...}.
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def find_weights(directory: str | Path) -> Path:
    """The weights file of a checkpoint directory.

    Parameters
    ----------
    directory : str or Path

    Returns
    -------
    Path
        ``model.safetensors`` if present, else a PyTorch state dict: one of
        ``pytorch_model.bin``, ``model.pt``, ``model.pth``, ``model.bin``, or the only file
        ending in ``.pt``, ``.pth`` or ``.bin``.

    Raises
    ------
    ValueError
        No weights file, or several candidates and none of the standard names.
    """
    directory = Path(directory)
    if (directory / "model.safetensors").is_file():
        return directory / "model.safetensors"
    for name in STATE_DICT_NAMES:
        if (directory / name).is_file():
            return directory / name
    found = sorted(
        p for p in directory.iterdir() if p.suffix in STATE_DICT_SUFFIXES and p.is_file()
    )
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(
            f"no weights in {directory}: expected model.safetensors or a PyTorch state dict "
            "(.pt, .pth or .bin)"
        )
    names = ", ".join(p.name for p in found)
    raise ValueError(f"several state dicts in {directory} ({names}); keep one or name it model.pt")


def load_model(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
):
    """Load a checkpoint directory: the article's layout, or a transformers one.

    Parameters
    ----------
    path : str or Path
        A directory holding ``config.json`` and the weights (see :func:`find_weights`).
        An article-style ``config.json`` has the :class:`LlamaConfig` fields; one with
        ``model_type`` or ``architectures`` is a transformers checkpoint and goes to
        ``lmgen_fast.models.hf.load_hf_checkpoint`` when that adapter is installed.
    device : torch.device or str, optional
        Where to put the model (default: the CPU).
    dtype : torch.dtype, optional
        The model's dtype; by default float32 for the article's layout and the checkpoint's
        own dtype for a transformers checkpoint (bfloat16 runs on the CPU too).

    Returns
    -------
    LlamaForPretraining, or (model, tokenizer) from the transformers adapter
        In eval mode, weights loaded strictly.

    Raises
    ------
    FileNotFoundError
        ``path`` or its ``config.json`` does not exist.
    ValueError
        Unreadable config or weights, or weights that do not match the config.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config_path} must hold a JSON object")
    if _is_transformers_config(data):
        try:
            hf = importlib.import_module("lmgen_fast.models.hf")
        except ImportError:
            hf = None
        loader = getattr(hf, "load_hf_checkpoint", None)
        if loader is None:
            raise ValueError(
                f"{directory} is a transformers checkpoint, and this install has no "
                "transformers adapter (lmgen_fast.models.hf.load_hf_checkpoint)"
            )
        return loader(directory, device=device, dtype=dtype)
    try:
        config = LlamaConfig.from_dict(data)
    except TypeError as err:
        raise ValueError(f"{config_path} is not an article LlamaConfig: {err}") from None
    weights = find_weights(directory)
    return _build(config, _read_state_dict(weights), device, dtype or torch.float32,
                  str(weights))
