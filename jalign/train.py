"""The one training entry point and loop.

    python -m jalign.train --config=configs/quickstart.py --workdir=/tmp/jalign_quickstart \
        [--config.train.num_steps=200 ...]

The loop owns jit (with in/out shardings and state donation), the mesh, logging
(metrics.jsonl, TensorBoard, a progress bar), evaluation and Orbax checkpoints.
Restarted with the same workdir it resumes from the latest checkpoint, data
iterator position included.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jalign import checkpoint as ckpt
from jalign import lora
from jalign import distributed
from jalign import sharding as shd
from jalign.algorithms import get_algorithm
from jalign.config_utils import validate_config
from jalign.logging_utils import MetricsWriter, ProgressBar
from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder
from jalign.optim import make_optimizer
from jalign.state import TrainState
from jalign.steps.common import reference_params


def decoder_init_fn(model_cfg: ModelConfig):
    """rng -> decoder params boxed with their logical axis names."""
    def init(rng):
        return Decoder(model_cfg).init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
    return init


def make_state_fn(optimizer, *, seed: int, with_reference: bool | str = False,
                  frozen_extra: dict | None = None, model_cfg: ModelConfig | None = None):
    """params -> TrainState: how the loop (and `jalign.aot`) builds a state from params.

    With `with_reference`, a frozen copy of the params (or of their subtree it
    names, e.g. "policy") is `frozen["reference"]`, with no optimizer state. With
    LoRA (`model_cfg.lora_rank > 0`) the params are split (`jalign.lora.split`):
    only the adapters (and scalar heads) are trained and get optimizer state; the
    rest is `frozen["base"]`, stored as `lora_base_dtype` / quantised. No
    reference copy is made then: the base without adapters *is* the reference.
    Works on boxed (logically annotated) and plain trees alike.
    """
    use_lora = model_cfg is not None and model_cfg.lora_rank > 0

    def state_from_params(params):
        frozen = dict(frozen_extra or {})
        if use_lora:
            params, base = lora.split(params)
            frozen["base"] = lora.freeze_base(base, model_cfg)
        elif with_reference:
            frozen["reference"] = params[with_reference] if isinstance(with_reference, str) else params
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed + 1),
                          frozen=frozen or None)
    return state_from_params


def init_train_state(params_init_fn, optimizer, mesh, rules, *, seed: int,
                     load_params=None, with_reference: bool | str = False,
                     frozen_extra: dict | None = None, model_cfg: ModelConfig | None = None):
    """Creates the train state already sharded (the full model never sits on one device).

    `params_init_fn(rng)` returns logically-annotated (boxed) params, e.g.
    `decoder_init_fn(model_cfg)`. `load_params(abstract_params)`, if given, returns
    starting params (a dict whose top-level entries replace the fresh ones; None
    keeps the fresh entry) placed on the shardings of `abstract_params`, e.g. an
    earlier stage's model. `with_reference`, `frozen_extra` and LoRA (from
    `model_cfg`): see `make_state_fn`. Returns (state, state_shardings).
    """
    state_from_params = make_state_fn(optimizer, seed=seed, with_reference=with_reference,
                                      frozen_extra=frozen_extra, model_cfg=model_cfg)
    key = jax.random.PRNGKey(seed)
    boxed_params = jax.eval_shape(params_init_fn, key)
    param_shardings = shd.logical_shardings(boxed_params, mesh, rules)
    shardings = shd.logical_shardings(jax.eval_shape(state_from_params, boxed_params), mesh, rules)
    with jax.set_mesh(mesh):
        params = jax.jit(lambda r: nn.meta.unbox(params_init_fn(r)),
                         out_shardings=param_shardings)(key)
        if load_params is not None:
            abstract = _abstract_with_shardings(params, param_shardings)
            if model_cfg is not None and model_cfg.lora_rank:
                abstract = lora.without_adapters(abstract)  # a base model; adapters start fresh
            loaded = load_params(abstract)
            params = _overlay(params, loaded)
        state = jax.jit(state_from_params, in_shardings=(param_shardings,),
                        out_shardings=shardings, donate_argnums=(0,))(params)
    return state, shardings


def _overlay(fresh, loaded):
    """`loaded` where given, `fresh` where `loaded` has None (nested dicts)."""
    if loaded is None:
        return fresh
    if isinstance(loaded, dict):
        return {k: _overlay(fresh[k], loaded.get(k)) for k in fresh}
    return loaded


# Exit status of a run stopped by SIGTERM after writing its checkpoint (EX_TEMPFAIL):
# launch scripts restart the same command, which resumes.
EXIT_PREEMPTED = 75


def skip_nonfinite(step_fn):
    """Wraps a step so that a non-finite loss or gradient norm leaves the state unchanged.

    The metrics gain `skipped_nonfinite` (1.0 for a skipped step); the loop logs the
    step and stops after `config.train.max_consecutive_skips` skips in a row.
    """
    def guarded(state, batch):
        new_state, metrics = step_fn(state, batch)
        ok = jnp.isfinite(metrics["loss"])
        if "grad_norm" in metrics:
            ok &= jnp.isfinite(metrics["grad_norm"])
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        return new_state, dict(metrics, skipped_nonfinite=(~ok).astype(jnp.float32))
    return guarded


def _batch_info(host_batch) -> str:
    if "example_index" in host_batch:
        return f"example_index {np.asarray(host_batch['example_index']).tolist()}"
    return f"batch shapes {({k: np.shape(v) for k, v in host_batch.items()})}"


def _abstract_with_shardings(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def _device_batch(batch: dict[str, Any], sharding) -> dict[str, jax.Array]:
    """Host arrays become global arrays; arrays already on the devices (an RL rollout
    built there, batch-sharded) pass through without a round trip to the host."""
    return {k: v if isinstance(v, jax.Array) else
            jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains as configured, resuming from `workdir` if it holds a checkpoint.

    Returns the summary dict (also written to WORKDIR/summary.json).
    """
    validate_config(config)
    distributed.initialize(config)  # before anything touches devices; no-op when alone or done
    if config.pipeline.stages:
        from jalign.pipeline import run_pipeline
        return run_pipeline(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh = shd.make_mesh(config.mesh)
    rules = shd.rules_from_config(config.get("logical_axis_rules"))
    algo = get_algorithm(config.algo)
    model_cfg = ModelConfig.from_mapping(config.model)
    setup = algo.setup(config, model_cfg, workdir)

    train_cfg = config.train
    optimizer, schedule = make_optimizer(config.optimizer, train_cfg.num_steps,
                                         updates_per_step=algo.updates_per_step(config))
    state, state_shardings = init_train_state(
        setup.params_init_fn or decoder_init_fn(model_cfg), optimizer, mesh, rules,
        seed=config.seed, load_params=setup.load_params, with_reference=setup.with_reference,
        frozen_extra=setup.frozen_extra, model_cfg=model_cfg)
    step_fn = algo.make_step(config, model_cfg, optimizer, schedule, setup)
    batch_sharding = shd.data_sharding(mesh, rules)
    p_step = jax.jit(skip_nonfinite(step_fn), in_shardings=(state_shardings, batch_sharding),
                     out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,))

    if setup.prepare is not None:
        # e.g. a precompute pass over the data with the start params
        setup.prepare(model_view(state, setup.with_reference).params)
    dataset = setup.dataset(jax.process_index(), jax.process_count())
    data_iter = iter(dataset)
    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"),
                                keep=train_cfg.keep_checkpoints,
                                async_save=train_cfg.get("async_checkpointing", True))
    # The starting policy, kept for "KL to the start" in evaluation (with LoRA, the
    # base: the model with its adapters disabled, no copy).
    start_copy = None
    if setup.evaluate is not None and config.eval.kl_to_start and not _is_lora(state):
        start_copy = jax.tree.map(jnp.copy, state.params)

    def evaluate(state):
        # The base is read from the current state: donated steps replace its buffers.
        start = state.frozen["base"] if _is_lora(state) and config.eval.kl_to_start else start_copy
        return setup.evaluate(model_view(state).params, start)
    start_step = 0
    is_main = jax.process_index() == 0
    writer = MetricsWriter(workdir, enabled=is_main)
    if manager.latest_step() is not None:
        abstract = _abstract_with_shardings(_checkpointed(state), _checkpointed(state_shardings))
        start_step, restored = ckpt.restore(manager, abstract, data_iter)
        state = _with_base(restored, state)
        writer.truncate_after(start_step)
        if is_main:
            print(f"Resumed from {workdir} at step {start_step}.")
    else:
        writer.truncate_after(-1)  # a run killed before its first checkpoint starts over
    evals = writer.read_evals()
    if start_step == 0 and setup.evaluate is not None and train_cfg.eval_at_start:
        evals = [dict(step=0, **evaluate(state))]
        writer.write_eval(evals[0])
        if is_main:
            print(f"step 0 eval: {evals[0]}")

    num_steps = train_cfg.num_steps
    progress = ProgressBar(num_steps, start_step, enabled=is_main)
    pending = None  # metrics of the previous step, fetched one step late (no stall)
    tokens_since, time_since = 0.0, time.perf_counter()
    guard = _SkipGuard(train_cfg.max_consecutive_skips)
    preempted = []
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True)) \
        if _on_main_thread() else None
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for step in range(start_step, num_steps):
            host_batch = next(data_iter)
            rollout_metrics = {}
            if setup.rollout is not None:  # online RL: sample + score outside the pure step
                host_batch, rollout_metrics = setup.rollout(
                    model_view(state, setup.with_reference), host_batch)
            # Per-process pair/slot numbers become global before the batches are stacked.
            batch = _device_batch(distributed.globalize_slots(host_batch, batch_sharding),
                                  batch_sharding)
            if step == start_step and is_main and train_cfg.memory_report:
                from jalign.aot import memory_report
                progress.write(memory_report(state, p_step.lower(state, batch).compile()))
            state, metrics = p_step(state, batch)
            metrics = {**metrics, **rollout_metrics}
            if pending is not None:
                tokens_since, time_since = _report(pending, writer, progress, train_cfg,
                                                   tokens_since, time_since)
            pending = (step + 1, metrics, _batch_info(host_batch), guard)
            done = step + 1
            if setup.evaluate is not None and train_cfg.eval_every and (
                    done % train_cfg.eval_every == 0 or done == num_steps):
                result = dict(step=done, **evaluate(state))
                evals.append(result)
                writer.write_eval(result)
                progress.write(f"step {done} eval: {_fmt(result)}")
            if done % train_cfg.checkpoint_every == 0 or done == num_steps or preempted:
                # Log everything up to this step first: a checkpoint at step N means
                # the metrics of steps <= N are on disk.
                tokens_since, time_since = _report(pending, writer, progress, train_cfg,
                                                   tokens_since, time_since)
                pending = None
                ckpt.save(manager, done, _checkpointed(state), data_iter, force=bool(preempted))
            if preempted:
                manager.wait_until_finished()
                progress.close()
                print(f"SIGTERM: saved a checkpoint at step {done} in {workdir}; exiting with "
                      f"status {EXIT_PREEMPTED}. Run the same command again to resume.", flush=True)
                raise SystemExit(EXIT_PREEMPTED)
        if pending is not None:
            _report(pending, writer, progress, train_cfg, tokens_since, time_since)
    if previous_handler is not None:
        signal.signal(signal.SIGTERM, previous_handler)
    manager.wait_until_finished()
    progress.close()
    if _is_lora(state):
        # The adapters (small), and the merged dense model later stages and export read.
        ckpt.save_params(os.path.join(workdir, "final_adapters"), state.params)
        ckpt.save_params(os.path.join(workdir, "final_params"),
                         jax.jit(lambda p: lora.merge_adapters(p, model_cfg))(
                             model_view(state).params))
    else:
        ckpt.save_params(os.path.join(workdir, "final_params"), state.params)
    summary = setup.summarize(evals, writer.last_metrics) if setup.summarize else {
        "evals": evals, "final_metrics": writer.last_metrics}
    if is_main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    writer.close()
    return summary


