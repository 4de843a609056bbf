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

and a roofline per chip: the step takes at least
max(FLOPs / peak bf16 FLOP/s, HBM bytes / HBM bandwidth), so its MFU is at most
model FLOPs / (peak x that bound). FLOPs and bytes come from the compiler's
`cost_analysis()`, which on TPU reports one device's share of the partitioned
program but counts each while-loop body once (the scanned layer stack, the
attention and log-prob loops). So the compute term uses the analytic hardware
FLOPs of the step (`step_flops`: 6 N per trained token, 2 N per reference token,
causal attention, remat's recomputed forward), and the memory term the compiler's
bytes, a lower bound on the traffic: the bound stays a bound. The report adds the
traffic scaled by the loops as the FLOPs are, an estimate.
`model.attention_impl=auto` resolves for the TPU (splash), not for this host.

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
from jalign.models.attention import resolve_impl
from jalign.models.config import ModelConfig
from jalign.models.heads import scalar_model_init_fn
from jalign.models.transformer import decoder_init_fn
from jalign.optim import make_optimizer
from jalign.state import abstract_train_state


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_gib: float         # HBM capacity
    peak_flops: float      # dense bf16 FLOP/s
    hbm_bandwidth: float   # HBM bytes/s


# One JAX device per chip on all of these. Published per-chip figures, Google Cloud
# TPU documentation, "System architecture" tables (cloud.google.com/tpu/docs/v4,
# /v5e, /v5p, /v6e): v4 275 TFLOPs bf16, 32 GiB HBM2 at 1200 GBps; v5e 197 TFLOPs,
# 16 GB at 819 GBps; v5p 459 TFLOPs, 95 GiB HBM2e at 2765 GBps; v6e (Trillium)
# 918 TFLOPs, 32 GB at 1640 GBps.
CHIPS = {
    "v4": Chip(hbm_gib=32.0, peak_flops=275e12, hbm_bandwidth=1200e9),
    "v5e": Chip(hbm_gib=16.0, peak_flops=197e12, hbm_bandwidth=819e9),
    "v5p": Chip(hbm_gib=95.0, peak_flops=459e12, hbm_bandwidth=2765e9),
    "v6e": Chip(hbm_gib=32.0, peak_flops=918e12, hbm_bandwidth=1640e9),
}
HBM_GIB = {name: chip.hbm_gib for name, chip in CHIPS.items()}
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
    if generation not in CHIPS:
        raise ValueError(f"no HBM size known for {generation!r} (known: {sorted(CHIPS)}); "
                         "pass --hbm_gib")
    return int(CHIPS[generation].hbm_gib * GIB)


def chip(topology: str) -> Chip:
    generation = topology.split(":")[0].lower()
    if generation not in CHIPS:
        raise ValueError(f"no figures known for TPU {generation!r} (known: {sorted(CHIPS)})")
    return CHIPS[generation]


def step_flops(config: ml_collections.ConfigDict, model_cfg: ModelConfig, spec,
               rows: int) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one train step over `rows` x max_length tokens.

    Per token, a forward pass costs 2 N_matmul + 2 L T n_heads d_head (QK^T and PV,
    each 2 T/2 n_heads d_head multiply-adds under the causal mask, T = max_length);
    N_matmul leaves out the embedding lookup of an untied vocabulary. Model FLOPs:
    3 forward passes (forward + backward) of the policy, plus one forward of a
    frozen reference kept in the state (Kaplan et al. 2020, 6N per token; PaLM,
    Chowdhery et al. 2022, appendix B, for the attention term). Hardware FLOPs add
    remat's recomputed forward. LoRA's cheaper backward is not modelled.
    """
    c, t = model_cfg, int(config.data.max_length)
    n_matmul = c.num_params() - (0 if c.tie_embeddings else c.vocab_size * c.hidden_size)
    forward = 2 * n_matmul + 2 * c.num_layers * t * c.num_heads * c.head_size
    reference = getattr(spec, "reference", "none") == "params"
    tokens = rows * t
    model = tokens * forward * (3 + (1 if reference else 0))
    recompute = tokens * forward if c.remat != "none" else 0
    return float(model), float(model + recompute)


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
    attention_impl: str           # what model.attention_impl runs as on the TPU
    # Roofline, per chip. compiler_*: cost_analysis() of one device's program, each
    # loop body counted once; step_*: analytic FLOPs of the whole step / devices.
    compiler_flops: float
    compiler_bytes: float
    model_flops: float
    hardware_flops: float
    peak_flops: float
    hbm_bandwidth: float

    @property
    def hbm_bytes_scaled(self) -> float:
        """HBM traffic if it grew with the loops as the FLOPs do (the compiler's FLOPs per
        byte over the hardware FLOPs): an estimate, high where unlooped work (the
        optimizer update) moves many bytes; not a bound."""
        if not self.compiler_flops:
            return self.compiler_bytes
        return self.hardware_flops * self.compiler_bytes / self.compiler_flops

    @property
    def compute_seconds(self) -> float:
        return self.hardware_flops / self.peak_flops

    @property
    def memory_seconds(self) -> float:
        """The compiler's bytes (each loop body once: a lower bound) over the bandwidth."""
        return self.compiler_bytes / self.hbm_bandwidth

    @property
    def roofline_seconds(self) -> float:
        """Lower bound on the step time: max(FLOPs / peak, bytes / bandwidth)."""
        return max(self.compute_seconds, self.memory_seconds)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_seconds >= self.memory_seconds else "memory"

    @property
    def mfu_ceiling(self) -> float:
        return self.model_flops / (self.peak_flops * self.roofline_seconds)

    @property
    def total_bytes(self) -> int:
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), total_bytes=self.total_bytes, fits=self.fits,
                    hbm_bytes_scaled=self.hbm_bytes_scaled,
                    compute_seconds=self.compute_seconds, memory_seconds=self.memory_seconds,
                    roofline_seconds=self.roofline_seconds, bound=self.bound,
                    mfu_ceiling=self.mfu_ceiling)


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
    # "auto" picks for the platform the step is compiled for, not this (CPU) host.
    model_cfg = dataclasses.replace(model_cfg, attention_impl=resolve_impl(
        model_cfg, int(config.data.max_length), backend=devices[0].platform))
    algo = get_algorithm(config.algo)
    spec = algo.spec(config)
    setup = abstract_setup(config, model_cfg, spec)
    optimizer, _ = make_optimizer(config.optimizer, config.train.num_steps)
    state, state_shardings = abstract_train_state(
        setup.params_init_fn, optimizer, mesh, rules, seed=config.seed,
        with_reference=setup.with_reference, model_cfg=model_cfg,
        frozen_subtrees=setup.frozen_subtrees)
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
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    rows = next(iter(batch.values())).shape[0]
    model_flops, hardware_flops = step_flops(config, model_cfg, spec, rows)
    peaks = chip(topology)
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
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        attention_impl=model_cfg.attention_impl,
        compiler_flops=float(cost.get("flops", 0.0)),
        compiler_bytes=float(cost.get("bytes accessed", 0.0)),
        model_flops=model_flops / len(devices), hardware_flops=hardware_flops / len(devices),
        peak_flops=peaks.peak_flops, hbm_bandwidth=peaks.hbm_bandwidth)


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if x >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


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
    c = check
    lines += [
        f"roofline per chip (attention {c.attention_impl}; peak {c.peak_flops / 1e12:.0f} "
        f"TFLOP/s bf16, HBM {c.hbm_bandwidth / 1e9:.0f} GB/s):",
        f"  compiler (cost_analysis, each loop body once) {_si(c.compiler_flops, 'FLOP')}, "
        f"{_si(c.compiler_bytes, 'B')} ({c.compiler_flops / max(c.compiler_bytes, 1):.0f} "
        "FLOP/byte)",
        f"  step: model {_si(c.model_flops, 'FLOP')}, hardware (with remat) "
        f"{_si(c.hardware_flops, 'FLOP')}; HBM traffic >= {_si(c.compiler_bytes, 'B')} (about "
        f"{_si(c.hbm_bytes_scaled, 'B')} if it scaled with the FLOPs)",
        f"  step time >= {1e3 * c.roofline_seconds:.1f} ms ({c.bound}-bound: compute "
        f"{1e3 * c.compute_seconds:.1f} ms, memory >= {1e3 * c.memory_seconds:.1f} ms, about "
        f"{1e3 * c.hbm_bytes_scaled / c.hbm_bandwidth:.1f} ms scaled); MFU <= "
        f"{100 * c.mfu_ceiling:.0f}%",
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
