"""Faults in the middle of a run: a checkpoint write cut short, one batch whose loss is NaN."""

import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np

import jalign.algorithms as algorithms
from jalign.models.config import ModelConfig
from jalign.loop import run
from tests.train_helpers import (cached_env, load_final_params, parse_config, read_metrics,
                                 run_train)


def test_checkpoint_cut_short_is_never_restored(tmp_path):
    """Orbax writes step N into N.orbax-checkpoint-tmp-<time>/ and renames it to N/ only once
    complete, so a process killed mid-save leaves the tmp folder: the restart must restore the
    last committed step, retrain from there and end where the uninterrupted run ends."""
    overrides = ("--config.train.num_steps=12", "--config.train.checkpoint_every=4",
                 "--config.train.eval_every=0", "--config.train.eval_at_start=False",
                 "--config.train.log_every=1", "--config.train.async_checkpointing=False")
    env = cached_env(tmp_path / "jax_cache")
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    run_train(full, *overrides, env=env)
    shutil.copytree(full, cut)
    # The state of a run killed while saving step 12 (its metrics are logged, the save is not).
    checkpoints = os.path.join(cut, "checkpoints")
    partial = os.path.join(checkpoints, "12.orbax-checkpoint-tmp-1767225600")
    os.rename(os.path.join(checkpoints, "12"), partial)
    os.remove(os.path.join(partial, "commit_success.txt"))
    shutil.rmtree(os.path.join(partial, "state"))
    shutil.rmtree(os.path.join(cut, "final_params"))
    os.remove(os.path.join(cut, "summary.json"))
    assert sorted(read_metrics(cut)) == list(range(1, 13))

    proc = run_train(cut, *overrides, env=env)
    assert re.search(r"Resumed from .* at step 8\.", proc.stdout), proc.stdout[-2000:]
    resumed, expected = read_metrics(cut), read_metrics(full)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(9, 13):
        np.testing.assert_allclose(resumed[step]["loss"], expected[step]["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 load_final_params(cut, *overrides), load_final_params(full, *overrides))
    assert os.path.isdir(os.path.join(checkpoints, "12"))


def test_one_nan_batch_is_skipped_and_the_run_recovers(tmp_path, monkeypatch, capfd):
    """The 6th batch makes the loss and the update NaN. The guard keeps the state of step 5,
    logs step 6 as skipped, and the run goes on from there to the clean run's quality."""
    config = parse_config("--config.train.num_steps=40", "--config.train.eval_every=0",
                          "--config.train.eval_at_start=False", "--config.train.log_every=1",
                          "--config.train.checkpoint_every=40")
    clean = str(tmp_path / "clean")
    run(config, clean)

    sft = algorithms.get_algorithm("sft")
    setup = sft.setup(config, ModelConfig.from_mapping(config.model), None, clean)
    batches = iter(setup.dataset(0, 1))
    poison_tokens = [next(batches) for _ in range(6)][-1]["tokens"]

    def make_step_with_a_nan_batch(*args):
        step = sft.make_step(*args)

        def poisoned(state, batch):
            new_state, metrics = step(state, batch)
            hit = jnp.array_equal(batch["tokens"], poison_tokens)
            # NaN everywhere an overflow would put it: the loss and every float in the state.
            new_state = jax.tree.map(
                lambda x: jnp.where(hit, jnp.nan, x) if jnp.issubdtype(x.dtype, jnp.floating)
                else x, new_state)
            return new_state, dict(metrics, loss=jnp.where(hit, jnp.nan, metrics["loss"]))
        return poisoned

    monkeypatch.setitem(algorithms._ALGORITHMS, "sft",
                        algorithms.Algorithm(sft.spec, sft.setup, make_step_with_a_nan_batch))
    poisoned_run = str(tmp_path / "nan")
    capfd.readouterr()
    run(config, poisoned_run)
    out = "".join(capfd.readouterr())

    got, want = read_metrics(poisoned_run), read_metrics(clean)
    assert [s for s in got if got[s]["skipped_nonfinite"]] == [6]
    assert np.isnan(got[6]["loss"]) and got[40]["skipped_nonfinite_total"] == 1
    assert "step 6: non-finite loss or gradients (loss=nan); the update was skipped" in out
    for step in range(1, 6):  # the same run up to the bad batch
        np.testing.assert_allclose(got[step]["loss"], want[step]["loss"], rtol=1e-6)
    # State unchanged by step 6: step 7 runs with step 6's learning rate (the warm-up's).
    np.testing.assert_allclose(got[7]["learning_rate"], want[6]["learning_rate"], rtol=1e-6)
    assert got[7]["learning_rate"] != want[7]["learning_rate"]
    # Training went on: every later loss is finite, and the run ends where the clean one does.
    assert all(np.isfinite(got[s]["loss"]) for s in range(7, 41))
    final_got = np.mean([got[s]["loss"] for s in range(31, 41)])
    final_want = np.mean([want[s]["loss"] for s in range(31, 41)])
    assert final_want < 0.5 * want[1]["loss"]
    np.testing.assert_allclose(final_got, final_want, rtol=0.05)
