"""The decode attention kernel's tile per card: tokens per loop step, warps and pipeline stages.

The tile that streams a paged K/V cache fastest is the card's business (its bandwidth and latency decide how
many bytes must be in flight), so it is chosen once, when the attention backend is built, from what
``python3 bench/kernels.py --only decode`` measured on that card. A card with no row keeps the default, which
won the sweep on an H100 SXM (2026-11-25: 96 % of the copy bandwidth at 256 x 1,024 tokens).

A float8 cache (``--kv-cache-dtype fp8``) has its own table and default (``--only decode-fp8`` sweeps it).

``KUBELLM_DECODE_TILE=n64w4s3`` (the sweep's variant names) overrides both tables: a benchmark can then serve
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


# torch.cuda.get_device_name() -> the tile measured best there for a bf16 / fp16 cache; absent cards take DecodeTile()
DECODE_TILES: dict[str, DecodeTile] = {}

# A float8 cache moves half the bytes per tile and converts every value before the products: on an H100 SXM
# (2026-12-07, `bench/kernels.py --only decode-fp8`) two warps with three stages streamed it at 79-82 % of the
# floor on Llama-8B's shapes where the bf16 default gave 63-66 %; the default for float8 caches everywhere.
DEFAULT_FP8_TILE = DecodeTile(64, 2, 3)
FP8_DECODE_TILES: dict[str, DecodeTile] = {}


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


def decode_tile_for(device_name: str, fp8_cache: bool = False) -> DecodeTile:
    override = os.environ.get(TILE_ENV)
    if override:
        return parse_tile(override)
    if fp8_cache:
        return FP8_DECODE_TILES.get(device_name, DEFAULT_FP8_TILE)
    return DECODE_TILES.get(device_name, DecodeTile())
