"""Tokenizer access: prompt encoding, and the begin/end token ids.

Two kinds of tokenizer are understood, each encoding a text prompt its own way:

* the article's ``tokenizers.Tokenizer`` (specials ``[BOT]``/``[EOT]``): ``[BOT]`` then the
  ids of ``" " + prompt`` (the article's convention, leading space included);
* a Hugging Face transformers tokenizer: ``tokenizer(prompt)``, as the user's own pipeline
  encodes it (its own special tokens, e.g. Llama's bos; none for Qwen; no added space). Its
  ``bos_token_id`` and ``eos_token_id`` are the begin and end tokens, falling back to
  ``[BOT]``/``[EOT]`` when it has those tokens; a tokenizer without a bos token works.

``add_bos`` overrides the begin token (:func:`adapt_tokenizer`; pass the adapter it returns
as the tokenizer): ``True`` puts the begin token, then the prompt's ids without special
tokens; ``False`` the prompt's ids alone; ``bos_token=""`` means no begin token at all.
"""

from __future__ import annotations

from dataclasses import dataclass


def is_hf_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` looks like a transformers tokenizer (duck typed, no import)."""
    return hasattr(tokenizer, "convert_tokens_to_ids") and hasattr(tokenizer, "bos_token_id")


def _hf_token_id(tokenizer, token: str | int | None, role: str, default: str, keyword: str,
                 required: bool = True) -> int | None:
    """A transformers tokenizer's special id: the override, else its own, else ``default``
    (else None where the role is not ``required``)."""
    if token is not None:
        return _token_id(tokenizer, token, default, keyword)
    tid = getattr(tokenizer, f"{role}_token_id", None)
    if tid is not None:
        return int(tid)
    try:
        return _token_id(tokenizer, None, default, keyword)
    except ValueError:
        if not required:
            return None
        raise ValueError(
            f"the tokenizer has no {role} token ({role}_token_id is None and there is no "
            f"{default!r} token); pass {keyword}= with the token (or its id) that plays this role"
        ) from None


def _token_id(tokenizer, token: str | int | None, default: str, keyword: str) -> int:
    """Resolve a special token given as a string, an id, or by its default name."""
    if isinstance(token, int) and not isinstance(token, bool):
        return token
    name = default if token is None else token
    tid = tokenizer.token_to_id(name) if hasattr(tokenizer, "token_to_id") else None
    if tid is None and hasattr(tokenizer, "convert_tokens_to_ids"):
        tid = tokenizer.convert_tokens_to_ids(name)
        # Unknown text maps to the unknown token's id; a real token may share that id
        # (SmolLM2's <|endoftext|> is id 0, its unk_token too): the vocabulary decides.
        if tid == getattr(tokenizer, "unk_token_id", object()) \
                and name != getattr(tokenizer, "unk_token", None) \
                and name not in tokenizer.get_vocab():
            tid = None
    if tid is None:
        raise ValueError(
            f"the tokenizer has no {name!r} token; pass {keyword}= with the token (or its id) "
            "that plays this role"
        )
    return int(tid)


@dataclass(frozen=True)
class TokenizerAdapter:
    """What generation needs of a tokenizer: ids of a prompt, text of ids, BOT and EOT."""

    tokenizer: object
    bos_id: int | None
    eos_id: int
    add_bos: bool | None = None

    def prefix(self) -> list[int]:
        """The ids before a prompt's own in the article's convention: ``[BOT]``, or nothing
        with ``add_bos=False`` or no begin token."""
        return [] if self.add_bos is False or self.bos_id is None else [self.bos_id]

    def encode_prompt(self, prompt: str) -> list[int]:
        """:meth:`prefix` then the ids of ``" " + prompt``, as the article encodes prompts."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        encoded = self.tokenizer.encode(" " + prompt)
        ids = encoded.ids if hasattr(encoded, "ids") else list(encoded)
        return [*self.prefix(), *ids]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


@dataclass(frozen=True)
class HFTokenizerAdapter(TokenizerAdapter):
    """A transformers tokenizer: no special tokens added on encode, none kept on decode."""

    def encode_prompt(self, prompt: str) -> list[int]:
        """``tokenizer(prompt)``'s ids (its own special tokens, no added space); with
        ``add_bos`` set, :meth:`prefix` then the ids without special tokens."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        if self.add_bos is None:
            return list(self.tokenizer(prompt)["input_ids"])
        return [*self.prefix(), *self.tokenizer.encode(prompt, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def encode_token_ids(prompt: object, index: int) -> list[int]:
    """Prompt ``index`` given as token ids: a list of ints, used as given (no BOT added).

    Raises
    ------
    ValueError
        Naming the prompt and the bad value (not a list of non-negative ints, or empty).
    """
    if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__iter__"):
        raise ValueError(f"prompt_token_ids[{index}] must be a list of token ids, got {prompt!r}")
    ids = list(prompt)
    if not ids:
        raise ValueError(f"prompt_token_ids[{index}] is empty")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) and not hasattr(t, "__index__") \
                or int(t) < 0:
            raise ValueError(f"prompt_token_ids[{index}] holds {t!r}, not a token id")
    return [int(t) for t in ids]


def check_messages(messages: object, index: int) -> list[dict]:
    """Conversation ``index``: a list of ``{"role": str, "content": str}`` dicts.

    Raises
    ------
    ValueError
        Naming the conversation, the message and what is wrong with it.
    """
    if isinstance(messages, (str, bytes, dict)) or not hasattr(messages, "__iter__"):
        raise ValueError(f"messages[{index}] must be a list of {{'role', 'content'}} dicts, "
                         f"got {messages!r}")
    out = list(messages)
    if not out:
        raise ValueError(f"messages[{index}] is empty")
    for j, m in enumerate(out):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{index}][{j}] must be a dict with 'role' and "
                             f"'content', got {m!r}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise ValueError(f"messages[{index}][{j}] needs a string {key!r}, got {m!r}")
    return out


def encode_messages(tokenizer: TokenizerAdapter, messages: object, index: int) -> list[int]:
    """Conversation ``index`` through the tokenizer's chat template with the generation
    prompt, used as it comes out (no BOT or space added).

    Raises
    ------
    ValueError
        A malformed conversation, or a tokenizer without a chat template.
    """
    conversation = check_messages(messages, index)
    tok = tokenizer.tokenizer
    if not callable(getattr(tok, "apply_chat_template", None)) \
            or not getattr(tok, "chat_template", None):
        raise ValueError("messages need a tokenizer with a chat template; this tokenizer "
                         f"({type(tok).__name__}) has none: pass prompts= (text) or "
                         "prompt_token_ids= instead")
    ids = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys") and "input_ids" in ids:  # a BatchEncoding in some versions
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def adapt_tokenizer(
    tokenizer, bos_token: str | int | None = None, eos_token: str | int | None = None,
    add_bos: bool | None = None,
) -> TokenizerAdapter:
    """Wrap a tokenizer for generation.

    Parameters
    ----------
    tokenizer : tokenizers.Tokenizer or transformers tokenizer
        The former needs ``[BOT]``/``[EOT]``; the latter uses its ``bos_token_id`` (if any)
        and ``eos_token_id`` (or ``[BOT]``/``[EOT]`` when it lacks them).
    bos_token, eos_token : str or int, optional
        Override the begin and end tokens, by name or id (a special token's text resolves
        even where its id is the unknown token's). ``bos_token=""``: no begin token.
    add_bos : bool, optional
        None (default): each tokenizer's own way (module docstring). True: the begin token,
        then the prompt's ids without special tokens. False: without the begin token.

    Returns
    -------
    TokenizerAdapter

    Raises
    ------
    ValueError
        Naming the missing token and the keyword that supplies it.
    """
    if isinstance(tokenizer, TokenizerAdapter):
        return tokenizer
    if add_bos not in (None, True, False):
        raise ValueError(f"add_bos must be None, True or False, got {add_bos!r}")
    no_bos = bos_token == ""
    if is_hf_tokenizer(tokenizer):
        bos = None if no_bos else _hf_token_id(tokenizer, bos_token, "bos", "[BOT]",
                                               "bos_token", required=bool(add_bos))
        eos = _hf_token_id(tokenizer, eos_token, "eos", "[EOT]", "eos_token")
        return HFTokenizerAdapter(tokenizer, bos, eos, add_bos)
    bos = None if no_bos else _token_id(tokenizer, bos_token, "[BOT]", "bos_token")
    eos = _token_id(tokenizer, eos_token, "[EOT]", "eos_token")
    return TokenizerAdapter(tokenizer, bos, eos, add_bos)
