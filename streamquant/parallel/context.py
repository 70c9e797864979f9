"""Tensor-parallel context and the collectives the layers need.

`TPContext` is a frozen value handed to every layer and parameter: the rank and size are never
read from a global process group inside a constructor, so a test can build "rank 2 of 4" in one
process. Collectives are no-ops at size 1, so single-process code never touches
`torch.distributed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPContext:
    """Which tensor-parallel rank this process is, out of how many, and over which group."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    # dtype row-parallel partial sums are computed and all-reduced in (None: the activations' dtype,
    # as vLLM does; torch.float32: one rounding after the sum, as at TP=1; see quant/math/matmul.py)
    reduce_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"tensor-parallel size must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside [0, {self.size})")

    @classmethod
    def from_process_group(cls, group: dist.ProcessGroup | None = None,
                           reduce_dtype: torch.dtype | None = None) -> "TPContext":
        """The context of this process in an initialized `torch.distributed` group."""
        if not dist.is_available() or not dist.is_initialized():
            return cls(reduce_dtype=reduce_dtype)
        return cls(rank=dist.get_rank(group), size=dist.get_world_size(group), group=group, reduce_dtype=reduce_dtype)

    def partial_sum_dtype(self, dtype: torch.dtype) -> torch.dtype | None:
        """The dtype a row-parallel layer computing in `dtype` should give its partial sums, or None
        when they stay in `dtype` (a single rank, no `reduce_dtype`, or the same dtype)."""
        if self.size == 1 or self.reduce_dtype is None or self.reduce_dtype == dtype:
            return None
        return self.reduce_dtype


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """Exact division, with an error naming what could not be split."""
    if numerator % denominator != 0:
        raise ValueError(f"{what} {numerator} is not divisible by tensor-parallel size {denominator}")
    return numerator // denominator


def all_reduce(x: torch.Tensor, tp: TPContext, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce `x` over the tensor-parallel group with `op` (default: sum), in place; identity at size 1.

    A host tensor over an NCCL group (e.g. amax grids of a layer quantized on the CPU with
    offload) travels through the current CUDA device: NCCL only moves device memory."""
    if tp.size == 1:
        return x
    if x.device.type == "cpu" and dist.get_backend(tp.group) == "nccl":
        staged = x.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(staged, op=op, group=tp.group)
        return x.copy_(staged)
    dist.all_reduce(x, op=op, group=tp.group)
    return x


def all_gather(x: torch.Tensor, tp: TPContext, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`; identity at size 1."""
    if tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=dim)


# What gloo / NCCL say when a peer is gone or silent (a timeout, a closed connection).
PEER_FAILURE_MARKERS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                        "connection refused")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether a rank's exception says that another rank died or stopped answering."""
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in PEER_FAILURE_MARKERS)


def is_peer_timeout(exc: BaseException) -> bool:
    """Whether a rank's exception says that a collective timed out waiting for another rank."""
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in PEER_FAILURE_MARKERS[:2])


def default_tp() -> TPContext:
    """This process's TP context: the whole initialized process group, or a single rank."""
    if dist.is_available() and dist.is_initialized():
        return TPContext.from_process_group()
    return TPContext()
