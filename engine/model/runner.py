"""ModelRunner: turns a scheduled batch into flat tensors, runs the model, samples next tokens."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.core.scheduler import ScheduledSeq
from engine.device_copy import to_device
from engine.distributed.messages import Op, StepArrays, control
from engine.model.attention import AttentionMetadata, longest_first
from engine.model.block_table_rows import BlockTableRows
from engine.model.cuda_graphs import DecodeCudaGraphs
from engine.model.input_staging import InputStaging
from engine.model.piecewise_cuda_graphs import PiecewiseCudaGraphs
from engine.model.prompt_logprobs import PendingPromptLogprobs, launch_prompt_logprobs, prompt_logprob_rows
from engine.model.step_timer import StepTimer
from engine.outputs import TokenLogprob
from engine.sampling.sampler import PendingSample, Sampler, SamplingRow, seeded_generator

if TYPE_CHECKING:
    from engine.distributed.driver import TensorParallelDriver
    from engine.structured.bitmask import BitmaskBuilder

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """Sampled tokens, aligned with the scheduled sequences that completed their prompt this step."""

    seqs: list[ScheduledSeq]
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class LaunchedStep:
    """A step queued on the device: its sampled tokens exist there before the host has them.

    The next step may already be built from it: a sequence whose newest token is still in flight
    reads that token from `sample.token_ids` on the device (row `row_of[request_id]`).
    """

    def __init__(self, seqs: list[ScheduledSeq], sample: PendingSample) -> None:
        self.seqs = seqs
        self.sample = sample
        # The step's shape, for the step trace: decodes, tokens in all, which CUDA graphs ran it (None: eager).
        self.num_decodes = 0
        self.num_tokens = 0
        self.graphed: str | None = None
        # With ModelRunner.time_steps: the step's forward and sampling time, and the context tokens its
        # decodes attended over (what the engine's step cost model learns from).
        self.timer: StepTimer | None = None
        self.decode_context_tokens = 0
        self.row_of = {s.seq.request_id: i for i, s in enumerate(seqs)}
        self.prompt_logprobs: PendingPromptLogprobs | None = None  # for requests that asked (rare)
        self.trace: dict | None = None  # this step's StepTrace row, when tracing

    def result(self) -> StepResult:
        """Wait for the tokens (the GPU may still be running later steps queued behind this one)."""
        sampled = self.sample.result()
        return StepResult(self.seqs, sampled.token_ids, sampled.logprobs)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
        tp: TensorParallelDriver | None = None,
        kv_cache_dtype: torch.dtype | None = None,
        time_steps: bool = False,
    ) -> None:
        self.model = model
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.kv_cache_dtype = kv_cache_dtype or dtype  # float8 e4m3 under --kv-cache-dtype fp8
        self.device = device
        self.block_size = block_size
        self.kv_caches: list[torch.Tensor] = []
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}  # seeded requests' own RNGs
        self._constant_rows: dict[str, SamplingRow] = {}  # per request, for rows that never change
        self.block_tables = BlockTableRows(256, 64)  # grows to the sequences and lengths served
        self.staging = InputStaging(device) if device.type == "cuda" else None
        self.cuda_graphs: DecodeCudaGraphs | None = None  # set by capture_cuda_graphs
        self.piecewise_graphs: PiecewiseCudaGraphs | None = None  # likewise, for steps with prompt tokens
        self.bitmasks: BitmaskBuilder | None = None  # made at the first step with a grammar
        # Rank 0 under tensor parallelism: the other ranks repeat this runner's public calls (tell_ranks).
        self.tp = tp
        # Time every step (a StepTimer on each LaunchedStep): for --max-prefill-tokens-while-decoding auto
        # and the step trace. Two CUDA events a step otherwise not spent.
        self.time_steps = time_steps

    def tell_ranks(self, op: Op, *args: int) -> None:
        """Under tensor parallelism, have the other ranks make the same call on their runners."""
        if self.tp is not None:
            self.tp.send(control(op, *args))

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do without them)."""
        if self.tp is not None:
            self.tp.close()

    def capture_cuda_graphs(
        self, max_batch_size: int, max_model_len: int, max_piecewise_tokens: int = 0
    ) -> None:
        """Once the KV cache is allocated for good: capture decode steps as CUDA graphs, and steps of up to
        max_piecewise_tokens tokens (0: none) in pieces between attention calls; one memory pool."""
        self.tell_ranks(Op.CAPTURE_CUDA_GRAPHS, max_batch_size, max_model_len, max_piecewise_tokens)
        self.cuda_graphs = DecodeCudaGraphs(
            self.model, self.kv_caches, min(max_batch_size, 512), max_model_len, self.block_size,
            self.model.config.hidden_size, self.dtype, self.device,
        )  # fmt: skip
        self.cuda_graphs.capture()
        if max_piecewise_tokens > 0:
            self.piecewise_graphs = PiecewiseCudaGraphs(
                self.model, self.kv_caches, max_piecewise_tokens, self.dtype, self.device
            )
            self.piecewise_graphs.capture(self.cuda_graphs.pool)

    def graphs_for(
        self, meta: AttentionMetadata, num_tokens: int
    ) -> DecodeCudaGraphs | PiecewiseCudaGraphs | None:
        """The captured graphs that run this step (a whole decode forward where one fits), None: eager."""
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(meta):
            return self.cuda_graphs
        if self.piecewise_graphs is not None and self.piecewise_graphs.can_run(num_tokens):
            return self.piecewise_graphs
        return None

    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.kv_cache_dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.tell_ranks(Op.ALLOCATE_KV_CACHE, num_blocks)
        self._allocate_kv_cache(num_blocks)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device) for _ in range(self.num_layers)
        ]

    def profile_peak_activation_bytes(
        self, num_tokens: int, max_seq_len: int | None = None, num_sample_rows: int = 1
    ) -> int:
        """Run one prefill of num_tokens dummy tokens, in sequences of at most max_seq_len (positions past
        the rotary table would read out of bounds), then sample num_sample_rows rows (logits and the
        sampler's sort for top_p are the largest temporaries of a decode step of max_num_seqs rows);
        return the memory the two peaked at."""
        from engine.sampling.params import SamplingParams

        seq_len = min(num_tokens, max_seq_len or num_tokens)
        lengths = [min(seq_len, num_tokens - start) for start in range(0, num_tokens, seq_len)]
        self._allocate_kv_cache(sum(-(-n // self.block_size) for n in lengths))
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._run_dummy("profile", [(n, n, 0.0) for n in lengths])
        with torch.inference_mode():
            hidden = torch.zeros(
                num_sample_rows, self.model.config.hidden_size, dtype=self.dtype, device=self.device
            )
            row = SamplingRow(SamplingParams(temperature=0.7, top_p=0.9), [], [], None, set())
            logits = self.model.compute_logits(hidden)  # None on tensor-parallel ranks but the first
            if logits is not None:
                self.sampler.sample(logits, [row] * num_sample_rows).result()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        self.kv_caches = []
        torch.cuda.empty_cache()
        return peak

    def warm_up(self) -> None:
        """One eager step mixing decodes with a prefill that continues a cached prefix, greedy and
        sampled rows: the first such step of real traffic then compiles and autotunes nothing."""
        self.tell_ranks(Op.WARM_UP)
        bs = self.block_size
        shapes = [(bs + 3, 1, 0.0), (5, 1, 0.7), (3 * bs + 1, 2 * bs + 1, 0.0)]  # tokens, new, temperature
        if sum(-(-n // bs) for n, _, _ in shapes) > self.kv_caches[0].shape[1]:
            return
        self._run_dummy("warm-up", shapes)

    def _run_dummy(self, name: str, shapes: list[tuple[int, int, float]]) -> None:
        """Run one start-up step of sequences of token 0, one per (tokens, new tokens, temperature), on
        consecutive blocks from block 0; each has all but its new tokens already computed."""
        from engine.core.sequence import Sequence
        from engine.sampling.params import SamplingParams

        batch, next_block = [], 0
        for i, (num_tokens, num_new, temperature) in enumerate(shapes):
            seq = Sequence(f"{name}-{i}", [0] * num_tokens, SamplingParams(temperature=temperature))
            num_blocks = -(-num_tokens // self.block_size)
            seq.block_table = list(range(next_block, next_block + num_blocks))
            next_block += num_blocks
            seq.num_computed_tokens = num_tokens - num_new
            batch.append(ScheduledSeq(seq, num_new))
        self.launch(batch, set(), tell_ranks=False).result()  # every rank runs its own dummy steps
        for s in batch:
            self.release(s.seq.request_id)

    def generator_for(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self.generators.get(request_id)
        if gen is None:
            gen = seeded_generator(seed, self.device)
            self.generators[request_id] = gen
        return gen

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
        self._constant_rows.pop(request_id, None)
        self.block_tables.release(request_id)

    def _sampling_row(self, seq, eos_token_ids: set[int]) -> SamplingRow:
        p = seq.params
        # Copying a sequence's token lists costs O(length) per step: only rows that read them get them.
        wants_outputs = p.needs_penalties or p.min_tokens > 0
        if not wants_outputs:  # the row never changes: build it once per request, not once per step
            row = self._constant_rows.get(seq.request_id)
            if row is not None and row.params is p and row.eos_token_ids is eos_token_ids:
                return row
        row = SamplingRow(
            params=p,
            prompt_token_ids=seq.prompt_token_ids if p.needs_penalties else [],
            output_token_ids=seq.output_token_ids if wants_outputs else [],
            generator=self.generator_for(seq.request_id, p.seed),
            eos_token_ids=eos_token_ids,
        )
        if not wants_outputs:
            self._constant_rows[seq.request_id] = row
        return row

    def build_metadata(
        self, batch: list[ScheduledSeq], previous: LaunchedStep | None = None, tell_ranks: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's flat inputs on the device. A decode whose input token is still in flight (sampled
        by `previous`, which the host has not read yet: it is past the end of token_ids) takes it from
        previous's device tensor, so building this step never waits for the last one. Under tensor
        parallelism the other ranks get the same inputs (the host arrays as one message, then any such
        tokens by broadcast)."""
        arrays, fed_rows, fed_from = self.step_arrays(batch, previous)
        tell = tell_ranks and self.tp is not None
        if tell:
            self.tp.send(arrays.pack())
        extra = (
            [np.asarray(fed_rows, dtype=np.int64), np.asarray(fed_from, dtype=np.int64)] if fed_rows else []
        )
        ids, positions, meta, on_device = self.device_inputs(arrays, extra)
        if fed_rows:
            assert previous is not None
            rows, src = on_device
            ids.index_copy_(0, rows, previous.sample.token_ids.index_select(0, src))
            if tell:
                self.tp.broadcast_input_ids(ids)
        return ids, positions, meta

    def step_arrays(
        self, batch: list[ScheduledSeq], previous: LaunchedStep | None = None
    ) -> tuple[StepArrays, list[int], list[int]]:
        """The step's inputs as host arrays, and which decode rows take their input token from
        `previous`'s sampled tokens (and from which of its rows)."""
        # Per-token arrays are computed with numpy from per-sequence values: this runs every step for
        # hundreds of sequences, so Python loops over tokens would cost more than the GPU's work.
        bs = self.block_size
        query_lens = [s.num_new_tokens for s in batch]
        starts = [s.seq.num_computed_tokens for s in batch]
        seq_lens = [start + n for start, n in zip(starts, query_lens, strict=True)]
        num_decodes = 0
        while num_decodes < len(batch) and query_lens[num_decodes] == 1:
            num_decodes += 1
        input_ids: list[int] = []
        fed_rows: list[int] = []  # decode rows whose input is previous's sampled token
        fed_from: list[int] = []
        for i in range(num_decodes):
            tokens, start = batch[i].seq.token_ids, starts[i]
            if start < len(tokens):
                input_ids.append(tokens[start])
                continue
            row = previous.row_of.get(batch[i].seq.request_id) if previous is not None else None
            if row is None:
                raise RuntimeError(f"{batch[i].seq!r}: its input token was never sampled")
            input_ids.append(0)  # overwritten on the device
            fed_rows.append(i)
            fed_from.append(row)
        for s, start, n in zip(
            batch[num_decodes:], starts[num_decodes:], query_lens[num_decodes:], strict=True
        ):
            if start + n > len(s.seq.token_ids):  # only a decode's input may be in flight
                raise RuntimeError(f"{s.seq!r}: a prefill chunk reaches past its known tokens")
            input_ids.extend(s.seq.token_ids[start : start + n])

        q_lens = np.asarray(query_lens, dtype=np.int64)
        qsl = np.zeros(len(batch) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        seq_of_token = np.repeat(np.arange(len(batch)), q_lens)
        positions = np.arange(qsl[-1], dtype=np.int64) + np.repeat(
            np.asarray(starts, dtype=np.int64) - qsl[:-1], q_lens
        )
        tables = self.block_tables.gather([s.seq for s in batch])
        slots = tables[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs

        sample_rows = np.empty(0, dtype=np.int64)
        prompt_rows = np.empty((0, 2), dtype=np.int64)
        if self.tp is not None:  # the other ranks compute these rows' logits too (rank 0's in _sample)
            sample_rows = qsl[1:][np.asarray([s.completes_prompt for s in batch], dtype=bool)] - 1
            spans = prompt_logprob_rows(batch, query_lens, num_decodes)
            prompt_rows = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        arrays = StepArrays(
            slot_mapping=slots,
            query_start_loc=qsl.astype(np.int32),
            seq_lens=np.asarray(seq_lens, dtype=np.int32),
            block_tables=tables,
            input_ids=np.asarray(input_ids, dtype=np.int64),
            positions=positions,
            sample_rows=sample_rows,
            prompt_rows=prompt_rows,
            num_decodes=num_decodes,
            fed=bool(fed_rows),
        )
        return arrays, fed_rows, fed_from

    def device_inputs(
        self, arrays: StepArrays, extra: list[np.ndarray] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[torch.Tensor]]:
        """input_ids, positions and the attention metadata on the device, plus `extra` arrays copied
        along with them."""
        order = longest_first(arrays.seq_lens[: arrays.num_decodes])  # the decode kernel's program order
        host = [arrays.slot_mapping, arrays.query_start_loc, arrays.seq_lens, arrays.block_tables,
                arrays.input_ids, arrays.positions, order, *(extra or [])]  # fmt: skip
        if self.staging is not None:  # CUDA: two copies from long-lived pinned buffers
            on_device = self.staging.to_device(host)
        else:
            on_device = [torch.from_numpy(a) for a in host]
        slot_mapping, query_start_loc, seq_lens_dev, block_tables, ids, positions_dev, decode_order = (
            on_device[:7]
        )
        qsl = arrays.query_start_loc
        query_lens = (qsl[1:] - qsl[:-1]).tolist()
        seq_lens = arrays.seq_lens.tolist()
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens_dev,
            block_tables=block_tables,
            num_decodes=arrays.num_decodes,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            decode_order=decode_order,
        )
        return ids, positions_dev, meta, on_device[7:]

    def execute(self, batch: list[ScheduledSeq], eos_token_ids: set[int]) -> StepResult:
        """Run one step and wait for its tokens."""
        return self.launch(batch, eos_token_ids).result()

    @torch.inference_mode()
    def launch(
        self,
        batch: list[ScheduledSeq],
        eos_token_ids: set[int],
        previous: LaunchedStep | None = None,
        tell_ranks: bool = True,
        with_grammars: bool = False,
        before_sampling: Callable[[], None] | None = None,
    ) -> LaunchedStep:
        """Queue one step (forward, logits, sampling, host copy of the tokens) without waiting for it.
        with_grammars: some sequence in the engine has a grammar (else none is looked for).
        before_sampling: called once the forward and logits are queued, before the sampler is built (the
        step pipeline reads the previous step's tokens there, so grammars advance while the device runs
        this step's forward)."""
        input_ids, positions, meta = self.build_metadata(batch, previous, tell_ranks)
        graphs = self.graphs_for(meta, int(input_ids.shape[0]))
        timer = StepTimer(self.device) if self.time_steps else None
        hidden = self.forward(input_ids, positions, meta, graphs)
        step = self._sample(batch, hidden, meta, eos_token_ids, with_grammars, before_sampling)
        if timer is not None:
            timer.stop()
            step.timer = timer
            step.decode_context_tokens = sum(meta.seq_lens_cpu[: meta.num_decodes])
        step.prompt_logprobs = launch_prompt_logprobs(
            batch, hidden, meta.query_lens_cpu, meta.num_decodes, self.model.compute_logits
        )
        step.num_decodes, step.num_tokens = meta.num_decodes, int(input_ids.shape[0])
        step.graphed = None if graphs is None else ("decode" if graphs is self.cuda_graphs else "piecewise")
        return step

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        graphs: DecodeCudaGraphs | PiecewiseCudaGraphs | None,
    ) -> torch.Tensor:
        if graphs is not None:
            return graphs.run(input_ids, positions, meta)
        return self.model(input_ids, positions, self.kv_caches, meta)

    def _sample(
        self,
        batch: list[ScheduledSeq],
        hidden: torch.Tensor,
        meta: AttentionMetadata,
        eos_token_ids: set[int],
        with_grammars: bool = False,
        before_sampling: Callable[[], None] | None = None,
    ) -> LaunchedStep:
        """LM head and sampler on the last token of each sequence whose prompt is complete."""
        # Only sequences whose prompt is complete need logits: the last token of each.
        sample_idx = [i for i, s in enumerate(batch) if s.completes_prompt]
        done = [batch[i] for i in sample_idx]
        if not done:
            if before_sampling is not None:
                before_sampling()
            return LaunchedStep([], PendingSample(torch.empty(0, dtype=torch.long, device=self.device)))
        if len(done) == hidden.shape[0]:  # all decodes: every row is a last token
            last_hidden = hidden
        else:
            qsl = [0]
            for n in meta.query_lens_cpu:
                qsl.append(qsl[-1] + n)
            rows_idx = to_device(torch.tensor([qsl[i + 1] - 1 for i in sample_idx]), self.device)
            last_hidden = hidden.index_select(0, rows_idx)
        logits = self.model.compute_logits(last_hidden)
        # Rows before `before_sampling`: a sequence it finishes must not get fresh per-request state. Rows
        # that read token lists never get here with their previous token unread (step pipeline, rule 5).
        rows = [self._sampling_row(s.seq, eos_token_ids) for s in done] if logits is not None else []
        if before_sampling is not None:
            before_sampling()
        if logits is None:  # a tensor-parallel rank but the first: rank 0 samples
            return LaunchedStep(done, PendingSample(torch.empty(0, dtype=torch.long, device=self.device)))
        grammar = None
        if with_grammars:  # (every grammar row's previous token is accepted by now: rule 5)
            # A sequence finished meanwhile (its grammar may be terminated) gets no mask: its token is dropped.
            constrained = [
                (i, s.seq.grammar)
                for i, s in enumerate(done)
                if s.seq.grammar is not None and not s.seq.is_finished
            ]
            if constrained:
                if self.bitmasks is None:
                    from engine.structured.bitmask import BitmaskBuilder  # xgrammar: only when used

                    self.bitmasks = BitmaskBuilder(logits.shape[1], self.device)
                grammar = self.bitmasks.build(constrained)
        return LaunchedStep(done, self.sampler.sample(logits, rows, grammar))
