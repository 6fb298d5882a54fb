"""FP8 experts (engine.model.fp8_moe through engine.model.moe.MoeExperts): every published scale layout
becomes one scale per (row, group of 128 inputs) and dequantizes to float8 * scale; a tensor-parallel
rank holds exactly its slice of the scales (refused where the slice would split a scale block); the
fused layout of transformers 5 lands as each expert's does; the layer kit picks FP8 GEMMs or the
dequantized float experts when the model is built; routers stay float; what is not supported is named."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import MixtralConfig, Qwen3MoeConfig

from engine.config import EngineConfig
from engine.model.attention import TorchAttention
from engine.model.fp8 import FP8
from engine.model.layer_kit import LayerKit
from engine.model.loader import ModelLoadError, check_tensor_parallel, load_model
from engine.model.moe import MoeSpec, TorchMoeExperts, expert_tensor
from engine.model.moe_family import MoeForCausalLM
from engine.model.quantization import ONLINE_FP8, Fp8Scheme, is_ignored, resolve_quantization
from engine.model.sharding import Shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from fp8_checkpoints import quantize_blocks  # noqa: E402  (the checkpoint writers' block quantizer)

BLOCK = Fp8Scheme("block", "dynamic", (128, 128), "weight_scale_inv", True, "fp8 checkpoint", dequantize=True)
CHANNEL = Fp8Scheme("channel", "dynamic", None, "weight_scale", True, "compressed-tensors", dequantize=True)
TENSOR = Fp8Scheme("tensor", "static", None, "weight_scale", True, "fp8 checkpoint", dequantize=True)
HIDDEN = 160  # two column blocks, the second short


def spec(inter: int, experts: int = 3) -> MoeSpec:
    return MoeSpec(
        num_experts=experts, top_k=2, intermediate_size=inter, renormalize=True, sparse_layers=frozenset()
    )


def published(scheme: Fp8Scheme, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float8, the scale as published, float8 * scale) of one expert projection."""
    if scheme.block:
        q, scale = quantize_blocks(w)
        full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
        return q, scale, q.float() * full
    if scheme.weight_strategy == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / 448
    else:
        scale = (w.abs().max() / 448).reshape(1)
    q = (w / scale).to(FP8)
    return q, scale, q.float() * scale


def random_experts(scheme: Fp8Scheme, inter: int, experts: int = 3, seed: int = 0):
    """Per expert and part: (float8, published scale, dequantized), gate/up [inter, H], down [H, inter]."""
    torch.manual_seed(seed)
    return [
        {part: published(scheme, torch.randn(*shape)) for part, shape in
         (("gate", (inter, HIDDEN)), ("up", (inter, HIDDEN)), ("down", (HIDDEN, inter)))}
        for _ in range(experts)
    ]  # fmt: skip


def loaded_bank(scheme: Fp8Scheme, inter: int, tensors, shard: Shard | None = None) -> TorchMoeExperts:
    bank = TorchMoeExperts(HIDDEN, spec(inter, len(tensors)), shard, quantization=scheme)
    for e, parts in enumerate(tensors):
        for part, (q, scale, _) in parts.items():
            bank.load_checkpoint_tensor(part, e, q)
            bank.load_checkpoint_tensor(part, e, scale, scheme.scale_name)
    bank.finish_loading()
    return bank


@pytest.mark.parametrize("scheme", [BLOCK, CHANNEL, TENSOR], ids=["block", "channel", "tensor"])
def test_each_published_scale_layout_dequantizes_to_float8_times_scale(scheme):
    inter = 96  # one row block of gate and up, short; one column block of down, short
    tensors = random_experts(scheme, inter)
    bank = loaded_bank(scheme, inter, tensors)
    assert bank.fp8 is None and bank.gate_up_proj.dtype == torch.float32
    for e, parts in enumerate(tensors):
        assert torch.equal(bank.gate_up_proj[e], torch.cat([parts["gate"][2], parts["up"][2]]))
        assert torch.equal(bank.down_proj[e], parts["down"][2])


