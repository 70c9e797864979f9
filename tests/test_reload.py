"""reload_weights: in place, equal to a cold load, any order, fails closed.

A (the checkpoint) and B (every tensor moved as by an optimizer step) share a config. For every
scheme, dense and MoE: load A, reload B from disk => every parameter and buffer bitwise equal to a
cold load of B, same logits, every tensor at the same address; reload A from an iterable in
shuffled order => bitwise the cold load of A again.
"""

from __future__ import annotations

import gc
import random
import weakref

import pytest
import torch

from streamquant.api import load_model
from streamquant.checkpoint.reader import iterate_weights
from streamquant.loading.errors import MissingWeightsError, NonFiniteWeightError, UnexpectedWeightError
from streamquant.models.base import ModelNotReadyError
from streamquant.loading.streaming import largest_layer_staging_bytes
from streamquant.parallel.context import TPContext
from streamquant.loading.validate import is_finite as _finite
from streamquant.loading.contract import inference_tensors
from streamquant.reload import reload_weights

from hf_cases import CASES, make_checkpoint, write_variant

SCHEMES = (None, "fp8", "fp8-channel", "fp8-block", "int8", "mxfp8", "int4")
IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reload")
    out = {}
    for case in CASES:
        if case.name in ("llama-tied-mqa-llama3rope", "qwen2moe"):
            a = make_checkpoint(case, root)
            out[case.name] = (a, write_variant(a, root / f"{case.name}-B"))
    return out


def state(model):
    return {n: t.detach().clone() for n, t in [*model.state_dict().items()]}


def addresses(model):
    return {n: t.data_ptr() for n, t in model.state_dict().items()}


def bitwise_differences(got, want) -> list[str]:
    """What keeps two states from being bitwise equal: names in only one of them, then names whose tensors
    differ in dtype, shape or bits; ["empty"] when there is nothing to compare. Names are matched, never zipped."""
    if not want:
        return ["empty"]
    out = [f"only in one: {name}" for name in sorted(got.keys() ^ want.keys())]
    for name in want.keys() & got.keys():
        a, b = got[name], want[name]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
            out.append(name)
    return out


def assert_bitwise_equal(got, want):
    assert bitwise_differences(got, want) == []


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", ["llama-tied-mqa-llama3rope", "qwen2moe"])
def test_reload_equals_cold_load_in_place(pairs, name, scheme):
    a, b = pairs[name]
    cold_a, cold_b = load_model(a, quantization=scheme), load_model(b, quantization=scheme)
    model = load_model(a, quantization=scheme)
    before = addresses(model)
    loaded = reload_weights(model, b)
    assert loaded == {n for n, _ in iterate_weights(b)} - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    assert model.weights_version == 1
    assert_bitwise_equal(state(model), state(cold_b))
    assert addresses(model) == before
    assert torch.equal(model(IDS), cold_b(IDS))
    items = list(iterate_weights(a))
    random.Random(0).shuffle(items)
    reload_weights(model, items)
    assert model.weights_version == 2
    assert_bitwise_equal(state(model), state(cold_a))
    assert addresses(model) == before
    assert torch.equal(model(IDS), cold_a(IDS))


def _tp_reload(a, b, scheme):
    tp = TPContext.from_process_group()
    model = load_model(a, quantization=scheme, dtype=torch.float32, tp=tp)
    before = addresses(model)
    reload_weights(model, b)
    cold = load_model(b, quantization=scheme, dtype=torch.float32, tp=tp)
    return bitwise_differences(state(model), state(cold)), addresses(model) == before, torch.equal(model(IDS), cold(IDS))


TP2_SCHEMES = (None, "fp8-block", "int8", "int4")  # fp8 / mxfp8: the same tile machinery


def _tp_reload_all(a, b):
    return {scheme: _tp_reload(a, b, scheme) for scheme in TP2_SCHEMES}


@pytest.fixture(scope="module")
def tp2_reloads(ranks, pairs):
    return ranks.run(_tp_reload_all, 2, *pairs["qwen2moe"])  # one job for every scheme


@pytest.mark.parametrize("scheme", TP2_SCHEMES)
def test_reload_equals_cold_load_at_tp2(tp2_reloads, scheme):
    assert tp2_reloads[scheme] == ([], True, True)


def missing(tensors):
    del tensors["model.layers.1.mlp.down_proj.weight"]


