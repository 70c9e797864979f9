"""One refit-rollout loop, end to end: a trainer refits two tensor-parallel fp8 inference ranks and
learns from their rollouts.

    python examples/rl_loop.py                      # the demo checkpoint, 3 steps, TP=2 fp8-block
    python examples/rl_loop.py --checkpoint DIR --steps 5 --quantization fp8 --json out.json
    python examples/rl_loop.py --delta --lr 1e-5       # fp8 codes quantized on the trainer, only changes sent

Process 0 is the trainer: a transformers model (float32 master weights) taking REINFORCE steps on a
synthetic reward (the share of even token ids in a completion). Processes 1..TP hold the fp8 model,
one tensor-parallel group. Every step:
  1. the trainer sends its weights (cast to bf16) with `WeightSender`; the inference ranks push each
     received bucket into a weight update (`begin_update(atomic=True)`, `update.load_many` on the
     `WeightReceiver.receive` stream, `update.finish()`: in place, committed on both ranks or neither): the
     refit seconds. With `--delta` the trainer quantizes (`QuantizePlan`, the inference scheme) and sends
     only the fp8 codes, scales and bf16 values that changed since the last step (`WeightSender(delta=True)`;
     the first step is a full send); each rank rebuilds them in its copy of the last sync, checks them
     against the trainer's SHA-256 digests, and loads only the changed tensors (`begin_update(expected=...)`);
  2. check: the trainer also saved those bf16 weights; the inference ranks cold-load them with the same
     scheme and compare the refitted model's `weights_fingerprint` (SHA-256 of every fp8 code and scale)
     with the cold load's;
  3. the inference ranks sample rollouts with logprobs (`generate_sequences`; every rank computes the
     same samples, TP rank 0 sends them to the trainer): rollout tokens/s;
  4. the trainer scores the rollouts with its own model (`logp_train`) and reports the mismatch
     mean(logp_rollout - logp_train) over sampled tokens (an estimate of KL(fp8 || trainer)), then
     takes its optimizer step on the reward.
Prints a table per step, writes `--json` and a PNG plot of refit seconds, rollout tokens/s and mismatch
per step (`--plot`, default rl_loop.png; matplotlib, the `examples` extra). Runs on CPU (gloo).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist

from streamquant import begin_update, load_model, weights_fingerprint
from streamquant.checkpoint.reader import load_hf_config
from streamquant.checkpoint.synthetic import DEMO_SPEC, default_cache_dir, ensure_synthetic_checkpoint
from streamquant.formats import get_format
from streamquant.offline import QuantizePlan
from streamquant.inference.generation import generate_sequences
from streamquant.parallel.launch import launch
from streamquant.parallel.context import TPContext
from streamquant.inference.sampling import SamplingParams
from streamquant.rl.sync import WeightReceiver, WeightSender


def reward(completion: list[int]) -> float:
    return sum(t % 2 == 0 for t in completion) / max(1, len(completion))


def prompts(vocab: int, count: int, length: int, step: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (count, length), generator=g).tolist()


def save_bf16(model, source: Path, target: Path) -> None:
    """The weights exactly as they were sent (bf16), as a checkpoint the inference ranks cold-load."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (source / name).exists():
            (target / name).write_bytes((source / name).read_bytes())
    state = {n: p.detach().to(torch.bfloat16).contiguous() for n, p in model.named_parameters()}
    safetensors.torch.save_file(state, target / "model.safetensors", metadata={"format": "pt"})


def trainer(args, world_tp_group) -> list[dict]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if args.delta:  # codes and scales made on the trainer, in the inference ranks' scheme; only changes sent
        plan = QuantizePlan(load_hf_config(args.checkpoint), args.quantization, get_format("compressed-tensors"),
                            torch.bfloat16)
        sender = WeightSender(src=0, quantization=plan, delta=True)
    else:
        sender = WeightSender(src=0, dtype=torch.bfloat16)
    rows = []
    for step in range(args.steps):
        save_bf16(model, Path(args.checkpoint), Path(args.scratch) / f"step{step}")
        dist.barrier()
        stats = sender.send(model.named_parameters())
        report = [None] * dist.get_world_size()
        dist.gather_object(None, report, dst=0)
        result = report[1]
        model.zero_grad(set_to_none=True)
        loss, gaps, rewards = 0.0, [], []
        for seq in result["sequences"]:
            ids = torch.tensor([seq["prompt_ids"] + seq["completion_ids"]])
            logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            n = len(seq["completion_ids"])
            taken = logp[-n:].gather(-1, torch.tensor(seq["completion_ids"])[:, None]).squeeze(-1)
            gaps += (torch.tensor(seq["logprobs"]) - taken.detach()).tolist()
            rewards.append(reward(seq["completion_ids"]))
            loss = loss - (rewards[-1] - 0.5) * taken.sum() / len(result["sequences"])
        loss.backward()
        optimizer.step()
        rows.append({"step": step, "refit_seconds": result["refit_seconds"], "sent_mib": stats.bytes / 2**20,
                     "delta": stats.delta,
                     "equals_cold_load": result["equals_cold_load"], "rollout_tokens_per_s": result["tokens_per_s"],
                     "mismatch": sum(gaps) / len(gaps), "reward": sum(rewards) / len(rewards)})
    return rows


