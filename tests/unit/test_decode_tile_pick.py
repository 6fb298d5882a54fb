"""bench/decode_tile_pick.py: the tile W1's ragged cases favour, or the default within the margin."""

from __future__ import annotations

import pytest

from tests.bench_modules import load_bench_module

tile_pick = load_bench_module("decode_tile_pick")

CASES = ("Qwen3-0.6B 256 x U(100,2048)", "Qwen3-0.6B 128 x U(100,2048)")


def rows(ms_by_tile: dict[str, tuple[float, float]]) -> list[dict]:
    out = [
        {"kernel": "decode", "case": "Qwen3-0.6B 256 x 1024", "variant": "n32w4s2", "ms": 0.001}
    ]  # not ragged
    for tile, times in ms_by_tile.items():
        for case, ms in zip(CASES, times, strict=True):
            out.append({"kernel": "decode", "case": case, "variant": f"{tile} longest first", "ms": ms})
            out.append(
                {"kernel": "decode", "case": case, "variant": tile, "ms": ms / 10}
            )  # batch order: ignored
    return out


def test_the_fastest_tile_over_both_cases():
    chosen, totals = tile_pick.pick(
        rows({"n64w4s2": (2.0, 1.0), "n64w4s3": (1.8, 0.9), "n32w4s2": (1.7, 1.3)}), 0.02
    )
    assert chosen == "n64w4s3" and totals == pytest.approx({"n64w4s2": 3.0, "n64w4s3": 2.7, "n32w4s2": 3.0})


def test_the_default_within_the_margin():
    assert tile_pick.pick(rows({"n64w4s2": (2.0, 1.0), "n64w4s3": (1.99, 0.99)}), 0.02)[0] == "n64w4s2"


def test_a_tile_missing_a_case_is_not_chosen():
    r = rows({"n64w4s2": (2.0, 1.0)}) + [
        {"kernel": "decode", "case": CASES[0], "variant": "n128w8s2 longest first", "ms": 0.1}
    ]
    assert tile_pick.pick(r, 0.02)[0] == "n64w4s2"


def test_no_default_rows_is_an_error():
    with pytest.raises(SystemExit, match="n64w4s2"):
        tile_pick.pick(rows({"n64w4s3": (1.0, 1.0)}), 0.02)
