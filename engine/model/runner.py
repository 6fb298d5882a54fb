"""ModelRunner: turns a scheduled batch into flat tensors, runs the model, samples next tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.core.scheduler import ScheduledSeq
from engine.model.attention import AttentionMetadata
from engine.model.cuda_graphs import DecodeCudaGraphs
from engine.outputs import TokenLogprob
from engine.sampling.sampler import Sampler, SamplingRow

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """Sampled tokens, aligned with the scheduled sequences that completed their prompt this step."""

    seqs: list[ScheduledSeq]
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, block_size: int) -> None:
        self.model = model
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        self.kv_caches: list[torch.Tensor] = []
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}  # seeded requests' own RNGs
        self.cuda_graphs: DecodeCudaGraphs | None = None  # set by capture_cuda_graphs
        if device.type == "cuda":  # Triton RMSNorm / rotary / SiLU-mul behind the same modules
            from engine.kernels.fused_layers import install_fused_layers

            install_fused_layers(model)

    def capture_cuda_graphs(self, max_batch_size: int, max_model_len: int) -> None:
        """Once the KV cache is allocated for good: capture decode steps as CUDA graphs."""
        self.cuda_graphs = DecodeCudaGraphs(
            self.model, self.kv_caches, min(max_batch_size, 512), max_model_len, self.block_size,
            self.model.config.hidden_size, self.dtype, self.device,
        )  # fmt: skip
        self.cuda_graphs.capture()

    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

    def profile_peak_activation_bytes(self, num_tokens: int, max_seq_len: int | None = None) -> int:
        """Run one prefill of num_tokens dummy tokens, in sequences of at most max_seq_len (positions past
        the rotary table would read out of bounds); return the activation memory it peaked at."""
        from engine.core.sequence import Sequence
        from engine.sampling.params import SamplingParams

        seq_len = min(num_tokens, max_seq_len or num_tokens)
        lengths = [min(seq_len, num_tokens - start) for start in range(0, num_tokens, seq_len)]
        blocks = [-(-n // self.block_size) for n in lengths]
        self.allocate_kv_cache(sum(blocks))
        batch = []
        for i, (n, b) in enumerate(zip(lengths, blocks, strict=True)):
            seq = Sequence(f"profile-{i}", [0] * n, SamplingParams(temperature=0.0))
            seq.block_table = list(range(sum(blocks[:i]), sum(blocks[:i]) + b))
            batch.append(ScheduledSeq(seq, n))
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.execute(batch, set())
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        self.kv_caches = []
        torch.cuda.empty_cache()
        return peak

    def generator_for(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self.generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self.generators[request_id] = gen
        return gen

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def build_metadata(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        num_decodes = 0
        for s in batch:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(s.num_new_tokens)
            seq_lens.append(end)
            if s.num_new_tokens == 1 and len(query_lens) == num_decodes + 1:
                num_decodes += 1
        max_blocks = max(len(s.seq.block_table) for s in batch)
        tables = [s.seq.block_table + [0] * (max_blocks - len(s.seq.block_table)) for s in batch]
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)

        def dev(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=dev(slots, torch.int64),
            query_start_loc=dev(qsl, torch.int32),
            seq_lens=dev(seq_lens, torch.int32),
            block_tables=dev(tables, torch.int32),
            num_decodes=num_decodes,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        return dev(input_ids, torch.int64), dev(positions, torch.int64), meta

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq], eos_token_ids: set[int]) -> StepResult:
        input_ids, positions, meta = self.build_metadata(batch)
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(meta):
            hidden = self.cuda_graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        # Only sequences whose prompt is complete need logits: the last token of each.
        sample_idx = [i for i, s in enumerate(batch) if s.completes_prompt]
        done = [batch[i] for i in sample_idx]
        if not done:
            return StepResult([], [], [])
        qsl = [0]
        for n in meta.query_lens_cpu:
            qsl.append(qsl[-1] + n)
        rows_idx = torch.tensor([qsl[i + 1] - 1 for i in sample_idx], device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows_idx))
        rows = [
            SamplingRow(
                params=s.seq.params,
                prompt_token_ids=s.seq.prompt_token_ids,
                output_token_ids=s.seq.output_token_ids,
                generator=self.generator_for(s.seq.request_id, s.seq.params.seed),
                eos_token_ids=eos_token_ids,
            )
            for s in done
        ]
        result = self.sampler(logits, rows)
        return StepResult(done, result.token_ids, result.logprobs)
