"""W1, offline throughput: the nano-vllm benchmark, so figures compare with published ones.

Qwen3-0.6B shape with random weights; 256 sequences; ``random.seed(0)``, then all prompts
``[randint(0, 10000) for _ in range(randint(100, 1024))]``, then all ``max_tokens = randint(100, 1024)``;
ignore_eos, temperature 0.6 (as nano-vllm's bench.py): 133,966 output tokens. In the same run, on the
same GPU: transformers' static batching (``generate``, batches of 64, each runs to its longest output)
and continuous batching (``generate_batch``'s manager, sdpa), each on the first ``--hf-seqs`` sequences
to bound the run's length, and the bandwidth floor for the whole workload. Our decode-only steps are also
reported by batch size against each bucket's own floor (``decode_only_by_sequences``): full batches, or the tail.

    python3 bench/w1_offline.py --out bench/results/w1_offline_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.config import EngineConfig  # noqa: E402
from engine.kernels.decode_tiles import decode_tile_for  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.model.loader import load_model  # noqa: E402
from engine.sampling.params import SamplingParams  # noqa: E402

EXPECTED_OUTPUT_TOKENS = 133_966
DECODE_BUCKETS = ((1, 32), (33, 64), (65, 128), (129, 192), (193, 256))  # sequences in a decode-only step
TEMPERATURE = 0.6


def qwen3_0_6b_config() -> transformers.Qwen3Config:
    return transformers.Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1_000_000, rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=1,
    )  # fmt: skip


def word_level_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """Random weights need no real tokenizer, but the engine detokenizes: "t0" .. "tN", one word each."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1")


def save_random_checkpoint(config: transformers.PretrainedConfig, path: Path) -> transformers.PreTrainedModel:
    """transformers' own random init (normal, std 0.02) in bf16, saved with the tokenizer; returns the
    model on the GPU for the transformers baselines."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model.save_pretrained(path)
    word_level_tokenizer(config.vocab_size).save_pretrained(path)
    return model.cuda().eval()


def workload(num_seqs: int = 256) -> tuple[list[list[int]], list[int]]:
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(num_seqs)]
    max_tokens = [random.randint(100, 1024) for _ in range(num_seqs)]
    return prompts, max_tokens


def copy_bandwidth() -> float:
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 20
    del src, dst
    return 2 * (1 << 29) * 2 / seconds


def bandwidth_floor(config, prompts, max_tokens, copy_bw: float, matmul_flops: float = 7.9e14) -> dict:
    """The least time the workload can take on this GPU: every decode step reads all weights once (the
    tied embedding as the LM head, not as the lookup) and every running sequence's K/V once; prefill
    is compute-bound at the measured dense bf16 rate. Assumes the ideal schedule (all 256 decode together)."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    layer_params = h * (q + 2 * kv) + q * h + 3 * h * inter
    weight_bytes = 2 * (layers * layer_params + config.vocab_size * h)
    kv_bytes_per_token = 2 * 2 * layers * kv
    decode_bytes = 0
    for step in range(1, max(max_tokens)):  # the first output token comes from the prefill
        running = [(len(p), n) for p, n in zip(prompts, max_tokens, strict=True) if n > step]
        if running:
            decode_bytes += weight_bytes + kv_bytes_per_token * sum(p + step for p, _ in running)
    # prefill: every prompt token through every layer, the LM head only for each prompt's last token
    prefill_flops = (
        2 * sum(len(p) for p in prompts) * layers * layer_params + 2 * len(prompts) * config.vocab_size * h
    )
    seconds = decode_bytes / copy_bw + prefill_flops / matmul_flops
    return {"decode_bytes_read": decode_bytes, "prefill_flops": prefill_flops, "floor_seconds": seconds,
            "floor_tok_per_s": sum(max_tokens) / seconds, "weight_bytes": weight_bytes,
            "kv_bytes_per_token": kv_bytes_per_token, "copy_bandwidth": copy_bw}  # fmt: skip


def hf_static(model, prompts, max_tokens, batch_size: int = 64) -> dict:
    """transformers `generate`, batches of 64 left-padded prompts, each batch runs to its longest output."""
    model.generation_config.eos_token_id = None  # ignore_eos
    started = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch, ns = prompts[i : i + batch_size], max_tokens[i : i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device="cuda")
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=max(ns), do_sample=True, temperature=TEMPERATURE,
                           top_k=0, top_p=1.0, pad_token_id=0)  # fmt: skip
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"seqs": len(prompts), "output_tokens": sum(max_tokens), "seconds": seconds,
            "tok_per_s": sum(max_tokens) / seconds}  # fmt: skip


