"""Fit check: compiles the configured train step for a TPU slice, on any machine.

    python -m jalign.aot --config=configs/dpo_8b.py --topology=v5p:2x4x4 \
        [--config.data.batch_size=32 ...] [--hbm_gib=95] [--json=fit.json]

Builds exactly the step `python -m jalign.train` would run (same algorithm step,
mesh from config.mesh, shardings from the logical-axis rules, donated state), but
from abstract shapes only: the state comes from `jax.eval_shape`, the batch is a
`jax.ShapeDtypeStruct` per key at config.data.batch_size x max_length. Nothing the
size of the model is ever allocated. The step is lowered and compiled by the real
TPU compiler through libtpu's compile-only client (no TPU needed) and the per-device
memory XLA plans is printed against the chip's HBM:

    arguments + outputs - aliased (donated state) + temporaries + code  vs  HBM

Topologies are libtpu names, "GEN:AxB[xC]" in chips: v5e:2x2 (v5e-4), v5p:2x2x2
(v5p-16: v5p slices count 2 TensorCores per chip), v5p:2x4x4 (v5p-64), v6e:4x4,
v4:2x2x4. Exit status: 0 fits, 1 does not fit, 2 the check could not run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging
from jax.experimental import topologies
from ml_collections import config_flags

from jalign import sharding as shd
from jalign.algorithms import ALGOS, get_algorithm
from jalign.algorithms.common import AlgorithmSetup
from jalign.config_utils import resolve_start, validate_config
from jalign.memory import GIB, format_bytes as _size, per_device_bytes
from jalign.models.config import ModelConfig
from jalign.models.heads import scalar_model_init_fn
from jalign.models.transformer import decoder_init_fn
from jalign.optim import make_optimizer
from jalign.state import abstract_train_state
# HBM per chip (one JAX device per chip on all of these).
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
_ROW_KEYS = ("tokens", "loss_mask", "segment_ids", "positions")


class TopologyUnavailableError(RuntimeError):
    """libtpu's compile-only client cannot be loaded here."""


class DoesNotFitError(RuntimeError):
    """The compiler rejected the step for lack of device memory."""


def topology_devices(topology: str) -> list:
    """The devices of a TPU slice, e.g. "v5p:2x4x4", from libtpu (no TPU needed)."""
    # A compile-only client opens no chip, so it may share libtpu with other processes.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        try:
            desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
        except Exception as e:
            if "chips_per_host_bounds" not in str(e):
                raise
            # A slice smaller than one host (e.g. v5e:1x1, Colab's single chip): the
            # host holds exactly the slice.
            dims = [int(d) for d in topology.split(":")[1].split("x")]
            desc = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                                chips_per_host_bounds=tuple(dims + [1] * (3 - len(dims))))
        return list(desc.devices)
    except (ImportError, ModuleNotFoundError) as e:
        raise TopologyUnavailableError(
            f"TPU compile-only client unavailable ({e}); install libtpu, e.g. "
            "pip install 'jax[tpu]'") from e
    except Exception as e:  # libtpu raises JaxRuntimeError / RuntimeError variants
        message = str(e)
        if "libtpu" in message.lower() or "plugin" in message.lower():
            raise TopologyUnavailableError(
                f"TPU compile-only client unavailable: {message.splitlines()[0]}") from e
        raise ValueError(f"topology {topology!r} is not known to libtpu: "
                         f"{message.splitlines()[0]} (examples: v5e:2x2, v5p:2x2x2, "
                         "v6e:4x4)") from e


def hbm_bytes(topology: str, override_gib: float = 0.0) -> int:
    if override_gib:
        return int(override_gib * GIB)
    generation = topology.split(":")[0].lower()
    if generation not in HBM_GIB:
        raise ValueError(f"no HBM size known for {generation!r} (known: {sorted(HBM_GIB)}); "
                         "pass --hbm_gib")
    return int(HBM_GIB[generation] * GIB)


