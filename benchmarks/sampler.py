"""Sampler throughput: KV-cache decode vs. regenerating without a cache, in one run.

    python benchmarks/sampler.py [--batch 16] [--prompt 64] [--new 128] [--preset tiny]
    python benchmarks/sampler.py --vs_hf 5     # interleaved with benchmarks/hf_generate_peer.py

Both generate `--new` tokens for `--batch` prompts of `--prompt` tokens with the same
model; "no cache" recomputes a full forward over the whole sequence for every new
token (what a cacheless generate does). Reports decode tokens/s (generated tokens per
second of a whole `generate` call, prefill included, compile excluded, median of
`--repeats` calls), the prefill time and the time per decode step, greedy and sampled.
Ends with one JSON line.

`--vs_hf N` runs N rounds, each in fresh processes one after the other: this script (KV
cache only) on 1 and on 2 host devices, then the transformers peer with its dynamic and
its static cache on 2 threads and its dynamic cache on 1 thread. It reports each run with
how many cores other processes kept busy during it, and the medians and ratios over the
runs where that stayed under `--quiet_below`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jalign import sharding as shd
from jalign.generate import generate
from jalign.models.config import PRESETS, ModelConfig
from jalign.models.transformer import Decoder, logits_from_hidden
from _machine import cpu_snapshot, others_busy  # benchmarks/ is on sys.path when run as a script


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
    """Median and min seconds of `fn` after one untimed call, and the others' CPU use."""
    jax.block_until_ready(fn())  # compile
    times = []
    snap, w0 = cpu_snapshot(), time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    others = others_busy(snap, cpu_snapshot(), time.perf_counter() - w0)
    return statistics.median(times), min(times), others


