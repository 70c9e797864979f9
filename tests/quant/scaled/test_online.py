"""Online quantization of a loaded layer weight (`quant/scaled/online.py`) into an act-order int4 layer
(what a refit of a model loaded from a GPTQ-style checkpoint does): the codes, scales and zero points are
the plain int4 load's, every column in its contiguous group, and at TP=2 a row-parallel layer keeps every
group's scale on every rank, the global grid's rows. (The mechanics every scheme shares -- any order,
sentinels, TP=2 windows -- are test_weights.py's.)"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hf_cases import CASES, make_checkpoint

from streamquant import load_model
from streamquant.loading.contract import inference_tensors
from streamquant.parallel.context import TPContext
from streamquant.quant.math.int4_pack import unpack_int4_rows

IDS = torch.tensor([[2, 7, 1, 8, 2, 8]])
OPTIONS = {"quantization": "int4", "group_size": 16}


@pytest.fixture(scope="module")
def qwen3moe(tmp_path_factory):
    return make_checkpoint(next(c for c in CASES if c.name == "qwen3moe"), tmp_path_factory.mktemp("online"))


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_layers_quantize_as_plain_int4_in_contiguous_groups(qwen3moe, symmetric):
    plain = inference_tensors(load_model(qwen3moe, symmetric=symmetric, **OPTIONS))
    ordered_model = load_model(qwen3moe, symmetric=symmetric, act_order=True, **OPTIONS)
    ordered = inference_tensors(ordered_model)
    g_idx = {n: t for n, t in ordered.items() if n.endswith("_g_idx")}
    assert len(g_idx) == 4 * 2 and ordered.keys() - g_idx.keys() == plain.keys()  # qkv, o, w13, w2 per layer
    assert [n for n in plain if not torch.equal(plain[n], ordered[n])] == []
    for name, index in g_idx.items():
        assert torch.equal(index, (torch.arange(index.shape[-1]) // 16).to(torch.int32).expand_as(index)), name
    assert torch.equal(ordered_model(IDS), load_model(qwen3moe, symmetric=symmetric, **OPTIONS)(IDS))


def _tp2(path):
    tp = TPContext.from_process_group(reduce_dtype=torch.float32)
    model = load_model(path, symmetric=False, act_order=True, tp=tp, **OPTIONS)
    tensors = {n: t.clone() for n, t in inference_tensors(model).items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, tensors)
    return gathered, model(IDS)


def test_tp2_row_parallel_act_order_layers_keep_every_group(ranks, qwen3moe):
    (rank0, rank1), logits = ranks.run(_tp2, 2, qwen3moe)
    whole = inference_tensors(load_model(qwen3moe, symmetric=False, act_order=True, **OPTIONS))
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.experts.w2_weight"):
        for suffix in ("_scale", "_zero_point"):  # row parallel: every rank holds the TP=1 grid
            assert torch.equal(rank0[name + suffix], whole[name + suffix])
            assert torch.equal(rank1[name + suffix], whole[name + suffix])
        cols = whole[name + "_g_idx"].shape[-1] // 2
        assert torch.equal(rank1[name + "_g_idx"], whole[name + "_g_idx"][..., cols:])
    zeros = unpack_int4_rows(whole["model.layers.0.self_attn.o_proj.weight_zero_point"])
    assert zeros.shape == whole["model.layers.0.self_attn.o_proj.weight_scale"].shape
    model = load_model(qwen3moe, symmetric=False, act_order=True, **OPTIONS)
    assert torch.equal(logits, model(IDS))
