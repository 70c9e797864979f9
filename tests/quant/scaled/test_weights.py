"""fp8 streaming mechanics: any order gives the same bits, every element is written (NaN sentinel),
TP=2 shards are bitwise the TP=1 codes and scales, and the failure modes of PEERS.md: NaN / Inf
weights named by checkpoint tensor (on every rank), zero rows, late biases, memory released."""

from __future__ import annotations

import random

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
from transformers import AutoConfig

from streamquant.api import load_model
from streamquant.checkpoint.reader import iterate_weights
from streamquant.loading.errors import NonFiniteWeightError
from streamquant.loading.materialize import materialize_
from streamquant.loading.streaming import stream_weights
from streamquant.models import get_model_class
from streamquant.parallel.context import TPContext
from streamquant.quant.scaled.config import ScaledConfig
from streamquant.quant.scaled.weights import shard_layouts
from streamquant.quant.math.int4_pack import unpack_int4

from hf_cases import CASE_IDS, CASES, make_checkpoint

from ..fp8_model_helpers import GRANULARITY, SCHEMES, fp8_state, quantized_modules

NAN = float("nan")
INT8_SENTINEL = -128


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_fp8_stream")
    return {c.name: make_checkpoint(c, root) for c in CASES}


def orders(items):
    by_type = sorted(items, key=lambda kv: (kv[0].split(".")[-2:], kv[0]))  # grouped by parameter type across layers
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    biases_last = sorted(items, key=lambda kv: kv[0].endswith("bias"))
    return {"in-order": items, "reversed": items[::-1], "shuffled": shuffled, "by-type": by_type,
            "biases-last": biases_last}


def meta_fp8_model(path, scheme, dtype=torch.float32):
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return get_model_class(config)(config, tp=TPContext(), quant_config=ScaledConfig(scheme), params_dtype=dtype)


def code_sentinel(dtype):
    """What fresh code memory is filled with: NaN for fp8, -128 for int8 (symmetric int8 never writes
    it), 0 for packed int4 words (eight nibbles 0, i.e. code -8, which symmetric int4 never writes)."""
    return {torch.int8: INT8_SENTINEL, torch.int32: 0}.get(dtype, NAN)


def unwritten_codes(codes):
    """Where codes still hold the sentinel (int4: any nibble 0)."""
    if codes.dtype == torch.int8:
        return codes == INT8_SENTINEL
    if codes.dtype == torch.int32:
        return unpack_int4(codes) == -8
    return torch.isnan(codes.float())


def nan_filled_stream(path, scheme, order):
    """Stream into a meta model whose codes and scales were first given sentinel-filled memory."""
    model = meta_fp8_model(path, scheme)
    for module in quantized_modules(model).values():
        for pname in module.checkpoint_params:
            codes = getattr(module, pname)
            materialize_(codes, "cpu", fill=code_sentinel(codes.dtype))
            materialize_(getattr(module, f"{pname}_scale"), "cpu", fill=NAN)
    stream_weights(model, order, model.weight_mapping, device="cpu", fill=NAN)
    return model


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", ["llama-tied-mqa-llama3rope", "qwen2moe", "opt"])
def test_any_order_gives_the_same_bits_and_writes_every_element(checkpoints, name, scheme):
    path = checkpoints[name]
    reference = fp8_state(load_model(path, quantization=scheme, dtype=torch.float32))
    items = list(iterate_weights(path))
    for label, order in orders(items).items():
        model = nan_filled_stream(path, scheme, order)
        state = fp8_state(model)
        assert state.keys() == reference.keys()
        for key, value in state.items():
            if key.endswith("_scale"):
                assert not torch.isnan(value).any(), (label, key)
            else:
                live = dict(model.named_parameters())[key]
                assert not unwritten_codes(live.detach()).any(), (label, key)
            assert torch.equal(value, reference[key]), (label, key)
        for module in quantized_modules(model).values():
            assert all(p.is_meta for p in module.checkpoint_params.values()), label