def inference(args, tp_group) -> None:
    rank = dist.get_rank()
    tp = TPContext(rank=rank - 1, size=args.tp, group=tp_group)
    model = load_model(args.checkpoint, quantization=args.quantization, tp=tp)
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, stop_token_ids=(), logprobs=0)
    receiver = WeightReceiver(src=0)
    for step in range(args.steps):
        dist.barrier()
        start = time.perf_counter()
        receiver.receive(lambda tensors: push(model, receiver, tensors), model=model)
        refit = time.perf_counter() - start
        cold = load_model(Path(args.scratch) / f"step{step}", quantization=args.quantization, tp=tp)
        equal = weights_fingerprint(model) == weights_fingerprint(cold)
        del cold
        start = time.perf_counter()
        batch = prompts(model.config.vocab_size, args.prompts, args.prompt_length, step)
        sequences = generate_sequences(model, batch, dataclasses.replace(params, seed=step))
        seconds = time.perf_counter() - start
        result = {"refit_seconds": refit, "equals_cold_load": equal,
                  "tokens_per_s": sum(len(s.completion_ids) for s in sequences) / seconds,
                  "sequences": [dataclasses.asdict(s) for s in sequences]} if tp.rank == 0 else None
        dist.gather_object(result, None, dst=0)


def push(model, receiver: WeightReceiver, tensors) -> set[str]:
    """One weight update fed by the receiver's stream: every tensor, or (a delta into this model) the
    changed ones, which `receiver.expected` names; committed on every rank or none."""
    update = begin_update(model, atomic=True, expected=receiver.expected, quantized_source=receiver.quantized)
    try:
        update.load_many(tensors)  # each bucket's tensors pushed in as they arrive
    except Exception:  # noqa: BLE001  recorded in the update: finish() raises it once the ranks agreed
        pass
    return update.finish()


def _rank(args) -> list[dict] | None:
    tp_group = dist.new_group(list(range(1, args.tp + 1)))  # every rank takes part in creating it
    if dist.get_rank() == 0:
        return trainer(args, tp_group)
    inference(args, tp_group)
    return None


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a Llama-family checkpoint (default: the demo one)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--quantization", default="fp8-block")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--delta", action="store_true",
                        help="quantize on the trainer and send only the fp8 codes, scales and values that changed")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=Path("rl_loop.png"),
                        help="PNG of refit seconds, rollout tokens/s and mismatch per step (needs matplotlib)")
    args = parser.parse_args(argv)
    args.checkpoint = str(args.checkpoint or ensure_synthetic_checkpoint(default_cache_dir(), DEMO_SPEC))
    with tempfile.TemporaryDirectory(prefix="rl-loop-") as scratch:
        args.scratch = scratch
        rows = launch(_rank, args.tp + 1, args, timeout_s=600)
    print(f"{'step':>4}{'refit s':>9}{'sent MiB':>10}{'sync':>6}{'equal cold':>11}{'tok/s':>8}{'mismatch':>10}"
          f"{'reward':>8}")
    for r in rows:
        print(f"{r['step']:>4}{r['refit_seconds']:>9.3f}{r['sent_mib']:>10.3f}{'delta' if r['delta'] else 'full':>6}"
              f"{str(r['equals_cold_load']):>11}"
              f"{r['rollout_tokens_per_s']:>8.1f}{r['mismatch']:>10.4f}{r['reward']:>8.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, args.plot)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Write the per-step refit seconds, rollout tokens/s and mismatch as one PNG."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install 'streamquant[examples]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    panels = [("refit_seconds", "refit s"), ("rollout_tokens_per_s", "rollout tokens/s"), ("mismatch", "mismatch")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), constrained_layout=True)
    for ax, (key, label) in zip(axes, panels):
        ax.plot(steps, [r[key] for r in rows], marker="o")
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.set_xticks(steps)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(0 if all(r["equals_cold_load"] for r in main()) else 1)
