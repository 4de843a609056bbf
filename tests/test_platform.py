"""jalign._platform: a CPU-only host with libtpu installed starts JAX without libtpu's noise."""

import importlib.util
import os
import subprocess
import sys

import pytest

from jalign import _platform


@pytest.mark.parametrize("files, expected", [
    ({}, False),
    ({"dev/vfio/vfio": ""}, False),  # the VFIO control node alone: no device assigned
    ({"dev/vfio/0": ""}, True),  # v5e / v6e TPU VMs
    ({"dev/accel0": ""}, True),  # v4 / v5p TPU VMs
    ({"dev/nvidia0": ""}, True),
    ({"dev/kfd": ""}, True),
    ({"sys/bus/pci/devices/0000:00:05.0/vendor": "0x1ae0\n"}, True),  # a Google PCI device
    ({"sys/bus/pci/devices/0000:00:05.0/vendor": "0x8086\n"}, False),
])
def test_accelerator_present(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _platform.accelerator_present(str(tmp_path)) is expected


def test_explicit_choices_and_accelerators_are_left_alone(tmp_path, monkeypatch):
    import jax

    before = jax.config.jax_platforms
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert not _platform.use_cpu_without_accelerator(str(tmp_path))
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setenv("JAX_FORCE_TPU_INIT", "1")
    assert not _platform.use_cpu_without_accelerator(str(tmp_path))
    monkeypatch.delenv("JAX_FORCE_TPU_INIT")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "accel0").write_text("")  # a TPU VM
    assert not _platform.use_cpu_without_accelerator(str(tmp_path))
    assert jax.config.jax_platforms == before


def _run_without_platform_choice(code):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


needs_quiet_host = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None or _platform.accelerator_present()
    or _platform._other_pjrt_plugins(),
    reason="the fix acts on CPU-only hosts with libtpu and no other PJRT plugin")


@needs_quiet_host
def test_cpu_only_host_starts_quietly_and_still_compiles_for_tpu():
    start = _run_without_platform_choice(
        "import jalign  # calls _platform.use_cpu_without_accelerator() first\n"
        "import jax\n"
        "assert jax.config.jax_platforms == 'cpu'\n"
        "print(jax.devices())\n")
    assert start.returncode == 0, start.stderr
    assert "CpuDevice" in start.stdout
    assert start.stderr == ""  # before the fix: libtpu's TPU_WORKER_HOSTNAMES / host bounds errors
    # Ahead-of-time TPU compiles go through libtpu's topology client, not the backend list.
    aot = _run_without_platform_choice(
        "import jalign\n"
        "import jax, jax.numpy as jnp\n"
        "assert jax.config.jax_platforms == 'cpu'\n"
        "from jax.experimental import topologies\n"
        "devices = topologies.get_topology_desc(topology_name='v5e:2x2', platform='tpu').devices\n"
        "sharding = jax.sharding.SingleDeviceSharding(devices[0])\n"
        "x = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=sharding)\n"
        "compiled = jax.jit(lambda a: a @ a).lower(x).compile()\n"
        "print(len(devices), devices[0].platform, jax.devices()[0].platform)\n")
    assert aot.returncode == 0, aot.stderr
    assert aot.stdout.split() == ["4", "tpu", "cpu"]