def _tp_states(paths: dict) -> dict:
    tp = TPContext.from_process_group()
    out = {}
    for name, path in paths.items():
        for scheme in SCHEMES:
            model = load_model(path, quantization=scheme, dtype=torch.float32, tp=tp)
            shards = {f"{m}.{p}": s for m, mod in quantized_modules(model).items() for p, s in mod.logical_shards.items()}
            out[name, scheme] = (fp8_state(model), shards)
    return out


@pytest.fixture(scope="module")
def tp2_states(ranks, checkpoints):
    return ranks.run(_rank_states, 2, dict(checkpoints))


def _rank_states(paths: dict) -> list:
    """Every rank's states, gathered to rank 0 (a job returns rank 0's result)."""
    mine = _tp_states(paths)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


@pytest.mark.parametrize("name", CASE_IDS)
def test_tp2_shards_are_bitwise_the_tp1_codes_and_scales(checkpoints, tp2_states, name):
    for scheme in SCHEMES:
        whole = load_model(checkpoints[name], quantization=scheme, dtype=torch.float32)
        full = fp8_state(whole)
        whole_layouts = {f"{m}.{p}": {lay.label: lay for lay in shard_layouts(s, GRANULARITY[scheme])}
                         for m, mod in quantized_modules(whole).items() for p, s in mod.logical_shards.items()}
        for rank_state, rank_shards in (states[name, scheme] for states in tp2_states):
            for pname, shards in rank_shards.items():
                codes, scales = rank_state[pname], rank_state[f"{pname}_scale"]
                for lay in shard_layouts(shards, GRANULARITY[scheme]):
                    ref = whole_layouts[pname][lay.label]
                    w = lay.window
                    grid_rows, grid_cols = w.local_grid(lay.tile)
                    want_codes = full[pname][..., ref.rows, :][..., w.row0:w.row0 + w.rows, w.col0:w.col0 + w.cols]
                    want_scales = full[f"{pname}_scale"][..., ref.scale_rows, :][..., grid_rows, grid_cols]
                    assert torch.equal(codes[..., lay.rows, :], want_codes), (scheme, pname, lay.label)
                    assert torch.equal(scales[..., lay.scale_rows, :], want_scales), (scheme, pname, lay.label)


def corrupted_checkpoint(src, out, edit):
    """A copy of checkpoint `src` (config + one safetensors file) with `edit(tensors)` applied."""
    out.mkdir(parents=True, exist_ok=True)
    for extra in src.iterdir():
        if extra.suffix == ".json" and not extra.name.endswith(".index.json"):
            (out / extra.name).write_text(extra.read_text())
    tensors = {n: t.clone() for n, t in iterate_weights(src)}
    edit(tensors)
    safetensors.torch.save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("bad", [NAN, float("inf"), -float("inf")])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_non_finite_weight_is_named_by_checkpoint_tensor(checkpoints, tmp_path, scheme, bad):
    target = "model.layers.1.self_attn.k_proj.weight"

    def poison(tensors):
        tensors[target][3, 5] = bad

    path = corrupted_checkpoint(checkpoints["llama"], tmp_path / "bad", poison)
    with pytest.raises(NonFiniteWeightError, match=rf"'{target}' holds NaN or Inf.*qkv_proj"):
        load_model(path, quantization=scheme)


def _load_and_report(path, scheme):
    try:
        load_model(path, quantization=scheme, dtype=torch.float32, tp=TPContext.from_process_group())
    except NonFiniteWeightError as e:
        return f"rank {dist.get_rank()}: {e}"
    return f"rank {dist.get_rank()}: loaded"


def _all_ranks(path, scheme):
    mine = _load_and_report(path, scheme)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


