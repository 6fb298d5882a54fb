"""The decode attention tile W1's ragged cases favour, from a `bench/kernels.py --only decode-w1` result.

Sums each tile's time over the ragged Qwen3-0.6B cases dispatched longest context first (as the engine does) and
prints the fastest tile's name (what KUBELLM_DECODE_TILE and engine/kernels/decode_tiles.py take), or nothing
when no tile beats the default by --margin (a sweep's noise is not a reason to change the table); the totals go
to stderr.

    python3 bench/decode_tile_pick.py /tmp/w1_tiles.json --margin 0.02
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.kernels.decode_tiles import DecodeTile  # noqa: E402

SUFFIX = " longest first"


def pick(rows: list[dict], margin: float) -> tuple[str, dict[str, float]]:
    """-> (the chosen tile's name, ms summed over the ragged cases for every tile that ran them all)."""
    by_tile: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r.get("kernel") == "decode" and "U(" in r["case"] and r["variant"].endswith(SUFFIX):
            by_tile[r["variant"].removesuffix(SUFFIX)][r["case"]] = r["ms"]
    cases = set().union(*by_tile.values()) if by_tile else set()
    totals = {tile: sum(ms.values()) for tile, ms in by_tile.items() if set(ms) == cases}
    default = DecodeTile().name
    if default not in totals:
        raise SystemExit(f"no ragged longest-first rows of the default tile {default} in the result")
    best = min(totals, key=totals.__getitem__)
    return (best if totals[best] < (1 - margin) * totals[default] else default), totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path)
    parser.add_argument(
        "--margin", type=float, default=0.02, help="how much faster than the default (fraction)"
    )
    args = parser.parse_args()
    chosen, totals = pick(json.loads(args.result.read_text())["rows"], args.margin)
    for tile, ms in sorted(totals.items(), key=lambda kv: kv[1]):
        print(f"{tile:<10} {ms:8.3f} ms", file=sys.stderr)
    if chosen != DecodeTile().name:
        print(chosen)
    else:
        print(f"the default {chosen} is within {args.margin:.0%} of the fastest", file=sys.stderr)


if __name__ == "__main__":
    main()
