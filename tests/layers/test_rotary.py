"""RotaryEmbedding against transformers' own rotary modules and apply_rotary_pos_emb."""

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply_rotary_pos_emb

from streamquant.layers.rotary import DynamicNTKRotaryEmbedding, RotaryEmbedding, get_rope

HEAD = 16
MAX_POS = 64
ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 16,
                 "short_factor": [1.0 + 0.1 * i for i in range(HEAD // 2)],
                 "long_factor": [2.0 + 0.5 * i for i in range(HEAD // 2)]},
}


def llama_config(scaling, rope_theta=10000.0) -> LlamaConfig:
    return LlamaConfig(hidden_size=4 * HEAD, num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD,
                       max_position_embeddings=MAX_POS, rope_theta=rope_theta, rope_scaling=scaling)


def hf_rotate(hf_rope, positions, q, k, apply=apply_rotary_pos_emb):
    cos, sin = hf_rope(q, positions)
    return apply(q, k, cos, sin, unsqueeze_dim=2)  # our layout is [B, T, heads, D]


def qk(dtype, batch=2, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, tokens, 4, HEAD, generator=g).to(dtype)
    k = torch.randn(batch, tokens, 2, HEAD, generator=g).to(dtype)
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(ROPE_SCALINGS))
@pytest.mark.parametrize("max_position", [12, 40, 150])  # below / across / past every original length
def test_matches_transformers(name, dtype, max_position):
    config = llama_config(ROPE_SCALINGS[name], rope_theta=500000.0 if name == "llama3" else 10000.0)
    ours = get_rope(HEAD, config, dtype=dtype)
    q, k = qk(dtype)
    positions = torch.randint(0, max_position, (2, 5), generator=torch.Generator().manual_seed(1))
    positions[0, -1] = max_position - 1
    ref_q, ref_k = hf_rotate(LlamaRotaryEmbedding(config), positions, q, k)  # fresh: HF dynamic is stateful
    got_q, got_k = ours(positions, q, k)
    assert got_q.dtype == dtype and got_k.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got_q, ref_q, atol=1e-6, rtol=0)
        torch.testing.assert_close(got_k, ref_k, atol=1e-6, rtol=0)
    else:
        assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)


def test_dynamic_ntk_follows_transformers_through_prefill_and_decode():
    config = llama_config(ROPE_SCALINGS["dynamic"])
    ours, theirs = get_rope(HEAD, config, dtype=torch.float32), LlamaRotaryEmbedding(config)
    assert isinstance(ours, DynamicNTKRotaryEmbedding)
    q, k = qk(torch.float32, batch=1, tokens=MAX_POS - 2)
    steps = [(torch.arange(MAX_POS - 2)[None], q, k)]
    for pos in range(MAX_POS - 2, MAX_POS + 4):  # decode across the original length
        q1, k1 = qk(torch.float32, batch=1, tokens=1, seed=pos)
        steps.append((torch.tensor([[pos]]), q1, k1))
    for positions, q, k in steps:
        ref_q, ref_k = hf_rotate(theirs, positions, q, k)
        got_q, got_k = ours(positions, q, k)
        torch.testing.assert_close(got_q, ref_q, atol=1e-6, rtol=0)
        torch.testing.assert_close(got_k, ref_k, atol=1e-6, rtol=0)


