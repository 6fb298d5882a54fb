"""Does programmatic dependent launch (PDL, Hopper) shorten a chain of small kernels inside a CUDA graph?

A decode step is ~300 (W1, W2) to ~860 (W5) kernels in a CUDA graph, most a few µs long; the step profiles
put ~0.5 µs of idle between kernels and each small kernel's own ramp (launch, first loads) inside its time.
With PDL (Triton: ``launch_pdl=True`` at launch, ``gdc_wait()`` in the kernel before it reads what the previous
kernel wrote, ``gdc_launch_dependents()`` once it has read its inputs) the next kernel's programs start while
the previous one finishes, and can load what no earlier kernel writes (weights) before they wait.

Two chains, each captured in one CUDA graph and replayed, with and without PDL, in this process:
- ``norm``: RMSNorm-like rows [tokens, hidden] bf16, x -> y -> x ... (every kernel reads the last one's output);
- ``gemv``: y = x @ W (W [hidden, hidden] bf16, a new W per link, 4x the L2 in all), x -> y -> x ...; with
  PDL each program loads its W tile before ``gdc_wait()`` (the weight prefetch a real GEMM would do).
Prints µs per kernel for each and checks both give the same bits. Nothing in the engine uses PDL yet: this
says whether it is worth building (docs/BENCHMARKS.md).

    python3 bench/diag/pdl_chain.py --tokens 1 32 256 --links 200
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_link(x_ptr, w_ptr, y_ptr, hidden, eps, BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # no earlier kernel writes it
    if USE_GDC:
        tl.extra.cuda.gdc_wait()  # x is the previous kernel's output
    x = tl.load(x_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / hidden + eps)
    tl.store(y_ptr + row * hidden + cols, (x * inv * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_link(
    x_ptr, w_ptr, y_ptr, tokens, hidden, scale, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr,
):  # fmt: skip
    # y[t, n] = sum_k x[t, k] * W[k, n] for one BLOCK_N column tile and every token; the first W tile is loaded
    # before the wait (with PDL), the rest as the loop goes
    n0 = tl.program_id(0) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_T)
    ks = tl.arange(0, BLOCK_K)
    w_first = tl.load(w_ptr + ks[:, None] * hidden + cols[None, :])
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    x = tl.load(x_ptr + rows[:, None] * hidden + ks[None, :], mask=rows[:, None] < tokens, other=0.0)
    acc += tl.dot(x, w_first)
    for k0 in range(BLOCK_K, hidden, BLOCK_K):
        w = tl.load(w_ptr + (k0 + ks)[:, None] * hidden + cols[None, :])
        x = tl.load(
            x_ptr + rows[:, None] * hidden + (k0 + ks)[None, :], mask=rows[:, None] < tokens, other=0.0
        )
        acc += tl.dot(x, w)
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    out = y_ptr + rows[:, None] * hidden + cols[None, :]
    tl.store(out, (acc * scale).to(y_ptr.dtype.element_ty), mask=rows[:, None] < tokens)  # stays ~N(0, 1)


def chain(kind: str, tokens: int, hidden: int, links: int, pdl: bool, weights: list[torch.Tensor]):
    """A function that launches the chain on fixed buffers (for capture); its result buffer."""
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    y = torch.empty_like(x)
    start = x.clone()

    def run() -> None:
        x.copy_(start)
        a, b = x, y
        for i in range(links):
            w = weights[i % len(weights)]
            if kind == "norm":
                _norm_link[(tokens,)](a, w, b, hidden, 1e-6, BLOCK=triton.next_power_of_2(hidden), USE_GDC=pdl,
                                      num_warps=4, launch_pdl=pdl)  # fmt: skip
            else:
                block_t = max(16, triton.next_power_of_2(tokens))
                _gemv_link[(triton.cdiv(hidden, 64),)](a, w, b, tokens, hidden, hidden**-0.5, BLOCK_T=block_t,
                                                        BLOCK_N=64, BLOCK_K=64, USE_GDC=pdl, num_warps=4,
                                                        launch_pdl=pdl)  # fmt: skip
            a, b = b, a

    return run, (x if links % 2 == 0 else y)


def time_graph(run, replays: int = 20) -> float:
    """Median ms of one replay of `run` captured in a CUDA graph."""
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--links", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if torch.cuda.get_device_capability()[0] < 9:
        raise SystemExit("PDL needs compute capability 9.0 or later (Hopper)")
    h = args.hidden
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    gen = torch.Generator("cuda").manual_seed(1)
    norm_w = [torch.rand(h, device="cuda", dtype=torch.bfloat16, generator=gen) + 0.5]
    gemv_w = [torch.randn(h, h, device="cuda", dtype=torch.bfloat16, generator=gen)
              for _ in range(max(2, 4 * l2 // (2 * h * h)))]  # fmt: skip
    rows = []
    print(f"{torch.cuda.get_device_name()}; {args.links} kernels a graph; µs per kernel")
    for kind, weights in (("norm", norm_w), ("gemv", gemv_w)):
        for tokens in args.tokens:
            if kind == "gemv" and tokens > 64:
                continue  # a decode GEMV; larger token counts are GEMMs, tiled otherwise
            result = {}
            for pdl in (False, True):
                run, out = chain(kind, tokens, h, args.links, pdl, weights)
                ms = time_graph(run)
                result[pdl] = (ms, out.clone())
            same = torch.equal(result[False][1], result[True][1])
            plain, with_pdl = (1e3 * result[p][0] / args.links for p in (False, True))
            rows.append({"kind": kind, "tokens": tokens, "us_per_kernel": plain, "us_per_kernel_pdl": with_pdl,
                         "same_bits": same})  # fmt: skip
            print(f"  {kind:4} tokens {tokens:4}: {plain:6.2f} -> {with_pdl:6.2f} µs with PDL"
                  f" ({100 * (1 - with_pdl / plain):+.0f} %), same bits: {same}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "links": args.links, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
