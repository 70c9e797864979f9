"""Reloads into a model loaded from a pre-quantized compressed-tensors int8 / int4 checkpoint, in place
(every inference tensor keeps its address):
  - new high-precision weights are quantized to the checkpoint's scheme (group size, zero points), bitwise
    what an online load of the same weights with that scheme holds; after act order, every column in
    its contiguous group;
  - new codes in the checkpoint's own layout (another checkpoint directory, or its tensors with
    `quantized_source=True`) are bitwise a cold load of them; a bad one fails closed (atomic)."""

from __future__ import annotations

import pytest
import torch
from hf_cases import CASES, make_checkpoint, write_variant

from streamquant import load_model
from streamquant.checkpoint.reader import iterate_weights
from streamquant.loading.contract import inference_tensors
from streamquant.loading.errors import WeightLoadError
from streamquant.reload import reload_weights

from .ct_int_checkpoints import ct_checkpoint, numpy_checkpoint

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
# name -> (writer, online options of the same scheme)
KINDS = {"int8": ("int8", {"quantization": "int8"}),
         "int4-asym": ("int4-asym", {"quantization": "int4", "group_size": 16, "symmetric": False}),
         "int4-actorder": ("np", {"quantization": "int4", "group_size": 32})}


def write(kind, src, root):
    writer = KINDS[kind][0]
    if writer == "np":
        return numpy_checkpoint(src, root, True, 32, True)[0]
    return ct_checkpoint(src, root, writer, group_size=KINDS[kind][1].get("group_size", 32))[0]


@pytest.fixture(scope="module", params=["llama", "qwen3moe"])
def sources(request, tmp_path_factory):
    """(A, B: A after a training step) high-precision checkpoints, and each kind's checkpoints of both."""
    root = tmp_path_factory.mktemp(f"int_reload_{request.param}")
    a = make_checkpoint(next(c for c in CASES if c.name == request.param), root)
    b = write_variant(a, root / "b")
    return a, b, {kind: (write(kind, a, root / "qa"), write(kind, b, root / "qb")) for kind in KINDS}


def addresses(model):
    return {n: t.data_ptr() for n, t in inference_tensors(model).items()}


@pytest.mark.parametrize("kind", KINDS)
def test_high_precision_reload_quantizes_to_the_checkpoint_scheme(sources, kind):
    _, b, quantized = sources
    model = load_model(quantized[kind][0])
    before = addresses(model)
    reload_weights(model, b)
    assert addresses(model) == before
    # the checkpoint records no formula: its format's own (compressed-tensors') arithmetic re-quantizes it
    reference = load_model(b, **KINDS[kind][1], formula="compressed-tensors")
    online = inference_tensors(reference)
    live = inference_tensors(model)
    g_idx = {n: t for n, t in live.items() if n.endswith("_g_idx")}
    assert bool(g_idx) == (kind == "int4-actorder")
    assert live.keys() - g_idx.keys() == online.keys()
    assert [n for n in online if not torch.equal(live[n], online[n])] == []
    for name, index in g_idx.items():  # contiguous groups: column j in group j // 32
        assert torch.equal(index, (torch.arange(index.shape[-1]) // 32).to(torch.int32).expand_as(index)), name
    assert torch.equal(model(IDS), reference(IDS))


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_reload_installs_the_checkpoint_codes_in_place(sources, kind):
    _, _, quantized = sources
    start, new = quantized[kind]
    model = load_model(start)
    before = addresses(model)
    reload_weights(model, new)  # a directory says itself that it is pre-quantized
    cold = load_model(new)
    want = inference_tensors(cold)
    assert addresses(model) == before and inference_tensors(model).keys() == want.keys()
    assert all(torch.equal(inference_tensors(model)[n], want[n]) for n in want)
    reload_weights(model, iterate_weights(start), quantized_source=True)  # and back, from its tensors
    assert torch.equal(model(IDS), load_model(start)(IDS)) and addresses(model) == before


def test_a_bad_quantized_reload_fails_closed(sources):
    _, _, quantized = sources
    start, new = quantized["int4-asym"]
    model = load_model(start)
    before = {n: t.clone() for n, t in inference_tensors(model).items()}

    def truncated_scale():
        for name, tensor in iterate_weights(new):
            yield name, (tensor[:, :-1].contiguous() if name.endswith("layers.1.self_attn.o_proj.weight_scale")
                         else tensor)
    with pytest.raises(WeightLoadError, match=r"o_proj\.weight_scale.*not the \[64, 4\] grid"):
        reload_weights(model, truncated_scale(), quantized_source=True, atomic=True)
    assert all(torch.equal(t, before[n]) for n, t in inference_tensors(model).items())
    assert torch.equal(model(IDS), load_model(start)(IDS))
