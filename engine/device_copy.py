"""Host-to-device copies that never make the host wait for the GPU."""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`. To a GPU the copy goes from pinned memory and is queued on
    the stream: a copy from pageable memory can block the host until the GPU catches up, which would
    undo async scheduling's overlap."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
