"""The best req/s a GPU could give the W2 load at QPS = inf (W2's Llama-3.1-8B, W5's Qwen3-30B-A3B), if every
engine step took its floor: the longer of its bytes at the copy bandwidth and its products at the dense rate.

All 500 requests (bench/load_client.py's ShareGPT-like lengths, seed 0) arrive at once, and an ideal
continuous batcher serves them first come, first served: each step decodes every running sequence and fills
the rest of its token budget (8,192) with prompt chunks. A step reads every non-expert weight once, each
expert some token of the step chose (uniform routing: E (1 - (1 - k/E)^tokens) distinct experts a layer),
the LM head, and the K/V of every decoding sequence; it computes 2 x active parameters per token (the LM
head's only for the tokens that sample). No launch gaps, no host, no attention arithmetic: a ceiling no
server reaches, to judge a bar against.

    python3 bench/serving_floor.py [--bandwidth 4.2e12] [--flops 7.9e14] [--out f.json]

The defaults are the H200's measured copy bandwidth (issue 13) and the dense bf16 rate W1's floor takes.
Pure Python (no GPU, no torch): the figures are arithmetic, so they are the same on any machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # appended: bench/kernels.py must not shadow the `kernels` package
    sys.path.append(HERE)

from load_client import sharegpt_like_requests  # noqa: E402

BUDGET = 8192  # tokens a step computes (the engine's GPU max_num_batched_tokens)


@dataclass(frozen=True)
class ModelCost:
    """What a step of a model costs, in bytes and products: bf16 K/V, LM head and embeddings; the linears
    below the LM head (attention, the MLP or the experts) at ``weight_bytes`` a weight: 2 in bf16, 1 in FP8
    (W8A8, `--quantization fp8`: its products also run at twice the bf16 rate; its scales, under 2 % of the
    bytes with [128, 128] blocks, are left out)."""

    name: str
    layers: int
    non_expert_params_per_layer: int  # attention, norms, router; a dense model's MLP too
    num_experts: int  # 0: dense
    top_k: int
    params_per_expert: int
    lm_head_params: int
    kv_values_per_token: int  # K and V, every layer
    vocab_size: int
    weight_bytes: int = 2  # per weight of the linears below the LM head: 2 bf16, 1 FP8
    kv_bytes: int = 2  # per K/V value: 2 bf16, 1 with `--kv-cache-dtype fp8`

    def fp8(self) -> ModelCost:
        """The same model served with `--quantization fp8`."""
        return replace(self, name=f"{self.name}, FP8", weight_bytes=1)

    def fp8_kv(self) -> ModelCost:
        """The same model with `--kv-cache-dtype fp8` (e4m3 K/V: a byte a value; per-layer scales left out)."""
        return replace(self, name=f"{self.name}, FP8 KV", kv_bytes=1)

    def active_params(self) -> int:
        return (
            self.layers * (self.non_expert_params_per_layer + self.top_k * self.params_per_expert)
            + self.lm_head_params
        )

    def distinct_experts(self, tokens: int) -> float:
        if not self.num_experts:
            return 0.0
        return self.num_experts * (1 - (1 - self.top_k / self.num_experts) ** tokens)

    def step_seconds(
        self, tokens: int, sampled: int, context_tokens: int, bandwidth: float, flops: float
    ) -> float:
        """tokens computed this step (decodes + prompt chunks), sampled of them through the LM head (the
        decodes and the prompts finished this step: the engine computes no logits for the other prompt
        tokens), context_tokens of K/V read by the decodes."""
        body_weights = self.layers * (
            self.non_expert_params_per_layer + self.distinct_experts(tokens) * self.params_per_expert
        )
        read = (
            self.weight_bytes * body_weights
            + 2 * self.lm_head_params
            + self.kv_bytes * context_tokens * self.kv_values_per_token
        )
        body = self.active_params() - self.lm_head_params
        # FP8 products at twice the bf16 rate: each takes weight_bytes / 2 of a bf16 product's time
        products = body * tokens * self.weight_bytes / 2 + self.lm_head_params * sampled
        return max(read / bandwidth, 2 * products / flops)


def llama_3_1_8b(layers: int = 32) -> ModelCost:
    h, inter, q, kv = 4096, 14336, 4096, 1024
    name = "llama-3.1-8b" if layers == 32 else f"llama-3.1-8b ({layers} layers)"
    return ModelCost(name, layers, h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h, 0, 0, 0,
                     128256 * h, 2 * layers * kv, 128256)  # fmt: skip


def qwen3_30b_a3b(layers: int = 48) -> ModelCost:
    h, q, kv, experts, inter = 2048, 4096, 512, 128, 768
    attention = h * (q + 2 * kv) + q * h + 2 * 128 + 2 * h + experts * h
    return ModelCost(f"qwen3-30b-a3b ({layers} layers)", layers, attention, experts, 8, 3 * h * inter,
                     151936 * h, 2 * layers * kv, 151936)  # fmt: skip


# The models a step can be set against by name (bench/diag/step_trace_summary.py's --model), each a function of
# the layers served
MODELS: dict[str, Callable[[int], ModelCost]] = {"llama-3.1-8b": llama_3_1_8b, "qwen3-30b-a3b": qwen3_30b_a3b}


def simulate(
    model: ModelCost, prompts: list[int], outputs: list[int], bandwidth: float, flops: float
) -> dict:
    """First come, first served continuous batching at each step's floor; returns the makespan and steps."""
    waiting = list(range(len(prompts)))  # request indices, in arrival order
    prefilled = [0] * len(prompts)  # prompt tokens computed
    generated = [0] * len(prompts)  # output tokens produced (the first comes with the last prompt chunk)
    decoding: list[int] = []
    clock, steps = 0.0, 0
    finished = 0
    while finished < len(prompts):
        budget = BUDGET - len(decoding)
        chunk_tokens, completed = 0, []
        for i in waiting:
            if budget <= 0:
                break
            take = min(budget, prompts[i] - prefilled[i])
            prefilled[i] += take
            chunk_tokens += take
            budget -= take
            if prefilled[i] == prompts[i]:
                completed.append(i)
        context = sum(prompts[i] + generated[i] for i in decoding)
        tokens, sampled = len(decoding) + chunk_tokens, len(decoding) + len(completed)
        clock += model.step_seconds(tokens, sampled, context, bandwidth, flops)
        steps += 1
        still = []
        for i in decoding:
            generated[i] += 1
            if generated[i] >= outputs[i]:
                finished += 1
            else:
                still.append(i)
        for i in completed:
            waiting.remove(i)
            generated[i] = 1
            if outputs[i] <= 1:
                finished += 1
            else:
                still.append(i)
        decoding = still
    return {"seconds": clock, "steps": steps, "req_per_s": len(prompts) / clock,
            "output_tok_per_s": sum(outputs) / clock}  # fmt: skip


