"""AWQ checkpoints (AutoAWQ's GEMM layout, also written by GPTQModel): read their config, turn their layers
into compressed-tensors'.

Config (`quantization_config`, quant_method "awq"): `bits` (AutoAWQ's `w_bit`) 4, `group_size`
(`q_group_size`) > 0 or -1, `version` "gemm" (GPTQModel also writes it as `checkpoint_format` /
`format`), `modules_to_not_convert`. `zero_point` false (GPTQModel's symmetric AWQ) still stores qzeros,
which its GEMM dequantization uses as always: they are converted like any others. Refused, naming the
field: other bit widths, versions "gemv", "gemv_fast", "exllama", "ipex", "marlin" and any other,
llm-awq's packing (`backend` "llm-awq"), `desc_act`. Runtime-only keys (`do_fuse`, `exllama_config`, ...) are tolerated.

Tensors, per quantized linear `X` (unquantized tensors pass through): unsigned 4-bit codes with zero
points, `w = (q - z) * scale` with the group i // group_size of input column i:
  - `X.qweight` int32 [in, out / 8] and `X.qzeros` int32 [in / group, out / 8], both packed along the
    OUTPUT dim in AWQ's interleaved order: output 8k + j sits at nibble position (0, 4, 1, 5, 2, 6, 3, 7)[j]
    of word k (AutoAWQ packs with order_map (0, 2, 4, 6, 1, 3, 5, 7), its inverse);
  - `X.scales` [in / group, out].
Converted: qweight repacked along the input dim (8 x 8 nibble blocks transposed) -> `weight_packed` (a
transposed view);
qzeros' nibbles put in natural order within each word, transposed -> `weight_zero_point`; scales
transposed -> `weight_scale`. AWQ's unsigned nibbles are compressed-tensors' offset-binary ones
(q = q_u - 8, zp = z_u - 8), so no code changes value.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from streamquant.formats.base import QuantizationConfigError
from streamquant.formats.int4 import (
    PACK_FACTOR,
    ConvertedFormat,
    Int4Checkpoint,
    PackedTensorError,
    check_tensor,
    converted_shapes,
    groups_of,
    module_stream,
    pack_nibbles,
    repack_along_rows,
    unpack_nibbles,
)

NAME = "awq"
VERSION = "gemm"
AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble position of output 8k + j in word k
PARTS = frozenset({"qweight", "qzeros", "scales"})
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _alias(config: dict, key: str, alias: str, default):
    if key in config and alias in config and config[key] != config[alias]:
        raise QuantizationConfigError(f"quantization_config.{key} = {config[key]!r} disagrees with "
                                      f"quantization_config.{alias} = {config[alias]!r}")
    return config.get(key, config.get(alias, default))


def _version(config: dict) -> str:
    given = {k: str(config[k]).lower() for k in ("version", "checkpoint_format", "format") if config.get(k) is not None}
    for key, value in given.items():
        if value != VERSION:
            raise QuantizationConfigError(f"quantization_config.{key} = {config[key]!r} is not supported: only AWQ's "
                                          "GEMM layout ('gemm') is read (gemv, gemv_fast, exllama, ipex and marlin "
                                          "pack differently)")
    return VERSION


def read_config(config: dict) -> Int4Checkpoint:
    bits = _alias(config, "bits", "w_bit", 4)
    if bits != 4:
        raise QuantizationConfigError(f"quantization_config.bits = {bits!r}: only 4-bit AWQ is supported")
    group_size = _alias(config, "group_size", "q_group_size", 128)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size <= 0 and group_size != -1):
        raise QuantizationConfigError(f"quantization_config.group_size = {group_size!r}: expected a positive int or -1")
    if not isinstance(config.get("zero_point", True), bool):
        raise QuantizationConfigError(f"quantization_config.zero_point = {config['zero_point']!r}: expected true "
                                      "or false")
    if str(config.get("backend") or "autoawq").lower() != "autoawq":
        raise QuantizationConfigError(f"quantization_config.backend = {config['backend']!r}: only AutoAWQ's packing "
                                      "is supported (llm-awq packs differently)")
    if config.get("desc_act"):
        raise QuantizationConfigError("quantization_config.desc_act = true: AWQ has no act-order")
    ignore = tuple(config.get("modules_to_not_convert") or ())
    return Int4Checkpoint(NAME, _version(config), None if group_size == -1 else group_size, False, False, ignore)


def convert_module(module: str, parts: dict[str, torch.Tensor], checkpoint: Int4Checkpoint) -> Iterator:
    """One AWQ linear's tensors -> compressed-tensors' (module docstring); shapes checked, named."""
    qweight = parts["qweight"]
    if qweight.dim() != 2:
        raise PackedTensorError(f"checkpoint tensor {module + '.qweight'!r} has shape {list(qweight.shape)}; "
                                "expected [in, out / 8]")
    in_features, out = qweight.shape[0], qweight.shape[1] * PACK_FACTOR
    check_tensor(f"{module}.qweight", qweight, (in_features, out // PACK_FACTOR), (torch.int32,))
    if in_features % PACK_FACTOR:
        raise PackedTensorError(f"checkpoint tensor {module + '.qweight'!r}: input size {in_features} is not a "
                                f"multiple of {PACK_FACTOR} (compressed-tensors packs eight codes per int32 along it)")
    groups = groups_of(f"{module}.qweight", in_features, checkpoint.group_size)
    check_tensor(f"{module}.scales", parts["scales"], (groups, out), SCALE_DTYPES)
    check_tensor(f"{module}.qzeros", parts["qzeros"], (groups, out // PACK_FACTOR), (torch.int32,))
    yield f"{module}.weight_packed", repack_along_rows(qweight, AWQ_ORDER).t()
    yield f"{module}.weight_scale", parts["scales"].t()
    yield f"{module}.weight_zero_point", pack_nibbles(unpack_nibbles(parts["qzeros"], AWQ_ORDER)).t()
    yield f"{module}.weight_shape", torch.tensor([out, in_features], dtype=torch.int64)


def to_compressed_tensors(weights: Iterable[tuple[str, torch.Tensor]], checkpoint: Int4Checkpoint) -> Iterator:
    """An AWQ checkpoint's (name, tensor) stream in compressed-tensors' layout (each layer once its three arrived)."""
    return module_stream(weights, PARTS, lambda module, parts: convert_module(module, parts, checkpoint), NAME)


def shapes_as_compressed_tensors(shapes: dict[str, tuple[int, ...]], checkpoint: Int4Checkpoint) -> dict:
    """The checkpoint's header shapes as `to_compressed_tensors` will emit its tensors (qweight is [in, out / 8])."""
    return converted_shapes(shapes, PARTS, lambda shape: (shape[1] * PACK_FACTOR, shape[0]), checkpoint)


AWQ = ConvertedFormat(NAME, read_config, to_compressed_tensors, shapes_as_compressed_tensors)
