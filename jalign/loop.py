"""The one training loop: a single run of any algorithm.

`run(config, workdir)` owns jit (with in/out shardings and state donation), the
mesh, logging (metrics.jsonl, TensorBoard, a progress bar, the learning rate from
the schedule), evaluation and Orbax checkpoints. Restarted with the same workdir it
resumes from the latest checkpoint, data iterator position included. Multi-stage
runs are `jalign.pipeline.run_pipeline`; the CLI is `python -m jalign.train`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jalign import checkpoint as ckpt
from jalign import distributed, lora
from jalign import sharding as shd
from jalign.algorithms import ALGOS, Algorithm, get_algorithm
from jalign.algorithms.common import AlgorithmSetup
from jalign.config_utils import resolve_start, validate_config
from jalign.logging_utils import MetricsWriter, ProgressBar
from jalign.memory import memory_report
from jalign.models import pretrained
from jalign.models.attention import resolve_impl
from jalign.models.config import ModelConfig
from jalign.models.transformer import decoder_init_fn
from jalign.optim import make_optimizer
from jalign.steps.common import input_token_count
from jalign.state import (TrainState, abstract_with_shardings, checkpointed, init_train_state,
                          is_lora, model_view, with_base)

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


# The batch's input tokens (a per-step metric the reporter turns into TRL's cumulative
# num_tokens; not logged itself).
_STEP_TOKENS = "num_tokens/step"


def count_input_tokens(step_fn):
    """Wraps a step so that its metrics carry the batch's input tokens (non-padding tokens
    of every row the model reads, over the global batch: `input_token_count`)."""
    def counted(state, batch):
        state, metrics = step_fn(state, batch)
        return state, dict(metrics, **{_STEP_TOKENS: input_token_count(batch)})
    return counted


@dataclasses.dataclass
class _Run:
    """What one run is made of, built once before the first step."""
    config: ml_collections.ConfigDict
    workdir: str
    algo: Algorithm
    model_cfg: ModelConfig
    setup: AlgorithmSetup
    schedule: Any
    mesh: Any
    rules: Any
    state: TrainState
    state_shardings: Any
    p_step: Any
    batch_sharding: Any
    # The loop's counters at the first step (restored with the checkpoint).
    counters: dict = dataclasses.field(default_factory=dict)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains one algorithm as configured, resuming from `workdir` if it holds a checkpoint.

    Returns the summary dict (also written to WORKDIR/summary.json).
    """
    if config.pipeline.stages:
        raise ValueError("config.pipeline.stages is set: run it with jalign.pipeline.run_pipeline "
                         "(or python -m jalign.train)")
    r = _build(config, workdir)
    if r.setup.prepare is not None:  # e.g. a precompute pass over the data with the start params
        r.setup.prepare(model_view(r.state, r.setup.with_reference).params)
    data_iter = iter(r.setup.dataset(jax.process_index(), jax.process_count()))
    manager = ckpt.make_manager(os.path.join(workdir, "checkpoints"),
                                keep=config.train.keep_checkpoints,
                                async_save=config.train.get("async_checkpointing", True))
    evaluate = _evaluator(r)
    writer = MetricsWriter(workdir, enabled=_is_main())
    r.state, start_step = _restore(r, manager, data_iter, writer)
    evals = writer.read_evals()
    if start_step == 0 and evaluate is not None and config.train.eval_at_start:
        evals = [dict(step=0, **evaluate(r.state))]
        writer.write_eval(evals[0])
        if _is_main():
            print(f"step 0 eval: {evals[0]}")
    _train(r, data_iter, manager, writer, evaluate, evals, start_step)
    manager.wait_until_finished()
    _save_final(r)
    summary = r.setup.summarize(evals, writer.last_metrics) if r.setup.summarize else {
        "evals": evals, "final_metrics": writer.last_metrics}
    if _is_main():
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    writer.close()
    return summary


