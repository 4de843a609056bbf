"""The training entry point end to end: quickstart and actionable errors (kill-and-resume:
tests/test_soak.py)."""

import json
import os

import jax
import numpy as np
import pytest

from jalign import sharding as shd
from tests.train_helpers import ROOT, parse_config, read_metrics, run_train


def test_quickstart_test_variant_writes_outputs(tmp_path):
    workdir = str(tmp_path / "run")
    proc = run_train(workdir)
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["initial"]["step"] == 0 and summary["final"]["step"] == 6
    for key in ("gold_reward/greedy", "gold_reward/sampled", "kl/ref", "completions/mean_length"):
        assert np.isfinite(summary["final"][key]), key
    metrics = read_metrics(workdir)
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "num_tokens", "mean_token_accuracy", "entropy", "grad_norm",
                "learning_rate", "tokens_per_second"):
        assert key in metrics[6], key
    assert "held-out gold reward" in proc.stdout
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_quickstart_pipeline_runs_all_stages(tmp_path):
    workdir = str(tmp_path / "pipe")
    proc = run_train(workdir, config="configs/quickstart.py:test")
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert set(summary["table"]) == {"base", "sft", "reward", "dpo"}
    assert "pref. acc." in proc.stdout
    dpo = read_metrics(os.path.join(workdir, "dpo"))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
        assert np.isfinite(dpo[4][key]), key
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000


def test_config_typo_is_named(tmp_path):
    proc = run_train(str(tmp_path / "w"), "--config.train.num_stesp=3", check=False)
    assert proc.returncode != 0
    assert "num_stesp" in proc.stderr


def test_a_pipeline_stage_flag_may_set_any_key_of_the_config():
    # configs/distill_tiny.py's `distill` stage overrides only init_from, train and
    # optimizer: the flags add a section, a nested section and a key beside existing ones,
    # each typed like the whole config's key.
    config = parse_config("--config.pipeline.distill.distill.beta=0",
                          "--config.pipeline.distill.rl.num_iterations=2",
                          "--config.pipeline.distill.train.log_every=5",
                          "--config.pipeline.teacher.data.demo_quality=1",
                          "--config.pipeline.stages=teacher=sft,distill",
                          config="configs/distill_tiny.py:test")
    stage = config.pipeline.distill
    assert stage.distill.to_dict() == {"beta": 0.0} and isinstance(stage.distill.beta, float)
    assert stage.rl.num_iterations == 2
    assert stage.train.log_every == 5 and stage.train.num_steps == 3  # the file's value kept
    assert config.pipeline.teacher.data.demo_quality == 1.0
    assert config.distill.beta == 0.5  # the other stages keep the whole config's value
    from jalign import pipeline
    assert pipeline.stage_config(config, "distill", "").distill.beta == 0.0


@pytest.mark.parametrize("flag, message", [
    ("--config.pipeline.distill.distill.betaa=0", "no key config.distill.betaa"),
    ("--config.pipeline.distill.distill.beta=abc", "expected a float"),
    ("--config.pipeline.distill.distill=0", "config.distill is a section"),
    ("--config.pipeline.distill.train.eval_at_start=maybe", "expected true or false"),
])
def test_a_bad_pipeline_stage_flag_is_named(flag, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_config(flag, config="configs/distill_tiny.py:test")
    assert flag in str(e.value)


def test_checkpoint_of_another_model_shape_is_named(tmp_path):
    workdir = str(tmp_path / "w")
    run_train(workdir, "--config.train.eval_every=0", "--config.train.eval_at_start=False")
    proc = run_train(workdir, "--config.model.hidden_size=64", "--config.model.intermediate_size=96",
                "--config.train.num_steps=8", check=False)
    assert proc.returncode != 0
    assert "another model shape" in proc.stderr and "embed" in proc.stderr


def test_mesh_that_does_not_divide_devices():
    with pytest.raises(ValueError, match=r"needs 3 devices but 8 are available"):
        shd.make_mesh({"data": 3, "fsdp": 1}, jax.devices()[:8])
    with pytest.raises(ValueError, match=r"do not divide the 8"):
        shd.make_mesh({"data": 3, "fsdp": -1}, jax.devices()[:8])
    mesh = shd.make_mesh({"data": 2, "fsdp": -1}, jax.devices()[:8])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}


def test_non_finite_steps_are_skipped_then_stop_names_the_step():
    import jax.numpy as jnp
    from jalign.logging_utils import ProgressBar
    from jalign.loop import SkipGuard as _SkipGuard, skip_nonfinite

    def step(state, batch):
        loss = jnp.sum(batch["x"])
        return {"w": state["w"] + 1.0}, {"loss": loss, "grad_norm": loss}

    guarded = jax.jit(skip_nonfinite(step))
    state = {"w": jnp.zeros(2)}
    state, m = guarded(state, {"x": jnp.array([1.0, jnp.nan])})
    assert float(m["skipped_nonfinite"]) == 1.0 and np.all(np.asarray(state["w"]) == 0)
    state, m = guarded(state, {"x": jnp.array([1.0, 2.0])})
    assert float(m["skipped_nonfinite"]) == 0.0 and np.all(np.asarray(state["w"]) == 1)

    guard = _SkipGuard(limit=2)
    bar = ProgressBar(20, 0, enabled=False)
    guard.observe(16, True, float("nan"), "example_index [3]", bar)
    with pytest.raises(FloatingPointError, match="step 17: 2 consecutive steps"):
        guard.observe(17, True, float("nan"), "example_index [4]", bar)


