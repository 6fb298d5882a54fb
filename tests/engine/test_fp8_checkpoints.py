"""FP8 checkpoints load as published and run on the CPU dequantized: compressed-tensors per-channel and
per-tensor (static input scales), Hugging Face block-wise (Qwen3-*-FP8). Tiny random Llama / Qwen3
models are quantized in the test (tests/engine/fp8_checkpoints.py); the engine's weights must equal the
dequantized reference exactly and its greedy output must equal transformers' on that reference.
Unsupported quantization configs fail at startup naming the method; --quantization fp8 on the CPU
emulates FP8 weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from engine_helpers import TINY_CONFIGS, hf_model, make_engine, widen_weights_
from fp8_checkpoints import dequantize, quantize_per_channel, write_fp8_checkpoint
from test_engine_vs_hf import greedy, hf_greedy, random_prompts

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model.fp8 import Fp8Linear
from engine.model.loader import load_model
from engine.model.sources import ModelLoadError

# Qwen3 with dimensions that are not multiples of 128: the last block row / column of scales is short
QWEN3_ODD = dict(hidden_size=160, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=40, num_hidden_layers=2, max_position_embeddings=512, rms_norm_eps=1e-5)  # fmt: skip


def float_model(family: str, vocab: int, eos: int) -> transformers.PreTrainedModel:
    torch.manual_seed(7)
    if family == "qwen3-odd":
        config = transformers.Qwen3Config(vocab_size=vocab, **QWEN3_ODD)
    else:
        config = TINY_CONFIGS[family](vocab)
    config.eos_token_id = eos
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    widen_weights_(model)
    return model


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory, smollm2_tokenizer):
    """(quantized dir, dequantized reference dir) per (family, format)."""
    made = {}

    def make(family: str, fmt: str):
        if (family, fmt) not in made:
            root = tmp_path_factory.mktemp(f"fp8-{family}-{fmt}")
            model = float_model(family, len(smollm2_tokenizer), smollm2_tokenizer.eos_token_id)
            write_fp8_checkpoint(model, fmt, root / "fp8", root / "reference")
            for d in ("fp8", "reference"):
                smollm2_tokenizer.save_pretrained(root / d)
            made[family, fmt] = (root / "fp8", root / "reference")
        return made[family, fmt]

    return make


def expected_weights(reference: transformers.PreTrainedModel, layer: int) -> dict[str, torch.Tensor]:
    p = {k: v for k, v in reference.state_dict().items() if k.startswith(f"model.layers.{layer}.")}
    pre = f"model.layers.{layer}."
    return {
        "self_attn.qkv_proj": torch.cat([p[pre + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
        "self_attn.o_proj": p[pre + "self_attn.o_proj.weight"],
        "mlp.gate_up_proj": torch.cat([p[pre + f"mlp.{x}_proj.weight"] for x in ("gate", "up")]),
        "mlp.down_proj": p[pre + "mlp.down_proj.weight"],
    }


CASES = [("llama", "ct-channel"), ("qwen3", "ct-tensor"), ("qwen3-odd", "hf-block"), ("llama", "hf-block")]


@pytest.mark.parametrize(("family", "fmt"), CASES)
def test_fp8_checkpoint_weights_equal_the_dequantized_reference(fp8_checkpoint, family, fmt):
    quantized, reference = fp8_checkpoint(family, fmt)
    ref = hf_model(reference)
    loaded = load_model(EngineConfig(model=str(quantized), device="cpu", dtype="float32"))
    assert "FP8" in loaded.precision
    model = loaded.model
    linears = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert len(linears) == 4 * ref.config.num_hidden_layers
    for i in range(ref.config.num_hidden_layers):
        layer = model.model.layers[i]
        for name, want in expected_weights(ref, i).items():
            got = layer.get_submodule(name).weight
            assert got.dtype == torch.float32
            assert torch.equal(got, want), (fmt, i, name)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)  # the LM head stays float


@pytest.mark.parametrize(("family", "fmt"), CASES)
def test_fp8_checkpoint_greedy_equals_transformers_on_the_dequantized_model(fp8_checkpoint, family, fmt):
    quantized, reference = fp8_checkpoint(family, fmt)
    hf = hf_model(reference)
    engine = make_engine(str(quantized), block_size=4)
    prompts = random_prompts(3, hf.config.vocab_size, seed=3)
    assert engine.generate(prompts, greedy(10)) == [hf_greedy(hf, p, 10) for p in prompts]
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks


def test_fp8_checkpoint_under_cpu_mixed_precision(fp8_checkpoint, monkeypatch):
    """--dtype auto on a CPU with bfloat16 matmuls: the dequantized weights in bfloat16 (oneDNN-packed
    where it can), the first greedy tokens as the float32 reference's."""
    from engine.model import loader

    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    quantized, reference = fp8_checkpoint("llama", "ct-channel")
    config = EngineConfig(model=str(quantized), device="cpu", dtype="auto", block_size=4)
    engine = LLMEngine(config, load_model(config))
    linear = engine.runner.model.model.layers[0].mlp.down_proj
    assert isinstance(linear, Fp8Linear) and linear.matmul_dtype == torch.bfloat16
    hf = hf_model(reference)
    prompts = random_prompts(2, hf.config.vocab_size, seed=4)
    ours = engine.generate(prompts, greedy(3))
    assert ours == [hf_greedy(hf, p, 3) for p in prompts]


