"""Kernel microbenchmark: the Triton attention and fused-layer kernels against their floors and
against torch in the same run, on whatever CUDA GPU is present.

    python3 bench/kernels.py --out bench/results/kernels_gpu.json
    python3 bench/kernels.py --only decode --out /tmp/decode.json   # decode attention alone, FP8 caches too
    python3 bench/kernels.py --only decode-w1 --out /tmp/w1_tiles.json  # W1's ragged cases, every tile
    python3 bench/kernels.py --only decode-fp8 --out /tmp/fp8.json     # FP8-cache cases beside bf16, every tile
    python3 bench/decode_tile_pick.py /tmp/w1_tiles.json               # the tile they favour

Decode attention is bound by reading the KV cache, so its floor is (K + V bytes) / measured copy
bandwidth. Prefill is reported in TFLOP/s of causal attention. Baselines: torch SDPA on contiguous
(unpaged) K/V, which is what the paged kernels would have to beat if paging were free.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.kernels.decode_attention import choose_num_splits, decode_attention  # noqa: E402
from engine.kernels.decode_tiles import DecodeTile  # noqa: E402
from engine.kernels.prefill_attention import prefill_attention  # noqa: E402
from engine.kernels.reshape_and_cache import reshape_and_cache  # noqa: E402
from engine.kernels.rmsnorm import rms_norm  # noqa: E402
from engine.kernels.rotary import rotary_embedding  # noqa: E402
from engine.kernels.silu_mul import silu_and_mul  # noqa: E402
from engine.model.attention import longest_first, write_kv_cache  # noqa: E402
from engine.model.layers import RMSNorm, RotaryEmbedding, SiluAndMul  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    src = torch.randn(1 << 29, device=DEV, dtype=BF16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def paged_cache(
    context_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype = BF16
):
    """A random cache (bf16, or float8 e4m3 as `--kv-cache-dtype fp8` keeps it) with each sequence's blocks
    scattered, and the matching block tables."""
    blocks_per_seq = [triton.cdiv(c, block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq)
    order = torch.randperm(num_blocks)
    tables = torch.zeros(len(context_lens), max(blocks_per_seq), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = order[used : used + n]
        used += n
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device=DEV, dtype=BF16).to(dtype)
    return cache, tables.to(DEV), torch.tensor(context_lens, dtype=torch.int32, device=DEV)


DECODE_VARIANTS = [DecodeTile()] + [  # the engine's default first, then (block_n, num_warps, num_stages)
    DecodeTile(*t) for t in ((32, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3), (64, 2, 3),
                             (64, 4, 4), (32, 4, 3), (32, 2, 2))
]  # fmt: skip


def bench_decode(
    name, num_heads, num_kv_heads, head_dim, block_size, context_lens, copy_bw, num_sms, sweep, fp8_kv=False
):
    """fp8_kv: a float8 cache (a byte a value; unit scales), as `--kv-cache-dtype fp8` serves it."""
    batch = len(context_lens)
    kv_dtype = torch.float8_e4m3fn if fp8_kv else BF16
    cache, tables, seq_lens = paged_cache(context_lens, num_kv_heads, head_dim, block_size, kv_dtype)
    kv_scales = torch.ones(2, device=DEV) if fp8_kv else None
    q = torch.randn(batch, num_heads, head_dim, device=DEV, dtype=BF16)
    out = torch.empty_like(q)
    kv_bytes = sum(context_lens) * num_kv_heads * head_dim * 2 * cache.element_size()
    floor_ms = kv_bytes / copy_bw * 1e3
    splits = choose_num_splits(batch, num_kv_heads, max(context_lens), num_sms)

    def row(variant: str, ms: float, **extra) -> dict:
        return {"kernel": "decode", "case": name, "variant": variant, **extra, "ms": ms, "floor_ms": floor_ms,
                "pct_of_floor": 100 * floor_ms / ms, "GB_per_s": kv_bytes / ms / 1e6}  # fmt: skip

    def triton_ms(tile: DecodeTile, seq_order: torch.Tensor | None = None) -> float:
        return median_ms(partial(
            decode_attention, q, cache, tables, seq_lens, head_dim**-0.5, out, num_splits=splits, tile=tile,
            kv_scales=kv_scales, seq_order=seq_order))  # fmt: skip

    variants = DECODE_VARIANTS if sweep else DECODE_VARIANTS[:1]
    rows = [row(tile.name, triton_ms(tile), splits=splits) for tile in variants]
    # Ragged contexts: the programs dispatched longest context first, as the engine does (every variant swept)
    if len(set(context_lens)) > 1:
        order = torch.from_numpy(longest_first(np.asarray(context_lens))).to(DEV)
        rows += [
            row(f"{tile.name} longest first", triton_ms(tile, order), splits=splits) for tile in variants
        ]
    if len(set(context_lens)) == 1 and not fp8_kv:  # SDPA baseline: one length, contiguous bf16 K/V
        ctx = context_lens[0]
        k = torch.randn(batch, num_kv_heads, ctx, head_dim, device=DEV, dtype=BF16)
        v = torch.randn_like(k)
        q4 = q.unsqueeze(2)  # [B, H, 1, D]
        ms = median_ms(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True))
        rows.append(row("torch_sdpa_contiguous_gqa", ms))
        # The same with K/V expanded to every query head (reads group x the bytes, but takes the flash path)
        group = num_heads // num_kv_heads
        ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        ms = median_ms(lambda: F.scaled_dot_product_attention(q4, ke, ve))
        rows.append(row("torch_sdpa_contiguous_expanded", ms))
        del k, v, ke, ve
    return rows


PREFILL_VARIANTS = [  # (block_m, block_n, num_warps, num_stages)
    (64, 64, 4, 2), (128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 32, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3),
]  # fmt: skip


def bench_prefill(name, num_heads, num_kv_heads, head_dim, block_size, query_lens, prefix_lens):
    seq_lens = [p + q for p, q in zip(prefix_lens, query_lens, strict=True)]
    cache, tables, seq_lens_t = paged_cache(seq_lens, num_kv_heads, head_dim, block_size)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, device=DEV, dtype=BF16)
    out = torch.empty_like(q)
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32, device=DEV)
    # causal FLOPs: QK^T and PV over each query's visible keys
    flops = sum(
        4 * num_heads * head_dim * (p * ql + ql * (ql + 1) / 2)
        for p, ql in zip(prefix_lens, query_lens, strict=True)
    )
    rows = []
    for bm, bn, warps, stages in PREFILL_VARIANTS:
        ms = median_ms(partial(
            prefill_attention, q, cache, tables, seq_lens_t, qsl, max(query_lens), head_dim**-0.5, out,
            block_m=bm, block_n=bn, num_warps=warps, num_stages=stages))  # fmt: skip
        rows.append({"kernel": "prefill", "case": name, "variant": f"m{bm}n{bn}w{warps}s{stages}", "ms": ms,
                     "TFLOP_per_s": flops / ms / 1e9})  # fmt: skip
    if all(p == 0 for p in prefix_lens) and len(set(query_lens)) == 1:
        length = query_lens[0]
        qb = torch.randn(len(query_lens), num_heads, length, head_dim, device=DEV, dtype=BF16)
        kb = torch.randn(len(query_lens), num_kv_heads, length, head_dim, device=DEV, dtype=BF16)
        vb = torch.randn_like(kb)
        ms = median_ms(lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=True))
        rows.append({"kernel": "prefill", "case": name, "variant": "torch_sdpa_contiguous", "ms": ms,
                     "TFLOP_per_s": flops / ms / 1e9})  # fmt: skip
    return rows


def bench_cache_write(copy_bw):
    num_tokens, kvh, d, bs = 16384, 8, 128, 16
    cache = torch.randn(2, num_tokens // bs + 64, bs, kvh, d, device=DEV, dtype=BF16)
    k = torch.randn(num_tokens, kvh, d, device=DEV, dtype=BF16)
    v = torch.randn_like(k)
    slots = torch.randperm(cache.shape[1] * bs, device=DEV)[:num_tokens]
    moved = 4 * k.numel() * k.element_size()  # read k, v; write both
    rows = []
    for variant, fn in [("triton", lambda: reshape_and_cache(k, v, cache, slots)),
                        ("torch_index_copy", lambda: write_kv_cache(k, v, cache, slots))]:  # fmt: skip
        ms = median_ms(fn)
        rows.append({"kernel": "reshape_and_cache", "case": "16384 tok x 8 kvh x 128", "variant": variant, "ms": ms,
                     "pct_of_floor": 100 * moved / copy_bw * 1e3 / ms})  # fmt: skip
    return rows


def bench_fused():
    rows = []

    def both(case, kernel, ours, theirs):
        for variant, fn in (("triton", ours), ("torch", theirs)):
            ms = do_bench_cudagraph(fn, rep=50, return_mode="median")  # graph: launch gaps out of the number
            rows.append({"kernel": kernel, "case": case, "variant": variant, "ms": ms})

    for tokens in (256, 16384):
        norm = RMSNorm(1024, 1e-6).to(DEV, BF16)
        x = torch.randn(tokens, 1024, device=DEV, dtype=BF16)
        r = torch.randn_like(x)
        both(f"{tokens} x 1024 +residual", "rms_norm",
             lambda: rms_norm(x, norm.weight, 1e-6, r), lambda: norm(x, r))  # noqa: B023  # fmt: skip
        g = torch.randn(tokens, 2 * 3072, device=DEV, dtype=BF16)
        both(f"{tokens} x 3072", "silu_and_mul", lambda: silu_and_mul(g), lambda: SiluAndMul()(g))  # noqa: B023
        rot = RotaryEmbedding(128, {"rope_theta": 1e6}, 4096, 4096, torch.device(DEV))
        qkv = torch.randn(tokens, (16 + 16) * 128, device=DEV, dtype=BF16)
        q = qkv[:, : 16 * 128].view(tokens, 16, 128)
        k = qkv[:, 16 * 128 : 24 * 128].view(tokens, 8, 128)
        pos = torch.randint(0, 4096, (tokens,), device=DEV)
        qn, kn = RMSNorm(128, 1e-6).to(DEV, BF16), RMSNorm(128, 1e-6).to(DEV, BF16)
        both(f"{tokens} tok, Qwen3 q/k norm + rotary", "rotary",
             lambda: rotary_embedding(pos, q, k, rot.cos_sin_cache, qn.weight, kn.weight, 1e-6),  # noqa: B023
             lambda: rot(pos, qn(q), kn(k)))  # noqa: B023  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/kernels_gpu.json")
    parser.add_argument(
        "--only",
        choices=["decode", "decode-w1", "decode-fp8"],
        default=None,
        help="decode attention alone; decode-w1: only W1's ragged cases (256 and 128 x U(100, 2,048)), every tile; "
        "decode-fp8: only the FP8-cache cases, each beside its bf16 cache",
    )
    parser.add_argument("--bf16-kv-only", action="store_true", help="skip the FP8-cache decode sweeps")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    print(
        f"{props.name}: {props.multi_processor_count} SMs, copy bandwidth {copy_bw / 1e12:.2f} TB/s",
        flush=True,
    )

    rng = random.Random(0)
    rows = []
    qwen, llama = (16, 8, 128), (32, 8, 128)
    decode_cases = [
        ("Qwen3-0.6B 256 x 1024", qwen, [1024] * 256, True),
        ("Llama-8B 256 x 1024", llama, [1024] * 256, True),
        ("Qwen3-0.6B 256 x U(100,2048)", qwen, [rng.randint(100, 2048) for _ in range(256)], True),
        ("Qwen3-0.6B 128 x U(100,2048)", qwen, [rng.randint(100, 2048) for _ in range(128)], True),
        ("Qwen3-0.6B 48 x U(100,2048)", qwen, [rng.randint(100, 2048) for _ in range(48)], False),
        ("Llama-8B 160 x U(100,1500)", llama, [rng.randint(100, 1500) for _ in range(160)], False),
        ("Llama-8B 64 x 4096", llama, [4096] * 64, False),
        ("Llama-8B 8 x 8192", llama, [8192] * 8, False),
        ("Llama-8B 1 x 8192", llama, [8192], False),
        ("Qwen3-0.6B 32 x 512", qwen, [512] * 32, False),
    ]
    if args.only == "decode-w1":  # the two swept ragged Qwen3-0.6B cases: 256 and 128 x U(100, 2,048)
        decode_cases = [
            case for case in decode_cases if case[0].startswith("Qwen3-0.6B") and "U(" in case[0]
        ][:2]
    elif args.only == "decode-fp8":
        decode_cases = []
    for name, (h, kvh, d), ctx, sweep in decode_cases:
        rows += bench_decode(name, h, kvh, d, 16, ctx, copy_bw, props.multi_processor_count, sweep)
        print(f"decode {name} done", flush=True)
    # FP8 caches (issue 13's W2-FP8, W5 with --kv-cache-dtype fp8): half the bytes through the same tiles; the
    # bf16 row of each shape beside it
    qwen3_moe = (32, 4, 128)
    fp8_cases = [("Llama-8B 256 x 1024", llama, [1024] * 256),
                 ("Llama-8B 160 x U(100,1500)", llama, [rng.randint(100, 1500) for _ in range(160)]),
                 ("Qwen3-30B-A3B 256 x 1024", qwen3_moe, [1024] * 256),
                 ("Qwen3-30B-A3B 32 x 1024", qwen3_moe, [1024] * 32)]  # fmt: skip
    for name, (h, kvh, d), ctx in [] if args.bf16_kv_only or args.only == "decode-w1" else fp8_cases:
        for fp8_kv in (False, True):
            label = f"{name}{', FP8 KV' if fp8_kv else ''}"
            rows += bench_decode(
                label, h, kvh, d, 16, ctx, copy_bw, props.multi_processor_count, True, fp8_kv
            )
        print(f"decode {name}, bf16 and FP8 caches, done", flush=True)
    if args.only is not None:
        write_and_print(args.out, props, copy_bw, rows)
        return
    rows += bench_prefill("Qwen3-0.6B 16 x 1024 fresh", *qwen, 16, [1024] * 16, [0] * 16)
    rows += bench_prefill("Qwen3-0.6B 4 x 2048 over 2048 cached", *qwen, 16, [2048] * 4, [2048] * 4)
    rows += bench_prefill("Llama-8B 8 x 2048 fresh", *llama, 16, [2048] * 8, [0] * 8)
    rows += bench_prefill(
        "Llama-8B 64 x U(50,400) fresh", *llama, 16, [rng.randint(50, 400) for _ in range(64)], [0] * 64
    )
    print("prefill done", flush=True)
    rows += bench_cache_write(copy_bw)
    rows += bench_fused()
    write_and_print(args.out, props, copy_bw, rows)


def write_and_print(out: str, props, copy_bw: float, rows: list[dict]) -> None:
    result = {
        "device": props.name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_TBps": copy_bw / 1e12,
        "rows": rows,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"\n{'kernel':<18}{'case':<38}{'variant':<24}{'ms':>9}  extra")
    for r in rows:
        extra = ", ".join(
            f"{k}={v:.1f}" for k, v in r.items() if k in ("pct_of_floor", "GB_per_s", "TFLOP_per_s")
        )
        print(f"{r['kernel']:<18}{r['case']:<38}{r['variant']:<24}{r['ms']:>9.4f}  {extra}")


if __name__ == "__main__":
    main()
