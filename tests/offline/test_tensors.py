"""Pre-quantized reloads: fp8 codes and scales from the trainer side (`quantize_weights`,
`WeightSender(quantization=...)`) or from an fp8 checkpoint directory are installed in place, bitwise
what receiver-side quantization of the same weights gives; a bad one fails closed."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import transformers
from hf_cases import CASES, make_checkpoint

from streamquant import load_model
from streamquant.checkpoint.reader import iterate_weights, load_hf_config
from streamquant.formats import get_format
from streamquant.loading.errors import NonFiniteWeightError
from streamquant.offline import QuantizePlan, quantize_checkpoint, quantize_weights
from streamquant.parallel.context import TPContext
from streamquant.loading.contract import inference_tensors
from streamquant.reload import Reloader, reload_weights
from streamquant.rl.sync import WeightReceiver, WeightSender


def bits(t):
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


def state(model):
    return {k: bits(v).clone() for k, v in inference_tensors(model).items()}


def assert_same(got, want):
    assert got.keys() == want.keys()
    bad = [k for k in got if not torch.equal(got[k], want[k])]
    assert not bad, bad[:5]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two checkpoints of one tiny MoE model: A (start) and B (after a "training step")."""
    root = tmp_path_factory.mktemp("pair")
    case = next(c for c in CASES if c.name == "qwen2moe")
    a = make_checkpoint(case, root)
    b = root / "b"
    b.mkdir()
    for file in a.iterdir():
        if file.suffix == ".safetensors":
            tensors = safetensors.torch.load_file(file)
            g = torch.Generator().manual_seed(1)
            safetensors.torch.save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in tensors.items()},
                                        b / file.name, metadata={"format": "pt"})
        else:
            (b / file.name).write_bytes(file.read_bytes())
    return a, b


@pytest.mark.parametrize("scheme,fmt,formula", [("fp8", "compressed-tensors", "streamquant"),
                                                ("fp8-block", "hf-fp8", "transformers")])
def test_trainer_side_quantized_reload_equals_receiver_side(pair, scheme, fmt, formula):
    a, b = pair
    plan = QuantizePlan(load_hf_config(a), scheme, get_format(fmt), torch.bfloat16, formula=formula)
    model = load_model(a, quantization=scheme, formula=formula)
    addresses = {k: t.data_ptr() for k, t in inference_tensors(model).items()}
    reload_weights(model, quantize_weights(iterate_weights(b), plan), quantized_source=True)
    assert {k: t.data_ptr() for k, t in inference_tensors(model).items()} == addresses
    assert_same(state(model), state(load_model(b, quantization=scheme, formula=formula)))
    assert model.weights_version == 1


def test_a_partial_pre_quantized_reload_takes_the_expected_tensors(pair):
    """`expected=` in hf-fp8 naming (`weight_scale_inv`, renamed on the way in): layer 1 becomes B's, the rest stays A's."""
    a, b = pair
    plan = QuantizePlan(load_hf_config(a), "fp8-block", get_format("hf-fp8"), torch.bfloat16, formula="transformers")
    layer1 = [(n, t) for n, t in quantize_weights(iterate_weights(b), plan) if n.startswith("model.layers.1.")]
    assert any(n.endswith("weight_scale_inv") for n, _ in layer1)
    model = load_model(a, quantization="fp8-block", formula="transformers")
    loaded = reload_weights(model, layer1, quantized_source=True, expected=[n for n, _ in layer1])
    assert len(loaded) == len(layer1)
    got = state(model)
    want_a, want_b = state(load_model(a, quantization="fp8-block", formula="transformers")), \
        state(load_model(b, quantization="fp8-block", formula="transformers"))
    mixed = {k: (want_b if k.startswith("model.layers.1.") else want_a)[k] for k in want_a}
    assert_same(got, mixed)
    assert any(not torch.equal(want_a[k], want_b[k]) for k in want_a if k.startswith("model.layers.1."))


def test_reload_from_an_fp8_checkpoint_directory_and_with_a_reloader(pair, tmp_path):
    a, b = pair
    quantize_checkpoint(b, tmp_path / "b8", "fp8-channel")
    model = load_model(a, quantization="fp8-channel")
    reload_weights(model, tmp_path / "b8")  # the directory says it is pre-quantized
    want = state(load_model(b, quantization="fp8-channel"))
    assert_same(state(model), want)
    reloader = Reloader(model, atomic=True)
    reloader(a)
    reloader(tmp_path / "b8")
    assert_same(state(model), want)


def test_a_bad_pre_quantized_reload_fails_closed(pair):
    a, b = pair
    plan = QuantizePlan(load_hf_config(a), "fp8", get_format("compressed-tensors"), torch.bfloat16)
    model = load_model(a, quantization="fp8")
    before = state(model)

    def poisoned():
        for name, tensor in quantize_weights(iterate_weights(b), plan):
            if name == "model.layers.1.self_attn.o_proj.weight":
                tensor = tensor.clone()
                tensor.view(torch.uint8)[0, 0] = 0x7F  # a NaN code
            yield name, tensor
    with pytest.raises(NonFiniteWeightError, match="o_proj.weight.*NaN fp8 codes"):
        reload_weights(model, poisoned(), quantized_source=True, atomic=True)
    assert_same(state(model), before)
    with pytest.raises(Exception, match="must be float8_e4m3fn"):  # bf16 where codes belong
        reload_weights(model, iterate_weights(b), quantized_source=True, atomic=True)
    assert_same(state(model), before)


def _sync(root_a, root_b, scheme, tp_size):
    rank = dist.get_rank()
    tp_group = dist.new_group(list(range(1, tp_size + 1)))
    if rank == 0:
        trainer = transformers.AutoModelForCausalLM.from_pretrained(root_b, dtype=torch.float32)
        plan = QuantizePlan(load_hf_config(root_a), scheme, get_format("compressed-tensors"), torch.bfloat16)
        quantized = WeightSender(src=0, bucket_bytes=8 << 10, quantization=plan).send(trainer.named_parameters())
        plain = WeightSender(src=0, bucket_bytes=8 << 10, dtype=torch.bfloat16).send(trainer.named_parameters())
        return quantized.bytes, plain.bytes
    tp = TPContext(rank=rank - 1, size=tp_size, group=tp_group)
    got = load_model(root_a, quantization=scheme, tp=tp)
    WeightReceiver(src=0).reload(got, atomic=True)
    receiver_side = load_model(root_a, quantization=scheme, tp=tp)
    WeightReceiver(src=0).reload(receiver_side)
    want = load_model(root_b, quantization=scheme, tp=tp)
    assert_same(state(got), state(want))
    assert_same(state(receiver_side), state(want))
    return None


def test_a_sender_refuses_dtype_with_quantization(pair):
    """The plan sets the dtypes; dtype= would cast the float32 scales to bf16 as well."""
    plan = QuantizePlan(load_hf_config(pair[0]), "fp8", get_format("compressed-tensors"), torch.bfloat16)
    with pytest.raises(ValueError, match="dtype=torch.bfloat16 with quantization=: .* would cast the scales"):
        WeightSender(src=0, dtype=torch.bfloat16, quantization=plan)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_weight_sender_quantization_is_bitwise_receiver_side(ranks, pair, tp_size):
    """transformers 5 hands the trainer fused MoE experts; they travel per expert, quantized."""
    a, b = pair
    quantized_bytes, plain_bytes = ranks.run(_sync, tp_size + 1, a, b, "fp8-block", tp_size)
    assert quantized_bytes < 0.7 * plain_bytes
