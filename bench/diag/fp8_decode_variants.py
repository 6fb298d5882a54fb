"""Why the decode kernel streams a float8 K/V cache slower than a bf16 one: variants of its FP8 path, timed.

On an H100 (2026-12-07) the bf16 cache ran at 92-95 % of its bytes' floor and the float8 one at 55-82 %
(`bench/kernels.py --only decode-fp8`). Each variant here is the engine's kernel source with its FP8 lines
rewritten (written to a temporary module, so Triton can read its source), timed on the FP8 cases against the
engine's own kernel in the same process, with the largest difference from its output:

    python3 bench/diag/fp8_decode_variants.py --out /tmp/fp8_variants.json

- ``engine``: the kernel as it is (K/V converted to float16 after the load, K transposed after).
- ``trans-first``: K transposed while still float8, converted as the product's operand.
- ``kt-load``: K loaded transposed ([HEAD_DIM, BLOCK_N] pointers), so no transpose at all.
- ``fp8-dot``: q and the probabilities rounded to e4m3 and both products taken in float8 (less exact: a
  ceiling for what the conversion costs, not a candidate as it is).

Each runs in batch order and ``ordered`` (a sequence order passed, as the engine's CUDA graphs always do: the
grid then dispatches a sequence's KV heads together); the engine's kernel over a bf16 cache beside them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kernels import copy_bandwidth, median_ms, paged_cache  # noqa: E402

from engine.kernels.decode_attention import choose_num_splits  # noqa: E402
from engine.kernels.decode_tiles import DecodeTile  # noqa: E402

SOURCE = (ROOT / "engine/kernels/decode_attention.py").read_text()
CONVERT = """        if FP8_KV:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
"""
SCORES = "s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2"
K_LOAD = "k = tl.load(k_cache_ptr + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)"
PV = "acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)"
Q_F16 = """        if q.dtype == tl.bfloat16:
            q = q.to(tl.float16)
"""

PATCHES: dict[str, list[tuple[str, str]]] = {
    "engine": [],
    "trans-first": [
        (CONVERT, "        if FP8_KV:\n            v = v.to(q.dtype)\n"),
        (SCORES, "s = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=DOT_PRECISION) * scale_log2"),
    ],
    "kt-load": [
        (
            K_LOAD,
            "kt = tl.load(k_cache_ptr + rows[None, :] + dims[:, None], mask=tok_mask[None, :] & dim_mask[:, None], "
            "other=0.0)",
        ),
        (CONVERT, "        if FP8_KV:\n            v = v.to(q.dtype)\n"),
        (SCORES, "s = tl.dot(q, kt.to(q.dtype), input_precision=DOT_PRECISION) * scale_log2"),
    ],
    "fp8-dot": [
        (Q_F16, "        q = q.to(tl.float8e4nv)\n"),
        (CONVERT, ""),
        (SCORES, "s = tl.dot(q, tl.trans(k)) * scale_log2"),
        (PV, "acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v)"),
    ],
}


def load_variant(name: str, workdir: Path):
    text = SOURCE
    for old, new in PATCHES[name]:
        if old not in text:
            raise SystemExit(f"variant {name}: the kernel no longer contains {old.strip()[:60]!r}")
        text = text.replace(old, new)
    path = workdir / f"decode_variant_{name.replace('-', '_')}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.decode_attention


CASES = [  # name, (heads, kv heads, head dim), contexts
    ("Llama-8B 256 x 1024", (32, 8, 128), [1024] * 256),
    ("Qwen3-30B-A3B 256 x 1024", (32, 4, 128), [1024] * 256),
    ("Qwen3-30B-A3B 64 x 2048", (32, 4, 128), [2048] * 64),  # fewer bytes than that would sit in L2
]
TILES = [DecodeTile(64, 4, 2), DecodeTile(64, 2, 3), DecodeTile(128, 4, 2), DecodeTile(32, 2, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/fp8_decode_variants.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    workdir = Path(tempfile.mkdtemp())
    variants = {}
    for name in PATCHES:
        variants[name] = load_variant(name, workdir)
    rows = []
    for case, (heads, kv_heads, dim), ctx in CASES:
        for kv_dtype in (torch.float8_e4m3fn, torch.bfloat16):
            cache, tables, seq_lens = paged_cache(ctx, kv_heads, dim, 16, kv_dtype)
            fp8 = kv_dtype == torch.float8_e4m3fn
            scales = torch.ones(2, device="cuda") if fp8 else None
            q = torch.randn(len(ctx), heads, dim, device="cuda", dtype=torch.bfloat16)
            floor_ms = sum(ctx) * kv_heads * dim * 2 * cache.element_size() / copy_bw * 1e3
            splits = choose_num_splits(len(ctx), kv_heads, max(ctx), props.multi_processor_count)
            # The engine always passes an order (its CUDA graphs do): a sequence's heads dispatched together
            order = torch.arange(len(ctx), device="cuda", dtype=torch.int32)
            reference = None
            for tile in TILES:
                for name, attend in variants.items() if fp8 else [("engine", variants["engine"])]:
                    for seq_order in (None, order):
                        out = torch.empty_like(q)
                        call = partial(attend, q, cache, tables, seq_lens, dim**-0.5, out, splits, tile, scales,
                                       seq_order)  # fmt: skip
                        label = f"{name}{' ordered' if seq_order is not None else ''}{'' if fp8 else ' bf16'}"
                        try:
                            call()
                            ms = median_ms(call)
                        except Exception as exc:  # a variant Triton cannot compile is a finding, not a crash
                            print(
                                f"{case:28s} {tile.name:9s} {label:20s} failed: {str(exc)[:120]}", flush=True
                            )
                            continue
                        if reference is None:
                            reference = out.float().clone()
                        diff = (out.float() - reference).abs().max().item()
                        row = {"case": case, "tile": tile.name, "variant": label, "ms": ms,
                               "pct_of_floor": 100 * floor_ms / ms, "max_abs_diff_vs_first": diff}  # fmt: skip
                        rows.append(row)
                        print(f"{case:28s} {tile.name:9s} {label:20s} {ms:.4f} ms {row['pct_of_floor']:5.1f} % "
                              f"diff {diff:.2e}", flush=True)  # fmt: skip
    Path(args.out).write_text(json.dumps({"device": props.name, "copy_bandwidth_TBps": copy_bw / 1e12, "rows": rows},
                                         indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
