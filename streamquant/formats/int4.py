"""What a GPTQ or AWQ checkpoint is read into, and the stream that turns its layers into compressed-tensors'.

`Int4Checkpoint` describes a 4-bit group-quantized checkpoint in compressed-tensors `pack-quantized`
terms (`compressed_tensors_config` is the equivalent `quantization_config`), so one loader serves all
three formats. The layout every converter emits, per quantized linear `X` (compressed-tensors 0.20's
`PackedQuantizationCompressor`, checked against that library in the tests):
  - `X.weight_packed` int32 [out, in / 8]: code q in [-8, 7] of input column 8k + i in bits [4i, 4i + 4)
    of word k, as the nibble q + 8 (offset binary);
  - `X.weight_scale` [out, in / group] in the checkpoint's scale dtype (never cast: same scales);
  - `X.weight_zero_point` int32 [out / 8, in / group] (asymmetric only): packed the same way but along
    the OUTPUT dim, nibble zp + 8;
  - `X.weight_shape` int64 [2] = (out, in);
  - `X.weight_g_idx` int32 [in] (act-order only): the group of each input column.
  The weight is `(q - zp) * scale` with the scale and zero point of the column's group (zp = 0 when
  symmetric). The nibbles of codes and zero points are the formats' unsigned 4-bit values themselves
  (q_u = q + 8, z_u = zp + 8 give the same (q_u - z_u) * scale), so a conversion moves bits, never
  computes a code. Emitted tensors may be transposed views of the checkpoint's (zero-copy).

`module_stream` is the shared transform: tensors named `<module>.<part>` for the format's parts are held
(references only) until the module's required parts have all arrived, then handed to the format's
converter; everything else passes through untouched, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from streamquant.loading.errors import WeightLoadError

BITS = 4
PACK_FACTOR = 32 // BITS
Tensors = Iterator[tuple[str, torch.Tensor]]
Converter = Callable[[str, dict[str, torch.Tensor]], Iterable[tuple[str, torch.Tensor]]]


@dataclass(frozen=True)
class ConvertedFormat:
    """An int4 format read by conversion into compressed-tensors' `pack-quantized` tensors (GPTQ, AWQ):
    its name, its config reader, its stream transform and the header shapes that transform emits."""

    name: str
    read_config: Callable[[dict], "Int4Checkpoint"]
    to_compressed_tensors: Callable[..., Iterator[tuple[str, torch.Tensor]]]
    shapes_as_compressed_tensors: Callable[..., dict]


class PackedTensorError(WeightLoadError):
    """A GPTQ / AWQ tensor does not have the shape, dtype or values its format says (named)."""


@dataclass(frozen=True)
class Int4Checkpoint:
    """A 4-bit group-quantized checkpoint (GPTQ or AWQ), in compressed-tensors `pack-quantized` terms.

    `format`: "gptq" or "awq"; `checkpoint_format`: the on-disk variant ("gptq" = GPTQ v1, zero points
    stored minus one; "gptq_v2"; "gemm" for AWQ); `group_size`: input columns per scale, None for one
    scale per output row (GPTQ's group_size -1); `act_order`: every quantized layer carries a
    `weight_g_idx` (GPTQ desc_act); `ignore`: module names the checkpoint says it left unquantized."""

    format: str
    checkpoint_format: str
    group_size: int | None
    symmetric: bool
    act_order: bool = False
    ignore: tuple[str, ...] = ()
    bits: int = BITS

    def __post_init__(self):
        if self.bits != BITS:
            raise ValueError(f"Int4Checkpoint holds 4-bit codes, not {self.bits}-bit")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or None (per channel), got {self.group_size}")
        if self.act_order and self.group_size is None:
            raise ValueError("act_order needs groups (a per-channel scale has no group order)")

    def compressed_tensors_config(self) -> dict:
        """The `quantization_config` of the equivalent compressed-tensors checkpoint (W4A16)."""
        weights = {"num_bits": BITS, "type": "int", "symmetric": self.symmetric, "dynamic": False,
                   "strategy": "channel" if self.group_size is None else "group", "group_size": self.group_size,
                   "actorder": "group" if self.act_order else None}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                              "output_activations": None, "format": "pack-quantized"}},
                "ignore": list(self.ignore)}


def module_stream(weights: Iterable[tuple[str, torch.Tensor]], parts: frozenset[str], convert: Converter,
                  fmt: str) -> Tensors:
    """`weights` with each module's `parts` replaced by what `convert(module, {part: tensor})` yields,
    called once all of them have arrived (see the module docstring)."""
    held: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        module, _, leaf = name.rpartition(".")
        if leaf not in parts:
            yield name, tensor
            continue
        got = held.setdefault(module, {})
        if leaf in got:
            raise PackedTensorError(f"{fmt} checkpoint tensor {name!r} arrived twice")
        got[leaf] = tensor
        if len(got) == len(parts):
            del held[module]
            yield from convert(module, got)
            del got, tensor  # nothing of a converted layer stays referenced here
    if held:
        missing = {m: sorted(parts - got.keys()) for m, got in sorted(held.items())}
        raise PackedTensorError(f"{fmt} checkpoint ended with quantized layers incomplete (layer: missing tensors): "
                                + "; ".join(f"{m}: {', '.join(p)}" for m, p in missing.items()))


def converted_shapes(shapes: dict[str, tuple[int, ...]], parts: frozenset[str], dims: Callable[[tuple], tuple[int, int]],
                     checkpoint: Int4Checkpoint) -> dict[str, tuple[int, ...]]:
    """A checkpoint's header shapes as `module_stream` will emit them (to plan a load before any tensor is
    read): each module's parts replaced by the compressed-tensors tensors of its `qweight`, whose shape
    `dims` turns into (out, in); other names unchanged. Shapes are checked when the tensors stream in."""
    out = {}
    for name, shape in shapes.items():
        module, _, leaf = name.rpartition(".")
        if leaf not in parts:
            out[name] = tuple(shape)
        elif leaf == "qweight":
            if len(shape) != 2:
                raise PackedTensorError(f"checkpoint tensor {name!r} has shape {list(shape)}; expected two dims")
            rows, cols = dims(tuple(shape))
            groups = groups_of(name, cols, checkpoint.group_size)
            out.update({f"{module}.weight_packed": (rows, cols // PACK_FACTOR), f"{module}.weight_scale": (rows, groups),
                        f"{module}.weight_shape": (2,)})
            if not checkpoint.symmetric:
                out[f"{module}.weight_zero_point"] = (rows // PACK_FACTOR, groups)
            if checkpoint.act_order:
                out[f"{module}.weight_g_idx"] = (cols,)
    return out


def check_tensor(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> None:
    """Raise naming `name` unless `tensor` has exactly `shape` and one of `dtypes`."""
    if tuple(tensor.shape) != shape:
        raise PackedTensorError(f"checkpoint tensor {name!r} has shape {list(tensor.shape)}; expected {list(shape)}")
    if tensor.dtype not in dtypes:
        raise PackedTensorError(f"checkpoint tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                                f"expected {' or '.join(str(d).removeprefix('torch.') for d in dtypes)}")


def groups_of(name: str, in_features: int, group_size: int | None) -> int:
    """Groups along the input dim; a group size that does not divide it is refused, naming the tensor."""
    if group_size is None:
        return 1
    if in_features % group_size:
        raise PackedTensorError(f"checkpoint tensor {name!r}: input size {in_features} is not a multiple of the "
                                f"group size {group_size}")
    return in_features // group_size


def trivial_g_idx(in_features: int, group_size: int | None, device=None) -> torch.Tensor:
    """The g_idx of contiguous groups: column i is in group i // group_size."""
    columns = torch.arange(in_features, dtype=torch.int32, device=device)
    return torch.zeros_like(columns) if group_size is None else columns // group_size


