"""Layers are chosen when the model is built (engine.model.layer_kit), never swapped afterwards: the
model that runs is the model llama.py constructs."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import TINY_CONFIGS
from torch import nn

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model import llama, loader
from engine.model.attention import TorchAttention
from engine.model.layer_kit import LayerKit
from engine.model.layers import RMSNorm, RotaryEmbedding, SiluAndMul
from engine.model.linear import Linear, MixedPrecisionLinear
from engine.model.vocab import LMHead, LowPrecisionLMHead
from engine.sampling.params import SamplingParams


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


@pytest.mark.parametrize("dtype", ["float32", "auto"])  # "auto" is mixed precision (forced below)
def test_no_module_changes_class_after_the_model_is_built(tiny_model_dir, monkeypatch, dtype):
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    built: list[tuple[nn.Module, dict[str, type]]] = []
    construct = llama.LlamaForCausalLM.__init__

    def recording_init(self, *args, **kwargs):
        construct(self, *args, **kwargs)
        built.append((self, module_types(self)))

    monkeypatch.setattr(llama.LlamaForCausalLM, "__init__", recording_init)
    config = EngineConfig(model=str(tiny_model_dir("qwen2")), device="cpu", dtype=dtype, block_size=4)
    engine = LLMEngine(config, loader.load_model(config))
    engine.generate([[5, 17, 300]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    [(model, types_when_built)] = built
    assert model is engine.runner.model
    assert module_types(model) == types_when_built


def test_mixed_precision_layers_are_built_as_such():
    config = TINY_CONFIGS["llama"](512)
    model = llama.LlamaForCausalLM(
        config, TorchAttention(), torch.float32, "cpu", kit=LayerKit(matmul_dtype=torch.bfloat16)
    )  # before any weight is loaded
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * config.num_hidden_layers
    assert all(type(m) is MixedPrecisionLinear and m.weight.dtype == torch.bfloat16 for m in linears)
    assert type(model.lm_head) is LowPrecisionLMHead and model.lm_head.weight.dtype == torch.float32

    plain = llama.LlamaForCausalLM(config, TorchAttention(), torch.float32, "cpu")
    assert all(type(m) is Linear for m in plain.modules() if isinstance(m, Linear))
    assert type(plain.lm_head) is LMHead


def test_cuda_builds_fused_layers():
    pytest.importorskip("triton")
    from engine.kernels.fused_layers import FusedRMSNorm, FusedRotaryEmbedding, FusedSiluAndMul

    kit = LayerKit.for_device(torch.device("cuda"))
    assert kit.fused and kit.matmul_dtype is None
    assert not LayerKit.for_device(torch.device("cpu")).fused
    # built on the CPU: constructing needs no GPU
    model = llama.LlamaForCausalLM(
        TINY_CONFIGS["qwen3"](512), TorchAttention(), torch.float32, "cpu", kit=kit
    )
    kinds = {type(m) for m in model.modules()}
    assert {FusedRMSNorm, FusedSiluAndMul, FusedRotaryEmbedding} <= kinds
    assert not {RMSNorm, SiluAndMul, RotaryEmbedding} & kinds
    # on CUDA the LM head hands over logits in the model's dtype (the GPU readers upcast); float32 elsewhere
    assert type(model.lm_head) is LMHead and not model.lm_head.float_logits
    assert LayerKit.for_device(torch.device("cpu")).lm_head(64, 16).float_logits


def test_lm_head_keeps_the_products_dtype_when_asked():
    from engine.model.sharding import Shard

    torch.manual_seed(0)
    hidden = torch.randn(3, 16, dtype=torch.bfloat16)
    for float_logits, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        head = LMHead(50, 16, Shard(), float_logits=float_logits).to(torch.bfloat16)
        torch.nn.init.normal_(head.weight)
        assert head(hidden).dtype == dtype


def test_the_cpu_lm_head_pads_rows_to_whole_groups_of_four_and_returns_only_the_real_ones(monkeypatch):
    """MKL runs 2-3 leftover rows as matrix-vector products, each reading the whole head: the CPU kit pads to
    a multiple of 4 (one row stays one). The logits are the unpadded product's, row for row."""
    from engine.model.sharding import Shard

    assert LayerKit.for_device(torch.device("cpu")).lm_head(64, 16).row_multiple == 4
    torch.manual_seed(0)
    padded, plain = LMHead(50, 16, Shard(), row_multiple=4), LMHead(50, 16, Shard())
    torch.nn.init.normal_(plain.weight)
    padded.weight.data.copy_(plain.weight.data)
    hiddens = [torch.randn(rows, 16) for rows in range(1, 10)]
    expected = [plain(h) for h in hiddens]
    seen = []
    original = torch.nn.functional.linear

    def recording(x, w, *args):
        seen.append(x.shape[0])
        return original(x, w, *args)

    monkeypatch.setattr(torch.nn.functional, "linear", recording)
    for hidden, want in zip(hiddens, expected, strict=True):
        got = padded(hidden)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert seen == [1, 4, 4, 4, 8, 8, 8, 8, 12]


