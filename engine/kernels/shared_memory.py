"""How many software-pipeline stages of a Triton kernel fit the GPU's shared memory.

Our tile tables were tuned on Hopper (227 KB of shared memory per block); Ada GPUs, which run FP8 and bf16
serving in many clusters (L4, L40S), have 99 KB, A100 163 KB. A tile whose pipeline buffers exceed the limit
does not launch (Triton: "out of resource: shared memory"), so kernels cut stages to fit, down to two,
rather than fail; the tile's shape, which decides the numerics' order of summation, stays.
"""

from __future__ import annotations

from functools import cache

import torch

# Shared memory Triton may need beyond the pipeline's buffers (the output tile's layout change, scales).
EPILOGUE_RESERVE = 16 * 1024


def stages_that_fit(stages: int, bytes_per_stage: int, shared_memory: int) -> int:
    """``stages`` or fewer (never below two), so that their buffers fit ``shared_memory`` bytes."""
    while stages > 2 and stages * bytes_per_stage > shared_memory - EPILOGUE_RESERVE:
        stages -= 1
    return stages


@cache
def device_shared_memory(device_index: int) -> int:
    """Bytes of shared memory one block may use on this CUDA device (opted in, as Triton does)."""
    return torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin
