"""The GPU attention backend: Triton kernels behind engine.model.attention.AttentionBackend."""

from __future__ import annotations

import torch

from engine.kernels.decode_attention import choose_num_splits, decode_attention
from engine.kernels.decode_tiles import DecodeTile, decode_tile_for
from engine.kernels.prefill_attention import prefill_attention
from engine.kernels.reshape_and_cache import is_fp8_cache, reshape_and_cache
from engine.model.attention import AttentionMetadata


class TritonAttention:
    """Writes the new K/V into the paged cache (unless the rotary did), then sends the leading decode
    tokens to the decode kernel and every other sequence to the varlen prefill kernel."""

    def __init__(
        self,
        num_sms: int | None = None,
        decode_num_splits: int | None = None,
        decode_tile: DecodeTile | None = None,
        fp8_decode_tile: DecodeTile | None = None,
    ) -> None:
        # Read the card's properties once: asking the driver on every layer costs host time.
        on_gpu = torch.cuda.is_available()
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(0).multi_processor_count if on_gpu else 1
        self.num_sms: int = num_sms
        card = torch.cuda.get_device_name(0) if on_gpu else "cpu"
        self.decode_tile: DecodeTile = decode_tile or decode_tile_for(card)
        self.fp8_decode_tile: DecodeTile = (
            fp8_decode_tile or decode_tile or decode_tile_for(card, fp8_cache=True)
        )
        # Fixed split count (CUDA graphs pin one per captured batch size); None chooses per step.
        self.decode_num_splits: int | None = decode_num_splits

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
        kv_scales: torch.Tensor | None = None,
        write_kv: bool = True,
    ) -> torch.Tensor:
        if write_kv:
            reshape_and_cache(k, v, kv_cache, meta.slot_mapping, kv_scales)
        if out is None:
            out = torch.empty_like(q)
        num_decodes = meta.num_decodes
        if num_decodes > 0:
            num_splits = self.decode_num_splits
            if num_splits is None:
                num_splits = choose_num_splits(num_decodes, kv_cache.shape[3], meta.max_seq_len, self.num_sms)
            decode_attention(
                q[:num_decodes],
                kv_cache,
                meta.block_tables[:num_decodes],
                meta.seq_lens[:num_decodes],
                scale,
                out[:num_decodes],
                num_splits=num_splits,
                tile=self.fp8_decode_tile if is_fp8_cache(kv_cache, kv_scales) else self.decode_tile,
                kv_scales=kv_scales,
                seq_order=meta.decode_order,
            )
        if meta.num_seqs > num_decodes:
            prefill_attention(
                q,
                kv_cache,
                meta.block_tables,
                meta.seq_lens,
                meta.query_start_loc,
                meta.max_query_len,
                scale,
                out,
                first_seq=num_decodes,
                kv_scales=kv_scales,
            )
        return out
