"""Which GEMM an FP8 linear runs is settled when it finishes loading: torch._scaled_mm with row-wise scales
only where this device's torch takes them (probed once per device), the Triton FP8 GEMM otherwise, so a GPU
without the row-wise kernel (an Ada card on some builds) serves instead of failing at its first prefill."""

from __future__ import annotations

import logging

import pytest
import torch

from engine.model import fp8
from engine.model.fp8 import Fp8Linear
from engine.model.quantization import ONLINE_FP8
from engine.model.sharding import InMemoryTensor, Parallel, Shard


@pytest.fixture
def scaled_mm(monkeypatch):
    """torch._scaled_mm replaced: `refuse` makes it raise as a build without the kernel does."""
    calls = []

    class Fake:
        refuse = False

        def __call__(self, *args, **kwargs):
            calls.append(args)
            if self.refuse:
                raise RuntimeError(
                    "scaled_gemm with rowwise scaling is only supported for CUDA 12.9 and above"
                )
            return torch.zeros(16, 16, dtype=torch.bfloat16)

    fake = Fake()
    monkeypatch.setattr(torch, "_scaled_mm", fake)
    fp8.rowwise_scaled_mm_works.cache_clear()
    yield fake, calls
    fp8.rowwise_scaled_mm_works.cache_clear()


def finished_layer() -> Fp8Linear:
    layer = Fp8Linear(64, 32, False, Parallel.REPLICATED, (), Shard(), ONLINE_FP8, torch.bfloat16)
    layer.load_weight("weight", InMemoryTensor(torch.randn(32, 64, dtype=torch.bfloat16)), "")
    layer.finish_loading()  # ONLINE_FP8 is not dequantized: the FP8 GEMM path, as on a GPU
    return layer


def test_scaled_mm_where_the_device_takes_row_wise_scales(scaled_mm):
    fake, calls = scaled_mm
    layers = [finished_layer() for _ in range(3)]
    assert all(layer.use_scaled_mm for layer in layers)
    assert layers[0].weight_scale_row is not None and layers[0].weight_scale_row.shape == (1, 32)
    assert len(calls) == 1  # probed once for the device, not per layer


def test_the_triton_gemm_where_it_refuses_them(scaled_mm, caplog):
    fake, calls = scaled_mm
    fake.refuse = True
    with caplog.at_level(logging.WARNING, logger="engine.model.fp8"):
        layers = [finished_layer() for _ in range(3)]
    assert not any(layer.use_scaled_mm for layer in layers)
    assert len(calls) == 1
    assert "refuses row-wise scales" in caplog.text and "CUDA 12.9" in caplog.text
