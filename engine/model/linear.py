"""Linear layers as engine.model.layer_kit builds them: replicated, column- or row-parallel, in the
model's dtype (``Linear``) or with bfloat16 weights for CPU mixed precision (``MixedPrecisionLinear``).

Each holds this rank's slice of the weight and reads exactly that slice from the checkpoint
(``load_weight``). A column-parallel layer may pack several checkpoint tensors (q, k, v) one after the
other; each is split on its own, so rank r holds [q_r, k_r, v_r].
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.sharding import CheckpointTensor, Parallel, Part, Shard, copy_checked

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackedSlice:
    offset: int  # first row in this rank's weight
    start: int  # first row in the checkpoint tensor
    rows: int  # rows held
    full_rows: int  # rows of the checkpoint tensor


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the tensor-parallel ranks, in place (the default process group is the TP group)."""
    torch.distributed.all_reduce(x)
    return x


class Linear(nn.Module):
    """``y = x W^T + b`` over this rank's slice of W [out, in].

    COLUMN: rows of W (output features) are split, each packed part on its own; the output is this
    rank's slice of the full output. ROW: columns (input features) are split; the partial products are
    all-reduced, then the bias (whole, on every rank) is added once.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        parallel: Parallel,
        parts: Sequence[Part],
        shard: Shard,
        matmul_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.shard = shard
        parts = tuple(parts) or (Part("", out_features),)
        if sum(p.rows for p in parts) != out_features:
            raise ValueError(f"packed parts {parts} do not add up to {out_features} output features")
        if parallel is Parallel.ROW and len(parts) > 1:
            raise ValueError("a row-parallel linear cannot pack several outputs")
        split_rows = parallel is Parallel.COLUMN and shard.size > 1
        self.slices: dict[str, PackedSlice] = {}
        offset = 0
        for p in parts:
            start, rows = shard.part(p) if split_rows else (0, p.rows)
            self.slices[p.name] = PackedSlice(offset, start, rows, p.rows)
            offset += rows
        self.input_start, self.in_features = 0, in_features
        if parallel is Parallel.ROW and shard.size > 1:
            self.input_start, self.in_features = shard.even(in_features, "input features")
        self.out_features = offset
        self.reduce = parallel is Parallel.ROW and shard.size > 1
        weight_dtype = matmul_dtype or torch.get_default_dtype()
        self.weight: nn.Parameter | None = nn.Parameter(
            torch.empty(self.out_features, self.in_features, dtype=weight_dtype), requires_grad=False
        )
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        )

    @property
    def parts(self) -> tuple[str, ...]:
        """The checkpoint tensors each parameter is filled from ("" = one unpacked tensor)."""
        return tuple(self.slices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduce:
            return F.linear(x, self.weight, self.bias)
        out = all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias

    def load_weight(self, param_name: str, tensor: CheckpointTensor, part: str) -> None:
        param = self.weight if param_name == "weight" else self.bias
        assert param is not None, f"{param_name} of a layer without one"
        s = self.slices[part]
        source = self.read_slice(param_name, tensor, part)
        copy_checked(param.data.narrow(0, s.offset, s.rows), source, tuple(tensor.shape))

    def read_slice(self, param_name: str, tensor: CheckpointTensor, part: str) -> torch.Tensor:
        """This rank's slice of one checkpoint tensor (one packed part of the weight, or the bias), as
        read: the part's rows held here, or (a row-parallel weight) every row over this rank's input
        columns. It goes to rows [offset, offset + rows) of the parameter."""
        s = self.slices[part]
        if tuple(tensor.shape)[0] != s.full_rows:
            raise ValueError(
                f"checkpoint shape {tuple(tensor.shape)} has {tensor.shape[0]} rows, expected {s.full_rows}"
            )
        if param_name == "weight" and self.reduce:  # every output row, this rank's input columns
            return tensor.read(1, self.input_start, self.in_features)
        return tensor.read(0, s.start, s.rows)

    def finish_loading(self) -> None:
        """Called once every weight is in place."""

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, {self.parallel}, bias={self.bias is not None}"
        )


class MixedPrecisionLinear(Linear):
    """A linear layer whose weight is stored in a lower precision than the model's activations.

    CPU mixed precision (see engine.model.loader.resolve_matmul_dtype): the weight is bfloat16 and
    the input is rounded to bfloat16 just before the matmul, which runs on AMX / AVX512-BF16 with
    float32 accumulation. The result stays bfloat16 (a bfloat16 matmul rounds it anyway): where it
    meets the float32 residual stream (the add inside the next RMSNorm), type promotion makes the sum
    float32, and where it goes on to another low-precision op (rotary then the bfloat16 KV cache and
    attention, SiLU-and-mul then the down projection) no cast is spent. A bias stays in the model's
    dtype and makes the output float32. Row-parallel partial sums are all-reduced in float32.

    Once loaded, the weight is kept in oneDNN's blocked layout where this torch build can (``packed_weight``;
    ``weight`` is then None): oneDNN then does not reorder the weight on every call, which at decode
    batch sizes makes the memory-bound matmul up to twice as fast.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        parallel: Parallel,
        parts: Sequence[Part],
        shard: Shard,
        matmul_dtype: torch.dtype | None = None,
    ) -> None:
        assert matmul_dtype is not None
        super().__init__(in_features, out_features, bias, parallel, parts, shard, matmul_dtype)
        self.matmul_dtype = matmul_dtype
        self.packed_weight: torch.Tensor | None = None  # set by finish_loading where oneDNN can

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.matmul_dtype)
        if self.packed_weight is not None:
            out = torch.ops.mkldnn._linear_pointwise(
                x.reshape(-1, x.shape[-1]), self.packed_weight, None, "none", [], ""
            )
            out = out.view(*x.shape[:-1], out.shape[-1])
        else:
            out = F.linear(x, self.weight)
        if self.reduce:
            out = all_reduce(out.float())
        return out if self.bias is None else out + self.bias

    def finish_loading(self) -> None:
        assert self.weight is not None
        self.packed_weight = pack_for_matmul(self.weight.detach())
        if self.packed_weight is not None:
            self.weight = None  # the packed copy is the weight now


def pack_for_matmul(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [out, in] in oneDNN's blocked layout for torch.ops.mkldnn._linear_pointwise (the ops
    torch's own CPU inductor uses for frozen linear weights), or None where they are missing, or do
    not reproduce F.linear, or the weight is not on the CPU."""
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if weight.device.type != "cpu" or reorder is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = reorder(weight, 16)  # tuned for a batch of 16 rows; any batch is computed correctly
        probe = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (RuntimeError, AttributeError, TypeError) as exc:
        log.info("no oneDNN weight packing (%s): plain F.linear", exc)
        return None
    if not torch.allclose(got.float(), F.linear(probe, weight).float(), rtol=1e-2, atol=1e-2):
        return None
    return packed
