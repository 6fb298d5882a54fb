"""OpenAI's `logit_bias`: token id (as a JSON string key) -> bias in [-100, 100], added to that token's
logit before sampling. The shape is checked with the body; the ids against the model's vocabulary here."""

from __future__ import annotations

MAX_ABS_BIAS = 100.0


def parse_logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    """Keys as ints, values range-checked (ValueError, for the body validator); {} means no bias."""
    if not raw:
        return None
    parsed: dict[int, float] = {}
    for key, bias in raw.items():
        try:
            token_id = int(key)
        except ValueError:
            raise ValueError(f"keys must be token ids (integers), got {key!r}") from None
        if token_id < 0:
            raise ValueError(f"token id {key} is negative")
        if not -MAX_ABS_BIAS <= bias <= MAX_ABS_BIAS:
            raise ValueError(f"bias for token {key} must be between -100 and 100, got {bias}")
        parsed[token_id] = float(bias)
    return parsed


def checked_logit_bias(bias: dict[int, float] | None, vocab_size: int) -> dict[int, float] | None:
    """The bias, once every token id is one the model has (a 400 naming the first that is not)."""
    from engine.api.errors import bad_request  # (errors imports protocol, which imports this module)

    if bias:
        for token_id in bias:
            if token_id >= vocab_size:
                raise bad_request(
                    f"logit_bias: token id {token_id} is out of range (the vocabulary has {vocab_size} tokens)",
                    param="logit_bias",
                )
    return bias
