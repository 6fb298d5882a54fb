"""--quantization fp8 never holds the float model: loading a float checkpoint through load_model (as
`kubellm serve --quantization fp8` does, safetensors' lazy slices included), no FP8 linear holds a float
weight at any point, so the float bytes alive are one checkpoint part's, not the model's (a 70B model
fits one 80 GB GPU in FP8; its 140 GB of bfloat16 would not). Watched between checkpoint tensors and
just before finish_loading; then the float8 weights and scales are the old path's bit for bit (the
float checkpoint rounded to the model's dtype, quantized per row), and the tied LM head stays float."""

from __future__ import annotations

import pytest
import torch
import transformers
from engine_helpers import TINY_CONFIGS, widen_weights_
from safetensors.torch import load_file

from engine.config import EngineConfig
from engine.model.fp8 import FP8, Fp8Linear, dequantize_rows, quantize_rows
from engine.model.llama import LlamaForCausalLM
from engine.model.loader import load_model


def float_bytes_in_fp8_linears(model: torch.nn.Module) -> int:
    """Bytes of float (wider than one byte) weights held by FP8 linears."""
    return sum(
        m.weight.numel() * m.weight.element_size()
        for m in model.modules()
        if isinstance(m, Fp8Linear) and m.weight is not None and m.weight.element_size() > 1
    )


@pytest.fixture(scope="module")
def tied_qwen3(tmp_path_factory, smollm2_tokenizer):
    torch.manual_seed(11)
    config = TINY_CONFIGS["qwen3"](len(smollm2_tokenizer))
    config.tie_word_embeddings = True
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    widen_weights_(model)
    path = tmp_path_factory.mktemp("tied-qwen3")
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def test_online_fp8_loads_part_by_part_and_matches_quantizing_the_float_model(tied_qwen3, monkeypatch):
    watched: dict[str, object] = {"float_bytes": [], "before_finish": None}
    load_weights = LlamaForCausalLM.load_weights

    def watching(self, weights):
        def each():
            for item in weights:
                yield item
                watched["float_bytes"].append(float_bytes_in_fp8_linears(self))  # the tensor is in now
            watched["before_finish"] = {  # every tensor read, finish_loading not yet run
                name: (m.weight.detach().clone(), m.row_scales.clone())
                for name, m in self.named_modules()
                if isinstance(m, Fp8Linear)
            }

        return load_weights(self, each())

    monkeypatch.setattr(LlamaForCausalLM, "load_weights", watching)
    # bfloat16: the float32 checkpoint is rounded to the model's dtype before it is quantized
    loaded = load_model(
        EngineConfig(model=str(tied_qwen3), device="cpu", dtype="bfloat16", quantization="fp8")
    )
    float_bytes = watched["float_bytes"]
    assert len(float_bytes) > 20 and not any(float_bytes), float_bytes  # not one float weight, ever
    before = watched["before_finish"]
    assert before is not None and len(before) == 4 * 2  # qkv, o, gate_up, down of 2 layers

    state = load_file(tied_qwen3 / "model.safetensors")
    for i in range(2):
        pre = f"model.layers.{i}."
        floats = {
            "self_attn.qkv_proj": torch.cat([state[f"{pre}self_attn.{x}_proj.weight"] for x in "qkv"]),
            "self_attn.o_proj": state[f"{pre}self_attn.o_proj.weight"],
            "mlp.gate_up_proj": torch.cat([state[f"{pre}mlp.{x}_proj.weight"] for x in ("gate", "up")]),
            "mlp.down_proj": state[f"{pre}mlp.down_proj.weight"],
        }
        for name, w in floats.items():
            want_q, want_scale = quantize_rows(
                w.to(torch.bfloat16)
            )  # the old path: whole weight, once loaded
            q, scale = before[pre + name]
            assert q.dtype == FP8 and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), name
            assert torch.equal(scale, want_scale), name
            # on the CPU the scheme then dequantizes: float8 * scale in the model's dtype
            got = loaded.model.get_submodule(pre + name).weight
            assert torch.equal(got, dequantize_rows(want_q, want_scale, torch.bfloat16)), name

    model = loaded.model
    assert not isinstance(model.lm_head, Fp8Linear)  # the LM head is never quantized
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: the embedding, in float
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"].to(torch.bfloat16))
