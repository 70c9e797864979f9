"""`streamquant mismatch PATH`: the fp8-vs-bf16 policy mismatch probe (`rl.mismatch.mismatch`) from the
command line: its flags, the run and the table it prints."""

from __future__ import annotations

import argparse
from pathlib import Path

from streamquant.cli.input import count
from streamquant.cli.load import add_progress_flag
from streamquant.cli.rollout import read_prompts
from streamquant.inference.sampling import SamplingParams
from streamquant.rl.mismatch import mismatch


def add_mismatch_command(commands) -> None:
    m = commands.add_parser("mismatch", help="fp8-vs-bf16 policy mismatch: KL, logprob differences, importance "
                                             "ratios and top-1 agreement on fp8-sampled rollouts")
    m.add_argument("path", help="checkpoint directory or Hugging Face hub id")
    m.add_argument("--quantization", default="fp8,fp8-channel,fp8-block", metavar="SCHEMES",
                   help="comma-separated fp8 schemes (default: all three); each also weight-only")
    m.add_argument("--prompts", type=Path, default=None, metavar="FILE.jsonl",
                   help="prompts, one JSON list of ids per line (default: 8 fixed random prompts of 16 tokens)")
    m.add_argument("--max-new-tokens", type=count, default=32, metavar="N")
    m.add_argument("--temperature", type=float, default=1.0)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", default="bfloat16", help="the reference (trainer) dtype (default: bfloat16)")
    m.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the numbers as JSON to FILE")
    add_progress_flag(m)


def run_mismatch(args: argparse.Namespace) -> dict:
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
                            stop_token_ids=())
    prompts = read_prompts(args.prompts) if args.prompts is not None else None
    schemes = [s.strip() for s in args.quantization.split(",") if s.strip()]
    return mismatch(args.path, schemes, prompts=prompts, params=params, dtype=args.dtype, progress=args.progress)


def print_mismatch(result: dict) -> None:
    print(f"{'run':<26}{'KL mean':>10}{'KL p99':>10}{'|dlogp|':>9}{'ratio p1':>10}{'ratio p99':>10}"
          f"{'outside':>9}{'top-1':>7}")
    for name, r in result["runs"].items():
        print(f"{name:<26}{r['kl_mean']:>10.5f}{r['kl_p99']:>10.5f}{r['abs_logprob_diff_mean']:>9.4f}"
              f"{r['ratio_p1']:>10.3f}{r['ratio_p99']:>10.3f}{r['ratio_share_outside']:>9.4f}{r['top1_agreement']:>7.3f}")
