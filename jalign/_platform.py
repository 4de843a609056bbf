"""A quiet start on CPU-only hosts that have libtpu installed (the `test` extra does).

With JAX_PLATFORMS unset, JAX's first backend initialisation tries every backend it
knows. It skips CUDA on a host without NVIDIA device nodes, but it always tries the TPU
one when libtpu can be imported, and initialising libtpu's PJRT plugin on a host without
a TPU prints a screen of errors (accelerator type, TPU_WORKER_HOSTNAMES, host bounds)
before JAX quietly falls back to the CPU. `use_cpu_without_accelerator` makes that
fallback explicit when nothing but the CPU could ever be used: JAX then starts only the
CPU backend, so libtpu is never initialised for it. libtpu stays available for
ahead-of-time TPU compiles (`jax.experimental.topologies.get_topology_desc`), which do
not go through the backend list.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os

# The device nodes of TPU chips (/dev/accel*: v2-v5p; VFIO groups: v5e and later), of
# NVIDIA GPUs (as JAX's own hint, WSL included) and of AMD GPUs.
_ACCELERATOR_NODES = ("dev/accel*", "dev/vfio/[0-9]*", "dev/nvidia[0-9]*", "dev/nvidiactl",
                      "dev/dxg", "dev/kfd")
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips on the PCI bus, JAX's TPU-host check


def accelerator_present(root: str = "/") -> bool:
    """True if this host shows a TPU or GPU: a device node, or a Google PCI device."""
    if any(glob.glob(os.path.join(root, pattern)) for pattern in _ACCELERATOR_NODES):
        return True
    for vendor_file in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
        try:
            with open(vendor_file) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _other_pjrt_plugins() -> bool:
    """True if a PJRT plugin package (jax[cuda12], ROCm, ...) is installed besides libtpu."""
    if any(True for _ in importlib.metadata.entry_points(group="jax_plugins")):
        return True
    return importlib.util.find_spec("jax_plugins") is not None


def use_cpu_without_accelerator(root: str = "/") -> bool:
    """Selects JAX's CPU backend when it is the only one this host can run. Returns
    whether it did.

    Acts only if all hold: the user chose no platform (JAX_PLATFORMS unset or empty, no
    JAX_FORCE_TPU_INIT, `jax_platforms` not configured), libtpu is installed, no other
    PJRT plugin is, and the host has no TPU or GPU (`accelerator_present`). Then it sets
    `jax_platforms` to "cpu", which JAX would have fallen back to anyway. TPU VMs and
    pods (device nodes, Google PCI devices), GPU hosts and explicit choices are left
    alone. Call it before the first backend use (jax.devices(), a jit call).
    """
    if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ:
        return False
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        return False
    if accelerator_present(root) or _other_pjrt_plugins():
        return False
    import jax  # not above: the checks need no JAX

    if jax.config.jax_platforms:
        return False
    jax.config.update("jax_platforms", "cpu")
    return True
