"""The vocabulary's two layers as engine.model.layer_kit builds them: the token embedding and the LM
head, each holding one contiguous block of vocabulary rows per tensor-parallel rank (the row count
padded up to a multiple of the ranks; padding rows are zero and their logits are cut off).

Sharded, the embedding looks up the rows it holds and all-reduces (each token's row lives on exactly
one rank); the LM head computes its block of logits and gathers them on rank 0, which samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.model.linear import all_reduce, pack_for_matmul
from engine.model.sharding import CheckpointTensor, Shard, copy_checked


class VocabRows(nn.Module):
    """A [vocab, hidden] weight of which this rank holds rows [vocab_start, vocab_start + num_rows)."""

    def __init__(self, vocab_size: int, hidden_size: int, shard: Shard) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.shard = shard
        self.vocab_start, self.num_rows = shard.padded(vocab_size)
        self.weight = nn.Parameter(torch.empty(self.num_rows, hidden_size), requires_grad=False)

    def load_weight(self, param_name: str, tensor: CheckpointTensor, part: str) -> None:
        if tuple(tensor.shape) != (self.vocab_size, self.weight.shape[1]):
            raise ValueError(
                f"checkpoint shape {tuple(tensor.shape)} != expected {(self.vocab_size, self.weight.shape[1])}"
            )
        held = max(0, min(self.num_rows, self.vocab_size - self.vocab_start))  # the last rank's may be short
        copy_checked(self.weight.data[:held], tensor.read(0, self.vocab_start, held), tuple(tensor.shape))
        self.weight.data[held:].zero_()

    def finish_loading(self) -> None:
        """Called once every weight is in place."""


class VocabEmbedding(VocabRows):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.shard.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        elsewhere = (local < 0) | (local >= self.num_rows)
        x = F.embedding(local.masked_fill(elsewhere, 0), self.weight)
        return all_reduce(x.masked_fill_(elsewhere[:, None], 0))


class LMHead(VocabRows):
    """hidden [N, hidden] -> logits [N, vocab] on rank 0 (None on the other ranks): float32, or with
    ``float_logits=False`` the product's own dtype. The kit asks for the latter on CUDA, where every reader
    upcasts as it reads (greedy argmax, the sampling and grammar-bitmask kernels, the sampler's general path
    and prompt logprobs call ``.float()`` first; bfloat16 to float32 is exact, so the tokens are the same): a
    separate conversion would write and read the [N, vocab] logits once more in float32 every step (~0.3 GB
    at 256 rows of a 152k vocabulary)."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        shard: Shard,
        float_logits: bool = True,
        row_multiple: int = 1,
    ) -> None:
        super().__init__(vocab_size, hidden_size, shard)
        self.float_logits = float_logits
        # On the CPU, MKL computes the rows past the last multiple of 4 as matrix-vector products, each
        # reading the whole head (~110 MB in float32 for a 49k vocabulary, far beyond the caches): 2 or 3 rows
        # took 2-3x as long as 4 (AMD EPYC, torch 2.15). Padded to whole groups of 4, a step pays at most
        # three extra rows of a product bound by reading the weight. One row stays one (one product is fastest).
        self.row_multiple = row_multiple

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        rows = hidden.shape[0]
        padded = -(-rows // self.row_multiple) * self.row_multiple if rows > 1 else rows
        if padded != rows:
            hidden = F.pad(hidden, (0, 0, 0, padded - rows))
        logits = F.linear(hidden, self.weight)[:rows]
        return self.gather(logits.float() if self.float_logits else logits)

    def gather(self, logits: torch.Tensor) -> torch.Tensor | None:
        if self.shard.size == 1:
            return logits
        logits = logits.contiguous()
        if self.shard.rank != 0:
            torch.distributed.gather(logits, None, dst=0)
            return None
        blocks = [torch.empty_like(logits) for _ in range(self.shard.size)]
        torch.distributed.gather(logits, blocks, dst=0)
        return torch.cat(blocks, dim=-1)[:, : self.vocab_size]


class LowPrecisionLMHead(LMHead):
    """The LM head as a low-precision matmul whose leading logits are then recomputed exactly.

    A bfloat16 matmul returns bfloat16 results: at a logit of 20 their spacing is 0.125, so near-ties
    between the best tokens (common: several steps in every long answer of a small model) become exact
    ties, greedy decoding picks the wrong one and the answer drifts (see engine.model.loader). Here the
    full [N, vocab] product runs in bfloat16 (with oneDNN-packed weights about 5x faster than float32
    on AMX; the head is a fifth of a small model's weights), then the ``top_k`` largest logits of each
    row are recomputed in float32 from the float32 hidden state and float32 head weights and written
    back. Greedy choices and the probabilities that matter for sampling are float32's; the tail of the
    distribution keeps bfloat16's error (relative 2**-8 or so). Sharded, each rank recomputes its own
    block's leaders, so the global leaders are exact too.
    """

    def __init__(
        self, vocab_size: int, hidden_size: int, shard: Shard, matmul_dtype: torch.dtype, top_k: int = 16
    ) -> None:
        super().__init__(vocab_size, hidden_size, shard)
        self.matmul_dtype = matmul_dtype
        self.top_k = min(top_k, self.num_rows)
        # `weight` (float32, shared with the embedding when tied) in matmul_dtype, set by finish_loading:
        # oneDNN-packed where it can be, else plain
        self.low_weight: torch.Tensor | None = None
        self.low_weight_packed = False

    def finish_loading(self) -> None:
        low = self.weight.detach().to(self.matmul_dtype)
        packed = pack_for_matmul(low)
        self.low_weight, self.low_weight_packed = (low, False) if packed is None else (packed, True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        assert self.low_weight is not None, "finish_loading was not called"
        hidden = hidden.float()
        low = hidden.to(self.matmul_dtype)
        if self.low_weight_packed:
            logits = torch.ops.mkldnn._linear_pointwise(low, self.low_weight, None, "none", [], "")
        else:
            logits = F.linear(low, self.low_weight)
        logits = logits.float()
        top = logits.topk(self.top_k, dim=-1, sorted=False).indices  # [N, k]
        exact = torch.bmm(self.weight[top], hidden[:, :, None]).squeeze(-1)  # [N, k, H] @ [N, H, 1]
        return self.gather(logits.scatter_(1, top, exact))
