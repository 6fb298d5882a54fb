"""Mixture-of-experts MLP: a top-k softmax router and a bank of SiLU-gated experts.

``SparseMoeBlock`` takes the place of the dense MLP in a Llama-family decoder layer (Qwen3-MoE,
Mixtral). Its parameters keep transformers' fused layout: ``experts.gate_up_proj`` [E, 2I, H] (each
expert's gate rows, then its up rows) and ``experts.down_proj`` [E, H, I]; checkpoints name each
expert's projections apart (``experts.3.gate_proj.weight``, Mixtral's ``w1``/``w3``/``w2``), and
``expert_tensor`` says where each lands.

Two implementations of the experts share those parameters: ``TorchMoeExperts`` (a loop over the
experts some token chose, the CPU path, the same arithmetic as transformers) and ``FusedMoeExperts``
(engine.kernels.fused_moe: two grouped Triton GEMMs, CUDA graph capturable).

Both are built by engine.model.layer_kit.LayerKit.moe_experts; likewise the router (``moe_router``: on CUDA
its softmax and top-k are one kernel, engine.kernels.moe_router). Tensor parallelism splits every
expert's intermediate dimension, as the dense MLP's column/row split does: rank r of N holds gate/up
rows and down columns [r*I/N, (r+1)*I/N) of every expert, reads only those from the checkpoint, and the
block all-reduces its partial sums (one all-reduce per layer, as the dense MLP's down projection).

Under an FP8 scheme (engine.model.quantization) the experts hold float8 weights with one scale per row and
group of 128 inputs (engine.model.fp8_moe, the layout engine.model.fp8.Fp8Linear keeps), read from each
expert's ``weight_scale`` / ``weight_scale_inv`` or quantized at load (--quantization fp8); where no FP8
GEMMs run they are dequantized once loaded. The router is never quantized (vLLM keeps it in the model's
dtype too): a float8 router weight in a checkpoint is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from engine.model.fp8 import FP8, QuantizedActivation
from engine.model.fp8_moe import ExpertFp8Scales
from engine.model.linear import all_reduce
from engine.model.quantization import Fp8Scheme
from engine.model.sharding import CheckpointTensor, Shard, as_checkpoint_tensor, copy_checked, load_replicated

MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")


@dataclass(frozen=True)
class MoeSpec:
    num_experts: int
    top_k: int
    intermediate_size: int  # per expert, before any tensor-parallel split
    renormalize: bool  # divide the top-k probabilities by their sum
    sparse_layers: frozenset[int]  # decoder layers whose MLP is the MoE block (the others are dense)

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> MoeSpec:
        layers = range(config.num_hidden_layers)
        if config.model_type == "mixtral":  # every layer sparse, always renormalised over the top-k
            return cls(
                num_experts=config.num_local_experts,
                top_k=config.num_experts_per_tok,
                intermediate_size=config.intermediate_size,
                renormalize=True,
                sparse_layers=frozenset(layers),
            )
        # qwen3_moe: the rule transformers' Qwen3MoeDecoderLayer applies
        dense_only = set(getattr(config, "mlp_only_layers", None) or [])
        step = getattr(config, "decoder_sparse_step", 1) or 1
        sparse = {i for i in layers if i not in dense_only and config.num_experts > 0 and (i + 1) % step == 0}
        return cls(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            intermediate_size=config.moe_intermediate_size,
            renormalize=bool(config.norm_topk_prob),
            sparse_layers=frozenset(sparse),
        )


# config attribute -> the feature it turns on, refused when truthy (shared experts, biased routing)
_UNSUPPORTED_ATTRIBUTES = {
    "shared_expert_intermediate_size": "shared experts (shared_expert_intermediate_size > 0)",
    "n_shared_experts": "shared experts (n_shared_experts > 0)",
    "num_shared_experts": "shared experts (num_shared_experts > 0)",
    "moe_router_bias": "a router bias (moe_router_bias)",
    "router_bias": "a router bias (router_bias)",
    "expert_bias": "expert biases (expert_bias)",
    "mlp_bias": "expert biases (mlp_bias)",
    "topk_group": "grouped top-k routing (topk_group)",
}


def unsupported_moe_features(config: PretrainedConfig) -> list[str]:
    """What this MoE config asks for that our MoE block does not do, in the config's own terms."""
    found = [feature for attr, feature in _UNSUPPORTED_ATTRIBUTES.items() if getattr(config, attr, None)]
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        found.append(f"hidden_act {act!r} (experts run SiLU)")
    if getattr(config, "scoring_func", "softmax") != "softmax":
        found.append(f"scoring_func {config.scoring_func!r} (the router runs a softmax)")
    return found


