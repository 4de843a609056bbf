"""Multi-process start-up: one call, before anything touches devices.

    from jalign import distributed
    distributed.initialize(config)      # first line of main(); jalign.train does it

Where the process group comes from (first match wins):

  explicit  config.distributed.coordinator_address / num_processes / process_id,
            each falling back to JALIGN_COORDINATOR / JALIGN_NUM_PROCESSES /
            JALIGN_PROCESS_ID (launch/local_multiprocess.sh sets these; so can any
            launcher that numbers its processes);
  cluster   a Slurm job step with several tasks (srun), a GKE TPU slice
            (TPU_WORKER_HOSTNAMES), or a Cloud TPU VM: JAX reads the cluster
            itself (`jax.distributed.initialize()` with no arguments);
  single    nothing detected: one process, nothing to do.

`config.distributed.mode` (or JALIGN_DISTRIBUTED when the config says "auto")
forces one of "explicit", "cluster" or "off". When several processes share a
CPU backend their collectives run over gloo (`cpu_collectives`).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Mapping

import jax
from jax.experimental import multihost_utils
import numpy as np

MODES = ("auto", "explicit", "cluster", "off")
ENV_MODE = "JALIGN_DISTRIBUTED"
ENV_COORDINATOR = "JALIGN_COORDINATOR"
ENV_NUM_PROCESSES = "JALIGN_NUM_PROCESSES"
ENV_PROCESS_ID = "JALIGN_PROCESS_ID"

# The variables JAX's own Slurm detection needs (set inside `srun` job steps).
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")
_GOOGLE_PCI_VENDOR = "0x1ae0"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins (or does not join) a process group.

    kind: "single" (nothing to do), "explicit" (coordinator, count and id known)
    or "cluster" (JAX detects them from the environment). `reason` says why, in
    words, for logs and errors.
    """
    kind: str
    reason: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    cpu_collectives: str = "gloo"
    initialization_timeout: int = 300


def _setting(cfg: Mapping[str, Any], key: str, unset: Any, environ: Mapping[str, str],
             env_key: str, cast=str):
    value = cfg.get(key, unset)
    if value != unset and value is not None:
        return value
    raw = environ.get(env_key, "")
    if raw == "":
        return None
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"{env_key}={raw!r} is not a valid {cast.__name__}") from None


def _slurm_tasks(environ: Mapping[str, str]) -> int:
    if not all(v in environ for v in _SLURM_VARS):
        return 0
    return int(environ["SLURM_NTASKS"])


def _tpu_hosts(environ: Mapping[str, str]) -> int:
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    return len([h for h in hosts.split(",") if h])


