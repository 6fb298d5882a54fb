"""Rank 0's side of tensor parallelism: start the other ranks, talk to them, watch them, stop them.

The workers are spawned processes (torch.multiprocessing's "spawn": CUDA cannot be forked), one per
rank 1..N-1, each with a one-way pipe from rank 0 for its messages (engine.distributed.messages).
They join rank 0 in a torch.distributed process group (NCCL on CUDA, gloo on the CPU) rendezvousing
through a file in a private temporary directory.

A rank that dies ends the server: the watchdog logs which rank and how, fails the requests in flight
(``on_death`` callbacks), stops the other ranks and exits the process with status 1, so Kubernetes
restarts the pod. Workers die with rank 0 too (PR_SET_PDEATHSIG, and their pipe's end of file).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import torch
import torch.multiprocessing as mp

from engine.config import EngineConfig
from engine.distributed.messages import Op, control

log = logging.getLogger(__name__)

PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)  # loading a 70B shard can take that long on slow disks
STOP_TIMEOUT_S = 15.0
DEATH_GRACE_S = 1.0  # for the event loop to answer the failed requests before the process exits


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(device: torch.device, rendezvous: str, rank: int, size: int) -> None:
    """Join the tensor-parallel group (every rank calls this; it returns once all have)."""
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    else:  # the ranks share the cores: without this each would run as many threads as there are cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    torch.distributed.init_process_group(
        backend_for(device), init_method=rendezvous, rank=rank, world_size=size, timeout=PROCESS_GROUP_TIMEOUT
    )


class TensorParallelDriver:
    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        from engine.distributed.worker import run_worker

        self.size = config.tensor_parallel_size
        self.device = device
        self.on_death: list[Callable[[str], None]] = []  # called from the watchdog thread
        self._closing = threading.Event()
        self._threads_before = torch.get_num_threads()  # init_process_group shares the cores on the CPU
        self._store_dir = tempfile.mkdtemp(prefix="kubellm-tp-")
        rendezvous = f"file://{self._store_dir}/store"
        context = mp.get_context("spawn")
        self.workers: list[BaseProcess] = []
        self.pipes: list[Connection] = []
        log_level = logging.getLogger().getEffectiveLevel()
        for rank in range(1, self.size):
            reader, writer = context.Pipe(duplex=False)
            worker = context.Process(
                target=run_worker,
                args=(config, rank, rendezvous, reader, os.getpid(), log_level),
                name=f"kubellm-tp-rank-{rank}",
                daemon=True,  # multiprocessing kills it at exit should close() not have run
            )
            worker.start()
            reader.close()  # the worker's end
            self.workers.append(worker)
            self.pipes.append(writer)
        log.info(
            "tensor parallel: %d ranks (%s), worker pids %s",
            self.size, backend_for(device), [w.pid for w in self.workers],
        )  # fmt: skip
        self._watchdog = threading.Thread(target=self._watch, name="tp-watchdog", daemon=True)
        self._watchdog.start()
        atexit.register(self.close)
        init_process_group(device, rendezvous, 0, self.size)

    # --- talking to the ranks ----------------------------------------------------------------

    def send(self, message: bytes) -> None:
        for rank, pipe in enumerate(self.pipes, 1):
            try:
                pipe.send_bytes(message)
            except OSError as exc:
                raise RuntimeError(f"tensor-parallel rank {rank} is gone ({exc})") from exc

    def broadcast_input_ids(self, input_ids: torch.Tensor) -> None:
        """The step's input ids, once rank 0 has put in the tokens its device sampled last step."""
        torch.distributed.broadcast(input_ids, src=0)

    # --- lifetime ----------------------------------------------------------------------------

    def _watch(self) -> None:
        sentinels = {w.sentinel: (rank, w) for rank, w in enumerate(self.workers, 1)}
        ready = wait(list(sentinels))
        if self._closing.is_set():
            return
        rank, worker = sentinels[ready[0]]
        worker.join(0.1)
        message = (
            f"tensor-parallel rank {rank} (pid {worker.pid}) exited with code {worker.exitcode}: "
            f"the server cannot go on without it; stopping"
        )
        log.error("%s", message)
        for callback in self.on_death:
            try:
                callback(message)
            except Exception:  # noqa: BLE001 - nothing may keep the process from exiting
                log.exception("while failing the requests in flight")
        time.sleep(DEATH_GRACE_S)
        self._stop_workers(graceful=False)
        logging.shutdown()
        os._exit(1)

    def close(self) -> None:
        """Stop every other rank (they leave their loop and exit); idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._stop_workers(graceful=True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        torch.set_num_threads(self._threads_before)
        shutil.rmtree(self._store_dir, ignore_errors=True)
        log.info("tensor-parallel ranks stopped")

    def _stop_workers(self, graceful: bool) -> None:
        if graceful:
            for pipe in self.pipes:
                try:
                    pipe.send_bytes(control(Op.STOP))
                except OSError:
                    pass  # already gone
        for pipe in self.pipes:
            pipe.close()
        deadline = time.monotonic() + (STOP_TIMEOUT_S if graceful else 0.0)
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                worker.kill()
                worker.join()
