"""Parallel linear layers: replicated, column, merged column (gate/up), QKV, row.

Each layer holds sizes and a `TPContext`, asks its quant method to create the weights, and hands
each parameter a `weight_loader` that is a `functools.partial` of a module-level function over
plain values (never a bound method: no parameter -> module -> parameter cycle).

Fused layers accept either one logical shard at a time (`shard_id` 0/1 for gate/up, "q"/"k"/"v")
or, with `shard_id=None`, a checkpoint tensor that is already fused on disk.
"""

from __future__ import annotations

import functools

import torch

from streamquant.loading.parameters import BaseParameter, ColumnParameter, shard_id_as_int
from streamquant.loading.region import Region
from streamquant.parallel.context import TPContext, all_gather, all_reduce, divide
from streamquant.quant.base import LinearMethod, QuantConfig
from streamquant.quant.math.granularity import LogicalShard, Window
from streamquant.quant.unquantized import UnquantizedLinearMethod


def column_loader(param: torch.Tensor, loaded: torch.Tensor) -> list[Region]:
    return param.load_column_parallel_weight(loaded)


def row_loader(param: torch.Tensor, loaded: torch.Tensor) -> list[Region]:
    return param.load_row_parallel_weight(loaded)


def _split_fused(param, loaded: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    dim = getattr(param, "output_dim", None)
    if dim is None:
        raise ValueError("a fused checkpoint tensor needs a parameter with an output_dim to split")
    if getattr(param, "packed_dim", None) == dim:  # on disk the fused dim is packed too
        sizes = [round(s // param.packed_factor) for s in sizes]
    if loaded.shape[dim] != sum(sizes):
        raise ValueError(f"fused checkpoint tensor has {loaded.shape[dim]} rows along dim {dim}, expected {sum(sizes)}")
    return list(loaded.split(sizes, dim=dim))


def merged_column_loader(
    param: torch.Tensor, loaded: torch.Tensor, shard_id: int | None = None, *, output_sizes: tuple[int, ...], tp: TPContext
) -> list[Region]:
    """Load shard `shard_id` of a `MergedColumnParallelLinear` (sizes are the full, unsharded ones)."""
    if shard_id is None:
        parts = _split_fused(param, loaded, list(output_sizes))
        return [r for i, part in enumerate(parts) for r in merged_column_loader(param, part, i, output_sizes=output_sizes, tp=tp)]
    index = shard_id_as_int(shard_id)
    if not 0 <= index < len(output_sizes):
        raise ValueError(f"shard id {shard_id!r} out of range for {len(output_sizes)} merged shards")
    offset = sum(output_sizes[:index]) // tp.size
    size = output_sizes[index] // tp.size
    return param.load_merged_column_weight(loaded, shard_id=index, shard_offset=offset, shard_size=size)


def qkv_loader(
    param: torch.Tensor,
    loaded: torch.Tensor,
    shard_id: str | None = None,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    num_kv_head_replicas: int,
) -> list[Region]:
    """Load the q, k or v shard of a `QKVParallelLinear` (`num_heads` / `num_kv_heads` per rank)."""
    q, kv = num_heads * head_size, num_kv_heads * head_size
    layout = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}
    kwargs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_size=head_size, num_kv_head_replicas=num_kv_head_replicas)
    if shard_id is None:
        full_q = q * param.tp.size
        full_kv = kv * param.tp.size // num_kv_head_replicas
        parts = _split_fused(param, loaded, [full_q, full_kv, full_kv])
        return [r for sid, part in zip("qkv", parts) for r in qkv_loader(param, part, sid, **kwargs)]
    if shard_id not in layout:
        raise ValueError(f"unknown qkv shard id {shard_id!r}; expected 'q', 'k' or 'v'")
    offset, size = layout[shard_id]
    return param.load_qkv_weight(
        loaded, shard_id=shard_id, shard_offset=offset, shard_size=size, num_kv_head_replicas=num_kv_head_replicas
    )


class LinearBase(torch.nn.Module):
    """Shared constructor: sizes, dtype, tp, quant method."""

    def __init__(self, input_size: int, output_size: int, *, tp: TPContext, quant_config: QuantConfig | None,
                 prefix: str, params_dtype: torch.dtype | None):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.tp = tp
        self.prefix = prefix
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.uses_quant_config = quant_config is not None  # False: always unquantized (e.g. a router gate)
        self.quant_method: LinearMethod = (
            quant_config.get_linear_method(prefix) if quant_config is not None else UnquantizedLinearMethod()
        )

    def _create(self, input_per_partition: int, output_partition_sizes: list[int], loader, tp: TPContext,
                shards: tuple[LogicalShard, ...]) -> None:
        """Create the weights; `shards` are this rank's windows of the logical weights stacked in `weight`."""
        self.input_size_per_partition = input_per_partition
        self.output_partition_sizes = output_partition_sizes
        self.logical_shards = {"weight": shards}
        self.quant_method.create_weights(
            self, input_per_partition, output_partition_sizes, self.input_size, self.output_size,
            self.params_dtype, tp, loader,
        )

    def _column_bias(self, bias: bool, size: int, loader, tp: TPContext) -> None:
        if not bias:
            self.register_parameter("bias", None)
            return
        data = torch.empty(size, dtype=self.params_dtype)
        self.register_parameter("bias", ColumnParameter(data=data, output_dim=0, weight_loader=loader, tp=tp))

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, tp={self.tp.rank}/{self.tp.size}, prefix={self.prefix!r}"


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank (e.g. MoE router gate)."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, tp: TPContext = TPContext(),
                 quant_config: QuantConfig | None = None, prefix: str = "", params_dtype: torch.dtype | None = None):
        super().__init__(input_size, output_size, tp=tp, quant_config=quant_config, prefix=prefix, params_dtype=params_dtype)
        whole = TPContext()
        shards = (LogicalShard("", Window(0, 0, output_size, input_size)),)
        self._create(input_size, [output_size], column_loader, whole, shards)
        self._column_bias(bias, output_size, column_loader, whole)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; optionally gathered back."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, gather_output: bool = False,
                 tp: TPContext = TPContext(), quant_config: QuantConfig | None = None, prefix: str = "",
                 params_dtype: torch.dtype | None = None, output_sizes: list[int] | None = None):
        super().__init__(input_size, output_size, tp=tp, quant_config=quant_config, prefix=prefix, params_dtype=params_dtype)
        self.gather_output = gather_output
        self.output_sizes = list(output_sizes or [output_size])
        partition_sizes = [divide(s, tp.size, f"{prefix} output size") for s in self.output_sizes]
        loader = self._loader()
        self._create(input_size, partition_sizes, loader, tp, self._shards(partition_sizes))
        self._column_bias(bias, sum(partition_sizes), loader, tp)

    def _loader(self):
        return column_loader

    def _shards(self, partition_sizes: list[int]) -> tuple[LogicalShard, ...]:
        """Rank k holds rows [k * p, (k + 1) * p) of each logical output of full size p * tp."""
        labels = self._labels() if len(partition_sizes) > 1 else ("",)
        return tuple(
            LogicalShard(label, Window(self.tp.rank * p, 0, p * self.tp.size, self.input_size, rows=p))
            for label, p in zip(labels, partition_sizes)
        )

    def _labels(self) -> tuple[str, ...]:
        return tuple(str(i) for i in range(len(self.output_sizes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x, self.bias)
        return all_gather(y, self.tp) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one weight (gate_proj + up_proj -> gate_up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], **kwargs):
        self._merged_sizes = tuple(output_sizes)
        super().__init__(input_size, sum(output_sizes), output_sizes=list(output_sizes), **kwargs)

    def _loader(self):
        return functools.partial(merged_column_loader, output_sizes=self._merged_sizes, tp=self.tp)

    def _labels(self) -> tuple[str, ...]:
        return ("gate", "up") if len(self._merged_sizes) == 2 else super()._labels()


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections in one weight; kv heads replicated when fewer than tp ranks."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int, total_num_kv_heads: int | None = None,
                 *, tp: TPContext = TPContext(), **kwargs):
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.num_heads = divide(total_num_heads, tp.size, "number of attention heads")
        if tp.size >= total_num_kv_heads:
            divide(tp.size, total_num_kv_heads, "(kv heads fewer than ranks) tensor-parallel size")
            self.num_kv_heads = 1
            self.num_kv_head_replicas = tp.size // total_num_kv_heads
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp.size, "number of kv heads")
            self.num_kv_head_replicas = 1
        q_size = total_num_heads * head_size
        kv_size = self.num_kv_heads * tp.size * head_size  # replicated kv counted per rank
        super().__init__(hidden_size, q_size + 2 * total_num_kv_heads * head_size,
                         output_sizes=[q_size, kv_size, kv_size], tp=tp, **kwargs)
        self.output_size = q_size + 2 * total_num_kv_heads * head_size

    def _shards(self, partition_sizes: list[int]) -> tuple[LogicalShard, ...]:
        """q as any column shard; k and v: rank k holds kv head group k // replicas of the real kv heads."""
        q, kv = partition_sizes[0], partition_sizes[1]
        full_kv = kv * self.tp.size // self.num_kv_head_replicas
        start = (self.tp.rank // self.num_kv_head_replicas) * kv
        return (
            LogicalShard("q", Window(self.tp.rank * q, 0, q * self.tp.size, self.input_size, rows=q)),
            LogicalShard("k", Window(start, 0, full_kv, self.input_size, rows=kv)),
            LogicalShard("v", Window(start, 0, full_kv, self.input_size, rows=kv)),
        )

    def _loader(self):
        return functools.partial(
            qkv_loader, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_size=self.head_size, num_kv_head_replicas=self.num_kv_head_replicas,
        )


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs all-reduced.

    The bias is added once, inside rank 0's matmul (as vLLM does), so TP=1 rounds exactly like
    `F.linear(x, w, b)`. With `tp.reduce_dtype` (e.g. float32) the partial sums are computed and
    all-reduced in that dtype and rounded to `x.dtype` once, after the sum (`quant/math/matmul.py`).
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = False, reduce_results: bool = True,
                 tp: TPContext = TPContext(), quant_config: QuantConfig | None = None, prefix: str = "",
                 params_dtype: torch.dtype | None = None):
        super().__init__(input_size, output_size, tp=tp, quant_config=quant_config, prefix=prefix, params_dtype=params_dtype)
        self.reduce_results = reduce_results
        in_per_rank = divide(input_size, tp.size, f"{prefix} input size")
        shards = (LogicalShard("", Window(0, tp.rank * in_per_rank, output_size, input_size, cols=in_per_rank)),)
        self._create(in_per_rank, [output_size], row_loader, tp, shards)
        if bias:
            data = torch.empty(output_size, dtype=self.params_dtype)
            self.register_parameter("bias", BaseParameter(data=data, weight_loader=row_loader, tp=tp))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = self.tp.partial_sum_dtype(x.dtype) if self.reduce_results else None
        if wide is None:
            y = self.quant_method.apply(self, x, self.bias if self.tp.rank == 0 else None)
            return all_reduce(y, self.tp) if self.reduce_results else y
        y = self.quant_method.apply(self, x, self.bias if self.tp.rank == 0 else None, out_dtype=wide)
        return all_reduce(y, self.tp).to(x.dtype)
