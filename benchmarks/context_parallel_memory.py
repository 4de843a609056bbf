"""Per-device compiled temporaries of an SFT step on one long row: 1 device vs the row's
tokens split over a "sequence" mesh axis (context parallelism).

    python benchmarks/context_parallel_memory.py [--seq 4096] [--shards 4] [--impls xla,chunked]

One row of T tokens cannot be split over "data" or "fsdp"; over "sequence" each of
N simulated CPU devices holds T / N of its activations and gathers one layer's K/V
at a time. The figure is the compiled step's `memory_analysis().temp_size_in_bytes`
(per device), compiled only: simulated devices share one CPU, so their step time
says nothing about chips. Model as benchmarks/attention_memory.py. Ends with one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--seq", type=int, default=4096)
parser.add_argument("--shards", type=int, default=4)
parser.add_argument("--impls", default="xla,chunked")
args = parser.parse_args()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={args.shards}")

import dataclasses  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from jalign import sharding as shd  # noqa: E402
from jalign.models import decoder_init_fn  # noqa: E402
from jalign.models.config import ModelConfig  # noqa: E402
from jalign.state import init_train_state  # noqa: E402
from jalign.steps import decoder_logprob_fn  # noqa: E402
from jalign.steps.sft import make_sft_step  # noqa: E402

MODEL = ModelConfig(vocab_size=4096, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=64, intermediate_size=344, max_position_embeddings=8192)


def temporaries_mib(model_cfg, mesh_shape, devices, t):
    mesh = shd.make_mesh(mesh_shape, devices)
    opt = optax.adamw(1e-4)
    state, shardings = init_train_state(decoder_init_fn(model_cfg), opt, mesh, shd.DEFAULT_RULES,
                                        seed=0)
    rows = shd.data_sharding(mesh, shd.DEFAULT_RULES)
    batch = {"tokens": np.zeros((1, t), np.int32), "loss_mask": np.ones((1, t), np.int32),
             "segment_ids": np.ones((1, t), np.int32),
             "positions": np.arange(t, dtype=np.int32)[None]}
    step = jax.jit(make_sft_step(decoder_logprob_fn(model_cfg), opt),
                   in_shardings=(shardings, rows), out_shardings=(shardings, shd.replicated(mesh)),
                   donate_argnums=(0,))
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
        compiled = step.lower(state, jax.device_put(batch, rows)).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def main():
    out = {"seq": args.seq, "shards": args.shards}
    for impl in args.impls.split(","):
        cfg = dataclasses.replace(MODEL, attention_impl=impl)
        one = temporaries_mib(cfg, {"fsdp": 1}, jax.devices()[:1], args.seq)
        split = temporaries_mib(cfg, {"sequence": args.shards}, jax.devices()[:args.shards],
                                args.seq)
        out[impl] = {"one_device_mib": round(one, 1), "sequence_mib": round(split, 1),
                     "ratio": round(one / split, 2)}
        print(f"{impl:8s} T={args.seq}: 1 device {one:8.1f} MiB temporaries; sequence="
              f"{args.shards}: {split:8.1f} MiB per device ({one / split:.2f}x smaller)",
              flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
