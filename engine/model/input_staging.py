"""A step's integer inputs to the GPU in two copies, from pinned buffers that live as long as the runner.

Building a step used to pin and copy each input array on its own (token ids, positions, slots, query
starts, sequence lengths, block tables): twelve torch calls, each a trip through the pinned-memory
allocator and a release of the GIL the HTTP thread is waiting for. Here the int64 arrays are packed
into one pinned buffer and the int32 arrays into another, each goes over in one non-blocking copy, and
the step gets views of the device copies.

Two sets of buffers alternate. With async scheduling the host fills step N+1's buffers while step N
may not have started on the GPU yet, so step N's host buffers must not be touched: each set records an
event after its copies and waits for it before it is filled again (by then it has long passed: the
engine has read step N's tokens before it builds step N+2). The device buffers are safe to reuse for
the same reason and because everything runs on one stream, in order.
"""

from __future__ import annotations

import numpy as np
import torch

_NUM_SETS = 2
_ALIGN = 32  # elements: 128 bytes or more for int32 and int64
_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}


class _BufferSet:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host: dict[torch.dtype, torch.Tensor] = {}
        self.dev: dict[torch.dtype, torch.Tensor] = {}
        self.copied: torch.cuda.Event | None = None

    def buffers(self, dtype: torch.dtype, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        host = self.host.get(dtype)
        if host is None or host.numel() < size:
            capacity = max(size, 2 * (0 if host is None else host.numel()), 4096)
            host = self.host[dtype] = torch.empty(capacity, dtype=dtype, pin_memory=True)
            self.dev[dtype] = torch.empty(capacity, dtype=dtype, device=self.device)
        return host, self.dev[dtype]


class InputStaging:
    def __init__(self, device: torch.device) -> None:
        self.sets = [_BufferSet(device) for _ in range(_NUM_SETS)]
        self.turn = 0

    def to_device(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Device tensors equal to `arrays` (int64 or int32 numpy arrays, any shape), in that order."""
        buffers = self.sets[self.turn]
        self.turn = (self.turn + 1) % _NUM_SETS
        if buffers.copied is not None:
            buffers.copied.synchronize()  # this set's last copies are done (normally long ago)
        placed: list[tuple[torch.dtype, int, np.ndarray]] = []
        by_dtype: dict[torch.dtype, list[tuple[int, np.ndarray]]] = {}
        used: dict[torch.dtype, int] = {}
        for array in arrays:
            dtype = _TORCH_DTYPES[array.dtype]
            start = used.get(dtype, 0)
            placed.append((dtype, start, array))
            by_dtype.setdefault(dtype, []).append((start, array))
            # Every view starts 128-byte aligned, as a fresh allocation would: Triton specializes its
            # kernels on pointer alignment, and an unaligned input compiled a new variant mid-run.
            used[dtype] = -(-(start + array.size) // _ALIGN) * _ALIGN
        dev_of: dict[torch.dtype, torch.Tensor] = {}
        for dtype, parts in by_dtype.items():
            host, dev = buffers.buffers(dtype, used[dtype])
            flat = host.numpy()
            for start, array in parts:
                flat[start : start + array.size] = array.ravel()
            dev[: used[dtype]].copy_(host[: used[dtype]], non_blocking=True)
            dev_of[dtype] = dev
        buffers.copied = torch.cuda.Event()
        buffers.copied.record()
        return [dev_of[dtype][start : start + a.size].view(a.shape) for dtype, start, a in placed]
