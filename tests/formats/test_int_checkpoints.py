"""Pre-quantized compressed-tensors int8 (W8A8) and int4 (W4A16, symmetric / asymmetric, with and without
act order) checkpoints load, dense and MoE, TP 1 and 2, against independent references
(`ct_int_checkpoints.py`: the compressed-tensors library's compressors and decompression, a numpy writer
of the format for `g_idx`, transformers running the decompressed dense model):
  - every logical weight (q, k, v, gate, up, each expert's) dequantized from what loaded is bitwise the
    reference's decompression, on every rank its window of it (a group straddling the TP=2 cut of
    down_proj's 96 inputs is kept by both ranks), after a load into sentinel-filled memory;
  - logits: int4 through the dequantize path (`int4_kernel=False`) bitwise transformers' on the decompressed
    model (bf16, the same dequantized weights); int8 within its activation quantization error (W8A8) and
    within the int8 kernel's bf16 rounding (weight-only); TP=2 (float32 partial sums) bitwise TP=1's for
    int4 (dequantize path), within the activation error for W8A8;
  - int4 with its default CPU int4 kernel (`quant/scaled/int4_kernel.py`): the kernel's copy is built after
    the pre-quantized load and after a `quantized_source` reload (in place, as a cold load's), every linear
    layer's kernel output is within bf16 rounding of the float64 product of the reference weights, as the
    dequantize path's is; act-order layers get no copy and dequantize.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hf_cases import CASES, hf_logits, make_checkpoint, write_variant

from streamquant import load_model
from streamquant.checkpoint.reader import checkpoint_shapes, iterate_weights, load_hf_config
from streamquant.config import make_quant_config
from streamquant.formats.prequantized import prequantized_plan, prequantized_tensors
from streamquant.loading.contract import derived_tensors
from streamquant.loading.materialize import materialize_
from streamquant.loading.streaming import stream_weights
from streamquant.models import get_model_class
from streamquant.parallel.context import TPContext
from streamquant.quant.scaled import int4_kernel
from streamquant.quant.scaled.readback import dequantize_weight
from streamquant.quant.scaled.weights import shard_layouts
from streamquant.reload import reload_weights

from .ct_int_checkpoints import ct_checkpoint, numpy_checkpoint

IDS = torch.tensor([[1, 5, 9, 20, 3, 77, 41, 8]])
# (scheme, writer, group size, act order): CT's compressors without act order, the numpy writer with it
KINDS = {"int8": ("int8", "ct", None, False), "int4": ("int4", "ct", 32, False),
         "int4-asym": ("int4-asym", "ct", 16, False), "int4-actorder": ("int4", "np", 32, True),
         "int4-asym-actorder": ("int4-asym", "np", 16, True)}
MODELS = ("llama", "qwen3moe")
SENTINELS = {torch.float32: float("nan"), torch.int8: -128, torch.int32: -1}  # int4 words: all codes 7
LABELS = {"q": "q", "k": "k", "v": "v", 0: "gate", 1: "up", "w1": "gate", "w3": "up", "w2": "down", None: ""}


def reference_pieces(model, dense):
    """(checkpoint name, module, parameter, logical label, expert or None, weight) of every dense reference
    tensor that lands in a quantized parameter (the references are per projection and per expert)."""
    modules = dict(model.named_modules())
    for name, tensor in iterate_weights(dense):
        param, kwargs = model.weight_mapping.map(name)
        mod_name, pname = param.rsplit(".", 1)
        if pname in (getattr(modules.get(mod_name), "checkpoint_params", None) or {}):
            yield name, mod_name, pname, LABELS[kwargs.get("shard_id")], kwargs.get("expert_id"), tensor


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{(model, kind): (checkpoint, dense reference)}"""
    root = tmp_path_factory.mktemp("ctint")
    out = {}
    for model in MODELS:
        src = make_checkpoint(next(c for c in CASES if c.name == model), root)
        for kind, (scheme, writer, group, act_order) in KINDS.items():
            if writer == "ct":
                out[model, kind] = ct_checkpoint(src, root / model, scheme, group_size=group or 32)
            else:
                out[model, kind] = numpy_checkpoint(src, root / model, scheme == "int4", group, act_order)
    return out


def dequantizing(kind: str) -> dict:
    """The options that keep an int4 load on the dequantize path (no kernel copy)."""
    return {} if kind == "int8" else {"int4_kernel": False}


