"""DeepSeek-V3 / V2 (`models/deepseek_v3.py`) beyond the shared case: `hf_cases.py`'s "deepseek-v3" (q low
rank, yarn with both mscales, a dense layer then MoE layers with 4 expert groups) already runs through the
transformers-equivalence (float32 and bitwise bf16, TP 1 and 2), quantization, round-trip and TP-shard suites.

Here: the other layouts (a plain q_proj with attention biases, default rope without interleaving, one
expert group, every layer MoE; DeepSeek-V2's softmax group-limited routing with MLP biases) against
transformers' forward, float32 within 1e-4; greedy tokens through the latent KV cache equal transformers'
`generate`, at TP 1 and 2, every layout. The native fp8 block checkpoint DeepSeek publishes, as
`streamquant quantize --format hf-fp8` writes it: loaded at TP 1 and 2 bitwise the online fp8-block load,
and a bf16 refit of it bitwise the offline quantization of the new weights. A refit with transformers'
in-memory names (fused expert stacks, `experts.gate_up_proj`) equals a cold load of the per-expert
checkpoint, in place. The multi-token-prediction layer of a published checkpoint is skipped.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from hf_cases import CASES, DEEPSEEK_V3, _case, make_checkpoint, randomize_, write_variant
from streamquant import load_model
from streamquant.cli.main import main
from streamquant.inference.generation import generate
from streamquant.loading.contract import inference_tensors
from streamquant.parallel.context import TPContext
from streamquant.reload import reload_weights

FP32_ATOL = 1e-4
NEW_TOKENS = 6
IDS = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2))
LAYOUTS = [
    next(c for c in CASES if c.name == "deepseek-v3"),
    _case("deepseek-v3-plain-q", "DeepseekV3Config", "DeepseekV3ForCausalLM", **{
        **DEEPSEEK_V3, "q_lora_rank": None, "attention_bias": True, "rope_interleave": False, "n_group": 1,
        "topk_group": 1, "norm_topk_prob": False, "first_k_dense_replace": 0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    _case("deepseek-v2", "DeepseekV2Config", "DeepseekV2ForCausalLM", num_key_value_heads=4, kv_lora_rank=32,
          q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=24, n_routed_experts=8,
          n_shared_experts=2, num_experts_per_tok=2, n_group=4, topk_group=2, topk_method="group_limited_greedy",
          first_k_dense_replace=1, moe_intermediate_size=32, routed_scaling_factor=1.5, mlp_bias=True,
          tie_word_embeddings=False, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                      "mscale": 0.707, "mscale_all_dim": 0.707,
                                                      "original_max_position_embeddings": 32}),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    return {c.name: make_checkpoint(c, root) for c in LAYOUTS}


@pytest.fixture(scope="module")
def reference(checkpoints):
    """transformers' float32 logits of IDS and its greedy tokens (eager experts, as hf_cases.hf_logits)."""
    out = {}
    for name, path in checkpoints.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
        hf.generation_config.eos_token_id = None  # ours never stops early either
        with torch.no_grad():
            tokens = hf.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=NEW_TOKENS, do_sample=False)
            out[name] = hf(IDS).logits, tokens
    return out


def _logits_and_tokens(paths: dict) -> dict:
    tp = TPContext.from_process_group()
    out = {}
    for name, path in paths.items():
        model = load_model(path, dtype=torch.float32, tp=tp)
        with torch.no_grad():
            out[name] = model(IDS), generate(model, IDS, max_new_tokens=NEW_TOKENS)
    return out


@pytest.mark.parametrize("tp_size", [1, 2])
def test_layouts_match_transformers_forward_and_generate(ranks, checkpoints, reference, tp_size):
    ours = ranks.run(_logits_and_tokens, tp_size, dict(checkpoints))
    for name, (logits, tokens) in ours.items():
        want_logits, want_tokens = reference[name]
        assert torch.isfinite(logits).all() and (logits - want_logits).abs().max() <= FP32_ATOL, name
        assert torch.equal(tokens, want_tokens), name


