"""FP8 experts: the scales of a mixture-of-experts layer's float8 expert weights under an ``Fp8Scheme``
(engine.model.quantization), and the loading, quantizing and dequantizing they need.

engine.model.moe.MoeExperts holds the weights (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I], in
float8 e4m3 for an FP8 checkpoint) and, under a scheme, one ``ExpertFp8Scales``. As engine.model.fp8's
Fp8Linear, whatever the checkpoint's layout, every expert projection keeps one scale per (weight row,
group of ``group_k`` input features): ``gate_up_proj_scale`` [E, 2I, G13], ``down_proj_scale`` [E, H, G2],
with G = 1 (per-channel scales; a per-tensor scale is repeated over its part's rows) or ceil(in /
group_k) (block scales: each row takes its block row's scales). That is what
engine.kernels.fused_moe.fused_experts takes, and tensor parallelism then slices scales as it slices
weights: gate/up rows, and down's input groups (a slice that starts inside a scale block is refused).

Real weight = float8 * scale (``weight_scale_inv`` is multiplied too, as in fp8.py).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.fp8 import dequantize_rows, quantize_rows, scale_rows
from engine.model.quantization import Fp8Scheme
from engine.model.sharding import CheckpointTensor, copy_checked


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class ExpertFp8Scales(nn.Module):
    """This rank's scales of every expert's gate/up rows [inter_start, inter_start + inter) and down
    columns of the same range, filled from the checkpoint (``load_part`` per expert, ``load_fused`` from
    transformers 5's fused layout) or by ``quantize_part`` (--quantization fp8)."""

    def __init__(
        self,
        scheme: Fp8Scheme,
        num_experts: int,
        hidden_size: int,
        full_inter: int,
        inter_start: int,
        inter: int,
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.group_k = scheme.group_k  # None: one scale per row
        if self.group_k is not None and inter_start % self.group_k:
            raise ValueError(
                f"a tensor-parallel slice of the experts' intermediate dimension starting at {inter_start} splits "
                f"a {self.group_k}-wide FP8 scale block of down_proj: use a --tensor-parallel-size that divides "
                "the blocks"
            )
        self.hidden_size = hidden_size
        self.full_inter = full_inter
        self.inter_start = inter_start
        self.inter = inter
        g13 = 1 if self.group_k is None else _cdiv(hidden_size, self.group_k)
        g2 = 1 if self.group_k is None else _cdiv(inter, self.group_k)
        self.gate_up_proj_scale = nn.Parameter(
            torch.empty(num_experts, 2 * inter, g13, dtype=torch.float32), requires_grad=False
        )
        self.down_proj_scale = nn.Parameter(
            torch.empty(num_experts, hidden_size, g2, dtype=torch.float32), requires_grad=False
        )

    def load_part(self, part: str, expert: int, tensor: CheckpointTensor) -> None:
        """One expert's gate, up or down scale as published: one value (per tensor), [rows, 1] (per
        channel) or [ceil(rows / block rows), ceil(in / group_k)] (per block, the last block short)."""
        rows, cols = self._full_shape(part)
        scale = tensor.read().float()
        self._store(part, expert, scale_rows(scale, rows, cols, self.scheme), tuple(tensor.shape))

    def load_fused(self, part: str, tensor: CheckpointTensor) -> None:
        """Every expert's scales of transformers 5's fused layout: gate_up [E, R, G] over the fused [2I, H],
        which is gate's scale grid stacked on up's (transformers concatenates the hub's per-expert
        tensors, so a block never spans gate and up, and with I no multiple of 128 each half's last
        block is short), or down [E, R, G]; a per-tensor scale is one value (gate_up: one per half)."""
        whole = tensor.read().float()
        if whole.shape[0] != self.gate_up_proj_scale.shape[0]:
            raise ValueError(f"fused scale of shape {tuple(whole.shape)}: expected one per expert first")
        for e in range(whole.shape[0]):
            grid = whole[e].reshape(-1, whole.shape[-1]) if whole.dim() > 1 else whole[e].reshape(1, 1)
            if part == "down":
                rows = scale_rows(grid, self.hidden_size, self.full_inter, self.scheme)
                self._store("down", e, rows, tuple(whole.shape))
                continue
            if grid.numel() > 1 and grid.shape[0] % 2:
                raise ValueError(
                    f"fused gate_up scale of {tuple(grid.shape)} per expert: expected gate's grid stacked on up's"
                )
            halves = (grid, grid) if grid.numel() == 1 else grid.chunk(2, dim=0)
            for name, half in zip(("gate", "up"), halves, strict=True):
                self._store(
                    name,
                    e,
                    scale_rows(half, self.full_inter, self.hidden_size, self.scheme),
                    tuple(whole.shape),
                )

    def quantize_part(self, part: str, expert: int, w: torch.Tensor) -> torch.Tensor:
        """--quantization fp8, as each expert's float tensor arrives: this rank's slice of one expert's
        gate or up rows [inter, H] or down [H, inter] -> float8, its scales (one per row of the slice:
        gate/up rows are whole, so the unsharded model's scales; down's over the rank's columns, as the
        dense row-parallel layers quantize their slice) stored here. One part's float32 working copy at a
        time: the float experts never exist in full, so a model that fits in FP8 loads in FP8."""
        assert self.group_k is None
        q, scale = quantize_rows(w)
        if part == "down":
            copy_checked(self.down_proj_scale.data[expert], scale, tuple(w.shape))
        else:
            offset = 0 if part == "gate" else self.inter
            copy_checked(
                self.gate_up_proj_scale.data[expert, offset : offset + self.inter], scale, tuple(w.shape)
            )
        return q

    def dequantize(
        self, gate_up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """float8 weights -> float8 * scale in `dtype`, expert by expert (one expert's float32 copy at a time)."""
        out = []
        for w, scale in ((gate_up, self.gate_up_proj_scale), (down, self.down_proj_scale)):
            full = torch.empty(w.shape, dtype=dtype, device=w.device)
            for e in range(w.shape[0]):
                full[e] = dequantize_rows(w[e], scale.data[e], dtype, self.group_k)
            out.append(full)
        return out[0], out[1]

    def _full_shape(self, part: str) -> tuple[int, int]:
        return (self.hidden_size, self.full_inter) if part == "down" else (self.full_inter, self.hidden_size)

    def _store(self, part: str, expert: int, rows: torch.Tensor, shape: tuple[int, ...]) -> None:
        """[full rows, full groups] of one expert's part -> this rank's slice."""
        if part == "down":  # every row; this rank's input groups
            target = self.down_proj_scale.data[expert]
            first = 0 if self.group_k is None else self.inter_start // self.group_k
            copy_checked(target, rows[:, first : first + target.shape[1]], shape)
            return
        offset = 0 if part == "gate" else self.inter
        target = self.gate_up_proj_scale.data[expert, offset : offset + self.inter]
        copy_checked(target, rows[self.inter_start : self.inter_start + self.inter], shape)

    def extra_repr(self) -> str:
        return self.scheme.describe()
