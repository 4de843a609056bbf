"""GPU check and timing of `token_logprobs`: pallas_gpu vs chunked vs xla (H100 target).

    PYTHONPATH=. python benchmarks/logprobs_gpu.py       # N=16384 H=4096 V=131072 bf16
    PYTHONPATH=. python benchmarks/logprobs_gpu.py --runs 10 --block_tokens 64 --block_vocab 128

1. Correctness: pallas_gpu against xla on a small problem (bf16, and float32 at
   "highest" matmul precision): outputs and the VJP for random cotangents.
2. Speed: forward+backward (value_and_grad over hidden and unembedding) of
   -sum(logps), median of `--runs` calls after a warm-up, for each impl. TFLOP/s
   count 8NHV per step for every impl (2NHV forward + 6NHV for a backward that
   recomputes the logits, as chunked and pallas_gpu do; xla keeps its logits and
   executes 6NHV) and are compared with this script's measured bf16 matmul rate
   (jnp.dot at [tokens, hidden] x [hidden, 16384], float32 accumulation).
On a machine without a GPU it prints why and exits with status 0. The last
line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jalign.ops import token_logprobs


def gpu_devices():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def loss_and_grad(impl: str, block_tokens, block_vocab):
    def loss(hidden_NxH, unembed_HxV, targets_N):
        return -jnp.sum(token_logprobs(hidden_NxH, unembed_HxV, targets_N, impl=impl,
                                       block_tokens=block_tokens, block_vocab=block_vocab))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def make_inputs(tokens, hidden, vocab, dtype, seed=0):
    k_h, k_w, k_t = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k_h, (tokens, hidden), dtype),
            (jax.random.normal(k_w, (hidden, vocab)) / np.sqrt(hidden)).astype(dtype),
            jax.random.randint(k_t, (tokens,), 0, vocab))


def max_errors(dtype, args) -> dict:
    """Largest |pallas_gpu - xla| over outputs and (scaled) gradients."""
    hidden, unembed, targets = make_inputs(1000, 512, 10000, dtype, seed=1)
    targets = targets.at[::7].set(-100)
    kw = dict(return_lse=True, return_entropy=True, return_max_logit=True, logit_softcap=30.0)
    cot = None
    results = {}
    with jax.default_matmul_precision("highest"):
        for impl in ("xla", "pallas_gpu"):
            fn = lambda h, w, impl=impl: token_logprobs(
                h, w, targets, impl=impl, block_tokens=args.block_tokens,
                block_vocab=args.block_vocab, **kw)
            out, vjp_fn = jax.vjp(fn, hidden, unembed)
            if cot is None:
                leaves, treedef = jax.tree.flatten(out)
                keys = jax.random.split(jax.random.key(2), len(leaves))
                cot = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                                   for k, x in zip(keys, leaves)])
            results[impl] = (out, vjp_fn(cot))
    (out_x, grads_x), (out_p, grads_p) = results["xla"], results["pallas_gpu"]
    errors = {name: float(jnp.max(jnp.abs(getattr(out_p, name) - getattr(out_x, name))))
              for name in ("logps", "lse", "entropy", "max_logit")}
    for name, g_p, g_x in zip(("d_hidden", "d_unembed"), grads_p, grads_x):
        g_p, g_x = g_p.astype(jnp.float32), g_x.astype(jnp.float32)
        errors[name] = float(jnp.max(jnp.abs(g_p - g_x)) / (jnp.max(jnp.abs(g_x)) + 1e-30))
    return errors


def median_seconds(fn, inputs, runs) -> float:
    jax.block_until_ready(fn(*inputs))  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_tflops(tokens, hidden, runs) -> float:
    cols = 16384
    a = jnp.ones((tokens, hidden), jnp.bfloat16)
    b = jnp.ones((hidden, cols), jnp.bfloat16)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    return 2 * tokens * hidden * cols / median_seconds(dot, (a, b), runs) / 1e12


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--impls", nargs="+", default=["pallas_gpu", "chunked", "xla"])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--block_tokens", type=int, default=None)
    parser.add_argument("--block_vocab", type=int, default=None)
    args = parser.parse_args()

    devices = gpu_devices()
    if not devices:
        print(f"no GPU visible to JAX (backend={jax.default_backend()}): nothing to measure; "
              "run this on a CUDA machine with jax[cuda12] installed.")
        print(json.dumps(dict(benchmark="token_logprobs_gpu", skipped="no GPU")))
        return 0

    report = dict(benchmark="token_logprobs_gpu", device=devices[0].device_kind,
                  tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype,
                  block_tokens=args.block_tokens, block_vocab=args.block_vocab)
    report["max_error_vs_xla"] = {dt: max_errors(jnp.dtype(dt), args)
                                  for dt in ("bfloat16", "float32")}
    print(f"device={report['device']}  pallas_gpu vs xla (max abs error; grads relative):")
    for dt, errors in report["max_error_vs_xla"].items():
        print(f"  {dt:>9}: " + "  ".join(f"{k}={v:.2e}" for k, v in errors.items()))

    peak = matmul_tflops(args.tokens, args.hidden, args.runs)
    report["bf16_matmul_tflops"] = round(peak, 1)
    flops = 8 * args.tokens * args.hidden * args.vocab
    inputs = make_inputs(args.tokens, args.hidden, args.vocab, jnp.dtype(args.dtype))
    print(f"tokens={args.tokens} hidden={args.hidden} vocab={args.vocab} {args.dtype}; "
          f"bf16 matmul {peak:.0f} TFLOP/s; step FLOPs 8NHV = {flops / 1e12:.1f} T")
    print(f"{'impl':>10} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'of matmul':>9} {'temp GiB':>9}")
    report["results"] = []
    for impl in args.impls:
        row = dict(impl=impl)
        try:
            compiled = loss_and_grad(impl, args.block_tokens, args.block_vocab).lower(
                *inputs).compile()
            row["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
            seconds = median_seconds(compiled, inputs, args.runs)
        except Exception as e:  # noqa: BLE001 - e.g. xla's [N, V] logits not fitting
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"{impl:>10} failed: {row['error']}")
            report["results"].append(row)
            continue
        tflops = flops / seconds / 1e12
        row.update(seconds=round(seconds, 5), tflops=round(tflops, 1),
                   fraction_of_matmul=round(tflops / peak, 3))
        print(f"{impl:>10} {seconds * 1e3:>11.2f} {tflops:>8.1f} {tflops / peak:>9.1%} "
              f"{row['temp_bytes'] / 2**30:>9.2f}")
        report["results"].append(row)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
