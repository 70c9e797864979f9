"""Vocab-parallel token embedding and LM head.

Owns the vocabulary split: the vocab is padded up to a multiple of the tensor-parallel size
(`pad_vocab_size`) and rank r holds rows `[r * V_rank, (r + 1) * V_rank)` of the padded table. The
weight is created by the layer's `EmbeddingMethod` ([V_rank, hidden], a `ColumnParameter` split
along dim 0) and filled by `vocab_parallel_weight_loader`.

Invariants:
- Padded rows (ids >= num_embeddings) are zero after every load, whatever the memory held before,
  and the loader reports them as written, so completion tracking sees the whole parameter.
- Embedding: each rank looks up only the ids it owns, zeroes the rest, and the ranks' partial
  results are summed (`all_reduce`). LM head: each rank computes the logits of its rows, they are
  concatenated (`all_gather`) and cut back to `num_embeddings`, so padding never reaches a caller.
- A tied LM head (`tie_weights`) holds the very same parameter objects as the embedding and uses
  the embedding's quant method: the tied head is whatever the embedding is (vLLM's choice), and a
  checkpoint's separate `lm_head.weight`, if any, must be skipped by the model's mapping.

Limitations: no LoRA/extra vocabulary; ids outside [0, padded vocab) are not checked and embed to
zeros.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from streamquant.loading.parameters import ColumnParameter, WeightShapeError, write_region
from streamquant.loading.region import Region, full_region, narrow_region
from streamquant.parallel.context import TPContext, all_gather, all_reduce
from streamquant.quant.base import EmbeddingMethod, QuantConfig
from streamquant.quant.unquantized import UnquantizedEmbeddingMethod


def pad_vocab_size(vocab_size: int, tp_size: int) -> int:
    """`vocab_size` rounded up to a multiple of `tp_size`, so every rank holds the same row count.

    vLLM also rounds to 64 for kernel alignment; nothing here needs that, so the pad stays below
    `tp_size` rows.
    """
    if vocab_size < 1 or tp_size < 1:
        raise ValueError(f"vocab size {vocab_size} and tensor-parallel size {tp_size} must be positive")
    return -(-vocab_size // tp_size) * tp_size


def vocab_parallel_weight_loader(
    param: torch.Tensor, loaded: torch.Tensor, *, num_embeddings: int, tp: TPContext
) -> list[Region]:
    """Copy this rank's rows of a full [vocab, ...] checkpoint tensor; zero the padded rows.

    Returns regions covering the whole parameter (valid rows, then pad rows).
    """
    expected = (num_embeddings, *param.shape[1:])
    if tuple(loaded.shape) != expected:
        raise WeightShapeError(
            f"vocab-parallel weight: expected checkpoint shape {list(expected)}, received {list(loaded.shape)}"
        )
    rows = param.shape[0]
    start = tp.rank * rows
    valid = max(0, min(rows, num_embeddings - start))
    whole = full_region(param.shape)
    regions: list[Region] = []
    if valid > 0:
        regions += write_region(param, narrow_region(whole, 0, 0, valid), loaded.narrow(0, start, valid))
    if valid < rows:
        pad = narrow_region(whole, 0, valid, rows - valid)
        zeros = torch.zeros((), dtype=param.dtype, device=param.device).expand(rows - valid, *param.shape[1:])
        regions += write_region(param, pad, zeros)
    return regions


class VocabParallelEmbedding(nn.Module):
    """Token ids [...] -> embeddings [..., embedding_dim], vocab split across ranks."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        tp: TPContext = TPContext(),
        quant_config: QuantConfig | None = None,
        params_dtype: torch.dtype | None = None,
        prefix: str = "",
    ):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp = tp
        self.prefix = prefix
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, tp.size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // tp.size
        self.vocab_start_index = tp.rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.quant_method: EmbeddingMethod = (
            quant_config.get_embedding_method(prefix) if quant_config is not None else UnquantizedEmbeddingMethod()
        )
        self.quant_method.create_weights(
            self, self.num_embeddings_per_partition, embedding_dim, self.params_dtype, tp, self._weight_loader()
        )

    def _weight_loader(self):
        return functools.partial(vocab_parallel_weight_loader, num_embeddings=self.num_embeddings, tp=self.tp)

    def local_embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        """This rank's partial embeddings: rows it owns, zeros for every other id (before the sum)."""
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = torch.where(outside, 0, input_ids - self.vocab_start_index)
        out = self.quant_method.embedding(self, local_ids)
        return out.masked_fill(outside.unsqueeze(-1), 0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.local_embedding(input_ids), self.tp)

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings} (padded {self.num_embeddings_padded}), "
            f"dim={self.embedding_dim}, tp={self.tp.rank}/{self.tp.size}, prefix={self.prefix!r}"
        )


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states [..., dim] -> logits [..., num_embeddings], vocab rows split across ranks."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        bias: bool = False,
        tp: TPContext = TPContext(),
        quant_config: QuantConfig | None = None,
        params_dtype: torch.dtype | None = None,
        prefix: str = "",
    ):
        super().__init__(
            num_embeddings, embedding_dim, tp=tp, quant_config=quant_config, params_dtype=params_dtype, prefix=prefix
        )
        if bias:
            data = torch.empty(self.num_embeddings_per_partition, dtype=self.params_dtype)
            self.bias = ColumnParameter(data=data, output_dim=0, weight_loader=self._weight_loader(), tp=tp)
        else:
            self.register_parameter("bias", None)

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's parameters (same objects) and its quant method; keep our own bias."""
        mine = (self.num_embeddings, self.embedding_dim, self.tp.rank, self.tp.size)
        theirs = (embedding.num_embeddings, embedding.embedding_dim, embedding.tp.rank, embedding.tp.size)
        if mine != theirs:
            raise ValueError(f"cannot tie an LM head {mine} to an embedding {theirs} (vocab, dim, rank, size)")
        for name in [n for n in self._parameters if n != "bias"]:
            delattr(self, name)
        for name, param in embedding.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.quant_method = embedding.quant_method

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of this rank's vocab rows, [..., V_rank] (padded rows included)."""
        return self.quant_method.apply(self, hidden, self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = all_gather(self.local_logits(hidden), self.tp, dim=-1)
        return logits[..., : self.num_embeddings]
