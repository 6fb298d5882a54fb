"""Engine configuration: one validated object built from the CLI (or tests).

Every default lives here once. Those that depend on the device (a GPU batches far more than a CPU)
are None on the object and resolved by the `*_on(device)` methods; the CLI's help text, the operator
(kubellm_operator imports this module: it must stay free of torch) and the docs read them from here.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

DeviceType = Literal["cuda", "cpu"]


class EngineConfig(BaseModel):
    # vLLM's defaults for its OpenAI server on H100-class GPUs, and on the CPU.
    DEFAULT_MAX_NUM_SEQS: ClassVar[dict[DeviceType, int]] = {"cuda": 1024, "cpu": 256}
    DEFAULT_MAX_NUM_BATCHED_TOKENS: ClassVar[dict[DeviceType, int]] = {"cuda": 8192, "cpu": 2048}
    # Prefill tokens one step may compute while running sequences decode in it (0 = no cap beyond
    # max_num_batched_tokens). Every decoding stream waits for its step, so this bounds their
    # inter-token latency while prompts arrive; with nothing decoding a prefill takes the whole budget.
    # GPU default from a cost model of a step, step_ms ≈ a + b·prefill_tokens + c·decode_seqs, fitted
    # to the W2 step trace (Llama-3.1-8B bf16, H100, docs/BENCHMARKS.md): a ≈ 6.5 ms (the weights read
    # once), b ≈ 0.023 ms per prefill token (an 8,192-token step took 190 ms), c ≈ 0.025 ms per decoding
    # sequence (7.0 ms under 30 sequences, 18.6 ms at 450-500). A pure decode step at 256 sequences
    # costs ≈ 13 ms; the cap P makes a mixed step cost ≈ 13 + 0.023·P ms. P = 2048 gives ≈ 60 ms (about
    # 4.6x the decode step; issue 13's TPOT p99 bar at QPS = inf) instead of ≈ 200 ms at 8,192.
    # NEEDS GPU CALIBRATION: sweep it with bench/w2_serving.py --sweep and keep the knee of ITL p99
    # against req/s (the cap is in tokens, so a larger model wants a smaller one: b grows with it).
    # The CPU keeps today's behaviour: its budget (2048) is already small.
    # Why not vLLM's --long-prefill-token-threshold: it caps each request's chunk whether or not anything
    # decodes (an idle server's TTFT gets worse) and not the step's sum (several prompts still fill the
    # step). This caps the sum, only while decodes wait: the name says both.
    DEFAULT_MAX_PREFILL_TOKENS_WHILE_DECODING: ClassVar[dict[DeviceType, int]] = {"cuda": 2048, "cpu": 0}
    # Unset, a GPU learns its cap ("auto", below; 2048 is where it starts), the CPU keeps none.
    # Measured (H100, 2026-12-06, sixth session, one call each, docs/BENCHMARKS.md): W2 2048 / auto 40.3 / 41.3
    # req/s, TPOT p99 59.7 / 49.2 ms, TTFT p99 3.44 / 3.27 s; W5 28.4 / 28.5 req/s, TPOT p99 61.9 / 48.7 ms,
    # TTFT p99 3.18 / 3.56 s. As fast or faster, a fifth lower TPOT p99: auto is the GPU default.
    DEFAULT_PREFILL_CAP_AUTO: ClassVar[dict[DeviceType, bool]] = {"cuda": True, "cpu": False}
    # Earlier (H100, 2026-12-06): W2's sweep 0 / 2048 / auto gave 41.3 / 41.6 / 41.9 req/s and ITL p99
    # 208 / 92 / 81 ms at QPS = inf; W5 lost a fifth with auto (19.3 against 24.0 req/s) until
    # AUTO_PREFILL_DECODE_SHARE (below), measured since: see DEFAULT_PREFILL_CAP_AUTO.
    # `--max-prefill-tokens-while-decoding auto`: the engine learns its own step cost online,
    # step_ms ≈ a + b·prefill_tokens + c·decode_seqs + d·decode_context_tokens (engine/core/step_cost_model.py,
    # refitted to the last 512 steps' measured device times), and gives each step the most prompt tokens
    # that keep its predicted time within --decode-step-target-ms beside that step's decodes: right for
    # any GPU and model size (a 70B gets fewer tokens, a 0.6B far more) and any batch (10 decodes leave
    # room for far more prompt than 400). Until the fit has seen steps of different prompt sizes it uses
    # the fixed default above, and half of it every other step (so that it sees some). Never fewer than
    # AUTO_PREFILL_FLOOR_TOKENS (or an eighth of the budget, if smaller), so prompts always progress: a
    # long prompt's first token comes within ⌈prompt / 256⌉ steps.
    AUTO_PREFILL_FLOOR_TOKENS: ClassVar[int] = 256
    # "auto" gives prompts at least this share of the decodes' own predicted time, up to the target (a step
    # takes at most the decodes' time plus the target): where the decodes alone fill the target it cannot
    # bound their gap anyway, and the floor alone admitted prompts too slowly on W5 (its fit put 500 decodes
    # at 6 + 0.16 ms each, past the target, so every step got 256 prompt tokens; with this share that fit
    # gives about the fixed 2048's prompt per step; engine/core/step_cost_model.py; not yet measured on a GPU).
    AUTO_PREFILL_DECODE_SHARE: ClassVar[float] = 1.0
    # Steps with prompt tokens of up to this many tokens (and decode-only steps past the decode graphs'
    # 512 sequences) replay CUDA graphs captured in pieces between attention calls
    # (engine/model/piecewise_cuda_graphs.py): eagerly, a 2,048-token prompt step of Qwen3-30B-A3B spent
    # 56 ms launching 38 ms of kernels (H100; W5 23.4 -> 28.8 req/s with them). 3,072 holds the default prompt
    # cap (2,048) beside 1,024 decodes. By default the engine lowers it to the largest step whose arithmetic
    # takes less GPU time than its eager launches (piecewise_cuda_graphs.host_bound_tokens: ~1,344 tokens for
    # Llama-8B, where padding a GPU-bound 2,048-token chunk only cost W2 4 %; all 3,072 for W5's MoE).
    DEFAULT_MAX_PIECEWISE_GRAPH_TOKENS: ClassVar[int] = 3072
    # Seconds in-flight requests may take to finish on SIGTERM (`kubellm serve --shutdown-timeout`):
    # Kubernetes' default grace period. The operator sizes terminationGracePeriodSeconds from it.
    DEFAULT_SHUTDOWN_TIMEOUT_S: ClassVar[float] = 30.0

    model: str | None = None  # None = the embedded SmolLM2-135M-Instruct
    served_model_name: str | None = None  # defaults to the model's own name
    tokenizer: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int | None = Field(default=None, ge=16)
    max_num_seqs: int | None = Field(default=None, ge=1)  # None: DEFAULT_MAX_NUM_SEQS[device]
    max_num_batched_tokens: int | None = Field(default=None, ge=16)  # None: ..._BATCHED_TOKENS[device]
    # None: DEFAULT_MAX_PREFILL_TOKENS_WHILE_DECODING[device]; 0: no cap (max_num_batched_tokens);
    # "auto": as many as fit decode_step_target_ms, learnt from measured steps (see above)
    max_prefill_tokens_while_decoding: int | Literal["auto"] | None = None
    # The step time "auto" aims at while sequences decode. 50 ms: issue 13's TPOT p99 bar at QPS = inf is
    # 60 ms, and a step's time is a decoding stream's inter-token gap; the 10 ms left cover the host's share
    # of a step and the fit's error. Only read with "auto".
    decode_step_target_ms: float = Field(default=50.0, gt=0)
    block_size: int = Field(default=16, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    kv_cache_memory: int | None = Field(default=None, ge=0)  # bytes; overrides utilization sizing
    num_gpu_blocks_override: int | None = Field(default=None, ge=1)  # tests: force a tiny pool
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # no CUDA graphs
    # None: DEFAULT_MAX_PIECEWISE_GRAPH_TOKENS or the model's host-bound limit, if lower (never above the step
    # budget); 0: steps with prompts run eagerly
    max_piecewise_graph_tokens: int | None = Field(default=None, ge=0)
    # Queue step N+1 on the device before reading step N's tokens (None = on for CUDA, off for the CPU,
    # where the forward itself runs on the engine thread and there is nothing to overlap with).
    async_scheduling: bool | None = None
    # One worker process per GPU, each holding 1/N of every layer (vLLM's --tensor-parallel-size).
    tensor_parallel_size: int = Field(default=1, ge=1)
    # FP8 linears and MoE experts from a float checkpoint (vLLM's --quantization fp8); FP8 checkpoints
    # need no flag.
    quantization: Literal["fp8"] | None = None
    # The KV cache's dtype: "auto" = the model's (see engine.model.loader); fp8 / fp8_e4m3 = float8 e4m3
    # with a scale per layer (vLLM's names), twice the tokens in the same memory.
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = "auto"
    # The engine loop in a process of its own, the HTTP server in this one (vLLM V1's layout): the event
    # loop's per-token work no longer shares a GIL with the engine's (engine/engine_process/). None = on
    # with CUDA (W2 on an H100: ITL p99 120 -> 74 ms, +5 % req/s, docs/BENCHMARKS.md), off on the CPU,
    # where the forward itself is host work and a second process costs a start-up of its own.
    engine_process: bool | None = None
    max_queue: int = Field(default=1024, ge=1)  # waiting requests beyond this get 429
    # A request's outputs reach its handler (an SSE chunk each) every this many tokens, the first at once
    # (vLLM's --stream-interval): fewer wake-ups, chunks and socket writes per token on the event loop.
    stream_interval: int = Field(default=1, ge=1)
    seed: int = 0
    trust_remote_code: bool = False
    # --reasoning-parser: the HTTP layer splits the thinking off; the engine starts a grammar meant for
    # the answer (tools, response_format) after the thinking's end tag.
    reasoning_parser: Literal["qwen3", "deepseek_r1"] | None = None

    def max_num_seqs_on(self, device: DeviceType) -> int:
        """By default never above an explicit max_num_batched_tokens (see max_num_batched_tokens_on)."""
        if self.max_num_seqs:
            return self.max_num_seqs
        return min(
            self.DEFAULT_MAX_NUM_SEQS[device],
            self.max_num_batched_tokens or self.DEFAULT_MAX_NUM_SEQS[device],
        )

    def max_num_batched_tokens_on(self, device: DeviceType) -> int:
        """The step's token budget; by default never below max_num_seqs (each running sequence must be able
        to decode in the same step, or a full batch of decodes leaves no room for a prompt, ever)."""
        if self.max_num_batched_tokens:
            return self.max_num_batched_tokens
        return max(self.DEFAULT_MAX_NUM_BATCHED_TOKENS[device], self.max_num_seqs or 0)

    @field_validator("max_prefill_tokens_while_decoding")
    @classmethod
    def _prefill_cap_is_tokens_or_auto(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"must be a number of tokens (0: no cap) or 'auto', not {value}")
        return value

    @model_validator(mode="after")
    def _budget_holds_every_sequence(self) -> EngineConfig:
        # vLLM refuses this too: with more sequences than tokens per step, once that many decode, no
        # prefill chunk ever fits and waiting requests starve.
        seqs, tokens = self.max_num_seqs, self.max_num_batched_tokens
        if seqs is not None and tokens is not None and tokens < seqs:
            raise ValueError(
                f"--max-num-batched-tokens ({tokens}) must be at least --max-num-seqs ({seqs}): "
                "every running sequence decodes a token each step"
            )
        return self

    def prefill_cap_is_auto_on(self, device: DeviceType) -> bool:
        """Whether steps' prefill caps are learnt ("auto"): asked for, or unset on a device where that is the
        default (DEFAULT_PREFILL_CAP_AUTO)."""
        cap = self.max_prefill_tokens_while_decoding
        return cap == "auto" or (cap is None and self.DEFAULT_PREFILL_CAP_AUTO[device])

    def max_prefill_tokens_while_decoding_on(self, device: DeviceType) -> int:
        """The per-step prefill cap while sequences decode, never above the step's whole budget; with
        "auto", the fixed default it starts from until it has measured enough steps."""
        cap = self.max_prefill_tokens_while_decoding
        if cap is None or cap == "auto":
            cap = self.DEFAULT_MAX_PREFILL_TOKENS_WHILE_DECODING[device]
        budget = self.max_num_batched_tokens_on(device)
        return min(cap, budget) if cap else budget

    def auto_prefill_floor_on(self, device: DeviceType) -> int:
        """The fewest prompt tokens "auto" gives a step: AUTO_PREFILL_FLOOR_TOKENS, or an eighth of the
        step's budget when that is smaller (a small budget is a small server's choice)."""
        return max(1, min(self.AUTO_PREFILL_FLOOR_TOKENS, self.max_num_batched_tokens_on(device) // 8))

    def max_piecewise_graph_tokens_on(self, device: DeviceType, model_limit: int | None = None) -> int:
        """The largest step captured in pieces: the flag's value, else DEFAULT_MAX_PIECEWISE_GRAPH_TOKENS
        lowered to ``model_limit`` (the model's host-bound step, piecewise_cuda_graphs.host_bound_tokens);
        never above the step budget; 0 (none) on the CPU and with --enforce-eager."""
        if device != "cuda" or self.enforce_eager:
            return 0
        tokens = self.max_piecewise_graph_tokens
        if tokens is None:
            tokens = self.DEFAULT_MAX_PIECEWISE_GRAPH_TOKENS
            if model_limit is not None:
                tokens = min(tokens, model_limit)
        return min(tokens, self.max_num_batched_tokens_on(device))

    def async_scheduling_on(self, device: DeviceType) -> bool:
        return device == "cuda" if self.async_scheduling is None else self.async_scheduling

    def engine_process_on(self, device: DeviceType) -> bool:
        return device == "cuda" if self.engine_process is None else self.engine_process

    @classmethod
    def default(cls, field: str) -> object:
        """A field's default, for the CLI's own defaults and help."""
        return cls.model_fields[field].default

    @classmethod
    def per_device_default(
        cls,
        field: Literal["max_num_seqs", "max_num_batched_tokens", "max_prefill_tokens_while_decoding"],
    ) -> str:
        """A device-dependent default in words ("1024 on a GPU, 256 on the CPU"), for help and docs."""
        defaults = {
            "max_num_seqs": cls.DEFAULT_MAX_NUM_SEQS,
            "max_num_batched_tokens": cls.DEFAULT_MAX_NUM_BATCHED_TOKENS,
            "max_prefill_tokens_while_decoding": cls.DEFAULT_MAX_PREFILL_TOKENS_WHILE_DECODING,
        }[field]

        def on(device: DeviceType) -> str:
            learnt = field == "max_prefill_tokens_while_decoding" and cls.DEFAULT_PREFILL_CAP_AUTO[device]
            return f"auto (from {defaults[device]})" if learnt else str(defaults[device])

        return f"{on('cuda')} on a GPU, {on('cpu')} on the CPU"