def sentinel_load(path, tp: TPContext = TPContext(), **user_options):
    """`load_model`'s pre-quantized path into codes, scales, zero points and group indices first filled with
    sentinels (NaN scales, -128 int8, all-7 int4 words), other parameters NaN: unwritten memory shows."""
    config = load_hf_config(path)
    model_class = get_model_class(config)
    plan, scheme, options = prequantized_plan(model_class, config, path, checkpoint_shapes(path), None, user_options)
    with torch.device("meta"):
        model = model_class(config, tp=tp, quant_config=make_quant_config(scheme, options), params_dtype=torch.bfloat16)
    for module in model.modules():
        for tensor in derived_tensors(module).values():
            materialize_(tensor, "cpu", fill=SENTINELS[tensor.dtype])
    stream_weights(model, prequantized_tensors(iterate_weights(path), plan, torch.bfloat16), model.weight_mapping,
                   device="cpu", fill=float("nan"), quantized_source=True)
    return model.eval()


def mismatches(model, dense) -> tuple[list, int]:
    """Logical weights (this rank's window of each) whose dequantization differs from the reference's."""
    modules, bad, seen = dict(model.named_modules()), [], 0
    for name, mod_name, pname, label, e, w in reference_pieces(model, dense):
        module = modules[mod_name]
        layouts = shard_layouts(module.logical_shards[pname], module.quant_method.spec.granularity)
        lay = next(x for x in layouts if x.label == label)
        parts = [getattr(module, f"{pname}{s}", None) for s in ("", "_scale", "_zero_point", "_g_idx")]
        if e is not None:
            parts = [None if p is None else p[e] for p in parts]
        ours = dequantize_weight(parts[0], parts[1], layouts, torch.bfloat16, parts[2], parts[3])[lay.rows]
        win = lay.window
        if not torch.equal(ours, w.to(torch.bfloat16)[win.row0:win.row0 + win.rows, win.col0:win.col0 + win.cols]):
            bad.append((name, label, e))
        seen += 1
    return bad, seen


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_name", MODELS)
def test_loads_bitwise_the_reference_weights_and_logits(checkpoints, model_name, kind):
    path, dense = checkpoints[model_name, kind]
    model = sentinel_load(path, **dequantizing(kind))
    bad, seen = mismatches(model, dense)
    assert not bad and seen >= (7 if model_name == "llama" else 16), bad[:4]
    loaded = load_model(path, **dequantizing(kind))
    assert loaded.load_report.quantization == KINDS[kind][0].removesuffix("-asym")
    got, want = loaded(IDS), hf_logits(dense, IDS, torch.bfloat16)
    assert torch.equal(model(IDS), got)
    if kind != "int8":
        assert torch.equal(got, want)
        return
    # W8A8: dynamic per-token int8 activations (measured max |diff| 0.088 of logits up to 2.9);
    # weight-only through torch's int8 kernel: its bf16 rounding differs from F.linear's (0.047)
    assert float((got - want).abs().max()) <= 0.06 * float(want.abs().max())
    weight_only = load_model(path, activation_scheme="none")(IDS)
    assert float((weight_only - want).abs().max()) <= 0.03 * float(want.abs().max())
    assert torch.equal(weight_only.argmax(-1), want.argmax(-1))


def _tp2(cases: dict) -> dict:
    tp = TPContext.from_process_group(reduce_dtype=torch.float32)  # partial sums rounded once, as at TP=1
    mine = {}
    for key, (path, dense) in cases.items():
        model = sentinel_load(path, tp, **dequantizing(key[1]))
        mine[key] = (mismatches(model, dense), model(IDS))  # every rank runs the forward (its collectives)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {k: v[0] for k, v in mine.items()})
    return {k: (v[1], [g[k] for g in gathered]) for k, v in mine.items()}


@pytest.fixture(scope="module")
def tp2(ranks, checkpoints):
    return ranks.run(_tp2, 2, dict(checkpoints))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_name", MODELS)
def test_tp2_holds_every_rank_window_of_the_reference_and_agrees_with_tp1(checkpoints, tp2, model_name, kind):
    logits, per_rank = tp2[model_name, kind]
    for bad, seen in per_rank:
        assert not bad and seen >= 7, bad[:4]
    whole = load_model(checkpoints[model_name, kind][0], **dequantizing(kind))(IDS)
    if kind != "int8":  # the same bf16 weights, float32 partial sums rounded once: TP=1's logits
        assert torch.equal(logits, whole)
        return
    # W8A8: each rank quantizes its row-parallel activations with its own scales (`scaled/linear.py`):
    # the activation quantization error again (measured 0.094 / 0.10 of logits up to 3)
    assert float((logits - whole).abs().max()) <= 0.06 * float(whole.abs().max())


