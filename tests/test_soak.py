"""Kill-and-resume soak: a run killed 10 times (SIGKILL), or preempted (SIGTERM), ends as if never stopped.

Each life of `python -m jalign.train` is stopped at a seeded random point after it has
logged a step past its resume point, then the same command is run again. The final
parameters and every step's loss must equal an uninterrupted run's; each restart must
resume from the latest committed checkpoint, losing at most `checkpoint_every` steps to
SIGKILL and none to SIGTERM.
"""

import os
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from jalign.loop import EXIT_PREEMPTED
from tests.train_helpers import (ROOT, cached_env, load_final_params, read_metrics, run_train,
                                 train_cmd)

pytestmark = pytest.mark.slow

NUM_STEPS, CHECKPOINT_EVERY = 240, 20
OVERRIDES = (f"--config.train.num_steps={NUM_STEPS}",
             f"--config.train.checkpoint_every={CHECKPOINT_EVERY}",
             "--config.train.eval_every=0", "--config.train.eval_at_start=False",
             "--config.train.log_every=1", "--config.train.async_checkpointing=False")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cached_env(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    run_train(workdir, *OVERRIDES, env=env)
    return workdir


def _committed_steps(workdir):
    """Steps Orbax has committed (a save cut short leaves only a *.orbax-checkpoint-tmp-* dir)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _last_logged_step(workdir):
    """The highest step in metrics.jsonl (a line cut short by a kill is ignored); 0 if none."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        steps = re.findall(r'"step": (\d+)[,}]', f.read())
    return max(map(int, steps), default=0)


def _start(workdir, env, log):
    return subprocess.Popen(train_cmd(workdir, *OVERRIDES), cwd=ROOT, env=env, text=True,
                            stdout=log, stderr=subprocess.STDOUT)


def _wait_for_step(proc, workdir, step, log_path, timeout=300):
    """Until this life has logged `step` (a restart first truncates the metrics to its resume step)."""
    deadline = time.time() + timeout
    resuming = bool(_committed_steps(workdir))
    while (resuming and not _resumed_at(log_path)) or _last_logged_step(workdir) < step:
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before step {step}"
        assert time.time() < deadline, f"no step {step} after {timeout} s"
        time.sleep(0.002)


def _resumed_at(log_path):
    with open(log_path) as f:
        found = re.findall(r"Resumed from .* at step (\d+)\.", f.read())
    return int(found[-1]) if found else 0


def _assert_same_run(workdir, reference):
    """Every step's metrics and the final parameters equal the uninterrupted run's."""
    metrics, expected = read_metrics(workdir), read_metrics(reference)
    assert sorted(metrics) == list(range(1, NUM_STEPS + 1))
    for step in metrics:
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(metrics[step][key], expected[step][key], rtol=1e-6,
                                       err_msg=f"step {step} {key}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 load_final_params(workdir, *OVERRIDES), load_final_params(reference, *OVERRIDES))


def _kill_points(seed, count):
    """`count` increasing steps spread over the run, and a random extra delay after each.

    The first is past the first checkpoint, so that every restart is a resume.
    """
    rng = np.random.default_rng(seed)
    steps = np.sort(rng.choice(np.arange(CHECKPOINT_EVERY + 1, NUM_STEPS - 10), size=count,
                               replace=False))
    return list(zip(steps.tolist(), rng.uniform(0.0, 0.05, size=count).tolist()))


def test_sigkill_ten_times_then_resume_equals_uninterrupted(tmp_path, env, uninterrupted):
    workdir, log_path = str(tmp_path / "run"), str(tmp_path / "train.log")
    cut_short = 0
    for life, (step, delay) in enumerate(_kill_points(seed=11, count=10)):
        resume_step = max(_committed_steps(workdir), default=0)
        with open(log_path, "w") as log:
            proc = _start(workdir, env, log)
            _wait_for_step(proc, workdir, max(step, resume_step + 1), log_path)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert _resumed_at(log_path) == resume_step, f"life {life} resumed elsewhere"
        logged = _last_logged_step(workdir)
        committed = max(_committed_steps(workdir), default=0)
        # Metrics of a step are written before its checkpoint: at most one interval is lost.
        assert 0 <= logged - committed <= CHECKPOINT_EVERY, (life, logged, committed)
        cut_short += any(".orbax-checkpoint-tmp" in d
                         for d in os.listdir(os.path.join(workdir, "checkpoints")))
    resume_step = max(_committed_steps(workdir))
    proc = run_train(workdir, *OVERRIDES, env=env)
    assert f"at step {resume_step}." in proc.stdout
    _assert_same_run(workdir, uninterrupted)
    print(f"{cut_short} of 10 kills left a checkpoint write cut short")


def test_sigterm_loses_no_step_and_resume_equals_uninterrupted(tmp_path, env, uninterrupted):
    workdir, log_path = str(tmp_path / "run"), str(tmp_path / "train.log")
    for life, (step, delay) in enumerate(_kill_points(seed=12, count=3)):
        resume_step = max(_committed_steps(workdir), default=0)
        with open(log_path, "w") as log:
            proc = _start(workdir, env, log)
            _wait_for_step(proc, workdir, max(step, resume_step + 1), log_path)
            time.sleep(delay)
            reached = _last_logged_step(workdir)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == EXIT_PREEMPTED
        with open(log_path) as f:
            saved = int(re.findall(r"saved a checkpoint at step (\d+) ", f.read())[-1])
        assert _resumed_at(log_path) == resume_step, f"life {life} resumed elsewhere"
        # The step in flight is finished and saved: nothing logged is lost.
        assert saved >= reached and saved == max(_committed_steps(workdir))
        assert _last_logged_step(workdir) == saved
    proc = run_train(workdir, *OVERRIDES, env=env)
    assert f"at step {saved}." in proc.stdout
    _assert_same_run(workdir, uninterrupted)
