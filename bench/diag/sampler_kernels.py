"""The GPU sampler's kernels against what they replaced: what bounded sampling at 7x its read of the logits?

At 256 rows of a 151,936-token vocabulary (W1's full batch) the engine's sampling took 0.16 ms a step on an
H100 (`bench/diag/step_kernels.py`), where reading 78 MB of bf16 logits takes ~0.03 ms: the Gumbel-max kernel
it then ran drew V Philox numbers per row. This times, on the same logits: the engine's kernel now
(engine/kernels/categorical_sample.py: inverse CDF by chunks, one random number per row), a Gumbel-max kernel
with Philox at 10 rounds (the old engine's, `tl.rand`'s default) and 7, with a two-round integer hash instead of
Philox, and no draw at all (the argmax alone: the read's floor). Prints µs per call and GB/s of logits read,
and checks the engine kernel's draws against the distribution.

    python3 bench/diag/sampler_kernels.py --rows 32 128 256
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from engine.kernels.categorical_sample import _mix32, categorical_sample  # noqa: E402

CHUNK = 4096


@triton.jit
def _gumbel_chunk(
    logits_ptr, stride_row, temperature_ptr, seed_ptr, best_val_ptr, best_idx_ptr, vocab_size, num_chunks,
    CHUNK: tl.constexpr, RNG: tl.constexpr, N_ROUNDS: tl.constexpr,
):  # fmt: skip
    """RNG 0: Philox (N_ROUNDS), 1: hash, 2: none (argmax of logits / T)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    t = tl.load(temperature_ptr + row)
    seed = tl.load(seed_ptr + row)
    idx = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = idx < vocab_size
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + idx, mask=mask, other=float("-inf")).to(
        tl.float32
    )
    if RNG == 0:
        u = tl.rand(seed, idx, n_rounds=N_ROUNDS)
    elif RNG == 1:
        key = _mix32((seed & 0xFFFFFFFF).to(tl.uint32) ^ _mix32((seed >> 32).to(tl.uint32) + 0x9E3779B9))
        bits = _mix32(_mix32(idx.to(tl.uint32) ^ key) + key)
        u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    else:
        u = tl.full([CHUNK], 0.5, tl.float32)
    if RNG == 2:
        z = x / t
    else:
        z = x / t - tl.log(-tl.log(u))
    z = tl.where(mask, z, float("-inf"))
    offset = row.to(tl.int64) * num_chunks + chunk
    tl.store(best_val_ptr + offset, tl.max(z, axis=0))
    tl.store(best_idx_ptr + offset, (chunk * CHUNK + tl.argmax(z, axis=0)).to(tl.int64))


def run_variant(logits, temperature, seeds, rng: int, n_rounds: int = 10) -> torch.Tensor:
    batch, vocab = logits.shape
    num_chunks = triton.cdiv(vocab, CHUNK)
    best_val = torch.empty(batch, num_chunks, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(batch, num_chunks, dtype=torch.int64, device=logits.device)
    _gumbel_chunk[(batch, num_chunks)](
        logits, logits.stride(0), temperature, seeds, best_val, best_idx, vocab, num_chunks,
        CHUNK=CHUNK, RNG=rng, N_ROUNDS=n_rounds, num_warps=8,
    )  # fmt: skip
    return best_idx.gather(1, best_val.argmax(dim=1, keepdim=True))[:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    name = torch.cuda.get_device_name()
    rows = []
    for batch in args.rows:
        logits = torch.randn(batch, args.vocab, device="cuda", dtype=torch.bfloat16)
        temperature = torch.full((batch,), 0.6, device="cuda")
        seeds = torch.arange(batch, device="cuda", dtype=torch.int64) * 7919 + 3
        gb = logits.numel() * logits.element_size() / 1e9
        inputs = (logits, temperature, seeds)
        variants = {
            "engine (inverse CDF by chunks)": partial(categorical_sample, *inputs),
            "gumbel, philox 10": partial(run_variant, *inputs, 0, 10),
            "gumbel, philox 7": partial(run_variant, *inputs, 0, 7),
            "gumbel, hash": partial(run_variant, *inputs, 1),
            "no draw (read floor)": partial(run_variant, *inputs, 2),
        }
        for label, fn in variants.items():
            us = do_bench(fn, warmup=20, rep=200, return_mode="median") * 1e3
            rows.append({"rows": batch, "variant": label, "us": us, "GB_per_s": gb / (us * 1e-6)})
            print(
                f"{name}: {batch:4d} rows x {args.vocab}: {label:<36} {us:8.1f} µs  {gb / (us * 1e-6):7.0f} GB/s"
            )
    # The engine's draws follow softmax(logits / T): a 4-token distribution, 20,000 rows of distinct seeds
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], device="cuda")
    n = 20000
    small = (probs.log() * 0.6).repeat(n, 1).contiguous()
    drawn = categorical_sample(
        small, torch.full((n,), 0.6, device="cuda"), torch.arange(n, device="cuda") * 1000 + 5
    )
    counts = torch.bincount(drawn, minlength=4).float()
    chi2 = ((counts - n * probs) ** 2 / (n * probs)).sum().item()
    print(f"engine draws against the distribution: chi2 {chi2:.1f} (3 dof; 16.3 at p = 0.001)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "vocab": args.vocab, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