def _is_lora(state) -> bool:
    return bool(state.frozen) and "base" in state.frozen


def model_view(state: TrainState, with_reference: bool | str = False) -> TrainState:
    """The state as code outside the step sees it: with LoRA, `params` is the whole
    model (base + adapters, a dict union, no copy) and, if the algorithm keeps a
    reference, `frozen["reference"]` is the base (adapters disabled). Without LoRA
    the state itself."""
    if not _is_lora(state):
        return state
    frozen = dict(state.frozen)
    if with_reference:
        frozen["reference"] = reference_params(
            state.frozen, with_reference if isinstance(with_reference, str) else None)
    return state.replace(params=lora.merge(state.frozen["base"], state.params), frozen=frozen)


def _checkpointed(state):
    """What a checkpoint holds: with LoRA, everything but the frozen base (adapters-only
    checkpoints; the base is rebuilt from `init_from` / the seed on restart)."""
    if not _is_lora(state):
        return state
    frozen = {k: v for k, v in state.frozen.items() if k != "base"}
    return state.replace(frozen=frozen or None)


def _with_base(restored, state):
    if not _is_lora(state):
        return restored
    return restored.replace(frozen={**(restored.frozen or {}), "base": state.frozen["base"]})


def _fmt(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _on_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


class _SkipGuard:
    """Counts consecutive skipped (non-finite) steps on the host."""

    def __init__(self, limit: int):
        self.limit, self.consecutive, self.total = limit, 0, 0

    def observe(self, step: int, skipped: bool, loss: float, info: str, progress) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        progress.write(f"step {step}: non-finite loss or gradients (loss={loss}); the update was "
                       f"skipped, state unchanged ({info}).")
        if self.consecutive >= self.limit:
            raise FloatingPointError(
                f"step {step}: {self.consecutive} consecutive steps had a non-finite loss or "
                f"gradients (config.train.max_consecutive_skips={self.limit}); stopping. The last "
                "good checkpoint is kept in the workdir. Lower config.optimizer.learning_rate or "
                "check the data, then rerun to resume.")


def _report(pending, writer, progress, train_cfg, tokens_since, time_since):
    step, metrics, info, guard = pending
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    loss = metrics.get("loss")
    guard.observe(step, metrics.get("skipped_nonfinite", 0.0) > 0, loss, info, progress)
    metrics["skipped_nonfinite_total"] = float(guard.total)
    tokens_since += metrics.get("num_tokens", 0.0)
    progress.update(step, loss)
    if step % train_cfg.log_every == 0 or step == train_cfg.num_steps:
        elapsed = time.perf_counter() - time_since
        metrics["tokens_per_second"] = tokens_since / max(elapsed, 1e-9)
        writer.write(step, metrics)
        progress.set_rate(metrics["tokens_per_second"])
        tokens_since, time_since = 0.0, time.perf_counter()
    return tokens_since, time_since


def main(argv):
    del argv
    from absl import flags, logging  # imported here so library users never parse flags
    logging.set_verbosity(logging.WARNING)  # Orbax/absl INFO lines drown the progress bar
    config = flags.FLAGS.config
    distributed.initialize(config)  # first: multi-process runs join their group here
    run(config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a configs/NAME.py file[:arg].",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.json.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
