"""The tiny MoE models of the engine-on-GPU tests, and what their bfloat16 test needs to tell a routing
flip from a numeric error: per-prompt first-token logprobs of transformers and of our engine, each
router's expert choices recorded, and routing pinned to a reference run's choices.

Pinning: a forward hook on every router (ours, engine.model.moe.TopKRouter, which the hooks make every
block call; transformers' ``*TopKRouter``) compares the experts it chose for each token with the reference's for the same prompt,
layer and token. Where the sets differ (a flip), the token runs the reference's experts, weighted by
the router's own softmax probabilities at them (renormalised as the model's config says); every other
token keeps exactly the router's output, so a bug in the router's weights still shows. The model's
arithmetic is untouched; only which experts run is fixed.

Shared by tests/gpu/test_moe_engine_on_gpu.py and bench/diag/moe_bf16_routing.py (which runs the same
comparison on the CPU too), so nothing here imports pytest.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType

import torch
import transformers
from small_engine import first_token_logprobs

from engine.llm_engine import LLMEngine
from engine.model.moe import SparseMoeBlock, TopKRouter

_TINY = dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
             max_position_embeddings=1024, rms_norm_eps=1e-5)  # fmt: skip
FAMILIES: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    # Qwen3-30B-A3B's routing (128 experts, top 8, no renormalisation), small experts
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        head_dim=64, intermediate_size=512, moe_intermediate_size=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=False, **_TINY,
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        intermediate_size=384, num_local_experts=8, num_experts_per_tok=2, **_TINY
    ),
}  # fmt: skip
TOP_LOGPROBS = 5

Routing = dict[int, torch.Tensor]  # decoder layer -> [tokens, top_k] expert ids of one prompt
Top = list[tuple[int, float]]  # (token id, logprob) of the top TOP_LOGPROBS, best first
_LAYER = re.compile(r"layers\.(\d+)\.")


def renormalizes(config: transformers.PretrainedConfig) -> bool:
    return bool(getattr(config, "norm_topk_prob", True))  # Mixtral always renormalises


def routers(model: torch.nn.Module) -> Iterator[tuple[int, torch.nn.Module]]:
    """(layer, router) for our TopKRouter and transformers' *TopKRouter modules."""
    for name, module in model.named_modules():
        if isinstance(module, TopKRouter) or type(module).__name__.endswith("TopKRouter"):
            match = _LAYER.search(name)
            assert match, name
            yield int(match.group(1)), module


