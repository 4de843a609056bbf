"""Each online-RL config's `test` variant runs through jalign.loop.run on 8 devices, on the
user-data path: prompts and answers from JSONL files, scored by jalign.rewards verifiers."""

import json

import numpy as np
import pytest

from jalign.loop import run
from tests.train_helpers import load_config, use_prompt_files



@pytest.mark.parametrize("name", ["grpo_tiny", "rloo_tiny", "ppo_tiny", "online_dpo_tiny"])
def test_test_variant_trains_from_jsonl_prompts_and_writes_summary(name, tmp_path):
    config = use_prompt_files(load_config(name, "test"), tmp_path)
    config.eval.win_rate = True
    config.eval.win_rate_by = "reward,rewards/digit_fraction"
    summary = run(config, str(tmp_path / "run"))
    assert json.load(open(tmp_path / "run" / "summary.json")) == json.loads(json.dumps(summary))
    assert summary["algo"] == config.algo
    assert summary["initial"]["step"] == 0 and summary["final"]["step"] == config.train.num_steps
    for key in ("reward/greedy", "rewards/math_answer/greedy", "rewards/digit_fraction/sampled",
                "rewards/soft_overlong/sampled", "kl/ref"):
        assert np.isfinite(summary["final"][key]), key
    # Win rate against the start policy by the reward functions' total (no task here): at
    # step 0 both sample the same completions with the same uniforms, so every prompt ties.
    assert summary["initial"]["winrate/raw"] == 0.5
    assert summary["initial"]["winrate/length_controlled"] == pytest.approx(0.5, abs=1e-9)
    assert summary["initial"]["winrate/rewards/digit_fraction/raw"] == 0.5
    for prefix in ("winrate/", "winrate/rewards/digit_fraction/"):
        assert 0.0 <= summary["final"][prefix + "raw"] <= 1.0
        assert np.isfinite(summary["final"][prefix + "length_coef"])
    metrics = summary["final_metrics"]
    for key in ("reward", "rewards/math_answer/mean", "rewards/digit_fraction/std"):
        assert np.isfinite(metrics[key]), key
    # Groups of several completions per prompt report how many tie (PPO samples one).
    assert ("frac_reward_zero_std" in metrics) == (config.rl.group_size > 1)
    assert metrics["skipped_nonfinite"] == 0 and np.isfinite(metrics["loss"])
    if name != "online_dpo_tiny":
        for key in ("objective/scores", "objective/rlhf_reward", "completions/mean_length",
                    "policy/approxkl_avg", "policy/clipfrac_avg"):
            assert np.isfinite(metrics[key]), key
    if name == "ppo_tiny":
        for key in ("objective/kl", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg"):
            assert np.isfinite(metrics[key]), key


def test_a_win_rate_score_the_eval_does_not_have_is_named(tmp_path):
    config = use_prompt_files(load_config("grpo_tiny", "test"), tmp_path)
    config.eval.win_rate = True
    config.eval.win_rate_by = "rewards/no_such_function"
    with pytest.raises(ValueError, match="config.eval.win_rate_by names 'rewards/no_such_"):
        run(config, str(tmp_path / "run"))


@pytest.mark.parametrize("name", ["grpo_tiny", "rloo_tiny", "ppo_tiny", "online_dpo_tiny"])
def test_unknown_variant_is_named(name):
    with pytest.raises(ValueError, match=f"configs/{name}.py: unknown variant"):
        load_config(name, "ppo_but_misspelt")