def unpack_nibbles(words: torch.Tensor, order: tuple[int, ...] = tuple(range(PACK_FACTOR))) -> torch.Tensor:
    """int32 [..., n] -> uint8 [..., n * 8]: element 8k + j is the nibble at position order[j] of word k."""
    out = torch.empty(*words.shape, PACK_FACTOR, dtype=torch.uint8, device=words.device)
    for j, position in enumerate(order):
        out[..., j] = (words >> (BITS * position)) & 0xF
    return out.flatten(-2)


def pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 8n] -> int32 [..., n]: element 8k + i in bits [4i, 4i + 4) of word k."""
    grouped = nibbles.unflatten(-1, (nibbles.shape[-1] // PACK_FACTOR, PACK_FACTOR))
    words = grouped[..., 0].to(torch.int32)
    for i in range(1, PACK_FACTOR):
        words |= grouped[..., i].to(torch.int32) << (BITS * i)
    return words


def _int32(bits: int) -> int:
    return bits - 2**32 if bits >= 2**31 else bits


# (rows apart, mask of the nibbles a row keeps) for the three block swaps of an 8 x 8 nibble transpose
_SWAPS = tuple((step, mask, _int32(~mask & 0xFFFFFFFF)) for step, mask in ((4, 0x0000FFFF), (2, 0x00FF00FF),
                                                                         (1, 0x0F0F0F0F)))


def repack_along_rows(words: torch.Tensor, order: tuple[int, ...] = tuple(range(PACK_FACTOR))) -> torch.Tensor:
    """int32 [R, C] packed along the columns (element (i, 8c + j) at nibble order[j] of word [i, c]) -> int32
    [R / 8, 8C] packed along the rows in natural order (element (8k + r, o) at nibble r of word [k, o]).

    Each 8 x 8 block of nibbles (eight words) is transposed in three rounds of masked swaps (halves, bytes,
    nibbles) on whole int32 tensors, without ever expanding to one byte per code."""
    rows_total, cols = words.shape
    blocks = words.view(rows_total // PACK_FACTOR, PACK_FACTOR, cols)
    rows = [blocks[:, r] for r in range(PACK_FACTOR)]
    for step, keep, other in _SWAPS:
        shift = BITS * step
        for r in (r for r in range(PACK_FACTOR) if not r & step):
            a, b = rows[r], rows[r + step]
            rows[r] = (a & keep) | ((b & keep) << shift)
            rows[r + step] = ((a >> shift) & keep) | (b & other)
    out = torch.empty(rows_total // PACK_FACTOR, cols, PACK_FACTOR, dtype=torch.int32, device=words.device)
    for j, position in enumerate(order):  # after the transpose, row `position` holds output column 8c + j
        out[..., j] = rows[position]
    return out.view(rows_total // PACK_FACTOR, cols * PACK_FACTOR)
