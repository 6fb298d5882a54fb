"""The engine's per-token logprobs in OpenAI's two shapes (legacy completions and chat)."""

from __future__ import annotations

import math
import re
from typing import Any

from engine.api.protocol import ChatTokenLogprob, CompletionLogprobs, PromptLogprob, TopLogprob
from engine.outputs import TokenLogprob

_FLOOR = -9999.0  # JSON has no -inf; OpenAI clients expect a number


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's (GPT-2's) stand-in characters for the 256 bytes, mapped back to the bytes:
    printable Latin-1 bytes stand for themselves, the others for U+0100 onwards, in byte order."""
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    alphabet: dict[str, int] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + shifted)] = byte
            shifted += 1
    return alphabet


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's tokens of one raw byte


def piece_bytes(piece: str) -> bytes | None:
    """A vocabulary entry's raw bytes in the two byte-level formats (SentencePiece's byte fallback
    `<0xF0>`, byte-level BPE's `ðŁĺ`); None for any other entry."""
    fallback = _BYTE_FALLBACK.fullmatch(piece)
    if fallback:
        return bytes([int(fallback[1], 16)])
    if piece and all(ch in _BYTE_LEVEL for ch in piece):
        return bytes(_BYTE_LEVEL[ch] for ch in piece)
    return None


def _is_continuation(byte: int) -> bool:
    return byte & 0xC0 == 0x80


class TokenTexts:
    """Each token's own text and bytes, decoded once and cached (the vocabulary bounds the caches)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own UTF-8 bytes. A token holding part of a character (emoji, CJK) decodes to
        U+FFFD alone; its real bytes come from its vocabulary entry, as OpenAI's `bytes` promises (joined,
        the tokens' bytes make the text)."""
        raw = self._bytes.get(token_id)
        if raw is None:
            text = self(token_id)
            raw = text.encode("utf-8")
            if "\ufffd" in text:
                piece = self._tokenizer.convert_ids_to_tokens(token_id)
                candidate = piece_bytes(piece) if isinstance(piece, str) else None
                if candidate is not None and candidate.decode("utf-8", "replace") == text:
                    raw = candidate
            self._bytes[token_id] = raw
        return raw

    def num_chars(self, token_id: int) -> int:
        """Characters of the text that start in this token (one per UTF-8 lead byte)."""
        return sum(1 for byte in self.token_bytes(token_id) if not _is_continuation(byte))

    def offset(self, token_id: int, chars_before: int) -> int:
        """text_offset of a token after tokens holding `chars_before` character starts: the character
        its first byte belongs to (one that began in an earlier token, when it starts mid-character)."""
        raw = self.token_bytes(token_id)
        return chars_before - 1 if raw and _is_continuation(raw[0]) and chars_before else chars_before


def chat_logprobs(texts: TokenTexts, logprobs: list[TokenLogprob], num_top: int) -> list[ChatTokenLogprob]:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        return TopLogprob(
            token=texts(token_id), logprob=_finite(logprob), bytes=list(texts.token_bytes(token_id))
        )

    result = []
    for lp in logprobs:
        sampled = entry(lp.token_id, lp.logprob)
        top = [entry(tid, value) for tid, value in lp.top[:num_top]]
        result.append(ChatTokenLogprob(**sampled.model_dump(), top_logprobs=top))
    return result


def completion_logprobs(
    texts: TokenTexts, logprobs: list[TokenLogprob], num_top: int, text_offset: int
) -> CompletionLogprobs:
    """Legacy shape; text_offset counts characters into the choice's returned `text`: `text_offset` is
    the number of characters that start before these tokens."""
    out = CompletionLogprobs()
    for lp in logprobs:
        text = texts(lp.token_id)
        top = {texts(tid): _finite(value) for tid, value in lp.top[:num_top]}
        top.setdefault(text, _finite(lp.logprob))  # as vLLM: the sampled token is always listed
        out.tokens.append(text)
        out.token_logprobs.append(_finite(lp.logprob))
        out.top_logprobs.append(top)
        # Counted in bytes, not in the tokens' texts: a token that is part of a character reads as U+FFFD.
        out.text_offset.append(texts.offset(lp.token_id, text_offset))
        text_offset += texts.num_chars(lp.token_id)
    return out


def completion_prompt_logprobs(
    texts: TokenTexts, prompt_token_ids: list[int], logprobs: list[TokenLogprob | None], num_top: int
) -> CompletionLogprobs:
    """echo with logprobs: the prompt's tokens in the legacy shape (the first has no logprob: nothing
    precedes it), text_offset counting from the start of the echoed prompt."""
    out = CompletionLogprobs()
    offset = 0
    for token_id, lp in zip(prompt_token_ids, logprobs, strict=True):
        text = texts(token_id)
        out.tokens.append(text)
        out.text_offset.append(texts.offset(token_id, offset))
        offset += texts.num_chars(token_id)
        if lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        top = {texts(tid): _finite(value) for tid, value in lp.top[:num_top]}
        top.setdefault(text, _finite(lp.logprob))
        out.token_logprobs.append(_finite(lp.logprob))
        out.top_logprobs.append(top)
    return out


def prompt_logprobs(
    texts: TokenTexts, logprobs: list[TokenLogprob | None] | None
) -> list[dict[int, PromptLogprob] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token {token id: {logprob, rank, decoded_token}} holding the
    prompt's own token and the best alternatives there; None for the first token."""
    if logprobs is None:
        return None
    result: list[dict[int, PromptLogprob] | None] = []
    for lp in logprobs:
        if lp is None:
            result.append(None)
            continue
        entry = {
            lp.token_id: PromptLogprob(
                logprob=_finite(lp.logprob), rank=lp.rank, decoded_token=texts(lp.token_id)
            )
        }
        for rank, (tid, value) in enumerate(lp.top, start=1):
            entry.setdefault(tid, PromptLogprob(logprob=_finite(value), rank=rank, decoded_token=texts(tid)))
        result.append(entry)
    return result


def extend_completion_logprobs(into: CompletionLogprobs, more: CompletionLogprobs) -> None:
    into.tokens += more.tokens
    into.token_logprobs += more.token_logprobs
    into.top_logprobs += more.top_logprobs
    into.text_offset += more.text_offset
