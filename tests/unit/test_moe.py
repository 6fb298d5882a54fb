"""The MoE block's pieces against transformers' own: the router (Qwen3-MoE's optional and Mixtral's
constant renormalisation), the experts' CPU loop, where each checkpoint tensor lands (each expert apart,
transformers 5's fused layout, a tensor-parallel rank's share), and the startup errors for MoE
features we do not run."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from engine.config import EngineConfig
from engine.model.attention import TorchAttention
from engine.model.layer_kit import LayerKit
from engine.model.loader import ModelLoadError, load_model
from engine.model.moe import MoeExperts, MoeSpec, SparseMoeBlock, TopKRouter, TorchMoeExperts
from engine.model.moe_family import MoeForCausalLM
from engine.model.sharding import Shard

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def qwen3_moe(**overrides) -> Qwen3MoeConfig:
    fields = dict(SMALL, head_dim=16, intermediate_size=40, moe_intermediate_size=24, num_experts=8,
                  num_experts_per_tok=3) | overrides  # fmt: skip
    return Qwen3MoeConfig(**fields)


def mixtral(**overrides) -> MixtralConfig:
    return MixtralConfig(
        **(dict(SMALL, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2) | overrides)
    )


def our_block(config, hf_block) -> SparseMoeBlock:
    spec = MoeSpec.from_config(config)
    block = SparseMoeBlock(TopKRouter(config.hidden_size, spec), TorchMoeExperts(config.hidden_size, spec))
    block.gate.weight.data.copy_(hf_block.gate.weight)
    block.experts.gate_up_proj.data.copy_(hf_block.experts.gate_up_proj)
    block.experts.down_proj.data.copy_(hf_block.experts.down_proj)
    return block


@pytest.mark.parametrize(
    "config, hf_class",
    [
        (qwen3_moe(norm_topk_prob=False), Qwen3MoeSparseMoeBlock),
        (qwen3_moe(norm_topk_prob=True), Qwen3MoeSparseMoeBlock),
        (mixtral(), MixtralSparseMoeBlock),
    ],
    ids=["qwen3-moe", "qwen3-moe-norm-topk", "mixtral"],
)
def test_block_equals_transformers_bit_for_bit(config, hf_class):
    torch.manual_seed(0)
    hf_block = hf_class(config).eval()
    with torch.no_grad():
        for p in hf_block.parameters():
            p.normal_(0, 0.3)
    ours = our_block(config, hf_block)
    x = torch.randn(1, 23, config.hidden_size)
    with torch.no_grad():
        expected = hf_block(x)[0]
        weights, ids = ours.gate(x[0])
        _, hf_weights, hf_ids = hf_block.gate(x[0])
        assert torch.equal(ids, hf_ids) and torch.equal(weights, hf_weights.float())
        assert torch.equal(ours(x[0]), expected)
    sums = weights.sum(-1)
    renormalized = config.model_type == "mixtral" or config.norm_topk_prob
    assert torch.allclose(sums, torch.ones_like(sums)) == renormalized


@pytest.mark.parametrize(
    "config, hf_class",
    [(qwen3_moe(norm_topk_prob=True), Qwen3MoeSparseMoeBlock), (mixtral(), MixtralSparseMoeBlock)],
    ids=["qwen3-moe-norm-topk", "mixtral"],
)
def test_bfloat16_router_chooses_and_weighs_as_transformers(config, hf_class):
    """In a bfloat16 model the router's logits are bfloat16 and its softmax, top-k and renormalisation
    float32, in that order, as in transformers: the same experts and weights. Our weights stay float32
    (so do Mixtral's in transformers; Qwen3-MoE's there are rounded to bfloat16 last, equal to ours so
    rounded)."""
    torch.manual_seed(0)
    hf_block = hf_class(config).eval().to(torch.bfloat16)
    with torch.no_grad():
        hf_block.gate.weight.normal_(0, 0.3)
    ours = TopKRouter(config.hidden_size, MoeSpec.from_config(config)).to(torch.bfloat16)
    ours.weight.data.copy_(hf_block.gate.weight)
    x = torch.randn(500, config.hidden_size).to(torch.bfloat16)
    with torch.no_grad():
        weights, ids = ours(x)
        _, hf_weights, hf_ids = hf_block.gate(x)
    assert torch.equal(ids, hf_ids)
    assert weights.dtype == torch.float32
    assert torch.equal(weights.to(hf_weights.dtype), hf_weights)


def test_sparse_and_dense_layers_follow_the_config():
    assert MoeSpec.from_config(qwen3_moe(num_hidden_layers=4)).sparse_layers == {0, 1, 2, 3}
    assert MoeSpec.from_config(qwen3_moe(num_hidden_layers=4, mlp_only_layers=[0, 2])).sparse_layers == {1, 3}
    assert MoeSpec.from_config(qwen3_moe(num_hidden_layers=4, decoder_sparse_step=2)).sparse_layers == {1, 3}
    model = MoeForCausalLM(qwen3_moe(mlp_only_layers=[1]), TorchAttention(), torch.float32, "cpu")
    assert isinstance(model.model.layers[0].mlp, SparseMoeBlock)
    assert not isinstance(model.model.layers[1].mlp, SparseMoeBlock)


def random_state(config) -> dict[str, torch.Tensor]:
    """transformers 5's in-memory state dict (experts fused: gate_up_proj [E, 2I, H])."""
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return {name: torch.randn_like(t) for name, t in model.state_dict().items()}


