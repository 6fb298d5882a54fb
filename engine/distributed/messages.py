"""The messages rank 0 sends the other ranks: one flat int64 array each, never a pickle.

A control message is ``[op, args...]``. A step message carries the step's flat inputs as the runner
built them on rank 0 (engine.model.runner.StepArrays), so every rank runs the same forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Op(IntEnum):
    STEP = 1  # run one forward (and the LM head on the rows rank 0 samples)
    SIZE_KV_CACHE = (
        2  # (max_model_len, max_batched_tokens, max_num_seqs): size the KV cache, agree on the minimum
    )
    ALLOCATE_KV_CACHE = 3  # (num_blocks,)
    CAPTURE_CUDA_GRAPHS = 4  # (max_batch_size, max_model_len, max_piecewise_tokens)
    WARM_UP = 5
    STOP = 6


def control(op: Op, *args: int) -> bytes:
    return np.asarray([op, *args], dtype=np.int64).tobytes()


@dataclass
class StepArrays:
    """One step's flat inputs on the host (see engine.model.attention.AttentionMetadata)."""

    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [S + 1] int32
    seq_lens: np.ndarray  # [S] int32
    block_tables: np.ndarray  # [S, max_blocks] int32
    input_ids: np.ndarray  # [T] int64; placeholders where `fed` says rank 0 broadcasts the real ids
    positions: np.ndarray  # [T] int64
    # [R] int64, filled under tensor parallelism: token rows whose logits are computed (the last
    # token of each sequence sampled this step)
    sample_rows: np.ndarray
    prompt_rows: np.ndarray  # [P, 2] int64, likewise: (first row, rows) of each prompt-logprobs chunk
    num_decodes: int
    fed: bool  # some input ids are tokens still on rank 0's device (async scheduling)

    HEADER = 8

    def pack(self) -> bytes:
        s, b = self.block_tables.shape
        counts = [len(self.input_ids), s, b, self.num_decodes, len(self.sample_rows), int(self.fed)]
        header = [Op.STEP, *counts, len(self.prompt_rows)]
        parts = [header, self.slot_mapping, self.query_start_loc, self.seq_lens, self.block_tables.reshape(-1),
                 self.input_ids, self.positions, self.sample_rows, self.prompt_rows.reshape(-1)]  # fmt: skip
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]).tobytes()

    @classmethod
    def unpack(cls, message: np.ndarray) -> StepArrays:
        _, t, s, b, num_decodes, r, fed, p = (int(x) for x in message[: cls.HEADER])
        sizes = [t, s + 1, s, s * b, t, t, r, 2 * p]
        chunks, at = [], cls.HEADER
        for n in sizes:
            chunks.append(message[at : at + n])
            at += n
        slots, qsl, seq_lens, tables, ids, positions, rows, prompt_rows = chunks
        return cls(
            slot_mapping=slots.copy(),
            query_start_loc=qsl.astype(np.int32),
            seq_lens=seq_lens.astype(np.int32),
            block_tables=tables.astype(np.int32).reshape(s, b),
            input_ids=ids.copy(),
            positions=positions.copy(),
            sample_rows=rows.copy(),
            prompt_rows=prompt_rows.reshape(p, 2),
            num_decodes=num_decodes,
            fed=bool(fed),
        )
