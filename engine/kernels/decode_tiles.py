"""The decode attention kernel's tile per card: tokens per loop step, warps and pipeline stages.

The tile that streams a paged K/V cache fastest is the card's business (its bandwidth and latency decide how
many bytes must be in flight), so it is chosen once, when the attention backend is built, from what
``python3 bench/kernels.py --only decode`` measured on that card. A card with no row keeps the default, which
won the sweep on an H100 SXM (2026-11-25: 96 % of the copy bandwidth at 256 x 1,024 tokens).

``KUBELLM_DECODE_TILE=n64w4s3`` (the sweep's variant names) overrides the table: a benchmark can then serve
with a tile before it is written here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

TILE_ENV = "KUBELLM_DECODE_TILE"


@dataclass(frozen=True)
class DecodeTile:
    block_n: int = 64  # tokens of K/V per loop step
    num_warps: int = 4
    num_stages: int = 2

    @property
    def name(self) -> str:
        return f"n{self.block_n}w{self.num_warps}s{self.num_stages}"


# torch.cuda.get_device_name() -> the tile measured best there; absent cards take DecodeTile()
DECODE_TILES: dict[str, DecodeTile] = {}


def parse_tile(name: str) -> DecodeTile:
    """``n64w4s2`` -> DecodeTile(64, 4, 2); a clear error for anything else."""
    match = re.fullmatch(r"n(\d+)w(\d+)s(\d+)", name.strip())
    if match is None:
        raise ValueError(f"{TILE_ENV}={name!r}: expected n<tokens>w<warps>s<stages>, e.g. n64w4s2")
    block_n, warps, stages = (int(g) for g in match.groups())
    for label, value in (("tokens", block_n), ("warps", warps)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{TILE_ENV}={name!r}: {label} must be a power of two, not {value}")
    if block_n < 16 or stages < 1:
        raise ValueError(f"{TILE_ENV}={name!r}: at least 16 tokens and one stage")
    return DecodeTile(block_n, warps, stages)


def decode_tile_for(device_name: str) -> DecodeTile:
    override = os.environ.get(TILE_ENV)
    if override:
        return parse_tile(override)
    return DECODE_TILES.get(device_name, DecodeTile())
