"""Stop strings never leak into a stream, however the text is chunked; token-level stops and lengths."""

from __future__ import annotations

import random

from engine.sampling.params import SamplingParams
from engine.stop_checker import StopCheck, StopStringChecker, TokenStop, check_token_stop

EOS = 2


def feed(checker: StopStringChecker, deltas: list[str], final: bool = False) -> list[StopCheck]:
    """Feed deltas as the engine would (accumulated text + delta); stop at the first stop."""
    text, results = "", []
    for i, delta in enumerate(deltas):
        text += delta
        result = checker.check(text, delta, final=final and i == len(deltas) - 1)
        results.append(result)
        if result.stopped:
            break
    return results


def test_partial_stop_string_is_held_back_across_chunks() -> None:
    results = feed(StopStringChecker(["\n\nUser:"]), ["Hello\n", "\nUs", "er:"])
    assert [r.release_text for r in results] == ["Hello", "", ""]
    assert [r.stopped for r in results] == [False, False, True]
    assert results[-1].stop_reason == "\n\nUser:"


def test_include_stop_str_in_output_releases_the_stop_string() -> None:
    results = feed(
        StopStringChecker(["\n\nUser:"], include_stop_str_in_output=True), ["Hello\n", "\nUs", "er:", "x"]
    )
    assert [r.release_text for r in results] == ["Hello", "", "\n\nUser:"]
    assert results[-1].stopped


def test_false_alarm_releases_the_held_text() -> None:
    results = feed(StopStringChecker(["\n\nUser:"]), ["Hello\n", "\nUs", "ually"])
    assert [r.release_text for r in results] == ["Hello", "", "\n\nUsually"]
    assert not any(r.stopped for r in results)


def test_held_text_is_released_when_the_sequence_ends_otherwise() -> None:
    results = feed(StopStringChecker(["STOP"]), ["one ", "ST"], final=True)
    assert "".join(r.release_text for r in results) == "one ST"


def test_text_after_a_stop_string_in_the_same_delta_is_dropped() -> None:
    results = feed(StopStringChecker(["###"]), ["abc ### def"])
    assert results == [StopCheck("abc ", True, "###")]


def test_earliest_of_several_stop_strings_wins() -> None:
    checker = StopStringChecker(["world", "lo w"])
    assert feed(checker, ["hello world"]) == [StopCheck("hel", True, "lo w")]


def test_no_stop_strings_releases_everything_at_once() -> None:
    assert [r.release_text for r in feed(StopStringChecker([]), ["a\n", "b"])] == ["a\n", "b"]


def test_stop_string_fed_one_character_at_a_time() -> None:
    text = "answer: 42</s>ignored"
    results = feed(StopStringChecker(["</s>"]), list(text))
    assert "".join(r.release_text for r in results) == "answer: 42"
    assert results[-1].stopped and results[-1].stop_reason == "</s>"


def expected_output(text: str, stops: list[str], include: bool) -> str:
    hits = [(text.find(s), len(s)) for s in stops if s in text]
    if not hits:
        return text
    start, length = min(hits)
    return text[: start + length] if include else text[:start]


def test_any_chunking_streams_exactly_the_truncated_text() -> None:
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice("ab\n:") for _ in range(rng.randrange(0, 30)))
        stops = [
            "".join(rng.choice("ab\n:") for _ in range(rng.randrange(1, 5)))
            for _ in range(rng.randrange(1, 3))
        ]
        include = rng.random() < 0.5
        cuts = (
            sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randrange(0, 8)))) if text else []
        )
        deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        checker = StopStringChecker(stops, include_stop_str_in_output=include)
        results = feed(checker, deltas, final=True)
        expected = expected_output(text, stops, include)
        streamed = "".join(r.release_text for r in results)
        assert streamed == expected == checker.released_text, (text, stops, deltas, include)
        assert any(r.stopped for r in results) == any(s in text for s in stops)
        if not include:
            # At no point did the stream show a whole stop string.
            assert not any(s in streamed for s in stops)


# Token-level stops


def test_eos_stops_without_its_text() -> None:
    assert check_token_stop(EOS, 3, SamplingParams(), {EOS}) == TokenStop("stop", None, False)


def test_ignore_eos_keeps_going() -> None:
    assert not check_token_stop(EOS, 3, SamplingParams(ignore_eos=True), {EOS}).finished


def test_stop_token_id_is_the_stop_reason() -> None:
    params = SamplingParams(stop_token_ids=[7, 9])
    assert check_token_stop(9, 1, params, {EOS}) == TokenStop("stop", 9, False)
    assert check_token_stop(
        9, 1, SamplingParams(stop_token_ids=[9], include_stop_str_in_output=True), {EOS}
    ).include_token_text


def test_min_tokens_defers_eos_and_stop_tokens() -> None:
    params = SamplingParams(min_tokens=4, stop_token_ids=[9])
    assert not check_token_stop(EOS, 3, params, {EOS}).finished
    assert not check_token_stop(9, 3, params, {EOS}).finished
    assert check_token_stop(EOS, 4, params, {EOS}).finish_reason == "stop"


def test_max_tokens_and_context_end_finish_with_length() -> None:
    params = SamplingParams(max_tokens=5)
    assert not check_token_stop(11, 4, params, {EOS}).finished
    assert check_token_stop(11, 5, params, {EOS}) == TokenStop("length", None, True)
    # A natural stop on the last allowed token is still a stop.
    assert check_token_stop(EOS, 5, params, {EOS}).finish_reason == "stop"
    at_context_end = check_token_stop(11, 3, params, {EOS}, num_prompt_tokens=13, max_model_len=16)
    assert at_context_end.finish_reason == "length"
