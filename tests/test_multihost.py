"""Multi-process training on CPU (gloo): 2 processes x 2 devices == 1 process x 4 devices.

Each process reads its own shard of the records (shard_index = process index), so
the reference single-process run is fed the same global batches: shard 0's
batch stacked on shard 1's, step by step, with preference slots numbered
globally (what the 2-process global batch means). Losses must then agree to
float32 rounding, whatever the collectives.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jalign.steps import decoder_logprob_fn
from jalign import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.sh")
CONFIG = ("configs/quickstart.py", "test")
# SFT then DPO from the SFT model (frozen reference), 5 steps each, no generation evals.
OVERRIDES = {
    "pipeline.stages": "sft,dpo",
    "train.num_steps": 5,
    "train.eval_every": 0,
    "train.eval_at_start": False,
    "train.async_checkpointing": False,
    "pipeline.dpo.train.num_steps": 5,
    "pipeline.dpo.train.eval_every": 0,
}

# One process, 4 devices, fed the 2-process global batches (see module docstring).
REFERENCE_DRIVER = r"""
import dataclasses, importlib.util, json, sys
import grain, numpy as np
from jalign import loop, pipeline

path, arg, overrides, workdir, shards = sys.argv[1:]
spec = importlib.util.spec_from_file_location("config_module", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config(arg)
for key, value in json.loads(overrides).items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value

def stacked(dataset_fn, shards):
    parts = [dataset_fn(k, shards) for k in range(shards)]
    def stack(batches):
        out = {}
        for key in batches[0]:
            arrays = [np.asarray(b[key]) for b in batches]
            if key.endswith("sequence_index"):
                slots = batches[0]["pair_mask"].shape[0]
                per_slot = 1 if ("label" in batches[0] or key.startswith("kl_")) else 2
                arrays = [np.where(a >= 0, a + k * slots * per_slot, a).astype(a.dtype)
                          for k, a in enumerate(arrays)]
            out[key] = np.concatenate(arrays)
        return out
    return grain.experimental.ZipIterDataset(parents=parts).map(stack)

real_get_algorithm = loop.get_algorithm
def get_algorithm(name):
    algo = real_get_algorithm(name)
    def setup(config, model_cfg, spec, workdir):
        s = algo.setup(config, model_cfg, spec, workdir)
        inner = s.dataset
        s.dataset = lambda index, count: stacked(inner, int(shards))
        return s
    return dataclasses.replace(algo, setup=setup)
loop.get_algorithm = get_algorithm
pipeline.run_pipeline(config, workdir)
"""


def _env(devices):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JALIGN_")}
    return dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                JAX_PLATFORMS="cpu")


def _check(proc, what):
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")


def _metrics(path):
    with open(path) as f:
        return {r["step"]: r for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    multi, single = str(base / "two_processes"), str(base / "one_process")
    flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    proc = subprocess.run(
        ["bash", LAUNCH, "-n", "2", "-k", "2", "--timeout=480", "--",
         sys.executable, "-m", "jalign.train", f"--config={CONFIG[0]}:{CONFIG[1]}",
         f"--workdir={multi}", *flags],
        cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=540)
    _check(proc, "2 processes x 2 devices")
    proc = subprocess.run(
        [sys.executable, "-c", REFERENCE_DRIVER, CONFIG[0], CONFIG[1], json.dumps(OVERRIDES),
         single, "2"],
        cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=540)
    _check(proc, "1 process x 4 devices")
    return multi, single


def _compare(multi, single, stage, keys, near_zero_keys=()):
    got = _metrics(os.path.join(multi, stage, "metrics.jsonl"))
    want = _metrics(os.path.join(single, stage, "metrics.jsonl"))
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5]
    for step in want:
        for key in keys:
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-6,
                                       err_msg=f"{stage} step {step} {key}")
        for key in near_zero_keys:  # differences of log-probs: 0 at step 1, rounding is absolute
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-6, atol=1e-5,
                                       err_msg=f"{stage} step {step} {key}")


def test_sft_two_processes_match_one_process(runs):
    multi, single = runs
    _compare(multi, single, "sft", ("loss", "grad_norm", "num_tokens", "mean_token_accuracy"))
    # Every process wrote its shards of the final model; process 0 alone wrote metrics.
    assert os.path.isdir(os.path.join(multi, "sft", "final_params"))


def test_dpo_two_processes_match_one_process(runs):
    multi, single = runs
    _compare(multi, single, "dpo", ("loss", "grad_norm", "logps/chosen", "logps/rejected"),
             near_zero_keys=("rewards/margins", "rewards/chosen"))


def test_globalize_slots_single_process_is_identity():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((2,), ("fsdp",), devices=jax.devices()[:2])
    batch = {"sequence_index": np.array([[0, 0, -1], [1, 1, -1]], np.int32),
             "pair_mask": np.ones(1, np.float32)}
    out = distributed.globalize_slots(batch, NamedSharding(mesh, P("fsdp")))
    np.testing.assert_array_equal(out["sequence_index"], batch["sequence_index"])


# Writes a trained (one SFT step) state on one mesh, or restores it on another and
# compares every shard this process holds with the saved values, bit for bit.
CHECKPOINT_DRIVER = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from jalign import checkpoint as ckpt, distributed, sharding as shd
from jalign.config_utils import model_config
from jalign.models.config import ModelConfig
from jalign.optim import make_optimizer
from jalign.steps import decoder_logprob_fn, make_sft_step
from jalign.models import decoder_init_fn
from jalign.state import abstract_with_shardings as _abstract_with_shardings, init_train_state

mode, directory, data, fsdp, tensor = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
distributed.initialize()
model_cfg = ModelConfig.from_mapping(model_config("tiny"))
optimizer, _ = make_optimizer({"learning_rate": 1e-2, "warmup_steps": 0}, 10)
mesh = shd.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor})
rules = shd.DEFAULT_RULES
seed = 3 if mode == "save" else 0  # the restoring side starts from other values
state, shardings = init_train_state(decoder_init_fn(model_cfg), optimizer, mesh, rules,
                                    seed=seed, with_reference=True)
flat = lambda tree: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
manager = ckpt.make_manager(directory, async_save=False)
if mode == "save":
    tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 16), 0, model_cfg.vocab_size)
    batch = {"tokens": tokens, "loss_mask": jnp.ones_like(tokens),
             "segment_ids": jnp.ones_like(tokens), "positions": jnp.broadcast_to(jnp.arange(16), (8, 16))}
    with jax.set_mesh(mesh):
        step = jax.jit(make_sft_step(decoder_logprob_fn(model_cfg, with_stats=True), optimizer), out_shardings=(shardings, None))
        state, _ = step(state, batch)
    ckpt.save(manager, 1, state)
    manager.wait_until_finished()
    np.savez(directory + ".npz", **{k: np.asarray(v) for k, v in flat(state).items()})
else:
    abstract = _abstract_with_shardings(state, shardings)
    step, restored = ckpt.restore(manager, abstract)
    saved = np.load(directory + ".npz")
    got, want_shardings = flat(restored), flat(shardings)
    assert set(got) == set(saved.files), (sorted(got), saved.files)
    checked = 0
    for key, array in got.items():
        assert array.sharding == want_shardings[key], (key, array.sharding, want_shardings[key])
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), saved[key][shard.index], err_msg=key)
            checked += 1
    embed = restored.params["embed"]
    print(f"restored step {step}: {len(got)} arrays, {checked} shards checked on "
          f"{jax.device_count()} devices / {jax.process_count()} processes; "
          f"embed {embed.shape} -> per-device {embed.sharding.shard_shape(embed.shape)}")
"""


def _driver(args, devices, processes=1):
    cmd = [sys.executable, "-c", CHECKPOINT_DRIVER, *map(str, args)]
    if processes > 1:
        cmd = ["bash", LAUNCH, "-n", str(processes), "-k", str(devices), "--timeout=400", "--", *cmd]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(devices), capture_output=True, text=True,
                          timeout=440)
    _check(proc, f"{args[0]} on {processes} x {devices} devices")
    return proc.stdout


