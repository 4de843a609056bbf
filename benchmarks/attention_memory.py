"""Compiled temporaries and step time of SFT and DPO train steps: attention "xla" vs "chunked".

    JAX_PLATFORMS=cpu python benchmarks/attention_memory.py [--seq 4096] [--steps 3]
        [--impls xla,chunked] [--block-q 512 --block-kv 512]

A small-width decoder (so T = 4096 runs on a laptop CPU) at one sequence of T
tokens per SFT batch and one pair (two rows of T) per DPO batch, with a frozen
reference. Steps come from the library's factories (make_sft_step,
make_dpo_step over decoder_logprob_fn), jitted with donation as the loop does.
Temporaries are the compiled step's `memory_analysis().temp_size_in_bytes`;
step time is the median over `--steps` timed steps after a warm-up, the impls
interleaved step by step so that load from other processes hits both alike
(the average number of cores other processes kept busy is printed too).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from _machine import cpu_snapshot, others_busy  # benchmarks/ is on sys.path when run as a script
from jalign import losses
from jalign import sharding as shd
from jalign.models import decoder_init_fn
from jalign.models.config import ModelConfig
from jalign.state import init_train_state
from jalign.steps import decoder_logprob_fn
from jalign.steps.preference import make_dpo_step
from jalign.steps.sft import make_sft_step

MODEL = ModelConfig(vocab_size=4096, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=64, intermediate_size=344, max_position_embeddings=8192)


def _rows(n, t, rng):
    return {"tokens": rng.integers(0, MODEL.vocab_size, (n, t)).astype(np.int32),
            "loss_mask": np.ones((n, t), np.int32), "segment_ids": np.ones((n, t), np.int32),
            "positions": np.tile(np.arange(t, dtype=np.int32), (n, 1))}


def _batch(algo, t):
    rng = np.random.default_rng(0)
    if algo == "sft":
        return _rows(1, t, rng)
    rows = _rows(2, t, rng)  # one pair: chosen, rejected
    rows["loss_mask"][:, : t // 2] = 0
    rows["sequence_index"] = np.stack([np.zeros(t, np.int32), np.ones(t, np.int32)])
    return rows | {"pair_mask": np.ones(1, np.float32), "example_index": np.zeros(1, np.int32)}


def _compiled_step(algo, cfg, t):
    mesh = shd.make_mesh({"fsdp": 1}, jax.devices()[:1])
    opt = optax.adamw(1e-4)
    state, shardings = init_train_state(decoder_init_fn(cfg), opt, mesh, shd.DEFAULT_RULES,
                                        seed=0, with_reference=algo == "dpo")
    if algo == "sft":
        step = make_sft_step(decoder_logprob_fn(cfg, with_stats=True), opt)
    else:
        step = make_dpo_step(decoder_logprob_fn(cfg), opt,
                             loss_fn=functools.partial(losses.dpo_loss, beta=0.1))
    batch = jax.device_put(_batch(algo, t))
    fn = jax.jit(step, donate_argnums=(0,))
    with jax.set_mesh(mesh):
        compiled = fn.lower(state, batch).compile()
    return compiled, state, batch, mesh


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--algos", default="sft,dpo")
    parser.add_argument("--impls", default="xla,chunked")
    parser.add_argument("--block-q", type=int, default=None)
    parser.add_argument("--block-kv", type=int, default=None)
    args = parser.parse_args()
    impls = args.impls.split(",")
    results = []
    for algo in args.algos.split(","):
        runs = {}
        for impl in impls:
            cfg = dataclasses.replace(MODEL, attention_impl=impl, attention_block_q=args.block_q,
                                      attention_block_kv=args.block_kv)
            compiled, state, batch, mesh = _compiled_step(algo, cfg, args.seq)
            runs[impl] = dict(compiled=compiled, state=state, batch=batch, mesh=mesh, times=[],
                              temp=compiled.memory_analysis().temp_size_in_bytes)
        start, t0 = cpu_snapshot(), time.perf_counter()
        for i in range(args.steps + 1):  # the first round warms up
            for impl in impls:
                r = runs[impl]
                with jax.set_mesh(r["mesh"]):
                    t_start = time.perf_counter()
                    r["state"], metrics = r["compiled"](r["state"], r["batch"])
                    jax.block_until_ready(metrics)
                    if i:
                        r["times"].append(time.perf_counter() - t_start)
                r["loss"] = float(metrics["loss"])
        busy = others_busy(start, cpu_snapshot(), time.perf_counter() - t0)
        base = runs[impls[0]]
        for impl in impls:
            r = runs[impl]
            row = {"algo": algo, "impl": impl, "seq": args.seq, "temp_bytes": int(r["temp"]),
                   "step_s": statistics.median(r["times"]), "times_s": r["times"],
                   "loss": r["loss"], "others_busy_cores": busy,
                   "block_q": args.block_q, "block_kv": args.block_kv}
            row["temp_vs_first"] = base["temp"] / r["temp"]
            row["time_vs_first"] = row["step_s"] / statistics.median(base["times"])
            results.append(row)
            print(f"{algo:4s} T={args.seq} {impl:8s} temporaries {r['temp'] / 2**20:9.1f} MiB "
                  f"({row['temp_vs_first']:.2f}x smaller than {impls[0]})  step "
                  f"{row['step_s']:.3f} s ({row['time_vs_first']:.3f}x)  loss {r['loss']:.5f}  "
                  f"[others busy: {busy if busy is None else round(busy, 2)} cores]", flush=True)
    print(json.dumps({"benchmark": "attention_memory", "model": MODEL.to_dict(),
                      "backend": jax.default_backend(), "results": results}))


if __name__ == "__main__":
    main()