def _build(config, workdir: str) -> _Run:
    """Config -> algorithm, data, sharded state and the jitted step."""
    validate_config(config, algorithms=ALGOS)
    config, source = resolve_start(config)
    distributed.initialize(config)  # before anything touches devices; no-op when alone or done
    os.makedirs(workdir, exist_ok=True)
    algo = get_algorithm(config.algo)
    spec = algo.spec(config)
    model_cfg = ModelConfig.from_mapping(config.model)
    if _is_main():
        pretrained.write_run_model(workdir, model_cfg, config.data.tokenizer)
        print(_start_line(config, model_cfg, source))
    setup = algo.setup(config, model_cfg, spec, workdir)
    mesh = shd.make_mesh(config.mesh)
    rules = shd.rules_from_config(config.get("logical_axis_rules"))
    shd.check_context_parallel(mesh, rules)
    optimizer, schedule = make_optimizer(config.optimizer, config.train.num_steps,
                                         updates_per_step=algo.updates_per_step(config))
    state, state_shardings = init_train_state(
        setup.params_init_fn or decoder_init_fn(model_cfg), optimizer, mesh, rules,
        seed=config.seed, load_params=setup.load_params, with_reference=setup.with_reference,
        frozen_extra=setup.frozen_extra, model_cfg=model_cfg,
        frozen_subtrees=setup.frozen_subtrees)
    batch_sharding = shd.data_sharding(mesh, rules)
    step_fn = count_input_tokens(skip_nonfinite(algo.make_step(config, model_cfg, spec, optimizer)))
    p_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                     out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,))
    return _Run(config, workdir, algo, model_cfg, setup, schedule, mesh, rules, state,
                state_shardings, p_step, batch_sharding)


def _start_line(config, model_cfg: ModelConfig, source) -> str:
    """What the run trains: the model, where it comes from, its dtypes and tokenizer."""
    start = (f"{source.kind.replace('_', ' ')} folder {source.path}" if source is not None
             else f"fresh weights (seed {config.seed})")
    lora_note = ""
    if model_cfg.lora_rank:
        quant = model_cfg.lora_quantization
        lora_note = (f"; LoRA rank {model_cfg.lora_rank} on a frozen "
                     f"{quant if quant != 'none' else model_cfg.lora_base_dtype} base")
    attention = resolve_impl(model_cfg, int(config.data.max_length),
                             context_parallel=int(config.mesh.get("sequence", 1)) != 1)
    if model_cfg.attention_impl == "auto":
        attention += " (auto)"
    return (f"{config.algo}: a {model_cfg.family} model, {model_cfg.num_params() / 1e6:,.1f}M "
            f"parameters, from {start}; params {model_cfg.param_dtype}, compute "
            f"{model_cfg.dtype}{lora_note}; attention {attention}; tokenizer "
            f"{config.data.tokenizer or 'built-in (characters)'}")


def _evaluator(r: _Run):
    """state -> eval metrics, with "KL to the start" against the starting policy (with
    LoRA the base, read from the current state: donated steps replace its buffers)."""
    if r.setup.evaluate is None:
        return None
    kl_to_start = r.config.eval.kl_to_start
    start_copy = (jax.tree.map(jnp.copy, r.state.params)
                  if kl_to_start and not is_lora(r.state) else None)

    def evaluate(state):
        start = state.frozen["base"] if is_lora(state) and kl_to_start else start_copy
        return r.setup.evaluate(model_view(state).params, start)
    return evaluate


def _restore(r: _Run, manager, data_iter, writer) -> tuple[TrainState, int]:
    """(state, first step): the latest checkpoint's, or the fresh state at step 0."""
    if manager.latest_step() is None:
        writer.truncate_after(-1)  # a run killed before its first checkpoint starts over
        return r.state, 0
    abstract = abstract_with_shardings(checkpointed(r.state), checkpointed(r.state_shardings))
    start_step, restored = ckpt.restore(manager, abstract, data_iter)
    r.counters = ckpt.restore_counters(manager, start_step)
    writer.truncate_after(start_step)
    if _is_main():
        print(f"Resumed from {r.workdir} at step {start_step}.")
    return with_base(restored, r.state), start_step


