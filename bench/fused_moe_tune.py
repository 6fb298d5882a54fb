"""The fused MoE kernel's block configurations, timed: for each token count and each variant of the experts
(bfloat16; FP8 W8A8 with per-channel weight scales, as `--quantization fp8` makes them; FP8 with 128-wide
group scales, as Qwen3-*-FP8 checkpoints hold them), engine.kernels.fused_moe's default choice
(choose_block_config / choose_fp8_block_config) against a sweep, each call (alignment, activation
quantization, both GEMMs, the top-k sum) a CUDA graph replayed 20 times; and the weight-read floor: the
experts the tokens chose, read once (FP8: a byte a weight plus their float32 scales), at the measured copy
bandwidth. Times in µs.

    python3 bench/fused_moe_tune.py --out bench/results/fused_moe_tune_gpu.json     # Qwen3-30B-A3B layer, bf16
    python3 bench/fused_moe_tune.py --variants bf16 fp8-channel fp8-block --sweep fp8-channel fp8-block \\
        --tokens 1 16 64 256 2048 8192                                              # FP8, bf16 baseline
    python3 bench/fused_moe_tune.py --experts 8 --top-k 2 --hidden 4096 --inter 14336   # Mixtral 8x7B

From a handful of slots per expert the sweep also tries MoeBlockConfig.split_gate (gate and up written
out, the SiLU-mul a second pass), and 64-row tiles at decode sizes. Variants not in --sweep time their
default configuration only (the baseline). Where the sweep's best beats the default by more than noise,
choose_block_config / choose_fp8_block_config is what to change, or `--save-configs` keeps it for that card
(then W5 says whether the engine felt it). The JSON is rewritten after every token count, so a run cut
short keeps what it measured. About 5 minutes for the bf16 sweep of the default shape on an H100, about as
long for both FP8 sweeps at the token counts above.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.append(str(Path(__file__).resolve().parent))  # w1_offline's copy_bandwidth

from w1_offline import copy_bandwidth  # noqa: E402

from engine.kernels.fused_moe import (  # noqa: E402
    MoeBlockConfig,
    choose_block_config,
    choose_fp8_block_config,
    fused_experts,
)
from engine.kernels.moe_tuned_configs import (  # noqa: E402
    BlockConfigEntry,
    TunedConfigFile,
    file_name,
    variant_name,
)
from engine.model.fp8 import quantize_rows  # noqa: E402

FP8_GROUP = 128  # the block-scaled checkpoints' [128, 128]
VARIANTS = ("bf16", "fp8-channel", "fp8-block")


@dataclass
class Experts:
    """One variant's expert weights, as fused_experts takes them."""

    w13: torch.Tensor
    w2: torch.Tensor
    scales: dict = field(default_factory=dict)  # w13_scale, w2_scale, group_k (FP8)

    @property
    def group_k(self) -> int | None:
        return self.scales.get("group_k")

    @property
    def fp8(self) -> bool:
        return bool(self.scales)

    def bytes_per_expert(self) -> int:
        """What reading one expert costs: its weights and, for FP8, its float32 scales."""
        e = self.w13.shape[0]
        total = (self.w13.numel() + self.w2.numel()) * self.w13.element_size()
        if self.fp8:
            total += (self.scales["w13_scale"].numel() + self.scales["w2_scale"].numel()) * 4
        return total // e

    def default_config(self, num_slots: int) -> MoeBlockConfig:
        e = self.w13.shape[0]
        if self.fp8:
            return choose_fp8_block_config(num_slots, e, self.group_k)
        return choose_block_config(num_slots, e)


