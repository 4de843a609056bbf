"""Exact resume for every kind of run: a run stopped at a checkpoint and restarted equals
an uninterrupted one (losses and gradient norms after the restart, and the final model).

Covers what the SFT kill/soak tests do not: the reward model, DPO (full and LoRA, whose
checkpoints hold only the adapters) and online RL, where the sampler's randomness must
come from the checkpointed state (multi-turn episodes included: grpo_tools).
"""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jalign.loop import run
from tests.train_helpers import load_config, use_prompt_files



def _make(kind: str, num_steps: int, tmp_path):
    if kind == "grpo_tools":  # multi-turn episodes with the calculator tool (calc task)
        config = load_config("grpo_tools_tiny", "test")
        config.pipeline.stages = ""
        config.algo = "grpo"
        config.data.batch_size, config.rl.group_size = 4, 2
        config.rl.max_new_tokens = 16
        config.rl.reward_sources = "python:tests.rl_reward_fns.length_fraction"
        config.rl.reward_weights = None
    elif kind in ("grpo", "ppo"):
        config = load_config(f"{kind}_tiny", "test")
        if kind == "grpo":
            # The user-data path: JSONL prompts, a reward that ties about half the groups,
            # and dynamic sampling, which draws more prompts from the checkpointed iterator.
            use_prompt_files(config, tmp_path, rewards="python:tests.rl_reward_fns.digits_if_even")
            config.rl.dynamic_sampling = True
            config.rl.dynamic_sampling_max_rounds = 2
    else:
        config = load_config("quickstart", "test")
        config.pipeline.stages = ""
        config.algo = "dpo" if kind.startswith("dpo") else kind
        if kind == "dpo_lora":
            config.model.lora_rank = 4
    config.optimizer.schedule = "constant"  # the stopped run must see the same rates
    config.train.num_steps = num_steps
    config.train.checkpoint_every = 2
    config.train.log_every = 1
    config.train.eval_every = 0
    config.train.eval_at_start = False
    config.train.memory_report = False
    return config


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _final(workdir):
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(workdir, "final_params"))


@pytest.mark.parametrize("kind", ["reward", "dpo_lora", "grpo", "ppo", "grpo_tools"])
def test_stopped_and_restarted_run_equals_the_uninterrupted_one(kind, tmp_path, capsys):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    run(_make(kind, 4, tmp_path), full)
    run(_make(kind, 2, tmp_path), split)
    run(_make(kind, 4, tmp_path), split)
    assert "Resumed from" in capsys.readouterr().out
    want, got = _metrics(full), _metrics(split)
    assert sorted(got) == [1, 2, 3, 4]
    if kind.startswith("grpo"):  # the rewards vary, so the steps after the restart train
        assert all(got[s]["grad_norm"] > 0 for s in (3, 4))
    if kind == "grpo":
        assert max(got[s]["dynamic_sampling/frac_groups_dropped"] for s in got) > 0
        assert max(got[s]["dynamic_sampling/rounds"] for s in got) > 1
    for step in (3, 4):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-6,
                                       err_msg=f"step {step} {key}")
    # TRL's num_tokens: input tokens seen since the start, carried across the restart.
    assert [got[s]["num_tokens"] for s in got] == [want[s]["num_tokens"] for s in got]
    assert 0 < got[1]["num_tokens"] < got[2]["num_tokens"] < got[3]["num_tokens"]
    import jax
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 _final(split), _final(full))
