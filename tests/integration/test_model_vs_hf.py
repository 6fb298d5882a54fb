"""Our Llama-family model, loaded by our loader, gives the logits transformers gives.

Tiny random Llama / Mistral / Qwen2 / Qwen3 / Qwen3-MoE / Mixtral checkpoints are written to disk in the test (sharded
safetensors + tokenizer + generation config), loaded through ``load_model`` and run over a real paged
KV cache (block size 4, scattered blocks) with the torch attention backend: a full prefill, then
greedy decode steps one token at a time. Every step's logits must match transformers' forward over
the whole sequence. The embedded SmolLM2 GGUF gets the same check on a chat prompt.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from engine.config import EngineConfig
from engine.model.attention import AttentionMetadata
from engine.model.loader import LoadedModel, load_model
from engine.model.sources import EMBEDDED_PACKAGE, resolve_model_source

BLOCK_SIZE = 4
ATOL = 1e-4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ---------------------------------------------------------------- a paged cache for a few sequences


@dataclass
class PagedSequence:
    """One sequence's tokens and block table; blocks come from a shuffled pool so slots are scattered."""

    block_table: list[int]
    tokens: list[int] = field(default_factory=list)


class PagedCache:
    def __init__(self, loaded: LoadedModel, num_blocks: int, seed: int = 0) -> None:
        shape = (2, num_blocks, BLOCK_SIZE, loaded.num_kv_heads, loaded.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=loaded.dtype) for _ in range(loaded.num_layers)]
        self.free_blocks = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()

    def new_sequence(self, max_len: int) -> PagedSequence:
        n = -(-max_len // BLOCK_SIZE)
        table, self.free_blocks = self.free_blocks[:n], self.free_blocks[n:]
        return PagedSequence(table)

    def batch(
        self, steps: list[tuple[PagedSequence, list[int]]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flat input ids, positions and metadata for appending `new` tokens to each sequence."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for seq, new in steps:
            start = len(seq.tokens)
            seq.tokens.extend(new)
            ids.extend(new)
            for pos in range(start, start + len(new)):
                positions.append(pos)
                slots.append(seq.block_table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        query_lens = [len(new) for _, new in steps]
        seq_lens = [len(seq.tokens) for seq, _ in steps]
        width = max(len(seq.block_table) for seq, _ in steps)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq, _ in steps]
        num_decodes = 0
        while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
            num_decodes += 1
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(
                [0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32
            ),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            num_decodes=num_decodes,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        return torch.tensor(ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64), meta

    def run(self, loaded: LoadedModel, steps: list[tuple[PagedSequence, list[int]]]) -> torch.Tensor:
        """Logits for every new token of the step, [num_new_tokens, vocab]."""
        ids, positions, meta = self.batch(steps)
        with torch.inference_mode():
            hidden = loaded.model(ids, positions, self.kv_caches, meta)
            return loaded.model.compute_logits(hidden)


def hf_logits(hf_model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def assert_prefill_and_decode_match(
    loaded: LoadedModel, hf_model: torch.nn.Module, prompt: list[int], steps: int
):
    cache = PagedCache(loaded, num_blocks=64)
    seq = cache.new_sequence(len(prompt) + steps)
    ours = [cache.run(loaded, [(seq, prompt)])]  # every prompt position, not only the last
    for _ in range(steps):
        ours.append(cache.run(loaded, [(seq, [int(ours[-1][-1].argmax())])]))
    ours_all = torch.cat(ours)
    reference = hf_logits(hf_model, seq.tokens)[: len(seq.tokens)]
    assert ours_all.dtype == torch.float32
    assert ours_all.shape == reference.shape
    torch.testing.assert_close(ours_all, reference, atol=ATOL, rtol=0)
    # greedy tokens agree with transformers' argmax at each generated position
    assert seq.tokens[len(prompt) :] == reference[len(prompt) - 1 : -1].argmax(-1).tolist()


# ---------------------------------------------------------------- tiny random checkpoints on disk


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(
        ["The quick brown fox jumps over the lazy dog; paged attention in blocks."] * 4, trainer
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


COMMON = dict(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256
)

TINY_CONFIGS = {
    # biases everywhere, Llama 3.1 rope scaling, GQA 2
    "llama": lambda: LlamaConfig(
        **COMMON,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    # head_dim 32 != hidden / heads = 16, GQA 4, sliding window (longer than our sequences)
    "mistral": lambda: MistralConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=128
    ),
    # q/k/v biases, o without; untied head
    "qwen2": lambda: Qwen2Config(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False
    ),
    # q/k RMSNorm per head, tied embeddings, head_dim 32, YaRN rope
    "qwen3": lambda: Qwen3Config(
        **COMMON,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    # 8 experts, top 2 without renormalisation; layer 1 keeps a dense MLP (mlp_only_layers)
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **COMMON,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        norm_topk_prob=False,
        mlp_only_layers=[1],
    ),
    # 4 experts, top 2 (always renormalised), untied head
    "mixtral": lambda: MixtralConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
    ),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises biases to 0 and norms to 1; make every weight matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.08 * noise)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny_checkpoint(request, tmp_path_factory, tokenizer) -> tuple[Path, torch.nn.Module]:
    family = request.param
    hf_model = AutoModelForCausalLM.from_config(TINY_CONFIGS[family](), dtype=torch.float32).eval()
    randomize(hf_model, seed=len(family))
    directory = tmp_path_factory.mktemp("ckpt") / f"tiny-{family}"
    hf_model.save_pretrained(directory, max_shard_size="100KB")  # several shards + an index
    tokenizer.save_pretrained(directory)
    GenerationConfig(eos_token_id=[2, 4], bos_token_id=1).save_pretrained(directory)
    return directory, hf_model


def load_on_cpu(model: str | None) -> LoadedModel:
    # float32, like the reference: "auto" is bfloat16 on CPUs with native bf16 matmuls
    return load_model(EngineConfig(model=model, device="cpu", dtype="float32"))


def test_tiny_checkpoint_is_sharded(tiny_checkpoint):
    directory, _ = tiny_checkpoint
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("*.safetensors"))) > 1


def test_tiny_model_prefill_and_decode_match_transformers(tiny_checkpoint, tokenizer):
    directory, hf_model = tiny_checkpoint
    loaded = load_on_cpu(str(directory))
    prompt = tokenizer("The quick brown fox jumps over").input_ids
    assert len(prompt) > 2 * BLOCK_SIZE
    assert_prefill_and_decode_match(loaded, hf_model, prompt, steps=6)


def test_tiny_model_loaded_facts(tiny_checkpoint):
    directory, hf_model = tiny_checkpoint
    loaded = load_on_cpu(str(directory))
    config = hf_model.config
    assert loaded.name == directory.name
    assert loaded.eos_token_ids == {2, 4}  # generation_config's list plus the tokenizer's </s> (2)
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert loaded.max_model_len == 256
    assert loaded.num_layers == 2
    assert loaded.num_kv_heads == config.num_key_value_heads
    assert loaded.head_dim == (getattr(config, "head_dim", None) or 16)
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATE


def test_chunked_prefill_and_mixed_batch_match_transformers(tiny_checkpoint, tokenizer):
    """Two sequences share each step: one decodes while the other prefills in chunks on top of its
    cached prefix; both still match transformers."""
    directory, hf_model = tiny_checkpoint
    loaded = load_on_cpu(str(directory))
    cache = PagedCache(loaded, num_blocks=64, seed=1)
    a, b = cache.new_sequence(32), cache.new_sequence(32)
    prompt_a = tokenizer("paged attention in blocks").input_ids
    prompt_b = tokenizer("The lazy dog; the quick brown fox jumps over the dog").input_ids
    logits_a = [cache.run(loaded, [(a, prompt_a)])]
    half = len(prompt_b) // 2
    step = cache.run(loaded, [(a, [int(logits_a[-1][-1].argmax())]), (b, prompt_b[:half])])
    logits_a.append(step[:1])
    logits_b = [step[1:]]
    step = cache.run(loaded, [(a, [int(logits_a[-1][-1].argmax())]), (b, prompt_b[half:])])
    logits_a.append(step[:1])
    logits_b.append(step[1:])
    for seq, ours in ((a, logits_a), (b, logits_b)):
        torch.testing.assert_close(torch.cat(ours), hf_logits(hf_model, seq.tokens), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- the embedded SmolLM2 (GGUF)


@pytest.mark.slow
def test_embedded_smollm2_matches_transformers():
    # The first load on a machine converts the GGUF and caches it as a HF directory (shared with the
    # engine tests, so the ~20 s conversion happens once); later loads read the cache. Either way the
    # result must match transformers' own conversion of the file.
    source = resolve_model_source(None)
    assert source.gguf_file is None and (source.directory / "model.safetensors").is_file()
    loaded = load_on_cpu(None)
    assert loaded.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert loaded.dtype == torch.float32
    assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") in loaded.eos_token_ids

    # the oracle: transformers' own GGUF conversion of the same file
    package_dir = Path(next(iter(importlib.util.find_spec(EMBEDDED_PACKAGE).submodule_search_locations)))
    gguf_file = next(package_dir.glob("*.gguf")).name
    hf_model = AutoModelForCausalLM.from_pretrained(
        package_dir, gguf_file=gguf_file, dtype=torch.float32
    ).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert_prefill_and_decode_match(loaded, hf_model, prompt, steps=3)
