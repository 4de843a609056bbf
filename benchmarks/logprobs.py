"""Forward+backward time and peak temporary memory of `token_logprobs`: xla vs chunked,
plus the TPU ahead-of-time memory plan of xla vs pallas_tpu.

    PYTHONPATH=. python benchmarks/logprobs.py                       # tokens=8192 hidden=1024, V=32k and 128k
    PYTHONPATH=. python benchmarks/logprobs.py --vocab 32768 --runs 3
    PYTHONPATH=. python benchmarks/logprobs.py --block_tokens 512 --block_vocab 8192
    PYTHONPATH=. python benchmarks/logprobs.py --impls --tpu_topology v6e:2x2   # TPU plan only

Times are the median of `--runs` calls after one warm-up call. Temporary memory
is `compiled.memory_analysis().temp_size_in_bytes` (excludes inputs/outputs).
The TPU rows ("AOT") compile the same loss for one chip of `--tpu_topology`
with libtpu's compile-only client (no TPU needed; `pip install libtpu`, see the
`test` extra) in a subprocess, and report the compiler's temporary memory; they
run nothing. `--tpu_topology ""` skips them. The last line printed is one JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from jalign.ops import token_logprobs


def make_loss(impl: str, block_tokens: int | None, block_vocab: int | None):
    def loss(hidden_NxH, unembed_HxV, targets_N, weights_N):
        logps_N = token_logprobs(hidden_NxH, unembed_HxV, targets_N, impl=impl,
                                 block_tokens=block_tokens, block_vocab=block_vocab)
        return -jnp.sum(logps_N * weights_N)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def compile_one(impl, inputs, block_tokens, block_vocab):
    compiled = make_loss(impl, block_tokens, block_vocab).lower(*inputs).compile()
    return compiled, compiled.memory_analysis().temp_size_in_bytes


def tpu_aot_child(args):
    """In the subprocess: compile each (vocab, impl) for one TPU chip; print JSON."""
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = topologies.get_topology_desc(topology_name=args.tpu_topology,
                                           platform="tpu").devices
    on_chip = NamedSharding(Mesh(np.asarray(devices[:1]), ("chip",)), P())
    rows = []
    for vocab in args.vocab:
        shapes = [((args.tokens, args.hidden), args.dtype), ((args.hidden, vocab), args.dtype),
                  ((args.tokens,), "int32"), ((args.tokens,), "float32")]
        inputs = [jax.ShapeDtypeStruct(s, jnp.dtype(d), sharding=on_chip) for s, d in shapes]
        for impl in args.tpu_impls:
            _, temp_bytes = compile_one(impl, inputs, args.block_tokens, args.block_vocab)
            rows.append(dict(vocab=vocab, impl=impl, temp_bytes=int(temp_bytes)))
    print(json.dumps(dict(device_kind=devices[0].device_kind, results=rows)))


def tpu_aot(args):
    """Runs `tpu_aot_child` in a subprocess (libtpu stays out of this process)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--tpu_aot_child", "--tokens",
           str(args.tokens), "--hidden", str(args.hidden), "--dtype", args.dtype,
           "--tpu_topology", args.tpu_topology, "--vocab", *map(str, args.vocab),
           "--tpu_impls", *args.tpu_impls]
    for flag in ("block_tokens", "block_vocab"):
        if getattr(args, flag):
            cmd += [f"--{flag}", str(getattr(args, flag))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return dict(error=f"TPU AOT compile unavailable or failed: {tail[0][:300]}")
    return json.loads(lines[-1])


def time_interleaved(compiled_by_impl, inputs, runs):
    """Median seconds per impl; runs alternate between impls so that load from
    other processes on a shared machine hits them alike."""
    for fn in compiled_by_impl.values():
        jax.block_until_ready(fn(*inputs))  # warm-up
    times = {impl: [] for impl in compiled_by_impl}
    for _ in range(runs):
        for impl, fn in compiled_by_impl.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(ts) for impl, ts in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--impls", nargs="*", default=["xla", "chunked"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tpu_topology", default="v5e:2x2",
                        help='libtpu topology for the AOT rows (one chip is used); "" skips')
    parser.add_argument("--tpu_impls", nargs="+", default=["xla", "pallas_tpu"])
    parser.add_argument("--tpu_aot_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--block_tokens", type=int, default=None)
    parser.add_argument("--block_vocab", type=int, default=None)
    parser.add_argument("--max_temp_gb", type=float, default=10.0,
                        help="compile only (do not run) when temporaries exceed this")
    args = parser.parse_args()
    if args.tpu_aot_child:
        return tpu_aot_child(args)

    results = []
    dtype = jnp.dtype(args.dtype)
    print(f"backend={jax.default_backend()} tokens={args.tokens} hidden={args.hidden} "
          f"dtype={args.dtype} runs={args.runs}")
    print(f"{'vocab':>8} {'impl':>10} {'fwd+bwd s':>10} {'temp MiB':>10}")
    for vocab in args.vocab if args.impls else []:
        keys = jax.random.split(jax.random.key(0), 3)
        hidden_NxH = jax.random.normal(keys[0], (args.tokens, args.hidden), dtype)
        unembed_HxV = (0.02 * jax.random.normal(keys[1], (args.hidden, vocab))).astype(dtype)
        targets_N = jax.random.randint(keys[2], (args.tokens,), 0, vocab)
        weights_N = jnp.ones((args.tokens,), jnp.float32)
        inputs = (hidden_NxH, unembed_HxV, targets_N, weights_N)
        compiled, temp_bytes = {}, {}
        for impl in args.impls:
            fn, temp_bytes[impl] = compile_one(impl, inputs, args.block_tokens,
                                               args.block_vocab)
            if temp_bytes[impl] > args.max_temp_gb * 2**30:
                print(f"{vocab:>8} {impl:>10} {'skipped':>10} "
                      f"{temp_bytes[impl] / 2**20:>10.1f}  (temporaries > "
                      f"--max_temp_gb={args.max_temp_gb}: compiled, not run)")
                results.append(dict(vocab=vocab, impl=impl, seconds=None,
                                    temp_bytes=int(temp_bytes[impl]), skipped=True))
            else:
                compiled[impl] = fn
        seconds = time_interleaved(compiled, inputs, args.runs)
        for impl, sec in seconds.items():
            print(f"{vocab:>8} {impl:>10} {sec:>10.3f} {temp_bytes[impl] / 2**20:>10.1f}")
            results.append(dict(vocab=vocab, impl=impl, seconds=round(sec, 4),
                                temp_bytes=int(temp_bytes[impl])))
        del compiled
        del inputs, hidden_NxH, unembed_HxV
    aot = None
    if args.tpu_topology:
        aot = dict(topology=args.tpu_topology, **tpu_aot(args))
        if "error" in aot:
            print(aot["error"])
        for row in aot.get("results", []):
            print(f"{row['vocab']:>8} {row['impl']:>10} {'AOT':>10} "
                  f"{row['temp_bytes'] / 2**20:>10.1f}  ({aot['device_kind']}, compiled, not run)")
    print(json.dumps(dict(benchmark="token_logprobs", backend=jax.default_backend(),
                          tokens=args.tokens, hidden=args.hidden, dtype=args.dtype,
                          block_tokens=args.block_tokens, block_vocab=args.block_vocab,
                          results=results, tpu_aot=aot)))


if __name__ == "__main__":
    main()
