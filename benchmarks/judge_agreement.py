"""How well a language-model judge agrees with a built-in task's gold reward.

    python benchmarks/judge_agreement.py --judge=/tmp/judge_smollm2 --task=sort --n=64 --seeds=3

Gold-labelled held-out pairs of the task (its candidate generator: a perfect answer
against a near-miss, `Task.preference_pairs`, eval split, no label noise) are judged
pairwise (`jalign.judges`, both orders) under a principle drawn per pair from the
constitution. Prints, per seed and as mean ± std over seeds: agreement with gold (pairs
the judge decides and gold does not tie), ties, the judge's P(first label) before
symmetrising (its position bias: 0.5 = none), the labels' probability mass, and how
often the judge and gold prefer the longer answer (the judge's length bias).
"""

import argparse
import json
import time

import numpy as np

from jalign import judges
from jalign.config_utils import base_config
from jalign.label import judge_report
from jalign.tasks import get_task


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--judge", required=True)
    parser.add_argument("--task", default="sort")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--margin", type=float, default=0.0)
    parser.add_argument("--constitution", default="configs/constitutions/helpful_concise.txt")
    parser.add_argument("--labels", default="")
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    config = base_config().judge
    config.update(dict(path=args.judge, constitution=args.constitution, margin=args.margin,
                       labels=args.labels, batch_size=args.batch_size, max_length=256))
    spec = judges.judge_spec(config)
    judge = judges.load_judge(spec)
    task = get_task(args.task)
    rows = []
    for seed in range(args.seeds):
        start = time.time()
        pairs = task.preference_pairs(args.n, seed=seed, split="eval")
        prompts = [p["prompt"] for p in pairs]
        xs, ys = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
        out = judge.pairwise([p.strip() for p in prompts], xs, ys,
                             judges.sample_principles(spec.principles, len(pairs), seed))
        report = judge_report(out["prob"], task.gold_reward(prompts, xs),
                              task.gold_reward(prompts, ys),
                              [len(judge.tokenizer.encode(x)) for x in xs],
                              [len(judge.tokenizer.encode(y)) for y in ys], spec.margin)
        report.update(seed=seed, **{"judge/first_label_prob": float(out["first_prob"].mean()),
                                    "judge/label_mass": float(out["label_mass"].mean()),
                                    "seconds": time.time() - start})
        print(json.dumps(report), flush=True)
        rows.append(report)
    for key in ("judge/gold_agreement", "judge/ties", "judge/first_label_prob",
                "judge/label_mass", "judge/prefers_longer", "gold/prefers_longer"):
        values = np.asarray([r[key] for r in rows if r[key] is not None], np.float64)
        print(f"{key:<24} {values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f}")


if __name__ == "__main__":
    main()
