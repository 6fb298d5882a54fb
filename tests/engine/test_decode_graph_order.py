"""The decode graphs' static program order (engine/model/cuda_graphs.py): what a replay sees in its
`decode_order` buffer must be a permutation of the bucket's rows, the step's longest-first order first and the
padding rows after it, whatever earlier, larger steps left there. Checked on the CPU with a stand-in for the
captured graph (tests/gpu replays real ones)."""

from __future__ import annotations

import numpy as np
import torch

from engine.model.attention import AttentionMetadata, longest_first
from engine.model.cuda_graphs import DecodeCudaGraphs


def _decode_meta(seq_lens: list[int], order: bool) -> AttentionMetadata:
    n = len(seq_lens)
    lens = np.asarray(seq_lens, dtype=np.int32)
    return AttentionMetadata(
        slot_mapping=torch.arange(n),
        query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        seq_lens=torch.from_numpy(lens),
        block_tables=torch.zeros(n, 4, dtype=torch.int32),
        num_decodes=n,
        max_query_len=1,
        max_seq_len=max(seq_lens),
        query_lens_cpu=[1] * n,
        seq_lens_cpu=seq_lens,
        decode_order=torch.from_numpy(longest_first(lens)) if order else None,
    )


def test_each_replay_sees_a_permutation_longest_first_then_padding():
    graphs = DecodeCudaGraphs(torch.nn.Identity(), [], 32, 64, 16, 8, torch.float32, torch.device("cpu"))
    seen: dict[int, list[int]] = {}

    class Recorder:  # stands in for a captured graph: records the order its kernels would read
        def __init__(self, bs: int) -> None:
            self.bs = bs

        def replay(self) -> None:
            seen[self.bs] = graphs.decode_order[: self.bs].tolist()

    graphs.graphs = {bs: Recorder(bs) for bs in graphs.buckets}
    rng = np.random.default_rng(0)
    for n, order in ((20, True), (5, True), (3, False), (32, True), (7, True)):
        lens = [int(x) for x in rng.integers(1, 64, n)]
        meta = _decode_meta(lens, order)
        graphs.run(torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.int64), meta)
        bs = next(b for b in graphs.buckets if b >= n)
        got = seen[bs]
        assert sorted(got) == list(range(bs)), (n, got)
        expected = longest_first(np.asarray(lens)).tolist() if order else list(range(n))
        assert got[:n] == expected and got[n:] == list(range(n, bs))
        if order:  # the rows' lengths do not increase along the order
            assert all(lens[a] >= lens[b] for a, b in zip(got[: n - 1], got[1:n], strict=True))