KERNEL_BUFFERS = ("weight_int4pack", "weight_int4pack_scales_and_zeros")


@pytest.fixture(scope="module")
def kernel_checkpoints(tmp_path_factory):
    """llama, int4 asymmetric in groups of 32 (every linear layer fits the kernel) by compressed-tensors'
    compressor: (checkpoint, dense reference) of A, and the checkpoint of B (A after a training step)."""
    root = tmp_path_factory.mktemp("ctint_kernel")
    a = make_checkpoint(next(c for c in CASES if c.name == "llama"), root)
    b = write_variant(a, root / "b")
    return ct_checkpoint(a, root / "qa", "int4-asym", 32), ct_checkpoint(b, root / "qb", "int4-asym", 32)[0]


def kernel_copies(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{b}": getattr(m, b) for n, m in model.named_modules() for b in KERNEL_BUFFERS if b in m._buffers}


def reference_weights(model, dense) -> dict[str, torch.Tensor]:
    """Each quantized linear layer's whole weight, float64, stacked from the dense reference's projections."""
    modules, out = dict(model.named_modules()), {}
    for _, mod_name, pname, label, _, w in reference_pieces(model, dense):
        module = modules[mod_name]
        layouts = shard_layouts(module.logical_shards[pname], module.quant_method.spec.granularity)
        lay = next(x for x in layouts if x.label == label)
        whole = out.setdefault(mod_name, torch.full((sum(x.window.rows for x in layouts), w.shape[1]), float("nan"),
                                                    dtype=torch.float64))
        whole[lay.rows] = w.to(torch.bfloat16).double()
    return out


def test_prequantized_int4_multiplies_with_the_kernel_copy(checkpoints, kernel_checkpoints, monkeypatch):
    calls = []
    real = int4_kernel.int4_kernel_linear
    monkeypatch.setattr(int4_kernel, "int4_kernel_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    (path, dense), new = kernel_checkpoints
    model, plain = load_model(path), load_model(path, int4_kernel=False)
    copies = kernel_copies(model)
    assert len(copies) == 2 * 4 * 2 and not kernel_copies(plain)  # every linear layer of both layers
    assert not any(bool(t.isnan().any()) for t in copies.values() if t.is_floating_point())
    modules, gen = dict(model.named_modules()), torch.Generator().manual_seed(0)
    for mod_name, weight in reference_weights(model, dense).items():
        assert not bool(weight.isnan().any()), mod_name
        x = torch.randn(5, weight.shape[1], generator=gen).to(torch.bfloat16)
        want = x.double() @ weight.T
        before = len(calls)
        kernel_y = modules[mod_name](x)
        assert len(calls) == before + 1, mod_name
        dequantized_y = dict(plain.named_modules())[mod_name](x)
        assert len(calls) == before + 1 and not torch.equal(kernel_y, dequantized_y), mod_name  # two roundings
        for y in (kernel_y, dequantized_y):
            assert float((y.double() - want).norm()) <= 4e-3 * float(want.norm()), mod_name
    got, want = model(IDS), plain(IDS)
    assert float((got - want).abs().max()) <= 0.03 * float(want.abs().max())
    # a reload of pre-quantized codes rebuilds the copy in place: a cold load's, bitwise
    addresses = {n: t.data_ptr() for n, t in copies.items()}
    cold = load_model(new)
    assert not torch.equal(got, cold(IDS))
    reload_weights(model, iterate_weights(new), quantized_source=True)
    assert {n: t.data_ptr() for n, t in kernel_copies(model).items()} == addresses
    assert all(torch.equal(t, kernel_copies(cold)[n]) for n, t in kernel_copies(model).items())
    assert torch.equal(model(IDS), cold(IDS))
    # act order: no copy, the dequantize path
    calls.clear()
    ordered = load_model(checkpoints["llama", "int4-actorder"][0])
    qkv = ordered.model.layers[0].self_attn.qkv_proj
    assert not kernel_copies(ordered) and "activation order" in qkv.quant_method.kernel.refusal(qkv)
    assert torch.equal(ordered(IDS), load_model(checkpoints["llama", "int4-actorder"][0], int4_kernel=False)(IDS))
    assert not calls