def _train(r: _Run, data_iter, manager, writer, evaluate, evals, start_step: int) -> None:
    """The step loop: rollout (online RL), step, logging one step late, eval, checkpoints,
    SIGTERM -> checkpoint and exit EXIT_PREEMPTED."""
    train_cfg = r.config.train
    num_steps = train_cfg.num_steps
    progress = ProgressBar(num_steps, start_step, enabled=_is_main())
    reporter = _Reporter(writer, progress, train_cfg, r.schedule, start_step,
                         int(jax.device_get(r.state.step)), r.counters)
    preempted: list[bool] = []
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = (signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
                        if on_main_thread else None)
    state = r.state
    with jax.set_mesh(r.mesh), nn.logical_axis_rules(r.rules):
        for step in range(start_step, num_steps):
            host_batch = next(data_iter)
            rollout_metrics = {}
            if r.setup.rollout is not None:  # online RL: sample + score outside the pure step
                # More prompts (dynamic sampling) come from the same checkpointed iterator.
                host_batch, rollout_metrics = r.setup.rollout(
                    model_view(state, r.setup.with_reference), host_batch, step=step,
                    next_batch=lambda: next(data_iter))
            # Per-process pair/slot numbers become global before the batches are stacked.
            batch = _device_batch(distributed.globalize_slots(host_batch, r.batch_sharding),
                                  r.batch_sharding)
            if step == start_step and _is_main() and train_cfg.memory_report:
                progress.write(memory_report(state, r.p_step.lower(state, batch).compile()))
            state, metrics = r.p_step(state, batch)
            reporter.add(step, {**metrics, **rollout_metrics}, _batch_info(host_batch))
            done = step + 1
            if evaluate is not None and train_cfg.eval_every and (
                    done % train_cfg.eval_every == 0 or done == num_steps):
                result = dict(step=done, **evaluate(state))
                evals.append(result)
                writer.write_eval(result)
                progress.write(f"step {done} eval: {_fmt(result)}")
            if done % train_cfg.checkpoint_every == 0 or done == num_steps or preempted:
                # A checkpoint at step N means the metrics of steps <= N are on disk.
                reporter.flush()
                ckpt.save(manager, done, checkpointed(state), data_iter,
                          counters=reporter.counters(), force=bool(preempted))
            if preempted:
                manager.wait_until_finished()
                progress.close()
                print(f"SIGTERM: saved a checkpoint at step {done} in {r.workdir}; exiting with "
                      f"status {EXIT_PREEMPTED}. Run the same command again to resume.", flush=True)
                raise SystemExit(EXIT_PREEMPTED)
        reporter.flush()
    if previous_handler is not None:
        signal.signal(signal.SIGTERM, previous_handler)
    progress.close()
    r.state = state


def _save_final(r: _Run) -> None:
    """WORKDIR/final_params (with LoRA also final_adapters; final_params is then the
    merged dense model that later stages and export read)."""
    state = r.state
    if is_lora(state):
        ckpt.save_params(os.path.join(r.workdir, "final_adapters"), state.params)
        ckpt.save_params(os.path.join(r.workdir, "final_params"),
                         jax.jit(lambda p: lora.merge_adapters(p, r.model_cfg))(
                             model_view(state).params))
    else:
        ckpt.save_params(os.path.join(r.workdir, "final_params"), state.params)


def _is_main() -> bool:
    return jax.process_index() == 0


def _batch_info(host_batch) -> str:
    if "example_index" in host_batch:
        return f"example_index {np.asarray(host_batch['example_index']).tolist()}"
    return f"batch shapes {({k: np.shape(v) for k, v in host_batch.items()})}"


