"""The decode attention tile is chosen per card when the backend is built: the table, the default, and the
environment override a benchmark serves with."""

from __future__ import annotations

import pytest

from engine.kernels.decode_tiles import (
    DECODE_TILES,
    DEFAULT_FP8_TILE,
    FP8_DECODE_TILES,
    TILE_ENV,
    DecodeTile,
    decode_tile_for,
    parse_tile,
)
from engine.kernels.triton_attention import TritonAttention


def test_a_card_without_a_row_takes_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TILE_ENV, raising=False)
    assert decode_tile_for("Some Future GPU") == DecodeTile(64, 4, 2)
    for card, tile in DECODE_TILES.items():
        assert decode_tile_for(card) == tile


def test_a_float8_cache_has_its_own_table_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TILE_ENV, raising=False)
    assert decode_tile_for("Some Future GPU", fp8_cache=True) == DEFAULT_FP8_TILE != DecodeTile()
    for card, tile in FP8_DECODE_TILES.items():
        assert decode_tile_for(card, fp8_cache=True) == tile


def test_the_backend_holds_both_tiles_and_an_explicit_tile_serves_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(TILE_ENV, raising=False)
    built = TritonAttention(num_sms=4)
    assert (built.decode_tile, built.fp8_decode_tile) == (decode_tile_for("cpu"), DEFAULT_FP8_TILE)
    pinned = TritonAttention(num_sms=4, decode_tile=DecodeTile(32, 2, 2))
    assert pinned.decode_tile == pinned.fp8_decode_tile == DecodeTile(32, 2, 2)


def test_the_environment_overrides_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TILE_ENV, "n128w8s3")
    assert decode_tile_for("NVIDIA H200") == DecodeTile(128, 8, 3)
    assert decode_tile_for("NVIDIA H200", fp8_cache=True) == DecodeTile(128, 8, 3)
    assert DecodeTile(128, 8, 3).name == "n128w8s3"  # the names bench/kernels.py prints


@pytest.mark.parametrize("bad", ["64,4,2", "n48w4s2", "n64w3s2", "n8w4s2", "n64w4s0", ""])
def test_a_malformed_override_names_the_variable(bad: str) -> None:
    with pytest.raises(ValueError, match=TILE_ENV):
        parse_tile(bad)
