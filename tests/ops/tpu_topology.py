"""Shared by the ahead-of-time TPU compile tests: each test file compiles its cases in a
child process (libtpu must not meet the 8 simulated CPU devices of the test process) and
reads back one JSON line of compile facts.

A test file calls `compiled_cases(__file__, names)` from a module fixture and ends with
`if __name__ == "__main__": print_cases(compile_fn, CASES, sys.argv[1:])`.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def print_cases(compile_fn, cases, names):
    """In the child: one JSON line, compile facts per case, or why no TPU topology exists."""
    try:
        from jax.experimental import topologies
        topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    except Exception as e:  # noqa: BLE001 - any failure here means no topology client
        print(json.dumps({"unavailable": f"{type(e).__name__}: {e}"[:500]}))
        return
    print(json.dumps({name: compile_fn(*cases[name]) for name in names}))


def run_in_subprocess(script, names, timeout=600):
    """Runs `script` (a test file) as the child for `names`; returns its JSON line."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.abspath(script), *names], env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise AssertionError(f"AOT subprocess failed (rc={proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1])


def compiled_cases(script, names):
    """The child's results, or a skip when this host has no TPU topology client."""
    results = run_in_subprocess(script, names)
    if "unavailable" in results:
        pytest.skip("TPU topology client (libtpu, jax.experimental.topologies) unavailable: "
                    + results["unavailable"])
    return results
