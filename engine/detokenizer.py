"""Incremental detokenization: turn one new token id at a time into the text it adds.

Decoding a token on its own is wrong in two ways: SentencePiece and byte-level BPE tokenizers render
a token's leading space (or strip it) depending on what precedes it, and one character may be split
over several byte tokens. So each step decodes a short window of recent tokens twice, without and with
the new ones, and emits the difference (the prefix-offset / read-offset technique):

    tokens:  [0 ... read_offset) [read_offset ... end)
             └ emitted context ┘ └ not yet emitted ┘

The context's text is decoded once per emission, not per step, and is usually the one token emitted
last, whose text a dict shared by the engine's requests holds: this runs once per token per sequence.

Text is held back while the window ends in U+FFFD (an incomplete UTF-8 sequence); `flush` releases
whatever is still held when the sequence ends. The prompt's last tokens seed the window, so the first
output token gets the same leading space it has after the prompt (what a client appending the
completion to the prompt expects, as vLLM does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

_REPLACEMENT_CHAR = "\ufffd"
_PROMPT_CONTEXT_TOKENS = 5  # enough context for a leading space / a split character to resolve


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool,
        token_texts: dict[int, str] | None = None,
    ) -> None:
        """token_texts: single tokens' texts (the same tokenizer and skip_special_tokens), shared by every
        request's detokenizer: the context is usually the one token emitted last, looked up there."""
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode = _fast_decoder(tokenizer)
        self._token_texts: dict[int, str] = {} if token_texts is None else token_texts
        # The window: the emitted context, then the tokens not emitted yet (from read_offset on).
        self.token_ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.read_offset = len(self.token_ids)  # everything before this is already emitted
        # The context's text, decoded once per emission (not again while a character is held back).
        self._context_text: str | None = None
        # All output text emitted so far, in pieces: joined only when `text` is read (stop strings),
        # so a request without them never copies its whole output per token.
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        pieces = self._pieces
        if len(pieces) > 1:
            pieces[:] = ["".join(pieces)]
        return pieces[0] if pieces else ""

    def add(self, token_id: int) -> str:
        """Append one output token; return the text it makes final (may be "")."""
        self.token_ids.append(token_id)
        return self._emit(hold_incomplete=True)

    def flush(self) -> str:
        """Release text still held back (an incomplete character at the very end of the output)."""
        return self._emit(hold_incomplete=False)

    def _emit(self, hold_incomplete: bool) -> str:
        # Runs once per token per sequence: locals over attributes, one decode per call where it can.
        token_ids, read_offset = self.token_ids, self.read_offset
        context_text = self._context_text
        if context_text is None:
            if read_offset == 1:
                context_text = self._token_texts.get(token_ids[0])
                if context_text is None:
                    context_text = self._decode(token_ids[:1], self.skip_special_tokens)
                    self._token_texts[token_ids[0]] = context_text
            else:
                context_text = self._decode(token_ids[:read_offset], self.skip_special_tokens)
            self._context_text = context_text
        window_text = self._decode(token_ids, self.skip_special_tokens)
        if len(window_text) <= len(context_text):
            return ""  # nothing visible yet (e.g. a skipped special token or the first byte of a character)
        if hold_incomplete and window_text.endswith(_REPLACEMENT_CHAR):
            return ""  # a character is still incomplete; its next bytes are in later tokens
        delta = window_text[len(context_text) :]
        self._pieces.append(delta)
        # The emitted tokens become the next step's context; older tokens are no longer needed.
        del token_ids[:read_offset]
        self.read_offset = len(token_ids)
        self._context_text = None
        return delta


def _fast_decoder(tokenizer: Tokenizer) -> Callable[[list[int], bool], str]:
    """(ids, skip_special_tokens) -> text. Calls the Rust `tokenizers` decoder directly when the tokenizer
    is a fast one that does no post-processing of its own: the Python wrapper costs more than the decode
    on a hot path that runs once per token per sequence (hence also positional arguments, no wrapper)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        backend is not None
        and hasattr(backend, "decode")
        and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
    ):
        return backend.decode
    return tokenizer.decode
