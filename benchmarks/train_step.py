"""SFT train-step throughput: tokens/s and achieved FLOP/s vs. this machine's matmul peak.

    python benchmarks/train_step.py [--preset bench] [--batch 8] [--seq 128] [--steps 10]

Both figures are measured in the same run: the matmul peak is the best float32
rate of a square jnp.dot on this machine, the step rate is the median over steps
after compilation. Model FLOPs per token use the usual count (6 x non-embedding
parameters, 6 x H x V for the output projection, 12 x layers x H x T for
attention scores and values, forward + backward). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jalign.steps import decoder_logprob_fn
from jalign import sharding as shd
from jalign.models.config import PRESETS, ModelConfig
from jalign.steps.sft import make_sft_step
from jalign.models import decoder_init_fn
from jalign.state import init_train_state


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def train_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    non_embed = cfg.num_params() - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq
    return 6 * non_embed + 6 * cfg.hidden_size * cfg.vocab_size + attn


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    cfg = ModelConfig(**PRESETS[args.preset])
    mesh = shd.make_mesh({"fsdp": -1})
    opt = optax.adamw(1e-4)
    state, shardings = init_train_state(decoder_init_fn(cfg), opt, mesh, shd.DEFAULT_RULES, seed=0)
    data_sharding = shd.data_sharding(mesh, shd.DEFAULT_RULES)
    step = jax.jit(make_sft_step(decoder_logprob_fn(cfg, with_stats=True), opt), in_shardings=(shardings, data_sharding),
                   out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    b, t = args.batch, args.seq
    batch = {"tokens": rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32),
             "loss_mask": np.ones((b, t), np.int32),
             "segment_ids": np.ones((b, t), np.int32),
             "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}
    batch = jax.device_put(batch, data_sharding)
    with jax.set_mesh(mesh):
        state, metrics = step(state, batch)  # compile
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    step_time = statistics.median(times)
    tokens = b * t
    flops = train_flops_per_token(cfg, t) * tokens
    peak = matmul_peak()
    result = {
        "benchmark": "train_step_sft", "preset": args.preset, "batch": b, "seq": t,
        "params": cfg.num_params(), "step_time_s": step_time, "tokens_per_s": tokens / step_time,
        "achieved_flops": flops / step_time, "matmul_peak_flops": peak,
        "fraction_of_peak": flops / step_time / peak, "devices": jax.device_count(),
        "backend": jax.default_backend(), "machine": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
    }
    print(f"SFT step {args.preset} B={b} T={t}: {result['tokens_per_s']:,.0f} tokens/s, "
          f"{result['achieved_flops'] / 1e9:.2f} GFLOP/s = {100 * result['fraction_of_peak']:.1f}% "
          f"of the measured float32 matmul peak ({peak / 1e9:.1f} GFLOP/s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
