"""Absurd or inconsistent config sizes are refused from the checkpoint's headers, naming the field,
before any model is built (a spy on the model class proves it) or memory is given."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import streamquant.api as api
from streamquant.api import load_model
from streamquant.checkpoint.reader import CheckpointError, checkpoint_shapes

from hf_cases import CASES, make_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_checkpoint(next(c for c in CASES if c.name == "llama"), tmp_path_factory.mktemp("good"))


def with_config(good, tmp_path, **changes):
    directory = tmp_path / "edited"
    shutil.copytree(good, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture
def builds(monkeypatch):
    """Model classes constructed (none, when a config is refused up front)."""
    built = []
    real = api.get_model_class
    monkeypatch.setattr(api, "get_model_class", lambda cfg: (lambda *a, **k: built.append(1) or real(cfg)(*a, **k)))
    return built


@pytest.mark.parametrize("field, value, message", [
    ("num_hidden_layers", 10**9, "num_hidden_layers = 1000000000 cannot fit"),
    ("vocab_size", 10**9, "vocab_size = 1000000000 cannot fit"),
    ("hidden_size", 4 * 10**9, "hidden_size = 4000000000 cannot fit"),
    ("intermediate_size", 10**9, "intermediate_size = 1000000000 cannot fit"),
    ("num_key_value_heads", 3, "not divisible by num_key_value_heads 3"),
    ("hidden_size", 30, "(hidden size|hidden_size) .*30.* (not a multiple|not divisible)"),  # transformers' own check
    ("num_attention_heads", 0, "malformed .*config.json: ZeroDivisionError"),  # transformers' parser divides
    ("intermediate_size", -64, "intermediate_size must be a positive integer, got -64"),
])
def test_absurd_sizes_are_refused_naming_the_field(good, tmp_path, builds, field, value, message):
    directory = with_config(good, tmp_path, **{field: value})
    with pytest.raises(CheckpointError, match=message):
        load_model(directory)
    assert builds == []


def test_plausible_sizes_that_together_exceed_the_checkpoint(good, tmp_path):
    directory = with_config(good, tmp_path, num_hidden_layers=20)  # 20 <= the tensor count: only the total tells
    with pytest.raises(CheckpointError, match=r"describes LlamaForCausalLM with [\d,]+ weight elements .*"
                                              r"num_hidden_layers=20"):
        load_model(directory)


def test_a_large_position_limit_costs_nothing_until_generation(good, tmp_path):
    model = load_model(with_config(good, tmp_path, max_position_embeddings=10**12))
    assert model.config.max_position_embeddings == 10**12


def test_shapes_come_from_headers(good):
    shapes = checkpoint_shapes(good)
    assert shapes["model.embed_tokens.weight"] == (97, 64) and len(shapes) == 2 * 9 + 3
