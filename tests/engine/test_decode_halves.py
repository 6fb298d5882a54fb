"""A decode step run as two halves (engine/model/decode_halves.py), on the CPU where the halves run one after
the other: each row gets the whole-batch forward's tokens and K/V, for dense and mixture-of-experts families,
and each half's metadata is its own rows, its decode order longest first. (tests/gpu replays the decode
graphs with the halves on two streams.)"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from engine_helpers import make_engine

from engine.config import EngineConfig
from engine.model.attention import AttentionMetadata, longest_first
from engine.model.decode_halves import forward_in_halves, split_decode_metadata
from engine.sampling.params import SamplingParams


def _decode_meta(seq_lens: list[int]) -> AttentionMetadata:
    n = len(seq_lens)
    lens = np.asarray(seq_lens, dtype=np.int32)
    return AttentionMetadata(
        slot_mapping=torch.arange(100, 100 + n),
        query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        seq_lens=torch.from_numpy(lens),
        block_tables=torch.arange(n * 3, dtype=torch.int32).view(n, 3),
        num_decodes=n,
        max_query_len=1,
        max_seq_len=max(seq_lens),
        query_lens_cpu=[1] * n,
        seq_lens_cpu=seq_lens,
        decode_order=torch.from_numpy(longest_first(lens)),
    )


def test_each_half_is_its_own_rows_longest_first():
    lens = [5, 40, 12, 40, 7, 33, 1]
    a, b = split_decode_metadata(_decode_meta(lens), 3)
    assert a.num_seqs == a.num_decodes == 3 and b.num_seqs == b.num_decodes == 4
    assert a.slot_mapping.tolist() == [100, 101, 102] and b.slot_mapping.tolist() == [103, 104, 105, 106]
    assert a.query_start_loc.tolist() == [0, 1, 2, 3] and b.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert b.block_tables.tolist() == [[9, 10, 11], [12, 13, 14], [15, 16, 17], [18, 19, 20]]
    assert a.seq_lens_cpu == [5, 40, 12] and b.seq_lens_cpu == [40, 7, 33, 1]
    assert a.decode_order.tolist() == [1, 2, 0] and b.decode_order.tolist() == [0, 2, 1, 3]
    assert a.decode_order.dtype == torch.int32


@pytest.mark.parametrize("split", [0, 7])
def test_a_split_outside_the_batch_is_refused(split):
    with pytest.raises(ValueError, match="cannot split 7 sequences"):
        split_decode_metadata(_decode_meta([3] * 7), split)


def test_a_step_with_prompt_tokens_is_refused():
    meta = _decode_meta([3, 4, 5])
    meta.num_decodes = 2
    with pytest.raises(ValueError, match="2 decoding"):
        split_decode_metadata(meta, 1)


def in_halves(engine) -> list[int]:
    """The engine's runner runs every all-decode step of two or more sequences in halves (the second half
    one row longer for odd counts); returns the batch sizes it ran so."""
    runner = engine.runner
    split_sizes: list[int] = []
    forward = runner.forward

    def halves(input_ids, positions, meta, graphs):
        n = meta.num_seqs
        if n < 2 or meta.num_decodes != n:
            return forward(input_ids, positions, meta, graphs)
        split_sizes.append(n)
        return forward_in_halves(
            runner.model.model, input_ids, positions, runner.kv_caches, meta, n // 2, None
        )

    runner.forward = halves
    return split_sizes


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "mixtral"])
def test_halves_give_the_whole_batch_tokens_and_cache(family, tiny_model_dir):
    path = tiny_model_dir(family)
    rng = random.Random(11)
    prompts = [[rng.randrange(2, 40000) for _ in range(rng.randint(1, 40))] for _ in range(7)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=rng.randint(3, 16), ignore_eos=True) for _ in prompts
    ]
    plain = make_engine(str(path), max_num_batched_tokens=256, max_num_seqs=8)
    split = make_engine(str(path), max_num_batched_tokens=256, max_num_seqs=8)
    sizes = in_halves(split)
    assert split.generate(prompts, params) == plain.generate(prompts, params)
    assert {7, 6} <= set(sizes), sizes  # odd and even batches
    for ours, theirs in zip(split.runner.kv_caches, plain.runner.kv_caches, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert split.kv.num_free_blocks == split.kv.pool.num_blocks


def test_the_flag_reaches_the_config():
    from engine.cli import build_parser, engine_config

    args = build_parser().parse_args(["serve", "/models/m", "--decode-overlap-min-batch", "64"])
    assert engine_config(args, args.command_parser).decode_overlap_min_batch == 64
    assert EngineConfig(model="m").decode_overlap_min_batch == 0
    with pytest.raises(ValueError):
        EngineConfig(model="m", decode_overlap_min_batch=-1)
