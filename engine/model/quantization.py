"""Which quantization a model runs with, resolved once at startup from the checkpoint's
``quantization_config`` and ``--quantization``: an ``Fp8Scheme`` the layer kit builds FP8 linears from,
or None (the model's own dtype). Anything else is refused with the method's name.

Supported:
- compressed-tensors ``float-quantized`` (RedHatAI/*-FP8, llm-compressor): float8 e4m3 weights with a
  ``weight_scale`` per output channel [out, 1], per tensor [1] or per [128, 128] block; activations
  dynamic per token, static per tensor (``input_scale``), or not quantized (weight-only);
- Hugging Face / vLLM ``quant_method: fp8``: with ``weight_block_size`` (Qwen3-*-FP8, DeepSeek) a
  ``weight_scale_inv`` per block, dynamic activations; without it (AutoFP8, vLLM-serialized) a
  ``weight_scale`` per tensor, dynamic or static (``input_scale``) activations;
- ``--quantization fp8`` on a float checkpoint: weights quantized at load with one scale per output
  channel, activations per token, dynamically (vLLM's online FP8).

Scales multiply: real weight = float8 weight * scale (``weight_scale_inv`` is named after the inverse it
was computed from; its values are multiplied all the same).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from transformers import PretrainedConfig

log = logging.getLogger(__name__)

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
FP8_MIN_SCALE = 1e-12  # an all-zero row or token still gets a usable scale
WeightStrategy = Literal["tensor", "channel", "block"]
Activations = Literal["dynamic", "static", "none"]  # per token at run time, one checkpoint scale, float


class UnsupportedQuantizationError(ValueError):
    """The checkpoint's quantization (or --quantization) is not one the engine runs; says which."""


@dataclass(frozen=True)
class Fp8Scheme:
    weight_strategy: WeightStrategy
    activations: Activations
    block: tuple[int, int] | None  # (rows, columns) of one weight scale's block; only for "block"
    scale_name: str  # the weight scale's checkpoint name: weight_scale or weight_scale_inv
    serialized: bool  # weights arrive in float8 (a checkpoint); False: quantized at load (--quantization)
    source: str  # for logs and errors: "compressed-tensors", "fp8 checkpoint", "--quantization fp8"
    ignore: tuple[str, ...] = ("lm_head",)  # modules left in the model's dtype
    # Run on float weights dequantized at load (CPU, GPUs without FP8, weight-only schemes) instead of
    # FP8 GEMMs; set by the loader from the device.
    dequantize: bool = False

    @property
    def group_k(self) -> int | None:
        """Input features per weight scale (block-wise), or None (one scale per row)."""
        return self.block[1] if self.block else None

    def describe(self) -> str:
        how = "dequantized to the model dtype" if self.dequantize else "FP8 GEMMs"
        acts = {"dynamic": "dynamic per-token", "static": "static", "none": "unquantized"}[self.activations]
        if self.dequantize:
            acts = "float"  # the checkpoint's activation scheme applies only to FP8 GEMMs
        strategy = f"block {self.block[0]}x{self.block[1]}" if self.block else f"per-{self.weight_strategy}"
        return f"FP8 ({self.source}: {strategy} weight scales, {acts} activations; {how})"


ONLINE_FP8 = Fp8Scheme("channel", "dynamic", None, "weight_scale", False, "--quantization fp8")