def test_online_fp8_on_the_cpu_emulates_per_channel_fp8_weights(tiny_model_dir, tmp_path):
    """--quantization fp8 on a float checkpoint: weights rounded to FP8 with one scale per output
    channel (float32 scales), then run in float; greedy equals transformers on those weights."""
    path = tiny_model_dir("llama")
    ref = hf_model(path)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("_proj.weight"):
                q, scale = quantize_per_channel(p.float(), torch.float32)
                p.copy_(dequantize(q, scale))
    engine = make_engine(str(path), block_size=4, quantization="fp8")
    got = engine.runner.model.model.layers[1].self_attn.o_proj.weight
    assert torch.equal(got, ref.model.layers[1].self_attn.o_proj.weight)
    prompts = random_prompts(3, ref.config.vocab_size, seed=5)
    assert engine.generate(prompts, greedy(10)) == [hf_greedy(ref, p, 10) for p in prompts]


def with_quantization_config(src, dst, quantization_config: dict) -> str:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


@pytest.mark.parametrize(
    ("quantization_config", "named"),
    [
        ({"quant_method": "awq", "bits": 4, "group_size": 128}, "'awq'"),
        ({"quant_method": "gptq", "bits": 4}, "'gptq'"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
        ({"quant_method": "fp8", "activation_scheme": "weird"}, "activation_scheme 'weird'"),
        ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
         "activation_scheme 'static'"),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}},
         "format 'pack-quantized'"),
        ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
            "weights": {"type": "int", "num_bits": 8, "strategy": "channel"}}}}, "type 'int' with 8 bits"),
        ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["re:.*mlp.down_proj"],
          "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8, "strategy": "channel"}}}},
         "unquantized (e.g. model.layers.0.mlp.down_proj)"),
    ],
)  # fmt: skip
def test_unsupported_quantization_is_a_startup_error_naming_it(
    tiny_model_dir, tmp_path, quantization_config, named
):
    model = with_quantization_config(tiny_model_dir("llama"), tmp_path / "m", quantization_config)
    with pytest.raises(ModelLoadError) as info:
        load_model(EngineConfig(model=model, device="cpu", dtype="float32"))
    assert named in str(info.value)


def test_quantization_flag_must_match_the_checkpoint(fp8_checkpoint):
    quantized, _ = fp8_checkpoint("llama", "ct-channel")
    with pytest.raises(ModelLoadError, match="does not match the checkpoint's quantization"):
        load_model(EngineConfig(model=str(quantized), device="cpu", dtype="float32", quantization="fp8"))
