"""The fused MoE kernel's block configurations as measured on a GPU, one JSON file per card, expert shape and
weight variant, written by ``bench/fused_moe_tune.py --save-configs DIR`` (vLLM keeps its fused-MoE tunings
the same way). A layer built for CUDA looks its file up once (``tuned_configs_for``); each call then takes
the configuration tuned for the token count nearest its own. Without a file the kernel's own choice
(engine.kernels.fused_moe.choose_block_config / choose_fp8_block_config) stands.

Files are searched in ``$KUBELLM_MOE_CONFIG_DIR`` first (a tune and the serving run that uses it, in one GPU
session, without a code change), then beside this module in ``moe_configs/`` (tunings kept in the repo).
A file that names this card and shape but cannot be used (a block-scaled variant whose K step is not the
scale group) is a startup error naming the file.

A card with no file of its own borrows one measured on a card with the same streaming multiprocessors
(``SAME_SMS``: the H200 is the H100 SXM's GH100 die, 132 SMs and 227 KB of shared memory a block, with
faster memory): the tiles that fit and win are the SM's business, and the defaults they replace were
chosen for the H100 anyway. Its own tuning, once measured, comes first.
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.kernels.fused_moe import MoeBlockConfig
from engine.model.fp8 import FP8

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).with_name("moe_configs")
CONFIG_DIR_ENV = "KUBELLM_MOE_CONFIG_DIR"
# card -> cards of the same SMs whose tunings it may borrow, nearest first (torch.cuda.get_device_name)
SAME_SMS: dict[str, tuple[str, ...]] = {"NVIDIA H200": ("NVIDIA H100 80GB HBM3",)}


class BlockConfigEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block_m: int = Field(ge=16)
    block_n: int = Field(ge=16)
    block_k: int = Field(ge=16)
    group_m: int = Field(ge=1)
    num_warps: int = Field(ge=1)
    num_stages: int = Field(ge=1)
    split_gate: bool = False  # files written before it existed fused the gate, as False does

    @field_validator("block_m", "block_n", "block_k", "num_warps")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"{value} is not a power of two (tl.arange and tl.dot need one)")
        return value

    def as_config(self) -> MoeBlockConfig:
        return MoeBlockConfig(**self.model_dump())


class TunedConfigFile(BaseModel):
    """What one file holds: the card and expert shape it was measured on, and per token count the fastest
    configuration found (or the default, where nothing beat it)."""

    model_config = ConfigDict(extra="forbid")

    device: str  # torch.cuda.get_device_name(), as measured
    num_experts: int = Field(ge=1)
    inter: int = Field(ge=1)  # each expert's intermediate size on one rank (after tensor parallelism)
    hidden: int = Field(ge=1)
    variant: str  # see variant_name
    source: str = ""  # what measured it (command, date, Triton version)
    configs: dict[int, BlockConfigEntry] = Field(min_length=1)  # token count -> configuration


def variant_name(weight_dtype: torch.dtype, group_k: int | None) -> str:
    """bf16 / fp16 / fp32 for float experts; fp8-channel or fp8-block<group> for FP8 ones."""
    if weight_dtype == FP8:
        return "fp8-channel" if group_k is None else f"fp8-block{group_k}"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(
        weight_dtype, str(weight_dtype)
    )


def file_name(device: str, num_experts: int, inter: int, hidden: int, variant: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")
    return f"E={num_experts},N={inter},H={hidden},device={slug},variant={variant}.json"


@dataclass(frozen=True)
class TunedMoeConfigs:
    """Configurations by token count; ``pick`` takes the nearest (vLLM's rule), ties to the smaller count."""

    token_counts: tuple[int, ...]  # ascending
    configs: tuple[MoeBlockConfig, ...]
    path: Path

    def pick(self, num_tokens: int) -> MoeBlockConfig:
        # every MoE layer of an eager step asks: the two counts around num_tokens, not a scan of all
        above = bisect.bisect_left(self.token_counts, num_tokens)
        if above == len(self.token_counts) or (
            above > 0 and num_tokens - self.token_counts[above - 1] <= self.token_counts[above] - num_tokens
        ):
            return self.configs[above - 1]
        return self.configs[above]


def search_dirs() -> list[Path]:
    env = os.environ.get(CONFIG_DIR_ENV)
    return ([Path(env)] if env else []) + [CONFIG_DIR]


def load_tuned_configs(
    device: str, num_experts: int, inter: int, hidden: int, variant: str, group_k: int | None = None
) -> TunedMoeConfigs | None:
    """The first file for this card, shape and variant in ``search_dirs()``, else the first for a card of
    the same SMs (``SAME_SMS``), or None."""
    shape = (num_experts, inter, hidden, variant)
    for card in (device, *SAME_SMS.get(device, ())):
        tuned = _load(file_name(card, *shape), tuple(search_dirs()), shape, group_k)
        if tuned is not None:
            if card != device:
                log.info("fused MoE: %s has no tuned configurations of its own; using %s's", device, card)
            return tuned
    return None


@functools.cache  # every MoE layer of a model asks for the same file: read (and logged) once
def _load(
    name: str, dirs: tuple[Path, ...], expected: tuple[int, int, int, str], group_k: int | None
) -> TunedMoeConfigs | None:
    for directory in dirs:
        path = directory / name
        if not path.is_file():
            continue
        try:
            tuned = TunedConfigFile.model_validate_json(path.read_bytes())
        except ValueError as exc:
            raise ValueError(f"fused MoE configurations {path}: {exc}") from exc
        shape = (tuned.num_experts, tuned.inter, tuned.hidden, tuned.variant)
        if shape != expected:
            raise ValueError(f"fused MoE configurations {path} are for {shape}, not {expected}")
        counts = sorted(tuned.configs)
        configs = tuple(tuned.configs[c].as_config() for c in counts)
        if group_k is not None and any(c.block_k != group_k for c in configs):
            raise ValueError(
                f"fused MoE configurations {path}: block-scaled FP8 needs block_k = {group_k} throughout"
            )
        log.info("fused MoE: block configurations for %d token counts from %s", len(counts), path)
        return TunedMoeConfigs(tuple(counts), configs, path)
    return None


def tuned_configs_for(
    num_experts: int, inter: int, hidden: int, weight_dtype: torch.dtype, group_k: int | None = None
) -> TunedMoeConfigs | None:
    """The tuned table for this layer on the current CUDA device (None off CUDA, or where none was tuned)."""
    if not torch.cuda.is_available():
        return None
    device = torch.cuda.get_device_name(torch.cuda.current_device())
    return load_tuned_configs(
        device, num_experts, inter, hidden, variant_name(weight_dtype, group_k), group_k
    )
