"""GRPO on your own prompts vs the same run on the built-in task.

    python benchmarks/grpo_jsonl_vs_task.py --workdir=/tmp/jalign_rl_data [--seeds 0,1] [--steps 100]

Trains an SFT model on the built-in `add` task (quickstart SFT settings with
--sft_steps and --demo_quality, once, reused from WORKDIR/sft), writes the task's prompts and reference answers to JSONL files
(what scripts/export_task_prompts.py writes), then for each seed runs configs/grpo_jsonl.py
twice from the SFT model with the `math_answer` verifier: on the JSONL files
(data.source=jsonl) and on the task (its `:task` variant). Prints, per seed and run, the
held-out exact match (rewards/math_answer/greedy and /sampled) before and after, and
the difference between the two data paths. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import numpy as np
from absl import logging

from jalign.loop import run
from jalign.tasks import get_task

HERE = os.path.dirname(os.path.abspath(__file__))


def _config(name: str, arg: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "..", "configs",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _write_prompts(directory: str, *, num_train: int, num_eval: int, seed: int):
    task, paths = get_task("add"), []
    for split, n, split_seed in (("train", num_train, seed), ("eval", num_eval, seed + 1)):
        paths.append(os.path.join(directory, f"{split}_seed{seed}.jsonl"))
        with open(paths[-1], "w") as f:
            for row in task.prompt_records(n, seed=split_seed, split=split):
                f.write(json.dumps(row) + "\n")
    return paths


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--sft_steps", type=int, default=300)
    parser.add_argument("--demo_quality", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=2e-4)
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)
    os.makedirs(args.workdir, exist_ok=True)

    sft_dir = os.path.join(args.workdir, "sft")
    if not os.path.exists(os.path.join(sft_dir, "summary.json")):
        sft = _config("quickstart", "sft")
        sft.data.task = "add"
        sft.data.demo_quality = args.demo_quality
        sft.train.num_steps = args.sft_steps
        sft.train.eval_every = args.sft_steps
        run(sft, sft_dir)

    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for source in ("jsonl", "task"):
            config = _config("grpo_jsonl", "task" if source == "task" else "")
            config.seed = seed
            config.init_from = os.path.join(sft_dir, "final_params")
            config.train.num_steps = args.steps
            config.train.eval_every = args.steps
            config.train.checkpoint_every = args.steps
            config.train.memory_report = False
            config.optimizer.learning_rate = args.lr
            if source == "jsonl":
                config.data.path, config.data.eval_path = _write_prompts(
                    args.workdir, num_train=config.data.num_train_examples,
                    num_eval=config.eval.num_prompts, seed=seed)
            t0 = time.perf_counter()
            summary = run(config, os.path.join(args.workdir, f"grpo_{source}_seed{seed}"))
            first, last = summary["initial"], summary["final"]
            rows.append({"seed": seed, "source": source, "seconds": time.perf_counter() - t0,
                         **{f"{k}/{when}": r[f"rewards/math_answer/{k}"]
                            for when, r in (("before", first), ("after", last))
                            for k in ("greedy", "sampled")}})
            print(rows[-1], flush=True)

    print(f"\n{'seed':<6}{'data':<7}{'exact match greedy':>22}{'exact match sampled':>24}")
    for r in rows:
        print(f"{r['seed']:<6}{r['source']:<7}{r['greedy/before']:>10.3f} -> {r['greedy/after']:.3f}"
              f"{r['sampled/before']:>12.3f} -> {r['sampled/after']:.3f}")
    diffs = [abs(a[k] - b[k]) for a, b in zip(rows[0::2], rows[1::2])
             for k in ("greedy/after", "sampled/after")]
    print(f"largest |jsonl - task| after training: {max(diffs):.4f}")
    for k in ("greedy", "sampled"):
        gain = np.asarray([r[f"{k}/after"] - r[f"{k}/before"] for r in rows[0::2]])
        print(f"exact match ({k}) gain over {len(gain)} seeds: mean {gain.mean():+.3f}, "
              f"std {gain.std(ddof=1) if len(gain) > 1 else 0.0:.3f}, min {gain.min():+.3f}, "
              f"max {gain.max():+.3f}")
    print(json.dumps({"benchmark": "grpo_jsonl_vs_task", "steps": args.steps,
                      "sft_steps": args.sft_steps, "demo_quality": args.demo_quality,
                      "lr": args.lr, "runs": rows,
                      "max_abs_difference": max(diffs)}))


if __name__ == "__main__":
    main()
