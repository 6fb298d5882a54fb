"""How long one step's forward and sampling took, measured where it is honest.

On CUDA: the device time between two timing events recorded on the stream around the step's work. With
async scheduling the host queues step N+1 while the device runs step N, so a host clock would measure
the queueing, not the step; the events measure what the device did (a CUDA graph's replay included, and
any gap the host left it waiting inside the step). The elapsed time is read once the step's tokens are
(the end event follows the tokens' copy on the stream), so it adds no synchronisation.
On the CPU the step runs synchronously on the engine thread: the wall time is the step's time.
"""

from __future__ import annotations

import time

import torch


class StepTimer:
    def __init__(self, device: torch.device) -> None:
        """Starts timing: call just before the step's forward is queued."""
        self._start_event: torch.cuda.Event | None = None
        self._end_event: torch.cuda.Event | None = None
        self._started = 0.0  # perf_counter seconds (CPU)
        self._stopped = 0.0
        if device.type == "cuda":
            self._start_event = torch.cuda.Event(enable_timing=True)
            self._end_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()
        else:
            self._started = time.perf_counter()

    def stop(self) -> None:
        """Call once the step's sampling (and its tokens' copy to the host) is queued."""
        if self._end_event is not None:
            self._end_event.record()
        else:
            self._stopped = time.perf_counter()

    def elapsed_ms(self) -> float:
        """Call after the step's tokens were read: on CUDA the end event is then at most one record
        behind them on the stream, so this waits for nothing."""
        if self._start_event is not None and self._end_event is not None:
            self._end_event.synchronize()
            return self._start_event.elapsed_time(self._end_event)
        return (self._stopped - self._started) * 1e3
