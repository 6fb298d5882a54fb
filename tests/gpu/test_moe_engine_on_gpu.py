"""Qwen3-MoE and Mixtral through the whole engine on the GPU (the fused MoE kernel, Triton attention,
fused layers, CUDA graphs) against transformers on the same random-weight model: greedy tokens equal in
float32, first tokens and their logprobs agree in bfloat16 (with routing pinned to float32's experts),
and CUDA-graph replay gives what eager execution gives."""

from __future__ import annotations

import pytest
import torch
import transformers
from gpu_paged_batch import requires_cuda
from gpu_random_model import checkpoint_maker
from moe_routing import (
    FAMILIES,
    ROUTED,
    FirstTokenGap,
    engine_first_tokens_routed,
    flip_allowance,
    flipped_tokens,
    hf_last_logprobs,
    pinned_tolerance,
    renormalizes,
    top_of,
)
from small_engine import small_engine
from test_engine_on_gpu import hf_greedy, prompts

from engine.model.moe import SparseMoeBlock
from engine.sampling.params import SamplingParams

pytestmark = [requires_cuda, pytest.mark.gpu]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return checkpoint_maker(tmp_path_factory, FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_float32_greedy_equals_transformers(family, model_dir):
    path = model_dir(family)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    ps = prompts(6, seed=1)
    theirs = [hf_greedy(hf, p, 16) for p in ps]
    ours = small_engine(path, "float32")
    from engine.kernels.fused_moe_layer import FusedMoeExperts

    blocks = [m for m in ours.runner.model.modules() if isinstance(m, SparseMoeBlock)]
    assert blocks and all(isinstance(b.experts, FusedMoeExperts) for b in blocks)
    assert ours.generate(ps, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)) == theirs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bfloat16_first_token_logprobs_agree_with_transformers_float32(family, model_dir):
    """bf16 first-token logprobs against transformers' float32 run, with routing pinned to its experts
    (tests/gpu/moe_routing.py: a token whose bf16 router chose another expert set runs float32's).

    Why pinned: bf16 rounding flips experts whose float32 router probabilities are near (on the CPU 1 %
    to 16 % of a layer's tokens, at margins up to 0.09, in transformers' bf16 run as in ours), and on
    this random Mixtral one flip at a prompt's last token moves the top-5 logprobs by 0.04 to 8 nats
    (float32, its 2nd and 3rd expert swapped; median about 2). A bound on the unpinned gap would fail
    on such a flip or be too loose to see a bug (unpinned, the GPU run of 2026-12-05 was 1.03 off).
    Pinned, what is left is bf16 arithmetic, and transformers' own pinned bf16 run is 0.39 off on the
    CPU on Mixtral (0.23 on Qwen3-MoE; its top-1 regret 0.43), over the dense families' 0.3: the bar is
    0.3 or a quarter more than transformers' pinned bf16 run on the same device. It still fails for a
    numeric bug: top-k weights not renormalised (1.45 on the CPU), routing weights applied to the wrong
    slot (11). The routers' own choices (recorded before pinning) are checked by count: no more flips
    than twice transformers' bf16 routers make, plus 8. bench/diag/moe_bf16_routing.py prints it all."""
    path = model_dir(family)
    renormalize = renormalizes(FAMILIES[family]())
    ps = prompts(8, seed=2)
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    reference, reference_routes = hf_last_logprobs(hf32, ps, "cuda", renormalize)
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    theirs, their_routes = hf_last_logprobs(hf16, ps, "cuda", renormalize, pins=reference_routes)
    ours = small_engine(path, "bfloat16", **ROUTED)
    tops, our_routes = engine_first_tokens_routed(ours, ps, renormalize, pins=reference_routes)

    their_gaps = [FirstTokenGap.of(top_of(lp), ref) for lp, ref in zip(theirs, reference, strict=True)]
    tolerance = pinned_tolerance(max(g.worst for g in their_gaps))
    gaps = [FirstTokenGap.of(top, ref) for top, ref in zip(tops, reference, strict=True)]
    assert all(len(top) == 5 for top in tops)
    assert max(g.worst for g in gaps) < tolerance, (gaps, their_gaps)
    flips = sum(flipped_tokens(our_routes, reference_routes).values())
    assert flips <= flip_allowance(sum(flipped_tokens(their_routes, reference_routes).values()))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cuda_graph_decode_equals_eager_decode(family, model_dir):
    path = model_dir(family)
    ps = prompts(37, seed=3, hi=60)
    lengths = [1 + (i * 7) % 40 for i in range(len(ps))]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    graphed = small_engine(path, "float32")
    assert graphed.runner.cuda_graphs is not None and graphed.runner.cuda_graphs.graphs
    eager = small_engine(path, "float32", enforce_eager=True)
    assert graphed.generate(ps, params) == eager.generate(ps, params)
