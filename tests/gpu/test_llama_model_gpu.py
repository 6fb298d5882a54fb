"""On CUDA in bfloat16, our Llama-family model's logits are as close to transformers' float32 logits as
transformers' own bfloat16 run is. Skips without CUDA."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen3Config

from engine.config import EngineConfig
from engine.model.attention import AttentionMetadata, TorchAttention
from engine.model.loader import LoadedModel, default_attention_backend, load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BLOCK_SIZE = 16
VOCAB = 512
SHAPE = dict(
    vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, max_position_embeddings=512
)
CONFIGS = {
    "llama": lambda: LlamaConfig(
        **SHAPE, num_attention_heads=4, num_key_value_heads=1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
    ),
    "qwen3": lambda: Qwen3Config(
        **SHAPE, num_attention_heads=4, num_key_value_heads=2, head_dim=128, tie_word_embeddings=True
    ),
}  # fmt: skip


def save_tiny_checkpoint(family: str, directory) -> torch.nn.Module:
    hf = AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)
    hf.save_pretrained(directory)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", unk_token="t0").save_pretrained(directory)
    return hf


def run_sequence(loaded: LoadedModel, tokens: list[int], prompt_len: int) -> torch.Tensor:
    """Prefill tokens[:prompt_len], then feed the rest one at a time; logits for every position."""
    shape = (2, 64, BLOCK_SIZE, loaded.num_kv_heads, loaded.head_dim)
    caches = [torch.zeros(shape, dtype=loaded.dtype, device="cuda") for _ in range(loaded.num_layers)]
    table = torch.randperm(64)[: -(-len(tokens) // BLOCK_SIZE)].to(torch.int32)
    out = []
    chunks = [(0, prompt_len)] + [(i, i + 1) for i in range(prompt_len, len(tokens))]
    with torch.inference_mode():
        for start, end in chunks:
            pos = torch.arange(start, end)
            slots = table[pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
            meta = AttentionMetadata(
                slot_mapping=slots.cuda(),
                query_start_loc=torch.tensor([0, end - start], dtype=torch.int32, device="cuda"),
                seq_lens=torch.tensor([end], dtype=torch.int32, device="cuda"),
                block_tables=table[None].cuda(),
                num_decodes=int(end - start == 1),
                max_query_len=end - start,
                max_seq_len=end,
                query_lens_cpu=[end - start],
                seq_lens_cpu=[end],
            )
            ids = torch.tensor(tokens[start:end], device="cuda")
            out.append(loaded.model.compute_logits(loaded.model(ids, pos.cuda(), caches, meta)))
    return torch.cat(out)


@pytest.mark.parametrize("backend", ["torch", "default"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_bf16_logits_on_cuda_match_transformers(family, backend, tmp_path):
    hf32 = save_tiny_checkpoint(family, tmp_path)
    attn = TorchAttention() if backend == "torch" else default_attention_backend(torch.device("cuda"))
    loaded = load_model(EngineConfig(model=str(tmp_path), device="auto", dtype="auto"), attn)
    assert loaded.device.type == "cuda" and loaded.dtype == torch.bfloat16
    tokens = torch.randint(2, VOCAB, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = run_sequence(loaded, tokens, prompt_len=90)
    assert torch.isfinite(ours).all()

    hf32 = hf32.cuda()
    hf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda().eval()
    with torch.inference_mode():
        reference = hf32(torch.tensor([tokens], device="cuda")).logits[0].float()
        hf_bf16 = hf16(torch.tensor([tokens], device="cuda")).logits[0].float()
    our_err = (ours - reference).abs().max().item()
    hf_err = (hf_bf16 - reference).abs().max().item()
    assert our_err <= 2 * hf_err + 1e-2, f"ours {our_err:.4f} vs transformers bf16 {hf_err:.4f}"
