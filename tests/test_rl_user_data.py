"""GRPO on the user-data path: JSONL prompts with columns, verifier rewards; equal to the
same run on the built-in task, and on 8 devices equal to 1 device (exact resume on JSONL
prompts: tests/test_resume.py; SIGKILL: tests/test_soak.py)."""

import os

import numpy as np

from jalign.loop import run
from tests.train_helpers import ENV, load_config, read_metrics, run_train, use_prompt_files


def _config(tmp_path):
    config = load_config("grpo_tiny", "test")
    config.data.task = "add"
    config.train.num_steps = 3
    config.train.memory_report = False
    return use_prompt_files(config, tmp_path)


def test_grpo_on_jsonl_prompts_equals_the_task_run_and_one_device(tmp_path):
    config = _config(tmp_path)
    from_files = run(config, str(tmp_path / "jsonl"))
    task_config = _config(tmp_path)
    task_config.data.source = "task"  # the same prompts, drawn from the task itself
    task_config.data.num_train_examples = 64  # as many as the file holds
    from_task = run(task_config, str(tmp_path / "task"))
    files, task = read_metrics(str(tmp_path / "jsonl")), read_metrics(str(tmp_path / "task"))
    assert sorted(files) == [1, 2, 3]
    assert all(files[s]["grad_norm"] > 0 for s in files)  # digit_fraction varies
    for step in files:
        for key in ("loss", "grad_norm", "reward", "rewards/math_answer/mean",
                    "rewards/digit_fraction/mean", "rewards/soft_overlong/mean"):
            assert files[step][key] == task[step][key], (step, key)
    for key in ("reward/greedy", "rewards/math_answer/greedy", "rewards/math_answer/sampled"):
        assert from_files["final"][key] == from_task["final"][key], key
    assert "gold_reward/greedy" in from_task["final"]  # the task also reports its gold reward

    # The same JSONL run on one device (a subprocess: this process has 8).
    overrides = [f"--config.{k}={v}" for k, v in (
        ("data.source", "jsonl"), ("data.path", config.data.path),
        ("data.eval_path", config.data.eval_path), ("data.task", "add"),
        ("rl.reward_sources", config.rl.reward_sources), ("train.num_steps", 3),
        ("train.eval_every", 0),
        ("train.async_checkpointing", False), ("train.memory_report", False))]
    command = dict(config="configs/grpo_tiny.py:test", env=ENV)
    run_train(str(tmp_path / "one"), *overrides, **command)
    one = read_metrics(str(tmp_path / "one"))
    for step in files:
        for key in ("loss", "grad_norm", "reward"):
            np.testing.assert_allclose(one[step][key], files[step][key], rtol=1e-5, atol=1e-7,
                                       err_msg=f"step {step} {key}")


def test_a_run_whose_rewards_all_tie_says_why(tmp_path, capsys):
    config = _config(tmp_path)
    config.rl.reward_sources = "python:tests.rl_reward_fns.always_zero"
    config.train.num_steps = 1
    config.train.eval_every = 0
    config.train.eval_at_start = False
    run(config, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "warning: step 1: every group's completions scored the same (mean 0)" in out
    assert "config.init_from" in out and "config.rl.dynamic_sampling" in out
    assert read_metrics(str(tmp_path / "run"))[1]["frac_reward_zero_std"] == 1.0


def test_a_column_a_reward_needs_is_checked_before_sampling(tmp_path):
    config = _config(tmp_path)
    config.rl.reward_sources = "python:tests.rl_reward_fns.needs_missing_column"
    try:
        run(config, str(tmp_path / "run"))
    except ValueError as e:
        message = str(e)
    else:
        raise AssertionError("a missing column was not reported")
    assert message == (f"reward function 'needs_missing_column' needs the column 'solution', "
                       f"which {config.data.path} does not have (its columns: ['answer'])")
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")  # nothing was sampled
