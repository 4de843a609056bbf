"""What TRL's DPO token statistics cost in the fused log-prob op: forward+backward of the
policy's log-prob sum alone, then with entropy, arg-max and mean logit read as metrics
(what `make_dpo_step` does with `decoder_logprob_fn(..., with_stats=True)`).

    PYTHONPATH=. python benchmarks/dpo_metrics_cost.py                      # N=1024 H=256 V=32k
    PYTHONPATH=. python benchmarks/dpo_metrics_cost.py --vocab 131072 --runs 9

The two programs run alternately, so load from other processes hits both alike; times
are medians of `--runs` calls after one warm-up call, wall and this process's CPU
seconds (the steadier figure on a shared machine). The XLA cost analysis (flops, bytes
accessed) does not depend on load. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from jalign.ops import token_logprobs


def make_losses(targets_N, impl: str):
    def plain(hidden_NxH, unembed_HxV):
        return token_logprobs(hidden_NxH, unembed_HxV, targets_N, impl=impl).sum(), 0.0

    def with_stats(hidden_NxH, unembed_HxV):
        out = token_logprobs(hidden_NxH, unembed_HxV, targets_N, impl=impl, return_lse=True,
                             return_entropy=True, return_max_logit=True, return_mean_logit=True)
        is_argmax_N = out.logps >= out.max_logit - out.lse - 1e-5
        metrics = jax.lax.stop_gradient(out.entropy.mean() + is_argmax_N.mean()
                                        + out.mean_logit.mean())
        return out.logps.sum(), metrics

    return {name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))
            for name, fn in (("logps only", plain), ("+ DPO statistics", with_stats))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--impl", default="chunked")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    k_h, k_w, k_t = jax.random.split(jax.random.PRNGKey(0), 3)
    hidden = jax.random.normal(k_h, (args.tokens, args.hidden)) * 0.5
    unembed = jax.random.normal(k_w, (args.hidden, args.vocab)) * 0.05
    targets = jax.random.randint(k_t, (args.tokens,), 0, args.vocab)
    fns = make_losses(targets, args.impl)
    times = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    cost = {}
    for name, fn in fns.items():
        analysis = fn.lower(hidden, unembed).compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        cost[name] = {"flops": analysis.get("flops"), "bytes": analysis.get("bytes accessed")}
        jax.block_until_ready(fn(hidden, unembed))
    for _ in range(args.runs):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(hidden, unembed))
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    print(f"N={args.tokens} H={args.hidden} V={args.vocab} impl={args.impl} "
          f"({jax.default_backend()}, {args.runs} alternating runs)")
    print(f"{'':18}{'median ms':>12}{'min ms':>10}{'CPU ms':>10}{'GFLOP':>10}{'GB accessed':>13}")
    result = {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
              "impl": args.impl, "backend": jax.default_backend()}
    for name, ts in times.items():
        median, low = statistics.median(ts) * 1e3, min(ts) * 1e3
        cpu_ms = statistics.median(cpu[name]) * 1e3
        flops, nbytes = cost[name]["flops"] or 0.0, cost[name]["bytes"] or 0.0
        print(f"{name:18}{median:12.1f}{low:10.1f}{cpu_ms:10.1f}{flops / 1e9:10.3f}"
              f"{nbytes / 1e9:13.3f}")
        result[name] = {"median_ms": median, "min_ms": low, "cpu_ms": cpu_ms, "flops": flops,
                        "bytes": nbytes}
    base, stats = result["logps only"], result["+ DPO statistics"]
    result["overhead_median"] = stats["median_ms"] / base["median_ms"] - 1.0
    result["overhead_cpu"] = stats["cpu_ms"] / base["cpu_ms"] - 1.0
    print(f"overhead: {100 * result['overhead_median']:+.1f}% median time, "
          f"{100 * result['overhead_cpu']:+.1f}% CPU time, "
          f"{100 * (stats['flops'] / max(base['flops'], 1.0) - 1):+.2f}% flops")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
