"""The grammar bitmask kernel (engine/kernels/grammar_bitmask.py) masks exactly what xgrammar's CPU kernel
masks, on the constrained rows only: under Triton's interpreter on the CPU (CI), and on a real GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

REPO = Path(__file__).parent.parent.parent

SCRIPT = r"""
import torch
from engine.kernels.grammar_bitmask import apply_bitmask_triton
from engine.structured.bitmask import GrammarBitmask

torch.manual_seed(0)
for vocab, rows in [(9000, [1, 4, 5]), (4096, [0, 1, 2, 3, 4, 5]), (130, [2])]:
    width = -(-vocab // 32)
    logits = torch.randn(6, vocab)
    bitmask = torch.randint(-2**31, 2**31 - 1, (len(rows), width), dtype=torch.int32)
    expected = logits.clone()
    GrammarBitmask(bitmask, rows, torch.tensor(rows)).apply(expected)  # xgrammar's CPU kernel
    got = logits.clone()
    apply_bitmask_triton(got, bitmask, torch.tensor(rows))
    assert torch.equal(got, expected), vocab
    untouched = [r for r in range(6) if r not in rows]
    assert torch.equal(got[untouched], logits[untouched])
    assert torch.isinf(got[rows]).any() and not torch.isinf(got[rows]).all()
print("ok")
"""


@pytest.mark.skipif(
    tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 9),
    reason="needs Triton >= 3.9's interpreter",
)
def test_bitmask_kernel_matches_xgrammar_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_bitmask_on_the_gpu_matches_the_cpu():
    import torch
    import xgrammar as xgr

    from engine.sampling.params import SamplingParams
    from engine.sampling.sampler import Sampler, SamplingRow
    from engine.structured.bitmask import BitmaskBuilder
    from engine.structured.matcher import GrammarState

    vocab = 40_000
    info = xgr.TokenizerInfo(
        [chr(ord("a") + i) for i in range(26)] + ["</s>"], vocab_size=vocab, stop_token_ids=[26]
    )
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_regex("[a-e]+z")
    rows = [(1, GrammarState(compiled)), (3, GrammarState(compiled))]
    logits = torch.randn(5, vocab, device="cuda")
    reference = logits.cpu()
    gpu_mask = BitmaskBuilder(vocab, torch.device("cuda")).build(rows)
    BitmaskBuilder(vocab, torch.device("cpu")).build(rows).apply(reference)
    sample_rows = [SamplingRow(SamplingParams(temperature=1.0), [], [], None, {26}) for _ in range(5)]
    tokens = Sampler()(logits, sample_rows, gpu_mask).token_ids
    assert torch.equal(logits.cpu(), reference)
    assert tokens[1] < 5 and tokens[3] < 5
