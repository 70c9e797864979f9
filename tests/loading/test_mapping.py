"""WeightMapping: whole-segment rules, {expert} capture, first match, skips, prefix renames."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamquant.loading.mapping import MappingRule, WeightMapping

from streamquant.models.base import stacked_rules

from .helpers import SETTINGS

QKV = WeightMapping(
    rules=(
        *stacked_rules(),
        MappingRule.make("experts.{expert}.down_proj", "experts.w2", shard_id="w2"),
    ),
    skip=("rotary_emb.inv_freq",),
)
ATTN = "model.layers.3.self_attn"


def test_rule_rewrites_whole_segments_and_passes_loader_kwargs():
    assert QKV.map(f"{ATTN}.q_proj.weight") == (f"{ATTN}.qkv_proj.weight", {"shard_id": "q"})
    assert QKV.map("model.layers.0.mlp.up_proj.bias") == ("model.layers.0.mlp.gate_up_proj.bias", {"shard_id": 1})


@pytest.mark.parametrize("name", [f"{ATTN}.qq_proj.weight", f"{ATTN}.q_proj_extra.weight", f"{ATTN}.xq_proj.weight",
                                  "model.layers.0.mlp.gate_proj2.weight", "model.q.proj.weight", "q_proj_weight"])
def test_rule_never_fires_on_a_substring(name):
    assert QKV.map(name) == (name, {})


def test_expert_segment_captures_an_int():
    name, kwargs = QKV.map("model.layers.1.mlp.experts.17.down_proj.weight")
    assert name == "model.layers.1.mlp.experts.w2.weight"
    assert kwargs == {"shard_id": "w2", "expert_id": 17} and type(kwargs["expert_id"]) is int
    assert QKV.map("model.layers.1.mlp.experts.x7.down_proj.weight")[1] == {}
    assert QKV.map("model.layers.1.mlp.experts.down_proj.weight")[1] == {}


def test_first_matching_rule_wins():
    general = MappingRule.make("proj", "fused", shard_id=0)
    specific = MappingRule.make("attn.proj", "attn.qkv", shard_id="q")
    assert WeightMapping(rules=(specific, general)).map("l.attn.proj.w") == ("l.attn.qkv.w", {"shard_id": "q"})
    assert WeightMapping(rules=(general, specific)).map("l.attn.proj.w") == ("l.attn.fused.w", {"shard_id": 0})


def test_skip_patterns_match_whole_segments():
    assert QKV.should_skip(f"{ATTN}.rotary_emb.inv_freq")
    assert not QKV.should_skip(f"{ATTN}.rotary_emb_x.inv_freq")
    assert not QKV.should_skip(f"{ATTN}.rotary_emb.inv_freq_cached")
    assert not QKV.should_skip(f"{ATTN}.q_proj.weight")


def test_prefix_renames_apply_once_then_rules():
    mapping = WeightMapping(rules=QKV.rules, prefix_renames=(("model", "language_model.model"),))
    assert mapping.map("model.layers.0.self_attn.k_proj.weight") == (
        "language_model.model.layers.0.self_attn.qkv_proj.weight", {"shard_id": "k"})
    assert mapping.map("language_model.model.norm.weight") == ("language_model.model.norm.weight", {})
    assert mapping.map("modelx.norm.weight") == ("modelx.norm.weight", {})
    nested = WeightMapping(prefix_renames=(("model", "model.text"),))
    assert nested.map("model.norm.weight") == ("model.text.norm.weight", {})
    assert nested.map("model.text.norm.weight") == ("model.text.norm.weight", {})


def test_checkpoint_names_for():
    assert QKV.checkpoint_names_for(f"{ATTN}.qkv_proj.weight") == [f"{ATTN}.{s}_proj.weight" for s in "qkv"]
    assert QKV.checkpoint_names_for("mlp.gate_up_proj.bias") == ["mlp.gate_proj.bias", "mlp.up_proj.bias"]
    assert QKV.checkpoint_names_for("mlp.experts.w2.weight", num_experts=3) == [
        f"mlp.experts.{e}.down_proj.weight" for e in range(3)]
    assert QKV.checkpoint_names_for("model.norm.weight") == ["model.norm.weight"]


def test_checkpoint_names_for_undoes_prefix_renames():
    mapping = WeightMapping(rules=QKV.rules, prefix_renames=(("model", "language_model.model"),))
    assert mapping.checkpoint_names_for("language_model.model.norm.weight") == ["model.norm.weight"]


SEGMENTS = st.sampled_from(["a", "b", "ab", "q_proj", "q", "proj", "0", "12"])


@SETTINGS
@given(name=st.lists(SEGMENTS, min_size=1, max_size=6), pattern=st.lists(SEGMENTS, min_size=1, max_size=2),
       target=st.lists(SEGMENTS, min_size=1, max_size=2))
def test_rule_matches_like_a_dot_delimited_search(name, pattern, target):
    """Reference: find '.pattern.' in '.name.' and splice in the target at the first hit."""
    name, pattern, target = ".".join(name), ".".join(pattern), ".".join(target)
    padded = f".{name}."
    at = padded.find(f".{pattern}.")
    expected = name if at < 0 else (padded[:at] + f".{target}." + padded[at + len(pattern) + 2:])[1:-1]
    rule = MappingRule.make(pattern, target, shard_id=1)
    mapping = WeightMapping(rules=(rule,), skip=(pattern,))
    assert mapping.map(name) == (expected, {"shard_id": 1} if at >= 0 else {})
    assert mapping.should_skip(name) == (at >= 0)


def test_a_name_resolves_once_and_answers_the_same_after(monkeypatch):
    resolved = []
    resolve = WeightMapping._resolve
    monkeypatch.setattr(WeightMapping, "_resolve", lambda self, name: resolved.append(name) or resolve(self, name))
    mapping = WeightMapping(rules=QKV.rules, skip=QKV.skip)
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    first = mapping.map(name)
    first[1]["expert_id"] = 99  # the caller's dict is its own: the remembered answer does not change
    assert mapping.map(name) == ("model.layers.2.mlp.experts.w2.weight", {"shard_id": "w2", "expert_id": 5})
    assert mapping.should_skip(f"{ATTN}.rotary_emb.inv_freq") and mapping.should_skip(f"{ATTN}.rotary_emb.inv_freq")
    assert not mapping.should_skip(name)
    assert resolved == [name, f"{ATTN}.rotary_emb.inv_freq"]  # each name matched against the rules once
    fresh = WeightMapping(rules=QKV.rules, skip=QKV.skip)
    assert fresh == mapping and hash(fresh) == hash(mapping)  # what was resolved is not part of its value
