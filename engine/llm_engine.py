"""LLMEngine: the synchronous heart. Owns the model runner, the scheduler and per-request state;
each `step()` schedules one batch, runs it, and turns sampled tokens into RequestOutput deltas.

How steps are launched and read, async scheduling included (the CUDA default: the next step is queued
on the GPU before this one's tokens are read), is engine/core/step_pipeline.py's business; this file
turns each token read into what the client sees (stop checks, detokenization, metrics).

It is driven by one thread (AsyncEngine's loop); nothing here is thread-safe by itself.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.prefill_cap import StepTimeTarget
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.core.sequence import Sequence
from engine.core.step_cost_model import StepCostModel
from engine.core.step_pipeline import StepPipeline
from engine.detokenizer import IncrementalDetokenizer
from engine.metrics import EngineMetrics
from engine.model.kv_cache_sizing import choose_num_blocks
from engine.model.loader import LoadedModel
from engine.model.piecewise_cuda_graphs import host_bound_tokens
from engine.model.runner import LaunchedStep, ModelRunner
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling.params import SamplingParams
from engine.step_trace import StepTrace
from engine.stop_checker import StopStringChecker, TokenStop, check_token_stop
from engine.structured.compiler import GrammarCompiler
from engine.structured.matcher import GrammarState

log = logging.getLogger(__name__)


@dataclass
class RequestState:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stop_strings: StopStringChecker | None  # None: no stop strings, all text is released as it comes
    first_token_time: float | None = None
    last_token_time: float | None = None
    pending_ids: list[int] = field(default_factory=list)  # sampled this step, not yet reported
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    # With params.prompt_logprobs: filled by position as prefill chunks run, sent with the first output.
    prompt_logprobs: list[TokenLogprob | None] | None = None


class LLMEngine:
    def __init__(
        self, config: EngineConfig, loaded: LoadedModel, metrics: EngineMetrics | None = None
    ) -> None:
        self.config = config
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.max_model_len
        self.eos_token_ids: set[int] = set(loaded.eos_token_ids)
        self.metrics = metrics or EngineMetrics(config.served_model_name or loaded.name)
        self.trace = StepTrace.from_env()
        device = loaded.device.type
        max_batched = config.max_num_batched_tokens_on(device)
        max_num_seqs = config.max_num_seqs_on(device)
        max_prefill_while_decoding = config.max_prefill_tokens_while_decoding_on(device)
        # --max-prefill-tokens-while-decoding auto (a GPU's default): what a step costs, learnt from every step's measured time
        self.step_costs = (
            StepCostModel(
                max_prefill_while_decoding,
                max_batched,
                floor_tokens=config.auto_prefill_floor_on(device),
                decode_share=config.AUTO_PREFILL_DECODE_SHARE,
            )
            if config.prefill_cap_is_auto_on(device)
            else None
        )
        self.runner = ModelRunner(
            loaded.model,
            loaded.num_layers,
            loaded.num_kv_heads,
            loaded.head_dim,
            loaded.dtype,
            loaded.device,
            config.block_size,
            tp=loaded.tp,  # rank 0 under tensor parallelism: the other ranks repeat the runner's calls
            kv_cache_dtype=loaded.kv_cache_dtype,
            time_steps=self.step_costs is not None or self.trace is not None,
        )
        num_blocks = choose_num_blocks(config, self.runner, self.max_model_len, max_batched, max_num_seqs)
        self.runner.allocate_kv_cache(num_blocks)
        if device == "cuda":
            if not config.enforce_eager:
                piecewise_tokens = config.max_piecewise_graph_tokens_on(
                    device, host_bound_tokens(loaded.model, loaded.num_layers)
                )
                self.runner.capture_cuda_graphs(max_num_seqs, self.max_model_len, piecewise_tokens)
            self.runner.warm_up()
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.kv,
            max_num_seqs,
            max_batched,
            self.max_model_len,
            max_prefill_while_decoding
            if self.step_costs is None
            else StepTimeTarget(self.step_costs, config.decode_step_target_ms),
        )
        self.requests: dict[str, RequestState] = {}
        # Single tokens' texts by skip_special_tokens, shared by every request's detokenizer (at most one
        # entry per vocabulary id: a few MB for a 150k vocabulary).
        self.token_texts: dict[bool, dict[int, str]] = {True: {}, False: {}}
        # Inter-token gaps of the tokens read in this step: the histogram takes them at once, per step.
        self.inter_token_gaps: list[float] = []
        # Structured outputs: grammars compile on their own threads (the HTTP layer awaits them before
        # adding a request); the bitmask covers the logits' full width, padding included.
        self.vocab_size: int = loaded.hf_config.vocab_size
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids))
        # The token ids that end the thinking section, after which a grammar with `after_reasoning` starts
        # to apply. None = the tokens of "</think>" (qwen3 / deepseek_r1 style reasoning).
        self.reasoning_end_token_ids: tuple[int, ...] | None = None
        self.async_scheduling = config.async_scheduling_on(device)
        self.pipeline = StepPipeline(
            self.scheduler,
            self.runner,
            self.eos_token_ids,
            self.async_scheduling,
            self._accept_token,
            self._store_prompt_logprobs,
            self.trace,
            self.step_costs,
        )
        m = self.metrics
        m.labels(m.kv_cache_blocks_total).set(num_blocks)
        m.set_cache_config(
            config.block_size,
            num_blocks,
            config.enable_prefix_caching,
            config.gpu_memory_utilization,
            config.kv_cache_dtype,
        )
        log.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB), max_num_batched_tokens=%d, "
            "max_prefill_tokens_while_decoding=%s",
            num_blocks,
            config.block_size,
            num_blocks * self.runner.bytes_per_block() / 2**20,
            max_batched,
            (
                f"auto (steps within {config.decode_step_target_ms:g} ms, at least "
                f"{self.step_costs.floor_tokens}; {max_prefill_while_decoding} until measured)"
                if self.step_costs is not None
                else max_prefill_while_decoding
            ),
        )
        self._update_gauges()

    def close(self) -> None:
        """Stop the grammar compiler's threads and the other tensor-parallel ranks, if any (idempotent)."""
        self.grammars.shutdown()
        self.runner.close()

    # --- requests in and out ---------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> None:
        """cache_salt: prefix-cache blocks are shared only between requests with the same salt (vLLM's)."""
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        seq = Sequence(request_id, prompt_token_ids, params, cache_salt)
        if params.structured is not None:
            # A cache hit when the HTTP layer compiled it first; raises GrammarError otherwise.
            compiled = self.grammars.compile(params.structured)
            after = self._reasoning_end_ids() if params.structured.after_reasoning else None
            seq.grammar = GrammarState(compiled, after)
            self.pipeline.num_constrained += 1
        self.requests[request_id] = RequestState(
            seq=seq,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer,
                prompt_token_ids,
                params.skip_special_tokens,
                self.token_texts[params.skip_special_tokens],
            ),
            stop_strings=(
                StopStringChecker(params.stop, params.include_stop_str_in_output)
                if any(params.stop)
                else None
            ),
            prompt_logprobs=[None] * len(prompt_token_ids) if params.prompt_logprobs is not None else None,
        )
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        state = self.requests.get(request_id)
        if state is None:
            return None
        output = self._finish(state, "abort", None, "")
        # Now, not at the next step: when every client has hung up there is no next step, and a stale queue
        # length would hold an autoscaler scaling on it at its last value.
        self._update_gauges()
        return output

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self.pipeline.has_in_flight

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[list[int]]:
        """Offline batch generation (like vLLM's LLM.generate): every prompt goes in at once and the
        engine steps until all are done. Returns the output token ids of each prompt, in order."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{id(self)}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, all_params, strict=True):
            self.add_request(rid, prompt, p)
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.request_id in tokens:
                    tokens[out.request_id].extend(out.new_token_ids)
        return [tokens[rid] for rid in ids]

    # --- one step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched, outputs = self.pipeline.step()
        self._record_schedule(sched)
        self.metrics.labels(self.metrics.generation_tokens).inc(len(outputs))  # one output per token read
        if self.inter_token_gaps:
            self.metrics.inter_token_latency.observe(self.inter_token_gaps)
            self.inter_token_gaps.clear()
        self._update_gauges()
        return outputs

    def _store_prompt_logprobs(self, launched: LaunchedStep) -> None:
        """A step's prompt logprobs (requests that asked), read before its tokens: the first output carries them."""
        assert launched.prompt_logprobs is not None
        for span in launched.prompt_logprobs.result():
            state = self.requests.get(span.request_id)
            if state is not None and state.prompt_logprobs is not None:
                end = span.first_token + len(span.entries)
                state.prompt_logprobs[span.first_token : end] = span.entries

    def _accept_token(
        self, seq: Sequence, token_id: int, logprob: TokenLogprob | None, now: float
    ) -> RequestOutput:
        """The sequence's newest token is `token_id` (already in place): report it, check stops.

        Runs once per token per sequence (256 times a decode step on a busy GPU): what a request did not
        ask for (stop strings, logprobs, text) costs it nothing here."""
        state, params = self.requests[seq.request_id], seq.params
        if state.first_token_time is None:
            state.first_token_time = now
            m = self.metrics
            m.labels(m.time_to_first_token).observe(now - seq.arrival_time)
        else:
            self.inter_token_gaps.append(now - (state.last_token_time or now))
        state.last_token_time = now
        state.pending_ids.append(token_id)
        if logprob is not None:
            state.pending_logprobs.append(logprob)

        stop = check_token_stop(
            token_id,
            seq.num_output_tokens,
            params,
            self.eos_token_ids,
            seq.num_prompt_tokens,
            self.max_model_len,
        )
        if seq.grammar is not None:
            stop = self._grammar_stop(seq.grammar, token_id, stop)
            if stop.finish_reason == "abort":
                return self._finish(state, "abort", None, "")
        text = ""  # what this token releases
        if params.detokenize:
            detok = state.detokenizer
            text = detok.add(token_id) if stop.include_token_text else ""
            if stop.finished:
                text += detok.flush()
            if state.stop_strings is not None:  # else nothing to look for or hold back
                check = state.stop_strings.check(detok.text, text, final=stop.finished)
                if check.stopped:  # a stop string overrides the token-level reason
                    return self._finish(state, "stop", check.stop_reason, check.release_text)
                text = check.release_text
        if stop.finished:
            return self._finish(state, stop.finish_reason, stop.stop_reason, text)
        return self._output(state, text, finished=False, finish_reason=None, stop_reason=None)

    def _reasoning_end_ids(self) -> tuple[int, ...]:
        if self.reasoning_end_token_ids is None:
            self.reasoning_end_token_ids = tuple(self.tokenizer.encode("</think>", add_special_tokens=False))
        return self.reasoning_end_token_ids

    def _grammar_stop(self, grammar: GrammarState, token_id: int, stop: TokenStop) -> TokenStop:
        """Advance the grammar; a completed grammar ends the sequence even under ignore_eos."""
        grammar.accept(token_id)
        if grammar.rejected:
            # Only reachable when every allowed token was masked (e.g. min_tokens hid the only stop
            # token the finished grammar allows): the output can no longer match, so it ends here.
            log.warning("grammar rejected token %d: request ends (finish_reason abort)", token_id)
            return TokenStop("abort", None, False)
        if not stop.finished and grammar.is_terminated:
            return TokenStop("stop", None, False)
        return stop

    def _output(
        self,
        state: RequestState,
        text: str,
        finished: bool,
        finish_reason: str | None,
        stop_reason: int | str | None,
    ) -> RequestOutput:
        seq = state.seq
        wants_logprobs = seq.params.logprobs is not None
        # Positional, in the fields' order: one per token per sequence, and keywords cost ~0.4 µs more.
        out = RequestOutput(
            seq.request_id,
            state.pending_ids,  # new_token_ids
            text,  # new_text
            state.pending_logprobs if wants_logprobs else None,  # new_logprobs
            finished,
            finish_reason,
            stop_reason,
            seq.num_prompt_tokens,
            seq.num_output_tokens,
            seq.num_cached_tokens,
            state.prompt_logprobs,
        )
        state.pending_ids = []
        # The output holds the list now: the next token needs another.
        if wants_logprobs or state.pending_logprobs:
            state.pending_logprobs = []
        state.prompt_logprobs = None  # sent once, with the first output
        return out

    def _finish(
        self, state: RequestState, reason: str, stop_reason: int | str | None, text: str
    ) -> RequestOutput:
        seq, m = state.seq, self.metrics
        if seq.grammar is not None:
            self.pipeline.num_constrained -= 1
        self.scheduler.finish(seq)  # a token still in flight will be dropped when its step is read
        self.runner.release(seq.request_id)
        del self.requests[seq.request_id]
        m.request_success.labels(model_name=m.model_name, finished_reason=reason).inc()
        m.labels(m.e2e_request_latency).observe(time.monotonic() - seq.arrival_time)
        return self._output(state, text, finished=True, finish_reason=reason, stop_reason=stop_reason)

    # --- metrics -----------------------------------------------------------------------------

    def _record_schedule(self, sched: SchedulerOutput) -> None:
        m = self.metrics
        if sched.preempted:
            m.labels(m.num_preemptions).inc(len(sched.preempted))
        if sched.num_prefix_query_tokens:
            m.labels(m.prefix_cache_queries).inc(sched.num_prefix_query_tokens)
            m.labels(m.prefix_cache_hits).inc(sched.num_prefix_hit_tokens)
            m.labels(m.prompt_tokens).inc(sched.num_prefix_query_tokens)

    def _update_gauges(self) -> None:
        m = self.metrics
        m.labels(m.num_requests_running).set(self.scheduler.num_running)
        m.labels(m.num_requests_waiting).set(self.scheduler.num_waiting)
        m.labels(m.kv_cache_usage_perc).set(self.kv.usage)
        m.labels(m.kv_cache_blocks_free).set(self.kv.num_free_blocks)
