"""FP8 mixture-of-experts checkpoints load as published and run on the CPU dequantized: Hugging Face
``quant_method: fp8`` with [128, 128] block scales (Qwen3-30B-A3B-FP8's layout: each expert's
``weight_scale_inv``, the routers in ``modules_to_not_convert``), compressed-tensors per-channel (RedHatAI's
dynamic FP8, routers ignored by ``re:.*mlp.gate$``) and per-tensor with static input scales; and
``--quantization fp8`` on a float MoE checkpoint quantizes every expert's rows. Tiny random Qwen3-MoE
(sizes not multiples of 128: partial scale blocks; a dense layer beside the sparse one) and Mixtral models
are quantized in the test (tests/engine/fp8_checkpoints.py); the engine's expert weights must equal the
dequantized reference's exactly, its greedy output transformers' on that reference, its logprobs close."""

from __future__ import annotations

import pytest
import torch
import transformers
from engine_helpers import hf_model, make_engine, widen_weights_
from fp8_checkpoints import write_fp8_moe_checkpoint, write_fp8_rounded_reference
from test_engine_vs_hf import greedy, hf_greedy, random_prompts

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model.fp8 import Fp8Linear
from engine.model.loader import load_model
from engine.model.moe import SparseMoeBlock, TorchMoeExperts
from engine.sampling.params import SamplingParams

_SHAPE = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-5)  # fmt: skip
MOE_FAMILIES = {
    # hidden 160 and expert intermediate 96: the last block row / column of every scale grid is short;
    # layer 1 keeps a dense MLP (Fp8Linear), layer 0 is sparse
    "qwen3_moe": lambda vocab: transformers.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=160, head_dim=40, intermediate_size=192, moe_intermediate_size=96,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1], **_SHAPE,
    ),
    "mixtral": lambda vocab: transformers.MixtralConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=192, num_local_experts=4, num_experts_per_tok=2,
        **_SHAPE,
    ),
}  # fmt: skip
CASES = [
    ("qwen3_moe", "hf-block"),
    ("qwen3_moe", "ct-channel"),
    ("mixtral", "hf-block"),
    ("mixtral", "ct-tensor"),
]


def save_float_moe(family: str, tokenizer, path):
    config = MOE_FAMILIES[family](len(tokenizer))
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(11)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    widen_weights_(model)  # decisive greedy choices and varied routing
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def float_moe(tmp_path_factory, smollm2_tokenizer):
    made = {}

    def make(family: str):
        if family not in made:
            made[family] = save_float_moe(
                family, smollm2_tokenizer, tmp_path_factory.mktemp(f"float-{family}")
            )
        return made[family]

    return make


@pytest.fixture(scope="module")
def fp8_moe(tmp_path_factory, smollm2_tokenizer, float_moe):
    """(quantized dir, dequantized reference dir) per (family, format)."""
    made = {}

    def make(family: str, fmt: str):
        if (family, fmt) not in made:
            root = tmp_path_factory.mktemp(f"fp8-{family}-{fmt}")
            write_fp8_moe_checkpoint(float_moe(family), fmt, root / "fp8", root / "reference")
            for d in ("fp8", "reference"):
                smollm2_tokenizer.save_pretrained(root / d)
            made[family, fmt] = (root / "fp8", root / "reference")
        return made[family, fmt]

    return make


def first_token_logprobs(engine: LLMEngine, prompts: list[list[int]], k: int = 5) -> list[dict[int, float]]:
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=k)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{i}", prompt, params)
    outs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id] = dict(out.new_logprobs[0].top)
    return [outs[f"p{i}"] for i in range(len(prompts))]


def hf_first_token_logprobs(model: transformers.PreTrainedModel, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1].float().log_softmax(-1)


def expert_bank(model, layer: int):
    block = model.model.layers[layer].mlp
    assert isinstance(block, SparseMoeBlock)
    return block.experts


