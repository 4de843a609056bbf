"""Multi-turn rollouts: continuing from the KV cache vs re-encoding the conversation each turn.

    python benchmarks/multiturn.py [--preset tiny] [--batch 32] [--turns 2,4,8] [--new 32]

Both ways play the same sampled episodes (same key, so the same tokens) of the same
random model, its EOS embedding scaled by `--eos_boost` so that turns end by themselves
after a few tokens (a turn cut at `--new` tokens would end its episode), against an
environment that answers every turn with a short user message until `--turns` turns were
played. Greedy turns (`--greedy`) of this model end at once, so they measure nothing.

  cache     jalign's `EpisodeRunner.run`: one prefill of the prompt, then per turn the
            decode loop continues from the cache and the observation is prefilled after it;
  reencode  `EpisodeRunner.run_reencoding`: per turn a fresh `generate` call over the
            whole conversation so far (prefill of every earlier turn again).

The tokens are checked equal, then each way is timed (median of `--repeats` runs after
a warm-up that compiles every shape). Reports episodes x turns, generated tokens, wall
seconds and generated tokens/s each way and their ratio, measured in the same process;
ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jalign.algorithms.episodes import EpisodeRunner, EpisodeSpec
from jalign.environments import Environment
from jalign.models.config import PRESETS, ModelConfig
from jalign.models.transformer import Decoder
from jalign.tokenizer import builtin_tokenizer


class Answers(Environment):
    """A one-line user reply to every turn; the episode ends after `turns` turns."""

    def __init__(self, turns: int):
        self.turns = turns

    def step(self, episodes, completions):
        obs = [None if e.turn >= self.turns else f"ok {e.turn}: go on" for e in episodes]
        return obs, [None] * len(obs), [o is None for o in obs]


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name"))
        flags = next((line for line in out.splitlines() if line.startswith("Flags")), "")
        return f"{model}; avx512f={'avx512f' in flags}"
    except (OSError, StopIteration):
        return platform.processor()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--turns", default="2,4,8")
    parser.add_argument("--new", type=int, default=32, help="max new tokens per turn")
    parser.add_argument("--eos_boost", type=float, default=11.0)
    parser.add_argument("--greedy", action="store_true",
                        help="greedy turns (the random model then ends every turn at once)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tok = builtin_tokenizer()
    cfg = ModelConfig(**{**PRESETS[args.preset], "vocab_size": max(PRESETS[args.preset]["vocab_size"],
                                                                    tok.vocab_size)})
    params = nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 8), jnp.int32))["params"])
    params["embed"] = params["embed"].at[tok.eos_id].multiply(args.eos_boost)
    rows = [{"prompt": [{"role": "user", "content": f"task {i}: " + "abc" * (1 + i % 4)}]}
            for i in range(args.batch)]
    print(f"machine: {_cpu()}; jax {jax.__version__}, {jax.devices()[0].platform}; "
          f"preset {args.preset} ({cfg.num_params() / 1e6:.2f}M params), batch {args.batch}, "
          f"{args.new} new tokens per turn")
    results = []
    for turns in (int(t) for t in args.turns.split(",")):
        spec = EpisodeSpec("bench", max_turns=turns, max_new_tokens=args.new,
                           episode_tokens=turns * (args.new + 64), max_observation_tokens=64)
        runner = EpisodeRunner(cfg, tok, Answers(turns), spec, greedy=args.greedy)
        rng = jax.random.PRNGKey(1)
        played = runner.run(params, rows, rng)
        convs = runner.run_reencoding(params, rows, rng)
        for i, ids in enumerate(convs):
            n = int(played.batch["segment_ids"][i].sum())
            assert played.batch["tokens"][i][:n].tolist() == ids, f"episode {i} differs"
        generated = int(played.generated.sum())
        played_turns = float(np.mean([e.turn for e in played.episodes]))
        times = {"cache": [], "reencode": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            runner.run(params, rows, rng)
            times["cache"].append(time.perf_counter() - start)
            start = time.perf_counter()
            runner.run_reencoding(params, rows, rng)
            times["reencode"].append(time.perf_counter() - start)
        cache_s, reencode_s = (statistics.median(times[k]) for k in ("cache", "reencode"))
        row = dict(turns=turns, mean_turns=played_turns, generated_tokens=generated,
                   cache_s=cache_s, reencode_s=reencode_s, cache_tok_s=generated / cache_s,
                   reencode_tok_s=generated / reencode_s, speedup=reencode_s / cache_s)
        results.append(row)
        print(f"turns {turns} (played {played_turns:.2f} on average, {generated} generated "
              f"tokens): cache {cache_s:.3f} s ({row['cache_tok_s']:,.0f} tok/s), re-encode "
              f"{reencode_s:.3f} s ({row['reencode_tok_s']:,.0f} tok/s): {row['speedup']:.2f}x",
              flush=True)
    print(json.dumps({"preset": args.preset, "batch": args.batch, "new": args.new,
                      "results": results}))


if __name__ == "__main__":
    main()
