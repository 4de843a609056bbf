"""DPO train-step throughput of jalign on the issue's benchmark shape.

    python benchmarks/dpo_step.py [--preset bench] [--pairs 8] [--prompt 64] [--response 64]
                                  [--steps 10] [--logprob-impl auto] [--remat none]
                                  [--projection-backward autodiff] [--host_devices 1]

One step = policy forward over chosen + rejected (one [2B, T] pass), reference
forward (frozen params in the state), policy backward, AdamW update; sigmoid DPO
loss, beta 0.1, float32. The batch is padded: row 2p is the chosen and row 2p+1
the rejected sequence of pair p, each `prompt + response` tokens of random ids,
with the loss on the response tokens only.

`--remat save_dots` sets the model's `remat` option (model.remat in a config):
the layers' projection outputs are kept for the backward pass; the elementwise
work and the attention products are recomputed there. `--projection-backward
cpu_transposed` sets the model's `projection_backward` option (a weight-gradient
layout that is faster on XLA:CPU, see jalign.models.projection). `--host_devices 2`
splits the CPU into two JAX devices and shards the batch over a `data` mesh axis,
as `python -m jalign.train` does with config.mesh.data = 2 (one CPU device already
runs independent ops on a second thread, so on 2 cores this gains little here).

Reported (median step time over `--steps` steps after compilation):
  tokens_per_s           -- all chosen + rejected tokens (2B x T) per second;
  response_tokens_per_s  -- only the scored response tokens (2B x response) per second;
  step_cpu_s             -- median CPU seconds of this process per step (all threads):
                            steadier than wall time when other jobs share the cores.
The peer measurement for TRL's DPOTrainer is benchmarks/trl_dpo_peer.py, which
counts tokens the same way. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import jax
import numpy as np
import optax

from jalign import sharding as shd
from jalign.losses import dpo_loss
from jalign.models import decoder_init_fn
from jalign.models.config import PRESETS, PROJECTION_BACKWARDS, ModelConfig
from jalign.state import init_train_state
from jalign.steps import decoder_logprob_fn
from jalign.steps.preference import make_dpo_step, reference_logps_fn
from _machine import cpu_snapshot, others_busy  # benchmarks/ is on sys.path when run as a script


def synthetic_batch(cfg: ModelConfig, pairs: int, prompt: int, response: int, seed: int = 0):
    """A padded preference batch of random tokens: 2 * pairs rows of prompt + response."""
    rng = np.random.default_rng(seed)
    rows, t = 2 * pairs, prompt + response
    tokens = rng.integers(0, cfg.vocab_size, (rows, t)).astype(np.int32)
    # Chosen and rejected of one pair share the prompt, as in real preference data.
    tokens[1::2, :prompt] = tokens[0::2, :prompt]
    loss_mask = np.zeros((rows, t), np.int32)
    loss_mask[:, prompt:] = 1
    return {
        "tokens": tokens,
        "loss_mask": loss_mask,
        "segment_ids": np.ones((rows, t), np.int32),
        "positions": np.tile(np.arange(t, dtype=np.int32), (rows, 1)),
        "sequence_index": np.tile(np.arange(rows, dtype=np.int32)[:, None], (1, t)),
        "pair_mask": np.ones((pairs,), np.float32),
        "example_index": np.arange(pairs, dtype=np.int32),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="bench", choices=sorted(PRESETS))
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--logprob-impl", default="auto", choices=["auto", "xla", "chunked"])
    parser.add_argument("--remat", default="none", choices=["none", "full", "save_dots"],
                        help="the model's remat option (recompute in the backward pass)")
    parser.add_argument("--projection-backward", default="autodiff", choices=PROJECTION_BACKWARDS,
                        help="the model's projection_backward option (cpu_transposed: a "
                             "weight-gradient layout that is faster on XLA:CPU)")
    parser.add_argument("--host_devices", type=int, default=1,
                        help="JAX CPU devices; > 1 shards the batch over a data mesh axis")
    parser.add_argument("--reference", default="params", choices=["params", "precomputed"],
                        help="params: frozen reference forward every step (TRL's default); "
                             "precomputed: reference log-probs stored with the data")
    args = parser.parse_args()

    load_start = os.getloadavg()[0]  # the machine may be shared: note its load
    if args.host_devices > 1:  # before JAX starts its CPU backend
        jax.config.update("jax_num_cpu_devices", args.host_devices)
    cfg = ModelConfig(**PRESETS[args.preset], remat=args.remat,
                      projection_backward=args.projection_backward)
    mesh = shd.make_mesh({"data": -1} if args.host_devices > 1 else {"fsdp": -1})
    opt = optax.adamw(args.learning_rate)
    precomputed = args.reference == "precomputed"
    state, shardings = init_train_state(decoder_init_fn(cfg), opt, mesh, shd.DEFAULT_RULES,
                                        seed=0, with_reference=not precomputed)
    batch_sharding = shd.data_sharding(mesh, shd.DEFAULT_RULES)
    logprob_fn = decoder_logprob_fn(cfg, logprob_impl=args.logprob_impl)
    step_fn = make_dpo_step(logprob_fn, opt, loss_fn=functools.partial(dpo_loss, beta=args.beta),
                            reference=args.reference)
    step = jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=(0,))
    host_batch = synthetic_batch(cfg, args.pairs, args.prompt, args.response)
    if precomputed:  # what the precompute pass would have stored next to the data
        ref = jax.jit(reference_logps_fn(logprob_fn))(state.params, host_batch)
        host_batch.update({k: np.asarray(v) for k, v in ref.items()})
    batch = jax.device_put(host_batch, batch_sharding)

    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)  # compile + first step
        jax.block_until_ready((state, metrics))
        compile_s = time.perf_counter() - t0
        times, cpu_times = [], []
        cpu0, w0 = cpu_snapshot(), time.perf_counter()
        for _ in range(args.steps):
            t0, c0 = time.perf_counter(), time.process_time()
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        others = others_busy(cpu0, cpu_snapshot(), time.perf_counter() - w0)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(metrics["loss"]):
        raise FloatingPointError(f"non-finite DPO loss: {metrics}")

    step_time = statistics.median(times)
    rows, t = 2 * args.pairs, args.prompt + args.response
    result = {
        "benchmark": "dpo_step_jalign", "preset": args.preset, "pairs": args.pairs,
        "sequences": rows, "seq_len": t, "prompt_len": args.prompt,
        "response_len": args.response, "dtype": cfg.dtype, "loss": "sigmoid", "beta": args.beta,
        "reference_forward": not precomputed, "reference": args.reference, "logprob_impl": args.logprob_impl,
        "remat": args.remat, "projection_backward": args.projection_backward,
        "mesh": dict(mesh.shape),
        "step_time_s": step_time, "step_time_min_s": min(times), "step_times_s": times,
        "step_cpu_s": statistics.median(cpu_times),
        "tokens_per_s": rows * t / step_time,
        "response_tokens_per_s": rows * args.response / step_time,
        "compile_and_first_step_s": compile_s, "final_loss": metrics["loss"],
        "other_processes_cores_busy": others,
        "loadavg_1m_start": load_start, "loadavg_1m_end": os.getloadavg()[0],
        "jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
        "threads": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    print(f"jalign DPO step {args.preset} (remat {args.remat}, projection_backward "
          f"{args.projection_backward}, {jax.device_count()} device(s)): "
          f"{args.pairs} pairs x {t} tokens "
          f"({args.prompt} prompt + {args.response} response): "
          f"median {step_time * 1e3:.1f} ms/step "
          f"= {result['tokens_per_s']:,.0f} tokens/s (chosen+rejected, all tokens), "
          f"{result['response_tokens_per_s']:,.0f} response tokens/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
