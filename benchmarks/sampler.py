"""Sampler throughput: KV-cache decode vs. regenerating without a cache, in one run.

    python benchmarks/sampler.py [--batch 16] [--prompt 64] [--new 128] [--preset tiny]

Both generate `--new` tokens for `--batch` prompts of `--prompt` tokens with the same
model; "no cache" recomputes a full forward over the whole sequence for every new
token (what a cacheless generate does). Reports decode tokens/s (generated tokens
per second, compile excluded, median of runs) and the ratio. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jalign.generate import generate
from jalign.models.config import PRESETS, ModelConfig
from jalign.models.transformer import Decoder, logits_from_hidden


@partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def generate_without_cache(params, config, prompt, mask, *, max_new_tokens):
    b, p = prompt.shape
    tokens = jnp.concatenate([prompt, jnp.zeros((b, max_new_tokens), jnp.int32)], 1)
    valid = jnp.concatenate([mask, jnp.zeros((b, max_new_tokens), jnp.int32)], 1)

    def body(i, carry):
        tokens, valid = carry
        positions = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)
        hidden = Decoder(config).apply({"params": params}, tokens, positions, valid)
        last = jax.lax.dynamic_slice_in_dim(hidden, p + i - 1, 1, axis=1)
        nxt = logits_from_hidden(last, params, config)[:, 0].argmax(-1).astype(jnp.int32)
        return tokens.at[:, p + i].set(nxt), valid.at[:, p + i].set(1)

    return jax.lax.fori_loop(0, max_new_tokens, body, (tokens, valid))[0]


def _time(fn, repeats):
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = ModelConfig(**PRESETS[args.preset])
    params = nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    prompt = rng.integers(4, cfg.vocab_size, (args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(prompt)
    # eos_id=-1: no sequence stops early, so both generate exactly --new tokens.
    cached = _time(lambda: generate(params, cfg, prompt, mask, jax.random.PRNGKey(0),
                                    max_new_tokens=args.new, eos_id=-1, pad_id=0, greedy=True),
                   args.repeats)
    uncached = _time(lambda: generate_without_cache(params, cfg, prompt, mask,
                                                    max_new_tokens=args.new), args.repeats)
    tokens = args.batch * args.new
    result = {"benchmark": "sampler", "preset": args.preset, "batch": args.batch,
              "prompt": args.prompt, "new_tokens": args.new,
              "kv_cache_tokens_per_s": tokens / cached, "no_cache_tokens_per_s": tokens / uncached,
              "speedup": uncached / cached, "backend": jax.default_backend(),
              "machine": platform.machine()}
    print(f"KV cache: {result['kv_cache_tokens_per_s']:,.0f} tok/s; no cache: "
          f"{result['no_cache_tokens_per_s']:,.0f} tok/s; speedup x{result['speedup']:.1f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
