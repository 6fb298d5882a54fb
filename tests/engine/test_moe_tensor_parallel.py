"""A Qwen3-MoE / Mixtral model split over 2 tensor-parallel ranks (gloo, 2 CPU processes) gives the
logits transformers gives: each rank holds half of every expert's intermediate dimension (and half of
the heads, the vocabulary), the MoE blocks' partial sums are all-reduced, rank 0 gathers the logits.
Built straight from the layer kit, so this checks the MoE sharding whatever the engine's workers do.
The FP8 case (a [128, 128] block-scaled checkpoint, run dequantized as on the CPU) checks that each rank
reads its slice of every expert's scales: transformers' logits on the dequantized weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from fp8_checkpoints import write_fp8_moe_checkpoint

REPO = Path(__file__).resolve().parents[2]

RANK_SCRIPT = r"""
import sys, torch, transformers
from dataclasses import replace
from safetensors.torch import load_file
from engine.model.attention import AttentionMetadata, TorchAttention
from engine.model.layer_kit import LayerKit
from engine.model.moe import SparseMoeBlock
from engine.model.moe_family import MoeForCausalLM
from engine.model.quantization import resolve_quantization
from engine.model.sharding import Shard

rank, world, init_file, directory = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
config = transformers.AutoConfig.from_pretrained(directory)
scheme = resolve_quantization(None, config)  # an FP8 checkpoint runs dequantized on the CPU
kit = LayerKit(shard=Shard(rank, world), quantization=scheme and replace(scheme, dequantize=True))
model = MoeForCausalLM(config, TorchAttention(), torch.float32, "cpu", kit=kit)
model.load_weights(load_file(f"{directory}/model.safetensors").items())
block = next(m for m in model.modules() if isinstance(m, SparseMoeBlock))
full_inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
assert block.experts.gate_up_proj.shape[1] == 2 * full_inter // world
tokens = torch.load(f"{directory}/tokens.pt")
n, block_size = len(tokens), 4
blocks = -(-n // block_size)
attn = model.model.layers[0].self_attn
kv_caches = [torch.zeros(2, blocks, block_size, attn.num_kv_heads, attn.head_dim) for _ in model.model.layers]
meta = AttentionMetadata(
    slot_mapping=torch.arange(n), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
    seq_lens=torch.tensor([n], dtype=torch.int32), block_tables=torch.arange(blocks, dtype=torch.int32)[None],
    num_decodes=0, max_query_len=n, max_seq_len=n, query_lens_cpu=[n], seq_lens_cpu=[n],
)
with torch.inference_mode():
    logits = model.compute_logits(model(tokens, torch.arange(n), kv_caches, meta))
if rank == 0:
    torch.save(logits, f"{directory}/logits.pt")
torch.distributed.destroy_process_group()
"""

CONFIGS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        vocab_size=301, hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, mlp_only_layers=[1],
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=301, hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    ),
    # each rank's share of o_proj's inputs (4 x 64 / 2) and of the experts' (256 / 2) is one 128-wide
    # block of FP8 scales; hidden 64 is one short block
    "qwen3_moe-fp8-block": lambda: transformers.Qwen3MoeConfig(
        vocab_size=301, hidden_size=64, moe_intermediate_size=256, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=128,
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_two_ranks_give_transformers_logits(family, tmp_path):
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    hf.save_pretrained(tmp_path)
    if family.endswith("fp8-block"):  # ranks read the FP8 checkpoint; transformers the dequantized one
        write_fp8_moe_checkpoint(tmp_path, "hf-block", tmp_path / "fp8", tmp_path / "reference")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "reference", dtype=torch.float32
        ).eval()
        tmp_path = tmp_path / "fp8"
    tokens = torch.randint(0, 301, (11,))
    torch.save(tokens, tmp_path / "tokens.pt")
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    init_file = tmp_path / "rendezvous"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(rank), "2", str(init_file), str(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    ours = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        expected = hf(tokens[None]).logits[0]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
