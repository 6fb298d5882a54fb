"""The runner's persistent block tables (engine/model/block_table_rows.py) give, every step, exactly the
zero-padded tables a from-scratch build gives: through growth, preemption (blocks freed, new ones later),
sequences finishing and their rows handed to new ones, more sequences than rows, longer tables than columns."""

from __future__ import annotations

import random

import numpy as np

from engine.core.sequence import Sequence
from engine.model.block_table_rows import BlockTableRows
from engine.sampling.params import SamplingParams


def from_scratch(seqs: list[Sequence]) -> np.ndarray:
    width = max(1, max(len(s.block_table) for s in seqs))
    tables = np.zeros((len(seqs), width), dtype=np.int32)
    for i, s in enumerate(seqs):
        tables[i, : len(s.block_table)] = s.block_table
    return tables


def test_gather_equals_a_from_scratch_build_through_growth_preemption_and_reuse() -> None:
    rng = random.Random(0)
    rows = BlockTableRows(rows=4, blocks_per_row=3)  # small: both kinds of growth happen
    live: list[Sequence] = []
    next_block, next_id = 0, 0
    for _ in range(400):
        action = rng.random()
        if action < 0.15 or not live:
            seq = Sequence(f"r{next_id}", [1, 2, 3], SamplingParams())
            next_id += 1
            live.append(seq)
        elif action < 0.25:  # finished: its row goes back
            seq = live.pop(rng.randrange(len(live)))
            rows.release(seq.request_id)
        elif action < 0.32:  # preempted: blocks freed (as KVCacheManager.free does), regrown later
            seq = rng.choice(live)
            seq.block_table.clear()
            seq.num_block_table_resets += 1
        for seq in live:  # each step some sequences gain blocks
            for _ in range(rng.choice([0, 0, 0, 1, 2])):
                seq.block_table.append(next_block)
                next_block += 1
        if not live:
            continue
        batch = rng.sample(live, rng.randint(1, len(live)))
        np.testing.assert_array_equal(rows.gather(batch), from_scratch(batch))


def test_a_freed_row_holds_no_old_blocks() -> None:
    rows = BlockTableRows(rows=1, blocks_per_row=8)
    a = Sequence("a", [1], SamplingParams())
    a.block_table.extend([5, 6, 7])
    rows.gather([a])
    rows.release("a")
    b = Sequence("b", [1], SamplingParams())
    b.block_table.append(9)
    c = Sequence("c", [1], SamplingParams())
    c.block_table.extend([1, 2, 3])
    assert rows.gather([b, c]).tolist() == [[9, 0, 0], [1, 2, 3]]
