"""Delta sync (streamquant.rl.receiver with rl/sync.py's `WeightSender(delta=True)`), trainer -> fp8 inference
over gloo: rank 0 takes real Adam steps on a tiny transformers Llama and sends only what changed; after every
sync each inference rank's `weights_fingerprint` must equal that of a cold load of the weights the trainer
saved after its step -- through full syncs, deltas, a receiver that restarts (fresh receiver, fresh model:
a full sync again), and a model reloaded from elsewhere between syncs (the delta still applies, every
tensor loaded from the receiver's copy). A delta or digest tampered on the way fails closed, naming the
tensor and the rank, and the model stays as it was."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import transformers

from streamquant import weights_fingerprint
from streamquant.api import load_model
from streamquant.checkpoint.reader import load_hf_config
from streamquant.formats import get_format
from streamquant.offline import QuantizePlan
from streamquant.parallel.context import TPContext
from streamquant.reload import reload_weights
from streamquant.rl.delta import Encoding
from streamquant.rl.errors import SyncError
from streamquant.rl.sync import WeightReceiver, WeightSender
from streamquant.update import FingerprintMismatchError

from hf_cases import CASES, make_checkpoint

BUCKET = 8 << 10
SCHEME = "fp8-block"
STEPS = 5
RESTART, RELOADED = 2, 4  # the steps before which a receiver restarts / its model is reloaded from disk


def _adam_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _save_bf16(model: torch.nn.Module, config_from, out) -> None:
    """The weights as the sender sends them (bf16), as a checkpoint to cold-load."""
    out.mkdir(parents=True)
    (out / "config.json").write_bytes((config_from / "config.json").read_bytes())
    state = {n: p.detach().to(torch.bfloat16).contiguous() for n, p in model.named_parameters()}
    safetensors.torch.save_file(state, out / "model.safetensors", metadata={"format": "pt"})


def _start(root):
    rank = dist.get_rank()
    case = next(c for c in CASES if c.name == "llama")
    if rank == 0:
        make_checkpoint(case, root)
    dist.barrier()
    return rank, root / case.name


def _sender(a, quantized: bool, cls=WeightSender) -> WeightSender:
    if not quantized:
        return cls(src=0, bucket_bytes=BUCKET, dtype=torch.bfloat16, delta=True)
    plan = QuantizePlan(load_hf_config(a), SCHEME, get_format("compressed-tensors"), torch.bfloat16)
    return cls(src=0, bucket_bytes=BUCKET, quantization=plan, delta=True)


def _delta_loop(root, tp_size: int, quantized: bool):
    rank, a = _start(root)
    tp_group = dist.new_group(list(range(1, tp_size + 1)))
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    if rank == 0:
        trainer = transformers.AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
        optimizer = torch.optim.Adam(trainer.parameters(), lr=1e-4)
        sender, stats = _sender(a, quantized), []
        for step in range(STEPS):
            _adam_step(trainer, optimizer, seed=step)
            _save_bf16(trainer, a, root / f"step{step}")
            dist.barrier()
            stats.append(sender.send(trainer.named_parameters()))
        dist.gather_object(None, gathered, dst=0)
        return stats, gathered[1:]
    tp = TPContext(rank=rank - 1, size=tp_size, group=tp_group)
    rows = []
    for step in range(STEPS):
        if step in (0, RESTART):
            receiver, model = WeightReceiver(src=0), load_model(a, quantization=SCHEME, tp=tp)
        if step == RELOADED:
            reload_weights(model, a)
        dist.barrier()
        loaded = receiver.reload(model, atomic=True)
        cold = load_model(root / f"step{step}", quantization=SCHEME, tp=tp)
        rows.append((len(loaded), weights_fingerprint(model) == weights_fingerprint(cold)))
    dist.gather_object(rows, None, dst=0)
    return None


@pytest.mark.parametrize("tp_size, quantized", [(1, True), (2, True), (1, False)])
def test_delta_sync_equals_a_cold_load_every_step_through_a_restart(ranks, tmp_path, tp_size, quantized):
    stats, receivers = ranks.run(_delta_loop, tp_size + 1, tmp_path, tp_size, quantized)
    assert [s.delta for s in stats] == [False, True, False, True, True]  # a restart makes the sync full
    full = stats[0].bytes
    for s in stats:
        if s.delta:
            assert s.bytes == s.header_bytes + sum(c.nbytes for c in s.changes)
            assert s.bytes < full / 2, (s.bytes, full)  # an Adam step at lr 1e-4 moves a few values
            if quantized:  # few fp8 codes change: their positions are the smallest payload
                assert any(c.encoding is Encoding.SPARSE for c in s.changes if c.dtype == "float8_e4m3fn")
    changed = [sum(c.encoding is not Encoding.UNCHANGED for c in s.changes) for s in stats]
    everything = stats[0].tensors
    for rows in receivers:
        assert [equal for _, equal in rows] == [True] * STEPS
        loaded = [n for n, _ in rows]
        assert loaded[0] == loaded[RESTART] == loaded[RELOADED] == everything  # full, or a model changed since
        if quantized:  # only the changed tensors went into the model
            assert loaded[1] == changed[1] < everything and loaded[3] == changed[3] < everything
        else:  # receiver-side quantization needs whole layers: every tensor, from the copy
            assert loaded[1] == loaded[3] == everything


class Tampering(WeightSender):
    """Corrupts the first changed tensor of a delta after its digest was taken: its payload's last byte (a
    value), or the digest itself."""

    mode = "payload"

    def _payload(self, items, base):
        payload, sync, digests, changes = super()._payload(items, base)
        if (base is not None or self.copy is None) and self.mode:  # a delta, or any send without delta=True
            name, data = payload[0]
            if self.mode == "payload":
                data = data.clone()
                data[-1] ^= 0x01
                payload[0] = (name, data)
            else:
                digests[name] = "0" * 64
            self.mode = None  # once
        return payload, sync, digests, changes


def _tampered(root, mode: str):
    rank, a = _start(root)
    if rank == 0:
        trainer = transformers.AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
        optimizer = torch.optim.Adam(trainer.parameters(), lr=1e-4)
        sender, out = _sender(a, quantized=True, cls=Tampering), []
        sender.mode = mode
        for step in range(3):
            _adam_step(trainer, optimizer, seed=step)
            _save_bf16(trainer, a, root / f"t{step}")
            dist.barrier()
            try:
                out.append(sender.send(trainer.named_parameters()).delta)
            except SyncError as exc:
                out.append(str(exc))
        received = [None, None]
        dist.gather_object(None, received, dst=0)
        return out, received[1]
    alone = TPContext()  # not the whole world, which holds the trainer too
    model, receiver, out = load_model(a, quantization=SCHEME, tp=alone), WeightReceiver(src=0), []
    for step in range(3):
        dist.barrier()
        before = weights_fingerprint(model)
        try:
            receiver.reload(model, atomic=True)
        except Exception as exc:  # noqa: BLE001 -- the tampered step is refused
            out.append((type(exc).__name__, str(exc), weights_fingerprint(model) == before))
            continue
        cold = load_model(root / f"t{step}", quantization=SCHEME, tp=alone)
        out.append(weights_fingerprint(model) == weights_fingerprint(cold))
    dist.gather_object(out, None, dst=0)
    return None


@pytest.mark.parametrize("mode", ["payload", "digest"])
def test_a_tampered_delta_fails_closed_naming_the_tensor(ranks, tmp_path, mode):
    sent, received = ranks.run(_tampered, 2, tmp_path, mode)
    assert sent[0] is False and sent[2] is False  # full, then full again after the refusal
    assert sent[1].startswith("receiver(s) refused the weights: rank 1: FingerprintMismatchError: rank 1: "
                              "checkpoint tensor 'model.embed_tokens.weight'")
    kind, message, unchanged = received[1]
    assert kind == "FingerprintMismatchError"
    assert message.startswith("rank 1: checkpoint tensor 'model.embed_tokens.weight'")
    assert unchanged  # atomic: the model as before the refused sync
    assert received[0] is True and received[2] is True  # equal to a cold load before and after


def _plain_with_digests():
    """No delta: `fingerprint=True` alone attaches digests; the first tensor's is wrong."""
    g = torch.Generator().manual_seed(0)
    tensors = [(f"w{i}", torch.randn(50, generator=g).bfloat16()) for i in range(4)]
    if dist.get_rank() == 0:
        sender = Tampering(src=0, bucket_bytes=BUCKET, fingerprint=True)
        sender.mode = "digest"
        try:
            sender.send(tensors)
        except SyncError as exc:
            refused = str(exc)
        return refused, sender.send(tensors).tensors  # the next send passes its check
    receiver = WeightReceiver(src=0)
    with pytest.raises(FingerprintMismatchError, match="rank 1: checkpoint tensor 'w0'"):
        receiver.receive(lambda stream: [n for n, _ in stream])
    assert receiver.receive(lambda stream: [n for n, _ in stream]) == [n for n, _ in tensors]
    return None


def test_digests_without_delta_are_checked_too(ranks):
    refused, sent = ranks.run(_plain_with_digests, 1 + 1)
    assert refused.startswith("receiver(s) refused the weights: rank 1: FingerprintMismatchError: rank 1: "
                              "checkpoint tensor 'w0'")
    assert sent == 4