def quantized(w: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, rows, K] bf16 -> float8 and float32 scales [E, rows, G], one per row (and group of K: per row
    rather than per 128-row block, which reads the same bytes)."""
    e, rows, k = w.shape
    q, s = quantize_rows(w.reshape(e * rows, k), group)
    return q.view(e, rows, k), s.view(e, rows, -1)


def make_experts(variant: str, w13: torch.Tensor, w2: torch.Tensor) -> Experts:
    if variant == "bf16":
        return Experts(w13, w2)
    group = FP8_GROUP if variant == "fp8-block" else None
    (q13, s13), (q2, s2) = quantized(w13, group), quantized(w2, group)
    return Experts(q13, q2, {"w13_scale": s13, "w2_scale": s2, "group_k": group})


def candidates(num_slots: int, num_experts: int, experts: Experts) -> list[MoeBlockConfig]:
    per_expert = num_slots / num_experts
    block_ms = [16, 32] if per_expert <= 32 else [32, 64, 128]
    if experts.group_k is not None:
        block_ks = [experts.group_k]  # one K step per scale group
    elif experts.fp8:
        block_ks = [128, 256]
    else:
        block_ks = [64, 128]
    stages = [3, 4, 5] if experts.fp8 else [3, 4]  # float8 tiles take half the shared memory
    out = []
    if per_expert <= 32:
        # 64-row tiles at decode sizes too (Hopper's warpgroup MMA; one block per expert up to 64 slots, so
        # each expert's weights are read once where 16-row blocks read them once a block): a few shapes only
        for bn, warps, st in itertools.product([64, 128], [4, 8], [3, 4]):
            out.append(MoeBlockConfig(64, bn, block_ks[-1], group_m=1 if per_expert <= 16 else 8,
                                      num_warps=warps, num_stages=st))  # fmt: skip
    for bm, bn, bk, warps, st in itertools.product(block_ms, [32, 64, 128], block_ks, [4, 8], stages):
        if bm * bn >= 128 * 128 and warps == 4:
            continue  # two fp32 accumulators of that size spill with 4 warps
        if experts.fp8 and (bm * bn <= 16 * 64 and warps == 8 or bk == 256 and st == 5):
            continue  # FP8 sweeps are two per run: fewer compiles (tiny tiles idle 8 warps; 5 stages of 256)
        out.append(
            MoeBlockConfig(bm, bn, bk, group_m=1 if per_expert <= 16 else 8, num_warps=warps, num_stages=st)
        )
    # the gate split off (one accumulator a tile), at the large tiles it is for: from a few slots an expert
    # (64-row tiles, as vLLM's H200 file for this shape has from 256 tokens) to prefill sizes
    if per_expert > 8:
        split_ms = [64] if per_expert <= 32 else [64, 128]
        for bm, bn, warps, st in itertools.product(split_ms, [64, 128], [4, 8], [3, 4]):
            if bm * bn >= 128 * 128 and warps == 4:
                continue
            out.append(MoeBlockConfig(bm, bn, block_ks[-1], 8, warps, st, split_gate=True))
    return out


def time_config(x, experts: Experts, weights, ids, config: MoeBlockConfig) -> float | None:
    """Microseconds per call, from a CUDA graph of the call (as decode steps run it)."""

    def call() -> torch.Tensor:
        return fused_experts(x, experts.w13, experts.w2, weights, ids, config, **experts.scales)

    try:
        call()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
    except Exception:  # out of shared memory or registers for this tile shape
        return None
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 20 * 1e3


def measure(tokens: int, x, weights, ids, experts: Experts, active: int, copy_bw: float, sweep: bool) -> dict:
    num_slots, num_experts = ids.numel(), experts.w13.shape[0]
    floor_us = active * experts.bytes_per_expert() / copy_bw * 1e6
    default = experts.default_config(num_slots)
    default_us = time_config(x, experts, weights, ids, default)
    row = {"floor_us": floor_us, "default": vars(default), "default_us": default_us,
           "default_pct_of_floor": None if default_us is None else 100 * floor_us / default_us}  # fmt: skip
    if sweep:
        timed = [
            (time_config(x, experts, weights, ids, c), c) for c in candidates(num_slots, num_experts, experts)
        ]
        timed = [(us, c) for us, c in timed if us is not None]
        if not timed:
            return {**row, "configs_timed": 0}
        best_us, best = min(timed, key=lambda t: t[0])
        row.update({"best": vars(best), "best_us": best_us, "best_pct_of_floor": 100 * floor_us / best_us,
                    "configs_timed": len(timed)})  # fmt: skip
    return row


def save_configs(directory: Path, result: dict, name: str, experts: Experts) -> Path | None:
    """The fastest configuration per token count measured so far for variant `name` (the default where the
    sweep found nothing faster), as engine.kernels.moe_tuned_configs reads it."""
    shape = result["shape"]
    variant = variant_name(experts.w13.dtype, experts.group_k)  # float8 weights name an FP8 variant
    configs = {}
    for row in result["rows"]:
        r = row[name]
        fastest = min(
            ((r.get(f"{k}_us"), r.get(k)) for k in ("default", "best") if r.get(f"{k}_us") is not None),
            key=lambda t: t[0],
            default=None,
        )
        if fastest is not None:
            configs[row["tokens"]] = BlockConfigEntry(**fastest[1])
    if not configs:
        return None  # nothing ran yet (every configuration failed to compile or launch)
    tuned = TunedConfigFile(
        device=result["device"], num_experts=shape["experts"], inter=shape["inter"], hidden=shape["hidden"],
        variant=variant, source=f"bench/fused_moe_tune.py, {result['date']}, torch {result['torch']}",
        configs=configs,
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / file_name(result["device"], shape["experts"], shape["inter"], shape["hidden"], variant)
    path.write_text(tuned.model_dump_json(indent=1) + "\n")
    return path


def summary(r: dict) -> str:
    def us(value: float | None, pct: float | None) -> str:
        return "failed" if value is None else f"{value:8.1f} µs ({pct:.0f}% of floor)"

    line = f"default {us(r['default_us'], r['default_pct_of_floor'])}, floor {r['floor_us']:.1f} µs"
    if "best_us" in r:
        line += f"; best {us(r['best_us'], r['best_pct_of_floor'])} {r['best']}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/fused_moe_tune_gpu.json")
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128, 256, 512, 2048, 8192]
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["bf16"])
    parser.add_argument(
        "--sweep",
        nargs="*",
        choices=VARIANTS,
        default=None,
        help="variants to sweep (default: every variant)",
    )
    parser.add_argument(
        "--save-configs",
        type=Path,
        default=None,
        help="write each swept variant's fastest configurations here, as the engine reads them "
        "(engine/kernels/moe_configs/, or $KUBELLM_MOE_CONFIG_DIR for a run in the same session)",
    )
    args = parser.parse_args()
    sweep = set(args.variants if args.sweep is None else args.sweep)

    copy_bw = copy_bandwidth()
    e, k, h, inter = args.experts, args.top_k, args.hidden, args.inter
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(e, 2 * inter, h, device="cuda", generator=gen, dtype=torch.bfloat16) * h**-0.5
    w2 = torch.randn(e, h, inter, device="cuda", generator=gen, dtype=torch.bfloat16) * inter**-0.5
    variants = {name: make_experts(name, w13, w2) for name in args.variants}
    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "shape": {"experts": e, "top_k": k, "hidden": h, "inter": inter}, "variants": args.variants,
              "swept": sorted(sweep), "copy_bandwidth_TBps": copy_bw / 1e12, "times": "µs per call", "rows": []}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{props.name}; copy bandwidth {copy_bw / 1e12:.2f} TB/s", flush=True)
    saved: dict[str, Path] = {}
    for tokens in args.tokens:
        x = torch.randn(tokens, h, device="cuda", generator=gen, dtype=torch.bfloat16)
        logits = torch.randn(tokens, e, device="cuda", generator=gen)
        weights, ids = logits.softmax(-1).topk(k, dim=-1)
        active = ids.unique().numel()
        row: dict = {"tokens": tokens, "active_experts": active}
        for name, experts in variants.items():
            row[name] = measure(tokens, x, weights, ids, experts, active, copy_bw, name in sweep)
            print(f"{tokens:5d} tokens {name:11s}: {summary(row[name])}", flush=True)
        result["rows"].append(row)
        out.write_text(
            json.dumps(result, indent=1)
        )  # after every token count: a cut-short run keeps its rows
        for name in sorted(sweep & set(variants)) if args.save_configs else ():
            if (path := save_configs(args.save_configs, result, name, variants[name])) is not None:
                saved[name] = path
    for name, path in saved.items():
        print(f"{name}: configurations saved as {path}", flush=True)


if __name__ == "__main__":
    main()
