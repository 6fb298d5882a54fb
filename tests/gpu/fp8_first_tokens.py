"""Tell FP8 rounding noise from a fault in online FP8 (W8A8 linears) combined with an FP8 KV cache, on
a random-weight model whose greedy choices can be near-ties.

Shared by tests/gpu/test_fp8_engine_on_gpu.py and bench/diag/fp8_kv_first_tokens.py (no pytest here).
Each engine's first-token logprobs come over the whole vocabulary (``logprobs`` = vocab size, the
engine's own sampler path), all prompts in one engine at once, as the test runs them.

The rule (``combination_verdict``): the two quantizations act on different tensors (the linears'
weights and inputs; the cached K and V), so their errors on the logprobs add at most about linearly.
The error each part makes alone against the bfloat16 engine (the largest |logprob - bf16 logprob| over
bf16's top-5 of any prompt) bounds what the combination may make: ``COMBINED_SLACK`` x their sum plus
``COMBINED_FLOOR``. A greedy flip fails only where bf16's regret of the token the combination chose
(bf16's best logprob minus its logprob of that token; at least bf16's top-1 margin) is above twice
that bound: errors of the allowed size on both tokens cannot move them past each other there.
Each part's own error must stay under ``PART_CEILING`` (so a fault in one part cannot widen the bound
for the combination). The bound comes from the parts alone, so a fault that shows only in the combination (a K/V scale
computed from the FP8 linears' outputs, a dtype mix-up after an FP8 GEMM) cannot widen it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from small_engine import first_token_logprobs

import engine.model.layers
from engine.llm_engine import LLMEngine

TOP = 5  # the bf16 tokens whose logprobs are compared
COMBINED_SLACK = 1.25  # errors of independent roundings add at most linearly (measured: 0.7x); 25 % more
COMBINED_FLOOR = 0.05  # nats: below this every run is within bf16's own noise
# nats, each part alone: about twice FP8 rounding on the test's model (W8A8 emulated on the CPU: 0.93;
# FP8 KV: 0.39), well under a wrong scale (K read at 1.5x its scale: 2.5 nats; at 4x: 5)
PART_CEILING = 2.0
DECISIVE_FACTOR = 2.0  # a flip to a token this x the bound below bf16's best is a failure

VARIANTS: dict[str, dict[str, str]] = {
    "bf16": {},
    "fp8_linears": {"quantization": "fp8"},
    "fp8_kv": {"kv_cache_dtype": "fp8"},
    "both": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
}


def prompts(n: int, seed: int, hi: int = 200) -> list[list[int]]:
    """tests/gpu/test_engine_on_gpu.prompts (that module imports pytest)."""
    rng = random.Random(seed)
    return [[rng.randrange(2, 512) for _ in range(rng.randint(1, hi))] for _ in range(n)]


@dataclass(frozen=True)
class FirstToken:
    token: int  # the greedy choice (bf16 logits can tie: the sampler's pick, not a re-derived argmax)
    logprobs: torch.Tensor  # float32 [vocab_size]


def first_tokens(eng: LLMEngine, ps: list[list[int]], vocab_size: int) -> list[FirstToken]:
    """Each prompt's greedy first token and its logprobs over the vocabulary, all prompts in the
    engine at once."""
    result = []
    for first in first_token_logprobs(eng, ps, vocab_size):
        lp = torch.full((vocab_size,), float("-inf"))
        ids, values = zip(*first.top, strict=True)
        lp[list(ids)] = torch.tensor(values, dtype=torch.float32)
        result.append(FirstToken(first.token_id, lp))
    return result


def margin(lp: torch.Tensor) -> float:
    top2 = lp.topk(2).values
    return float(top2[0] - top2[1])


def error_over_top(lp: torch.Tensor, ref: torch.Tensor, k: int = TOP) -> float:
    """max |lp - ref| over ref's top-k tokens."""
    ids = ref.topk(k).indices
    return float((lp[ids] - ref[ids]).abs().max())


def worst_error(runs: list[FirstToken], ref: list[FirstToken]) -> float:
    return max(error_over_top(a.logprobs, b.logprobs) for a, b in zip(runs, ref, strict=True))


