"""Peak host memory of from_pretrained on 8 simulated devices (fsdp=8).

The loader must not build a model-sized host copy, nor one per device: anonymous
memory may grow by the sharded parameters themselves (which live in host RAM on
CPU devices) plus about one stacked parameter of transient buffers.

Also a benchmark: `python tests/models/test_hf_memory.py [--hidden 2048 --layers 16]`
prints the measurement for a bigger model.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


MiB = 2**20


def _rss_anon(pid="self") -> int:
    """Anonymous resident memory (file pages such as safetensors' mmap excluded)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def _write_checkpoint(path, *, vocab, hidden, layers, intermediate):
    import numpy as np

    from jalign.models import ModelConfig, abstract_params, save_pretrained

    config = ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                         num_heads=hidden // 64, num_kv_heads=hidden // 64,
                         intermediate_size=intermediate, tie_embeddings=False)
    rng = np.random.default_rng(0)
    params = _map(lambda s: rng.standard_normal(s.shape, np.float32),
                  abstract_params(config))
    save_pretrained(config, params, path, max_shard_size="100MB")


def _map(fn, tree):
    import jax
    return jax.tree.map(fn, tree)


def _measure(path) -> dict:
    """Runs in a fresh process with 8 CPU devices."""
    import jax
    import numpy as np

    from jalign import sharding as shd
    from jalign.models import from_pretrained

    mesh = shd.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    jax.block_until_ready(jax.device_put(np.zeros(8), jax.devices()[0]))  # warm the runtime
    baseline = _rss_anon()
    start = time.perf_counter()
    config, params = from_pretrained(path, mesh=mesh)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    final = _rss_anon()
    leaves = jax.tree.leaves(params)
    on_device = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return dict(devices=len(jax.devices()), model_bytes=sum(x.nbytes for x in leaves),
                device_bytes=on_device, largest_param_bytes=max(x.nbytes for x in leaves),
                baseline=baseline, final_growth=final - baseline, vm_hwm=hwm, seconds=seconds)


def _run(hidden, layers, vocab, intermediate) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        _write_checkpoint(tmp, vocab=vocab, hidden=hidden, layers=layers,
                          intermediate=intermediate)
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
                   JAX_PLATFORMS="cpu")
        # The parent samples the worker's memory, so the worker's GIL cannot hide a peak.
        worker = subprocess.Popen([sys.executable, __file__, "--worker", tmp], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak, deadline = 0, time.monotonic() + 300
        while worker.poll() is None and time.monotonic() < deadline:
            try:
                peak = max(peak, _rss_anon(worker.pid))
            except (OSError, RuntimeError):  # exiting
                pass
            time.sleep(0.0005)
        stdout, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 0, stderr[-3000:]
        result = json.loads(stdout.strip().splitlines()[-1])
        result["peak_growth"] = peak - result.pop("baseline")
        result["peak_over_model_bytes"] = result["peak_growth"] - result["model_bytes"]
        return result


def test_peak_host_memory_is_about_one_parameter():
    r = _run(hidden=512, layers=8, vocab=8192, intermediate=2048)  # 168 MB in float32
    assert r["devices"] == 8
    # Sharded over fsdp=8: the device copies add up to ~one model, not eight.
    assert r["device_bytes"] < 1.1 * r["model_bytes"]
    # Beyond the loaded params themselves, about one stacked parameter at a time.
    assert r["peak_over_model_bytes"] < 1.5 * r["largest_param_bytes"] + 48 * MiB, r

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--intermediate", type=int, default=4096)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_measure(args.worker)))
    else:
        result = _run(args.hidden, args.layers, args.vocab, args.intermediate)
        print(json.dumps({k: (f"{v / MiB:.1f} MiB" if k.endswith(("bytes", "growth", "hwm")) else v)
                          for k, v in result.items()}, indent=2))
