"""fp8 loading on CUDA (gpu-marked: skipped without CUDA; CI has none).

The CUDA load must give bitwise the CPU codes and scales (true-division fp32 kernels, the same
fp8 rounding), keep device memory near the fp8 model while streaming, and compute logits close to
the CPU model's (row-wise `_scaled_mm` on sm90+ with bf16, dequantize-then-matmul elsewhere).
"""

from __future__ import annotations

import pytest
import torch

from streamquant.api import load_model
from streamquant.loading.streaming import largest_layer_staging_bytes
from streamquant.memory import PeakMemorySampler

from hf_cases import CASES, make_checkpoint, write_variant

from ..fp8_model_helpers import SCHEMES, fp8_state, stored_dtype

pytestmark = pytest.mark.gpu

# The quantized parameters of every decoder layer of each checkpoint (streamquant's fused modules), named
# here rather than read from the model: a load that quantized nothing gives fp8_state {} and must fail.
QUANTIZED = {
    "llama": ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"),
    "qwen3moe": ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.experts.w13_weight",
                 "mlp.experts.w2_weight"),
}


def quantized_state(model, name: str, scheme: str) -> dict[str, torch.Tensor]:
    """`fp8_state(model)`, after asserting it holds exactly the codes and float32 scales of every quantized
    parameter of every decoder layer, the codes in the scheme's dtype (so a comparison of two of these
    can never be {} == {} or skip a layer)."""
    layers = model.config.num_hidden_layers
    assert layers > 0
    params = [f"model.layers.{i}.{p}" for i in range(layers) for p in QUANTIZED[name]]
    for param in params:
        module_name, pname = param.rsplit(".", 1)
        module = model.get_submodule(module_name)
        codes, scales = getattr(module, pname), getattr(module, f"{pname}_scale", None)
        assert codes.dtype == stored_dtype(scheme, torch.float8_e4m3fn), (param, codes.dtype)
        assert scales is not None and scales.dtype == torch.float32 and scales.numel() > 0, param
    state = fp8_state(model)
    assert state.keys() == {key for p in params for key in (p, f"{p}_scale")}
    return state


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_fp8_cuda")
    return {c.name: make_checkpoint(c, root) for c in CASES if c.name in ("llama", "qwen3moe")}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", ["llama", "qwen3moe"])
def test_cuda_codes_equal_cpu_codes(checkpoints, name, scheme):
    cpu = quantized_state(load_model(checkpoints[name], quantization=scheme, dtype=torch.bfloat16), name, scheme)
    cuda = quantized_state(load_model(checkpoints[name], quantization=scheme, dtype=torch.bfloat16, device="cuda"),
                           name, scheme)
    assert cpu.keys() == cuda.keys()
    for key in cpu:
        assert torch.equal(cpu[key], cuda[key].cpu()), key


@pytest.mark.parametrize("scheme", SCHEMES)
def test_cuda_logits_close_to_cpu(checkpoints, scheme):
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    cpu = load_model(checkpoints["llama"], quantization=scheme, dtype=torch.bfloat16)
    cuda = load_model(checkpoints["llama"], quantization=scheme, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        a, b = cpu(ids), cuda(ids.cuda()).cpu()
    assert torch.isfinite(b).all()
    assert ((a - b).norm() / a.norm()).item() < 0.05


def test_cuda_streaming_peak_is_near_the_fp8_model(checkpoints):
    path = checkpoints["llama"]
    with PeakMemorySampler("cuda") as sampler:
        model = load_model(path, quantization="fp8", device="cuda")
    final = model.load_report.model_bytes
    layer = largest_layer_staging_bytes(model)
    assert sampler.result.method == "cuda_max_memory_allocated"
    assert sampler.result.peak_bytes <= final + 2 * layer + (1 << 20)


def test_cuda_reload_spills_deferred_tensors_to_host(checkpoints, last_session, tmp_path):
    """Out of order with a one-layer budget, from CUDA tensors: deferred ones go to pinned host memory,
    device memory stays near the model, and the result is bitwise a cold load of the reloaded weights.
    The model starts from a variant checkpoint, so a reload that wrote nothing cannot pass."""
    import random

    from streamquant.checkpoint.reader import iterate_weights
    from streamquant.reload import reload_weights

    path = checkpoints["qwen3moe"]
    want = quantized_state(load_model(path, quantization="fp8", device="cuda"), "qwen3moe", "fp8")
    model = load_model(write_variant(path, tmp_path / "variant"), quantization="fp8", device="cuda")
    before = quantized_state(model, "qwen3moe", "fp8")
    assert any(not torch.equal(before[key], want[key]) for key in want)  # the control: the reload has work to do
    items = [(n, t.cuda()) for n, t in iterate_weights(path)]
    random.Random(0).shuffle(items)
    largest = largest_layer_staging_bytes(model)
    reload_weights(model, items, staging_budget=largest)
    session = last_session["session"]
    assert session.spilled_bytes > 0 and session.peak_staged_bytes <= 2 * largest
    got = quantized_state(model, "qwen3moe", "fp8")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("quantize_on", ["device", "cpu"])
def test_cuda_offload_before_quant_is_bitwise_and_keeps_bf16_off_the_device(checkpoints, quantize_on):
    """Offload: bitwise the plain CUDA load; device peak <= final model + one layer's bf16 staging
    ("device": the layer being quantized) or + 1 MiB ("cpu": the device never holds a bf16 weight)."""
    path = checkpoints["qwen3moe"]
    want = quantized_state(load_model(path, quantization="fp8", device="cuda"), "qwen3moe", "fp8")
    torch.cuda.empty_cache()
    with PeakMemorySampler("cuda") as sampler:
        model = load_model(path, quantization="fp8", device="cuda", offload_before_quant=True, quantize_on=quantize_on)
    got = quantized_state(model, "qwen3moe", "fp8")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    layer = largest_layer_staging_bytes(model)
    allowance = layer if quantize_on == "device" else 0
    assert sampler.result.peak_bytes <= model.load_report.model_bytes + allowance + (1 << 20)