def _fp8_states(paths: dict) -> dict:
    """Every inference tensor of this rank for each (path, load options); fp8 as its bytes (gloo pickling)."""
    tp = TPContext.from_process_group()
    out = {}
    for key, (path, options) in paths.items():
        tensors = inference_tensors(load_model(path, tp=tp, **options))
        out[key] = {k: (v.view(torch.uint8) if v.dtype.itemsize == 1 else v).clone() for k, v in tensors.items()}
    return out


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    bad = [k for k in got if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, bad[:5]


@pytest.fixture(scope="module")
def fp8_checkpoint(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds-fp8") / "q"
    assert main(["quantize", str(checkpoints["deepseek-v3"]), str(out), "--quantization", "fp8-block", "--format",
                 "hf-fp8"]) == 0
    return out


def test_native_fp8_block_checkpoint_has_deepseeks_format(fp8_checkpoint):
    config = json.loads((fp8_checkpoint / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fp8" and config["weight_block_size"] == [128, 128]
    with safe_open(next(fp8_checkpoint.glob("*.safetensors")), "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    layer = "model.layers.1."
    for module in ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
                   "self_attn.o_proj", "mlp.experts.7.down_proj", "mlp.shared_experts.up_proj"):
        assert dtypes[f"{layer}{module}.weight"] == "F8_E4M3" and dtypes[f"{layer}{module}.weight_scale_inv"] == "F32"
    # the router stays as the model keeps it: float32, as are its scores' correction bias
    assert dtypes[f"{layer}mlp.gate.weight"] == dtypes[f"{layer}mlp.gate.e_score_correction_bias"] == "F32"
    assert dtypes["model.layers.0.mlp.gate_proj.weight"] == "F8_E4M3" and dtypes["lm_head.weight"] == "BF16"


def test_native_fp8_block_checkpoint_loads_as_the_online_load_at_tp1_and_tp2(ranks, checkpoints, fp8_checkpoint):
    paths = {"fp8": (fp8_checkpoint, {}), "online": (checkpoints["deepseek-v3"], {"quantization": "fp8-block"})}
    for tp_size in (1, 2):
        states = ranks.run(_fp8_states, tp_size, paths)
        _assert_same(states["fp8"], states["online"])


def test_bf16_refit_of_the_fp8_model_is_the_offline_quantization(checkpoints, fp8_checkpoint, tmp_path):
    new = write_variant(checkpoints["deepseek-v3"], tmp_path / "new")
    assert main(["quantize", str(new), str(tmp_path / "new-fp8"), "--quantization", "fp8-block", "--format",
                 "hf-fp8"]) == 0
    model = load_model(fp8_checkpoint)
    before = {k: t.data_ptr() for k, t in inference_tensors(model).items()}
    reload_weights(model, new)
    assert {k: t.data_ptr() for k, t in inference_tensors(model).items()} == before
    _assert_same(inference_tensors(model), inference_tensors(load_model(tmp_path / "new-fp8")))


def test_refit_with_fused_expert_stacks_equals_a_cold_load(checkpoints, tmp_path):
    """transformers' in-memory names (what a trainer's state yields): `experts.gate_up_proj` [E, 2I, H] and
    `experts.down_proj` [E, H, I] for every expert at once, the router's bias a buffer."""
    path = checkpoints["deepseek-v3"]
    trainer = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    randomize_(trainer, seed=5)
    state = trainer.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in state and "model.layers.1.mlp.experts.0.up_proj.weight" not in state
    trainer.save_pretrained(tmp_path / "saved")  # per-expert names on disk
    model = load_model(path, quantization="fp8-block")
    before = {k: t.data_ptr() for k, t in inference_tensors(model).items()}
    reload_weights(model, list(state.items()))
    assert {k: t.data_ptr() for k, t in inference_tensors(model).items()} == before
    _assert_same(inference_tensors(model), inference_tensors(load_model(tmp_path / "saved", quantization="fp8-block")))


def test_the_multi_token_prediction_layer_is_skipped(checkpoints, tmp_path):
    path = checkpoints["deepseek-v3"]
    mtp = {"model.layers.2.eh_proj.weight": torch.ones(64, 128), "model.layers.2.enorm.weight": torch.ones(64)}
    with_mtp = write_variant(path, tmp_path / "mtp", edit=lambda tensors: tensors.update(mtp))
    model = load_model(with_mtp, dtype=torch.float32)
    assert model.config.num_nextn_predict_layers == 1
    assert load_model(path, dtype=torch.float32).load_report.checkpoint_elements < model.load_report.checkpoint_elements
    assert not any(name.startswith("model.layers.2.") for name, _ in model.named_parameters())
