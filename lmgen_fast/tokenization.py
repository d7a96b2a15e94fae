"""Tokenizer access: prompt encoding as the article does it, and the BOT/EOT ids."""

from __future__ import annotations

from dataclasses import dataclass


def _token_id(tokenizer, token: str | int | None, default: str, keyword: str) -> int:
    """Resolve a special token given as a string, an id, or by its default name."""
    if isinstance(token, int) and not isinstance(token, bool):
        return token
    name = default if token is None else token
    tid = tokenizer.token_to_id(name) if hasattr(tokenizer, "token_to_id") else None
    if tid is None and hasattr(tokenizer, "convert_tokens_to_ids"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if tid == getattr(tokenizer, "unk_token_id", object()):
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
    bos_id: int
    eos_id: int

    def encode_prompt(self, prompt: str) -> list[int]:
        """``[BOT]`` then the ids of ``" " + prompt``, as the article encodes prompts."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        encoded = self.tokenizer.encode(" " + prompt)
        ids = encoded.ids if hasattr(encoded, "ids") else list(encoded)
        return [self.bos_id, *ids]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def adapt_tokenizer(
    tokenizer, bos_token: str | int | None = None, eos_token: str | int | None = None
) -> TokenizerAdapter:
    """Wrap a ``tokenizers.Tokenizer`` whose specials are ``[BOT]``/``[EOT]`` (or overrides)."""
    if isinstance(tokenizer, TokenizerAdapter):
        return tokenizer
    bos = _token_id(tokenizer, bos_token, "[BOT]", "bos_token")
    eos = _token_id(tokenizer, eos_token, "[EOT]", "eos_token")
    return TokenizerAdapter(tokenizer, bos, eos)
