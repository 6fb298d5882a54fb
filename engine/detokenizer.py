"""Incremental detokenization: turn one new token id at a time into the text it adds.

Decoding a token on its own is wrong in two ways: SentencePiece and byte-level BPE tokenizers render
a token's leading space (or strip it) depending on what precedes it, and one character may be split
over several byte tokens. So each step decodes a short window of recent tokens twice, without and with
the new ones, and emits the difference (the prefix-offset / read-offset technique):

    tokens:  ... [prefix_offset ... read_offset) [read_offset ... end)
                 └── already emitted context ──┘ └─ not yet emitted ─┘

Text is held back while the window ends in U+FFFD (an incomplete UTF-8 sequence); `flush` releases
whatever is still held when the sequence ends. The prompt's last tokens seed the window, so the first
output token gets the same leading space it has after the prompt (what a client appending the
completion to the prompt expects, as vLLM does).
"""

from __future__ import annotations

from typing import Protocol

_REPLACEMENT_CHAR = "\ufffd"
_PROMPT_CONTEXT_TOKENS = 5  # enough context for a leading space / a split character to resolve


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode_ids = _fast_decoder(tokenizer, skip_special_tokens)
        self.token_ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])  # window source
        self.prefix_offset = 0  # start of the emitted context decoded for comparison
        self.read_offset = len(self.token_ids)  # everything before this is already emitted
        self.text = ""  # all output text emitted so far

    def add(self, token_id: int) -> str:
        """Append one output token; return the text it makes final (may be "")."""
        self.token_ids.append(token_id)
        return self._emit(hold_incomplete=True)

    def flush(self) -> str:
        """Release text still held back (an incomplete character at the very end of the output)."""
        return self._emit(hold_incomplete=False)

    def _emit(self, hold_incomplete: bool) -> str:
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        window_text = self._decode(self.prefix_offset, len(self.token_ids))
        if len(window_text) <= len(prefix_text):
            return ""  # nothing visible yet (e.g. a skipped special token or the first byte of a character)
        if hold_incomplete and window_text.endswith(_REPLACEMENT_CHAR):
            return ""  # a character is still incomplete; its next bytes are in later tokens
        delta = window_text[len(prefix_text) :]
        self.text += delta
        # The emitted tokens become the next step's context; older tokens are no longer needed.
        del self.token_ids[: self.read_offset]
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self._decode_ids(self.token_ids[start:end])


def _fast_decoder(tokenizer: Tokenizer, skip_special_tokens: bool):
    """Call the Rust `tokenizers` decoder directly when the tokenizer is a fast one that does no
    post-processing of its own: the Python wrapper costs more than the decode on a hot path that runs
    once per token per sequence."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        backend is not None
        and hasattr(backend, "decode")
        and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
    ):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