def pin_flipped_tokens(
    ids: torch.Tensor, weights: torch.Tensor, probs: torch.Tensor, forced: torch.Tensor, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's (weights, ids) where its expert set is ``forced``'s; elsewhere ``forced``'s ids,
    weighted by ``probs`` (the router's softmax) at them."""
    forced = forced.to(ids.device)
    assert forced.shape == ids.shape, f"routing of {tuple(forced.shape)} pinned onto {tuple(ids.shape)}"
    flipped = (ids.sort(dim=-1).values != forced.sort(dim=-1).values).any(dim=-1, keepdim=True)
    forced_weights = probs.gather(1, forced)
    if renormalize:
        forced_weights = forced_weights / forced_weights.sum(dim=-1, keepdim=True)
    return torch.where(flipped, forced_weights.to(weights.dtype), weights), torch.where(flipped, forced, ids)


@contextmanager
def routing_hooks(
    model: torch.nn.Module, renormalize: bool, record: Routing | None = None, pin: Routing | None = None
) -> Iterator[None]:
    """Record the expert ids each router chose into ``record`` (before any pinning); with ``pin``, run
    ``pin``'s experts wherever a router chose another set. The first forward must be the whole prompt
    (one prefill step); later ones (a decode step) pass untouched."""
    seen: set[int] = set()

    def hook(layer: int) -> Callable:
        def on_router(module: torch.nn.Module, inputs: tuple, output: tuple) -> tuple | None:
            if layer in seen:
                return None
            seen.add(layer)
            ours = isinstance(module, TopKRouter)
            ids = output[1] if ours else output[2]
            if record is not None:
                record[layer] = ids.detach().cpu()
            if pin is None:
                return None
            if ours:
                # the logits the norm brought where it did (ExpertInput), as the router's softmax used them
                probs = module.logits(*inputs).softmax(dim=-1, dtype=torch.float32)
                return pin_flipped_tokens(ids, output[0], probs, pin[layer], module.renormalize)
            logits = output[0]  # transformers: (router logits, top-k weights, top-k ids)
            weights, ids = pin_flipped_tokens(
                ids, output[1], logits.float().softmax(dim=-1), pin[layer], renormalize
            )
            return logits, weights, ids

        return on_router

    handles = [module.register_forward_hook(hook(layer)) for layer, module in routers(model)]
    # Blocks whose experts route from the router's logits themselves (CUDA's FusedSparseMoeBlock) call no
    # router forward to hook: here they route through it, as SparseMoeBlock does.
    rerouted = [m for m in model.modules() if type(m) is not SparseMoeBlock and isinstance(m, SparseMoeBlock)]
    for block in rerouted:
        block.routed_experts = MethodType(SparseMoeBlock.routed_experts, block)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for block in rerouted:
            del block.routed_experts


def hf_last_logprobs(
    model: torch.nn.Module,
    prompts: list[list[int]],
    device: str,
    renormalize: bool,
    pins: list[Routing] | None = None,
) -> tuple[list[torch.Tensor], list[Routing]]:
    """transformers' float32 log-softmax at each prompt's last position, and the routing of each."""
    logprobs, routes = [], []
    for i, prompt in enumerate(prompts):
        record: Routing = {}
        with routing_hooks(model, renormalize, record, pins[i] if pins else None), torch.no_grad():
            logits = model(torch.tensor([prompt], device=device)).logits[0, -1]
        logprobs.append(logits.float().log_softmax(-1).cpu())
        routes.append(record)
    return logprobs, routes


def engine_first_tokens(eng: LLMEngine, prompts: list[list[int]]) -> list[Top]:
    """The top logprobs of each prompt's first token, all prompts in the engine at once."""
    return [
        [(t, float(lp)) for t, lp in first.top] for first in first_token_logprobs(eng, prompts, TOP_LOGPROBS)
    ]


# Engine overrides for engine_first_tokens_routed: prompt steps run eagerly (decode steps, never hooked,
# keep their graphs).
ROUTED = {"enable_prefix_caching": False, "max_piecewise_graph_tokens": 0}


def engine_first_tokens_routed(
    eng: LLMEngine, prompts: list[list[int]], renormalize: bool, pins: list[Routing] | None = None
) -> tuple[list[Top], list[Routing]]:
    """One prompt at a time (each router call sees exactly that prompt's tokens; the prompts must fit
    one prefill step and miss the prefix cache), its routing recorded and, with ``pins``, pinned. The hooks
    run only in eager forwards: build the engine with ``max_piecewise_graph_tokens=0`` (ROUTED)."""
    assert eng.runner.piecewise_graphs is None, "a replayed CUDA graph runs no hooks: use ROUTED"
    tops, routes = [], []
    for i, prompt in enumerate(prompts):
        record: Routing = {}
        with routing_hooks(eng.runner.model, renormalize, record, pins[i] if pins else None):
            tops += engine_first_tokens(eng, [prompt])
        routes.append(record)
    return tops, routes


def top_of(logprobs: torch.Tensor) -> Top:
    values, ids = logprobs.topk(TOP_LOGPROBS)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


@dataclass(frozen=True)
class FirstTokenGap:
    max_abs_logprob_diff: float  # over the run's top-5 tokens, against the reference's logprob of each
    top1_regret: float  # the reference's best logprob minus its logprob of the run's top-1 token

    @classmethod
    def of(cls, top: Top, reference: torch.Tensor) -> FirstTokenGap:
        return cls(
            max_abs_logprob_diff=max(abs(lp - float(reference[t])) for t, lp in top),
            top1_regret=float(reference.max()) - float(reference[top[0][0]]),
        )

    @property
    def worst(self) -> float:
        return max(self.max_abs_logprob_diff, self.top1_regret)


def flipped_tokens(routes: list[Routing], reference: list[Routing]) -> dict[int, int]:
    """Per layer: tokens (over all prompts) whose expert set differs from the reference's."""
    counts: dict[int, int] = {}
    for ours, theirs in zip(routes, reference, strict=True):
        for layer, ids in theirs.items():
            diff = (ours[layer].sort(dim=-1).values != ids.sort(dim=-1).values).any(dim=-1)
            counts[layer] = counts.get(layer, 0) + int(diff.sum())
    return counts


def pinned_tolerance(transformers_bf16_worst: float) -> float:
    """How far our pinned bf16 run may be from float32: the dense families' bar (0.3), or a quarter
    more than transformers' own pinned bf16 run is on this model and device, if that is more."""
    return max(0.3, 1.25 * transformers_bf16_worst)


def flip_allowance(transformers_bf16_flips: int) -> int:
    """How many tokens our bf16 routers may route differently from float32: twice what transformers'
    bf16 routers do, plus a few (the count is itself a matter of bf16 noise)."""
    return 2 * transformers_bf16_flips + 8
