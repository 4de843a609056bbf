"""Train state as data, and how it is built, viewed and checkpointed.

`TrainState` is a pytree of (step, params, opt_state, rng, frozen). `frozen` holds
trees that are used but not trained, sharded like the params, with no optimizer
state: `"reference"` (DPO's frozen reference), `"base"` (LoRA's frozen base, of
which `params` holds only the adapters), `"kl_coef"` (PPO), `"teacher"` (distillation's
teacher, a frozen subtree of the initial params: `frozen_subtrees`). `make_state_fn` /
`init_train_state` build a state (already sharded) from an init function; the loop,
the fit check (`jalign.aot`), tests and benchmarks all use them.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jalign import lora
from jalign import sharding as shd
from jalign.models.config import ModelConfig


@flax.struct.dataclass
class TrainState:
    """Everything a step needs and a checkpoint saves.

    The RNG for step k is `jax.random.fold_in(rng, step)`, derived from the state,
    so a resumed run draws the same randomness as an uninterrupted one.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    frozen: Any = None

    def step_rng(self) -> jax.Array:
        return jax.random.fold_in(self.rng, self.step)


def model_params(params: Any, frozen: Mapping[str, Any] | None) -> Any:
    """The model's params as a loss sees them: with LoRA, the trained adapters over
    `frozen["base"]` (a dict union; gradients reach only the adapters)."""
    if frozen and "base" in frozen:
        return lora.merge(frozen["base"], params)
    return params


def reference_params(frozen: Mapping[str, Any], subtree: str | None = None) -> Any:
    """The frozen reference: `frozen["reference"]`, or with LoRA the base model with
    its adapters disabled (`frozen["base"]`, or its `subtree`), so no copy exists."""
    if "reference" in frozen:
        return frozen["reference"]
    base = frozen["base"]
    return base[subtree] if subtree else base


def is_lora(state: TrainState) -> bool:
    return bool(state.frozen) and "base" in state.frozen


def make_state_fn(optimizer, *, seed: int, with_reference: bool | str = False,
                  frozen_extra: dict | None = None, model_cfg: ModelConfig | None = None,
                  frozen_subtrees: tuple[str, ...] = ()):
    """params -> TrainState: how a state is built from params.

    With `with_reference`, a frozen copy of the params (or of their subtree it
    names, e.g. "policy") is `frozen["reference"]`, with no optimizer state. With
    LoRA (`model_cfg.lora_rank > 0`) the params are split (`jalign.lora.split`):
    only the adapters (and scalar heads) are trained and get optimizer state; the
    rest is `frozen["base"]`, stored as `lora_base_dtype` / quantised. No
    reference copy is made then: the base without adapters *is* the reference.
    `frozen_subtrees` names top-level entries of the params (e.g. a distillation
    teacher of another architecture) moved to `frozen` before anything else: they are
    initialised, loaded and sharded by their own logical axes like the params, and
    get no optimizer state. Works on boxed (logically annotated) and plain trees alike.
    """
    use_lora = model_cfg is not None and model_cfg.lora_rank > 0

    def state_from_params(params):
        frozen = dict(frozen_extra or {})
        if frozen_subtrees:
            params = dict(params)
            frozen.update({name: params.pop(name) for name in frozen_subtrees})
        if use_lora:
            params, base = lora.split(params)
            frozen["base"] = lora.freeze_base(base, model_cfg)
        elif with_reference:
            frozen["reference"] = params[with_reference] if isinstance(with_reference, str) else params
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed + 1),
                          frozen=frozen or None)
    return state_from_params


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def abstract_train_state(params_init_fn, optimizer, mesh, rules, *, seed: int,
                         with_reference: bool | str = False, frozen_extra: dict | None = None,
                         model_cfg: ModelConfig | None = None,
                         frozen_subtrees: tuple[str, ...] = ()):
    """(state as sharded ShapeDtypeStructs, state shardings), without allocating anything:
    the derivation `init_train_state` uses, stopped before any array exists."""
    state_from_params = make_state_fn(optimizer, seed=seed, with_reference=with_reference,
                                      frozen_extra=frozen_extra, model_cfg=model_cfg,
                                      frozen_subtrees=frozen_subtrees)
    boxed = jax.eval_shape(lambda r: state_from_params(params_init_fn(r)),
                           jax.ShapeDtypeStruct((2,), jnp.uint32))
    shardings = shd.logical_shardings(boxed, mesh, rules)
    return abstract_with_shardings(nn.meta.unbox(boxed), shardings), shardings


def init_train_state(params_init_fn, optimizer, mesh, rules, *, seed: int,
                     load_params=None, with_reference: bool | str = False,
                     frozen_extra: dict | None = None, model_cfg: ModelConfig | None = None,
                     frozen_subtrees: tuple[str, ...] = ()):
    """Creates the train state already sharded (the full model never sits on one device).

    `params_init_fn(rng)` returns logically-annotated (boxed) params, e.g.
    `jalign.models.decoder_init_fn(model_cfg)`. `load_params(abstract_params)`, if
    given, returns starting params (a dict whose top-level entries replace the fresh
    ones; None keeps the fresh entry) placed on the shardings of `abstract_params`,
    e.g. an earlier stage's model. `with_reference`, `frozen_extra` and LoRA (from
    `model_cfg`): see `make_state_fn`. Returns (state, state_shardings).
    """
    state_from_params = make_state_fn(optimizer, seed=seed, with_reference=with_reference,
                                      frozen_extra=frozen_extra, model_cfg=model_cfg,
                                      frozen_subtrees=frozen_subtrees)
    key = jax.random.PRNGKey(seed)
    boxed_params = jax.eval_shape(params_init_fn, key)
    param_shardings = shd.logical_shardings(boxed_params, mesh, rules)
    shardings = shd.logical_shardings(jax.eval_shape(state_from_params, boxed_params), mesh, rules)
    with jax.set_mesh(mesh):
        params = jax.jit(lambda r: nn.meta.unbox(params_init_fn(r)),
                         out_shardings=param_shardings)(key)
        if load_params is not None:
            abstract = abstract_with_shardings(params, param_shardings)
            if model_cfg is not None and model_cfg.lora_rank:
                abstract = lora.without_adapters(abstract)  # a base model; adapters start fresh
            params = _overlay(params, load_params(abstract))
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


def model_view(state: TrainState, with_reference: bool | str = False) -> TrainState:
    """The state as code outside the step sees it: with LoRA, `params` is the whole
    model (base + adapters, a dict union, no copy) and, if the algorithm keeps a
    reference, `frozen["reference"]` is the base (adapters disabled). Without LoRA
    the state itself."""
    if not is_lora(state):
        return state
    frozen = dict(state.frozen)
    if with_reference:
        frozen["reference"] = reference_params(
            state.frozen, with_reference if isinstance(with_reference, str) else None)
    return state.replace(params=model_params(state.params, state.frozen), frozen=frozen)


def checkpointed(state: TrainState) -> TrainState:
    """What a checkpoint holds: with LoRA, everything but the frozen base (adapters-only
    checkpoints; the base is rebuilt from `init_from` / the seed on restart)."""
    if not is_lora(state):
        return state
    frozen = {k: v for k, v in state.frozen.items() if k != "base"}
    return state.replace(frozen=frozen or None)


def with_base(restored: TrainState, state: TrainState) -> TrainState:
    """A restored (adapters-only) checkpoint completed with `state`'s frozen base."""
    if not is_lora(state):
        return restored
    return restored.replace(frozen={**(restored.frozen or {}), "base": state.frozen["base"]})
