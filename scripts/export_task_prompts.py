"""Writes a built-in task's prompts and reference answers as prompt-dataset JSONL files.

    python scripts/export_task_prompts.py --task=add --out=/tmp/add_prompts \
        [--num_train=4096 --num_eval=128 --seed=0]

writes OUT/train.jsonl and OUT/eval.jsonl, one {"prompt": ..., "answer": ...} row per
line: exactly the prompts a `data.source=task` run with the same seed draws (train
with `seed`, held-out with `seed + 1`, as jalign.algorithms.rl_inputs does), so an RL
run over these files with a verifier (`rl.reward_sources=math_answer`) can be compared
with the same run on the task (configs/grpo_jsonl.py).
"""

import argparse
import json
import os

from jalign.tasks import get_task


def export(task_name: str, out: str, *, num_train: int, num_eval: int, seed: int) -> dict:
    task = get_task(task_name)
    os.makedirs(out, exist_ok=True)
    paths = {}
    for split, n, split_seed in (("train", num_train, seed), ("eval", num_eval, seed + 1)):
        paths[split] = os.path.join(out, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            for row in task.prompt_records(n, seed=split_seed, split=split):
                f.write(json.dumps(row) + "\n")
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="add")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num_train", type=int, default=4096)
    parser.add_argument("--num_eval", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(export(args.task, args.out, num_train=args.num_train, num_eval=args.num_eval,
                 seed=args.seed))
