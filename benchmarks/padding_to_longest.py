"""Padding to the batch's longest row (rounded to a multiple) vs power-of-two buckets.

    python benchmarks/padding_to_longest.py [--steps 16] [--batch 8] [--multiple 64]
                                            [--preset tiny] [--max-length 1024]
                                            [--attention-impl xla]

Data: generated chat conversations in ChatML (a system prompt, one to three
earlier turns, one assistant answer), tokenised one token per character (the
built-in tokenizer plus <|im_start|>/<|im_end|>), with a long-tailed length
mix of 50 to 1000 tokens: the shape of real chat SFT / preference data.
The same records, in the same order, go through `make_sft_dataset` (SFT) and
`make_preference_dataset` (DPO) twice: with `bucket_boundaries =
default_bucket_boundaries(max_length)` (64, 128, ..., 1024: the old default)
and with `pad_to_multiple_of` (the new default). The two variants' steps are
interleaved (step i of one, then step i of the other) so a busy machine slows
both alike.

Each distinct row width is one XLA program: it is compiled explicitly
(`jit(...).lower(...).compile()`) the first time a batch needs it, timed
apart from the steps. The attention implementation is pinned (`--attention-impl`,
default xla): `auto` switches to `chunked` at 1024 tokens on CPU, which would mix
a change of kernel into the comparison. Reported per algorithm and padding:
  steps_per_s         -- 1 / median step time, compilation excluded;
  median_step_cpu_s   -- median CPU seconds of this process per step (all threads):
                         steadier than wall time when other jobs share the cores;
  real_tokens_per_s   -- non-padding tokens (segment_ids > 0) / step time, summed;
  padded_fraction     -- padding tokens / all tokens;
  compiles, compile_s -- distinct widths met and the time spent compiling them;
  total_s             -- all steps plus all compilations (what a run this long pays).
Ends with one JSON line.
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
import tokenizers

from jalign import sharding as shd
from jalign.data import (default_bucket_boundaries, make_preference_dataset, make_sft_dataset,
                         records_from_dicts)
from jalign.data.preference import preference_records_from_dicts
from jalign.losses import dpo_loss
from jalign.models import decoder_init_fn
from jalign.models.config import PRESETS, ModelConfig
from jalign.state import init_train_state
from jalign.steps import decoder_logprob_fn
from jalign.steps.preference import make_dpo_step
from jalign.steps.sft import make_sft_step
from jalign.tokenizer import Tokenizer, builtin_tokenizer
from _machine import cpu_snapshot, others_busy  # benchmarks/ is on sys.path when run as a script

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WORDS = ("the a of to and in is that it for on with as was at by an be this from or have not "
         "are but one all were they we when there can what which their more if about would "
         "model data answer question because example result number value people time way "
         "should could first other some these").split()


def chatml_tokenizer() -> Tokenizer:
    backend = tokenizers.Tokenizer.from_str(builtin_tokenizer().backend.to_str())
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return Tokenizer(backend, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
                     chat_template=CHATML)


def _text(rng, n_chars: int) -> str:
    words, length = [], 0
    while length < n_chars:
        words.append(str(rng.choice(WORDS)))
        length += len(words[-1]) + 1
    return (" ".join(words)[:max(n_chars, 1)]).capitalize() + "."


def chat_rows(n: int, seed: int = 0):
    """(prompt messages, chosen text, rejected text) with 50-1000-token conversations:
    a log-normal total length (median ~300 tokens), a tenth to a half of it prompt."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        total = int(np.clip(rng.lognormal(np.log(300), 0.7), 50, 1000))
        prompt_chars = max(20, int(total * rng.uniform(0.1, 0.5)) - 60)
        turns = int(rng.integers(0, 3))
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        for _ in range(turns):
            messages += [{"role": "user", "content": _text(rng, prompt_chars // (2 * turns + 1))},
                         {"role": "assistant", "content": _text(rng, prompt_chars // (2 * turns + 1))}]
        messages.append({"role": "user", "content": _text(rng, prompt_chars // (2 * turns + 1))})
        answer = max(10, total - prompt_chars - 60)
        rows.append((messages, _text(rng, answer),
                     _text(rng, int(answer * rng.uniform(0.3, 1.0)))))
    return rows


def _real_tokens(batch) -> int:
    return int((np.asarray(batch["segment_ids"]) > 0).sum())


def _measure(algo, datasets, step_fns, states, steps):
    """Interleaved steps of every padding variant; per-width explicit compilation."""
    iters = {name: iter(ds) for name, ds in datasets.items()}
    stats = {name: {"times": [], "cpu": [], "real": 0, "all": 0, "compile_s": 0.0,
                    "widths": []} for name in datasets}
    compiled = {name: {} for name in datasets}
    cpu0, wall0 = cpu_snapshot(), time.perf_counter()
    for _ in range(steps):
        for name in datasets:
            batch = next(iters[name])
            s, width = stats[name], batch["tokens"].shape[1]
            if width not in compiled[name]:
                t0 = time.perf_counter()
                compiled[name][width] = step_fns[name].lower(states[name], batch).compile()
                s["compile_s"] += time.perf_counter() - t0
            t0, c0 = time.perf_counter(), time.process_time()
            states[name], metrics = compiled[name][width](states[name], batch)
            jax.block_until_ready(metrics)
            s["times"].append(time.perf_counter() - t0)
            s["cpu"].append(time.process_time() - c0)
            s["real"] += _real_tokens(batch)
            s["all"] += batch["tokens"].size
            s["widths"].append(width)
            if not np.isfinite(float(metrics["loss"])):
                raise FloatingPointError(f"{algo} {name}: non-finite loss")
    others = others_busy(cpu0, cpu_snapshot(), time.perf_counter() - wall0)
    out = {}
    for name, s in stats.items():
        median = statistics.median(s["times"])
        out[name] = {
            "steps_per_s": 1 / median, "median_step_s": median,
            "median_step_cpu_s": statistics.median(s["cpu"]),
            "real_tokens_per_s": s["real"] / sum(s["times"]),
            "padded_fraction": 1 - s["real"] / s["all"],
            "mean_width": float(np.mean(s["widths"])),
            "compiles": len(compiled[name]), "compile_s": s["compile_s"],
            "total_s": sum(s["times"]) + s["compile_s"],
        }
    out["other_processes_cores_busy"] = others
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="SFT rows / DPO pairs per step")
    parser.add_argument("--multiple", type=int, default=64)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--attention-impl", default="xla")
    args = parser.parse_args()

    tokenizer = chatml_tokenizer()
    cfg = ModelConfig(**PRESETS[args.preset], attention_impl=args.attention_impl)
    assert cfg.vocab_size >= tokenizer.vocab_size
    rows = chat_rows(args.steps * args.batch)
    sft_records = records_from_dicts(
        [{"prompt": p, "completion": [{"role": "assistant", "content": c}]} for p, c, _ in rows],
        required_fields=("prompt", "completion"))[0]
    pair_records = preference_records_from_dicts(
        [{"prompt": p, "chosen": [{"role": "assistant", "content": c}],
          "rejected": [{"role": "assistant", "content": r}]} for p, c, r in rows])[0]
    variants = {"pow2_buckets": dict(bucket_boundaries=default_bucket_boundaries(args.max_length)),
                f"longest_multiple_{args.multiple}": dict(pad_to_multiple_of=args.multiple)}
    common = dict(batch_size=args.batch, max_length=args.max_length, seed=0, max_prompt_length=0)

    mesh = shd.make_mesh({"fsdp": -1})
    opt = optax.adamw(1e-5)
    batch_sharding = shd.data_sharding(mesh, shd.DEFAULT_RULES)
    results = {}
    with jax.set_mesh(mesh):
        for algo in ("sft", "dpo"):
            datasets, step_fns, states = {}, {}, {}
            for name, padding in variants.items():
                if algo == "sft":
                    datasets[name] = make_sft_dataset(sft_records, tokenizer, **common, **padding)
                    fn = make_sft_step(decoder_logprob_fn(cfg, with_stats=True), opt)
                else:
                    datasets[name] = make_preference_dataset(pair_records, tokenizer, **common,
                                                             **padding)
                    fn = make_dpo_step(decoder_logprob_fn(cfg), opt,
                                       loss_fn=functools.partial(dpo_loss, beta=0.1))
                states[name], shardings = init_train_state(
                    decoder_init_fn(cfg), opt, mesh, shd.DEFAULT_RULES, seed=0,
                    with_reference=algo == "dpo")
                step_fns[name] = jax.jit(fn, in_shardings=(shardings, batch_sharding),
                                         out_shardings=(shardings, shd.replicated(mesh)),
                                         donate_argnums=(0,))
            results[algo] = _measure(algo, datasets, step_fns, states, args.steps)
            base, new = (results[algo][n] for n in variants)
            results[algo]["speedup_steps_per_s"] = new["steps_per_s"] / base["steps_per_s"]
            results[algo]["speedup_total_s"] = base["total_s"] / new["total_s"]
            for name in variants:
                r = results[algo][name]
                print(f"{algo} {name:>20}: {r['steps_per_s']:.2f} steps/s, "
                      f"{r['median_step_cpu_s']:.2f} CPU s/step, "
                      f"{r['real_tokens_per_s']:,.0f} real tokens/s, padding "
                      f"{100 * r['padded_fraction']:.0f}% (mean width {r['mean_width']:.0f}), "
                      f"{r['compiles']} compiles in {r['compile_s']:.1f} s, "
                      f"total {r['total_s']:.1f} s", flush=True)
    results.update(
        benchmark="padding_to_longest", steps=args.steps, batch=args.batch,
        multiple=args.multiple, preset=args.preset, max_length=args.max_length,
        attention_impl=args.attention_impl,
        params=cfg.num_params(), jax=jax.__version__, backend=jax.default_backend(),
        devices=jax.device_count(), threads=os.cpu_count(),
        machine=platform.processor() or platform.machine())
    print(json.dumps(results))


if __name__ == "__main__":
    main()
