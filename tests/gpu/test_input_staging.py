"""The step-input staging buffers: every step's device views hold that step's arrays, even when the
host fills the next steps while the GPU is still busy with earlier work (the async-scheduling case)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gpu_paged_batch import requires_cuda

from engine.model.input_staging import InputStaging

pytestmark = [requires_cuda, pytest.mark.gpu]


def step_arrays(rng: np.random.Generator, n: int, width: int) -> list[np.ndarray]:
    return [
        rng.integers(-1, 1 << 40, n, dtype=np.int64),  # slots (may be -1)
        np.arange(n + 1, dtype=np.int32),  # query starts
        rng.integers(1, 4096, n, dtype=np.int32),  # sequence lengths
        rng.integers(0, 1 << 20, (n, width), dtype=np.int32),  # block tables
        rng.integers(0, 151936, n, dtype=np.int64),  # token ids
    ]


def test_views_match_their_arrays_across_sizes_and_growth() -> None:
    staging = InputStaging(torch.device("cuda"))
    rng = np.random.default_rng(0)
    for n, width in [(1, 1), (7, 3), (256, 64), (3000, 256), (5, 2), (8192, 9)]:
        arrays = step_arrays(rng, n, width)
        views = staging.to_device(arrays)
        for array, view in zip(arrays, views, strict=True):
            assert view.shape == array.shape and view.device.type == "cuda"
            assert view.data_ptr() % 128 == 0  # as aligned as a fresh allocation: no new Triton variants
            assert np.array_equal(view.cpu().numpy(), array)


def test_filling_ahead_of_a_busy_gpu_never_overwrites_a_pending_step() -> None:
    staging = InputStaging(torch.device("cuda"))
    rng = np.random.default_rng(1)
    busy = torch.randn(4096, 4096, device="cuda")
    results = []
    for step in range(12):
        for _ in range(4):  # keep the stream busy so this step's copies wait behind real work
            busy = busy @ busy
            busy = busy / busy.norm()
        arrays = step_arrays(rng, 64 + step, 8)
        views = staging.to_device(arrays)
        results.append((arrays, [v.clone() for v in views]))  # cloned in stream order, before reuse
    torch.cuda.synchronize()
    for arrays, copies in results:
        for array, copy in zip(arrays, copies, strict=True):
            assert np.array_equal(copy.cpu().numpy(), array)