def test_dynamic_ntk_changes_frequencies_only_past_the_original_length():
    ours = get_rope(HEAD, llama_config(ROPE_SCALINGS["dynamic"]), dtype=torch.float32)
    default = get_rope(HEAD, llama_config(None), dtype=torch.float32)
    inside, outside = torch.tensor([[MAX_POS - 1]]), torch.tensor([[2 * MAX_POS]])
    assert torch.equal(ours.frequencies(inside), default.inv_freq)
    assert (ours.frequencies(outside)[1:] < default.inv_freq[1:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "longrope", "original_max_position_embeddings": 16,
                                             "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [3.0, 4.0, 5.0, 9.0]}])
def test_partial_rotary_matches_phi3(dtype, scaling):
    config = Phi3Config(hidden_size=4 * HEAD, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=MAX_POS, partial_rotary_factor=0.5, rope_scaling=scaling)
    ours = get_rope(HEAD, config, dtype=dtype)
    assert ours.rotary_dim == HEAD // 2
    q, k = qk(dtype)
    positions = torch.arange(5).expand(2, 5) + torch.tensor([[0], [30]])  # past 16: long factors
    ref_q, ref_k = hf_rotate(Phi3RotaryEmbedding(config), positions, q, k, apply=phi3_apply_rotary_pos_emb)
    got_q, got_k = ours(positions, q, k)
    assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)
    assert torch.equal(got_q[..., HEAD // 2 :], q[..., HEAD // 2 :])  # pass-through half untouched


def test_rotation_is_relative():
    """q.k after rotation depends only on the distance between positions (independent property)."""
    rope = get_rope(HEAD, llama_config(None), dtype=torch.float64)
    q, k = qk(torch.float64, batch=1, tokens=1)
    def score(pq, pk):
        rq, _ = rope(torch.tensor([[pq]]), q, k[:, :, :1].expand(1, 1, 4, HEAD))
        _, rk = rope(torch.tensor([[pk]]), q, k)
        return (rq[0, 0, 0] * rk[0, 0, 0]).sum()
    # cos/sin are computed in fp32 whatever the input dtype, hence the fp32-level tolerance.
    torch.testing.assert_close(score(7, 3), score(104, 100), atol=1e-5, rtol=0)


def test_inv_freq_is_a_cpu_non_persistent_buffer_even_under_meta():
    config = llama_config(ROPE_SCALINGS["yarn"])
    with torch.device("meta"):
        rope = get_rope(HEAD, config, dtype=torch.bfloat16)
    assert rope.inv_freq.device.type == "cpu" and torch.isfinite(rope.inv_freq).all()
    assert "inv_freq" not in rope.state_dict()
    torch.testing.assert_close(rope.inv_freq, LlamaRotaryEmbedding(config).inv_freq, atol=0, rtol=0)


def test_rejects_unsupported_rope_and_mismatched_head_size():
    config = llama_config(None)
    config.rope_parameters = {"rope_type": "mrope_like", "rope_theta": 10000.0}
    with pytest.raises(NotImplementedError, match="mrope_like"):
        get_rope(HEAD, config, dtype=torch.float32)
    with pytest.raises(ValueError, match="head size"):
        get_rope(HEAD // 2, llama_config(ROPE_SCALINGS["linear"]), dtype=torch.float32)
    with pytest.raises(ValueError, match="exceeds head size"):
        RotaryEmbedding(4, torch.ones(4), 1.0, dtype=torch.float32)
    rope = get_rope(HEAD, llama_config(None), dtype=torch.float32)
    for bad in (torch.zeros(2, 4, dtype=torch.long), torch.zeros(5, dtype=torch.long)):
        with pytest.raises(ValueError, match="positions"):
            rope(bad, *qk(torch.float32))


def test_positions_shared_by_the_batch_broadcast():
    rope = get_rope(HEAD, llama_config(ROPE_SCALINGS["llama3"]), dtype=torch.bfloat16)
    q, k = qk(torch.bfloat16)
    shared = torch.arange(3, 8)[None]
    got_q, got_k = rope(shared, q, k)
    want_q, want_k = rope(shared.expand(2, 5), q, k)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interleaved_pairs_equal_deepseek_bitwise(dtype):
    """DeepSeek's `rope_interleave`: transformers' own interleaved rotation, bit for bit (yarn scaling)."""
    config = llama_config(ROPE_SCALINGS["yarn_mscale"])
    q, k = qk(dtype)
    positions = torch.arange(3, 8).expand(2, 5)
    ours = get_rope(HEAD, config, dtype=dtype, interleaved=True)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions)
    want = apply_rotary_pos_emb_interleave(q, k, cos, sin, unsqueeze_dim=2)
    got = ours(positions, q, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="interleaved rotary needs the whole head"):
        get_rope(HEAD, Phi3Config(hidden_size=4 * HEAD, num_attention_heads=4, partial_rotary_factor=0.5),
                 dtype=dtype, interleaved=True)
