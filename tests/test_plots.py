"""The pipeline's curves.png: training metrics plus held-out gold reward (with its sem
band) and KL to the start for every stage that evaluates them."""

import json
import os

from jalign.plots import plot_curves, plot_panels


def _write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_curves_plot_gold_with_sem_and_kl_for_stages_that_evaluate_them(tmp_path):
    workdir = str(tmp_path)
    _write(f"{workdir}/sft/metrics.jsonl", [{"step": s, "loss": 2.0 / s} for s in (1, 2, 3, 4)])
    _write(f"{workdir}/sft/evals.jsonl", [
        {"step": s, "gold_reward/greedy": g, "gold_reward/greedy_sem": 0.05,
         "gold_reward/sampled": g - 0.1, "gold_reward/sampled_sem": 0.07, "kl/ref": k}
        for s, g, k in ((0, 0.2, 0.0), (4, 0.6, 3.0))])
    _write(f"{workdir}/reward/metrics.jsonl", [{"step": 1, "loss": 0.7, "accuracy": 0.5}])
    _write(f"{workdir}/dpo/metrics.jsonl", [{"step": 1, "loss": 0.69, "rewards/margins": 0.1}])
    _write(f"{workdir}/dpo/evals.jsonl", [{"step": 0, "gold_reward/greedy": 0.6, "kl/ref": 0.0},
                                          {"step": 2, "gold_reward/greedy": 0.4, "kl/ref": 9.0}])
    path = os.path.join(workdir, "curves.png")
    data = plot_curves(workdir, ["sft", "reward", "dpo"], path)
    assert os.path.getsize(path) > 1000
    gold = data["sft"]["held-out gold reward"]
    assert gold["gold_reward/greedy"] == {"step": [0, 4], "value": [0.2, 0.6], "sem": [0.05, 0.05]}
    assert gold["gold_reward/sampled"]["sem"] == [0.07, 0.07]
    assert data["sft"]["KL to start"]["kl/ref"]["value"] == [0.0, 3.0]
    assert data["dpo"]["KL to start"]["kl/ref"]["value"] == [0.0, 9.0]
    assert "sem" not in data["dpo"]["held-out gold reward"]["gold_reward/greedy"]
    assert data["reward"]["held-out gold reward"] == {}  # a reward model generates nothing
    assert list(data["dpo"]["training"]) == ["loss", "rewards/margins"]
    assert plot_panels(data, path) == ["training", "held-out gold reward", "KL to start"]