def hf_continuous(model, prompts, max_tokens) -> dict:
    """transformers' continuous batching (the manager behind `generate_batch`, which takes one
    max_new_tokens for all; its manager takes one per request). sdpa: no flash-attn package here."""
    gen = transformers.GenerationConfig(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                                        max_new_tokens=max(max_tokens), eos_token_id=-1, pad_token_id=0)  # fmt: skip
    produced = 0
    with (
        torch.no_grad(),
        model.continuous_batching_context_manager(generation_config=gen, block=True, timeout=30) as m,
    ):
        started = time.perf_counter()  # after the manager's warm-up, as ours starts after graph capture
        for i, (p, n) in enumerate(zip(prompts, max_tokens, strict=True)):
            m.add_request(p, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
        done: set[str] = set()
        while len(done) < len(prompts):
            result = m.get_result(timeout=1)
            if result is not None and result.is_finished():
                done.add(result.request_id)
                produced += len(result.generated_tokens)
            elif result is None and not m.is_running():
                raise RuntimeError("transformers' continuous batching thread died")
        seconds = time.perf_counter() - started
    return {"seqs": len(prompts), "output_tokens": produced, "seconds": seconds, "tok_per_s": produced / seconds,
            "attn_implementation": model.config._attn_implementation}  # fmt: skip


class StepTimer:
    """Wall time of each engine step, split into: schedule / build the step's input tensors / the rest of
    launch (queueing forward, LM head and sampler on the GPU) / handling the previous step's tokens
    (token bookkeeping, stop checks), and inside that the wait for the GPU. With async scheduling the
    host's parts overlap the GPU's work, so the wait shows how much host time the GPU hides."""

    def __init__(self, engine: LLMEngine, weight_bytes: int, kv_bytes_per_token: int, copy_bw: float) -> None:
        from engine.sampling.sampler import PendingSample

        self.weight_bytes, self.kv_bytes_per_token, self.copy_bw = weight_bytes, kv_bytes_per_token, copy_bw
        self.rows: list[dict] = []
        self._current: dict = {}
        for obj, name in ((engine, "step"), (engine.scheduler, "schedule"), (engine.runner, "launch"),
                          (engine.runner, "build_metadata"), (engine.pipeline, "_read")):  # fmt: skip
            setattr(obj, name, self._timed(getattr(obj, name), name))
        self._restore = PendingSample.result
        PendingSample.result = self._timed(PendingSample.result, "wait")
        # The device's own time for each step the engine times (CUDA events around its forward and sampling;
        # engine/model/step_timer.py): for large prompt steps the host's "launch" above also blocks while the
        # GPU works through earlier steps, so it is no measure of host work there (2026-12-06, H100).
        self.device_steps: list[tuple[int, int, float]] = []  # (prompt tokens, decodes, device ms)
        # The engine times steps only for the step trace or the learnt prefill cap: on for this bench
        engine.runner.time_steps = True
        record = engine.pipeline._record_time

        def recorded(launched) -> None:
            record(launched)
            prompt_tokens = launched.num_tokens - launched.num_decodes
            self.device_steps.append((prompt_tokens, launched.num_decodes, launched.timer.elapsed_ms()))

        engine.pipeline._record_time = recorded

    def close(self) -> None:
        from engine.sampling.sampler import PendingSample

        PendingSample.result = self._restore

    def _timed(self, inner, name: str):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            result = inner(*args, **kwargs)
            self._current[name] = self._current.get(name, 0.0) + time.perf_counter() - started
            if name == "schedule":
                self._current["num_seqs"] = len(result.scheduled)
                self._current["num_tokens"] = result.num_tokens
            if (
                name == "build_metadata"
            ):  # the K/V a step reads: its sequences' lengths, as the runner has them
                self._current["context_tokens"] = sum(result[2].seq_lens_cpu)
            if name == "step":
                self.rows.append(self._current)
                self._current = {}
            return result

        return timed

    def summary(self) -> dict:
        def total(rows, key):
            return sum(r.get(key, 0.0) for r in rows)

        out = {}
        decode_rows = [r for r in self.rows if r.get("num_seqs") and r["num_tokens"] == r["num_seqs"]]
        other_rows = [r for r in self.rows if r not in decode_rows]
        for label, rows in (("all_steps", self.rows), ("decode_only_steps", decode_rows),
                            ("steps_with_prefill", other_rows)):  # fmt: skip
            out[label] = {"steps": len(rows), "seconds": total(rows, "step"), "schedule_s": total(rows, "schedule"),
                          "build_inputs_s": total(rows, "build_metadata"),
                          "launch_rest_s": total(rows, "launch") - total(rows, "build_metadata"),
                          "handle_tokens_s": total(rows, "_read"),
                          "of_which_wait_for_gpu_s": total(rows, "wait")}  # fmt: skip
        # decode-only steps by batch size, each bucket against its own floor (the weights and its K/V read
        # once a step at the copy bandwidth): where, between full batches and the tail, the time goes
        by_seqs: dict[str, dict] = {}
        for low, high in DECODE_BUCKETS:
            rows = [r for r in decode_rows if low <= r["num_seqs"] <= high]
            if rows:
                floor_s = (
                    len(rows) * self.weight_bytes + self.kv_bytes_per_token * total(rows, "context_tokens")
                ) / self.copy_bw
                gpu_ms = [
                    ms for prompt, decodes, ms in self.device_steps if not prompt and low <= decodes <= high
                ]
                by_seqs[f"{low}-{high}"] = {"steps": len(rows), "seconds": total(rows, "step"),
                                            "wait_for_gpu_s": total(rows, "wait"), "floor_s": floor_s,
                                            "pct_of_floor": 100 * floor_s / total(rows, "step"),
                                            "gpu_s": sum(gpu_ms) / 1e3}  # fmt: skip
        out["decode_only_by_sequences"] = by_seqs
        prompt_ms = [ms for prompt, _, ms in self.device_steps if prompt]
        decode_ms = [ms for prompt, _, ms in self.device_steps if not prompt]
        out["device_time"] = {"steps_with_prefill": {"steps": len(prompt_ms), "gpu_s": sum(prompt_ms) / 1e3},
                              "decode_only_steps": {"steps": len(decode_ms), "gpu_s": sum(decode_ms) / 1e3}}  # fmt: skip
        out["steps_with_prefill_detail"] = [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in other_rows[:40]
        ]
        return out


def time_decode_forward(engine: LLMEngine, batch: int, context: int) -> float | None:
    """GPU time of one captured decode forward at `batch` sequences of `context` tokens (cuda events)."""
    graphs = engine.runner.cuda_graphs
    if graphs is None or batch > graphs.max_batch_size:
        return None
    bs = next(b for b in graphs.buckets if b >= batch)
    blocks_needed = -(-context // engine.config.block_size)
    num_blocks = engine.runner.kv_caches[0].shape[1]
    g = torch.Generator().manual_seed(0)
    graphs.block_tables[:bs, :blocks_needed] = torch.randint(
        0, num_blocks, (bs, blocks_needed), generator=g
    ).to(graphs.block_tables.device, torch.int32)
    graphs.seq_lens[:bs] = context
    # Distinct tokens per row: with the zeros left from capture every row would be the same token, and a
    # mixture-of-experts model would route the whole batch to one set of experts (W5 then beat its floor).
    vocab = engine.vocab_size
    graphs.input_ids[:bs] = torch.randint(0, vocab, (bs,), generator=g).to(graphs.input_ids.device)
    graphs.slot_mapping[:bs] = -1
    graphs.positions[:bs] = context - 1
    graphs.decode_order[:bs] = graphs.batch_order[:bs]  # rows in batch order (a permutation of these bs rows)
    graph = graphs.graphs[bs]
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 10


def run_ours(path: Path, prompts, max_tokens, args, floor: dict) -> dict:
    config = EngineConfig(model=str(path), device="cuda", dtype="bfloat16", max_model_len=4096,
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_prefill_tokens_while_decoding=args.max_prefill_tokens_while_decoding,
                          gpu_memory_utilization=0.9, enforce_eager=args.enforce_eager,
                          async_scheduling=not args.no_async_scheduling)  # fmt: skip
    started = time.perf_counter()
    engine = LLMEngine(config, load_model(config))
    startup = time.perf_counter() - started
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up, as nano-vllm
    # token ids only, as nano-vllm's benchmark: no detokenization
    params = [
        SamplingParams(temperature=TEMPERATURE, ignore_eos=True, max_tokens=n, detokenize=False)
        for n in max_tokens
    ]
    timer = StepTimer(engine, floor["weight_bytes"], floor["kv_bytes_per_token"], floor["copy_bandwidth"])
    torch.cuda.synchronize()
    started = time.perf_counter()
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - started
    timer.close()
    produced = sum(len(o) for o in outputs)
    assert produced == sum(max_tokens), (produced, sum(max_tokens))
    kernel_ms = {f"decode_forward_ms_b{b}_ctx{c}": time_decode_forward(engine, b, c)
                 for b, c in ((256, 860), (128, 1200), (32, 1500))}  # fmt: skip
    result = {"output_tokens": produced, "seconds": seconds, "tok_per_s": produced / seconds,
              "startup_seconds": startup, "num_kv_blocks": engine.kv.pool.num_blocks,
              "cuda_graphs": engine.runner.cuda_graphs is not None, "async_scheduling": engine.async_scheduling,
              "step_breakdown": timer.summary(), **kernel_ms}  # fmt: skip
    del engine, timer
    gc.collect()  # the timer's wrappers hold the engine in a cycle; free its KV cache before the next run
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/w1_offline_gpu.json")
    parser.add_argument(
        "--hf-seqs", type=int, default=64, help="sequences for each transformers baseline (0: skip)"
    )
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument(
        "--max-prefill-tokens-while-decoding",
        type=int,
        default=0,
        help="0 (no cap): offline, nobody watches the inter-token latency, throughput is the point "
        "(as vLLM's offline LLM takes larger chunks than its server)",
    )
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument(
        "--runs", type=int, default=1, help="run kubellm this many times (a fresh engine each)"
    )
    parser.add_argument(
        "--no-async-scheduling", action="store_true", help="the synchronous engine (for comparison)"
    )
    args = parser.parse_args()

    config = qwen3_0_6b_config()
    prompts, max_tokens = workload()
    assert sum(max_tokens) == EXPECTED_OUTPUT_TOKENS, sum(max_tokens)
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    floor = bandwidth_floor(config, prompts, max_tokens, copy_bw)
    print(
        f"{props.name}; copy bandwidth {copy_bw / 1e12:.2f} TB/s; floor {floor['floor_tok_per_s']:.0f} tok/s",
        flush=True,
    )

    result: dict = {"device": props.name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "copy_bandwidth_TBps": copy_bw / 1e12,
                    "workload": {"seqs": len(prompts), "prompt_tokens": sum(map(len, prompts)),
                                 "output_tokens": sum(max_tokens), "temperature": TEMPERATURE},
                    "floor": floor, "decode_tile": decode_tile_for(props.name).name}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        hf_model = save_random_checkpoint(config, path)
        n = args.hf_seqs
        if n:
            for name, fn in (("hf_static_generate", hf_static), ("hf_continuous_batching", hf_continuous)):
                try:
                    result[name] = fn(hf_model, prompts[:n], max_tokens[:n])
                except Exception as exc:  # a baseline failing must not lose our own numbers
                    result[name] = {"error": repr(exc)[:500]}
                print(name, result[name], flush=True)
        del hf_model
        gc.collect()
        torch.cuda.empty_cache()
        result["kubellm"] = run_ours(path, prompts, max_tokens, args, floor)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))  # kept even if a later run fails
        for _ in range(args.runs - 1):  # later runs: is anything in the first one a one-time cost?
            again = run_ours(path, prompts, max_tokens, args, floor)
            result.setdefault("kubellm_later_runs", []).append(again)
            print(f"again: {again['tok_per_s']:.0f} tok/s", flush=True)
    ours = result["kubellm"]
    ours["pct_of_floor"] = 100 * ours["tok_per_s"] / floor["floor_tok_per_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(
        f"\nW1 on {props.name}: kubellm {ours['tok_per_s']:.0f} output tok/s ({ours['seconds']:.1f} s, "
        f"{ours['pct_of_floor']:.0f}% of the {floor['floor_tok_per_s']:.0f} tok/s floor)"
    )
    for bucket, row in ours["step_breakdown"]["decode_only_by_sequences"].items():
        print(
            f"  decode-only steps of {bucket} sequences: {row['steps']} x {1e3 * row['seconds'] / row['steps']:.2f} ms, "
            f"{row['pct_of_floor']:.0f}% of their floor, waiting for the GPU {row['wait_for_gpu_s']:.2f} s of {row['seconds']:.2f}, "
            f"GPU busy {row['gpu_s']:.2f} s"
        )
    for kind, row in ours["step_breakdown"]["device_time"].items():
        print(f"  {kind}: {row['steps']} steps, {row['gpu_s']:.2f} s of GPU time (CUDA events)")
    for name in ("hf_static_generate", "hf_continuous_batching"):
        if "tok_per_s" in result.get(name, {}):
            print(f"  {name} (first {result[name]['seqs']} seqs): {result[name]['tok_per_s']:.0f} tok/s")


if __name__ == "__main__":
    main()
