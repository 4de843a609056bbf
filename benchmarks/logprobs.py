"""Forward+backward time and peak temporary memory of `token_logprobs`: xla vs chunked.

    PYTHONPATH=. python benchmarks/logprobs.py                       # tokens=8192 hidden=1024, V=32k and 128k
    PYTHONPATH=. python benchmarks/logprobs.py --vocab 32768 --runs 3
    PYTHONPATH=. python benchmarks/logprobs.py --block_tokens 512 --block_vocab 8192

Times are the median of `--runs` calls after one warm-up call. Temporary memory
is `compiled.memory_analysis().temp_size_in_bytes` (excludes inputs/outputs).
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    parser.add_argument("--impls", nargs="+", default=["xla", "chunked"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--block_tokens", type=int, default=None)
    parser.add_argument("--block_vocab", type=int, default=None)
    parser.add_argument("--max_temp_gb", type=float, default=10.0,
                        help="compile only (do not run) when temporaries exceed this")
    args = parser.parse_args()

    results = []
    print(f"backend={jax.default_backend()} tokens={args.tokens} hidden={args.hidden} "
          f"dtype=float32 runs={args.runs}")
    print(f"{'vocab':>8} {'impl':>8} {'fwd+bwd s':>10} {'temp MiB':>10}")
    for vocab in args.vocab:
        keys = jax.random.split(jax.random.key(0), 3)
        hidden_NxH = jax.random.normal(keys[0], (args.tokens, args.hidden), jnp.float32)
        unembed_HxV = 0.02 * jax.random.normal(keys[1], (args.hidden, vocab), jnp.float32)
        targets_N = jax.random.randint(keys[2], (args.tokens,), 0, vocab)
        weights_N = jnp.ones((args.tokens,), jnp.float32)
        inputs = (hidden_NxH, unembed_HxV, targets_N, weights_N)
        compiled, temp_bytes = {}, {}
        for impl in args.impls:
            fn, temp_bytes[impl] = compile_one(impl, inputs, args.block_tokens,
                                               args.block_vocab)
            if temp_bytes[impl] > args.max_temp_gb * 2**30:
                print(f"{vocab:>8} {impl:>8} {'skipped':>10} "
                      f"{temp_bytes[impl] / 2**20:>10.1f}  (temporaries > "
                      f"--max_temp_gb={args.max_temp_gb}: compiled, not run)")
                results.append(dict(vocab=vocab, impl=impl, seconds=None,
                                    temp_bytes=int(temp_bytes[impl]), skipped=True))
            else:
                compiled[impl] = fn
        seconds = time_interleaved(compiled, inputs, args.runs)
        for impl, sec in seconds.items():
            print(f"{vocab:>8} {impl:>8} {sec:>10.3f} {temp_bytes[impl] / 2**20:>10.1f}")
            results.append(dict(vocab=vocab, impl=impl, seconds=round(sec, 4),
                                temp_bytes=int(temp_bytes[impl])))
        del compiled
        del inputs, hidden_NxH, unembed_HxV
    print(json.dumps(dict(benchmark="token_logprobs", backend=jax.default_backend(),
                          tokens=args.tokens, hidden=args.hidden,
                          block_tokens=args.block_tokens, block_vocab=args.block_vocab,
                          results=results)))


if __name__ == "__main__":
    main()