@pytest.mark.parametrize("scheme", [BLOCK, CHANNEL], ids=["block", "channel"])
def test_a_tensor_parallel_rank_holds_its_slice_of_the_scales(scheme):
    """Rank r of 2: gate/up rows and down columns [r*I/2, (r+1)*I/2) of each expert, their scales with
    them (block scales: each row its block row's; down's input groups from r*I/2 on, a block boundary)."""
    inter = 512  # 256 per rank: two 128-wide blocks of down's inputs each
    tensors = random_experts(scheme, inter, experts=2, seed=1)
    whole = loaded_bank(scheme, inter, tensors)
    ranks = [loaded_bank(scheme, inter, tensors, Shard(r, 2)) for r in range(2)]
    for r, bank in enumerate(ranks):
        rows = slice(r * 256, (r + 1) * 256)
        assert torch.equal(bank.gate_up_proj[:, :256], whole.gate_up_proj[:, :inter][:, rows])
        assert torch.equal(bank.gate_up_proj[:, 256:], whole.gate_up_proj[:, inter:][:, rows])
        assert torch.equal(bank.down_proj, whole.down_proj[:, :, rows])
    x = torch.randn(5, HIDDEN)
    weights, ids = torch.rand(5, 2), torch.stack([torch.randperm(2) for _ in range(5)])
    partial = sum(bank(x, weights, ids) for bank in ranks)
    # float32 sums in another order: ~1e-5 of values near 40
    torch.testing.assert_close(partial, whole(x, weights, ids), rtol=1e-4, atol=1e-3)


def test_a_rank_slice_that_splits_a_scale_block_is_refused():
    with pytest.raises(ValueError, match="starting at 96 splits a 128-wide FP8 scale block"):
        TorchMoeExperts(HIDDEN, spec(192), Shard(1, 2), quantization=BLOCK)
    TorchMoeExperts(HIDDEN, spec(192), Shard(1, 2), quantization=CHANNEL)  # per-row scales split anywhere
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, moe_intermediate_size=192, num_experts=4)  # fmt: skip
    with pytest.raises(ModelLoadError, match="expert intermediate size 192 into slices of 96, .* 128-wide"):
        check_tensor_parallel(2, config, torch.device("cpu"), BLOCK)
    check_tensor_parallel(2, config, torch.device("cpu"), CHANNEL)


@pytest.mark.parametrize("inter", [128, 200])
def test_transformers_fused_layout_lands_as_each_experts_does(inter):
    """transformers 5 keeps an FP8 model's experts fused: gate_up_proj [E, 2I, H] float8 with
    gate_up_proj_scale_inv [E, R, H/128], gate's block grid stacked on up's (I = 200: two blocks each,
    the second of 72 rows, so R = 4 blocks do not cover 100 rows each); the same numbers as the hub's
    per-expert tensors."""
    hidden = 256
    torch.manual_seed(2)
    per_expert = {}
    for e in range(3):
        for part, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            per_expert[e, part] = quantize_blocks(torch.randn(*shape))
    fused = {
        "gate_up_proj": torch.stack(
            [torch.cat([per_expert[e, "gate"][0], per_expert[e, "up"][0]]) for e in range(3)]
        ),
        "gate_up_proj_scale_inv": torch.stack(
            [torch.cat([per_expert[e, "gate"][1], per_expert[e, "up"][1]]) for e in range(3)]
        ),
        "down_proj": torch.stack([per_expert[e, "down"][0] for e in range(3)]),
        "down_proj_scale_inv": torch.stack([per_expert[e, "down"][1] for e in range(3)]),
    }
    banks = [TorchMoeExperts(hidden, spec(inter), quantization=BLOCK) for _ in range(2)]
    for name, tensor in fused.items():
        target = expert_tensor(f"model.layers.0.mlp.experts.{name}")
        assert target is not None and target.expert is None
        banks[0].load_fused_checkpoint_tensor(target.part, tensor, target.name)
    for (e, part), (q, scale) in per_expert.items():
        banks[1].load_checkpoint_tensor(part, e, q)
        banks[1].load_checkpoint_tensor(part, e, scale, "weight_scale_inv")
    for bank in banks:
        bank.finish_loading()
    assert torch.equal(banks[0].gate_up_proj, banks[1].gate_up_proj)
    assert torch.equal(banks[0].down_proj, banks[1].down_proj)


def test_expert_tensor_names_of_fp8_checkpoints():
    def target(name):
        t = expert_tensor(name)
        return None if t is None else (t.part, t.expert, t.name)

    assert target("model.layers.2.mlp.experts.7.gate_proj.weight_scale_inv") == (
        "gate",
        7,
        "weight_scale_inv",
    )
    assert target("model.layers.2.mlp.experts.7.w2.weight_scale") == ("down", 7, "weight_scale")
    assert target("model.layers.2.mlp.experts.0.w3.input_scale") == ("up", 0, "input_scale")
    assert target("model.layers.2.mlp.experts.down_proj_scale_inv") == ("down", None, "weight_scale_inv")
    assert target("model.layers.2.mlp.experts.gate_up_proj") == ("gate_up", None, "weight")
    assert target("model.layers.2.mlp.gate.weight") is None


@pytest.mark.parametrize(
    "entry", ["mlp.gate", "model.layers.0.mlp.gate", "re:.*mlp.gate$", "model.layers.0.block_sparse_moe.gate"]
)
def test_a_router_entry_in_the_ignore_list_matches_only_the_router(entry):
    assert is_ignored("model.layers.0.mlp.gate", (entry,)) or "block_sparse_moe" in entry
    for name in ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.experts.0.gate_proj",
                 "model.layers.0.block_sparse_moe.experts.0.w1", "model.layers.0.mlp.experts.3.down_proj"):  # fmt: skip
        assert not is_ignored(name, (entry,)), (entry, name)


