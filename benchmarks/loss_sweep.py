"""Every preference loss, end to end on a built-in task: does it raise the gold reward?

    python benchmarks/loss_sweep.py --workdir=/tmp/jalign_sweep [--steps 200] [--losses sigmoid,ipo]

Trains the quickstart's SFT model once (or reuses WORKDIR/sft), then runs one DPO-family
run per loss from it with the same data, steps and learning rate, and prints held-out
gold reward (greedy and sampled), preference accuracy of the implicit reward, KL to
the SFT model, and whether every logged metric stayed finite. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

from absl import logging

# Per-loss settings that differ from the shared ones (beta, lr): the values TRL users
# would start from (exo_pair needs label_smoothing > 0; SimPO uses the paper's scale).
OVERRIDES = {
    "exo_pair": {"dpo.label_smoothing": 1e-3},
    "robust": {"dpo.label_smoothing": 0.1},
    "simpo": {"dpo.beta": 2.5, "dpo.simpo_gamma": 1.375},
    "cpo": {"dpo.beta": 0.1},
    "orpo": {"dpo.beta": 0.1},
    "sppo_hard": {"dpo.beta": 0.1},
    "rdpo": {"dpo.rdpo_alpha": 0.05},
    "sigmoid,bco_pair,sft": {"dpo.loss_weights": [0.8, 0.2, 1.0]},
}
DEFAULT_LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                  "sigmoid_norm", "sigmoid,bco_pair,sft", "rdpo", "simpo", "cpo", "orpo", "kto"]


def _set(config, dotted: str, value):
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--losses", default=",".join(DEFAULT_LOSSES).replace("sigmoid,bco_pair,sft", "mpo"))
    args = parser.parse_args()
    logging.set_verbosity(logging.WARNING)

    import importlib.util
    from jalign.loop import run
    spec = importlib.util.spec_from_file_location(
        "quickstart", os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.py"))
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)

    sft_dir = os.path.join(args.workdir, "sft")
    if not os.path.exists(os.path.join(sft_dir, "summary.json")):
        run(quickstart.get_config("sft"), sft_dir)
    sft_summary = json.load(open(os.path.join(sft_dir, "summary.json")))["final"]

    rows = {}
    for name in args.losses.split(","):
        loss = "sigmoid,bco_pair,sft" if name == "mpo" else name
        config = quickstart.get_config("sft")
        config.algo = "kto" if loss == "kto" else "dpo"
        config.init_from = os.path.join(sft_dir, "final_params")
        config.train.num_steps = args.steps
        config.train.eval_every = args.steps
        config.train.checkpoint_every = args.steps
        config.optimizer.learning_rate = args.lr
        config.optimizer.warmup_steps = 10
        config.dpo.beta = args.beta
        if loss != "kto":
            config.dpo.loss_type = loss
        for key, value in OVERRIDES.get(loss, {}).items():
            _set(config, key, value)
        t0 = time.perf_counter()
        run_dir = os.path.join(args.workdir, "loss_" + name.replace(",", "+"))
        summary = run(config, run_dir)
        final = summary["final"]
        metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        finite = all(math.isfinite(v) for m in metrics for v in m.values() if isinstance(v, float))
        rows[name] = {"gold_greedy": final["gold_reward/greedy"],
                      "gold_sampled": final["gold_reward/sampled"],
                      "pref_acc": final.get("eval_rewards/accuracies"), "kl": final.get("kl/ref"),
                      "finite": finite, "seconds": time.perf_counter() - t0}
        print(name, rows[name], flush=True)

    print(f"\nSFT start: gold greedy {sft_summary['gold_reward/greedy']:.3f}, "
          f"sampled {sft_summary['gold_reward/sampled']:.3f}")
    print(f"{'loss':<22}{'gold greedy':>12}{'gold sampled':>14}{'pref acc':>10}{'KL':>8}{'finite':>8}")
    for name, r in rows.items():
        acc = f"{r['pref_acc']:.3f}" if r["pref_acc"] is not None else "-"
        print(f"{name:<22}{r['gold_greedy']:>12.3f}{r['gold_sampled']:>14.3f}{acc:>10}"
              f"{r['kl']:>8.2f}{str(r['finite']):>8}")
    print(json.dumps({"benchmark": "loss_sweep", "steps": args.steps, "lr": args.lr, "beta": args.beta,
                      "sft": {"gold_greedy": sft_summary["gold_reward/greedy"],
                              "gold_sampled": sft_summary["gold_reward/sampled"]},
                      "losses": rows}))


if __name__ == "__main__":
    main()
