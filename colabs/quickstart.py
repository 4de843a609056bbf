# %% [markdown]
# # jalign quickstart: SFT -> reward model -> DPO on a built-in task
#
# A tiny transformer learns the built-in `sort` task (a prompt like `sort: 7 3 9 1`
# whose gold answer is `1 3 7 9`, scored by a programmatic gold reward with partial
# credit). We run the three stages with jalign's one training loop, look at the
# table of held-out gold reward, preference accuracy and KL, plot the curves, then
# rerun the DPO stage with another `loss_type`.
#

# %%
# Setup: on a fresh runtime (e.g. Colab) clone jalign and install it; where jalign
# is installed already this cell does nothing. JALIGN_REPO: the repository to clone.
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("jalign") is None:
    repo = os.environ.get("JALIGN_REPO", "https://github.com/<you>/jalign")
    subprocess.check_call(["git", "clone", "-q", "--depth=1", repo, "jalign"])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", "jalign"])
    sys.path.insert(0, os.path.abspath("jalign"))  # this kernel started before the install
    os.chdir(os.path.join("jalign", "colabs"))

# %%
import json
import os
import tempfile

import jax

SMALL = os.environ.get("JALIGN_NOTEBOOK_SMALL") == "1"  # CI runs the notebook small
backend = jax.default_backend()
print("backend:", backend, "devices:", jax.device_count(), "small:", SMALL)

# %%
import importlib.util

from jalign.loop import run
from jalign.pipeline import run_pipeline

here = os.path.dirname(os.path.abspath("__file__"))
root = here if os.path.exists(os.path.join(here, "configs")) else os.path.dirname(here)
spec = importlib.util.spec_from_file_location("quickstart", os.path.join(root, "configs", "quickstart.py"))
quickstart = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quickstart)

config = quickstart.get_config("test" if SMALL else "")
config.mesh.fsdp = -1  # all devices of this runtime (CPU, GPU or TPU)
workdir = tempfile.mkdtemp(prefix="jalign_quickstart_")
summary = run_pipeline(config, workdir)

# %% [markdown]
# The table: `base` is the untrained model, `sft` after supervised fine-tuning on
# demonstrations of which half are imperfect, `reward` the reward model's held-out
# pairwise accuracy, `dpo` after DPO from the SFT model.

# %%
for name, row in summary["table"].items():
    print(f"{name:<8}", {k: round(v, 3) for k, v in row.items()})

# %%
import matplotlib.pyplot as plt


def curve(stage, key):
    rows = [json.loads(line) for line in open(os.path.join(workdir, stage, "metrics.jsonl"))]
    return [r["step"] for r in rows if key in r], [r[key] for r in rows if key in r]


fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
axes[0].plot(*curve("sft", "loss")); axes[0].set_title("SFT loss")
axes[1].plot(*curve("dpo", "rewards/margins")); axes[1].set_title("DPO reward margin")
evals = [json.loads(line) for line in open(os.path.join(workdir, "dpo", "evals.jsonl"))]
axes[2].plot([e["step"] for e in evals], [e["gold_reward/sampled"] for e in evals], marker="o")
axes[2].set_title("DPO held-out gold reward (sampled)")
for ax in axes:
    ax.set_xlabel("step")
fig.tight_layout()

# %% [markdown]
# ## The same DPO stage with another loss
#
# Every TRL `loss_type` is available; here SLiC's hinge loss, starting from the same
# SFT model (`init_from`).

# %%
dpo_config = quickstart.get_config("sft,test" if SMALL else "sft")
dpo_config.algo = "dpo"
dpo_config.init_from = os.path.join(workdir, "sft", "final_params")
dpo_config.dpo.loss_type = "hinge"
dpo_config.dpo.beta = 0.5
dpo_config.optimizer.learning_rate = 1e-4
dpo_config.train.num_steps = 4 if SMALL else 200
dpo_config.train.eval_every = dpo_config.train.num_steps
dpo_config.mesh.fsdp = -1
hinge = run(dpo_config, os.path.join(workdir, "dpo_hinge"))
print("sigmoid:", {k: round(v, 3) for k, v in summary["table"]["dpo"].items()})
print("hinge:  ", {k: round(hinge["final"][k], 3) for k in ("gold_reward/greedy", "gold_reward/sampled", "kl/ref")})
