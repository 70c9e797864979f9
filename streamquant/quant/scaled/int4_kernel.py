"""The CPU int4 kernel's copy of an int4 linear layer's weight: derived from its codes, kept current.

A layer's int4 tensors stay as they are: `weight` (int32, eight codes per word along the input),
`weight_scale` (float32) and `weight_zero_point` (asymmetric: int32, eight output rows' zero points per
word, compressed-tensors' layout; unpacked here with `int4_pack.unpack_int4_rows`). Loaders and
reloads write them in place, and readback, fingerprints, snapshots and the format writers read
them. torch's CPU int4 kernel (`math/int4_matmul.py`) wants another layout, so `Int4CpuKernel` keeps a derived copy on the layer
as two non-persistent buffers, `weight_int4pack` (uint8 [N, K / 2]) and
`weight_int4pack_scales_and_zeros` (bf16 [K / group, N, 2]). They are not inference tensors (not in
the state dict, snapshots, fingerprints or processed-tensor updates): their bytes depend on the CPU
torch dispatches to. Memory: 0.5 byte per weight plus 4 bytes per group, beside the int4 tensors'
0.5 byte per weight plus 4 (asymmetric: 4.5) bytes per group: about 1.06 bytes per weight in all at
group 128, against 2 in bf16. `int4_kernel=False` (`ScaledConfig`; the default for a model loaded onto another
device than the CPU, `config.make_quant_config`) keeps only the int4 tensors and dequantizes.

Kept current, in the same storage (addresses unchanged):
  - `build_` runs at the end of every `process_weights_after_loading` (load, reload, and pre-quantized
    codes: a compressed-tensors checkpoint through `load_model`, a `quantized_source` reload, where
    nothing is quantized but the copy is still rebuilt): the load session's loaders write through
    `.data`, which no version counter sees.
  - every other in-place write of the int4 tensors (an atomic update's restore, a processed-tensor
    update, a `copy_` by hand) bumps their version counter: `serves` compares the versions and
    storage addresses the copy was built from with the live ones and rebuilds before multiplying.
    A write that bypasses the version counter outside a load (`.data`, raw storage) is not seen.

Serves a call when the layer's weight converted (`refusal`: int4 on the CPU, groups of 32-256 along
the input aligned with this rank's columns, rows a multiple of 16, no activation-order `weight_g_idx`
(an act-order layer -- `act_order=True`, a GPTQ-style checkpoint with `g_idx` -- dequantizes),
not made under `torch.inference_mode()`) and the call has bf16 activations on the CPU and a bf16
result (not a row-parallel layer's float32 partial sums). A bias is added to the kernel's bf16 product (one rounding more than `F.linear`'s, within
the tests' bound). Everything else dequantizes (`scaled.linear`). MoE experts always dequantize.
"""

from __future__ import annotations

import torch

from streamquant.quant.math.int4_matmul import int4_kernel_linear, kernel_buffers, kernel_refusal, to_kernel_layout_
from streamquant.quant.math.int4_pack import PACK_FACTOR, unpack_int4_rows
from streamquant.quant.scaled.weights import ShardLayout

KERNEL_DTYPE = torch.bfloat16  # the only activation dtype the kernel is fast in (`math/int4_matmul.py`)


class Int4CpuKernel:
    """The kernel-layout copy of one int4 linear weight `name` (see the module doc); one per layer."""

    def __init__(self, name: str, layouts: list[ShardLayout]):
        self.name = name
        self.layouts = layouts
        self.group_size = layouts[0].tile[1]
        self.source: tuple | None = None  # (address, version) of each int4 tensor the copy was built from

    def sources(self, layer: torch.nn.Module) -> list[torch.Tensor]:
        names = (self.name, f"{self.name}_scale", f"{self.name}_zero_point")
        return [layer._parameters[n] for n in names if n in layer._parameters]

    def refusal(self, layer: torch.nn.Module) -> str | None:
        """Why this layer's weight cannot go to the kernel; None when it can."""
        codes = getattr(layer, self.name)
        if codes.dtype != torch.int32 or codes.device.type != "cpu":
            return f"int4 codes of dtype {codes.dtype} on {codes.device} (the kernel takes int32 words on the CPU)"
        if any(t.is_inference() for t in self.sources(layer)):
            return "int4 tensors made under torch.inference_mode() have no version counter to follow their writes"
        if f"{self.name}_g_idx" in layer._parameters or f"{self.name}_g_idx" in layer._buffers:
            return "activation order (g_idx): groups are not runs of consecutive input columns"
        for lay in self.layouts:
            if lay.tile[0] != 1 or lay.window.col0 % self.group_size or lay.window.cols % self.group_size:
                return (f"shard {lay.label!r}: tile {lay.tile} over input columns [{lay.window.col0}, "
                        f"{lay.window.col0 + lay.window.cols}) is not whole 1 x {self.group_size} groups")
        return kernel_refusal(codes.shape[0], codes.shape[1] * PACK_FACTOR, self.group_size)

    def _key(self, layer: torch.nn.Module) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in self.sources(layer))

    @torch.no_grad()
    def build_(self, layer: torch.nn.Module) -> bool:
        """Convert the layer's int4 tensors into the kernel copy (allocated, sentinel-filled, on the first
        call; written in place after). False, and no copy, where the kernel refuses the layer."""
        codes = getattr(layer, self.name)
        if codes.is_meta or self.refusal(layer) is not None:
            self.source = None
            return False
        packed_name, sz_name = f"{self.name}_int4pack", f"{self.name}_int4pack_scales_and_zeros"
        if packed_name not in layer._buffers:
            buffers = kernel_buffers(codes.shape[0], codes.shape[1] * PACK_FACTOR, self.group_size, codes.device,
                                     KERNEL_DTYPE)
            layer.register_buffer(packed_name, buffers[0], persistent=False)
            layer.register_buffer(sz_name, buffers[1], persistent=False)
        zeros = getattr(layer, f"{self.name}_zero_point", None)
        to_kernel_layout_(layer._buffers[packed_name], layer._buffers[sz_name], codes.detach(),
                          getattr(layer, f"{self.name}_scale").detach(),
                          None if zeros is None else unpack_int4_rows(zeros.detach()))
        self.source = self._key(layer)
        return True

    def serves(self, layer: torch.nn.Module, x: torch.Tensor, out_dtype: torch.dtype | None) -> bool:
        """Whether this call goes to the kernel: bf16 activations on the CPU, a bf16 result, and a current
        copy (rebuilt here, in place, when the int4 tensors changed since it was built)."""
        if self.source is None or x.device.type != "cpu" or x.dtype != KERNEL_DTYPE:
            return False
        if out_dtype is not None and out_dtype != x.dtype:
            return False
        return self._key(layer) == self.source or self.build_(layer)

    def linear(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ dequant(weight).T (+ bias)` by the kernel (after `serves` said yes)."""
        return int4_kernel_linear(x, layer._buffers[f"{self.name}_int4pack"],
                                  layer._buffers[f"{self.name}_int4pack_scales_and_zeros"], self.group_size, bias)