def per_expert(state: dict[str, torch.Tensor], names: tuple[str, str, str]) -> dict[str, torch.Tensor]:
    """The hub's layout: each expert's gate, up and down apart, under the given names."""
    out = {}
    for name, t in state.items():
        prefix, sep, tail = name.rpartition(".experts.")
        if not sep:
            out[name] = t
        elif tail == "gate_up_proj":
            gates, ups = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{prefix}.experts.{e}.{names[0]}.weight"] = gates[e]
                out[f"{prefix}.experts.{e}.{names[1]}.weight"] = ups[e]
        else:
            for e, down in enumerate(t):
                out[f"{prefix}.experts.{e}.{names[2]}.weight"] = down
    return out


@pytest.mark.parametrize("layout", ["fused", "per-expert"])
def test_qwen3_moe_expert_weights_land_in_their_slices(layout):
    config = qwen3_moe()
    state = random_state(config)
    weights = state if layout == "fused" else per_expert(state, ("gate_proj", "up_proj", "down_proj"))
    ours = MoeForCausalLM(config, TorchAttention(), torch.float32, "cpu")
    ours.load_weights(weights.items())
    experts = ours.model.layers[1].mlp.experts
    assert torch.equal(experts.gate_up_proj, state["model.layers.1.mlp.experts.gate_up_proj"])
    assert torch.equal(experts.down_proj, state["model.layers.1.mlp.experts.down_proj"])
    assert torch.equal(ours.model.layers[1].mlp.gate.weight, state["model.layers.1.mlp.gate.weight"])


def test_mixtral_names_map_onto_the_mlp_slot():
    config = mixtral()
    state = random_state(config)
    hub = per_expert(state, ("w1", "w3", "w2"))
    hub = {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in hub.items()}  # the hub's names
    assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in hub
    ours = MoeForCausalLM(config, TorchAttention(), torch.float32, "cpu")
    ours.load_weights(hub.items())
    experts = ours.model.layers[0].mlp.experts
    assert torch.equal(experts.gate_up_proj, state["model.layers.0.mlp.experts.gate_up_proj"])


