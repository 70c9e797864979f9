"""The CPU int4 kernel's copy of a layer's weight (`quant/scaled/int4_kernel.py`): what it computes
against an independent reference, that it follows every write of the int4 tensors (a stale copy fails
by value: the second weights are unrelated to the first), and where the layer dequantizes instead.

Reference: the layer's own int4 tensors read back by numpy (words unpacked by shifts: codes along the
input, zero points along the output rows; `(q - zp) * s` in float64), multiplied in float64. Bound per output element: the bf16 rounding of the output and of
the group's scale and zero (`math/int4_matmul.py`), 2^-8 (|y| + sum |x| (|q| + |zp|) s), and a
relative Frobenius error under 4e-3; the dequantize path (`int4_kernel=False`) is held to the same.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from streamquant import begin_update, weights_digests, weights_fingerprint
from streamquant.api import load_model
from streamquant.checkpoint.reader import iterate_weights
from streamquant.checkpoint.synthetic import TINY_SPEC, write_synthetic_checkpoint
from streamquant.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from streamquant.loading.contract import inference_tensors
from streamquant.parallel.context import TPContext
from streamquant.quant.scaled import int4_kernel
from streamquant.quant.scaled.config import ScaledConfig
from streamquant.reload import reload_weights

from ..fp8_reference import to_f32

KERNEL_BUFFERS = ("weight_int4pack", "weight_int4pack_scales_and_zeros")
IDS = torch.randint(0, TINY_SPEC.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the layers' calls of the kernel."""
    calls = []
    real = int4_kernel.int4_kernel_linear
    monkeypatch.setattr(int4_kernel, "int4_kernel_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def make_layer(kind: str, group: int, symmetric: bool, kernel: bool, bias: bool = False, seed: int = 0,
               act_order: bool = False):
    """A loaded int4 layer of `kind`: its checkpoint weights written through its loaders, then processed."""
    config = ScaledConfig("int4", group_size=group, symmetric=symmetric, int4_kernel=kernel, act_order=act_order)
    kw = dict(quant_config=config, params_dtype=torch.bfloat16, prefix=kind)
    layer, shards = {
        "qkv": lambda: (QKVParallelLinear(256, 16, 8, 2, bias=bias, **kw), {"q": 128, "k": 32, "v": 32}),
        "gate_up": lambda: (MergedColumnParallelLinear(512, [96, 96], bias=bias, **kw), {0: 96, 1: 96}),
        "row": lambda: (RowParallelLinear(1024, 80, bias=bias, **kw), {None: 80}),
        "odd_rows": lambda: (ReplicatedLinear(256, 24, bias=bias, **kw), {None: 24}),
    }[kind]()
    layer.weight_scale.data.fill_(float("nan"))  # sentinels: what processing never wrote shows
    gen = torch.Generator().manual_seed(seed)
    slot = layer.checkpoint_params["weight"]
    for shard_id, rows in shards.items():
        w = (torch.randn(rows, layer.input_size, generator=gen) * 0.02 + 0.01 * torch.rand(rows, 1, generator=gen))
        slot.weight_loader(slot, w.to(torch.bfloat16), *(() if shard_id is None else (shard_id,)))
    if bias:
        layer.bias.data.copy_(torch.randn(layer.bias.shape, generator=gen).to(torch.bfloat16))
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def nibbles(t: torch.Tensor) -> np.ndarray:
    """int32 words [r, c] -> their eight nibbles minus 8, float64 [r, c, 8] (nibble i at bits [4i, 4i + 4))."""
    words = np.frombuffer(t.detach().numpy().tobytes(), np.uint32).reshape(t.shape)
    return ((words[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF).astype(np.float64) - 8


def reference(layer, x: torch.Tensor, bias: bool):
    """(float64 x @ W.T (+ bias), sum |x| (|q| + |zp|) s) from the layer's int4 tensors, read by numpy."""
    q = nibbles(layer.weight).reshape(layer.weight.shape[0], -1)  # input column 8k + i: nibble i of word k
    group = q.shape[1] // layer.weight_scale.shape[1]
    scales = np.repeat(layer.weight_scale.detach().numpy().astype(np.float64), group, axis=1)
    zp = getattr(layer, "weight_zero_point", None)
    if zp is not None:  # output row 8k + i: nibble i of word row k
        zp = nibbles(zp).transpose(0, 2, 1).reshape(-1, zp.shape[1])
    zeros = np.zeros_like(scales) if zp is None else np.repeat(zp, group, axis=1)
    xf = to_f32(x).astype(np.float64).reshape(-1, q.shape[1])
    y = xf @ ((q - zeros) * scales).T
    if bias:
        y = y + to_f32(layer.bias)
    return y, np.abs(xf) @ ((np.abs(q) + np.abs(zeros)) * scales).T


def assert_within_bf16_rounding(y: torch.Tensor, ref: np.ndarray, spread: np.ndarray) -> None:
    got = to_f32(y).astype(np.float64).reshape(ref.shape)
    assert np.all(np.abs(got - ref) <= 2.0 ** -8 * (np.abs(ref) + spread))
    assert np.linalg.norm(got - ref) <= 4e-3 * np.linalg.norm(ref)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("kind,group,bias", [("qkv", 32, True), ("qkv", 256, False), ("gate_up", 64, False),
                                             ("gate_up", 128, True), ("row", 128, True), ("row", 256, False)])
def test_kernel_matches_the_reference_and_the_dequantize_path(kernel_calls, kind, group, symmetric, bias):
    layer = make_layer(kind, group, symmetric, kernel=True, bias=bias)
    assert set(KERNEL_BUFFERS) <= set(layer._buffers) and not bool(layer.weight_int4pack_scales_and_zeros.isnan().any())
    x = torch.randn(3, 4, layer.input_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref, spread = reference(layer, x, bias)
    y = layer(x)
    assert kernel_calls and y.shape == (3, 4, layer.weight.shape[0]) and y.dtype == torch.bfloat16
    assert_within_bf16_rounding(y, ref, spread)
    dequantized = make_layer(kind, group, symmetric, kernel=False, bias=bias)
    assert all(torch.equal(a, b) for a, b in zip(dequantized.parameters(), layer.parameters()))  # same int4 tensors
    assert_within_bf16_rounding(dequantized(x), ref, spread)


def dequantize_path(layer):
    """The same layer with the kernel's copy switched off: the output of the dequantize path."""
    kernel, layer.quant_method.kernel = layer.quant_method.kernel, None
    return lambda *args, **kwargs: layer.quant_method.apply(layer, *args, **kwargs), kernel


def test_calls_the_kernel_does_not_serve_dequantize(kernel_calls):
    layer = make_layer("qkv", 64, False, kernel=True, bias=True)
    x = torch.randn(2, layer.input_size, generator=torch.Generator().manual_seed(2))
    served = layer(x.to(torch.bfloat16))
    assert len(kernel_calls) == 1
    plain, kernel = dequantize_path(layer)
    cases = [(x.to(torch.float16), {}), (x, {}), (x.to(torch.bfloat16), {"out_dtype": torch.float32})]
    expected = [plain(xx, layer.bias.to(xx.dtype), **kw) for xx, kw in cases]
    assert not torch.equal(plain(x.to(torch.bfloat16), layer.bias), served)  # the two paths round differently
    layer.quant_method.kernel = kernel
    for (xx, kw), want in zip(cases, expected):
        assert torch.equal(layer.quant_method.apply(layer, xx, layer.bias.to(xx.dtype), **kw), want)
    assert len(kernel_calls) == 1


@pytest.mark.parametrize("kind,group,why", [("qkv", 16, "group size 16"), ("odd_rows", 64, "output size 24")])
def test_layers_the_kernel_refuses_dequantize(kernel_calls, kind, group, why):
    layer = make_layer(kind, group, True, kernel=True)
    assert why in layer.quant_method.kernel.refusal(layer)
    assert not set(KERNEL_BUFFERS) & set(layer._buffers)
    x = torch.randn(2, layer.input_size, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    assert torch.equal(layer(x), make_layer(kind, group, True, kernel=False)(x)) and not kernel_calls


def test_activation_order_and_straddling_groups_are_refused():
    layer = make_layer("qkv", 64, False, kernel=True, act_order=True)  # a group index per input column
    assert "activation order" in layer.quant_method.kernel.refusal(layer)
    assert not layer.quant_method.kernel.build_(layer) and not set(KERNEL_BUFFERS) & set(layer._buffers)
    assert not layer.quant_method.kernel.serves(layer, torch.zeros(1, 256, dtype=torch.bfloat16), None)
    x = torch.randn(2, layer.input_size, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    assert torch.equal(layer(x), make_layer("qkv", 64, False, kernel=False, act_order=True)(x))
    config = ScaledConfig("int4", group_size=64)  # rank 1 of 2 holds input columns [96, 192): groups straddle
    rank1 = RowParallelLinear(192, 32, tp=TPContext(1, 2), quant_config=config, params_dtype=torch.bfloat16)
    rank1.weight.data.zero_()
    assert "input columns [96, 192) is not whole 1 x 64 groups" in rank1.quant_method.kernel.refusal(rank1)
    off = make_layer("qkv", 64, True, kernel=False)
    assert off.quant_method.kernel is None and not set(KERNEL_BUFFERS) & set(off._buffers)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two unrelated tiny checkpoints of one config (every linear layer goes to the kernel)."""
    root = tmp_path_factory.mktemp("int4kernel")
    return (write_synthetic_checkpoint(root / "a", TINY_SPEC),
            write_synthetic_checkpoint(root / "b", dataclasses.replace(TINY_SPEC, seed=1)))


def kernel_buffers(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{b}": getattr(m, b) for n, m in model.named_modules() for b in KERNEL_BUFFERS if b in m._buffers}


def test_reload_rewrites_the_kernel_copy_in_place(checkpoints, kernel_calls):
    """Symmetric here; the asymmetric copy is rebuilt in the test below."""
    a, b = checkpoints
    model, cold_b = load_model(a, quantization="int4"), load_model(b, quantization="int4")
    buffers = kernel_buffers(model)
    assert len(buffers) == 2 * 4 * TINY_SPEC.num_layers  # every linear layer of the model
    addresses = {n: t.data_ptr() for n, t in [*inference_tensors(model).items(), *buffers.items()]}
    before = model(IDS)
    reload_weights(model, iterate_weights(b))
    assert {n: t.data_ptr() for n, t in [*inference_tensors(model).items(), *kernel_buffers(model).items()]} == addresses
    assert kernel_calls and torch.equal(model(IDS), cold_b(IDS)) and not torch.equal(model(IDS), before)
    assert all(torch.equal(t, kernel_buffers(cold_b)[n]) for n, t in kernel_buffers(model).items())


def test_writes_outside_a_load_rebuild_the_copy_before_use(checkpoints):
    """A processed-tensor update, a hand copy and an aborted atomic update write the int4 tensors
    without `process_weights_after_loading`; the next forward rebuilds the copy from them."""
    a, b = checkpoints
    model, cold_a, cold_b = (load_model(p, quantization="int4", symmetric=False) for p in (a, a, b))
    expected_a, expected_b = cold_a(IDS), cold_b(IDS)
    reload_weights(model, inference_tensors(cold_b).items(), checkpoint_format=False)
    assert torch.equal(model(IDS), expected_b)
    with torch.no_grad():
        for name, tensor in inference_tensors(model).items():
            tensor.copy_(inference_tensors(cold_a)[name])
    assert torch.equal(model(IDS), expected_a)
    update = begin_update(model, atomic=True)
    update.load_many(iterate_weights(b))  # every layer re-quantized (and its copy rebuilt) to b's
    update.abort()  # the snapshot's copy_ puts a's int4 tensors back
    assert torch.equal(model(IDS), expected_a)


def test_the_copy_is_not_an_inference_tensor(checkpoints):
    """Not in the state dict, snapshots, fingerprints: the kernel model hashes as the dequantize one."""
    a, _ = checkpoints
    kernel, plain = load_model(a, quantization="int4"), load_model(a, quantization="int4", int4_kernel=False)
    assert not set(kernel_buffers(kernel)) & (set(kernel.state_dict()) | set(inference_tensors(kernel)))
    assert weights_digests(kernel) == weights_digests(plain)
    assert weights_fingerprint(kernel) == weights_fingerprint(plain)
    extra = sum(t.numel() * t.element_size() for t in kernel_buffers(kernel).values())
    assert kernel.load_report.model_bytes == plain.load_report.model_bytes + extra


def test_a_model_loaded_under_inference_mode_dequantizes(checkpoints):
    """Inference tensors have no version counter, so the copy could not follow their writes: no copy."""
    a, _ = checkpoints
    with torch.inference_mode():
        model = load_model(a, quantization="int4")
        qkv = model.model.layers[0].self_attn.qkv_proj
        assert "inference_mode" in qkv.quant_method.kernel.refusal(qkv) and not kernel_buffers(model)
        assert torch.equal(model(IDS), load_model(a, quantization="int4", int4_kernel=False)(IDS))