@pytest.mark.parametrize(("tensor", "index"), [
    ("model.layers.0.mlp.down_proj.weight", (2, 90)),  # row parallel: column 90 of 96 is rank 1's half
    ("model.layers.0.self_attn.q_proj.weight", (40, 3)),  # column parallel: row 40 of 64 is rank 1's half
])
@pytest.mark.parametrize("scheme", ["fp8-block", "int8"])  # per block and per row; every scheme shares the reduction
def test_non_finite_weight_fails_on_every_rank_without_hanging(ranks, checkpoints, tmp_path, scheme, tensor, index):
    """NaN in rank 1's half: both ranks raise (rank 0 learns it from the amax all-reduce, which runs
    at TP > 1 even where no scale tile straddles ranks), so neither waits in a later collective."""

    def poison(tensors):
        tensors[tensor][index] = NAN

    path = corrupted_checkpoint(checkpoints["llama"], tmp_path / "bad", poison)
    messages = ranks.run(_all_ranks, 2, path, scheme)
    assert "another tensor-parallel rank's shard holds NaN or Inf" in messages[0]
    assert f"'{tensor}' holds NaN or Inf" in messages[1]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_zero_rows_and_zero_tensors_get_floored_scales(checkpoints, tmp_path, scheme):
    def zero(tensors):
        tensors["model.layers.0.mlp.down_proj.weight"][7].zero_()
        tensors["model.layers.1.self_attn.o_proj.weight"].zero_()

    path = corrupted_checkpoint(checkpoints["llama"], tmp_path / "zero", zero)
    model = load_model(path, quantization=scheme, dtype=torch.float32)
    modules = dict(model.named_modules())
    o_proj = modules["model.layers.1.self_attn.o_proj"]
    # the scale floor: 1 / (max * 512), and for MX the smallest E8M0 power of two
    floor = {"int8": 1 / (127 * 512), "int4": 1 / (7 * 512), "mxfp8": 2.0 ** -127}.get(scheme, 1 / (448 * 512))
    min_scale = torch.tensor(floor, dtype=torch.float32)
    assert torch.equal(o_proj.weight_scale, min_scale.expand_as(o_proj.weight_scale))
    zero_codes = unpack_int4(o_proj.weight) if scheme == "int4" else o_proj.weight
    assert (zero_codes.view(torch.uint8) == 0).all()
    down = modules["model.layers.0.mlp.down_proj"]
    down_codes = unpack_int4(down.weight) if scheme == "int4" else down.weight
    assert (down_codes[7].float() == 0).all() and torch.isfinite(down.weight_scale).all()
    if scheme in ("fp8-channel", "int8"):
        assert down.weight_scale[7, 0] == min_scale
    if scheme in ("mxfp8", "int4"):
        assert (down.weight_scale[7] == min_scale).all()
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_failed_fp8_load_releases_layers_in_flight(checkpoints, tmp_path):
    def drop(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]

    path = corrupted_checkpoint(checkpoints["llama"], tmp_path / "partial", drop)
    model = meta_fp8_model(path, "fp8")
    with pytest.raises(Exception, match="up_proj"):
        stream_weights(model, iterate_weights(path), model.weight_mapping, device="cpu")
    for module in quantized_modules(model).values():
        assert all(p.is_meta for p in module.checkpoint_params.values())
    gate_up = dict(model.named_modules())["model.layers.1.mlp.gate_up_proj"]
    assert gate_up.weight.is_meta  # never quantized: no half-written fp8 weight to compute with


def test_strict_false_leaves_incomplete_layers_unusable_and_released(checkpoints, tmp_path):
    def drop(tensors):
        del tensors["model.layers.1.self_attn.k_proj.weight"]

    path = corrupted_checkpoint(checkpoints["llama-tied-mqa-llama3rope"], tmp_path / "partial", drop)
    model = load_model(path, quantization="fp8", strict=False)
    qkv = dict(model.named_modules())["model.layers.1.self_attn.qkv_proj"]
    assert qkv.weight.is_meta and all(p.is_meta for p in qkv.checkpoint_params.values())
    with pytest.raises(RuntimeError, match=r"'model.layers.1.self_attn.qkv_proj' has no fp8 'weight'"):
        model(torch.tensor([[1, 2, 3]]))


def test_permanent_parameters_never_share_a_staging_buffer(checkpoints):
    """An unquantized layer loaded after quantized ones gets exactly its own memory, not a pooled buffer."""
    model = load_model(checkpoints["llama"], quantization="fp8", ignore=[r"layers\.1\.mlp\.down_proj"])
    for name, param in model.named_parameters():
        if not param.is_meta:
            assert param.untyped_storage().nbytes() == param.numel() * param.element_size(), name
