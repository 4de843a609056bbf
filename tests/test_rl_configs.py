"""Each online-RL config's `test` variant runs through jalign.loop.run on 8 devices."""

import json

import numpy as np
import pytest

from jalign.loop import run
from tests.train_helpers import load_config





@pytest.mark.parametrize("name", ["grpo_tiny", "rloo_tiny", "ppo_tiny", "online_dpo_tiny"])
def test_test_variant_trains_and_writes_summary(name, tmp_path):
    config = load_config(name, "test")
    summary = run(config, str(tmp_path))
    assert json.load(open(tmp_path / "summary.json")) == json.loads(json.dumps(summary))
    assert summary["algo"] == config.algo
    assert summary["initial"]["step"] == 0 and summary["final"]["step"] == config.train.num_steps
    for key in ("gold_reward/greedy", "gold_reward/sampled", "kl/ref"):
        assert np.isfinite(summary["final"][key]), key
    metrics = summary["final_metrics"]
    assert metrics["skipped_nonfinite"] == 0 and np.isfinite(metrics["loss"])
    if name != "online_dpo_tiny":
        for key in ("objective/scores", "objective/rlhf_reward", "completions/mean_length",
                    "policy/approxkl_avg", "policy/clipfrac_avg"):
            assert np.isfinite(metrics[key]), key
    if name == "ppo_tiny":
        for key in ("objective/kl", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg"):
            assert np.isfinite(metrics[key]), key


@pytest.mark.parametrize("name", ["grpo_tiny", "rloo_tiny", "ppo_tiny", "online_dpo_tiny"])
def test_unknown_variant_is_named(name):
    with pytest.raises(ValueError, match=f"configs/{name}.py: unknown variant"):
        load_config(name, "ppo_but_misspelt")
