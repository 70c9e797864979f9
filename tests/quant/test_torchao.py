"""torchao configs as streaming schemes, on real torchao (the `test` extra installs it).

The reference for every layer is torchao's own `quantize_` on an `nn.Linear` holding that layer's
checkpoint tensors as they come from the checkpoint (q, k, v concatenated; gate and up), bypassing
streamquant's loading, fusing and tensor parallelism; the comparison is of every inner tensor, bit
for bit. Reloads write those inner tensors in place (same addresses) and equal a cold load."""

from __future__ import annotations

import sys

import pytest
import torch

from streamquant.api import load_model
from streamquant.checkpoint.reader import iterate_weights
from streamquant.loading.errors import NonFiniteWeightError
from streamquant.parallel.context import TPContext
from streamquant.quant.torchao import TORCHAO_PRESETS, inner_tensors, quantized_weight
from streamquant.loading.contract import inference_tensors
from streamquant.reload import reload_weights

from hf_cases import CASES, make_checkpoint, write_variant

from .scaled.test_weights import corrupted_checkpoint

torchao = pytest.importorskip("torchao")  # in the `test` extra: a CI run without it is a broken install
PRESETS = list(TORCHAO_PRESETS)
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchao")
    return {c.name: make_checkpoint(c, root) for c in CASES if c.name in ("llama", "qwen3moe", "opt")}


def is_subclass(t: torch.Tensor) -> bool:
    """A torchao (wrapper subclass) tensor, as opposed to a plain parameter."""
    return hasattr(t, "__tensor_flatten__")