def w2_load_ceiling(
    model: ModelCost, bandwidth: float, num_requests: int = 500, flops: float = 7.9e14
) -> dict:
    """The W2 load's ceiling for `model` at `bandwidth` (the benches call this with the copy bandwidth they
    measured, so each run reports what share of its own GPU's ceiling it reached)."""
    specs = sharegpt_like_requests(num_requests, model.vocab_size, seed=0)
    prompts, outputs = [len(s.prompt_token_ids or []) for s in specs], [s.max_tokens for s in specs]
    return {"model": model.name, "bandwidth": bandwidth, "flops": flops,
            **simulate(model, prompts, outputs, bandwidth, flops)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bandwidth", type=float, default=4.2e12, help="bytes/s (H200 copy, issue 13)")
    parser.add_argument("--flops", type=float, default=7.9e14, help="dense bf16 products/s")
    parser.add_argument("--num-requests", type=int, default=500)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for model in (
        llama_3_1_8b(),
        qwen3_30b_a3b(48),
        qwen3_30b_a3b(24),
        qwen3_30b_a3b(48).fp8(),
        qwen3_30b_a3b(24).fp8(),
    ):
        row = w2_load_ceiling(model, args.bandwidth, args.num_requests, args.flops)
        rows.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))
    if args.out:
        args.out.write_text(
            json.dumps({"bandwidth": args.bandwidth, "flops": args.flops, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