def test_missing_or_misshapen_expert_tensors_are_refused():
    config = qwen3_moe()
    hub = per_expert(random_state(config), ("gate_proj", "up_proj", "down_proj"))
    ours = MoeForCausalLM(config, TorchAttention(), torch.float32, "cpu")
    incomplete = {k: v for k, v in hub.items() if k != "model.layers.0.mlp.experts.5.up_proj.weight"}
    with pytest.raises(ValueError, match=r"lacks 1 expert tensors.*layers\.0\.mlp\.experts\.5\.up"):
        ours.load_weights(incomplete.items())
    hub["model.layers.0.mlp.experts.5.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"experts\.5\.up_proj.*\(3, 3\)"):
        ours.load_weights(hub.items())
    with pytest.raises(ValueError, match="no place"):
        ours.load_weights([("model.layers.0.mlp.experts.8.up_proj.weight", torch.zeros(24, 32))])


def test_a_tensor_parallel_rank_holds_its_share_of_every_expert():
    """Rank r of N: gate and up rows, down columns [r*I/N, (r+1)*I/N) of each expert (the dense MLP's
    column/row split); the ranks' partial outputs sum to the whole block's."""
    config = qwen3_moe(moe_intermediate_size=24)
    spec = MoeSpec.from_config(config)
    torch.manual_seed(1)
    gate, up, down = torch.randn(8, 24, 32), torch.randn(8, 24, 32), torch.randn(8, 32, 24)
    whole = TorchMoeExperts(32, spec)
    ranks = [TorchMoeExperts(32, spec, Shard(rank=r, size=3)) for r in range(3)]
    for bank in [whole, *ranks]:
        for e in range(8):
            bank.load_checkpoint_tensor("gate", e, gate[e])
            bank.load_checkpoint_tensor("up", e, up[e])
            bank.load_checkpoint_tensor("down", e, down[e])
    assert ranks[1].gate_up_proj.shape == (8, 16, 32) and ranks[1].down_proj.shape == (8, 32, 8)
    assert torch.equal(ranks[1].gate_up_proj[2, :8], gate[2, 8:16])
    assert torch.equal(ranks[1].gate_up_proj[2, 8:], up[2, 8:16])
    assert torch.equal(ranks[1].down_proj[2], down[2, :, 8:16])
    x = torch.randn(5, 32)
    weights, ids = torch.rand(5, 3), torch.stack([torch.randperm(8)[:3] for _ in range(5)])
    partial = sum(bank(x, weights, ids) for bank in ranks)
    torch.testing.assert_close(partial, whole(x, weights, ids), rtol=1e-5, atol=1e-4)
    with pytest.raises(
        ValueError, match="moe_intermediate_size 24 is not divisible by --tensor-parallel-size 5"
    ):
        MoeExperts(32, spec, Shard(rank=0, size=5))


def test_cpu_mixed_precision_keeps_the_router_and_runs_the_experts_in_bfloat16():
    config = qwen3_moe()
    state = random_state(config)
    full = MoeForCausalLM(config, TorchAttention(), torch.float32, "cpu")
    mixed = MoeForCausalLM(
        config, TorchAttention(), torch.float32, "cpu", kit=LayerKit(matmul_dtype=torch.bfloat16)
    )
    for model in (full, mixed):
        model.load_weights(state.items())
    block = mixed.model.layers[0].mlp
    assert block.experts.gate_up_proj.dtype == torch.bfloat16 and block.gate.weight.dtype == torch.float32
    x = torch.randn(6, config.hidden_size)
    with torch.no_grad():
        expected, got = full.model.layers[0].mlp(x), block(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


@pytest.mark.parametrize(
    "config, feature",
    [
        (qwen3_moe(hidden_act="gelu"), "hidden_act 'gelu'"),
        (qwen3_moe(shared_expert_intermediate_size=64), "shared experts"),
    ],
)
def test_unsupported_moe_features_are_named_at_startup(tmp_path, config, feature):
    config.architectures = ["Qwen3MoeForCausalLM"]
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=f"qwen3_moe model uses {feature}.*do not support"):
        load_model(EngineConfig(model=str(tmp_path), device="cpu"))


def test_qwen2_moe_is_refused_naming_the_supported_moe_architectures(tmp_path):
    Qwen2MoeConfig(**SMALL, architectures=["Qwen2MoeForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_model(EngineConfig(model=str(tmp_path), device="cpu"))
    assert "Qwen2MoeForCausalLM" in str(err.value)
    assert "Qwen3MoeForCausalLM" in str(err.value) and "MixtralForCausalLM" in str(err.value)


def test_the_kit_builds_fused_experts_for_cuda_and_the_loop_for_the_cpu():
    pytest.importorskip("triton")
    from engine.kernels.fused_moe_layer import FusedMoeExperts

    config = mixtral()
    cuda_kit = LayerKit.for_device(torch.device("cuda"))  # built on the CPU: constructing needs no GPU
    for kit, kind in ((cuda_kit, FusedMoeExperts), (LayerKit(), TorchMoeExperts)):
        model = MoeForCausalLM(config, TorchAttention(), torch.float32, "cpu", kit=kit)
        banks = [m for m in model.modules() if isinstance(m, MoeExperts)]
        assert len(banks) == config.num_hidden_layers and all(type(b) is kind for b in banks)
