#!/usr/bin/env bash
# The GPU runs still owed to the open issues (priority: the usage line's order), one device call per stage (each under the
# device's 10-minute limit). On this machine first: bash bench/device_wheels.sh; python3 bench/w2_text.py
# --prepare bench/data/w2_text (or copy that git-ignored folder), and for `w1-base` a copy of the code before
# the wave: mkdir -p .carry/base && git archive 93112ef engine bench | tar -x -C .carry/base.
# Device call: carry [".carry", "bench/data/w2_text"], command `bash bench/gpu_backlog.sh STAGE`.
# Results land in $OUT (fetch them, then copy to bench/results/ and write them up in docs/BENCHMARKS.md); the logs
# and step traces in logs.<pid>.tar.gz there.
set -uo pipefail
source bench/device_setup.sh
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
TUNED=/tmp/kubellm_moe_configs  # fused MoE configurations tuned on this machine (moe-tune-w5), for later calls
bundle() {  # the device returns at most 8 files: logs and step traces go back in one archive (one per invocation:
  # a stage may run another), JSON results beside it
  (cd "$OUT" && shopt -s nullglob && files=(*.log *.jsonl) && ((${#files[@]})) &&
    tar czf "logs.$$.tar.gz" "${files[@]}" && rm -f "${files[@]}") || true
}
trap bundle EXIT
trap 'bundle; trap - EXIT; exit 143' TERM
run() {  # name, seconds, command...: full log in $OUT/<name>.log, its tail on stdout
  local name="$1" limit="$2"; shift 2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; echo "== $name: exit $?"; tail -12 "$OUT/$name.log"
}
case "${1:-}" in
  first)  # run before anything else (any card, ~300 s): the decode kernel's longest-first program order and the
    # sampler's inverse-CDF kernel (both checked on the CPU under Triton's interpreter only) on the GPU: their tests, the
    # sampler against Philox, W1 against the code before them in the same call. On this machine first:
    # mkdir -p .carry/prev && git archive 3994e9a engine bench | tar -x -C .carry/prev
    [[ -d .carry/prev/engine ]] || { echo "no .carry/prev: prepare it first (the comment above)" >&2; exit 2; }
    run first_tests 90 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_decode_attention.py tests/gpu/test_categorical_sample.py \
      tests/gpu/test_piecewise_cuda_graphs.py tests/gpu/test_engine_on_gpu.py
    run sampler_kernels 40 python3 bench/diag/sampler_kernels.py --rows 32 256 --out "$OUT/sampler_kernels.json"
    run w1 120 python3 bench/w1_offline.py --hf-seqs 0 --out "$OUT/w1.json"
    # `first tiny` (~250 s): without the W1 baseline
    [[ "${2:-}" == tiny ]] || (cd .carry/prev && run w1_prev 120 python3 bench/w1_offline.py --hf-seqs 0 \
      --out "$OUT/w1_prev.json") ;;
  first-w5)  # one call (~540 s) when the device is scarce. On an H200: issue 14's W5 at QPS = inf with the default
    # prefill cap and without one (never run on an H200 with this code), then `tile-w1` (W1 with the default decode
    # tile and with the one W1's ragged cases favour there). On any other card: `tile-w1` (~250 s). The new kernels'
    # GPU tests passed on an H100, 2026-12-07.
    if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
      # `first-w5 short` (~300 s, when little device time is left): one W5 server and W1; `tiny` (~200 s): W5 alone
      if [[ "${2:-}" == short || "${2:-}" == tiny ]]; then
        run w5 200 python3 bench/w5_moe.py --num-layers 48 --checkpoint fp8-block --hf-requests 0 --qps inf \
          --step-trace --out "$OUT/w5.json"
        [[ "${2:-}" == tiny ]] || run w1 90 python3 bench/w1_offline.py --hf-seqs 0 --out "$OUT/w1.json"
      else
        run w5 280 python3 bench/w5_moe.py --num-layers 48 --checkpoint fp8-block --hf-requests 0 --qps inf \
          --step-trace --also-serve '--max-prefill-tokens-while-decoding 0' --out "$OUT/w5.json"
        bash "$0" tile-w1
      fi
    elif [[ "${2:-}" == tiny ]]; then  # (~100 s) the tiles alone, for a session's last minutes
      run kernels_w1_tiles 120 python3 bench/kernels.py --only decode-w1 --out "$OUT/kernels_w1_tiles.json"
      python3 bench/decode_tile_pick.py "$OUT/kernels_w1_tiles.json"
    else
      bash "$0" tile-w1
    fi ;;
  since-gpu)  # (<= 560 s, any Hopper card; the first call of the next GPU session) every GPU test of the kernels and
    # engine paths changed since tests/gpu last ran (2026-12-07, 5c301b1): the router-logits norm (the review's
    # change), the rotary writing K/V (rotary-cache), the alignment routing its tokens (route-in-align), the packed
    # qkv of the piecewise graphs; kernels first, then the engines; then the routing alignment timed. A/Bs after it:
    # `w5-vs-base` (all of it on W5 against 5c301b1), `rotary-cache`'s W1 against .carry/prev, `router-in-norm`'s timing.
    run since_gpu_kernels 220 python3 -m pytest -q -p no:cacheprovider -rfE -k "not test_fp8_producers or router" \
      tests/gpu/test_fp8_producers.py tests/gpu/test_fused_layers.py tests/gpu/test_fused_moe.py \
      tests/gpu/test_moe_router.py
    run since_gpu_engines 300 python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_engine_on_gpu.py \
      tests/gpu/test_piecewise_cuda_graphs.py tests/gpu/test_fp8_engine_on_gpu.py tests/gpu/test_llama_model_gpu.py \
      tests/gpu/test_moe_engine_on_gpu.py tests/gpu/test_fp8_moe_engine_on_gpu.py
    run route_in_alignment 40 python3 bench/diag/route_in_alignment.py --out "$OUT/route_in_alignment.json" ;;
  h200-first)  # the first call when an H200 comes (<= 580 s): issue 14's W5 bar (QPS = inf and 32, decode steps against
    # their floor, a step trace, and transformers' generate over the first 32 requests as the issue's baseline in the
    # same call; the served figures are saved before it starts), on main's code. Last run 2026-12-07 (13cc1d1): 35.6
    # req/s, decode steps 54 % of their floor; since then (none served on an H200 yet; the first two served on an
    # H100, 31.8 req/s): the alignment's chunk rule (3c4926d), the norm writing FP8 experts' input and the router's
    # logits (seventeenth and eighteenth sessions), block-scaled tiles for 33-127 tokens (eighteenth, not served), the
    # rotary writing the K/V cache in its launch (nineteenth), the alignment routing its tokens and the packed qkv of
    # the piecewise graphs (twentieth; run `since-gpu` first: their GPU tests).
    # Next call: `all-bars-w2 w1` (2026-12-07: W1 25,492 tok/s, W2 47.6 req/s, W2-FP8 59.5).
    run w5 560 python3 bench/w5_moe.py --num-layers 48 --checkpoint fp8-block --hf-requests 32 \
      --qps inf 32 --step-trace --out "$OUT/w5.json" ;;
  fp8-fused-sum)  # (ran 2026-12-07, eighteenth session, H100: tests passed, the fused sum slower so off, block tiles
    # for 33-127 tokens written from its sweep; its test list outlasts 200 s) (~450 s, any Hopper card) the FP8 GEMM's
    # split K summed by each tile's last split (GemmTile.fused_sum; off by default until this runs) and the norm before
    # FP8 experts writing its output both ways (ExpertInputRMSNorm; on by default, checked under the interpreter only):
    # their GPU tests, then the tile sweeps: W5's block-scaled attention projections (qkv 5120 x 2048, o 2048 x 4096:
    # at 33-127 tokens tile_for's tiles leave K unsplit, 32 programs for o_proj on 132 SMs) and the 8B model's
    # per-channel linears at 16 and 32 tokens; each row gives tile_for's time, the best tile's, and the best with the
    # separate sum. Then: fused_sum on where it wins, block tiles from the sweep, and W5 (`first-w5 tiny`) to serve them
    run fused_sum_tests 300 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_gemm.py \
      tests/gpu/test_fp8_producers.py tests/gpu/test_fused_moe_fp8.py tests/gpu/test_fp8_moe_engine_on_gpu.py
    run fp8_block_tune 150 python3 bench/fp8_gemm_tune.py --model qwen3-30b-a3b --group 128 \
      --tokens 1 8 16 32 64 96 --out "$OUT/fp8_block_tune.json"
    run fp8_channel_tune 100 python3 bench/fp8_gemm_tune.py --tokens 16 32 --out "$OUT/fp8_channel_tune.json" ;;
  router-in-norm)  # (~60 s, any Hopper card; ran 2026-12-07 on an H100: on to 32 tokens since; the review's change
    # after it, extra programs skipping the norm's stores, not yet on a GPU: run this again first) the norm before FP8
    # experts computing the router's logits too (KUBELLM_ROUTER_IN_NORM_TOKENS, default 32): its GPU tests, then norm +
    # router product + top-k against norm-with-logits + top-k at decode token counts (the largest count it wins to
    # is engine/kernels/fused_layers.py's ROUTER_IN_NORM_TOKENS for that card)
    run router_tests 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_producers.py -k router -rfE
    run router_in_norm 60 python3 bench/diag/router_in_norm.py --out "$OUT/router_in_norm.json" ;;
  rotary-cache)  # (~330 s, any Hopper card) the rotary writing the new K/V into the paged cache in its own launch
    # (engine/kernels/rotary.py's rotary_embedding_and_cache, 2026-12-08: one kernel fewer a layer; checked under the
    # interpreter only): its GPU tests and the engines' (dense and Qwen3 q/k norms, MoE, FP8 and an FP8 cache,
    # piecewise graphs), then W1 with it against the code before it in the same call. On this machine first:
    # rm -rf .carry/prev && mkdir -p .carry/prev && git archive 2147c71 engine bench | tar -x -C .carry/prev
    [[ -d .carry/prev/engine ]] || { echo "no .carry/prev: prepare it first (the comment above)" >&2; exit 2; }
    run rotary_tests 170 python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_fused_layers.py \
      tests/gpu/test_engine_on_gpu.py tests/gpu/test_piecewise_cuda_graphs.py tests/gpu/test_fp8_engine_on_gpu.py \
      tests/gpu/test_llama_model_gpu.py tests/gpu/test_moe_engine_on_gpu.py
    run w1 110 python3 bench/w1_offline.py --hf-seqs 0 --out "$OUT/w1.json"
    (cd .carry/prev && run w1_prev 110 python3 bench/w1_offline.py --hf-seqs 0 --out "$OUT/w1_prev.json") ;;
  route-in-align)  # (~330 s, any Hopper card) the MoE alignment's first launch computing the router's top-k
    # (engine/kernels/moe_align.py route_and_align, 2026-12-08: one launch a MoE layer fewer, decode batches to 2,048
    # tokens; checked under the interpreter only): its GPU tests and the MoE engines' (float, FP8 checkpoints, the
    # norm's router logits), the two ways timed, then W5 (24 layers) against the code before it in the same call.
    # On this machine first: rm -rf .carry/route_base && mkdir -p .carry/route_base && git archive 6f37873 engine bench |
    # tar -x -C .carry/route_base
    [[ -d .carry/route_base/engine ]] || { echo "no .carry/route_base: prepare it first (the comment above)" >&2; exit 2; }
    run route_tests 150 python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_fused_moe.py -k "routing or align" \
      tests/gpu/test_moe_router.py tests/gpu/test_moe_engine_on_gpu.py tests/gpu/test_fp8_moe_engine_on_gpu.py
    run route_in_alignment 40 python3 bench/diag/route_in_alignment.py --out "$OUT/route_in_alignment.json"
    run w5_main 120 python3 bench/w5_moe.py --num-layers 24 --checkpoint fp8-block --hf-requests 0 --qps inf \
      --out "$OUT/w5_main.json"
    (cd .carry/route_base && run w5_prev 120 python3 bench/w5_moe.py --num-layers 24 --checkpoint fp8-block \
      --hf-requests 0 --qps inf --out "$OUT/w5_prev.json") ;;
  w5-vs-base)  # (~250 s, any Hopper card) W5 (24 layers, block-FP8 checkpoint, QPS = inf) with main's code and with the
    # code in .carry/base, one after the other in one call: what the changes since then give W5 end to end (2026-12-07,
    # eighteenth session: the router's logits in the norm and the block-scaled tiles for 33-127 tokens, against
    # 5c301b1). On this machine first: rm -rf .carry/base && mkdir -p .carry/base &&
    # git archive 5c301b1 engine bench | tar -x -C .carry/base; carry [".carry/wheels", ".carry/base"]
    [[ -d .carry/base/engine ]] || { echo "no .carry/base: prepare it first (the comment above)" >&2; exit 2; }
    run w5_main 120 python3 bench/w5_moe.py --num-layers 24 --checkpoint fp8-block --hf-requests 0 --qps inf \
      --out "$OUT/w5_main.json"
    (cd .carry/base && run w5_base 120 python3 bench/w5_moe.py --num-layers 24 --checkpoint fp8-block \
      --hf-requests 0 --qps inf --out "$OUT/w5_base.json") ;;
  tile-w1)  # issue 13's W1: the decode tiles swept over W1's ragged cases on this card, then W1 with the fastest
    # (bench/decode_tile_pick.py; KUBELLM_DECODE_TILE) against the default tile, same call (~250 s). Write a tile that
    # wins W1 into engine/kernels/decode_tiles.py's DECODE_TILES under the card's name
    run kernels_w1_tiles 120 python3 bench/kernels.py --only decode-w1 --out "$OUT/kernels_w1_tiles.json"
    tile=$(python3 bench/decode_tile_pick.py "$OUT/kernels_w1_tiles.json" 2>"$OUT/decode_tile_pick.log")
    echo "== decode tile for W1: ${tile:-the default}"; cat "$OUT/decode_tile_pick.log"
    run w1 90 python3 bench/w1_offline.py --hf-seqs 0 --out "$OUT/w1.json"
    [[ -z "$tile" ]] || run w1_tile 90 env KUBELLM_DECODE_TILE="$tile" \
      python3 bench/w1_offline.py --hf-seqs 0 --out "$OUT/w1_tile_$tile.json" ;;
  all-bars)  # both open issues' bars when an H200 comes, in two calls (each bench's own baseline in its run). This
    # one: W5 (issue 14: never measured on an H200 with piecewise graphs, tuned tiles and the learnt prefill cap) at
    # QPS = inf and 32 with the default prefill cap (auto), then without one (every prompt step takes the whole
    # 8,192-token budget; +5 % on an H100: each prompt step reads all the experts), its decode steps against their
    # floor; then W1. Next call: `all-bars-w2`. On any other card: all of tests/gpu (last run 2026-12-06, eighth
    # H100 session, on main's GPU code as of dc94582: 657 passed)
    if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
      run w5 430 python3 bench/w5_moe.py --num-layers 48 --checkpoint fp8-block --hf-requests 0 --qps inf 32 \
        --step-trace --also-serve '--max-prefill-tokens-while-decoding 0' --out "$OUT/w5.json"
      run w1 110 python3 bench/w1_offline.py --hf-seqs 0 --out "$OUT/w1.json"
    else
      run gpu_tests 540 python3 -m pytest tests/gpu -q -p no:cacheprovider --timeout 120 -rfE -k "not cpu_interpreter" \
        --junitxml="$OUT/junit.xml"
    fi ;;
  all-bars-w2)  # issue 13's W2 bars in one call (W2-FP8 is a ratio to W2 in the same call): W2 at QPS = inf (its
    # 32-QPS TPOT bar was met with room, 11.6 of 25 ms), the FP8 norm / SiLU kernels' bits, W2-FP8, each server's
    # steps against their floor (step traces). About 260 s (an H100, 2026-12-07: each W2 ~110 s with its
    # checkpoint write and server start);
    # `all-bars-w2 w1` (~400 s) runs W1 first (after h200-first)
    [[ "${2:-}" != w1 ]] || run w1 110 python3 bench/w1_offline.py --hf-seqs 0 --out "$OUT/w1.json"
    run w2 150 python3 bench/w2_serving.py --qps inf --step-trace --out "$OUT/w2.json"
    run fp8_producer_tests 40 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_producers.py
    run w2_fp8 150 python3 bench/w2_serving.py --qps inf --step-trace --out "$OUT/w2_fp8.json" \
      --serve-args --quantization fp8 --kv-cache-dtype fp8 ;;
  bars13)  # issue 13's bars in one call (for an H200): W1; W2 and W2-text at QPS=inf and 32 (one server, token
    # ids then text); W2-FP8 against that W2 (a second server). About 500 s.
    run w1 150 python3 bench/w1_offline.py --hf-seqs 0 --out "$OUT/w1.json"
    run w2_text 220 python3 bench/w2_text.py --prompts bench/data/w2_text --qps inf 32 --out "$OUT/w2_text.json"
    run w2_fp8 160 python3 bench/w2_serving.py --qps inf --out "$OUT/w2_fp8.json" \
      --serve-args --quantization fp8 --kv-cache-dtype fp8 ;;
  w2)  # issues 16 and 11 (TP=1 not slower) and 13: old code vs main, the engine loop in its own process or not
    run w2_split 330 python3 bench/w2_serving.py --qps inf 32 --sweep engine-process=off,on --out "$OUT/w2_split.json"
    (cd .carry/base && run w2_base 150 python3 bench/w2_serving.py --qps inf --out "$OUT/w2_base.json") ;;
  w2-cap)  # issue 13's ITL: the prefill cap while decoding swept: none, the GPU default 2048 (a cost-model guess),
    # and auto (learnt online, steps within --decode-step-target-ms 50; its step_ms in the trace, for the fit)
    KUBELLM_STEP_TRACE="$OUT/w2_cap_trace.jsonl" run w2_cap 540 python3 bench/w2_serving.py --qps inf 32 \
      --sweep max-prefill-tokens-while-decoding=0,2048,auto --out "$OUT/w2_cap.json" ;;
  w2-fp8)  # issue 13: W2 with online W8A8 FP8 and an FP8 KV cache against bf16, same call (bar: >= 1.3x req/s);
    # first the FP8 kernels' tests (quantization bit-exact, the Triton GEMM's tiles against float32)
    run fp8_kernel_tests 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_quant_kernel.py \
      tests/gpu/test_fp8_gemm.py
    run w2_bf16 160 python3 bench/w2_serving.py --qps inf --out "$OUT/w2_bf16.json"
    run w2_fp8 160 python3 bench/w2_serving.py --qps inf --out "$OUT/w2_fp8.json" \
      --serve-args --quantization fp8 --kv-cache-dtype fp8 ;;
  fp8-tune)  # issue 13: tiles of the Triton FP8 GEMM (engine/kernels/fp8_gemm.py) on this card, then
    # every FP8 path per shape (bf16, _scaled_mm, what Fp8Linear runs, the block-scaled candidates)
    run fp8_gemm_tune 330 python3 bench/fp8_gemm_tune.py --out "$OUT/fp8_gemm_tune.json"
    run fp8_gemm 200 python3 bench/fp8_gemm.py ;;
  w1-kernels)  # issue 13's W1: where a Qwen3-0.6B decode step's time goes at W1's batch sizes (kernels by category,
    # and the wall time per step against their sum: above it, the host is the limit), Triton tiles against cuBLAS on
    # its bf16 linears; with `all`, bench/kernels.py's attention sweep
    run w1_step_kernels 240 python3 bench/diag/step_kernels.py --shape qwen3-0.6b --variants bf16 \
      --batch 256 128 32 --context 800 --temperature 0.6 --out "$OUT/w1_step_kernels.json"
    run bf16_gemm_tiles 200 python3 bench/diag/bf16_gemm_tiles.py --tokens 256 64 --out "$OUT/bf16_gemm_tiles.json"
    [[ "${2:-}" == all ]] && run kernels 200 python3 bench/kernels.py --out "$OUT/kernels.json" ;;
  w1-prefill)  # issue 13's W1: its prompt steps are GPU-bound at ~40 ms per 16,384 tokens on an H100 (0.4 s of the
    # run) against ~18 ms of GEMM arithmetic: a 29 x 560-token prompt step's kernels by category (attention's share)
    run w1_prefill_kernels 200 python3 bench/diag/step_kernels.py --shape qwen3-0.6b --variants bf16 --batch 32 \
      --context 256 --prefill-seqs 29 --prefill-len 560 --temperature 0.6 --out "$OUT/w1_prefill_kernels.json" ;;
  pdl)  # issues 13/14: does programmatic dependent launch shorten chains of small kernels in a CUDA graph (decode
    # steps are 300-860 of them)? Toy norm and GEMV chains with and without it (about 60 s; nothing in the engine
    # uses it yet)
    run pdl_chain 120 python3 bench/diag/pdl_chain.py --tokens 1 32 256 --out "$OUT/pdl_chain.json" ;;
  overlap)  # issue 13's W1: a decode step's GEMMs and norms (~1 ms at any batch, a sixth of a full step) run beside
    # the other half-batch's attention on a second stream, against the engine's one stream; then W2's Llama-8B shape
    # (~120 s). On an H100 (2026-12-07) no two-stream schedule beat one stream: the engine's halves were dropped
    run overlap_probe 150 python3 bench/diag/overlap_probe.py --seqs 256 128 64 --out "$OUT/overlap_probe.json"
    run overlap_probe_8b 150 python3 bench/diag/overlap_probe.py --shape llama-8b --seqs 256 64 --ctx-max 1500 \
      --out "$OUT/overlap_probe_8b.json" ;;
  fp8-kernels)  # issue 13: where an 8B step's GPU time goes, bf16 against FP8 and FP8 + FP8 KV (kernels by category)
    run step_kernels 500 python3 bench/diag/step_kernels.py --out "$OUT/step_kernels.json" ;;
  w2-text)  # issue 13: text through completions and chat vs token ids, same server, same lengths
    run w2_text 540 python3 bench/w2_text.py --prompts bench/data/w2_text --out "$OUT/w2_text.json" ;;
  moe-tune)  # issue 14: the fused MoE kernel's block configurations against a sweep (never run yet), before w5
    run fused_moe_tune 560 python3 bench/fused_moe_tune.py --out "$OUT/fused_moe_tune.json" ;;
  moe-tune-fp8)  # issues 13/14: the fused MoE kernel with FP8 experts, its GPU tests first; then the block configurations
    # of each FP8 variant swept against its default, the bf16 default beside it in the same run (Qwen3-30B-A3B layer)
    run moe_fp8_tests 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fused_moe_fp8.py -x -rfE
    run moe_tune_fp8_block 200 python3 bench/fused_moe_tune.py --variants bf16 fp8-block --sweep fp8-block \
      --tokens 1 16 64 256 2048 8192 --out "$OUT/fused_moe_tune_fp8_block.json"
    run moe_tune_fp8_channel 200 python3 bench/fused_moe_tune.py --variants bf16 fp8-channel --sweep fp8-channel \
      --tokens 1 16 64 256 2048 8192 --out "$OUT/fused_moe_tune_fp8_channel.json" ;;
  moe-tune-w5)  # issue 14: the FP8-block experts' configurations tuned on this card, then W5 from the block-FP8
    # checkpoint served with them (KUBELLM_MOE_CONFIG_DIR) in the same call; compare with w5-fp8-ckpt's figures
    # (also kept in $TUNED on this machine, for w5-fp8-ckpt-hf in the next call while it stays warm)
    run moe_tune_fp8_block 330 python3 bench/fused_moe_tune.py --variants fp8-block --sweep fp8-block \
      --tokens 1 8 32 64 128 256 512 1024 2048 8192 --save-configs "$OUT/moe_configs" \
      --out "$OUT/fused_moe_tune_fp8_block.json"
    mkdir -p "$TUNED" && cp "$OUT"/moe_configs/*.json "$TUNED"/
    # the device tool brings back no file whose name holds `=` or `,` (the tuned files' names): a tar instead
    tar -C "$OUT" -cf "$OUT/moe_configs.tar" moe_configs && rm -r "$OUT/moe_configs"
    KUBELLM_MOE_CONFIG_DIR="$TUNED" run w5_fp8_ckpt_tuned 240 python3 bench/w5_moe.py --num-layers 48 \
      --checkpoint fp8-block --hf-requests 0 --out "$OUT/w5_fp8_ckpt_tuned.json" ;;
  w5-fp8-ckpt-hf)  # issue 14's bar as written: W5 from the block-FP8 checkpoint (with moe-tune-w5's tuning where this
    # machine still holds it) and transformers' own MoE forward on the same checkpoint in the same call (32 requests)
    KUBELLM_MOE_CONFIG_DIR="$TUNED" run w5_fp8_ckpt_hf 560 python3 bench/w5_moe.py --num-layers 48 \
      --checkpoint fp8-block --hf-requests 32 --out "$OUT/w5_fp8_ckpt_hf.json" ;;
  w5-cap)  # issue 14 with the prefill cap: W5 from the block-FP8 checkpoint at QPS = inf, auto (with its prompt
    # share of the decodes' time) against the fixed 2048, one call (two servers, the checkpoint written twice)
    for cap in auto 2048; do
      KUBELLM_MOE_CONFIG_DIR="$TUNED" run "w5_cap_$cap" 280 python3 bench/w5_moe.py --num-layers 48 \
        --checkpoint fp8-block --hf-requests 0 --qps inf --out "$OUT/w5_cap_$cap.json" \
        --serve-args --max-prefill-tokens-while-decoding "$cap"
    done ;;
  bf16-linears)  # issue 13's W2: Llama-8B's bfloat16 linears at 1-64 tokens, cuBLAS against engine/kernels/fp8_gemm.py's
    # tiles on bf16 operands, weights rotated past the L2 cache (W2's few-sequence decode steps: two thirds of them)
    run bf16_decode_linears 400 python3 bench/diag/bf16_decode_linears.py --out "$OUT/bf16_decode_linears.json" ;;
  piecewise-tests)  # issues 14/13: CUDA graphs for steps with prompt tokens (engine/model/piecewise_cuda_graphs.py) against
    # eager forwards and engines; the MoE alignment's review-fixed chunked kernels (never on a GPU yet) and the engines
    # that now capture both kinds of graph
    run piecewise_tests 420 python3 -m pytest -q -p no:cacheprovider --timeout 150 -rfE \
      tests/gpu/test_piecewise_cuda_graphs.py tests/gpu/test_engine_on_gpu.py tests/gpu/test_moe_engine_on_gpu.py \
      tests/gpu/test_fused_moe.py tests/gpu/test_fp8_moe_engine_on_gpu.py --junitxml="$OUT/junit_piecewise.xml" ;;
  w5-piecewise)  # issue 14: W5 from the block-FP8 checkpoint at QPS = inf with piecewise graphs (the default), without
    # (--max-piecewise-graph-tokens 0: prompt steps eager, as before), and with no prompt cap while decoding (vLLM's
    # behaviour: 500 prompts in ~13 steps of 8,192 tokens, not ~51 of 2,048), one call, step traces summarised
    run w5_piecewise 580 python3 bench/w5_moe.py --num-layers 48 --checkpoint fp8-block --hf-requests 0 --qps inf \
      --step-trace --also-serve "--max-piecewise-graph-tokens 0" --also-serve "--max-prefill-tokens-while-decoding 0" \
      --out "$OUT/w5_piecewise.json" ;;
  w5-or-w2-piecewise)  # a session's last minutes: on an H200 (issue 14's card) W5 from the block-FP8 checkpoint with
    # piecewise graphs, with and without the prompt cap while decoding; on another card W2 with piecewise graphs
    # to 1,344 tokens (the default for its 8B shape, host_bound_tokens), to 3,072 (41.0 against 42.9 req/s without
    # on 2026-12-06) and none
    if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
      run w5_h200 540 python3 bench/w5_moe.py --num-layers 48 --checkpoint fp8-block --hf-requests 0 --qps inf \
        --step-trace --also-serve "--max-prefill-tokens-while-decoding 0" --out "$OUT/w5_h200.json"
    else
      KUBELLM_STEP_TRACE="$OUT/w2_piecewise_trace.jsonl" run w2_piecewise 420 python3 bench/w2_serving.py --qps inf \
        --sweep max-piecewise-graph-tokens=1344,3072,0 --out "$OUT/w2_piecewise.json"
    fi ;;
  moe-align)  # issue 14: the MoE alignment's chunked Triton kernels: their GPU tests and the MoE engines', a fused MoE
    # call's kernels (the old one-program alignment took 122 µs of 386 at 256 tokens on an H100), then W5 from the
    # block-FP8 checkpoint at QPS = inf with the committed tuned tiles
    run moe_align_tests 200 python3 -m pytest -q -p no:cacheprovider --timeout 120 -rfE tests/gpu/test_fused_moe.py \
      tests/gpu/test_moe_engine_on_gpu.py tests/gpu/test_fp8_moe_engine_on_gpu.py
    run moe_call_kernels 60 python3 bench/diag/moe_call_kernels.py --tokens 1 16 64 256 512 1024 2048
    run w5_align 280 python3 bench/w5_moe.py --num-layers 48 --checkpoint fp8-block --hf-requests 0 --qps inf \
      --out "$OUT/w5_align.json" ;;
  moe-align-chunks)  # issue 14: the MoE alignment's chunk sized to the slots (align_chunk, 2026-12-07: a one-token step scanned
    # a 128-slot tile): its GPU tests, every chunk size timed at decode token counts, a fused MoE call's kernels (~90 s)
    run align_tests 120 python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_fused_moe.py -k "align or small"
    run moe_align_chunks 60 python3 bench/diag/moe_align_chunks.py --out "$OUT/moe_align_chunks.json"
    run moe_call_kernels 60 python3 bench/diag/moe_call_kernels.py --tokens 1 8 32 128 ;;
  moe-quant)  # issue 14: the grouped activation quantization (a tile of groups per program): its GPU tests (bits equal to
    # torch's) and the FP8 experts', a fused MoE call's kernels, then W5 from the block-FP8 checkpoint at QPS = inf with
    # the server's step trace summarised (prompt steps against decode-only ones by batch size)
    run quant_tests 150 python3 -m pytest -q -p no:cacheprovider --timeout 120 --maxfail 5 -rfE \
      tests/gpu/test_fp8_quant_kernel.py tests/gpu/test_fp8_gemm.py tests/gpu/test_fused_moe_fp8.py
    run moe_call_kernels 40 python3 bench/diag/moe_call_kernels.py --tokens 1 16 256 512 2048
    run w5_trace 280 python3 bench/w5_moe.py --num-layers 48 --checkpoint fp8-block --hf-requests 0 --qps inf \
      --step-trace --out "$OUT/w5_trace.json" ;;
  fp8-kv-tiles)  # issues 13/14: decode attention's tiles over FP8 caches against bf16 (W5 gained nothing from FP8 K/V:
    # the kernel reads them with the bf16 tile, half the bytes an iteration); the 8B's and Qwen3-30B-A3B's shapes
    run decode_tiles 300 python3 bench/kernels.py --only decode --out "$OUT/decode_tiles.json" ;;
  w5-kernels)  # issue 14: where a W5 step's GPU time goes (the block-FP8 checkpoint, 48 layers): a 2,048-token prompt
    # step (eager, with its wall time: W5's prompt steps took 77 ms each) and a 32-sequence decode step (its
    # tail: a quarter of the run at 9-32 sequences), kernels by category; the quantization's GPU tests first
    run quant_tests 60 python3 -m pytest -q -p no:cacheprovider -rfE tests/gpu/test_fp8_quant_kernel.py
    run w5_step_kernels 330 python3 bench/diag/step_kernels.py --shape qwen3-30b-a3b-fp8 --variants bf16 \
      --batch 32 --context 1024 --steps 4 --prefill-seqs 2 --prefill-len 1024 --out "$OUT/w5_step_kernels.json" ;;
  w5-kv)  # issue 14: W5 from the block-FP8 checkpoint at QPS = inf, with an FP8 KV cache against bf16 K/V (its K/V reads
    # are half a 256-sequence step's floor), one call; moe-tune-w5's tiles where this machine still holds them
    for kv in fp8 auto; do
      KUBELLM_MOE_CONFIG_DIR="$TUNED" run "w5_kv_$kv" 280 python3 bench/w5_moe.py --num-layers 48 \
        --checkpoint fp8-block --hf-requests 0 --qps inf --kv-cache-dtype "$kv" --out "$OUT/w5_kv_$kv.json"
    done ;;
  w5-fp8)  # issues 13/14: W5 served in bf16, then with --quantization fp8 (online W8A8, FP8 experts), one checkpoint,
    # one call; 24 of 48 layers on every card, for time (two servers and two in-process engines; ~6 min)
    run w5_fp8 560 python3 bench/w5_moe.py --num-layers 24 --quantization none fp8 --hf-requests 0 \
      --out "$OUT/w5_fp8.json" ;;
  w5-fp8-full)  # issues 14/13: all 48 layers with --quantization fp8 (FP8 experts: 30 GB, twice the bf16 ceiling; see
    # bench/serving_floor.py), served alone for time; the bf16 figures and transformers' baseline come from `w5`
    run w5_fp8_full 560 python3 bench/w5_moe.py --num-layers 48 --quantization fp8 --hf-requests 0 \
      --out "$OUT/w5_fp8_full.json" ;;
  w5-fp8-ckpt)  # issues 14/13: all 48 layers from a block-FP8 checkpoint written as Qwen3-30B-A3B-FP8 publishes it (31 GB:
    # fits an 80 GB H100), served without --quantization (the engine reads the scheme); compare with `w5-fp8-full`
    run w5_fp8_ckpt 560 python3 bench/w5_moe.py --num-layers 48 --checkpoint fp8-block --hf-requests 0 \
      --out "$OUT/w5_fp8_ckpt.json" ;;
  w5)  # issue 14: Qwen3-30B-A3B shape, HTTP, transformers baseline in the same call; 24 of 48 layers under 100 GB
    mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
    layers=48; (( mib < 100000 )) && layers=24
    run w5 560 python3 bench/w5_moe.py --num-layers "$layers" --out "$OUT/w5.json" ;;
  structured)  # issue 10: decode throughput, half the requests under a JSON schema, 16 and 256 concurrent (first
    # run since the string-chain fix and the grammar overlap), with the step trace; then the engine suite's grammar
    # and async-scheduling tests on the GPU
    KUBELLM_STEP_TRACE="$OUT/structured_trace.jsonl" run structured 300 python3 bench/structured_outputs.py \
      --tokenizer bench/data/w2_text/tokenizer --out "$OUT/structured.json"
    KUBELLM_TEST_DEVICE=cuda KUBELLM_TEST_TOKENIZER=bench/data/w2_text/tokenizer run engine_tests_cuda 200 python3 -m pytest -q -p no:cacheprovider \
      tests/engine/test_structured_engine.py tests/engine/test_async_scheduling.py ;;
  structured-profile)  # issue 10: where a constrained step's host time goes on the GPU machine (cProfile, 256 concurrent)
    run structured_profile 200 python3 bench/structured_outputs.py --tokenizer bench/data/w2_text/tokenizer \
      --concurrency 256 --max-tokens 128 --profile 45 --profile-prefix "$OUT/structured_profile"
    run structured_8b 420 python3 bench/structured_outputs.py --tokenizer bench/data/w2_text/tokenizer \
      --shape llama-3.1-8b --out "$OUT/structured_8b.json" ;;
  fp8)  # issue 13: the FP8 + FP8-KV diagnosis (parts against the combination) and the FP8 GPU tests
    run fp8_kv 120 python3 bench/diag/fp8_kv_first_tokens.py --out "$OUT/fp8_kv.json"
    run fp8_tests 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_engine_on_gpu.py ;;
  tests)  # every GPU test (tests/gpu) on the current code; the two failures of 2026-12-05 first
    run gpu_tests 540 python3 -m pytest tests/gpu/test_fp8_engine_on_gpu.py tests/gpu/test_moe_engine_on_gpu.py \
      tests/gpu -q -p no:cacheprovider --timeout 120 -rfE -k "not cpu_interpreter" --junitxml="$OUT/junit.xml" ;;
  tests-fp8)  # the GPU tests of the code changed since tests/gpu last ran: FP8 GEMM tiles (both scale layouts), FP8
    # engines, the shared small_engine builder (engine, FP8, MoE on the GPU), the MoE router kernel, the sampler on
    # bfloat16 logits (its CUDA cases), the step timer behind --max-prefill-tokens-while-decoding auto; FP8 experts (~540 s)
    run gpu_tests_fp8 300 python3 -m pytest tests/gpu/test_fp8_gemm.py tests/gpu/test_fp8_quant_kernel.py \
      tests/gpu/test_moe_router.py tests/gpu/test_fp8_engine_on_gpu.py tests/gpu/test_engine_on_gpu.py \
      tests/gpu/test_moe_engine_on_gpu.py tests/gpu/test_step_timer_on_gpu.py tests/unit/test_sampler.py \
      -q -p no:cacheprovider --timeout 120 -rfE --junitxml="$OUT/junit_fp8.xml"
    # FP8 experts: the fused kernel against float32 references, then FP8 MoE engines against the dequantized bf16 ones
    run gpu_tests_fp8_moe 240 python3 -m pytest tests/gpu/test_fused_moe_fp8.py tests/gpu/test_fp8_moe_engine_on_gpu.py \
      -q -p no:cacheprovider --timeout 120 --maxfail 10 -rfE --junitxml="$OUT/junit_fp8_moe.xml" ;;
  w1)  # issue 13's W1 bar (H200: >= 28,800 tok/s), main and the old code on the same machine
    run w1 150 python3 bench/w1_offline.py --hf-seqs 0 --out "$OUT/w1.json"
    (cd .carry/base && run w1_base 150 python3 bench/w1_offline.py --hf-seqs 0 --out "$OUT/w1_base.json") ;;
  *) echo "usage: bench/gpu_backlog.sh since-gpu|router-in-norm|rotary-cache|route-in-align|w5-vs-base|h200-first|fp8-fused-sum|first-w5 [short|tiny]|tile-w1|first [tiny]|all-bars|all-bars-w2 [w1]|w1-prefill|overlap|pdl|bf16-linears|piecewise-tests|w5-piecewise|w5-or-w2-piecewise|w5-kernels|fp8-kv-tiles|moe-quant|moe-align|moe-align-chunks|moe-tune-w5|w5-kv|w5-fp8-ckpt-hf|w5-cap|bars13|w5-fp8-full|w5-fp8-ckpt|w1-kernels [all]|tests-fp8|fp8-tune|tests|moe-tune|w5|moe-tune-fp8|w5-fp8|w2-cap|w2-fp8|fp8-kernels|w2-text|structured|structured-profile|fp8|w2|w1" >&2; exit 2 ;;
esac
