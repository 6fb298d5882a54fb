"""Which slice of each weight a tensor-parallel rank holds, and how checkpoint tensors reach it.

A ``Shard`` is (rank, size); size 1 is the single-process engine, where every slice is the whole
tensor. Layers built by engine.model.layer_kit take one and give each of their parameters a
``weight_loader`` that reads only this rank's slice of the checkpoint tensor (safetensors' lazy
slices, see engine.model.sources.CheckpointTensor), so no rank holds the full model.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import torch


class Parallel(StrEnum):
    REPLICATED = "replicated"  # every rank holds the whole layer
    COLUMN = "column"  # output features split over the ranks; no communication
    ROW = "row"  # input features split; the partial outputs are summed (all-reduce)


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor packed into a column-parallel linear (q, k, v of qkv_proj; gate, up of
    gate_up_proj): `rows` output features, or `heads` heads of rows // heads features each, which
    are never split (ranks beyond the head count hold a replicated head)."""

    name: str
    rows: int
    heads: int | None = None


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    size: int = 1

    def even(self, n: int, what: str = "features") -> tuple[int, int]:
        """(start, length) of this rank's equal share of n."""
        if n % self.size:
            raise ValueError(f"{what} {n} is not divisible by --tensor-parallel-size {self.size}")
        length = n // self.size
        return self.rank * length, length

    def heads(self, num_heads: int) -> tuple[int, int]:
        """(first head, heads held). With more ranks than heads each rank holds one head, shared by
        size // num_heads consecutive ranks (vLLM replicates KV heads the same way)."""
        if self.size <= num_heads:
            return self.even(num_heads, "heads")
        if self.size % num_heads:
            raise ValueError(f"--tensor-parallel-size {self.size} is not a multiple of the {num_heads} heads")
        return self.rank * num_heads // self.size, 1

    def part(self, part: Part) -> tuple[int, int]:
        """(first row, rows held) of a packed part."""
        if part.heads is None:
            return self.even(part.rows, f"{part.name} rows")
        head_dim = part.rows // part.heads
        first, count = self.heads(part.heads)
        return first * head_dim, count * head_dim

    def padded(self, n: int) -> tuple[int, int]:
        """(start, length) of this rank's share of n rows padded up to a multiple of size (the
        vocabulary: 151,936 rows of Qwen split over 3 ranks)."""
        length = -(-n // self.size)
        return self.rank * length, length


class CheckpointTensor(Protocol):
    """A tensor in a checkpoint, read in slices (safetensors' get_slice) or whole."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def read(self, dim: int = 0, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, start + length); all of it by default."""
        ...


class InMemoryTensor:
    """A whole tensor already in memory (GGUF conversions without a cache, tests)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def read(self, dim: int = 0, start: int = 0, length: int | None = None) -> torch.Tensor:
        if length is None and start == 0:
            return self.tensor
        return self.tensor.narrow(dim, start, self.tensor.shape[dim] - start if length is None else length)


def as_checkpoint_tensor(tensor: torch.Tensor | CheckpointTensor) -> CheckpointTensor:
    return InMemoryTensor(tensor) if isinstance(tensor, torch.Tensor) else tensor


def copy_checked(target: torch.Tensor, source: torch.Tensor, full_shape: tuple[int, ...]) -> None:
    if target.shape != source.shape:
        raise ValueError(
            f"checkpoint shape {full_shape} gives a slice of {tuple(source.shape)}, expected {tuple(target.shape)}"
        )
    target.copy_(source)


def load_replicated(param: torch.Tensor, tensor: CheckpointTensor, part: str = "") -> None:
    """The default weight loader: the whole tensor (norms, replicated layers)."""
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"checkpoint shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
    param.data.copy_(tensor.read())
