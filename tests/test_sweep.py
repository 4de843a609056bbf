"""Seeds as an axis (`python -m jalign.train --seeds=N`, jalign.sweep): each seed an
ordinary run in WORKDIR/seed_K, the combined numbers a 95% t-interval over seeds."""

import json
import math
import os

import numpy as np
import pytest

from jalign import sweep
from tests.train_helpers import parse_config, read_metrics


def _check_spread(got, values):
    """An independent formula: df = 1 makes Student's t Cauchy, t(0.975) = tan(0.475 pi)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = math.tan(0.475 * math.pi) * std / math.sqrt(n) if n == 2 else None
    assert got["values"] == pytest.approx(values, abs=0)
    assert got["mean"] == pytest.approx(mean, rel=1e-12)
    assert got["std"] == pytest.approx(std, rel=1e-12)
    assert got["half_width"] == pytest.approx(half, rel=1e-9)
    assert got["low"] == pytest.approx(mean - half, rel=1e-9)
    assert got["high"] == pytest.approx(mean + half, rel=1e-9)


def test_t_quantiles_match_the_table():
    for n, t in ((2, 12.706), (3, 4.303), (5, 2.776), (10, 2.262), (30, 2.045)):
        assert sweep.t_quantile(n) == pytest.approx(t, abs=1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        sweep.spread([0.5])


def test_two_seeds_each_in_its_own_run_and_their_interval(tmp_path):
    config = parse_config("--config.train.num_steps=2", "--config.train.eval_every=2",
                          "--config.train.checkpoint_every=2", "--config.train.memory_report=False",
                          "--config.eval.max_new_tokens=6")
    workdir = str(tmp_path)
    out = sweep.run_seeds(config, workdir, 2)
    for k in (0, 1):
        for name in ("summary.json", "evals.jsonl", "metrics.jsonl", "final_params", "checkpoints"):
            assert os.path.exists(os.path.join(workdir, f"seed_{k}", name)), (k, name)
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
    assert json.load(open(os.path.join(workdir, "summary.json"))) == json.loads(json.dumps(out))
    assert out["seeds"] == [0, 1] and out["interval"] == sweep.INTERVAL

    per_seed = [json.load(open(os.path.join(workdir, f"seed_{k}", "summary.json"))) for k in (0, 1)]
    finals = [s["final"] for s in per_seed]
    losses = [read_metrics(os.path.join(workdir, f"seed_{k}"))[1]["loss"] for k in (0, 1)]
    assert losses[0] != losses[1]  # the seed sets the init and the data
    metrics = out["metrics"]["sft"]
    for key in ("gold_reward/greedy", "gold_reward/sampled", "gold_reward/sampled_sem", "kl/ref",
                "completions/mean_length"):
        _check_spread(metrics[key], [f[key] for f in finals])
    assert "step" not in metrics
    for key in ("gold_reward/greedy", "kl/ref"):  # the table's columns
        _check_spread(out["table"]["sft"][key], [f[key] for f in finals])
    curves = sweep.seed_curves(per_seed, config)["sft"]
    curve = curves["held-out gold reward"]["gold_reward/sampled"]
    assert curve["step"] == [0, 2]
    np.testing.assert_allclose(curve["value"],
                               [np.mean([s["evals"][i]["gold_reward/sampled"] for s in per_seed])
                                for i in (0, 1)])


def test_a_pipelines_stages_and_table_combine_over_seeds():
    config = parse_config(config="configs/quickstart.py:test")

    def run(seed):
        sft = {"final": {"step": 6, "gold_reward/greedy": 0.5 + seed / 10, "kl/ref": 3.0 + seed},
               "evals": [{"step": 0, "gold_reward/greedy": 0.0}, {"step": 6, "kl/ref": 1.0}]}
        reward = {"final": {"step": 4, "eval_accuracy": 0.6 + seed / 20}, "evals": []}
        return {"stages": {"sft": sft, "reward": reward},
                "table": {"sft": {"gold_reward/greedy": sft["final"]["gold_reward/greedy"]},
                          "reward": {"accuracy": reward["final"]["eval_accuracy"]}}}

    runs = [run(k) for k in range(3)]
    out = sweep.combine(runs, config, [0, 1, 2])
    accuracy = out["table"]["reward"]["accuracy"]
    assert accuracy["mean"] == pytest.approx(0.65) and accuracy["std"] == pytest.approx(0.05)
    assert accuracy["half_width"] == pytest.approx(4.302653 * 0.05 / math.sqrt(3), rel=1e-6)
    assert out["metrics"]["sft"]["kl/ref"]["values"] == [3.0, 4.0, 5.0]
    assert "0.650 ± 0.124" in sweep.format_table(out["table"])
    curves = sweep.seed_curves(runs, config)["sft"]
    assert curves["held-out gold reward"]["gold_reward/greedy"]["step"] == [0]
    assert curves["KL to start"]["kl/ref"]["step"] == [6]


def test_gains_over_the_start_model_count_seeds_above_two_standard_errors():
    config = parse_config(config="configs/quickstart.py:test")
    # (start, sem, final, sem) of sampled gold per seed: gains 0.12 (se 0.05: a win),
    # 0.06 (se 0.0316..: not above 2 se), -0.02 (a loss).
    cases = [(0.5, 0.03, 0.62, 0.04), (0.55, 0.01, 0.61, 0.03), (0.6, 0.02, 0.58, 0.02)]

    def run(start, start_sem, final, final_sem):
        dpo = {"initial": {"step": 0, "gold_reward/sampled": start,
                           "gold_reward/sampled_sem": start_sem, "gold_reward/greedy": 0.7},
               "final": {"step": 9, "gold_reward/sampled": final,
                         "gold_reward/sampled_sem": final_sem, "gold_reward/greedy": 0.8}}
        resumed = {"initial": {"step": 5, "gold_reward/sampled": 0.0,
                               "gold_reward/sampled_sem": 0.0},
                   "final": {"step": 9, "gold_reward/sampled": 1.0,
                             "gold_reward/sampled_sem": 0.0}}
        return {"stages": {"dpo": dpo, "other": resumed}, "table": {}}

    out = sweep.combine([run(*c) for c in cases], config, [0, 1, 2])
    assert set(out["gains"]) == {"dpo"}  # no sems (greedy) or no step-0 eval: no gain
    gain = out["gains"]["dpo"]["gold_reward/sampled"]
    expected = [f - s for s, _, f, _ in cases]
    assert gain["gain"]["values"] == pytest.approx(expected)
    assert gain["se"] == pytest.approx([0.05, math.sqrt(0.001), math.sqrt(0.0008)])
    assert gain["wins"] == 1 and gain["num_seeds"] == 3
    assert "on 1/3 seeds" in sweep.format_gains(out["gains"])


def test_seed_placeholders_are_formatted_per_seed():
    config = parse_config("--config.init_from=/runs/seed_{seed}/sft/final_params")
    cfg = sweep.seed_config(config, 3)
    assert cfg.seed == 3 and cfg.init_from == "/runs/seed_3/sft/final_params"
    assert config.init_from == "/runs/seed_{seed}/sft/final_params"  # the original is kept
