"""streamquant.rl.sync: trainer -> inference over torch.distributed (gloo, one process per rank).

The trainer is a transformers model (fp32, as a trainer holds it) after a real AdamW step; it
sends `named_parameters()` (transformers 5 names: fused `experts.gate_up_proj` for MoE) cast to
bf16 while packing, in small buckets so that many buckets, double buffering and a tensor larger
than a bucket are exercised. Every inference rank (fp8, TP=1 and TP=2) must then equal, bit for
bit, a cold fp8 load of the checkpoint the trainer saved after its step, at unchanged addresses.
"""

from __future__ import annotations

import time

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import transformers

from streamquant.api import load_model
from streamquant.parallel.launch import LaunchError, launch
from streamquant.parallel.context import TPContext
from streamquant.reload import reload_weights
from streamquant.rl.errors import PeerLostError, SyncError
from streamquant.rl.sync import WeightReceiver, WeightSender

from hf_cases import CASES, make_checkpoint

BUCKET = 8 << 10  # 8 KiB: tiny models still span many buckets (embeddings of 97x64 fp32 -> bf16 are 12 KiB: oversized)


def _optimizer_step(model: torch.nn.Module, seed: int) -> None:
    """One AdamW step on a language-modelling loss: every trained tensor moves, as in RL."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _bitwise_diffs(got: dict, want: dict) -> list[str]:
    bad = [n for n in want if n not in got or got[n].dtype != want[n].dtype
           or not torch.equal(got[n].view(torch.uint8), want[n].view(torch.uint8))]
    return bad + sorted(set(got) - set(want))


def _trainer_to_inference(root, case_names, scheme, tp_size):
    """Rank 0 trains and sends; ranks 1..tp_size hold the fp8 model (their own TP group).
    Returns, per case, the sender's stats and every inference rank's report."""
    rank = dist.get_rank()
    tp_group = dist.new_group(list(range(1, tp_size + 1)))  # every rank must call new_group
    results = {}
    for i, name in enumerate(case_names):
        case = next(c for c in CASES if c.name == name)
        a, b = root / name, root / f"{name}-B"
        if rank == 0:
            make_checkpoint(case, root)  # A: the weights both sides start from
            trainer = transformers.AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
            _optimizer_step(trainer, seed=i)
            trainer.save_pretrained(b)  # the reference: what a cold load after this step sees
        dist.barrier()
        report = None
        if rank == 0:
            stats = WeightSender(src=0, bucket_bytes=BUCKET, dtype=torch.bfloat16).send(trainer.named_parameters())
        else:
            tp = TPContext(rank=rank - 1, size=tp_size, group=tp_group)
            model = load_model(a, quantization=scheme, tp=tp)
            before = {n: t.data_ptr() for n, t in model.state_dict().items()}
            stale = {n: t.clone() for n, t in model.state_dict().items()}
            loaded = WeightReceiver(src=0).reload(model)
            cold = load_model(b, quantization=scheme, tp=tp).state_dict()
            got = model.state_dict()
            report = (_bitwise_diffs(got, cold), len(_bitwise_diffs(stale, cold)), {n for n, t in got.items() if t.data_ptr() != before[n]},
                      model.weights_version, len(loaded))
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(report, gathered, dst=0)
        if rank == 0:
            results[name] = (stats.buckets, stats.tensors, gathered[1:])
    return results


@pytest.mark.parametrize("tp_size", [1, 2])
def test_trainer_step_reaches_fp8_inference_bitwise(ranks, tmp_path, tp_size):
    names = ["llama-tied-mqa-llama3rope", "qwen2moe"]
    out = ranks.run(_trainer_to_inference, tp_size + 1, tmp_path, names, "fp8", tp_size)
    for name in names:
        buckets, tensors, reports = out[name]
        assert buckets > 3 and tensors > 10, name
        assert len(reports) == tp_size
        for diffs, stale_diffs, moved, version, loaded in reports:
            assert diffs == [], (name, diffs[:5])
            assert stale_diffs > 10  # the step moved the weights: equality above is not vacuous
            assert moved == set(), (name, moved)
            assert version == 1 and loaded == tensors


def _mixed_tensors(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(3 * BUCKET // 4, generator=g)  # 1.5 buckets of fp32 alone: its own buffer
    return [
        ("bf16", torch.randn(7, 5, generator=g).bfloat16()),
        ("fp32.transposed", torch.randn(6, 9, generator=g).t()),  # not contiguous
        ("int64", torch.randint(-2**40, 2**40, (11,), generator=g)),
        ("fp8", torch.randn(33, generator=g).to(torch.float8_e4m3fn)),
        ("bool", torch.rand(13, generator=g) > 0.5),
        ("scalar", torch.tensor(3.25)),
        ("empty", torch.empty(0, 4)),
        ("big", big),
        ("after.big", torch.randn(100, generator=g).half()),
    ]


def _clone_all(tensors):
    return [(n, t.clone()) for n, t in tensors]


def _protocol(seed):
    """Round trips, sender failure, receiver failure, early stop: after each the next send still works."""
    rank = dist.get_rank()
    events = []
    if rank == 0:
        sender = WeightSender(src=0, bucket_bytes=BUCKET)
        events.append(("roundtrip", sender.send(_mixed_tensors(seed)).buckets))
        events.append(("roundtrip", sender.send(_mixed_tensors(seed + 1)).buckets))
        bad = _mixed_tensors(seed) + [("bf16", torch.ones(1))]
        try:
            sender.send(bad)
        except ValueError as exc:
            events.append(("sender-error", str(exc)))
        try:
            sender.send(_mixed_tensors(seed))
        except SyncError as exc:
            events.append(("refused", str(exc)))
        events.append(("early-stop", sender.send(_mixed_tensors(seed)).tensors))
        events.append(("after", sender.send(_mixed_tensors(seed + 2)).tensors))
        received = [None, None]
        dist.gather_object(None, received, dst=0)
        return events, received[1]
    receiver = WeightReceiver(src=0)
    got = [receiver.receive(_clone_all)]
    ptrs = {s.data_ptr() for s in receiver.buffers.slots if s is not None}
    got.append(receiver.receive(_clone_all))
    reused = {s.data_ptr() for s in receiver.buffers.slots if s is not None} == ptrs
    try:
        receiver.receive(_clone_all)
    except SyncError as exc:
        events.append(("sender-error", str(exc)))

    def refuse(tensors):
        next(tensors)
        raise RuntimeError("inference side says no")
    try:
        receiver.receive(refuse)
    except RuntimeError as exc:
        events.append(("refused", str(exc)))
    events.append(("early-stop", receiver.receive(lambda tensors: [next(tensors)[0]])))
    got.append(receiver.receive(_clone_all))
    checks = [_compare(received, _mixed_tensors(s)) for received, s in zip(got, (seed, seed + 1, seed + 2))]
    dist.gather_object((checks, reused, events), None, dst=0)
    return None


def _compare(received, want) -> list[str]:
    """Names (in order) of the received tensors, '!' marking any that differs from `want` in dtype, shape or bits."""
    out = []
    for (name, r), (wname, w) in zip(received, want, strict=True):
        same = (name == wname and r.dtype == w.dtype and r.shape == w.shape
                and torch.equal(r.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)))
        out.append(name if same else f"!{name}")
    return out


def test_protocol_round_trips_and_failures_keep_sender_and_receiver_in_step(ranks):
    seed = 5
    sent_events, (checks, reused, recv_events) = ranks.run(_protocol, 2, seed)
    assert checks == [[n for n, _ in _mixed_tensors(0)]] * 3
    assert reused  # the buckets are allocated once, not per send
    kinds = dict(sent_events)
    assert kinds["roundtrip"] > 2  # many buckets
    assert "'bf16' appears twice" in kinds["sender-error"]
    assert "rank 1: RuntimeError: inference side says no" in kinds["refused"]
    assert kinds["after"] == len(_mixed_tensors(0))
    recv = dict(recv_events)
    assert "the sender failed before sending" in recv["sender-error"] and "'bf16' appears twice" in recv["sender-error"]
    assert recv["refused"] == "inference side says no"
    assert recv["early-stop"] == ["bf16"]


def _silent_peer(who_stops: str):
    """Rank 0 sends, rank 1 receives; `who_stops` stops answering mid-sync (a hung or dead process)."""
    tensors = _mixed_tensors(0)
    if dist.get_rank() == 0:
        def named():
            if who_stops == "sender":
                time.sleep(120)  # ended by launch once the receiver gives up
            yield from tensors
        WeightSender(src=0, bucket_bytes=64).send(named())
    else:
        def consume(stream):
            for _ in stream:
                if who_stops == "receiver":
                    time.sleep(120)
        WeightReceiver(src=0).receive(consume)


@pytest.mark.parametrize("who_stops, failing_rank, lost", [("receiver", 0, "a receiving rank"),
                                                           ("sender", 1, "the sender (global rank 0)")])
def test_a_silent_peer_becomes_a_sync_error_naming_it(who_stops, failing_rank, lost):
    with pytest.raises(LaunchError) as info:
        launch(_silent_peer, 2, who_stops, timeout_s=3)
    assert info.value.rank == failing_rank
    assert isinstance(info.value.exception, PeerLostError) and isinstance(info.value.exception, SyncError)
    assert f"rank {failing_rank}: lost {lost}" in str(info.value.exception)


def _one_receiver_refuses(root, scheme):
    """Rank 0 sends a checkpoint; ranks 1 and 2 are one TP=2 inference model; rank 2's copy of one
    norm tensor is poisoned (a corrupted transfer to that rank alone)."""
    rank = dist.get_rank()
    tp_group = dist.new_group([1, 2])
    path = make_checkpoint(next(c for c in CASES if c.name == "llama"), root)
    dist.barrier()
    if rank == 0:
        try:
            WeightSender(src=0, bucket_bytes=BUCKET).send(safetensors.torch.load_file(path / "model.safetensors").items())
        except SyncError as exc:
            return str(exc)
        return "sent"
    model = load_model(path, quantization=scheme, dtype=torch.float32, tp=TPContext(rank - 1, 2, tp_group))

    def poisoned(tensors):
        for name, tensor in tensors:
            if rank == 2 and name == "model.layers.1.post_attention_layernorm.weight":
                tensor = torch.full_like(tensor, float("nan"))
            yield name, tensor

    try:
        WeightReceiver(src=0).receive(lambda tensors: reload_weights(model, poisoned(tensors), atomic=True,
                                                                     transient_source=True))
    except Exception:  # noqa: BLE001 -- both ranks are expected to refuse
        pass
    return None


@pytest.mark.parametrize("scheme", [None, "fp8-block"])
def test_a_refusal_on_one_inference_rank_is_a_refusal_on_all(ranks, tmp_path, scheme):
    message = ranks.run(_one_receiver_refuses, 3, tmp_path, scheme)
    assert message.startswith("receiver(s) refused the weights")
    assert "rank 2: NonFiniteWeightError" in message and "rank 1: RankFailedError" in message
