"""Compiled temporaries and time of the fused divergence's value + gradients: "xla" vs "chunked".

    JAX_PLATFORMS=cpu python benchmarks/divergence_memory.py [--tokens 4096] [--vocab 32768]
        [--hidden-student 256] [--hidden-teacher 512] [--beta 0.5] [--steps 3]
        [--impls xla,chunked] [--block-tokens N --block-vocab N] [--no-time] [--frozen-teacher]

value_and_grad of sum(token_divergence(...)) w.r.t. all four inputs (the
heaviest case), or with --frozen-teacher w.r.t. the student's two under a
stop_gradient teacher (what the distillation step differentiates); float32,
temperature 0.8. Temporaries are `jit(...).lower(...).compile().memory_analysis()
.temp_size_in_bytes`; time is the median of `--steps` timed calls after a
warm-up, the impls interleaved so that load from other processes hits both alike
(the average number of cores other processes kept busy is printed too). Ends
with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from _machine import cpu_snapshot, others_busy  # benchmarks/ is on sys.path when run as a script
from jalign.ops import BlockSizes, token_divergence


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden-student", type=int, default=256)
    parser.add_argument("--hidden-teacher", type=int, default=512)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--impls", default="xla,chunked")
    parser.add_argument("--block-tokens", type=int, default=None)
    parser.add_argument("--block-vocab", type=int, default=None)
    parser.add_argument("--no-time", action="store_true", help="memory only, no timed calls")
    parser.add_argument("--frozen-teacher", action="store_true",
                        help="stop_gradient teacher; gradients w.r.t. the student only")
    args = parser.parse_args()

    n, v, hs, ht = args.tokens, args.vocab, args.hidden_student, args.hidden_teacher
    keys = jax.random.split(jax.random.key(0), 4)
    inputs = (jax.random.normal(keys[0], (n, hs)), jax.random.normal(keys[1], (hs, v)) / hs ** 0.5,
              jax.random.normal(keys[2], (n, ht)), jax.random.normal(keys[3], (ht, v)) / ht ** 0.5)
    blocks = None
    if args.block_tokens or args.block_vocab:
        default = BlockSizes.get_default(impl="chunked")
        blocks = BlockSizes(args.block_tokens or default.block_tokens,
                            args.block_vocab or default.block_vocab)

    compiled, result = {}, {}
    for impl in args.impls.split(","):
        def loss(hs, ws, ht, wt, impl=impl):
            if args.frozen_teacher:
                ht, wt = jax.lax.stop_gradient((ht, wt))
            return jnp.sum(token_divergence(hs, ws, ht, wt, beta=args.beta, temperature=0.8,
                                            impl=impl, block_sizes=blocks))
        start = time.perf_counter()
        argnums = (0, 1) if args.frozen_teacher else (0, 1, 2, 3)
        compiled[impl] = jax.jit(jax.value_and_grad(loss, argnums=argnums)).lower(
            *inputs).compile()
        mem = compiled[impl].memory_analysis()
        result[impl] = dict(temp_bytes=int(mem.temp_size_in_bytes),
                            compile_s=round(time.perf_counter() - start, 1))
        print(f"{impl:8s} temporaries {mem.temp_size_in_bytes / 2**20:9.1f} MiB  "
              f"(compile {result[impl]['compile_s']} s)", flush=True)

    if not args.no_time:
        for fn in compiled.values():  # warm-up
            jax.block_until_ready(fn(*inputs))
        times = {impl: [] for impl in compiled}
        snap, wall = cpu_snapshot(), time.perf_counter()
        for _ in range(args.steps):
            for impl, fn in compiled.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(*inputs))
                times[impl].append(time.perf_counter() - start)
        busy = others_busy(snap, cpu_snapshot(), time.perf_counter() - wall)
        for impl in compiled:
            result[impl]["median_s"] = round(statistics.median(times[impl]), 3)
            print(f"{impl:8s} value+grad median {result[impl]['median_s']} s "
                  f"over {args.steps}", flush=True)
        result["others_busy_cores"] = None if busy is None else round(busy, 2)
    if "xla" in result and "chunked" in result:
        result["temp_ratio_xla_over_chunked"] = round(
            result["xla"]["temp_bytes"] / max(1, result["chunked"]["temp_bytes"]), 1)
        print(f"ratio xla / chunked temporaries: {result['temp_ratio_xla_over_chunked']}x")
    print(json.dumps(dict(tokens=n, vocab=v, hidden_student=hs, hidden_teacher=ht,
                          beta=args.beta, frozen_teacher=args.frozen_teacher,
                          cpu=_cpu_model(), cores=os.cpu_count(),
                          backend=jax.default_backend(), **result)))


if __name__ == "__main__":
    main()
