"""`weights_fingerprint`: one SHA-256 over every tensor a model computes with, the same on every rank.

What is hashed is the model in its kernel format, as a reload writes it (`contract.inference_tensors`):
codes, scales and zero points of quantized layers, a torchao weight's inner tensors, unquantized
weights; a tied weight once, under its first name. Each tensor's digest is SHA-256 over its raw
bytes (C order); a rank's digest is SHA-256 over the sorted lines `name dtype shape digest`; the
fingerprint is SHA-256 over the ranks' digests in rank order (one all-gather of 32 bytes per rank), so
it is the same string on every rank, stable across processes and machines, and equal for a warm
reload and a cold load of the same weights. `weights_digests` gives the per-tensor digests beside
it, so a mismatch names the tensor (and the rank that holds it).

Cost: one read of the model's bytes (hashlib's SHA-256 runs at about 1-2 GB/s per core). A tensor
never written (a `strict=False` load) hashes as the word `unwritten`.
"""

from __future__ import annotations

import hashlib

import torch

from streamquant.loading.contract import inference_tensors
from streamquant.parallel.context import TPContext, all_gather


def tensor_digest(tensor: torch.Tensor) -> str:
    """Hex SHA-256 of a tensor's bytes in C order (any dtype, any device)."""
    if tensor.is_meta:
        return "unwritten"
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
    return hashlib.sha256(flat.numpy()).hexdigest()


def weights_digests(model: torch.nn.Module) -> dict[str, str]:
    """This rank's per-tensor digests, by name (`contract.inference_tensors` names)."""
    return {name: tensor_digest(t) for name, t in sorted(inference_tensors(model).items())}


def _rank_digest(tensors: dict[str, torch.Tensor], digests: dict[str, str]) -> bytes:
    lines = [f"{name} {str(tensors[name].dtype).removeprefix('torch.')} {list(tensors[name].shape)} {digest}"
             for name, digest in sorted(digests.items())]
    return hashlib.sha256("\n".join(lines).encode()).digest()


def weights_fingerprint(model: torch.nn.Module, digests: dict[str, str] | None = None) -> str:
    """Hex SHA-256 of the whole model over its tensor-parallel group (see the module doc). A collective
    at TP > 1: every rank of the group calls it. `digests`: this rank's `weights_digests`, if at hand."""
    tensors = inference_tensors(model)
    if digests is None:
        digests = {name: tensor_digest(t) for name, t in tensors.items()}
    rank_digest = _rank_digest(tensors, digests)
    tp: TPContext | None = getattr(model, "tp", None)
    if tp is None or tp.size == 1:
        return hashlib.sha256(rank_digest).hexdigest()
    device = next((t.device for t in model.parameters() if not t.is_meta), torch.device("cpu"))
    mine = torch.frombuffer(bytearray(rank_digest), dtype=torch.uint8).to(device)
    every = all_gather(mine, tp, dim=0).cpu()  # [size * 32], in rank order
    return hashlib.sha256(every.numpy().tobytes()).hexdigest()


def digest_mismatches(got: dict[str, str], want: dict[str, str]) -> list[str]:
    """Names whose digests differ, or that only one side has, sorted."""
    return sorted(n for n in got.keys() | want.keys() if got.get(n) != want.get(n))