def poisoned(tensors):
    tensors["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("nan")


@pytest.mark.parametrize(("edit", "error"), [(missing, MissingWeightsError), (poisoned, NonFiniteWeightError)])
@pytest.mark.parametrize("scheme", [None, "fp8-block"])
def test_failed_reload_fails_closed(pairs, tmp_path, scheme, edit, error):
    a, b = pairs["llama-tied-mqa-llama3rope"]
    bad = write_variant(a, tmp_path / "bad", edit, seed=2)
    cold_a, cold_b = load_model(a, quantization=scheme), load_model(b, quantization=scheme)

    atomic = load_model(a, quantization=scheme)
    with pytest.raises(error):
        reload_weights(atomic, bad, atomic=True)
    assert_bitwise_equal(state(atomic), state(cold_a))  # exactly as before
    assert atomic.weights_version == 0 and torch.equal(atomic(IDS), cold_a(IDS))

    model = load_model(a, quantization=scheme)
    with pytest.raises(error):
        reload_weights(model, bad)
    with pytest.raises(ModelNotReadyError, match="update failed"):
        model(IDS)
    reload_weights(model, b)  # a complete reload makes it usable again, equal to a cold load
    assert_bitwise_equal(state(model), state(cold_b))
    assert torch.equal(model(IDS), cold_b(IDS))


def test_source_raising_midway_and_unknown_names_fail_closed(pairs):
    a, b = pairs["qwen2moe"]
    model = load_model(a, quantization="fp8")

    def broken():
        for i, item in enumerate(iterate_weights(b)):
            if i == 20:
                raise ConnectionError("trainer went away")
            yield item

    with pytest.raises(ConnectionError):
        reload_weights(model, broken())
    with pytest.raises(ModelNotReadyError, match="trainer went away"):
        model(IDS)
    with pytest.raises(UnexpectedWeightError, match="no.such"):
        reload_weights(model, [("model.no.such.weight", torch.zeros(2))])
    reload_weights(model, b)
    assert torch.equal(model(IDS), load_model(b, quantization="fp8")(IDS))
    staged = [p for m in model.modules() for p in (getattr(m, "checkpoint_params", None) or {}).values()]
    assert staged and all(p.is_meta for p in staged)  # no staging left behind


def test_a_failed_pull_reads_an_iterable_source_to_its_end_and_not_a_directory(pairs, monkeypatch):
    """A source fed by collectives (a WeightReceiver's broadcasts) needs every rank to read it to its end
    before the ranks agree, also the rank that refused a tensor."""
    a, b = pairs["llama-tied-mqa-llama3rope"]
    model = load_model(a, quantization="fp8")
    items = list(iterate_weights(b))
    read = []

    def source():
        for name, tensor in items:
            read.append(name)
            yield name, (torch.full_like(tensor, float("nan")) if len(read) == 1 else tensor)

    with pytest.raises(NonFiniteWeightError):
        reload_weights(model, source(), atomic=True)
    assert read == [name for name, _ in items]  # refused at the first tensor, read to the last
    read.clear()
    monkeypatch.setattr("streamquant.reload.reload_source", lambda model, path, quantized: (source(), False))
    with pytest.raises(NonFiniteWeightError):
        reload_weights(model, b, atomic=True)  # a directory: nothing feeds it but this rank
    assert read == [items[0][0]]


def test_partial_update_with_strict_false_changes_only_complete_layers(pairs):
    a, b = pairs["llama-tied-mqa-llama3rope"]
    model = load_model(a, quantization="fp8")
    cold_a, cold_b = state(load_model(a, quantization="fp8")), state(load_model(b, quantization="fp8"))
    # down_proj complete (weight and bias), qkv_proj not (q only)
    names = {"model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.bias",
             "model.layers.1.self_attn.q_proj.weight"}
    reload_weights(model, [(n, t) for n, t in iterate_weights(b) if n in names], strict=False)
    got = state(model)
    assert torch.equal(got["model.layers.0.mlp.down_proj.weight"].view(torch.uint8),
                       cold_b["model.layers.0.mlp.down_proj.weight"].view(torch.uint8))
    # q alone does not complete qkv_proj: it keeps A's codes
    assert torch.equal(got["model.layers.1.self_attn.qkv_proj.weight"].view(torch.uint8),
                       cold_a["model.layers.1.self_attn.qkv_proj.weight"].view(torch.uint8))
    assert model.weights_version == 1


def test_reloaded_model_is_garbage_collected(pairs):
    a, b = pairs["qwen2moe"]
    model = load_model(a, quantization="fp8-channel")
    reload_weights(model, b)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("scheme", [None, "fp8-block"])
def test_processed_format_copies_in_place(pairs, scheme):
    """checkpoint_format=False: the model's own (processed) tensors, copied directly."""
    a, b = pairs["qwen2moe"]
    model = load_model(a, quantization=scheme)
    cold_b = load_model(b, quantization=scheme)
    before = addresses(model)
    processed = [(n, t.clone()) for n, t in inference_tensors(cold_b).items()]
    random.Random(1).shuffle(processed)
    reload_weights(model, processed, checkpoint_format=False)
    assert_bitwise_equal(state(model), state(cold_b))
    assert addresses(model) == before and torch.equal(model(IDS), cold_b(IDS))
    name, tensor = processed[0]
    with pytest.raises(Exception, match="expected"):
        reload_weights(model, [(name, tensor.double())], checkpoint_format=False, atomic=True)
    with pytest.raises(MissingWeightsError, match="never arrived"):
        reload_weights(model, processed[1:], checkpoint_format=False)
    with pytest.raises(ModelNotReadyError):
        model(IDS)


@pytest.mark.parametrize("order", ["shuffled", "by-type"])
def test_staging_budget_bounds_out_of_order_staging(pairs, order, last_session):
    """Out of order with a budget of one layer's staging: same bits, staging never above budget + one layer."""
    a, b = pairs["qwen2moe"]
    items = list(iterate_weights(b))
    if order == "shuffled":
        random.Random(3).shuffle(items)
    else:
        items.sort(key=lambda kv: (kv[0].split(".")[-2:], kv[0]))
    cold_b = state(load_model(b, quantization="fp8"))
    model = load_model(a, quantization="fp8")
    largest = largest_layer_staging_bytes(model)
    reload_weights(model, items, staging_budget=largest)
    bounded = last_session["session"].peak_staged_bytes
    assert_bitwise_equal(state(model), cold_b)
    reload_weights(model, items)
    unbounded = last_session["session"].peak_staged_bytes
    assert_bitwise_equal(state(model), cold_b)
    assert bounded <= 2 * largest < unbounded


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finiteness_check_catches_every_non_finite_value(dtype, bad):
    t = torch.randn(64, 33).to(dtype)
    assert _finite(t) and _finite(torch.empty(0, dtype=dtype)) and _finite(torch.arange(5))
    t[17, 5] = bad
    stored = t[17, 5].float()  # e4m3fn has no Inf: torch stores +-448 for +-inf
    assert _finite(t) == bool(torch.isfinite(stored))
    assert not _finite(t) or dtype == torch.float8_e4m3fn


def _reusing_one_buffer(items):
    """A source that, like a broadcast bucket, overwrites the tensor it yielded once the next is requested."""
    buf = torch.empty(max(t.numel() * t.element_size() for _, t in items), dtype=torch.uint8)
    for name, tensor in items:
        view = buf[:tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        yield name, view


def test_transient_source_copies_what_the_budget_defers(pairs):
    """Shuffled, one-layer budget, from a source that reuses its storage: `transient_source=True` copies
    deferred tensors (bitwise cold B); without it the deferred references would be overwritten."""
    a, b = pairs["qwen2moe"]
    items = list(iterate_weights(b))
    random.Random(5).shuffle(items)
    cold_b = state(load_model(b, quantization="fp8"))
    model = load_model(a, quantization="fp8")
    largest = largest_layer_staging_bytes(model)
    reload_weights(model, _reusing_one_buffer(items), staging_budget=largest, transient_source=True)
    assert_bitwise_equal(state(model), cold_b)
    try:  # the control: the same stream without the flag must not come out right
        reload_weights(model, _reusing_one_buffer(items), staging_budget=largest)
        wrong = state(model)
        assert any(not torch.equal(wrong[n].view(torch.uint8), cold_b[n].view(torch.uint8)) for n in cold_b)
    except NonFiniteWeightError:
        pass


def test_reloader_keeps_its_buffers_and_stays_exact(pairs):
    """A loop of atomic reloads through one Reloader: the snapshot buffer and one staging buffer are
    allocated once; each reload is bitwise the cold load; a failing one restores exactly and the next works."""
    from streamquant.reload import Reloader

    a, b = pairs["qwen2moe"]
    cold_a, cold_b = state(load_model(a, quantization="fp8")), state(load_model(b, quantization="fp8"))
    model = load_model(a, quantization="fp8")
    before = addresses(model)
    reloader = Reloader(model, atomic=True)
    snapshot_ptr = reloader.snapshot.buffer.data_ptr()
    items_a, items_b = list(iterate_weights(a)), list(iterate_weights(b))
    reloader(items_b)
    assert_bitwise_equal(state(model), cold_b)
    idle = reloader.pool.idle_bytes
    assert idle > 0 and reloader.held_bytes == reloader.snapshot.buffer.numel() + idle
    reloader(items_a)
    assert_bitwise_equal(state(model), cold_a)
    with pytest.raises(NonFiniteWeightError):
        reloader(items_b[:-3] + [(items_b[-3][0], torch.full_like(items_b[-3][1], float("nan")))] + items_b[-2:])
    assert_bitwise_equal(state(model), cold_a)  # restored from the kept snapshot
    reloader(items_b)
    assert_bitwise_equal(state(model), cold_b)
    assert reloader.snapshot.buffer.data_ptr() == snapshot_ptr and addresses(model) == before
    assert model.weights_version == 3
    reloader.close()
    assert reloader.held_bytes == 0


@pytest.mark.parametrize("atomic", [True, False])
def test_an_interrupted_reload_fails_closed(pairs, atomic):
    """Ctrl-C (a BaseException, not an Exception) in the middle of a reload still restores or marks."""
    a, b = pairs["llama-tied-mqa-llama3rope"]
    model = load_model(a, quantization="fp8")
    before = state(model)

    def interrupted():
        for i, item in enumerate(iterate_weights(b)):
            if i == 5:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        reload_weights(model, interrupted(), atomic=atomic)
    if atomic:
        assert_bitwise_equal(state(model), before)
        assert model.not_ready_reason is None
    else:
        assert model.not_ready_reason is not None
