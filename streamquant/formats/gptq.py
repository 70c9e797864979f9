"""GPTQ checkpoints (AutoGPTQ, GPTQModel, optimum): read their config, turn their layers into compressed-tensors'.

Config: `quantization_config` in config.json, or `quantize_config.json` beside it (`quantize_config`
reads it). Read: 4-bit, `group_size` > 0 or -1 (one group per row), `sym`, `desc_act` (act-order; with
`static_groups` the groups stay contiguous and g_idx is trivial), `checkpoint_format` (or GPTQModel's
`format`) "gptq" (v1) or "gptq_v2", `pack_dtype` int32, `dynamic` entries that only exclude modules
("-:..."), `modules_to_not_convert`. Refused, naming the field: other bit widths (8-bit GPTQ is not
built), marlin / bitblas / qqq / other checkpoint formats, `is_marlin_format`, `lm_head` quantized,
per-module `dynamic` overrides, `rotation`, `adapter` (EoRA). Calibration-only keys are tolerated.

Tensors, per quantized linear `X` (unquantized tensors pass through):
  - `X.qweight` int32 [in / 8, out]: eight codes packed along the INPUT dim, element 8k + i of a column
    in bits [4i, 4i + 4) of word k: exactly compressed-tensors' `weight_packed` transposed;
  - `X.qzeros` int32 [groups, out / 8], packed along the output dim (element 8k + i in bits [4i, 4i + 4));
    GPTQ v1 stores each zero point minus one. v1 -> v2 adds 0x11111111 to each word modulo 2^32, as
    GPTQModel and transformers do (the exact inverse of GPTQModel's v2 -> v1 save, whose borrow a zero
    point of 0 carries into the next nibble; vLLM adds one per nibble instead, which differs only for a
    v1 nibble of 15). The v2 words transposed are compressed-tensors' `weight_zero_point`;
  - `X.scales` [groups, out] -> `weight_scale` transposed, same dtype;
  - `X.g_idx` int32 [in] -> `weight_g_idx` with act-order; without it, it must be trivial (i // group)
    and is dropped. With `sym`, every zero point must be 8 and none is emitted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

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
    trivial_g_idx,
)

NAME = "gptq"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
PARTS = frozenset({"qweight", "qzeros", "scales", "g_idx"})
V1_ZERO_OFFSET = 0x11111111  # one added to each of the eight nibbles of a v1 qzeros word
SYMMETRIC_ZEROS = 0x88888888 - 2**32  # eight zero points of 8, as an int32
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# keys that change the math whenever they are set (refused, naming them)
MUST_BE_UNSET = ("rotation", "adapter")


def quantize_config(directory: Path) -> dict | None:
    """`quantize_config.json` beside a checkpoint's config.json (AutoGPTQ's), with quant_method "gptq"; None without one."""
    path = Path(directory) / QUANTIZE_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise QuantizationConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise QuantizationConfigError(f"{path} must hold a JSON object")
    return {"quant_method": NAME, **config}


def _checkpoint_format(config: dict) -> str:
    if config.get("is_marlin_format"):
        raise QuantizationConfigError("quantization_config.is_marlin_format = true: marlin-packed GPTQ checkpoints "
                                      "are not supported (the gptq and gptq_v2 layouts are)")
    given = {k: str(config[k]).lower() for k in ("checkpoint_format", "format") if config.get(k) is not None}
    if len(set(given.values())) > 1:
        raise QuantizationConfigError(f"quantization_config disagrees with itself about the checkpoint format: {given}")
    key, value = next(iter(given.items()), ("checkpoint_format", "gptq"))
    if value not in CHECKPOINT_FORMATS:
        raise QuantizationConfigError(f"quantization_config.{key} = {value!r} is not supported (supported: "
                                      f"{', '.join(CHECKPOINT_FORMATS)}; marlin, bitblas, qqq and other kernel "
                                      "layouts are not)")
    return value


def _refuse_math_changes(config: dict) -> None:
    if config.get("lm_head"):
        raise QuantizationConfigError("quantization_config.lm_head = true (a GPTQ-quantized LM head) is not "
                                      "supported; streamquant keeps the LM head in the model dtype")
    for key in MUST_BE_UNSET:
        if config.get(key) not in (None, {}, []):
            raise QuantizationConfigError(f"quantization_config.{key} = {config[key]!r} is not supported (it "
                                          "changes the weights' math)")
    dynamic = config.get("dynamic") or {}
    overrides = sorted(k for k in dynamic if not str(k).startswith("-"))
    if overrides:
        raise QuantizationConfigError(f"quantization_config.dynamic overrides modules {overrides}: per-module bits "
                                      "/ group sizes are not supported (only '-:' exclusions are)")
    pack_dtype = str(config.get("pack_dtype") or "int32").removeprefix("torch.")
    if pack_dtype != "int32":
        raise QuantizationConfigError(f"quantization_config.pack_dtype = {pack_dtype!r} is not supported (int32 is)")


def read_config(config: dict) -> Int4Checkpoint:
    bits = config.get("bits", 4)
    if bits != 4:
        raise QuantizationConfigError(f"quantization_config.bits = {bits!r}: only 4-bit GPTQ is supported (8-bit "
                                      "GPTQ is not built; 2- and 3-bit are not supported)")
    group_size = config.get("group_size", 128)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size <= 0 and group_size != -1):
        raise QuantizationConfigError(f"quantization_config.group_size = {group_size!r}: expected a positive int or -1")
    for key in ("sym", "desc_act", "static_groups"):
        if not isinstance(config.get(key, False), bool):
            raise QuantizationConfigError(f"quantization_config.{key} = {config[key]!r}: expected true or false")
    checkpoint_format = _checkpoint_format(config)
    _refuse_math_changes(config)
    group = None if group_size == -1 else group_size
    act_order = bool(config.get("desc_act", False)) and not config.get("static_groups", False) and group is not None
    ignore = tuple(config.get("modules_to_not_convert") or ())
    return Int4Checkpoint(NAME, checkpoint_format, group, bool(config.get("sym", True)), act_order, ignore)


def _v2_zeros(qzeros: torch.Tensor, checkpoint: Int4Checkpoint) -> torch.Tensor:
    if checkpoint.checkpoint_format == "gptq_v2":
        return qzeros
    words = (qzeros.to(torch.int64) & 0xFFFFFFFF) + V1_ZERO_OFFSET  # modulo 2^32, then back to int32's bits
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _check_g_idx(name: str, g_idx: torch.Tensor, groups: int, checkpoint: Int4Checkpoint) -> None:
    if checkpoint.act_order:
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise PackedTensorError(f"checkpoint tensor {name!r} holds group indexes outside [0, {groups})")
    elif not torch.equal(g_idx.to(torch.int32), trivial_g_idx(g_idx.numel(), checkpoint.group_size, g_idx.device)):
        raise PackedTensorError(f"checkpoint tensor {name!r} reorders columns (act-order) but quantization_config "
                                "does not say desc_act = true")


def convert_module(module: str, parts: dict[str, torch.Tensor], checkpoint: Int4Checkpoint) -> Iterator:
    """One GPTQ linear's tensors -> compressed-tensors' (module docstring); shapes checked, named."""
    qweight = parts["qweight"]
    if qweight.dim() != 2:
        raise PackedTensorError(f"checkpoint tensor {module + '.qweight'!r} has shape {list(qweight.shape)}; "
                                "expected [in / 8, out]")
    in_features, out = qweight.shape[0] * PACK_FACTOR, qweight.shape[1]
    check_tensor(f"{module}.qweight", qweight, (in_features // PACK_FACTOR, out), (torch.int32,))
    groups = groups_of(f"{module}.qweight", in_features, checkpoint.group_size)
    if out % PACK_FACTOR:
        raise PackedTensorError(f"checkpoint tensor {module + '.qzeros'!r}: output size {out} is not a multiple of "
                                f"{PACK_FACTOR} (zero points pack eight to an int32)")
    check_tensor(f"{module}.scales", parts["scales"], (groups, out), SCALE_DTYPES)
    check_tensor(f"{module}.qzeros", parts["qzeros"], (groups, out // PACK_FACTOR), (torch.int32,))
    check_tensor(f"{module}.g_idx", parts["g_idx"], (in_features,), (torch.int32, torch.int64))
    _check_g_idx(f"{module}.g_idx", parts["g_idx"], groups, checkpoint)
    zeros = _v2_zeros(parts["qzeros"], checkpoint)
    if checkpoint.symmetric and not bool((zeros == SYMMETRIC_ZEROS).all()):
        raise PackedTensorError(f"checkpoint tensor {module + '.qzeros'!r} holds zero points other than 8, but "
                                "quantization_config says sym = true")
    yield f"{module}.weight_packed", qweight.t()
    yield f"{module}.weight_scale", parts["scales"].t()
    if not checkpoint.symmetric:
        yield f"{module}.weight_zero_point", zeros.t()
    yield f"{module}.weight_shape", torch.tensor([out, in_features], dtype=torch.int64)
    if checkpoint.act_order:
        yield f"{module}.weight_g_idx", parts["g_idx"].to(torch.int32)


def to_compressed_tensors(weights: Iterable[tuple[str, torch.Tensor]], checkpoint: Int4Checkpoint) -> Iterator:
    """A GPTQ checkpoint's (name, tensor) stream in compressed-tensors' layout (each layer once its four arrived)."""
    return module_stream(weights, PARTS, lambda module, parts: convert_module(module, parts, checkpoint), NAME)


def shapes_as_compressed_tensors(shapes: dict[str, tuple[int, ...]], checkpoint: Int4Checkpoint) -> dict:
    """The checkpoint's header shapes as `to_compressed_tensors` will emit its tensors (qweight is [in / 8, out])."""
    return converted_shapes(shapes, PARTS, lambda shape: (shape[1], shape[0] * PACK_FACTOR), checkpoint)


GPTQ = ConvertedFormat(NAME, read_config, to_compressed_tensors, shapes_as_compressed_tensors)
