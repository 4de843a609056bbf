"""The fit check: the configured step compiled for a TPU topology from abstract shapes."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jalign import aot
from jalign.memory import per_device_bytes
from jalign import sharding as shd
from jalign.algorithms import get_algorithm
from jalign.config_utils import base_config
from jalign.models.config import ModelConfig
from jalign.optim import make_optimizer
from jalign.state import abstract_train_state, init_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = "configs/quickstart.py:test"
SINGLE_STAGE = ["--config.pipeline.stages="]


def _quickstart(algo):
    import importlib.util
    spec = importlib.util.spec_from_file_location("quickstart", os.path.join(ROOT, "configs",
                                                                              "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("test")
    config.pipeline.stages = ""
    config.algo = algo
    return config


def _fit_check(tmp_path, *flags, topology="v5e:2x2"):
    out = str(tmp_path / "fit.json")
    proc = subprocess.run(
        [sys.executable, "-m", "jalign.aot", f"--topology={topology}", f"--json={out}", *flags],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    if proc.returncode == 2 and "compile-only client unavailable" in proc.stderr:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    if proc.returncode not in (0, 1):
        raise AssertionError(f"jalign.aot failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr[-5000:]}")
    print(proc.stdout)
    return proc, json.load(open(out))


def test_quickstart_sft_fits_v5e_2x2(tmp_path):
    proc, fit = _fit_check(tmp_path, "--config=configs/quickstart.py:sft,test")
    assert proc.returncode == 0 and "FITS" in proc.stdout
    assert fit["num_devices"] == 4
    assert fit["mesh"] == {"data": 1, "fsdp": 4, "sequence": 1, "tensor": 1}
    assert "v5 lite" in fit["device_kind"]
    params = ModelConfig.from_mapping(base_config().model).num_params()
    assert fit["num_params"] == params
    # float32 params + AdamW's two moments, split 4 ways; TPU tiles pad small
    # arrays (a 32-wide head_dim becomes 128), hence the upper bound.
    state = 3 * 4 * params / 4
    assert state <= fit["argument_bytes"] <= 4 * state
    assert fit["alias_bytes"] >= state  # the donated state is updated in place
    assert 0 < fit["total_bytes"] < fit["hbm_bytes"] == 16 * 2**30
    assert fit["state_bytes"]["frozen"] == 0
    # model.attention_impl="auto" resolves for the TPU compiled for, not this CPU host.
    assert fit["attention_impl"] == "splash"
    # Roofline against v5e's published peaks. Model FLOPs: 3 forward passes of 8 x 48
    # tokens (no remat, tied embeddings), split over 4 chips.
    cfg = ModelConfig.from_mapping(base_config().model)
    forward = 2 * params + 2 * cfg.num_layers * 48 * cfg.num_heads * cfg.head_size
    assert fit["model_flops"] == fit["hardware_flops"] == pytest.approx(3 * 8 * 48 * forward / 4)
    assert (fit["peak_flops"], fit["hbm_bandwidth"]) == (197e12, 819e9)
    # cost_analysis() is one device's program, its scanned layer loop counted once
    # (2 layers -> about half the step); the whole program would count 4x that.
    assert cfg.num_layers == 2
    assert 0.3 * fit["model_flops"] < fit["compiler_flops"] < 0.8 * fit["model_flops"]
    assert fit["compiler_bytes"] > 0
    compute = fit["hardware_flops"] / fit["peak_flops"]
    memory = fit["compiler_bytes"] / fit["hbm_bandwidth"]  # bytes counted once: a lower bound
    assert fit["roofline_seconds"] == pytest.approx(max(compute, memory))
    assert fit["hbm_bytes_scaled"] > fit["compiler_bytes"]
    assert fit["bound"] == ("compute" if compute >= memory else "memory")
    assert fit["mfu_ceiling"] == pytest.approx(
        fit["model_flops"] / (fit["peak_flops"] * fit["roofline_seconds"]))
    assert 0 < fit["mfu_ceiling"] <= 1
    assert "roofline per chip (attention splash" in proc.stdout and "MFU <=" in proc.stdout


def test_chip_table_and_long_sequence_variants():
    assert set(aot.CHIPS) == {"v4", "v5e", "v5p", "v6e"}
    assert aot.chip("v5p:2x4x4").peak_flops == 459e12
    assert aot.hbm_bytes("v5p:2x4x4") == 95 * 2**30
    import importlib.util
    spec = importlib.util.spec_from_file_location("dpo_8b", os.path.join(ROOT, "configs",
                                                                          "dpo_8b.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("seq32k,xla")
    assert (config.data.max_length, config.data.batch_size) == (32768, 32)
    assert config.model.attention_impl == "xla"
    assert module.get_config("seq8k").model.attention_impl == "auto"
    with pytest.raises(ValueError, match="seq8k"):
        module.get_config("seq8k,seq32k")


def test_quickstart_dpo_counts_the_reference_and_reports_no_fit(tmp_path):
    proc, fit = _fit_check(tmp_path, f"--config={QUICKSTART}", *SINGLE_STAGE,
                           "--config.algo=dpo", "--hbm_gib=0.001")
    assert proc.returncode == 1 and "DOES NOT FIT" in proc.stdout
    assert fit["state_bytes"]["frozen"] == fit["state_bytes"]["params"] > 0
    assert fit["batch_bytes"] > 0 and not fit["fits"]


@pytest.mark.parametrize("algo", ["sft", "dpo", "reward", "kto"])
def test_abstract_batch_matches_the_data_pipeline(tmp_path, algo):
    config = _quickstart(algo)
    model_cfg = ModelConfig.from_mapping(config.model)
    algorithm = get_algorithm(algo)
    setup = algorithm.setup(config, model_cfg, algorithm.spec(config), str(tmp_path))
    real = next(iter(setup.dataset(0, 1)))
    abstract = aot.abstract_batch(config)
    assert sorted(abstract) == sorted(real)
    for key, value in real.items():
        assert (abstract[key].shape, abstract[key].dtype) == (value.shape, value.dtype), key


@pytest.mark.parametrize("algo", ["dpo", "reward"])
def test_abstract_state_matches_init_train_state(algo):
    config = _quickstart(algo)
    model_cfg = ModelConfig.from_mapping(config.model)
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    optimizer, _ = make_optimizer(config.optimizer, 10)
    setup = aot.abstract_setup(config, model_cfg, get_algorithm(algo).spec(config))
    abstract, shardings = abstract_train_state(setup.params_init_fn, optimizer, mesh,
                                               shd.DEFAULT_RULES, seed=0,
                                               with_reference=setup.with_reference)
    state, want = init_train_state(setup.params_init_fn, optimizer, mesh, shd.DEFAULT_RULES,
                                   seed=0, with_reference=setup.with_reference)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    assert (state.frozen is not None) == (algo == "dpo")
    for a, s, w, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings),
                          jax.tree.leaves(want), jax.tree.leaves(state)):
        assert (a.shape, a.dtype) == (x.shape, x.dtype)
        assert s == w == x.sharding


def test_per_device_bytes_counts_one_shard():
    mesh = shd.make_mesh({"fsdp": 4}, jax.devices()[:4])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    tree = {"a": jax.ShapeDtypeStruct((8, 3), np.float32, sharding=sharding),
            "b": jax.ShapeDtypeStruct((5,), np.int32, sharding=shd.replicated(mesh))}
    assert per_device_bytes(tree) == 2 * 3 * 4 + 5 * 4


# Splash attention (model.attention_impl="splash") compiled by the real TPU compiler,
# Mosaic included, for each chip, as tests/ops/test_tpu_aot.py compiles the log-prob
# kernels: in a subprocess running this file, so libtpu stays out of the test process.
SPLASH_TOPOLOGIES = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
# Per device after the fsdp=4 split: one sequence of 2048 tokens, 8 query heads on 2
# key/value heads (GQA), head size 128, a 512-token window on sliding layers.
SPLASH_SHAPE = dict(batch=4, tokens=2048, q_heads=8, kv_heads=2, head_dim=128)


def compile_splash_fwd_bwd(topology):
    """value_and_grad of a loss on splash attention under a 4-device fsdp mesh; facts."""
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jalign.models import attention
    from jalign.sharding import MESH_AXES

    s = SPLASH_SHAPE
    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    mesh = Mesh(np.asarray(devices[:4]).reshape(1, 4, 1, 1), MESH_AXES)
    rows = NamedSharding(mesh, P("fsdp"))
    q = jax.ShapeDtypeStruct((s["batch"], s["tokens"], s["q_heads"], s["head_dim"]),
                             jnp.bfloat16, sharding=rows)
    kv = jax.ShapeDtypeStruct((s["batch"], s["tokens"], s["kv_heads"], s["head_dim"]),
                              jnp.bfloat16, sharding=rows)
    seg = jax.ShapeDtypeStruct((s["batch"], s["tokens"]), jnp.int32, sharding=rows)
    sliding = jax.ShapeDtypeStruct((), jnp.bool_, sharding=NamedSharding(mesh, P()))
    cfg = ModelConfig(hidden_size=s["q_heads"] * s["head_dim"], num_heads=s["q_heads"],
                      num_kv_heads=s["kv_heads"], head_dim=s["head_dim"], dtype="bfloat16",
                      sliding_window=512, attn_logit_softcap=50.0, attention_impl="splash")

    def loss(q, k, v, seg, sliding):  # sliding: traced, as in the scanned layer stack
        out = attention.attend(q, k, v, attention.Segments(seg, sliding), cfg)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(
            q, kv, kv, seg, sliding).compile()
    text = compiled.as_text()
    return dict(temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes),
                device_kind=devices[0].device_kind,
                mosaic_kernels=text.count('custom_call_target="tpu_custom_call"'),
                all_gathers=text.count("all-gather"))


def _splash_child(names):
    try:
        from jax.experimental import topologies
        topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    except Exception as e:  # noqa: BLE001 - any failure here means no topology client
        print(json.dumps({"unavailable": f"{type(e).__name__}: {e}"[:500]}))
        return
    print(json.dumps({n: compile_splash_fwd_bwd(SPLASH_TOPOLOGIES[n]) for n in names}))


@pytest.fixture(scope="module")
def splash_compiled():
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "splash",
                           *SPLASH_TOPOLOGIES], env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise AssertionError(f"splash AOT subprocess failed (rc={proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    results = json.loads(lines[-1])
    if "unavailable" in results:
        pytest.skip("TPU topology client (libtpu) unavailable: " + results["unavailable"])
    return results


@pytest.mark.parametrize("chip", list(SPLASH_TOPOLOGIES))
def test_splash_attention_compiles_for_tpu(splash_compiled, chip):
    facts = splash_compiled[chip]
    s = SPLASH_SHAPE
    # Forward and fused backward kernels, for the causal and the local mask (the
    # layer's window is chosen at run time).
    assert facts["mosaic_kernels"] == 4, facts
    assert facts["all_gathers"] == 0, facts  # each device runs its own rows (shard_map)
    # Never a [heads, T, T] float32 score matrix per device.
    scores = s["q_heads"] * s["tokens"] ** 2 * 4
    assert facts["temp_bytes"] < scores / 4, facts


if __name__ == "__main__" and sys.argv[1:2] == ["splash"]:
    _splash_child(sys.argv[2:])