def test_norms_and_silu_before_an_fp8_linear_hand_it_float8():
    """Under FP8 GEMMs with dynamic activation scales, a layer whose output feeds one FP8 linear writes it
    quantized (engine.kernels.fp8_producers): the input norm (qkv), the post-attention norm (a dense MLP's
    gate/up; before FP8 experts it writes both: their router reads it as it is) and SiLU-and-mul (down)."""
    pytest.importorskip("triton")
    from dataclasses import replace

    from engine.kernels.fused_layers import (
        ExpertInputRMSNorm,
        Fp8OutRMSNorm,
        Fp8OutSiluAndMul,
        FusedRMSNorm,
        FusedSiluAndMul,
    )
    from engine.model.moe_family import MoeForCausalLM
    from engine.model.quantization import ONLINE_FP8, Fp8Scheme

    def build(scheme: Fp8Scheme, arch: str = "qwen3", hidden: int = 256) -> nn.Module:
        config = TINY_CONFIGS[arch](512)
        config.hidden_size, config.intermediate_size = hidden, 2 * hidden
        cls = MoeForCausalLM if arch == "qwen3_moe" else llama.LlamaForCausalLM
        kit = LayerKit(fused=True, quantization=scheme)
        return cls(config, TorchAttention(), torch.bfloat16, "cpu", kit=kit)

    for scheme in (ONLINE_FP8, Fp8Scheme("block", "dynamic", (128, 128), "weight_scale_inv", True, "fp8")):
        layer = build(scheme).model.layers[0]
        assert type(layer.input_layernorm) is Fp8OutRMSNorm and layer.input_layernorm.group == scheme.group_k
        assert type(layer.post_attention_layernorm) is Fp8OutRMSNorm
        assert type(layer.mlp.act) is Fp8OutSiluAndMul and layer.mlp.act.group == scheme.group_k
        # the q/k norms and the final norm feed no linear
        assert type(layer.self_attn.q_norm) is FusedRMSNorm
    model = build(ONLINE_FP8)
    assert type(model.model.norm) is FusedRMSNorm

    moe = build(ONLINE_FP8, "qwen3_moe").model.layers[0]
    # an FP8 MoE block: its norm writes its output as it is (the router) and in float8 (the experts)
    assert (
        type(moe.input_layernorm) is Fp8OutRMSNorm
        and type(moe.post_attention_layernorm) is ExpertInputRMSNorm
    )
    assert moe.post_attention_layernorm.group is None  # ONLINE_FP8 experts quantize per token
    # a Qwen3-MoE model's dense layers (mlp_only_layers) are dense MLPs: their norm and SiLU write float8
    config = TINY_CONFIGS["qwen3_moe"](512)
    config.hidden_size, config.intermediate_size, config.mlp_only_layers = 256, 512, [1]
    mixed = MoeForCausalLM(
        config, TorchAttention(), torch.bfloat16, "cpu", kit=LayerKit(fused=True, quantization=ONLINE_FP8)
    )
    dense = mixed.model.layers[1]
    assert type(dense.post_attention_layernorm) is Fp8OutRMSNorm and type(dense.mlp.act) is Fp8OutSiluAndMul
    assert type(mixed.model.layers[0].post_attention_layernorm) is ExpertInputRMSNorm

    unfused = [
        replace(ONLINE_FP8, dequantize=True),  # CPU / no FP8 GEMMs: the linears take float activations
        Fp8Scheme("tensor", "static", None, "weight_scale", True, "fp8"),  # a static scale, known once loaded
    ]
    for scheme in unfused:
        layer = build(scheme).model.layers[0]
        assert type(layer.input_layernorm) is FusedRMSNorm and type(layer.mlp.act) is FusedSiluAndMul
        assert type(layer.post_attention_layernorm) is FusedRMSNorm
    # 128-wide groups that do not divide the width: the last group would be ragged, left to the linear
    block = Fp8Scheme("block", "dynamic", (128, 128), "weight_scale_inv", True, "fp8")
    assert type(build(block, hidden=192).model.layers[0].input_layernorm) is FusedRMSNorm
