"""A tensor-parallel rank other than 0: a spawned process that loads its slice of the model, builds a
ModelRunner over it and repeats, message by message, the calls rank 0's runner makes.

It never schedules or samples: its share of each step is the forward (whose all-reduces need it) and
its block of the logits, which the LM head sends to rank 0.
"""

from __future__ import annotations

import logging
import signal
import sys
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.child_process import die_with_parent
from engine.config import EngineConfig
from engine.distributed.messages import Op, StepArrays
from engine.model.prompt_logprobs import join_prompt_logprob_gathers

if TYPE_CHECKING:
    from engine.model.runner import ModelRunner

log = logging.getLogger(__name__)


def run_worker(
    config: EngineConfig, rank: int, rendezvous: str, messages: Connection, parent_pid: int, log_level: int
) -> None:
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 decides
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s [tp rank {rank}] %(name)s: %(message)s",
        force=True,
    )
    try:
        runner = _set_up(config, rank, rendezvous)
        Follower(config, runner, messages).run()
    except EOFError:  # rank 0 went away without a word: nothing left to serve
        sys.exit(0)
    except BaseException:
        log.exception("tensor-parallel rank %d failed", rank)
        sys.exit(1)
    torch.distributed.destroy_process_group()


def _set_up(config: EngineConfig, rank: int, rendezvous: str) -> ModelRunner:
    from engine.distributed.driver import init_process_group
    from engine.model.loader import load_model, resolve_device
    from engine.model.runner import ModelRunner
    from engine.model.sharding import Shard

    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
    init_process_group(device, rendezvous, rank, config.tensor_parallel_size)
    loaded = load_model(config, shard=Shard(rank, config.tensor_parallel_size))
    return ModelRunner(
        loaded.model, loaded.num_layers, loaded.num_kv_heads, loaded.head_dim, loaded.dtype, loaded.device,
        config.block_size, kv_cache_dtype=loaded.kv_cache_dtype,
    )  # fmt: skip


class Follower:
    """Rank r's loop: one message, one call on the runner, in rank 0's order."""

    def __init__(self, config: EngineConfig, runner: ModelRunner, messages: Connection) -> None:
        self.config = config
        self.runner = runner
        self.messages = messages

    def run(self) -> None:
        from engine.model.kv_cache_sizing import KVCacheTooSmallError, choose_num_blocks

        runner = self.runner
        while True:
            message = np.frombuffer(self.messages.recv_bytes(), dtype=np.int64)
            op, args = Op(int(message[0])), [int(x) for x in message[1:8]]
            if op is Op.STEP:
                self.step(StepArrays.unpack(message))
            elif op is Op.SIZE_KV_CACHE:
                try:
                    choose_num_blocks(self.config, runner, *args[:3])
                except KVCacheTooSmallError:
                    pass  # rank 0 says so, and stops
            elif op is Op.ALLOCATE_KV_CACHE:
                runner.allocate_kv_cache(args[0])
            elif op is Op.CAPTURE_CUDA_GRAPHS:
                runner.capture_cuda_graphs(args[0], args[1], args[2])
            elif op is Op.WARM_UP:
                runner.warm_up()
            elif op is Op.STOP:
                return

    @torch.inference_mode()
    def step(self, arrays: StepArrays) -> None:
        runner = self.runner
        input_ids, positions, meta, _ = runner.device_inputs(arrays)
        if arrays.fed:  # tokens rank 0 sampled last step and has only on its device
            torch.distributed.broadcast(input_ids, src=0)
        hidden = runner.forward(input_ids, positions, meta, runner.graphs_for(meta, int(input_ids.shape[0])))
        if len(arrays.sample_rows):
            rows = torch.from_numpy(arrays.sample_rows).to(runner.device)
            runner.model.compute_logits(hidden.index_select(0, rows))  # this rank's block, sent to rank 0
        if len(arrays.prompt_rows):  # prompt logprobs: the same slices as rank 0's, in the same order
            join_prompt_logprob_gathers(hidden, arrays.prompt_rows.tolist(), runner.model.compute_logits)
