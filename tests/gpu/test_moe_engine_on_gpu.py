"""Qwen3-MoE and Mixtral through the whole engine on the GPU (the fused MoE kernel, Triton attention,
fused layers, CUDA graphs) against transformers on the same random-weight model: greedy tokens equal in
float32, first tokens and their logprobs agree in bfloat16, and CUDA-graph replay gives what eager
execution gives."""

from __future__ import annotations

import pytest
import torch
import transformers
from gpu_paged_batch import requires_cuda
from gpu_random_model import save_random_checkpoint
from test_engine_on_gpu import engine, hf_greedy, prompts

from engine.model.moe import SparseMoeBlock
from engine.sampling.params import SamplingParams

pytestmark = [requires_cuda, pytest.mark.gpu]

_TINY = dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             max_position_embeddings=1024, rms_norm_eps=1e-5)  # fmt: skip
FAMILIES = {
    # Qwen3-30B-A3B's routing (128 experts, top 8, no renormalisation), small experts
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        head_dim=64, intermediate_size=512, moe_intermediate_size=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=False, **_TINY,
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        intermediate_size=384, num_local_experts=8, num_experts_per_tok=2, **_TINY
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    made = {}

    def make(family: str):
        if family not in made:
            made[family] = save_random_checkpoint(FAMILIES[family](), tmp_path_factory.mktemp(family))
        return made[family]

    return make


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_float32_greedy_equals_transformers(family, model_dir):
    path = model_dir(family)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    ps = prompts(6, seed=1)
    theirs = [hf_greedy(hf, p, 16) for p in ps]
    ours = engine(path, "float32")
    from engine.kernels.fused_moe_layer import FusedMoeExperts

    blocks = [m for m in ours.runner.model.modules() if isinstance(m, SparseMoeBlock)]
    assert blocks and all(isinstance(b.experts, FusedMoeExperts) for b in blocks)
    assert ours.generate(ps, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)) == theirs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bfloat16_first_token_logprobs_agree_with_transformers_float32(family, model_dir):
    """The same bf16 tolerance as the dense families' test (a routing flip between near-equal experts
    moves a logprob less than a bf16 rounding of the whole model does here)."""
    path = model_dir(family)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    ps = prompts(8, seed=2)
    ours = engine(path, "bfloat16")
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=5)
    for i, p in enumerate(ps):
        ours.add_request(f"r{i}", p, params)
    outs = {}
    while ours.has_unfinished():
        for o in ours.step():
            outs[o.request_id] = o
    for i, p in enumerate(ps):
        with torch.no_grad():
            ref = hf(torch.tensor([p], device="cuda")).logits[0, -1].float().log_softmax(-1)
        lp = outs[f"r{i}"].new_logprobs[0]
        assert float(ref[lp.token_id]) >= float(ref.max()) - 0.3
        for token_id, logprob in lp.top:
            assert abs(logprob - float(ref[token_id])) < 0.3


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cuda_graph_decode_equals_eager_decode(family, model_dir):
    path = model_dir(family)
    ps = prompts(37, seed=3, hi=60)
    lengths = [1 + (i * 7) % 40 for i in range(len(ps))]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    graphed = engine(path, "float32")
    assert graphed.runner.cuda_graphs is not None and graphed.runner.cuda_graphs.graphs
    eager = engine(path, "float32", enforce_eager=True)
    assert graphed.generate(ps, params) == eager.generate(ps, params)