def test_checkpoint_from_4_devices_restores_on_2_and_8_and_2_processes(tmp_path):
    directory = str(tmp_path / "ckpt")
    _driver(["save", directory, 1, 4, 1], devices=4)
    out = _driver(["restore", directory, 1, 2, 1], devices=2)
    assert "on 2 devices / 1 processes" in out and "per-device (128, 64)" in out
    out = _driver(["restore", directory, 2, 2, 2], devices=8)
    assert "on 8 devices / 1 processes" in out and "per-device (64, 64)" in out
    out = _driver(["restore", directory, 1, 8, 1], devices=4, processes=2)
    assert "[0] restored step 1" in out and "[1] restored step 1" in out
    assert "on 8 devices / 2 processes" in out


# --------------------------------------------------------------------- start-up plan

SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_PROCID": "3",
         "SLURM_LOCALID": "1"}


def test_plan_explicit_from_environment_and_config():
    env = {"JALIGN_COORDINATOR": "10.0.0.1:1234", "JALIGN_NUM_PROCESSES": "4",
           "JALIGN_PROCESS_ID": "2"}
    p = distributed.plan({}, env, on_tpu_vm=False)
    assert (p.kind, p.coordinator_address, p.num_processes, p.process_id) == (
        "explicit", "10.0.0.1:1234", 4, 2)
    # Config values win over the environment; unset ones fall back to it.
    p = distributed.plan({"coordinator_address": "host:99", "process_id": 0, "num_processes": 0},
                         env, on_tpu_vm=False)
    assert (p.coordinator_address, p.num_processes, p.process_id) == ("host:99", 4, 0)
    assert distributed.plan({}, dict(env, JALIGN_NUM_PROCESSES="1", JALIGN_PROCESS_ID="0"),
                            on_tpu_vm=False).kind == "single"


