"""WeightLoadSession and the `stream_weights` driver on a toy decoder made of the parallel linear layers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from streamquant.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from streamquant.loading.errors import DuplicateWeightError, MissingWeightsError, UnexpectedWeightError, WeightLoadError
from streamquant.loading.session import WeightLoadSession
from streamquant.loading.streaming import stream_weights
from streamquant.loading.mapping import MappingRule, WeightMapping
from streamquant.parallel.context import TPContext
from streamquant.quant.unquantized import UnquantizedLinearMethod

from streamquant.models.base import stacked_rules

from .helpers import SETTINGS, expected_qkv

HIDDEN, HEAD, HEADS, KV, INTER, VOCAB, LAYERS = 4, 2, 4, 2, 4, 3, 2
MAPPING = WeightMapping(
    rules=(
        *stacked_rules(),
    ),
    skip=("rotary_emb.inv_freq",),
)


class Block(nn.Module):
    def __init__(self, tp, quant_config=None):
        super().__init__()
        kw = dict(tp=tp, quant_config=quant_config)
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = QKVParallelLinear(HIDDEN, HEAD, HEADS, KV, bias=True, **kw)
        self.self_attn.o_proj = RowParallelLinear(HEADS * HEAD, HIDDEN, **kw)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], **kw)
        self.mlp.down_proj = RowParallelLinear(INTER, HIDDEN, bias=True, **kw)


class Toy(nn.Module):
    def __init__(self, tp=TPContext(), quant_config=None):
        super().__init__()
        self.layers = nn.ModuleList(Block(tp, quant_config) for _ in range(LAYERS))
        self.lm_head = ReplicatedLinear(HIDDEN, VOCAB, tp=tp, quant_config=quant_config)
        for p in self.parameters():
            p.data.fill_(float("nan"))


def checkpoint() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj.weight": (HEADS * HEAD, HIDDEN), "self_attn.k_proj.weight": (KV * HEAD, HIDDEN),
              "self_attn.v_proj.weight": (KV * HEAD, HIDDEN), "self_attn.q_proj.bias": (HEADS * HEAD,),
              "self_attn.k_proj.bias": (KV * HEAD,), "self_attn.v_proj.bias": (KV * HEAD,),
              "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD), "mlp.gate_proj.weight": (INTER, HIDDEN),
              "mlp.up_proj.weight": (INTER, HIDDEN), "mlp.down_proj.weight": (HIDDEN, INTER),
              "mlp.down_proj.bias": (HIDDEN,), "self_attn.rotary_emb.inv_freq": (HEAD // 2,)}
    ckpt = {f"layers.{i}.{k}": torch.randn(s, generator=g) for i in range(LAYERS) for k, s in shapes.items()}
    ckpt["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=g)
    return ckpt


def expected_state(ckpt, n, r) -> dict[str, torch.Tensor]:
    out = {"lm_head.weight": ckpt["lm_head.weight"]}
    for i in range(LAYERS):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        for kind in ("weight", "bias"):
            qkv = [ckpt[f"{a}{s}_proj.{kind}"] for s in "qkv"]
            out[f"{a}qkv_proj.{kind}"] = expected_qkv(*qkv, HEADS, KV, HEAD, n, r)
        out[f"{a}o_proj.weight"] = ckpt[f"{a}o_proj.weight"].chunk(n, 1)[r]
        out[f"{m}gate_up_proj.weight"] = torch.cat([ckpt[f"{m}{s}_proj.weight"].chunk(n)[r] for s in ("gate", "up")])
        out[f"{m}down_proj.weight"] = ckpt[f"{m}down_proj.weight"].chunk(n, 1)[r]
        out[f"{m}down_proj.bias"] = ckpt[f"{m}down_proj.bias"]
    return out


@pytest.mark.parametrize("n", [1, 2, 4])
@settings(SETTINGS, max_examples=10)
@given(order=st.permutations(sorted(checkpoint())))
def test_every_rank_loads_exactly_its_shards(n, order):
    ckpt = checkpoint()
    for r in range(n):
        model = Toy(TPContext(r, n))
        loaded = stream_weights(model, [(name, ckpt[name]) for name in order], MAPPING, device="cpu").loaded
        assert loaded == {k for k in ckpt if "inv_freq" not in k}
        state = dict(model.named_parameters())
        expected = expected_state(ckpt, n, r)
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(state[name].detach(), value), name


def _load(ckpt, *, strict=True, model=None, mapping=MAPPING):
    return stream_weights(model or Toy(TPContext(1, 2)), list(ckpt.items()), mapping, device="cpu", strict=strict).loaded


def _missing_line(message: str, param: str) -> str:
    return next(line for line in message.splitlines() if line.strip().startswith(param + ":"))


def test_missing_shard_names_parameter_and_absent_tensor():
    ckpt = checkpoint()
    del ckpt["layers.0.self_attn.k_proj.weight"]
    with pytest.raises(MissingWeightsError) as info:
        _load(ckpt)
    message = str(info.value)
    line = _missing_line(message, "layers.0.self_attn.qkv_proj.weight")
    assert line.endswith("missing checkpoint tensors: layers.0.self_attn.k_proj.weight")  # q and v arrived
    assert "lm_head" not in message and "layers.1" not in message


def test_missing_whole_parameter():
    ckpt = checkpoint()
    del ckpt["lm_head.weight"]
    with pytest.raises(MissingWeightsError) as info:
        _load(ckpt)
    assert "0 of 12 elements" in _missing_line(str(info.value), "lm_head.weight")


def test_missing_message_uses_checkpoint_names_under_prefix_renames():
    mapping = WeightMapping(rules=MAPPING.rules, skip=MAPPING.skip, prefix_renames=(("model", "language_model"),))
    wrapper = nn.Module()
    wrapper.language_model = Toy(TPContext(1, 2))
    ckpt = {f"model.{k}": v for k, v in checkpoint().items() if k != "layers.0.self_attn.k_proj.weight"}
    with pytest.raises(MissingWeightsError) as info:
        _load(ckpt, model=wrapper, mapping=mapping)
    line = _missing_line(str(info.value), "language_model.layers.0.self_attn.qkv_proj.weight")
    assert line.endswith("missing checkpoint tensors: model.layers.0.self_attn.k_proj.weight")


def test_unexpected_tensor():
    ckpt = checkpoint()
    ckpt["layers.0.mlp.extra.weight"] = torch.zeros(2)
    with pytest.raises(UnexpectedWeightError, match=r"layers\.0\.mlp\.extra\.weight"):
        _load(ckpt)
    model = Toy(TPContext(1, 2))
    session = WeightLoadSession(model, MAPPING, strict=False)
    loaded = session.load_all(ckpt.items())
    session.check_complete()
    assert "layers.0.mlp.extra.weight" not in loaded and session.unexpected == ["layers.0.mlp.extra.weight"]
    assert loaded == _load(checkpoint(), strict=False)


def test_same_tensor_twice():
    ckpt = list(checkpoint().items())
    with pytest.raises(DuplicateWeightError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        stream_weights(Toy(), ckpt + [("layers.1.mlp.up_proj.weight", torch.randn(INTER, HIDDEN))], MAPPING, device="cpu")


def test_two_tensors_writing_the_same_region():
    ckpt = checkpoint()
    a = "layers.0.self_attn."
    ckpt[f"{a}qkv_proj.weight"] = torch.cat([ckpt[f"{a}{s}_proj.weight"] for s in "qkv"])  # fused on disk as well
    with pytest.raises(DuplicateWeightError) as info:
        _load(ckpt)
    message = str(info.value)
    assert f"{a}qkv_proj.weight" in message and (f"{a}q_proj.weight" in message or f"{a}k_proj.weight" in message)


@pytest.mark.parametrize("strict", [True, False])
def test_wrong_shape_names_tensor_parameter_and_shapes(strict):
    ckpt = checkpoint()
    ckpt["layers.1.self_attn.o_proj.weight"] = torch.randn(HIDDEN + 1, HEADS * HEAD)
    with pytest.raises(WeightLoadError) as info:
        _load(ckpt, strict=strict)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for part in ("'layers.1.self_attn.o_proj.weight'", "[5, 8]", "[4, 4]"):  # tensor = parameter name here
        assert part in message, message


def test_oversized_tensor_is_a_shape_error():
    ckpt = checkpoint()
    ckpt["layers.1.self_attn.o_proj.weight"] = torch.randn(HIDDEN, HEADS * HEAD + 1)
    with pytest.raises(WeightLoadError):
        _load(ckpt)


def test_session_step_by_step():
    ckpt = checkpoint()
    session = WeightLoadSession(Toy(), MAPPING)
    rotary = "layers.0.self_attn.rotary_emb.inv_freq"
    assert session.load(rotary, ckpt[rotary]) is None
    assert session.skipped == {rotary}
    assert session.load("layers.0.self_attn.v_proj.bias", ckpt["layers.0.self_attn.v_proj.bias"]) == (
        "layers.0.self_attn.qkv_proj.bias")
    assert "layers.0.self_attn.qkv_proj.bias" in session.incomplete()
    for s in "qk":
        session.load(f"layers.0.self_attn.{s}_proj.bias", ckpt[f"layers.0.self_attn.{s}_proj.bias"])
    assert "layers.0.self_attn.qkv_proj.bias" not in session.incomplete()
    with pytest.raises(MissingWeightsError):
        session.check_complete()


class RecordingMethod(UnquantizedLinearMethod):
    def __init__(self, seen, arrived):
        self.seen, self.arrived = seen, arrived

    def process_weights_after_loading(self, layer):
        assert not layer.weight.isnan().any()
        self.seen.append((layer, len(self.arrived)))


class RecordingConfig:
    def __init__(self):
        self.seen, self.arrived = [], []

    def get_linear_method(self, prefix):
        return RecordingMethod(self.seen, self.arrived)


@pytest.mark.parametrize("hold_layers", [False, True])
def test_each_layer_is_processed_once_when_complete_or_after_everything(hold_layers):
    config = RecordingConfig()
    model = Toy(TPContext(0, 2), quant_config=config)
    ckpt = checkpoint()

    def source():
        for name, tensor in ckpt.items():
            config.arrived.append(name)
            yield name, tensor

    stream_weights(model, source(), MAPPING, device="cpu", hold_layers=hold_layers)
    layers = [id(layer) for layer, _ in config.seen]
    assert len(layers) == 4 * LAYERS + 1 and len(set(layers)) == len(layers)
    when = {count for _, count in config.seen}
    if hold_layers:  # the naive baseline: nothing is processed before the last tensor arrived
        assert when == {len(ckpt)}
    else:  # streaming: the first layers are processed while later tensors are still to come
        assert min(when) < len(ckpt)
