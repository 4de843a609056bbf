"""Long-context sampling: dense cached attention ("xla") vs. blocked decode, one run.

    PYTHONPATH=. python benchmarks/sampler_long.py [--batch 4] [--prompt 2048] [--new 2048]

The same model (the `tiny` preset's shape unless --preset) and prompts under two
`model.attention_impl`s: "xla", the dense path (prefill scores over all P + N cache
slots; every decode step a float32 [B, heads, 1, P + N] pass over the whole cache,
empty tail included), and "chunked" (prefill through the chunked kernel over the
prompt; each decode step reads the filled key blocks only, online softmax). Greedy,
`eos_id=-1` so every call generates exactly --new tokens. Tokens/s = B x new / the
median wall time of a whole `generate` call (prefill included, compile excluded), the
two variants interleaved call by call; CPU seconds of this process beside it (other
processes share the machine). Memory: XLA's compiled plan of each `generate`
(temporaries, and arguments + outputs). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jalign.generate import generate
from jalign.models.config import PRESETS, ModelConfig
from jalign.models.transformer import Decoder
from _machine import cpu_snapshot, others_busy  # benchmarks/ is on sys.path when run as a script

IMPLS = ("xla", "chunked")


def lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"cpu": fields.get("Model name", "").strip(), "avx512f": "avx512f" in flags,
            "cpus": fields.get("CPU(s)", "").strip()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    base = ModelConfig(**PRESETS[args.preset])
    params = nn.meta.unbox(Decoder(base).init(jax.random.PRNGKey(0),
                                              jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    prompt = rng.integers(4, base.vocab_size, (args.batch, args.prompt)).astype(np.int32)
    mask = np.ones_like(prompt)
    mask[1::2, : args.prompt // 4] = 0  # half the rows left-padded by a quarter
    kwargs = dict(max_new_tokens=args.new, eos_id=-1, pad_id=0, greedy=True)
    configs = {impl: dataclasses.replace(base, attention_impl=impl) for impl in IMPLS}
    calls = {impl: (lambda c=c: generate(params, c, prompt, mask, jax.random.PRNGKey(0),
                                         **kwargs)) for impl, c in configs.items()}

    memory, outputs = {}, {}
    for impl, c in configs.items():
        compiled = generate.lower(params, c, prompt, mask, jax.random.PRNGKey(0),
                                  **kwargs).compile()
        m = compiled.memory_analysis()
        memory[impl] = {"temp_bytes": int(m.temp_size_in_bytes),
                        "argument_plus_output_bytes": int(m.argument_size_in_bytes
                                                          + m.output_size_in_bytes)}
        outputs[impl] = jax.block_until_ready(calls[impl]())  # warm-up
    same_tokens = bool(np.array_equal(outputs["xla"].tokens, outputs["chunked"].tokens))
    max_logp_diff = float(np.abs(np.asarray(outputs["xla"].logps)
                                 - np.asarray(outputs["chunked"].logps)).max())

    wall, cpu = {i: [] for i in IMPLS}, {i: [] for i in IMPLS}
    snap, w0 = cpu_snapshot(), time.perf_counter()
    for _ in range(args.repeats):
        for impl in IMPLS:
            c0, t0 = sum(os.times()[:2]), time.perf_counter()
            jax.block_until_ready(calls[impl]())
            wall[impl].append(time.perf_counter() - t0)
            cpu[impl].append(sum(os.times()[:2]) - c0)
    others = others_busy(snap, cpu_snapshot(), time.perf_counter() - w0)

    tokens = args.batch * args.new
    result = {"benchmark": "sampler_long", "preset": args.preset, "batch": args.batch,
              "prompt": args.prompt, "new_tokens": args.new, "repeats": args.repeats,
              "same_tokens": same_tokens, "max_abs_logp_diff": max_logp_diff,
              "other_processes_cores_busy": others, "jax": jax.__version__, **lscpu()}
    for impl in IMPLS:
        w, c = statistics.median(wall[impl]), statistics.median(cpu[impl])
        result[impl] = {"tokens_per_s": tokens / w, "seconds": w, "cpu_seconds": c,
                        **memory[impl]}
        print(f"{impl:8s} {tokens / w:10,.0f} tok/s  ({w:.2f} s wall, {c:.2f} s CPU per call)  "
              f"temporaries {memory[impl]['temp_bytes'] / 2**20:8.1f} MiB")
    result["speedup_wall"] = result["xla"]["seconds"] / result["chunked"]["seconds"]
    result["speedup_cpu"] = result["xla"]["cpu_seconds"] / result["chunked"]["cpu_seconds"]
    result["temp_ratio"] = memory["xla"]["temp_bytes"] / max(memory["chunked"]["temp_bytes"], 1)
    print(f"chunked / xla: x{result['speedup_wall']:.2f} wall, x{result['speedup_cpu']:.2f} CPU, "
          f"temporaries {result['temp_ratio']:.1f}x smaller; same tokens: {same_tokens}, "
          f"max |logp diff| {max_logp_diff:.2e}; other processes busy: "
          f"{others if others is None else round(others, 2)} cores")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
