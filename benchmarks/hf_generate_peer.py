"""Peer for benchmarks/sampler.py: Hugging Face transformers' generate on the same shape.

    pip install torch==2.13.0 transformers      # not jalign dependencies
    python benchmarks/hf_generate_peer.py [--batch 16] [--prompt 64] [--new 128] [--threads 2]
                                          [--cache dynamic|static]

A random LlamaForCausalLM with jalign's "tiny" preset shape (vocab 128, hidden 128, 2 layers,
4 heads, 2 KV heads, intermediate 344, tied embeddings, float32), greedy generate with its KV
cache (use_cache=True; transformers' default DynamicCache, or its StaticCache with
`--cache static`), exactly --new tokens per sequence (no EOS). Median of --repeats calls
after a warm-up call. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from _machine import cpu_snapshot, others_busy  # benchmarks/ is on sys.path when run as a script




def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="dynamic", choices=("dynamic", "static"))
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=344, tie_word_embeddings=True,
                                      max_position_embeddings=2048)
    model = transformers.LlamaForCausalLM(config).eval()
    prompt = torch.randint(4, 128, (args.batch, args.prompt))
    kwargs = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                  use_cache=True, pad_token_id=0, eos_token_id=None)
    if args.cache == "static":
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        out = model.generate(prompt, **kwargs)  # warm-up
        assert out.shape == (args.batch, args.prompt + args.new), out.shape
        times = []
        snap, w0 = cpu_snapshot(), time.perf_counter()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model.generate(prompt, **kwargs)
            times.append(time.perf_counter() - t0)
        end, wall = cpu_snapshot(), time.perf_counter() - w0
    others = others_busy(snap, end, wall)
    step = statistics.median(times)
    result = {"benchmark": "sampler_hf_generate_peer", "batch": args.batch, "prompt": args.prompt,
              "new_tokens": args.new, "tokens_per_s": args.batch * args.new / step,
              "seconds": step, "best_tokens_per_s": args.batch * args.new / min(times),
              "cache": args.cache, "other_processes_cores_busy": others,
              "loadavg_1m": os.getloadavg()[0], "torch": torch.__version__,
              "transformers": transformers.__version__, "threads": args.threads}
    print(f"transformers generate (greedy, {args.cache} KV cache): "
          f"{result['tokens_per_s']:,.0f} tok/s; other processes busy: "
          f"{others if others is None else round(others, 2)} cores")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
