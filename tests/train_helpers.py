"""Helpers shared by the tests that run the trainer: the CLI in a subprocess or run() in-process."""

import json
import os
import subprocess
import sys

from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART_SFT = "configs/quickstart.py:sft,test"
# One CPU device per training subprocess: the runs compare bit-for-bit across restarts.
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")


def cached_env(cache_dir):
    """ENV for runs restarted many times: unbuffered output (a killed run has printed where it
    resumed) and a persistent compilation cache shared by the runs (restarts skip most of XLA)."""
    return dict(ENV, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def train_cmd(workdir, *overrides, config=QUICKSTART_SFT):
    return [sys.executable, "-m", "jalign.train", f"--config={config}", f"--workdir={workdir}",
            *overrides]


def run_train(workdir, *overrides, check=True, config=QUICKSTART_SFT, env=None):
    """Runs `python -m jalign.train` to completion; raises with its output if it fails."""
    proc = subprocess.run(train_cmd(workdir, *overrides, config=config), cwd=ROOT,
                          env=env or ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(workdir):
    """step -> the metrics.jsonl record of that step."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def parse_config(*overrides, config=QUICKSTART_SFT):
    """The config `python -m jalign.train --config=CONFIG OVERRIDES...` would train with.

    Parsed by the same absl/ml_collections flags as the command line, so a bad
    override fails here exactly as it fails there.
    """
    from jalign import config_utils

    argv = ["jalign.train", f"--config={os.path.join(ROOT, config)}", *overrides]
    argv, stage_overrides = config_utils.split_stage_overrides(argv)
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    flag_values(argv)
    config_utils.apply_stage_overrides(flag_values.config, stage_overrides)
    return flag_values.config


def load_final_params(workdir, *overrides, config=QUICKSTART_SFT):
    """WORKDIR/final_params of a decoder run with these overrides, as NumPy arrays."""
    import jax
    import numpy as np

    from jalign import checkpoint, models
    from jalign.models.config import ModelConfig

    model_cfg = ModelConfig.from_mapping(parse_config(*overrides, config=config).model)
    params = checkpoint.load_params(os.path.join(workdir, "final_params"),
                                    models.abstract_params(model_cfg))
    return jax.tree.map(np.asarray, params)


def load_config(name: str, arg: str = ""):
    """configs/NAME.py's get_config(arg), loaded from the repository (not the cwd)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# A verifier and a reward that varies even for an untrained policy, so online-RL tests
# see non-zero advantages and gradients (and a built-in with parameters).
JSONL_RL_REWARDS = ("math_answer,python:tests.rl_reward_fns.digit_fraction,"
                    "soft_overlong:max=8,cache=4")


def write_prompt_files(directory, *, task="add", num_train=64, num_eval=8, seed=0):
    """A built-in task's prompts and answers as train/eval prompt JSONL files, exactly the
    prompts a `data.source=task` run with `seed` draws. Returns (train path, eval path)."""
    from jalign.tasks import get_task
    task = get_task(task)
    paths = []
    for split, n, split_seed in (("train", num_train, seed), ("eval", num_eval, seed + 1)):
        path = os.path.join(str(directory), f"{split}.jsonl")
        with open(path, "w") as f:
            for row in task.prompt_records(n, seed=split_seed, split=split):
                f.write(json.dumps(row) + "\n")
        paths.append(path)
    return tuple(paths)


def use_prompt_files(config, directory, *, rewards=JSONL_RL_REWARDS, task="add"):
    """Points an online-RL config at prompt JSONL files written into `directory`."""
    train, held_out = write_prompt_files(directory, task=task, num_train=64,
                                         num_eval=config.eval.num_prompts, seed=config.seed)
    config.data.source, config.data.path, config.data.eval_path = "jsonl", train, held_out
    config.rl.reward_sources = rewards
    return config