@dataclass(frozen=True)
class Verdict:
    error_linears: float  # worst over prompts: the fp8-linears engine against bf16
    error_kv: float  # the fp8-KV engine against bf16
    error_both: float  # the combination against bf16
    bound: float  # COMBINED_SLACK * (error_linears + error_kv) + COMBINED_FLOOR
    decisive: list[int]  # prompts whose bf16 top-1 margin exceeds DECISIVE_FACTOR * bound
    flips: list[int]  # prompts whose first token differs from bf16's
    regrets: list[float]  # per flip: bf16's best logprob minus bf16's logprob of the flipped-to token
    decisive_flips: list[int]  # flips whose regret exceeds DECISIVE_FACTOR * bound

    @property
    def passes(self) -> bool:
        parts_sane = self.error_linears <= PART_CEILING and self.error_kv <= PART_CEILING
        return parts_sane and self.error_both <= self.bound and not self.decisive_flips

    def explain(self) -> str:
        return (
            f"max |logprob - bf16's| over bf16's top-{TOP}: fp8 linears {self.error_linears:.3f}, fp8 KV "
            f"{self.error_kv:.3f} (each <= {PART_CEILING}), both {self.error_both:.3f} "
            f"(bound {self.bound:.3f}); flips at {self.flips} (bf16 regrets "
            f"{[round(r, 3) for r in self.regrets]}), of which decisive {self.decisive_flips}; prompts "
            f"whose bf16 margin exceeds {DECISIVE_FACTOR * self.bound:.3f}: {self.decisive}"
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "passes": self.passes}


def combination_verdict(
    bf16: list[FirstToken], linears: list[FirstToken], kv: list[FirstToken], both: list[FirstToken]
) -> Verdict:
    e_lin, e_kv, e_both = worst_error(linears, bf16), worst_error(kv, bf16), worst_error(both, bf16)
    bound = COMBINED_SLACK * (e_lin + e_kv) + COMBINED_FLOOR
    decisive = [i for i, b in enumerate(bf16) if margin(b.logprobs) > DECISIVE_FACTOR * bound]
    flips = [i for i, (a, b) in enumerate(zip(both, bf16, strict=True)) if a.token != b.token]
    regrets = [float(bf16[i].logprobs.max() - bf16[i].logprobs[both[i].token]) for i in flips]
    decisive_flips = [i for i, r in zip(flips, regrets, strict=True) if r > DECISIVE_FACTOR * bound]
    return Verdict(e_lin, e_kv, e_both, bound, decisive, flips, regrets, decisive_flips)


@contextmanager
def k_read_at_wrong_scale(device: str, factor: float) -> Iterator[Callable[[LLMEngine], None]]:
    """A simulated fault: K is written to the FP8 cache with its scale but read back at `factor` times
    it (a kernel reading the wrong scale). The cache writer is wrapped before the engine is built (so
    CUDA graphs capture it too); the yielded function sets the layers' K scale once it is loaded."""
    if device == "cuda":
        import engine.kernels.fused_layers as module  # Triton: not imported on a CPU-only host

        name = "rotary_embedding_and_cache"  # the GPU's K/V write, in the rotary's launch
    else:
        module, name = engine.model.layers, "write_kv_cache"  # RotaryEmbedding.rotate_and_cache's
    original = getattr(module, name)
    divisor = torch.tensor([factor, 1.0], device=device)  # made here: no host copies in a graph capture

    def wrong(kv_scales: torch.Tensor | None) -> torch.Tensor | None:
        return kv_scales / divisor if kv_scales is not None else None

    def write_kv_cache(k, v, kv_cache, slot_mapping, kv_scales=None):
        return original(k, v, kv_cache, slot_mapping, wrong(kv_scales))

    def rotary_embedding_and_cache(*args, kv_scales=None, **kwargs):
        return original(*args, kv_scales=wrong(kv_scales), **kwargs)

    write = rotary_embedding_and_cache if device == "cuda" else write_kv_cache

    def set_scales(eng: LLMEngine) -> None:
        for layer in eng.runner.model.model.layers:
            layer.self_attn.kv_scales.scales[0] = factor

    setattr(module, name, write)
    try:
        yield set_scales
    finally:
        setattr(module, name, original)