@pytest.mark.parametrize(("family", "fmt"), CASES)
def test_fp8_moe_weights_equal_the_dequantized_reference(fp8_moe, family, fmt):
    quantized, reference = fp8_moe(family, fmt)
    ref = hf_model(reference)
    loaded = load_model(EngineConfig(model=str(quantized), device="cpu", dtype="float32"))
    assert "FP8" in loaded.precision
    model = loaded.model
    experts = expert_bank(model, 0)
    assert type(experts) is TorchMoeExperts and experts.fp8 is None  # dequantized, the scales dropped
    theirs = ref.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == torch.float32
    assert torch.equal(experts.gate_up_proj, theirs.gate_up_proj)
    assert torch.equal(experts.down_proj, theirs.down_proj)
    assert torch.equal(model.model.layers[0].mlp.gate.weight, ref.model.layers[0].mlp.gate.weight)  # router
    attention = model.model.layers[0].self_attn.o_proj
    assert isinstance(attention, Fp8Linear)
    assert torch.equal(attention.weight, ref.model.layers[0].self_attn.o_proj.weight)
    if family == "qwen3_moe":  # layer 1's dense MLP is FP8 too
        down = model.model.layers[1].mlp.down_proj
        assert isinstance(down, Fp8Linear) and torch.equal(
            down.weight, ref.model.layers[1].mlp.down_proj.weight
        )


@pytest.mark.parametrize(("family", "fmt"), CASES)
def test_fp8_moe_greedy_and_logprobs_follow_transformers_on_the_dequantized_model(fp8_moe, family, fmt):
    quantized, reference = fp8_moe(family, fmt)
    hf = hf_model(reference)
    engine = make_engine(str(quantized), block_size=4)
    prompts = random_prompts(3, hf.config.vocab_size, seed=3)
    assert engine.generate(prompts, greedy(10)) == [hf_greedy(hf, p, 10) for p in prompts]
    for ours, prompt in zip(first_token_logprobs(engine, prompts), prompts, strict=True):
        theirs = hf_first_token_logprobs(hf, prompt)
        assert set(ours) == set(theirs.topk(5).indices.tolist())
        for token, logprob in ours.items():
            assert abs(logprob - float(theirs[token])) < 1e-3
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_online_fp8_quantizes_every_experts_rows(float_moe, tmp_path, smollm2_tokenizer, family):
    """--quantization fp8 on a float MoE checkpoint: each expert's gate, up and down rows (and attention's)
    rounded to FP8 with one float32 scale per row, the routers left as they are; on the CPU they then run
    in float, so greedy equals transformers on the rounded weights."""
    write_fp8_rounded_reference(float_moe(family), tmp_path / "reference")
    smollm2_tokenizer.save_pretrained(tmp_path / "reference")
    ref = hf_model(tmp_path / "reference")
    engine = make_engine(str(float_moe(family)), block_size=4, quantization="fp8")
    experts = expert_bank(engine.runner.model, 0)
    assert torch.equal(experts.gate_up_proj, ref.model.layers[0].mlp.experts.gate_up_proj)
    assert torch.equal(experts.down_proj, ref.model.layers[0].mlp.experts.down_proj)
    assert torch.equal(
        engine.runner.model.model.layers[0].mlp.gate.weight, ref.model.layers[0].mlp.gate.weight
    )
    prompts = random_prompts(3, ref.config.vocab_size, seed=5)
    assert engine.generate(prompts, greedy(10)) == [hf_greedy(ref, p, 10) for p in prompts]


def test_fp8_moe_under_cpu_mixed_precision(fp8_moe, monkeypatch):
    """--dtype auto on a CPU with bfloat16 matmuls: the experts dequantized into bfloat16, the router
    float32; the first greedy tokens as the float32 reference's."""
    from engine.model import loader

    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    quantized, reference = fp8_moe("qwen3_moe", "hf-block")
    config = EngineConfig(model=str(quantized), device="cpu", dtype="auto", block_size=4)
    engine = LLMEngine(config, load_model(config))
    experts = expert_bank(engine.runner.model, 0)
    assert experts.gate_up_proj.dtype == torch.bfloat16 and experts.fp8 is None
    assert engine.runner.model.model.layers[0].mlp.gate.weight.dtype == torch.float32
    hf = hf_model(reference)
    prompts = random_prompts(2, hf.config.vocab_size, seed=4)
    assert engine.generate(prompts, greedy(3)) == [hf_greedy(hf, p, 3) for p in prompts]