def test_the_kit_builds_fp8_gemm_experts_on_fp8_gpus_and_dequantized_ones_elsewhere():
    pytest.importorskip("triton")
    from engine.kernels.fused_moe_layer import Fp8FusedMoeExperts, FusedMoeExperts

    config = MixtralConfig(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=96, num_local_experts=4)  # fmt: skip
    fp8_gpu = replace(BLOCK, dequantize=False)
    cases = [
        (
            LayerKit.for_device(torch.device("cuda"), quantization=fp8_gpu),
            Fp8FusedMoeExperts,
        ),  # built on the CPU
        (LayerKit.for_device(torch.device("cuda"), quantization=BLOCK), FusedMoeExperts),  # a GPU without FP8
        (LayerKit(quantization=BLOCK), TorchMoeExperts),
    ]
    for kit, kind in cases:
        model = MoeForCausalLM(config, TorchAttention(), torch.bfloat16, "cpu", kit=kit)
        experts = model.model.layers[0].mlp.experts
        assert type(experts) is kind
        assert experts.gate_up_proj.dtype == FP8 and experts.down_proj.shape == (4, HIDDEN, 96)
        assert experts.fp8.gate_up_proj_scale.shape == (4, 192, 2)  # per row and 128 inputs: H = 160
        assert experts.fp8.down_proj_scale.shape == (4, HIDDEN, 1)
        assert model.model.layers[0].mlp.gate.weight.dtype == torch.bfloat16  # the router: the model's
    with pytest.raises(ValueError, match="need the fused CUDA kernel"):
        MoeForCausalLM(config, TorchAttention(), torch.float32, "cpu", kit=LayerKit(quantization=fp8_gpu))


def test_fp8_blocks_the_gemms_cannot_step_over_are_a_startup_error_on_fp8_gpus():
    """The FP8 kernels step K one scale block at a time (a power of two, at least 16): another block width
    is refused when the scheme is resolved, naming it, not by an assertion at the first request; on the
    CPU (dequantized) it loads."""
    from engine.model.quantization import UnsupportedQuantizationError, prepare_quantization

    config = Qwen3MoeConfig(num_hidden_layers=1)
    config.quantization_config = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 96],
    }
    with pytest.raises(UnsupportedQuantizationError, match=r"FP8 weight blocks of \[128, 96\]"):
        prepare_quantization(None, config, "cuda", (9, 0), [])
    assert prepare_quantization(None, config, "cpu", None, []).dequantize
    config.quantization_config["weight_block_size"] = [128, 128]
    assert prepare_quantization(None, config, "cuda", (9, 0), []).group_k == 128


def test_online_fp8_scales_every_experts_rows_and_a_rank_its_slice_of_them():
    inter = 64
    torch.manual_seed(3)
    weights = [{"gate": torch.randn(inter, HIDDEN), "up": torch.randn(inter, HIDDEN), "down": torch.randn(HIDDEN, inter)}
               for _ in range(2)]  # fmt: skip
    online = replace(ONLINE_FP8, dequantize=True)
    banks = [
        TorchMoeExperts(HIDDEN, spec(inter, 2), shard, quantization=online) for shard in (None, Shard(1, 2))
    ]
    for bank in banks:
        for e, parts in enumerate(weights):
            for part, w in parts.items():
                bank.load_checkpoint_tensor(part, e, w)
        bank.finish_loading()
    whole, rank = banks
    for e, parts in enumerate(weights):
        gate_q, gate_s, gate = published(CHANNEL, parts["gate"])
        assert torch.equal(whole.gate_up_proj[e, :inter], gate)
        assert torch.equal(whole.down_proj[e], published(CHANNEL, parts["down"])[2])
    assert torch.equal(rank.gate_up_proj[:, :32], whole.gate_up_proj[:, 32:inter])
    for e, parts in enumerate(weights):  # down's rows of the rank's columns: scaled over those columns
        assert torch.equal(rank.down_proj[e], published(CHANNEL, parts["down"][:, 32:])[2])