def _on_cloud_tpu_vm() -> bool:
    """TPU chips on the PCI bus (no network: the metadata server is JAX's business)."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def plan(dist_cfg: Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None, *, on_tpu_vm: bool | None = None) -> Plan:
    """Decides how to start, from `config.distributed` and the environment; no side effects.

    Raises ValueError naming the config keys / variables when the explicit
    settings are incomplete or inconsistent.
    """
    cfg = dict(dist_cfg or {})
    environ = os.environ if environ is None else environ
    mode = cfg.get("mode", "auto") or "auto"
    if mode == "auto":
        mode = environ.get(ENV_MODE, "") or "auto"
    if mode not in MODES:
        raise ValueError(f"config.distributed.mode (or {ENV_MODE}) is {mode!r}; valid: {MODES}")
    common = dict(cpu_collectives=cfg.get("cpu_collectives", "gloo"),
                  initialization_timeout=int(cfg.get("initialization_timeout", 300)))
    if mode == "off":
        return Plan("single", "config.distributed.mode is 'off'", **common)

    address = _setting(cfg, "coordinator_address", "", environ, ENV_COORDINATOR)
    count = _setting(cfg, "num_processes", 0, environ, ENV_NUM_PROCESSES, int)
    index = _setting(cfg, "process_id", -1, environ, ENV_PROCESS_ID, int)
    if mode == "explicit" or (mode == "auto" and address):
        missing = [name for name, value in (
            (f"config.distributed.coordinator_address / {ENV_COORDINATOR}", address),
            (f"config.distributed.num_processes / {ENV_NUM_PROCESSES}", count),
            (f"config.distributed.process_id / {ENV_PROCESS_ID}", index)) if value is None]
        if missing:
            raise ValueError("an explicit process group needs " + ", ".join(missing))
        if ":" not in address:
            raise ValueError(f"coordinator address {address!r} must be host:port")
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"need 0 <= process_id < num_processes, got process_id={index}, "
                             f"num_processes={count}")
        if count == 1:
            return Plan("single", "an explicit group of one process", **common)
        return Plan("explicit", f"process {index} of {count}, coordinator {address}",
                    coordinator_address=address, num_processes=count, process_id=index, **common)

    if mode == "cluster":
        return Plan("cluster", "config.distributed.mode is 'cluster'", **common)
    tasks = _slurm_tasks(environ)
    if tasks > 1:
        return Plan("cluster", f"a Slurm job step with {tasks} tasks", **common)
    hosts = _tpu_hosts(environ)
    if hosts > 1:
        return Plan("cluster", f"a TPU slice of {hosts} hosts (TPU_WORKER_HOSTNAMES)", **common)
    if environ.get("TPU_SKIP_MDS_QUERY") is None and (
            _on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm):
        return Plan("cluster", "a Cloud TPU VM", **common)
    return Plan("single", "no process group configured or detected", **common)


def initialize(config: Any = None, *, environ: Mapping[str, str] | None = None) -> Plan:
    """Joins the process group `plan()` describes; a no-op for a single process.

    `config` is the full config (its `distributed` section is read) or None to
    use the environment alone. Safe to call twice: the second call does nothing.
    Must run before any JAX computation, device query or array creation.
    """
    dist_cfg = None
    if config is not None:
        dist_cfg = config.get("distributed") if hasattr(config, "get") else None
    p = plan(dist_cfg, environ)
    if p.kind == "single" or jax.distributed.is_initialized():
        return p
    if p.cpu_collectives and p.cpu_collectives != "none":
        # Only the CPU client reads this; accelerators keep their own collectives.
        jax.config.update("jax_cpu_collectives_implementation", p.cpu_collectives)
    try:
        if p.kind == "explicit":
            jax.distributed.initialize(coordinator_address=p.coordinator_address,
                                       num_processes=p.num_processes, process_id=p.process_id,
                                       initialization_timeout=p.initialization_timeout)
        else:
            jax.distributed.initialize(initialization_timeout=p.initialization_timeout)
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise RuntimeError(
                "jalign.distributed.initialize must run before anything touches devices "
                f"({p.reason}); call it first in main(). JAX said: {e}") from e
        raise
    return p


def globalize_slots(batch: dict[str, Any], sharding) -> dict[str, Any]:
    """Renumbers a process's preference-batch slots by their place in the global batch.

    Preference batches number their sequences per process (`sequence_index` is
    2p / 2p + 1 for this process's pair p, `kl_sequence_index` is p); once every
    process's rows are stacked into one global batch those numbers collide and
    a step's per-sequence sums would mix pairs of different processes. Adding the
    global index of this process's first slot (read off `sharding`, the batch
    sharding the loop places [B] arrays with) makes them unique and consistent
    with the global `pair_mask` / `example_index`. Batches without `pair_mask`
    (SFT) are returned unchanged; so is every batch of a single process.
    """
    if "pair_mask" not in batch or jax.process_count() == 1:
        return batch
    local_slots = batch["pair_mask"].shape[0]
    indices = sharding.addressable_devices_indices_map((local_slots * jax.process_count(),))
    first_slot = min(index[0].start or 0 for index in indices.values())
    if first_slot == 0:
        return batch
    per_slot = {"sequence_index": 1 if "label" in batch else 2, "kl_sequence_index": 1}
    out = dict(batch)
    for key, sequences in per_slot.items():
        if key in out:
            ids = np.asarray(out[key])
            out[key] = np.where(ids >= 0, ids + first_slot * sequences, ids).astype(ids.dtype)
    return out


def agreed_max(value: int) -> int:
    """The largest of every process's `value` (each process's prompts are padded to one
    width, so that the global prompt array has one shape)."""
    if jax.process_count() == 1:
        return value
    return int(np.max(multihost_utils.process_allgather(np.asarray(value))))


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (all processes sample in lockstep)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