class TopKRouter(nn.Module):
    """Softmax over the experts' logits in float32, the top_k largest kept (and renormalised to sum to
    one if the model says so). The weight stays in the model's dtype even under CPU mixed precision:
    the router is small, and a rounded logit can change which experts run."""

    def __init__(self, hidden_size: int, spec: MoeSpec) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(spec.num_experts, hidden_size), requires_grad=False)
        self.top_k = spec.top_k
        self.renormalize = spec.renormalize

    def load_weight(self, param_name: str, tensor: CheckpointTensor, part: str) -> None:
        weight = tensor.read()
        if weight.dtype.itemsize == 1 and weight.dtype.is_floating_point:
            raise ValueError(
                f"the MoE router is stored in {weight.dtype} (quantized); kubellm keeps routers in the model's "
                "dtype, as vLLM does: the checkpoint's quantization config should leave them out (mlp.gate)"
            )
        load_replicated(self.weight, tensor)

    def forward(
        self, x: torch.Tensor, logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, top_k] float32, expert ids [T, top_k] int64). ``logits``: x @ weight.T
        already computed (by the norm before the block, ExpertInput), so not computed again."""
        probs = self.logits(x, logits).softmax(dim=-1, dtype=torch.float32)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def logits(self, x: torch.Tensor, computed: torch.Tensor | None = None) -> torch.Tensor:
        """[T, H] -> [T, E]: the router's matrix product, unless ``computed`` brings it."""
        return F.linear(x, self.weight) if computed is None else computed


