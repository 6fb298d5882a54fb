"""The decode attention tile is chosen per card when the backend is built: the table, the default, and the
environment override a benchmark serves with."""

from __future__ import annotations

import pytest

from engine.kernels.decode_tiles import DECODE_TILES, TILE_ENV, DecodeTile, decode_tile_for, parse_tile


def test_a_card_without_a_row_takes_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TILE_ENV, raising=False)
    assert decode_tile_for("Some Future GPU") == DecodeTile(64, 4, 2)
    for card, tile in DECODE_TILES.items():
        assert decode_tile_for(card) == tile


def test_the_environment_overrides_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TILE_ENV, "n128w8s3")
    assert decode_tile_for("NVIDIA H200") == DecodeTile(128, 8, 3)
    assert DecodeTile(128, 8, 3).name == "n128w8s3"  # the names bench/kernels.py prints


@pytest.mark.parametrize("bad", ["64,4,2", "n48w4s2", "n64w3s2", "n8w4s2", "n64w4s0", ""])
def test_a_malformed_override_names_the_variable(bad: str) -> None:
    with pytest.raises(ValueError, match=TILE_ENV):
        parse_tile(bad)