def test_bad_data_row_names_file_line_and_field(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "sort: 3 1\\n", "completion": "1 3"}\n'
                    '{"prompt": "sort: 2 1\\n"}\n')
    proc = run_train(str(tmp_path / "w"), "--config.data.source=jsonl", f"--config.data.path={data}",
                check=False)
    assert proc.returncode != 0
    assert f"{data}:2: field 'completion' is missing" in proc.stderr
    # The same file with on_bad_row=skip trains and reports the skip.
    proc = run_train(str(tmp_path / "w2"), "--config.data.source=jsonl", f"--config.data.path={data}",
                "--config.data.on_bad_row=skip")
    assert "missing_field" in proc.stdout or "missing" in proc.stdout


def test_persistent_nan_is_skipped_then_stops_the_run(tmp_path, monkeypatch):
    """From step 4 on the loss is NaN: each step is skipped (state unchanged, so the poison
    persists), logged in metrics.jsonl, and the 5th consecutive skip stops the run naming it."""
    import importlib.util

    import jax.numpy as jnp
    import jalign.algorithms as algorithms
    from jalign.loop import run

    original = algorithms.get_algorithm("sft").make_step

    def make_step_with_a_nan(*args):
        step = original(*args)

        def poisoned(state, batch):
            new_state, metrics = step(state, batch)
            return new_state, dict(metrics, loss=jnp.where(state.step >= 3, jnp.nan, metrics["loss"]))
        return poisoned

    monkeypatch.setitem(algorithms._ALGORITHMS, "sft", algorithms.Algorithm(
        algorithms.get_algorithm("sft").spec, algorithms.get_algorithm("sft").setup,
        make_step_with_a_nan))
    spec = importlib.util.spec_from_file_location("qs", os.path.join(ROOT, "configs", "quickstart.py"))
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    config = quickstart.get_config("sft,test")
    config.train.num_steps = 20
    config.train.eval_every = 0
    config.train.eval_at_start = False
    config.train.checkpoint_every = 2
    workdir = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match="step 8: 5 consecutive steps had a non-finite"):
        run(config, workdir)
    metrics = read_metrics(workdir)
    assert [metrics[s]["skipped_nonfinite"] for s in range(1, 8)] == [0, 0, 0, 1, 1, 1, 1]
    assert all(np.isfinite(metrics[s]["loss"]) for s in (1, 2, 3))
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))  # the last good state is kept


@pytest.mark.parametrize("overrides, where", [
    (("--config.data.source=jsonl", "--config.data.path=tests/bad_inputs/sft_malformed_json.jsonl"),
     "tests/bad_inputs/sft_malformed_json.jsonl:2: line is not valid JSON"),
    (("--config.dpo.loss_type=sigmiod", "--config.algo=dpo"),
     "config.dpo.loss_type 'sigmiod' is not known"),
    (("--config.trian.num_steps=3",), 'Did you mean "train"'),
    (("--config.pipeline.sft.train.num_stepz=3",), "no key config.train.num_stepz"),
])
def test_a_data_or_config_error_ends_the_cli_with_one_line(tmp_path, overrides, where):
    proc = run_train(str(tmp_path / "w"), *overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and where in errors[0], proc.stderr[-3000:]
    debug = run_train(str(tmp_path / "d"), *overrides, "--debug", check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_implicit_prompt_pairs_train_exactly_like_explicit_ones(tmp_path):
    from jalign.loop import run
    from jalign.tasks import get_task
    from tests.train_helpers import parse_config

    # Pairs whose answers differ from their first character and whose prompt does not end
    # in a space: their shared prefix is exactly the prompt.
    pairs = [p for p in get_task("sort").preference_pairs(96, seed=3)
             if p["chosen"][:1] != p["rejected"][:1] and not p["prompt"].endswith(" ")][:48]
    explicit, implicit = tmp_path / "explicit.jsonl", tmp_path / "implicit.jsonl"
    explicit.write_text("".join(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")})
                                + "\n" for p in pairs))
    implicit.write_text("".join(json.dumps({"chosen": p["prompt"] + p["chosen"],
                                            "rejected": p["prompt"] + p["rejected"]}) + "\n"
                                for p in pairs))
    losses = {}
    for name, path in (("explicit", explicit), ("implicit", implicit)):
        config = parse_config("--config.algo=dpo", "--config.data.source=jsonl",
                              f"--config.data.path={path}", "--config.train.num_steps=3",
                              "--config.train.log_every=1", "--config.train.eval_every=0",
                              "--config.train.eval_at_start=False", "--config.train.memory_report=False")
        run(config, str(tmp_path / name))
        losses[name] = [read_metrics(str(tmp_path / name))[s]["loss"] for s in (1, 2, 3)]
    assert losses["implicit"] == losses["explicit"]