def abstract_batch(config: ml_collections.ConfigDict, spec=None) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch the configured algorithm's step reads, at its largest (max_length) width.

    SFT: tokens, loss_mask, segment_ids, positions [B, T]. Paired (dpo, reward):
    those plus sequence_index over 2B rows (padded) or max(B, 2) packed rows, and
    pair_mask, example_index [B]. KTO: B rows, the kl_* copies and label [B].
    Precomputed references add their float [B] log-probs. `spec`: the algorithm's
    spec (read from the config when not given).
    """
    b, t = int(config.data.batch_size), int(config.data.max_length)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    algo = config.algo
    if algo == "sft":
        return {k: i32(b, t) for k in _ROW_KEYS}
    if algo not in ("dpo", "reward", "kto"):
        raise ValueError(f"jalign.aot has no batch layout for config.algo={algo!r}; "
                         "supported: sft, dpo, reward, kto")
    slots = {"pair_mask": f32(b), "example_index": i32(b)}
    if spec is None:
        spec = get_algorithm(algo).spec(config)
    reference = getattr(spec, "reference", "none")
    if algo == "kto":
        rows = {k: i32(b, t) for k in (*_ROW_KEYS, "sequence_index")}
        rows |= {f"kl_{k}": v for k, v in rows.items()}
        extra = ("label",) + (("ref_logps", "ref_kl_logps") if reference == "precomputed" else ())
    else:
        r = max(b, 2) if config.data.packing else 2 * b
        rows = {k: i32(r, t) for k in (*_ROW_KEYS, "sequence_index")}
        extra = (("ref_chosen_logps", "ref_rejected_logps")
                 if algo == "dpo" and reference == "precomputed" else ())
    return rows | slots | {k: f32(b) for k in extra}


def abstract_setup(config, model_cfg: ModelConfig, spec) -> AlgorithmSetup:
    """What the loop takes from the algorithm's setup to build the state (the model's
    init function and whether a frozen reference is kept), without data or tokenizer."""
    init_fn = (scalar_model_init_fn(model_cfg) if config.algo == "reward"
               else decoder_init_fn(model_cfg))
    return AlgorithmSetup(dataset=None, params_init_fn=init_fn,
                          with_reference=getattr(spec, "reference", "none") == "params")


@dataclasses.dataclass
class FitCheck:
    topology: str
    num_devices: int
    device_kind: str
    mesh: dict[str, int]
    hbm_bytes: int
    compile_seconds: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    state_bytes: dict[str, int]   # per device, from the shardings: params, opt_state, ...
    batch_bytes: int
    num_params: int

    @property
    def total_bytes(self) -> int:
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), total_bytes=self.total_bytes, fits=self.fits)


def fit_check(config: ml_collections.ConfigDict, topology: str, *,
              hbm_gib: float = 0.0) -> FitCheck:
    """Lowers and compiles the configured train step for `topology`; reads its memory plan."""
    validate_config(config, algorithms=ALGOS)
    if config.pipeline.stages:
        raise ValueError("jalign.aot checks one stage: set --config.pipeline.stages= and "
                         "--config.algo=STAGE (with that stage's overrides)")
    config, _ = resolve_start(config)  # the architecture from config.init_from, if it names one
    devices = topology_devices(topology)
    mesh = shd.make_mesh(config.mesh, devices)
    rules = shd.rules_from_config(config.get("logical_axis_rules"))
    model_cfg = ModelConfig.from_mapping(config.model)
    algo = get_algorithm(config.algo)
    spec = algo.spec(config)
    setup = abstract_setup(config, model_cfg, spec)
    optimizer, _ = make_optimizer(config.optimizer, config.train.num_steps)
    state, state_shardings = abstract_train_state(
        setup.params_init_fn, optimizer, mesh, rules, seed=config.seed,
        with_reference=setup.with_reference, model_cfg=model_cfg)
    batch_sharding = shd.data_sharding(mesh, rules)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
             for k, v in abstract_batch(config, spec).items()}
    step_fn = algo.make_step(config, model_cfg, spec, optimizer)
    p_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                     out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,))
    start = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = p_step.lower(state, batch)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            # The TPU compiler itself refuses a program that cannot fit HBM.
            raise DoesNotFitError(
                f"the TPU compiler could not fit the step: {str(e).splitlines()[0]} "
                f"(state per device: params {_size(per_device_bytes(state.params)).strip()}, "
                f"optimizer {_size(per_device_bytes(state.opt_state)).strip()}, frozen "
                f"{_size(per_device_bytes(state.frozen) if state.frozen else 0).strip()})") from e
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    state_parts = {"params": per_device_bytes(state.params),
                   "opt_state": per_device_bytes(state.opt_state),
                   "frozen": per_device_bytes(state.frozen) if state.frozen else 0,
                   "step_rng": per_device_bytes((state.step, state.rng))}
    return FitCheck(
        topology=topology, num_devices=len(devices), device_kind=devices[0].device_kind,
        mesh={k: int(v) for k, v in mesh.shape.items()}, hbm_bytes=hbm_bytes(topology, hbm_gib),
        compile_seconds=seconds, argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        state_bytes=state_parts, batch_bytes=per_device_bytes(batch),
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)))


def format_report(check: FitCheck, config) -> str:
    model = config.model
    unit = {"sft": "sequences", "kto": "examples"}.get(config.algo, "pairs")
    s = check.state_bytes
    params = (f"{check.num_params / 1e9:.2f}B" if check.num_params >= 1e8
              else f"{check.num_params / 1e6:.2f}M")
    lines = [
        f"fit check: algo={config.algo} on {check.topology} = {check.num_devices} x "
        f"{check.device_kind} ({check.hbm_bytes / GIB:.1f} GiB HBM each)",
        f"mesh {' '.join(f'{k}={v}' for k, v in check.mesh.items())}; batch "
        f"{config.data.batch_size} {unit} x {config.data.max_length} tokens (global); "
        f"{params} trained params (param_dtype {model.param_dtype}, dtype {model.dtype}, remat "
        f"{model.remat}); compiled in {check.compile_seconds:.1f} s",
        "per-device memory, as XLA plans it:",
        f"  arguments         {_size(check.argument_bytes)}   (params {_size(s['params']).strip()}"
        f", optimizer {_size(s['opt_state']).strip()}, frozen {_size(s['frozen']).strip()}"
        f", batch {_size(check.batch_bytes).strip()}, by their shardings)",
        f"  outputs           {_size(check.output_bytes)}",
        f"  aliased (donated) {_size(-check.alias_bytes)}",
        f"  temporaries       {_size(check.temp_bytes)}",
        f"  generated code    {_size(check.code_bytes)}",
        f"  total             {_size(check.total_bytes)}   of {check.hbm_bytes / GIB:.1f} GiB "
        f"({100 * check.total_bytes / check.hbm_bytes:.0f}%)",
    ]
    free = (check.hbm_bytes - check.total_bytes) / GIB
    lines.append(f"FITS ({free:.1f} GiB free per device)" if check.fits else
                 f"DOES NOT FIT ({-free:.1f} GiB over per device)")
    return "\n".join(lines)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    try:
        check = fit_check(f.config, f.topology, hbm_gib=f.hbm_gib)
    except TopologyUnavailableError as e:
        print(f"jalign.aot: {e}", file=sys.stderr)
        sys.exit(2)
    except DoesNotFitError as e:
        print(f"DOES NOT FIT: {e}")
        sys.exit(1)
    print(format_report(check, resolve_start(f.config)[0]))
    if f.json:
        with open(f.json, "w") as out:
            json.dump(check.to_dict(), out, indent=2)
    sys.exit(0 if check.fits else 1)


if __name__ == "__main__":
    # The check compiles for TPU only; keep JAX's own backend on CPU so an
    # accelerator on this machine (e.g. a TPU VM in use) is left alone.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Nor is this a TPU host: skip libtpu's metadata-server lookups (and their noise).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")  # no "Failed to find host bounds" line
    config_flags.DEFINE_config_file("config", None, "Path to a configs/NAME.py file[:arg].",
                                    lock_config=True)
    flags.DEFINE_string("topology", None, "libtpu topology, e.g. v5e:2x2, v5p:2x4x4, v6e:4x4.")
    flags.DEFINE_float("hbm_gib", 0.0, "HBM per chip in GiB (default: from the topology's "
                       "generation: " + ", ".join(f"{k} {v:g}" for k, v in HBM_GIB.items()) + ").")
    flags.DEFINE_string("json", "", "Also write the numbers to this JSON file.")
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main)
