"""FP8 checkpoints as they are published, written from a float model in the test (the quantization is
written here, independently of the engine's): compressed-tensors "float-quantized" with per-channel or
per-tensor scales, and Hugging Face ``quant_method: fp8`` with [128, 128] block scales
(``weight_scale_inv``). Beside each, the dequantized float model: the reference the engine must match."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_per_channel(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).to(scale_dtype)  # [out, 1]
    return (w / scale.float()).to(FP8), scale


def quantize_per_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().max() / E4M3_MAX).reshape(1)
    return (w / scale).to(FP8), scale


def quantize_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per [block, block] tile (the last row / column of tiles may be short)."""
    rows, cols = w.shape
    scale = torch.empty(-(-rows // block), -(-cols // block))
    q = torch.empty(rows, cols, dtype=FP8)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * block : (i + 1) * block, j * block : (j + 1) * block]
            scale[i, j] = tile.abs().max() / E4M3_MAX
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / scale[i, j]).to(FP8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: int | None = None) -> torch.Tensor:
    if block is None:
        return q.float() * scale.float()
    full = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)
    return q.float() * full[: q.shape[0], : q.shape[1]]


COMPRESSED_TENSORS_CHANNEL = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "quantization_status": "compressed",
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False},
            "input_activations": {"type": "float", "num_bits": 8, "strategy": "token", "symmetric": True, "dynamic": True},
            "output_activations": None,
        }
    },
}  # fmt: skip
COMPRESSED_TENSORS_TENSOR = json.loads(json.dumps(COMPRESSED_TENSORS_CHANNEL))
COMPRESSED_TENSORS_TENSOR["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
COMPRESSED_TENSORS_TENSOR["config_groups"]["group_0"]["input_activations"] = {
    "type": "float", "num_bits": 8, "strategy": "tensor", "symmetric": True, "dynamic": False,
}  # fmt: skip
HF_FP8_BLOCK = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "weight_block_size": [128, 128],
}

FORMATS = {
    "ct-channel": COMPRESSED_TENSORS_CHANNEL,
    "ct-tensor": COMPRESSED_TENSORS_TENSOR,
    "hf-block": HF_FP8_BLOCK,
}


def write_fp8_checkpoint(
    model: transformers.PreTrainedModel, fmt: str, quantized: Path, reference: Path
) -> None:
    """`model`'s decoder linears quantized in format `fmt` into `quantized`; the dequantized model
    (float32, what FP8 weights mean) into `reference`."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEARS):
            out[name] = w
            continue
        if fmt == "ct-channel":
            q, scale = quantize_per_channel(w, torch.bfloat16)
            out[f"{module}.weight_scale"] = scale
            state[name] = dequantize(q, scale)
        elif fmt == "ct-tensor":
            q, scale = quantize_per_tensor(w)
            out[f"{module}.weight_scale"] = scale
            out[f"{module}.input_scale"] = torch.tensor([0.05])  # static activations (used on FP8 GPUs)
            state[name] = dequantize(q, scale)
        else:
            q, scale = quantize_blocks(w)
            out[f"{module}.weight_scale_inv"] = scale
            state[name] = dequantize(q, scale, 128)
        out[name] = q
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    quantized.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, quantized / "model.safetensors", {"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = FORMATS[fmt]
    (quantized / "config.json").write_text(json.dumps(config, indent=2))
    model.load_state_dict(state, strict=False)
    model.save_pretrained(reference)


# Mixtral's experts: w1 (gate), w3 (up), w2 (down)
EXPERT_LINEARS = ("w1", "w2", "w3")


def router_ignore(config: transformers.PretrainedConfig, fmt: str) -> list[str]:
    """What published MoE checkpoints leave unquantized: the LM head and every router (Qwen3-30B-A3B-FP8
    lists each layer's ``mlp.gate`` in modules_to_not_convert; RedHatAI's compressed-tensors ones ignore
    ``re:.*mlp.gate$``)."""
    block = "block_sparse_moe" if config.model_type == "mixtral" else "mlp"
    if fmt == "hf-block":
        return ["lm_head", *(f"model.layers.{i}.{block}.gate" for i in range(config.num_hidden_layers))]
    return ["lm_head", f"re:.*{block}.gate$"]


def write_fp8_moe_checkpoint(src: Path, fmt: str, quantized: Path, reference: Path) -> None:
    """The saved float MoE checkpoint in `src` (the hub's names: each expert's projections apart) with
    every decoder linear, each expert's included, quantized in format `fmt` into `quantized`; the routers
    stay float and are listed as ignored, as in published checkpoints. The dequantized float32 weights,
    under the same names, into `reference` (the model FP8 weights mean, for transformers to load)."""
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(src)
    state = load_file(src / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEARS + EXPERT_LINEARS):
            out[name] = dequantized[name] = w
            continue
        w = w.float()
        if fmt == "ct-channel":
            q, scale = quantize_per_channel(w, torch.bfloat16)
            out[f"{module}.weight_scale"] = scale
            dequantized[name] = dequantize(q, scale)
        elif fmt == "ct-tensor":
            q, scale = quantize_per_tensor(w)
            out[f"{module}.weight_scale"] = scale
            out[f"{module}.input_scale"] = torch.tensor([0.05])
            dequantized[name] = dequantize(q, scale)
        else:
            q, scale = quantize_blocks(w)
            out[f"{module}.weight_scale_inv"] = scale
            dequantized[name] = dequantize(q, scale, 128)
        out[name] = q
    for d in (quantized, reference):
        d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, quantized / "model.safetensors", {"format": "pt"})
    save_file(dequantized, reference / "model.safetensors", {"format": "pt"})
    qc = json.loads(json.dumps(FORMATS[fmt]))
    qc["modules_to_not_convert" if fmt == "hf-block" else "ignore"] = router_ignore(config, fmt)
    raw = json.loads((src / "config.json").read_text())
    (reference / "config.json").write_text(json.dumps(raw, indent=2))
    (quantized / "config.json").write_text(json.dumps(raw | {"quantization_config": qc}, indent=2))


def write_fp8_rounded_reference(src: Path, reference: Path) -> None:
    """What --quantization fp8 makes of the float checkpoint in `src`: every decoder linear, each expert's
    included, rounded to FP8 with one float32 scale per output row; the routers as they are."""
    from safetensors.torch import load_file

    state = load_file(src / "model.safetensors")
    for name, w in state.items():
        if (
            name.endswith(".weight")
            and name.removesuffix(".weight").rsplit(".", 1)[-1] in LINEARS + EXPERT_LINEARS
        ):
            state[name] = dequantize(*quantize_per_channel(w.float(), torch.float32))
    reference.mkdir(parents=True, exist_ok=True)
    save_file(state, reference / "model.safetensors", {"format": "pt"})
    (reference / "config.json").write_text((src / "config.json").read_text())
