"""When does a sequence stop, and how much of its text may a stream show yet?

Two checks run after each sampled token:
  1. `check_token_stop` (token level, before detokenizing): eos, stop_token_ids, max_tokens, max_model_len.
  2. `StopStringChecker.check` (text level, after detokenizing): stop strings. It also holds back a
     tail that could still grow into a stop string, so a stream never shows part of one.

Per step the engine does:
    stop = check_token_stop(token, num_output_tokens, params, eos_ids, ...)
    delta = detok.add(token) if stop.include_token_text else ""
    if stop.finished: delta += detok.flush()
    result = stop_strings.check(detok.text, delta, final=stop.finished)
    # emit result.release_text; a stop string (result.stopped) overrides the token-level reason
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.sampling.params import SamplingParams


@dataclass(frozen=True)
class TokenStop:
    finish_reason: str | None  # "stop" | "length" | None while the sequence goes on
    stop_reason: int | None  # the stop token id for stop_token_ids; None for eos and length
    include_token_text: bool  # whether the new token's text belongs in the output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# The answer for almost every token (shared: TokenStop is frozen, and this runs per token per sequence).
_GOES_ON = TokenStop(None, None, True)


def check_token_stop(
    token_id: int,
    num_output_tokens: int,
    params: SamplingParams,
    eos_token_ids: set[int],
    num_prompt_tokens: int = 0,
    max_model_len: int | None = None,
) -> TokenStop:
    """Decide whether the token just sampled ends the sequence (num_output_tokens counts it).

    eos (unless ignore_eos) and stop_token_ids finish with "stop" and, as in vLLM, their text is left out
    unless include_stop_str_in_output. They cannot stop a sequence shorter than min_tokens (the sampler
    already masks them). max_tokens, or reaching max_model_len, finishes with "length".
    """
    if num_output_tokens >= params.min_tokens:
        if token_id in eos_token_ids and not params.ignore_eos:
            return TokenStop("stop", None, params.include_stop_str_in_output)
        if token_id in params.stop_token_ids:
            return TokenStop("stop", token_id, params.include_stop_str_in_output)
    at_context_end = max_model_len is not None and num_prompt_tokens + num_output_tokens >= max_model_len
    if num_output_tokens >= params.max_tokens or at_context_end:
        return TokenStop("length", None, True)
    return _GOES_ON


@dataclass(frozen=True)
class StopCheck:
    release_text: str  # text the stream may show now (never part of a stop string)
    stopped: bool  # a stop string was found
    stop_reason: str | None  # that stop string


class StopStringChecker:
    """Finds stop strings in a sequence's growing text and decides what is safe to release."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.released_text = ""  # everything released so far: the output as the client sees it

    def check(self, text: str, delta: str, final: bool = False) -> StopCheck:
        """`text` is all output text so far, ending with `delta`, the part new since the last call.

        final=True when the sequence ends for another reason (eos, length): nothing is held back then.
        """
        if not self.stop:  # the common case, per token per sequence: everything is released at once
            self.released_text += delta
            return StopCheck(delta, False, None)
        match = self._find_stop(text, len(delta))
        if match is not None:
            start, stop_str = match
            end = start + len(stop_str) if self.include_stop_str_in_output else start
            return StopCheck(self._release_up_to(text, end), True, stop_str)
        end = len(text) if final else self._hold_back_start(text)
        return StopCheck(self._release_up_to(text, end), False, None)

    def _find_stop(self, text: str, new_chars: int) -> tuple[int, str] | None:
        """The earliest stop string that overlaps the new text (shortest first on a tie)."""
        # A match must end in the new text, so it starts at most max_stop_len - 1 chars before it.
        search_from = max(0, len(text) - new_chars - self.max_stop_len + 1)
        best: tuple[int, str] | None = None
        for stop_str in self.stop:
            start = text.find(stop_str, search_from)
            if start == -1:
                continue
            if best is None or (start, len(stop_str)) < (best[0], len(best[1])):
                best = (start, stop_str)
        return best

    def _hold_back_start(self, text: str) -> int:
        """Where the longest tail of `text` that is a proper prefix of some stop string starts."""
        start = len(text)
        for stop_str in self.stop:
            for length in range(min(len(stop_str) - 1, len(text)), 0, -1):
                if text.endswith(stop_str[:length]):
                    start = min(start, len(text) - length)
                    break
        return start

    def _release_up_to(self, text: str, end: int) -> str:
        released = len(self.released_text)
        if end <= released:
            return ""
        newly_released = text[released:end]
        self.released_text += newly_released
        return newly_released
