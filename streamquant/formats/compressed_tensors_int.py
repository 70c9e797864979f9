"""compressed-tensors' integer schemes, read side: which `weights` / `input_activations` args load into
streamquant's int8 and int4 methods.

  - int8 (`int-quantized`, what llm-compressor writes for W8A8; `naive-quantized` for weight-only):
    `num_bits: 8`, symmetric, `strategy: "channel"`. Per linear `X.weight` int8 [out, in] and
    `X.weight_scale` [out, 1] (the model dtype), dequantized as `weight * scale` (codes may be -128:
    compressed-tensors' symmetric range is [-128, 127]). Input activations: none (W8A16) or dynamic
    symmetric int8 per token (W8A8), which is what streamquant's int8 computes.
  - int4 (`pack-quantized`, W4A16): `num_bits: 4`, `strategy: "group"`, `group_size`, symmetric or not.
    Per linear `X.weight_packed` int32 [out, in / 8] (code + 8 of input column 8k + i in bits [4i, 4i + 4)
    of word k: streamquant's `int4_pack.py` layout bit for bit), `X.weight_scale` [out, in / group] (the
    model dtype), asymmetric `X.weight_zero_point` int32 [out / 8, in / group] (the zero points + 8,
    packed the same way along the OUTPUT dim), `X.weight_shape` [2] (= [out, in]), and with
    activation order `X.weight_g_idx` int32 [in] (each input column's group). Dequantized as
    `(code - zero) * scale` of the column's group: streamquant's `int4.py` formula. `actorder`:
    absent, null, "weight" / "static" (ordering during calibration only: contiguous groups) or
    "group" / "dynamic" / true (a `g_idx`; compressed-tensors 0.19+ no longer writes it, older versions
    and converted GPTQ checkpoints do). No input activations (W4A16).
Refused, naming the field: other bit widths (2, 3, 5-7, 8-bit `pack-quantized`), int4 that is not
grouped, asymmetric int8 weights or activations, static or per-tensor activations, unknown `actorder`.
"""

from __future__ import annotations

from streamquant.formats.base import QuantizationConfigError
from streamquant.quant.scaled.config import ActivationScheme, ScaledScheme

ACT_ORDER = {None: False, False: False, "weight": False, "static": False, True: True, "group": True, "dynamic": True}
DEFAULT_BLOCK = (128, 128)


def _strategy(weights: dict) -> str:
    """The weights' strategy, inferred from `group_size` as compressed-tensors does when absent."""
    strategy = weights.get("strategy")
    if strategy is not None:
        return str(strategy).lower()
    size = weights.get("group_size")
    return "tensor" if size is None else ("channel" if size == -1 else "group")


def _refuse(where: str, key: str, value, why: str) -> QuantizationConfigError:
    return QuantizationConfigError(f"quantization_config{where}.{key} = {value!r}: {why}")


def read_int_group(weights: dict, activations: dict | None, fmt: str, where: str) -> tuple:
    """(scheme, activation scheme, block, int4's (group_size, symmetric, act_order) or None) of one
    config group with `type: "int"` weights (the module doc says which load)."""
    bits, symmetric, strategy = weights.get("num_bits", 8), weights.get("symmetric", True), _strategy(weights)
    wh = f"{where}.weights"
    if bits == 8:
        if fmt == "pack-quantized":
            raise _refuse(wh, "num_bits", bits, "8-bit pack-quantized weights (W8A16 in int32 words) are not "
                          "supported; int8 loads from int-quantized or naive-quantized checkpoints")
        if not symmetric:
            raise _refuse(wh, "symmetric", symmetric, "int8 weights must be symmetric (no zero point)")
        if strategy != "channel":
            raise _refuse(wh, "strategy", strategy, "int8 weights must have one scale per output channel "
                          "('channel')")
        return ScaledScheme.INT8, _int8_activation(activations, f"{where}.input_activations"), DEFAULT_BLOCK, None
    if bits != 4:
        raise _refuse(wh, "num_bits", bits, "integer weights of 8 bits (int8) or 4 bits (int4) are supported")
    if fmt != "pack-quantized":
        raise _refuse(wh, "num_bits", bits, f"4-bit weights are stored pack-quantized, not {fmt!r}")
    if strategy != "group":
        raise _refuse(wh, "strategy", strategy, "int4 weights must be grouped ('group' with a group_size)")
    size = weights.get("group_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise _refuse(wh, "group_size", size, "int4 groups need a positive group_size")
    order = weights.get("actorder")
    key = order.lower() if isinstance(order, str) else order
    if key not in ACT_ORDER:
        raise _refuse(wh, "actorder", order, "unknown activation ordering (known: null, 'weight', 'static', "
                      "'group', 'dynamic')")
    if activations:
        raise QuantizationConfigError(f"quantization_config{where}.input_activations: int4 loads weight-only "
                                      "(W4A16); quantized activations with int4 weights are not supported")
    return ScaledScheme.INT4, ActivationScheme.NONE, DEFAULT_BLOCK, (size, bool(symmetric), ACT_ORDER[key])


def _int8_activation(args: dict | None, where: str) -> ActivationScheme:
    """W8A16 (none) or W8A8 with dynamic symmetric int8 per-token activations."""
    if not args:
        return ActivationScheme.NONE
    if not args.get("dynamic", False):
        raise _refuse(where, "dynamic", args.get("dynamic"), "static activation scales (input_scale tensors) are "
                      "not supported; dynamic per-token int8 activations are")
    for key, want in (("type", "int"), ("num_bits", 8), ("symmetric", True)):
        if args.get(key, want) != want:
            raise _refuse(where, key, args.get(key), f"int8 weights take activations of {key} {want!r} "
                          "(dynamic symmetric int8 per token)")
    strategy = args.get("strategy", "token")
    if strategy != "token":
        raise _refuse(where, "strategy", strategy, "streamquant quantizes int8 activations per token")
    return ActivationScheme.DYNAMIC