def llama_layer_weights(path, layer: int) -> dict[str, torch.Tensor]:
    """The fused module name -> the checkpoint tensors of that module, concatenated as it fuses them."""
    t = {n: w.to(torch.bfloat16) for n, w in iterate_weights(path)}
    p = f"model.layers.{layer}."
    return {f"{p}self_attn.qkv_proj": torch.cat([t[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"]),
            f"{p}self_attn.o_proj": t[f"{p}self_attn.o_proj.weight"],
            f"{p}mlp.gate_up_proj": torch.cat([t[f"{p}mlp.gate_proj.weight"], t[f"{p}mlp.up_proj.weight"]]),
            f"{p}mlp.down_proj": t[f"{p}mlp.down_proj.weight"]}


def assert_inner_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert type(got) is type(want), what
    got_inner, want_inner = inner_tensors(got), inner_tensors(want)
    assert got_inner.keys() == want_inner.keys(), what
    for name in want_inner:
        assert torch.equal(got_inner[name], want_inner[name]), (what, name)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_layer_equals_torchao_on_its_checkpoint_tensors(checkpoints, preset):
    model = load_model(checkpoints["llama"], quantization=preset)
    modules = dict(model.named_modules())
    config = TORCHAO_PRESETS[preset]()
    for layer in range(model.config.num_hidden_layers):
        for name, weight in llama_layer_weights(checkpoints["llama"], layer).items():
            assert_inner_equal(modules[name].weight, quantized_weight(weight, config), name)
            assert all(p.is_meta for p in modules[name].checkpoint_params.values())  # bf16 copy released
    assert model.load_report.quantization == preset


@pytest.mark.parametrize("name", ["llama", "qwen3moe", "opt"])
def test_logits_stay_near_bf16_and_experts_stay_unquantized(checkpoints, name):
    bf16 = load_model(checkpoints[name])(IDS).float()
    model = load_model(checkpoints[name], quantization="torchao:int8-weight-only", measure_error=True)
    ours = model(IDS).float()
    assert torch.isfinite(ours).all()
    assert ((ours - bf16).norm() / bf16.norm()).item() < 0.05  # measured 0.018-0.02 (int8 per-row weights)
    error = model.load_report.quantization_error
    assert error["weights"] > 0 and 35 < error["sqnr_db_min"]  # int8 per row: ~44 dB on these weights
    for module in model.modules():
        if hasattr(module, "w13_weight"):
            assert module.w13_weight.dtype == torch.bfloat16 and not is_subclass(module.w13_weight)


@pytest.mark.parametrize("preset", ["torchao:int8-dynamic", "torchao:float8-weight-only", "torchao:int4-weight-only"])
@pytest.mark.parametrize("name", ["llama", "qwen3moe"])
def test_reload_writes_inner_tensors_in_place_bitwise_a_cold_load(checkpoints, tmp_path, name, preset):
    a, b = checkpoints[name], write_variant(checkpoints[name], tmp_path / "b")
    model = load_model(a, quantization=preset)
    before = {n: t.data_ptr() for n, t in inference_tensors(model).items()}
    weights = {n: m.weight for n, m in model.named_modules() if hasattr(m, "checkpoint_params")}
    reload_weights(model, b)
    cold = load_model(b, quantization=preset)
    live, want = inference_tensors(model), inference_tensors(cold)
    assert live.keys() == want.keys() and any(".weight.qdata" in n for n in live)
    for n in want:
        assert torch.equal(live[n], want[n]), n
    assert {n: t.data_ptr() for n, t in live.items()} == before
    assert all(m.weight is weights[n] for n, m in model.named_modules() if n in weights)  # the same objects
    assert torch.equal(model(IDS), cold(IDS))


def test_a_failed_reload_restores_the_torchao_weights_when_atomic(checkpoints, tmp_path):
    path = checkpoints["llama"]
    bad = corrupted_checkpoint(path, tmp_path / "bad",
                               lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__((2, 3), float("nan")))
    model = load_model(path, quantization="torchao:int8-weight-only")
    snapshot = {n: t.clone() for n, t in inference_tensors(model).items()}
    with pytest.raises(NonFiniteWeightError, match="model.layers.1.mlp.up_proj.weight"):
        reload_weights(model, bad, atomic=True)
    for n, t in inference_tensors(model).items():
        assert torch.equal(t, snapshot[n]), n


def _tp_state(path, preset):
    model = load_model(path, quantization=preset, tp=TPContext.from_process_group())
    return {n: inner_tensors(m.weight) for n, m in model.named_modules() if hasattr(m, "checkpoint_params")}


def _tp_error(path, preset):
    try:
        load_model(path, quantization=preset, tp=TPContext.from_process_group())
    except ValueError as e:
        return str(e)
    return "loaded"


def _tp_cases(path):
    """Rank 0 gets every rank's int8-weight-only state, and its own error for int4 groups of 32."""
    import torch.distributed as dist

    mine = _tp_state(path, "torchao:int8-weight-only")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered, _tp_error(path, "torchao:int4-weight-only")


@pytest.fixture(scope="module")
def tp2(ranks, checkpoints):
    return ranks.run(_tp_cases, 2, checkpoints["llama"])  # one job for both TP=2 tests


def test_tp2_column_parallel_shards_are_the_tp1_rows(checkpoints, tp2):
    """int8 per-row: column-parallel (qkv, gate_up) rank shards are TP=1's rows bitwise; row-parallel
    (o_proj, down_proj) scales cover a rank's half-row, so they differ from TP=1 (module doc)."""
    whole = _tp_state(checkpoints["llama"], "torchao:int8-weight-only")
    ranks, _ = tp2
    for name in ("model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.gate_up_proj"):
        halves = [r[name]["qdata"] for r in ranks]  # gate and up each split in halves, stacked per rank
        rows = whole[name]["qdata"].shape[0] // 4
        gate, up = whole[name]["qdata"][: 2 * rows], whole[name]["qdata"][2 * rows:]
        for k, half in enumerate(halves):
            assert torch.equal(half, torch.cat([gate[k * rows:(k + 1) * rows], up[k * rows:(k + 1) * rows]])), name
    o_proj = "model.layers.0.self_attn.o_proj"
    assert not torch.equal(ranks[0][o_proj]["scale"], whole[o_proj]["scale"])


def test_a_group_straddling_the_row_parallel_split_is_a_clear_error(tp2):
    """int4 groups of 32 along the input: down_proj's 96 inputs split into 48 per rank, not whole groups."""
    _, message = tp2
    assert "model.layers.0.mlp.down_proj" in message and "[64, 48]" in message and "divisible" in message


def test_a_config_object_and_its_options(checkpoints):
    from torchao.quantization import Int8WeightOnlyConfig

    model = load_model(checkpoints["llama"], quantization=Int8WeightOnlyConfig(), ignore=[r"o_proj"])
    assert model.load_report.quantization == "torchao:Int8WeightOnlyConfig"
    assert not is_subclass(model.model.layers[0].self_attn.o_proj.weight)
    assert type(model.model.layers[0].self_attn.qkv_proj.weight).__name__ == "Int8Tensor"
    with pytest.raises(TypeError, match="unknown option.*torchao scheme: fp8_dtype"):
        load_model(checkpoints["llama"], quantization="torchao:int8-dynamic", fp8_dtype="e4m3fn")
    with pytest.raises(ValueError, match="unknown torchao preset 'torchao:int3'"):
        load_model(checkpoints["llama"], quantization="torchao:int3")


def test_without_torchao_the_error_says_what_to_install(checkpoints, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"needs the torchao package.*pip install torchao"):
        load_model(checkpoints["llama"], quantization="torchao:int8-weight-only")
