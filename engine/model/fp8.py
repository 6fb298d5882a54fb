"""FP8 linear layers as engine.model.layer_kit builds them under an ``Fp8Scheme``
(engine.model.quantization), and the FP8 (e4m3) quantization they use.

Whatever the checkpoint's layout, a layer keeps one scale per (output row, group of ``group_k`` input
features): ``weight_scale`` [out, 1] for per-channel and per-tensor scales (a per-tensor scale is
repeated over its part's rows, which is exact and keeps each packed part's own scale), [out,
ceil(in / group_k)] for block scales (each row takes its block's scale). Any packing (q/k/v, gate/up)
and any tensor-parallel slice of rows then reads its scales like its weight rows.

How it runs is chosen when it is built (``scheme.dequantize``):
- FP8 GEMMs (CUDA, compute capability >= 8.9): activations are quantized per token (per token and
  group of ``group_k`` features for block weights), then the Triton GEMM of engine.kernels.fp8_gemm
  (block scales at few tokens; per-channel weights at decode's few tokens, where cuBLAS reads the weights
  slowly; shapes _scaled_mm refuses) or ``torch._scaled_mm``: row-wise scales for per-channel weights at more
  tokens, 128 x 128 block scales (cuBLAS's block-scaled kernel, Hopper) for block weights from 128 tokens;
- dequantized (CPU, older GPUs, weight-only schemes): at the end of loading the weight becomes
  float8 * scale in the model's dtype (bfloat16 and oneDNN-packed under CPU mixed precision) and
  the layer is an ordinary matmul. With ``--quantization fp8`` on the CPU that is a weight-only
  emulation: the weights carry FP8's rounding, the activations are not quantized.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.linear import Linear, all_reduce, pack_for_matmul
from engine.model.quantization import FP8_MAX, FP8_MIN_SCALE, Fp8Scheme
from engine.model.sharding import CheckpointTensor, Parallel, Part, Shard, copy_checked

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn


class QuantizedActivation(NamedTuple):
    """An FP8 linear's input already quantized by the kernel that produced it (engine.kernels.fp8_producers):
    float8 [T, k] (2-D: the model's flat token dimension) and float32 scales [T, groups], as
    engine.kernels.fp8_quant.quantize_activations returns. A tuple: a norm returning one without a residual
    returns two tensors, so callers unpack a norm's output only where they passed a residual."""

    q: torch.Tensor
    scale: torch.Tensor


def quantize_rows(w: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float [rows, k] -> (float8 [rows, k], float32 scales [rows, groups]) with one scale per row
    (group None) or per row and `group` consecutive columns; float8 * scale ~= w."""
    rows, k = w.shape
    g = group or k
    groups = -(-k // g)
    padded = F.pad(w.float(), (0, groups * g - k)).view(rows, groups, g)
    scale = (padded.abs().amax(dim=-1) / FP8_MAX).clamp_(min=FP8_MIN_SCALE)  # [rows, groups]
    q = (padded / scale[:, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    q = q.view(rows, groups * g)
    return (q if groups * g == k else q[:, :k].contiguous()), scale


@cache
def rowwise_scaled_mm_works(device: torch.device) -> bool:
    """Whether torch._scaled_mm takes per-row scales on this device (tried once per device): Hopper has the
    kernel; an Ada GPU (compute capability 8.9, FP8 too) may not, depending on the torch and CUDA build, and
    then the Triton GEMM serves every token count instead of the first prefill failing."""
    a = torch.zeros(16, 16, device=device).to(FP8)
    ones = torch.ones(16, 1, device=device)
    try:
        torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t().contiguous(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        log.warning(
            "torch._scaled_mm refuses row-wise scales on %s (%s): the Triton FP8 GEMM serves", device, reason
        )
        return False
    return True


@cache
def block_scaled_mm_works(device: torch.device) -> bool:
    """Whether torch._scaled_mm takes 1 x 128 activation and 128 x 128 weight block scales on this device (tried
    once per device): cuBLAS has them on Hopper from torch 2.9; elsewhere the Triton FP8 GEMM serves."""
    a = torch.zeros(128, 512, device=device).to(FP8)  # 512 inputs: the narrowest Fp8Linear sends it (k % 512)
    try:
        torch._scaled_mm(
            a,
            a.t(),
            scale_a=torch.ones(4, 128, device=device).t(),  # [M, K/128], M-major
            scale_b=torch.ones(1, 4, device=device).t(),  # [K/128, N/128]
            out_dtype=torch.bfloat16,
        )
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        log.info(
            "torch._scaled_mm refuses block scales on %s (%s): the Triton FP8 GEMM serves", device, reason
        )
        return False
    return True


def weight_blocks(row_scales: torch.Tensor, block_rows: int) -> torch.Tensor | None:
    """A layer's scales [out, in / 128] (each row holding its block's) -> one per block [out / block_rows,
    in / 128], or None where rows of one block hold different scales (a slice that splits a block, or
    per-row scales)."""
    rows = row_scales.shape[0]
    if rows % block_rows:
        return None
    blocks = row_scales[::block_rows]
    return blocks if torch.equal(blocks.repeat_interleave(block_rows, dim=0), row_scales) else None


def dequantize_rows(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, group: int | None = None
) -> torch.Tensor:
    """float8 [rows, k] with scales [rows, groups] (one per row, or per row and `group` columns) ->
    `dtype` [rows, k]."""
    k = q.shape[1]
    g = group or k
    return (q.float() * scale.float().repeat_interleave(g, dim=1)[:, :k]).to(dtype)


def scale_rows(scale: torch.Tensor, rows: int, cols: int, scheme: Fp8Scheme) -> torch.Tensor:
    """One [rows, cols] weight's scale as published -> one scale per (row, group of ``scheme.group_k``
    columns) [rows, groups]: a single value (per tensor) repeated, [rows, 1] (per channel) as it is, or
    [ceil(rows / block rows), ceil(cols / group_k)] (per block, the last ones short) with each row taking its
    block's. Errors name the shape expected."""
    group_k = scheme.group_k
    groups = 1 if group_k is None else -(-cols // group_k)
    if scale.numel() == 1:  # per tensor
        return scale.reshape(1, 1).expand(rows, groups)
    if group_k is None:
        if scale.numel() != rows or scale.shape[0] != rows:
            raise ValueError(f"per-channel scale of shape {tuple(scale.shape)}, expected ({rows}, 1)")
        return scale.reshape(rows, 1)
    block_rows = scheme.block[0] if scheme.block else group_k
    expected = (-(-rows // block_rows), groups)
    if tuple(scale.shape) != expected:
        raise ValueError(f"block scale of shape {tuple(scale.shape)}, expected {expected}")
    return scale.repeat_interleave(block_rows, dim=0)[:rows]


class Fp8Linear(Linear):
    """``y = x W^T + b`` with W in float8 e4m3 and its scales (see the module docstring), in this
    rank's slice (engine.model.linear.Linear's COLUMN / ROW / REPLICATED).

    Parameters, named as in the checkpoint: ``weight`` (float8 [out, in] from construction), the weight
    scale (``scheme.scale_name``: float32 [out, groups]), and with static activations ``input_scale``
    (float32, one per packed part; the largest is used, as every part quantizes the same input).

    Under --quantization fp8 (``scheme.serialized`` False) each checkpoint part (q, k, v, gate, up or the
    whole weight) is quantized per row as it is read (``load_weight``), so the float weights never exist
    whole: a 70B model whose FP8 weights fit one 80 GB GPU loads there without first holding 140 GB of bfloat16.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        parallel: Parallel,
        parts: Sequence[Part],
        shard: Shard,
        scheme: Fp8Scheme,
        out_dtype: torch.dtype,
        matmul_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, parallel, parts, shard, FP8)
        self.scheme = scheme
        self.out_dtype = out_dtype  # the activations' dtype
        self.matmul_dtype = matmul_dtype  # CPU mixed precision: dequantize to this instead
        self.group_k = scheme.group_k
        if self.group_k is not None and self.reduce and (self.input_start % self.group_k):
            raise ValueError(
                f"a row-parallel slice starting at input feature {self.input_start} splits a "
                f"{self.group_k}-wide FP8 scale block: use a --tensor-parallel-size that divides the blocks"
            )
        groups = 1 if self.group_k is None else -(-self.in_features // self.group_k)
        # Held under the checkpoint's name (weight_scale or weight_scale_inv; `row_scales` reads it): a
        # parameter the checkpoint must fill, or a buffer filled as each part is quantized (--quantization fp8).
        scale = torch.empty(self.out_features, groups, dtype=torch.float32)
        if scheme.serialized:
            self.register_parameter(scheme.scale_name, nn.Parameter(scale, requires_grad=False))
        else:
            self.register_buffer(scheme.scale_name, scale)
        self.input_scale: nn.Parameter | None = None
        if scheme.activations == "static":
            self.input_scale = nn.Parameter(
                torch.empty(len(self.slices), dtype=torch.float32), requires_grad=False
            )
        self.static_input_scale: torch.Tensor | None = None  # set by finish_loading
        self.packed_weight: torch.Tensor | None = None  # CPU mixed precision, dequantized (finish_loading)
        self.use_scaled_mm = False  # set by finish_loading on CUDA: torch._scaled_mm takes these shapes
        self.weight_scale_row: torch.Tensor | None = None  # [1, out], the scales as _scaled_mm takes them
        # [in / 128, out / 128] (a transposed view): 128 x 128 block scales as the block-scaled _scaled_mm
        # takes them, set by finish_loading where cuBLAS has that kernel
        self.weight_block_scales: torch.Tensor | None = None

    @property
    def row_scales(self) -> torch.Tensor:
        return getattr(self, self.scheme.scale_name)

    def load_weight(self, param_name: str, tensor: CheckpointTensor, part: str) -> None:
        if param_name == "weight" and not self.scheme.serialized:
            return self._quantize_part(tensor, part)
        if param_name == "weight" or param_name == "bias":
            return super().load_weight(param_name, tensor, part)
        s = self.slices[part]
        if param_name == "input_scale":
            assert self.input_scale is not None
            self.input_scale.data[list(self.slices).index(part)] = tensor.read().float().reshape(())
            return
        assert param_name == self.scheme.scale_name, param_name
        target = self.row_scales.data.narrow(0, s.offset, s.rows)
        full_in = self.in_features * (self.shard.size if self.reduce else 1)
        per_row = scale_rows(tensor.read().float(), s.full_rows, full_in, self.scheme)
        first = 0 if self.group_k is None else self.input_start // self.group_k
        copy_checked(
            target, per_row[s.start : s.start + s.rows, first : first + target.shape[1]], tuple(tensor.shape)
        )

    def _quantize_part(self, tensor: CheckpointTensor, part: str) -> None:
        """--quantization fp8, as a float checkpoint part arrives: this rank's slice of it (its rows of a
        column-parallel part; every row over its input columns, row-parallel) is rounded to the model's
        dtype (what a float parameter would hold), moved to the weight's device and quantized there with one
        scale per row of the slice, the numerics of quantizing the whole float weight after loading. Only
        this part's float copies are alive meanwhile."""
        assert self.weight is not None
        s = self.slices[part]
        target = self.weight.data.narrow(0, s.offset, s.rows)
        source = self.read_slice("weight", tensor, part)
        if source.shape != target.shape:
            raise ValueError(
                f"checkpoint shape {tuple(tensor.shape)} gives a slice of {tuple(source.shape)}, "
                f"expected {tuple(target.shape)}"
            )
        q, scale = quantize_rows(source.to(device=target.device, dtype=self.out_dtype), self.group_k)
        target.copy_(q)
        self.row_scales.data.narrow(0, s.offset, s.rows).copy_(scale)

    def finish_loading(self) -> None:
        assert self.weight is not None
        if self.input_scale is not None:
            self.static_input_scale = self.input_scale.data.max().reshape(1, 1)
        if self.scheme.dequantize:
            dtype = self.matmul_dtype or self.out_dtype
            w = dequantize_rows(self.weight.data, self.row_scales.data, dtype, self.group_k)
            self.weight = nn.Parameter(w, requires_grad=False)
            if self.matmul_dtype is not None:
                self.packed_weight = pack_for_matmul(self.weight.data)
                if self.packed_weight is not None:
                    self.weight = None
            return
        k, n = self.in_features, self.out_features
        # torch._scaled_mm: row-wise scales, dimensions multiples of 16, bfloat16 output, and a GPU / torch
        # build that has the kernel (else every token count takes the Triton GEMM)
        self.use_scaled_mm = (
            self.group_k is None
            and k % 16 == 0
            and n % 16 == 0
            and self.out_dtype == torch.bfloat16
            and rowwise_scaled_mm_works(self.weight.device)
        )
        if self.use_scaled_mm:
            self.weight_scale_row = self.row_scales.data.reshape(1, n).contiguous()
        # Block-scaled checkpoints (Qwen3-*-FP8): cuBLAS's block-scaled kernel from 128 tokens (block_scaled_mm_wins)
        if (
            self.scheme.block == (128, 128)
            and self.scheme.activations == "dynamic"
            and k % 512
            == 0  # the weight scales' leading dimension (in / 128) a multiple of 4, as for M below
            and self.out_dtype == torch.bfloat16
            and self.weight.is_cuda
            and block_scaled_mm_works(self.weight.device)
        ):
            blocks = weight_blocks(self.row_scales.data, 128)
            if blocks is not None:
                self.weight_block_scales = blocks.contiguous().t()

    @property
    def takes_quantized_input(self) -> bool:
        """Whether the layer before may hand this one its output in float8 (QuantizedActivation): FP8 GEMMs
        with dynamic activation scales (a static scale is known only once loaded; not fused)."""
        return not self.scheme.dequantize and self.scheme.activations == "dynamic"

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        if isinstance(x, QuantizedActivation):
            assert self.takes_quantized_input and x.q.shape[1] == self.in_features, "built for another layer"
            out = self._gemm(x.q, x.scale)
        elif self.scheme.dequantize:
            out = self._forward_dequantized(x)
        else:
            out = self._forward_fp8(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], self.out_features)
        if self.reduce:
            out = all_reduce(out if self.matmul_dtype is None else out.float())
        return out if self.bias is None else out + self.bias

    def _forward_dequantized(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul_dtype is None:
            return F.linear(x, self.weight)
        x = x.to(self.matmul_dtype)
        if self.packed_weight is None:
            return F.linear(x, self.weight)
        out = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, x.shape[-1]), self.packed_weight, None, "none", [], ""
        )
        return out.view(*x.shape[:-1], out.shape[-1])

    def _forward_fp8(self, x: torch.Tensor) -> torch.Tensor:
        from engine.kernels.fp8_quant import quantize_activations

        if x.is_cuda:  # one kernel (see engine/kernels/fp8_quant.py); the torch code below is its reference
            xq, scale = quantize_activations(x, self.group_k, self.static_input_scale)
        elif self.static_input_scale is not None:
            scale = self.static_input_scale.expand(x.shape[0], 1).contiguous()
            xq = (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        else:
            xq, scale = quantize_rows(x, self.group_k)
        return self._gemm(xq, scale)

    def _gemm(self, xq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """float8 activations [T, in] with their scales -> [T, out] in the activation dtype."""
        from engine.kernels.fp8_gemm import beats_scaled_mm, block_scaled_mm_wins, fp8_gemm

        if self.weight_block_scales is not None and block_scaled_mm_wins(xq.shape[0]):
            return torch._scaled_mm(
                xq,
                self.weight.t(),
                scale_a=scale.t().contiguous().t(),  # cuBLAS reads the activation scales M-major
                scale_b=self.weight_block_scales,
                out_dtype=self.out_dtype,
            )
        if self.use_scaled_mm and not beats_scaled_mm(xq.shape[0], self.out_features):
            return torch._scaled_mm(
                xq, self.weight.t(), scale_a=scale, scale_b=self.weight_scale_row, out_dtype=self.out_dtype
            )
        return fp8_gemm(xq, scale, self.weight, self.row_scales, self.out_dtype, self.group_k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.scheme.describe()}"