class MoeExperts(nn.Module):
    """The experts' weights (this rank's share of each expert's intermediate dimension) and where each
    checkpoint tensor goes; subclasses compute. With a ``matmul_dtype`` (CPU mixed precision) the
    weights are kept in it, as the mixed-precision linears' are.

    Under an Fp8Scheme (``quantization``) the weights are float8 from the start: an FP8 checkpoint's as
    published, or (--quantization fp8) each expert's float tensor rounded to the model's dtype and
    quantized per row as it is read, so loading never holds the float experts whole (a 30B MoE would
    need twice its FP8 size on the GPU); their scales are in ``fp8`` (engine.model.fp8_moe). Where the
    scheme runs dequantized (CPU, GPUs without FP8, weight-only checkpoints) ``finish_loading`` turns
    them into float8 * scale in the matmul dtype and drops the scales, so the float subclasses compute
    on them unchanged."""

    def __init__(
        self,
        hidden_size: int,
        spec: MoeSpec,
        shard: Shard | None = None,
        matmul_dtype: torch.dtype | None = None,
        quantization: Fp8Scheme | None = None,
    ) -> None:
        super().__init__()
        self.shard = shard or Shard()
        self.inter_start, self.inter = self.shard.even(spec.intermediate_size, "moe_intermediate_size")
        self.full_inter = spec.intermediate_size
        self.num_experts = spec.num_experts
        self.hidden_size = hidden_size
        self.weight_dtype = matmul_dtype or torch.get_default_dtype()  # float weights (dequantized ones too)
        self.fp8: ExpertFp8Scales | None = None
        load_dtype = self.weight_dtype
        self.online_dtype = torch.get_default_dtype()  # --quantization fp8: float weights round to it first
        if quantization is not None:
            self.fp8 = ExpertFp8Scales(
                quantization, spec.num_experts, hidden_size, self.full_inter, self.inter_start, self.inter
            )
            load_dtype = FP8
        self.gate_up_proj = nn.Parameter(
            torch.empty(spec.num_experts, 2 * self.inter, hidden_size, dtype=load_dtype), requires_grad=False
        )
        self.down_proj = nn.Parameter(
            torch.empty(spec.num_experts, hidden_size, self.inter, dtype=load_dtype), requires_grad=False
        )

    def forward(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        quantized: QuantizedActivation | None = None,  # x in float8 already: FP8 experts only (ExpertInput)
    ) -> torch.Tensor:
        raise NotImplementedError

    def required_tensors(self) -> set[tuple[str, int, str]]:
        """(part, expert, kind) the checkpoint must provide: each weight, and its scale in an FP8 checkpoint."""
        kinds = ("weight", "scale") if self.fp8 is not None and self.fp8.scheme.serialized else ("weight",)
        return {
            (part, e, kind)
            for part in ("gate", "up", "down")
            for e in range(self.num_experts)
            for kind in kinds
        }

    def tensor_kind(self, name: str) -> str | None:
        """What a checkpoint tensor of an expert is ("weight", "scale"), None for one that is read and not
        kept (static input scales: the experts quantize activations per token); an error for one that has
        no place here."""
        if name == "weight":
            return "weight"
        if self.fp8 is not None and name == self.fp8.scheme.scale_name:
            return "scale"
        if self.fp8 is not None and name == "input_scale" and self.fp8.scheme.activations == "static":
            return None
        have = self.fp8.scheme.describe() if self.fp8 is not None else "no quantization"
        raise ValueError(f"an expert's {name} has no place in experts with {have}")

    def load_checkpoint_tensor(
        self, part: str, expert: int, tensor: torch.Tensor | CheckpointTensor, name: str = "weight"
    ) -> None:
        """Read this rank's slice of one expert's gate or up ([I, H]: rows) or down ([H, I]: columns)
        weight, or its scale (``name`` as the checkpoint says: weight_scale, weight_scale_inv)."""
        tensor = as_checkpoint_tensor(tensor)
        kind = self.tensor_kind(name)
        if kind == "scale":
            assert self.fp8 is not None
            self.fp8.load_part(part, expert, tensor)
            return
        if kind is None:
            return
        if part == "down":
            self._expect(tensor, (self.hidden_size, self.full_inter))
            target = self.down_proj.data[expert]
            source = tensor.read(1, self.inter_start, self.inter)
        else:
            self._expect(tensor, (self.full_inter, self.hidden_size))
            offset = 0 if part == "gate" else self.inter
            target = self.gate_up_proj.data[expert, offset : offset + self.inter]
            source = tensor.read(0, self.inter_start, self.inter)
        copy_checked(target, self._as_stored(part, expert, source, target.device), tuple(tensor.shape))

    def load_fused_checkpoint_tensor(
        self, part: str, tensor: torch.Tensor | CheckpointTensor, name: str = "weight"
    ) -> list[tuple[str, int]]:
        """All experts at once from transformers 5's fused layout: gate_up [E, 2I, H] (gate rows, then
        up rows) or down [E, H, I], or their scales. Returns the (part, expert) pairs filled."""
        parts = ("down",) if part == "down" else ("gate", "up")
        filled = [(p, e) for e in range(self.num_experts) for p in parts]
        kind = self.tensor_kind(name)
        if kind == "scale":
            assert self.fp8 is not None
            self.fp8.load_fused(part, as_checkpoint_tensor(tensor))
            return filled
        if kind is None:
            return []
        whole = as_checkpoint_tensor(tensor).read()
        self._expect(whole, (self.num_experts, *whole.shape[1:]))
        for e in range(self.num_experts):
            if part == "down":
                self.load_checkpoint_tensor("down", e, whole[e])
            else:
                gate, up = whole[e].chunk(2, dim=0)
                self.load_checkpoint_tensor("gate", e, gate)
                self.load_checkpoint_tensor("up", e, up)
        return filled

    def finish_loading(self) -> None:
        """FP8 where the scheme runs dequantized: the float8 weights become float8 * scale in
        ``weight_dtype`` and the scales go."""
        if self.fp8 is None or not self.fp8.scheme.dequantize:
            return
        gate_up, down = self.fp8.dequantize(self.gate_up_proj.data, self.down_proj.data, self.weight_dtype)
        self.fp8 = None
        self.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        self.down_proj = nn.Parameter(down, requires_grad=False)

    def _as_stored(self, part: str, expert: int, source: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A checkpoint slice as the parameter holds it: float as it is; an FP8 checkpoint's float8 as it
        is (anything else refused); under --quantization fp8 quantized now, on the parameter's device."""
        if self.fp8 is None:
            return source
        if not self.fp8.scheme.serialized:
            return self.fp8.quantize_part(part, expert, source.to(device=device, dtype=self.online_dtype))
        if source.dtype != FP8:
            raise ValueError(
                f"expert weight in {source.dtype}, expected float8_e4m3fn ({self.fp8.scheme.source})"
            )
        return source

    @staticmethod
    def _expect(tensor: torch.Tensor | CheckpointTensor, shape: tuple[int, ...]) -> None:
        if tuple(tensor.shape) != shape:
            raise ValueError(f"checkpoint shape {tuple(tensor.shape)} != expected {shape}")


class TorchMoeExperts(MoeExperts):
    """Each expert that some token chose runs on its tokens, in expert order, and the weighted results
    are added into the output: transformers' own loop, so float32 results agree with it to the bit.
    The weights' dtype decides the matmul dtype (bfloat16 under CPU mixed precision)."""

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        counts = torch.bincount(topk_ids.flatten(), minlength=self.num_experts)
        for expert in counts.nonzero().flatten().tolist():
            # (choice, token) pairs in the order transformers visits them
            choice, token = torch.where(topk_ids.T == expert)
            h = x[token].to(self.gate_up_proj.dtype)
            gate, up = F.linear(h, self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[expert])
            out.index_add_(0, token, (y * topk_weights[token, choice, None]).to(out.dtype))
        return out


@dataclass(frozen=True)
class ExpertInput:
    """A MoE block's input from a norm that wrote it twice (engine.kernels.fused_layers.ExpertInputRMSNorm):
    as it is for the router, and in float8 with its scales for FP8 experts, which then skip quantizing it;
    for small steps also the router's logits, computed by the same kernel. Not a tuple: a norm's
    ``(output, residual)`` pair must never unpack from it."""

    x: torch.Tensor
    quantized: QuantizedActivation
    logits: torch.Tensor | None = None  # [T, E] = x @ router.weight.T, where the norm computed it


class SparseMoeBlock(nn.Module):
    """Router (``gate``, as checkpoints name it) then experts: [T, H] (or an ExpertInput: [T, H], its float8
    and maybe the router's logits, from the norm before FP8 experts) -> [T, H]. Under tensor parallelism
    the ranks' partial sums are all-reduced (the router is replicated)."""

    def __init__(self, router: TopKRouter, experts: MoeExperts) -> None:
        super().__init__()
        self.gate = router
        self.experts = experts

    def forward(self, x: torch.Tensor | ExpertInput) -> torch.Tensor:
        """x [T, H] (or an ExpertInput of it) -> [T, H]."""
        x, quantized, logits = (x.x, x.quantized, x.logits) if isinstance(x, ExpertInput) else (x, None, None)
        out = self.routed_experts(x, quantized, logits)
        return all_reduce(out) if self.experts.shard.size > 1 else out

    def routed_experts(
        self, x: torch.Tensor, quantized: QuantizedActivation | None, logits: torch.Tensor | None
    ) -> torch.Tensor:
        """This rank's experts' weighted sum for x, routed by ``gate`` (``logits``: its product, if computed)."""
        topk_weights, topk_ids = self.gate(x, logits)
        if quantized is None:
            return self.experts(x, topk_weights, topk_ids)
        # FP8 experts only (float experts take no `quantized`: a TypeError)
        return self.experts(x, topk_weights, topk_ids, quantized=quantized)


@dataclass(frozen=True)
class ExpertTensor:
    """Where one checkpoint tensor of a MoE block goes."""

    experts_prefix: str  # our module path, e.g. "model.layers.3.mlp.experts"
    part: str  # gate, up or down of one expert; gate_up or down of all (transformers 5's fused layout)
    expert: int | None  # None: all experts, fused
    name: str = "weight"  # weight, or an FP8 checkpoint's weight_scale, weight_scale_inv, input_scale


# checkpoint projection name -> part (Mixtral's w1/w3/w2 are gate/up/down)
_EXPERT_PARTS = {
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "w1": "gate",
    "w3": "up",
    "w2": "down",
}


def checkpoint_name(hf_name: str) -> str:
    """Mixtral calls the MoE block ``block_sparse_moe``; ours sits where the dense MLP does."""
    return hf_name.replace(".block_sparse_moe.", ".mlp.")


# what follows a projection's name: each expert's tensors, and transformers 5's fused ones
_EXPERT_TENSORS = ("weight", "weight_scale", "weight_scale_inv", "input_scale")
_FUSED_SUFFIXES = {
    "": "weight",
    "_scale": "weight_scale",
    "_scale_inv": "weight_scale_inv",
    "_input_scale": "input_scale",
    "_activation_scale": "input_scale",
}


def expert_tensor(name: str) -> ExpertTensor | None:
    """``...mlp.experts.7.gate_proj.weight`` (hub checkpoints, and what transformers 5 saves; FP8 ones
    add ``weight_scale`` or ``weight_scale_inv`` and maybe ``input_scale``) or ``...mlp.experts.gate_up_proj``
    (transformers 5's in-memory state dict; FP8: ``gate_up_proj_scale_inv``) -> its target; None for
    anything that is not an expert tensor (the router ``mlp.gate.weight`` is an ordinary parameter)."""
    head, sep, tail = name.partition(".experts.")
    if not sep:
        return None
    prefix = head + ".experts"
    parts = tail.split(".")
    if len(parts) == 1:
        for proj, part in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
            suffix = parts[0].removeprefix(proj)
            if parts[0].startswith(proj) and suffix in _FUSED_SUFFIXES:
                return ExpertTensor(prefix, part, None, _FUSED_SUFFIXES[suffix])
    if len(parts) == 3 and parts[0].isdigit() and parts[1] in _EXPERT_PARTS and parts[2] in _EXPERT_TENSORS:
        return ExpertTensor(prefix, _EXPERT_PARTS[parts[1]], int(parts[0]), parts[2])
    return None
