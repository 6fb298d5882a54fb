"""What engine/kernels/categorical_sample.py must draw, computed in float64 on the host: the row's uniform from
its seed (the kernel's hash, in Python integers) and the token where the row's CDF of softmax(logits / T) first
passes it."""

from __future__ import annotations

import torch

_M = 0xFFFFFFFF


def _mix32(x: int) -> int:
    x &= _M
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M
    return x ^ (x >> 16)


def row_uniform(seed: int) -> float:
    key = _mix32((seed & _M) ^ _mix32(((seed >> 32) + 0x9E3779B9) & _M))
    return (_mix32(key + 0x632BE5AB) >> 8) / 16777216.0


def reference_tokens(logits: torch.Tensor, temperatures: list[float], seeds: list[int]) -> list[int]:
    """Argmax where the temperature is 0; else the inverse-CDF token for the row's uniform."""
    tokens = []
    for row, t, seed in zip(logits.double().cpu(), temperatures, seeds, strict=True):
        if t == 0:
            tokens.append(int(row.argmax()))
            continue
        cdf = torch.softmax(row / t, dim=0).cumsum(0)
        target = row_uniform(seed) * float(cdf[-1])
        tokens.append(
            min(
                int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64), right=True)),
                int((row > float("-inf")).nonzero().max()),
            )
        )
    return tokens