def test_plan_explicit_errors_name_what_is_missing():
    with pytest.raises(ValueError, match="process_id / JALIGN_PROCESS_ID"):
        distributed.plan({}, {"JALIGN_COORDINATOR": "h:1", "JALIGN_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="must be host:port"):
        distributed.plan({"coordinator_address": "h", "num_processes": 2, "process_id": 0}, {})
    with pytest.raises(ValueError, match="0 <= process_id < num_processes"):
        distributed.plan({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {})
    with pytest.raises(ValueError, match="JALIGN_NUM_PROCESSES='two'"):
        distributed.plan({}, {"JALIGN_COORDINATOR": "h:1", "JALIGN_NUM_PROCESSES": "two",
                              "JALIGN_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match="valid"):
        distributed.plan({"mode": "mpi"}, {})


def test_plan_detects_clusters():
    assert distributed.plan({}, dict(SLURM, SLURM_NTASKS="16"), on_tpu_vm=False).kind == "cluster"
    assert distributed.plan({}, dict(SLURM, SLURM_NTASKS="1"), on_tpu_vm=False).kind == "single"
    # sbatch's own shell (no job step yet) is not a process group.
    no_step = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
    assert distributed.plan({}, dict(no_step, SLURM_NTASKS="16"), on_tpu_vm=False).kind == "single"
    gke = {"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "1"}
    assert "4 hosts" in distributed.plan({}, gke, on_tpu_vm=False).reason
    assert distributed.plan({}, {}, on_tpu_vm=True).kind == "cluster"
    assert distributed.plan({}, {"TPU_SKIP_MDS_QUERY": "1"}, on_tpu_vm=True).kind == "single"
    assert distributed.plan({}, {}, on_tpu_vm=False).kind == "single"
    # Forced either way.
    assert distributed.plan({}, {"JALIGN_DISTRIBUTED": "cluster"}, on_tpu_vm=False).kind == "cluster"
    assert distributed.plan({"mode": "off"}, gke, on_tpu_vm=True).kind == "single"


def test_initialize_alone_is_a_no_op():
    import jax
    from jalign.config_utils import base_config
    # A group of one never contacts its (here unreachable) coordinator.
    env = {"JALIGN_COORDINATOR": "127.0.0.1:1", "JALIGN_NUM_PROCESSES": "1",
           "JALIGN_PROCESS_ID": "0"}
    assert distributed.initialize(base_config(), environ=env).kind == "single"
    assert not jax.distributed.is_initialized()


def test_initialize_after_devices_are_touched_says_so():
    code = ("import jax; from jalign import distributed; jax.devices(); "
            "distributed.initialize(environ={'JALIGN_COORDINATOR': '127.0.0.1:1', "
            "'JALIGN_NUM_PROCESSES': '2', 'JALIGN_PROCESS_ID': '0'})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "must run before anything touches devices" in proc.stderr


def test_grpo_two_processes_with_prompts_of_different_widths(tmp_path):
    """Each process pads its prompts to one width agreed by all: prompts of 7 to 116
    characters, so each process's own longest (rounded to 16) differs at some step."""
    rows = [{"prompt": "Sort: " + "b" * ((k * 37) % 110 + 1), "answer": "b"} for k in range(32)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = [f"--config.data.path={path}", f"--config.data.eval_path={path}",
             "--config.rl.reward_sources=math_answer", "--config.data.max_prompt_length=128",
             "--config.train.eval_every=0", "--config.train.eval_at_start=False",
             "--config.train.async_checkpointing=False", "--config.train.memory_report=False"]
    proc = subprocess.run(
        ["bash", LAUNCH, "-n", "2", "-k", "2", "--timeout=480", "--",
         sys.executable, "-m", "jalign.train", "--config=configs/grpo_jsonl.py:test",
         f"--workdir={tmp_path / 'run'}", *flags],
        cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=540)
    _check(proc, "GRPO, 2 processes x 2 devices")
    metrics = _metrics(tmp_path / "run" / "metrics.jsonl")
    assert sorted(metrics) == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics.values())