def resolve_quantization(requested: str | None, hf_config: PretrainedConfig) -> Fp8Scheme | None:
    """The scheme from the checkpoint's quantization_config and --quantization (None: neither)."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    if not qc:
        if requested is None:
            return None
        if requested == "fp8":
            return ONLINE_FP8
        raise UnsupportedQuantizationError(f"--quantization {requested}: only fp8 is supported")
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        scheme = _hf_fp8(qc)
    elif method == "compressed-tensors":
        scheme = _compressed_tensors(qc)
    else:
        raise UnsupportedQuantizationError(
            f"the checkpoint is quantized with {method or 'an unnamed method'!r}, which this engine does not "
            "run; supported: FP8 (quant_method fp8, compressed-tensors float-quantized)"
        )
    if requested is not None and requested != method:
        raise UnsupportedQuantizationError(
            f"--quantization {requested} does not match the checkpoint's quantization ({method}); "
            "leave --quantization out to run the checkpoint as published"
        )
    return scheme


def _hf_fp8(qc: dict[str, Any]) -> Fp8Scheme:
    activations = str(qc.get("activation_scheme", "dynamic"))
    ignore = tuple(qc.get("modules_to_not_convert") or qc.get("ignored_layers") or ("lm_head",))
    block = qc.get("weight_block_size")
    if block is not None:
        if activations != "dynamic":
            raise UnsupportedQuantizationError(
                f"fp8 with weight_block_size and activation_scheme {activations!r}: only 'dynamic' is supported"
            )
        rows, cols = (int(x) for x in block)
        return Fp8Scheme("block", "dynamic", (rows, cols), "weight_scale_inv", True, "fp8 checkpoint", ignore)
    if activations not in ("dynamic", "static"):
        raise UnsupportedQuantizationError(f"fp8 activation_scheme {activations!r}: dynamic or static only")
    return Fp8Scheme("tensor", activations, None, "weight_scale", True, "fp8 checkpoint", ignore)  # type: ignore[arg-type]


def _compressed_tensors(qc: dict[str, Any]) -> Fp8Scheme:
    fmt = qc.get("format")
    if fmt != "float-quantized":
        raise UnsupportedQuantizationError(
            f"compressed-tensors format {fmt!r}: only 'float-quantized' (FP8) is supported"
        )
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise UnsupportedQuantizationError(
            f"compressed-tensors with {len(groups)} config groups: exactly one (all Linear layers) is supported"
        )
    group = groups[0]
    weights = group.get("weights") or {}
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise UnsupportedQuantizationError(
            f"compressed-tensors weights of type {weights.get('type')!r} with {weights.get('num_bits')} bits: "
            "only float 8-bit (FP8) is supported"
        )
    strategy = weights.get("strategy")
    block: tuple[int, int] | None = None
    if strategy == "block":
        rows, cols = (int(x) for x in weights.get("block_structure") or (128, 128))
        block = (rows, cols)
    elif strategy not in ("channel", "tensor"):
        raise UnsupportedQuantizationError(
            f"compressed-tensors FP8 weight strategy {strategy!r}: channel, tensor or block only"
        )
    inputs = group.get("input_activations")
    if inputs is None:
        activations: Activations = "none"
    elif inputs.get("type") != "float" or inputs.get("num_bits") != 8:
        raise UnsupportedQuantizationError(
            f"compressed-tensors input activations of type {inputs.get('type')!r}: only FP8 is supported"
        )
    elif inputs.get("dynamic"):
        activations = "dynamic"  # per token (or per group for block weights, as vLLM does)
    elif inputs.get("strategy") == "tensor":
        activations = "static"
    else:
        raise UnsupportedQuantizationError(
            f"compressed-tensors static input activations with strategy {inputs.get('strategy')!r}: "
            "only per-tensor static scales are supported"
        )
    if block is not None and activations == "static":
        raise UnsupportedQuantizationError("compressed-tensors block weights with static activations")
    if group.get("output_activations") is not None:
        raise UnsupportedQuantizationError("compressed-tensors output activation quantization")
    ignore = tuple(qc.get("ignore") or ())
    return Fp8Scheme(strategy, activations, block, "weight_scale", True, "compressed-tensors", ignore)


def is_ignored(module_name: str, ignore: tuple[str, ...]) -> bool:
    """compressed-tensors' matching ("re:" regular expressions, else module names) and Hugging Face's
    modules_to_not_convert (a name or a dotted suffix of one: "lm_head", "mlp.gate")."""
    for entry in ignore:
        if entry.startswith("re:"):
            if re.fullmatch(entry[3:], module_name) or re.match(entry[3:], module_name):
                return True
        elif module_name == entry or module_name.endswith("." + entry) or module_name.startswith(entry + "."):
            return True
    return False


def check_ignored_linears(scheme: Fp8Scheme, linear_names: list[str]) -> None:
    """Every decoder linear is quantized (the LM head never is): a checkpoint that leaves some of them
    in float is refused rather than loaded wrongly."""
    left = [name for name in linear_names if is_ignored(name, scheme.ignore)]
    if left:
        raise UnsupportedQuantizationError(
            f"{scheme.source} leaves {len(left)} decoder linear layers unquantized (e.g. {left[0]}); "
            "only checkpoints that quantize every decoder linear (ignoring at most lm_head and MoE routers) are supported"
        )


def kernel_group_width(group: int) -> bool:
    """Whether the FP8 GEMMs (dense and MoE) take scale groups of this many input features: each K step of
    their kernels is one group, so a power of two of at least 16 (tl.dot's smallest K)."""
    return group >= 16 and group & (group - 1) == 0


def prepare_quantization(
    requested: str | None,
    hf_config: PretrainedConfig,
    device_type: str,
    capability: tuple[int, int] | None,
    linear_names: list[str],
) -> Fp8Scheme | None:
    """The scheme the model is built with, and how it runs on this device (``dequantize``).
    ``linear_names``: the checkpoint's names of the linears the scheme quantizes (the model family's
    ``quantized_linear_names``), none of which its ignore list may leave in float.

    FP8 GEMMs need compute capability 8.9 (Ada, Hopper) or later. Elsewhere a checkpoint runs
    dequantized to the model's dtype; ``--quantization fp8`` is refused on such GPUs (it would only cost
    accuracy) and on the CPU emulates FP8 weights (quantized then dequantized: FP8's rounding, none of
    its speed), so CPU runs check what the GPU computes.
    """
    scheme = resolve_quantization(requested, hf_config)
    if scheme is None:
        return None
    check_ignored_linears(scheme, linear_names)
    if device_type != "cuda":
        if not scheme.serialized:
            log.warning("--quantization fp8 on the CPU: FP8 weights emulated (rounded to FP8, run in float)")
        return replace(scheme, dequantize=True)
    if capability is None or capability < (8, 9):
        have = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
        if not scheme.serialized:
            raise UnsupportedQuantizationError(
                f"--quantization fp8 needs a CUDA GPU of compute capability 8.9 or later (Ada, Hopper); "
                f"this one has {have}"
            )
        log.warning("this GPU (compute capability %s) has no FP8: the checkpoint runs dequantized", have)
        return replace(scheme, dequantize=True)
    if scheme.activations == "none":  # weight-only FP8: dequantized, as the activations stay bfloat16
        return replace(scheme, dequantize=True)
    group = scheme.group_k
    if group is not None and not kernel_group_width(group):
        raise UnsupportedQuantizationError(
            f"{scheme.source} with FP8 weight blocks of {list(scheme.block or ())}: the FP8 GEMMs (dense and "
            "MoE) take scale blocks whose input width is a power of two of at least 16 (published checkpoints "
            "use [128, 128])"
        )
    return scheme
