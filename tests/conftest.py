"""Test-wide setup: 8 simulated CPU devices, so sharding tests run anywhere.

Set before JAX is imported; single-device tests pass explicit device lists.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