def test_online_fp8_experts_are_float8_from_the_start_each_expert_quantized_as_it_arrives():
    """--quantization fp8 never holds the float experts whole (Qwen3-30B-A3B's are 57 GB in bfloat16, 29 GB
    in FP8): the parameters are float8 before anything loads, and an expert's tensor is float8 with its
    row scales as soon as it is read, the others untouched."""
    inter = 64
    bank = TorchMoeExperts(HIDDEN, spec(inter, 2), quantization=replace(ONLINE_FP8, dequantize=False))
    assert bank.gate_up_proj.dtype == FP8 and bank.down_proj.dtype == FP8
    bank.gate_up_proj.data.zero_()
    torch.manual_seed(5)
    up, down = torch.randn(inter, HIDDEN), torch.randn(HIDDEN, inter)
    bank.load_checkpoint_tensor("up", 1, up)
    bank.load_checkpoint_tensor("down", 0, down)
    for got, got_scale, w in ((bank.gate_up_proj[1, inter:], bank.fp8.gate_up_proj_scale[1, inter:], up),
                              (bank.down_proj[0], bank.fp8.down_proj_scale[0], down)):  # fmt: skip
        scale = w.abs().amax(dim=1, keepdim=True) / 448
        assert torch.equal(got.float(), (w / scale).to(FP8).float())
        torch.testing.assert_close(got_scale, scale, rtol=1e-6, atol=0)
    assert not bank.gate_up_proj[1, :inter].float().any() and not bank.gate_up_proj[0].float().any()


def tiny_qwen3_moe_state():
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, moe_intermediate_size=24, num_experts=2,
                            num_experts_per_tok=1)  # fmt: skip
    torch.manual_seed(4)
    state = {
        "model.embed_tokens.weight": torch.randn(64, 32),
        "model.norm.weight": torch.ones(32),
        "lm_head.weight": torch.randn(64, 32),
        "model.layers.0.input_layernorm.weight": torch.ones(32),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(32),
        "model.layers.0.self_attn.q_norm.weight": torch.ones(16),
        "model.layers.0.self_attn.k_norm.weight": torch.ones(16),
        "model.layers.0.mlp.gate.weight": torch.randn(2, 32),
    }
    for name, shape in (
        ("q_proj", (32, 32)),
        ("k_proj", (16, 32)),
        ("v_proj", (16, 32)),
        ("o_proj", (32, 32)),
    ):
        q, s, _ = published(CHANNEL, torch.randn(*shape))
        (
            state[f"model.layers.0.self_attn.{name}.weight"],
            state[f"model.layers.0.self_attn.{name}.weight_scale"],
        ) = q, s
    for e in range(2):
        for name, shape in (("gate_proj", (24, 32)), ("up_proj", (24, 32)), ("down_proj", (32, 24))):
            q, s, _ = published(CHANNEL, torch.randn(*shape))
            prefix = f"model.layers.0.mlp.experts.{e}.{name}"
            state[f"{prefix}.weight"], state[f"{prefix}.weight_scale"] = q, s
    return config, state


def test_missing_expert_scales_and_quantized_routers_are_refused():
    config, state = tiny_qwen3_moe_state()
    kit = LayerKit(quantization=CHANNEL)
    model = MoeForCausalLM(config, TorchAttention(), torch.float32, "cpu", kit=kit)
    model.load_weights(state.items())  # as published: loads
    incomplete = {k: v for k, v in state.items() if k != "model.layers.0.mlp.experts.1.up_proj.weight_scale"}
    with pytest.raises(
        ValueError, match=r"lacks 1 expert tensors, e\.g\. model\.layers\.0\.mlp\.experts\.1\.up scale"
    ):
        MoeForCausalLM(config, TorchAttention(), torch.float32, "cpu", kit=kit).load_weights(
            incomplete.items()
        )
    quantized_router = state | {
        "model.layers.0.mlp.gate.weight": state["model.layers.0.mlp.gate.weight"].to(FP8)
    }
    with pytest.raises(
        ValueError, match=r"mlp\.gate\.weight: the MoE router is stored in torch\.float8_e4m3fn"
    ):
        MoeForCausalLM(config, TorchAttention(), torch.float32, "cpu", kit=kit).load_weights(
            quantized_router.items()
        )
    static_scale = state | {"model.layers.0.mlp.experts.0.up_proj.input_scale": torch.tensor([0.1])}
    with pytest.raises(ValueError, match="input_scale has no place in experts with FP8"):
        MoeForCausalLM(config, TorchAttention(), torch.float32, "cpu", kit=kit).load_weights(
            static_scale.items()
        )


def test_a_checkpoint_that_leaves_experts_unquantized_is_refused_naming_one(tmp_path):
    config, _ = tiny_qwen3_moe_state()
    config.architectures = ["Qwen3MoeForCausalLM"]
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head", "re:.*experts.*"],
        "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8, "strategy": "channel"}}},
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert resolve_quantization(None, config) is None  # the saved config object itself had none
    with pytest.raises(
        ModelLoadError,
        match=r"leaves 6 decoder linear layers unquantized \(e\.g\. model\.layers\.0\.mlp\.experts\.0\.gate_proj\)",
    ):
        load_model(EngineConfig(model=str(tmp_path), device="cpu", dtype="float32"))