def _device_batch(batch: dict[str, Any], sharding) -> dict[str, jax.Array]:
    """Host arrays become global arrays; arrays already on the devices (an RL rollout
    built there, batch-sharded) pass through without a round trip to the host."""
    axes = sharding.spec[0] if len(sharding.spec) else None  # the batch dimension's mesh axes
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = int(np.prod([sharding.mesh.shape[a] for a in axes]))
    for key, value in batch.items():
        rows = np.shape(value)[0] * (1 if isinstance(value, jax.Array) else jax.process_count())
        if rows % ways:
            raise ValueError(
                f"a batch of {rows} rows ({key!r}) cannot be split over the {ways} devices of the "
                f"mesh axes {' x '.join(axes)}: make config.data.batch_size a multiple of {ways} "
                "(sequences; pairs count twice, RL prompts x rl.group_size), or set config.mesh")
    return {k: v if isinstance(v, jax.Array) else
            jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def _fmt(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


class SkipGuard:
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


class _Reporter:
    """Fetches each step's metrics one step late (no stall), adds the learning rate from
    the schedule, TRL's cumulative num_tokens and tokens/s, watches for non-finite steps
    and writes the log.

    The learning rate is the schedule at the state's update count (`state.step`
    before the step), which skipped steps do not advance: it is tracked here from
    the count at the start and the skips seen since, with no device round trip.
    `num_tokens` (input tokens seen so far) and `skipped_nonfinite_total` are exact
    Python ints saved with each checkpoint (`counters()`), so a resumed run logs what
    an uninterrupted one does.
    """

    def __init__(self, writer, progress, train_cfg, schedule, start_step: int,
                 start_state_step: int, counters: dict | None = None):
        self.writer, self.progress, self.train_cfg, self.schedule = writer, progress, train_cfg, schedule
        self.state_step_offset = start_state_step - start_step
        self.guard = SkipGuard(train_cfg.max_consecutive_skips)
        counters = counters or {}
        self.num_tokens = int(counters.get("num_tokens", 0))
        self.skips_before = int(counters.get("skipped_nonfinite_total", 0))
        self.pending = None
        self.tokens_since, self.time_since = 0, time.perf_counter()

    def counters(self) -> dict[str, int]:
        """What a checkpoint saves for the steps reported so far."""
        return {"num_tokens": self.num_tokens,
                "skipped_nonfinite_total": self.skips_before + self.guard.total}

    def add(self, step: int, metrics, info: str) -> None:
        """`metrics` of 0-based `step` (device values); reports the previous step's."""
        self.flush()
        self.pending = (step, metrics, info)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, metrics, info = self.pending
        self.pending = None
        done = step + 1
        metrics = jax.device_get(metrics)
        step_tokens = int(metrics.pop(_STEP_TOKENS, 0))
        metrics = {k: float(v) for k, v in metrics.items()}
        state_step = step + self.state_step_offset - self.guard.total  # skips before this step
        metrics["learning_rate"] = float(self.schedule(state_step))
        loss = metrics.get("loss")
        self.guard.observe(done, metrics.get("skipped_nonfinite", 0.0) > 0, loss, info,
                           self.progress)
        metrics["skipped_nonfinite_total"] = float(self.skips_before + self.guard.total)
        self.num_tokens += step_tokens
        self.tokens_since += step_tokens
        metrics["num_tokens"] = float(self.num_tokens)
        self.progress.update(done, loss)
        if done % self.train_cfg.log_every == 0 or done == self.train_cfg.num_steps:
            elapsed = time.perf_counter() - self.time_since
            metrics["tokens_per_second"] = self.tokens_since / max(elapsed, 1e-9)
            self.writer.write(done, metrics)
            self.progress.set_rate(metrics["tokens_per_second"])
            self.tokens_since, self.time_since = 0, time.perf_counter()
