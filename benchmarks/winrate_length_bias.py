"""Raw vs length-controlled win rate when the judge likes length (jalign.winrate).

    python benchmarks/winrate_length_bias.py --workdir=/tmp/wr --seeds=3
    python benchmarks/winrate_length_bias.py --workdir=/tmp/wr --seeds=3 --algo=dpo

On the `sentiment` task (jalign.overopt's small sizes): SFT, then a proxy reward model
trained on pairs whose labels favour the longer completion (`data.length_bias=1`), then
GRPO against that proxy with no KL penalty. Each held-out eval compares the policy's
sampled completions with the SFT model's (same prompts, same uniforms) twice: by the
task's gold reward and by the length-biased proxy (`eval.win_rate_by=
"gold_reward,rewards/model"`). The proxy's raw win rate credits the policy for growing
longer; the length-controlled one (the win rate at zero length difference) asks what is
left at equal length. Prints a table per seed and the mean over seeds at the last eval.

`--algo=dpo`: DPO from the same SFT model on the same length-biased pairs (the labels the
proxy learnt from) instead of GRPO, then one held-out eval of the final policy against SFT
scored by gold and by the proxy (same SFT and proxy as the GRPO run, reused from WORKDIR).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jalign import overopt  # noqa: E402
from jalign.algorithms.rl_inputs import reward_ensemble_fn  # noqa: E402
from jalign.evaluate import evaluate_policy  # noqa: E402
from jalign.label import load_policy  # noqa: E402
from jalign.tasks import get_task  # noqa: E402

KEYS = (("gold win", "winrate/raw"), ("gold LC", "winrate/length_controlled"),
        ("proxy win", "winrate/rewards/model/raw"),
        ("proxy LC", "winrate/rewards/model/length_controlled"),
        ("len diff", "winrate/mean_length_diff"), ("gold", "gold_reward/sampled"),
        ("proxy", "rewards/model/sampled"))


def sft_and_proxy(workdir: str, seed: int, sizes: overopt.Sizes,
                  length_bias: float) -> tuple[str, str]:
    """The SFT model and the length-biased proxy of one seed (trained once, then reused):
    their final_params paths."""
    overopt.train(overopt.sft_config(sizes, seed), os.path.join(workdir, "sft"))
    sft_params = os.path.join(workdir, "sft", "final_params")
    reward = overopt.reward_config(sizes, seed * 100, sft_params, length_bias=length_bias,
                                   label_noise=0.0)
    overopt.train(reward, os.path.join(workdir, "reward"))
    return sft_params, os.path.join(workdir, "reward", "final_params")


def run_seed(workdir: str, seed: int, sizes: overopt.Sizes, length_bias: float) -> list[dict]:
    sft_params, proxy_params = sft_and_proxy(workdir, seed, sizes, length_bias)
    config = overopt.grpo_config(sizes, seed, sft_params, proxy_params)
    config.eval.num_prompts = config.eval.batch_size = 256  # win rates over 256 prompts
    config.eval.win_rate = True
    config.eval.win_rate_by = "gold_reward,rewards/model"
    summary = overopt.train(config, os.path.join(workdir, "grpo"))
    return summary["evals"]


def run_dpo_seed(workdir: str, seed: int, sizes: overopt.Sizes, length_bias: float,
                 steps: int) -> list[dict]:
    sft_params, proxy_params = sft_and_proxy(workdir, seed, sizes, length_bias)
    config = overopt.task_config("dpo", steps, sizes, seed * 100)  # the proxy's pairs
    config.init_from = sft_params
    config.data.length_bias = length_bias   # the proxy's training labels
    config.dpo.beta = 0.1
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 10
    overopt.train(config, os.path.join(workdir, "dpo"))
    # One eval of the final policy against SFT, by gold and by the proxy.
    config.init_from = os.path.join(workdir, "dpo", "final_params")
    policy, model_cfg, tokenizer = load_policy(config)
    config.init_from = sft_params
    start, _, _ = load_policy(config)
    task = get_task(config.data.task)
    proxy = reward_ensemble_fn([proxy_params], model_cfg, tokenizer, config.data.max_length)
    prompts = task.prompts(256, seed=seed + 1, split="eval")

    def score_fn(indices, completions, lengths):
        chosen = [prompts[i] for i in indices]
        return {"gold_reward": task.gold_reward(chosen, completions),
                "rewards/model": np.asarray(proxy(chosen, completions))}

    out = evaluate_policy(policy, model_cfg, tokenizer, task, prompts, score_fn=score_fn,
                          max_new_tokens=sizes.max_new_tokens, seed=seed, ref_params=start,
                          batch_size=256, win_rate=True,
                          win_rate_by=("gold_reward", "rewards/model"))
    start_eval = evaluate_policy(start, model_cfg, tokenizer, task, prompts, score_fn=score_fn,
                                 max_new_tokens=sizes.max_new_tokens, seed=seed, batch_size=256)
    return [{"step": 0, **start_eval}, {"step": steps, **out}]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--length_bias", type=float, default=1.0)
    parser.add_argument("--rl_steps", type=int, default=24)
    parser.add_argument("--algo", choices=("grpo", "dpo"), default="grpo")
    parser.add_argument("--dpo_steps", type=int, default=200)
    args = parser.parse_args()
    sizes = dataclasses.replace(overopt.SIZES["small"], rl_steps=args.rl_steps)
    finals = []
    for seed in range(args.seeds):
        where = os.path.join(args.workdir, f"seed_{seed}")
        evals = (run_seed(where, seed, sizes, args.length_bias) if args.algo == "grpo" else
                 run_dpo_seed(where, seed, sizes, args.length_bias, args.dpo_steps))
        print(f"seed {seed}\n  step  " + "  ".join(f"{name:>9}" for name, _ in KEYS))
        for e in evals:
            print(f"  {e['step']:4d}  " + "  ".join(f"{e.get(k, float('nan')):9.3f}"
                                                    for _, k in KEYS))
        finals.append({k: evals[-1].get(k, float("nan")) for _, k in KEYS})
    print(f"last eval, mean ± std over {args.seeds} seeds:")
    for name, key in KEYS:
        values = np.array([f[key] for f in finals])
        spread = values.std(ddof=1) if len(values) > 1 else 0.0
        print(f"  {name:>9}: {values.mean():.3f} ± {spread:.3f}   per seed "
              f"{np.round(values, 3).tolist()}")
    with open(os.path.join(args.workdir, f"winrate_length_bias_{args.algo}.json"), "w") as f:
        json.dump({"algo": args.algo, "length_bias": args.length_bias,
                   "sizes": dataclasses.asdict(sizes), "finals": finals}, f, indent=2)


if __name__ == "__main__":
    main()