def run_jalign(args):
    if args.host_devices > 1:  # before JAX starts its CPU backend
        jax.config.update("jax_num_cpu_devices", args.host_devices)
    cfg = ModelConfig(**PRESETS[args.preset])
    params = nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    prompt = rng.integers(4, cfg.vocab_size, (args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(prompt)
    # Data parallel over the host devices (one device: nothing to shard).
    mesh = shd.make_mesh({"data": jax.device_count()})
    rows = shd.data_sharding(mesh, shd.DEFAULT_RULES)
    params = jax.device_put(params, shd.replicated(mesh))
    prompt, mask = jax.device_put(prompt, rows), jax.device_put(mask, rows)
    # eos_id=-1: no sequence stops early, so every call generates exactly n tokens.
    run = lambda n, **kw: (lambda: generate(params, cfg, prompt, mask, jax.random.PRNGKey(0),
                                            max_new_tokens=n, eos_id=-1, pad_id=0, **kw))
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
        greedy, greedy_min, others = _time(run(args.new, greedy=True), args.repeats)
        prefill, _, _ = _time(run(1, greedy=True), args.repeats)
        sampled, _, _ = _time(run(args.new, temperature=1.0), args.repeats)
    tokens = args.batch * args.new
    result = {"benchmark": "sampler", "preset": args.preset, "host_devices": jax.device_count(),
              "batch": args.batch,
              "prompt": args.prompt, "new_tokens": args.new, "repeats": args.repeats,
              "kv_cache_tokens_per_s": tokens / greedy, "kv_cache_seconds": greedy,
              "kv_cache_best_tokens_per_s": tokens / greedy_min,
              "prefill_and_first_token_ms": 1e3 * prefill,
              "decode_step_ms": 1e3 * (greedy - prefill) / (args.new - 1),
              "sampled_tokens_per_s": tokens / sampled,
              "other_processes_cores_busy": others, "loadavg_1m": os.getloadavg()[0],
              "jax": jax.__version__, "backend": jax.default_backend(),
              "machine": platform.processor() or platform.machine()}
    print(f"KV cache, greedy, {jax.device_count()} host device(s): "
          f"{result['kv_cache_tokens_per_s']:,.0f} tok/s "
          f"(prefill + 1st token {result['prefill_and_first_token_ms']:.1f} ms, then "
          f"{result['decode_step_ms']:.3f} ms per step); sampled (temperature 1): "
          f"{result['sampled_tokens_per_s']:,.0f} tok/s; other processes busy: "
          f"{others if others is None else round(others, 2)} cores")
    if not args.skip_uncached:
        host = jax.device_get((params, prompt, mask))
        uncached, _, _ = _time(lambda: generate_without_cache(*host[:1], cfg, *host[1:],
                                                              max_new_tokens=args.new), 3)
        result.update(no_cache_tokens_per_s=tokens / uncached, speedup=uncached / greedy)
        print(f"no cache: {result['no_cache_tokens_per_s']:,.0f} tok/s; "
              f"KV cache speedup x{result['speedup']:.1f}")
    print(json.dumps(result))


def _last_json(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_vs_hf(args):
    here = os.path.dirname(os.path.abspath(__file__))
    shape = ["--batch", str(args.batch), "--prompt", str(args.prompt), "--new", str(args.new)]
    jalign_cmd = [sys.executable, os.path.join(here, "sampler.py"), "--skip_uncached",
                  "--preset", args.preset, "--repeats", str(args.repeats)] + shape
    hf_cmd = [sys.executable, os.path.join(here, "hf_generate_peer.py"),
              "--repeats", str(args.repeats)] + shape
    runs = {"jalign_1dev": jalign_cmd, "jalign_2dev": jalign_cmd + ["--host_devices", "2"],
            "hf_dynamic": hf_cmd + ["--cache", "dynamic"],
            "hf_static": hf_cmd + ["--cache", "static"],
            "hf_dynamic_1thread": hf_cmd + ["--cache", "dynamic", "--threads", "1"]}
    speed = {name: "tokens_per_s" if name.startswith("hf") else "kv_cache_tokens_per_s"
             for name in runs}
    rounds = []
    for r in range(args.vs_hf):
        got = {name: _last_json(cmd) for name, cmd in runs.items()}
        rounds.append(got)
        print(f"round {r}: " + "; ".join(
            f"{name} {g[speed[name]]:,.0f} tok/s (others busy "
            f"{g['other_processes_cores_busy'] or 0:.2f})" for name, g in got.items()), flush=True)
    # Another process on a core ruins torch's 2 OpenMP threads far more than XLA, so
    # only runs during which others stayed off the CPU count (all runs if none did).
    busy = lambda g: g["other_processes_cores_busy"] or 0
    quiet = {name: [got[name] for got in rounds if busy(got[name]) < args.quiet_below]
             or [got[name] for got in rounds] for name in runs}
    med = {name: statistics.median(g[speed[name]] for g in quiet[name]) for name in runs}
    hf_best = max(med["hf_dynamic"], med["hf_static"])  # the peer's 2-thread runs
    result = {"benchmark": "sampler_vs_hf", "rounds": args.vs_hf,
              "runs_used": {name: len(q) for name, q in quiet.items()},
              "quiet_below_cores": args.quiet_below,
              **{f"{name}_tokens_per_s": v for name, v in med.items()},
              "ratio_1dev_vs_best_hf": med["jalign_1dev"] / hf_best,
              "ratio_2dev_vs_best_hf": med["jalign_2dev"] / hf_best,
              "ratio_1dev_vs_hf_1thread": med["jalign_1dev"] / med["hf_dynamic_1thread"],
              "max_other_processes_cores_busy": max(busy(g) for q in quiet.values() for g in q)}
    if result["max_other_processes_cores_busy"] >= args.quiet_below:
        print("WARNING: some runs had no quiet repeat, so loaded runs were used; "
              "these ratios do not compare the frameworks")
    print(f"medians over the quiet runs of {args.vs_hf} rounds (tok/s): " + ", ".join(
        f"{name} {v:,.0f} ({len(quiet[name])} runs)" for name, v in med.items())
          + f"; jalign / faster transformers: x{result['ratio_1dev_vs_best_hf']:.2f} (1 device), "
          f"x{result['ratio_2dev_vs_best_hf']:.2f} (2 host devices); 1 device / transformers "
          f"on 1 thread: x{result['ratio_1dev_vs_hf_1thread']:.2f}")
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip_uncached", action="store_true")
    parser.add_argument("--host_devices", type=int, default=1,
                        help="CPU devices to shard the batch over (2 uses both cores here)")
    parser.add_argument("--vs_hf", type=int, default=0, metavar="ROUNDS")
    parser.add_argument("--quiet_below", type=float, default=0.25,
                        help="--vs_hf: use rounds where other processes kept fewer cores busy")
    args = parser.parse_args()
    if args.vs_hf:
        run_vs_hf(args)
    else:
        run_jalign(args)


if __name__ == "__main__":
    main()
