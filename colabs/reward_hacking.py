# %% [markdown]
# # Reward hacking: optimising a length-biased reward model
#
# A reward model learns from human-like labels; if the labeller liked longer answers
# regardless of quality, the model learns "longer is better" too. Optimise a policy
# hard against such a proxy and the proxy keeps rising while the true (gold) quality
# falls: reward-model overoptimisation, or Goodharting.
#
# The built-in `sentiment` task makes this measurable: the prompt is the start of a
# review (`review: the film was `), a good completion is a few distinct positive
# words, and the task's programmatic **gold reward** penalises fillers, repeats and
# padding beyond six words. Its candidate generator includes long padded answers
# (`good and great, it was a bit long`), bait for a labeller with a length bias.
#
# 1. SFT on demonstrations, half of them imperfect.
# 2. A reward model (the **proxy**) on preference pairs labelled with
#    `data.length_bias=1.0`: the labeller's margin is
#    `gold_a - gold_b + 1.0 * (len_a - len_b) / max(len_a, len_b)`.
# 3. Best-of-n against the proxy (n = 1 .. 16 here, 32 at full size): no training, the
#    KL to the SFT model is the analytical `log n - (n - 1) / n`.
# 4. GRPO against the proxy alone, evaluated along training: proxy reward, gold
#    reward, completion length and KL to the SFT model.
# 5. Gao et al.'s functional forms fitted to the gold reward's gain against
#    d = sqrt(KL): `d (alpha - beta d)` for best-of-n, `d (alpha - beta log d)` for RL.
#
# Steps 1-5 are one call, `jalign.overopt.run_overopt`, the library side of
# `python -m jalign.overopt --workdir=W` (which adds seeds, ensembles and WARM).
#
# 6. The same GRPO run with a length-regularised reward,
#    `proxy - 2.0 * len(completion) / 40`, a user Python callable combined with the
#    reward model through `rl.reward_sources` / `rl.reward_weights`.
#
# The last cell prints the numbers and says plainly what happened. CI runs it small
# (`JALIGN_NOTEBOOK_SMALL=1`), with fewer steps, a weaker proxy and n <= 8: its
# curves are noisier and its fits rest on few points.

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
import dataclasses
import os
import tempfile

import jax

from jalign import loop, overopt

SMALL = os.environ.get("JALIGN_NOTEBOOK_SMALL") == "1"  # CI runs the notebook small
backend = jax.default_backend()
ACCELERATOR = backend in ("gpu", "tpu")
print("backend:", backend, "devices:", jax.device_count(), "small:", SMALL)

# Steps per stage, rollout and evaluation sizes (jalign.overopt.SIZES). An accelerator
# affords bigger batches and more evaluation prompts (smoother curves); the CPU sizes
# were tuned to show the effect (the accelerator sizes have not been tuned).
SIZES = overopt.SIZES["small" if SMALL else "full"]
if ACCELERATOR and not SMALL:
    SIZES = dataclasses.replace(SIZES, sft_steps=400, reward_steps=300, rl_steps=80,
                                prompts=16, group=8, eval_prompts=256)
LENGTH_BIAS = 1.0     # the labeller's preference for longer answers
PENALTY = 2.0         # weight of -len(completion) / 40 in the mitigated reward
print(SIZES)
workdir = tempfile.mkdtemp(prefix="jalign_reward_hacking_")

# %% [markdown]
# ## SFT and the proxy
#
# Each stage trains with the library's one training loop (`jalign.loop.run`) in
# `WORKDIR/seed_0/{sft,reward_0}`, with `jalign.overopt`'s configs. The proxy's
# accuracy is measured on held-out pairs labelled by the gold reward alone (no length
# bias): above chance, so it is a useful reward model, but it has learned the
# labeller's taste for length along with the task.

# %%
seed_dir = os.path.join(workdir, "seed_0")
sft_params = os.path.join(seed_dir, "sft", "final_params")
proxy_params = os.path.join(seed_dir, "reward_0", "final_params")
sft_summary = overopt.train(overopt.sft_config(SIZES, 0), os.path.join(seed_dir, "sft"))

# %%
reward_summary = overopt.train(
    overopt.reward_config(SIZES, 0, sft_params, length_bias=LENGTH_BIAS, label_noise=0.0),
    os.path.join(seed_dir, "reward_0"))
print("SFT held-out gold reward (sampled):", round(sft_summary["final"]["gold_reward/sampled"], 3))
print("proxy accuracy on gold-labelled held-out pairs:",
      round(reward_summary["final"]["eval_accuracy"], 3))

# %% [markdown]
# ## Best-of-n and GRPO against the proxy, with Gao's fits
#
# `run_overopt` finds the two stages above done and adds best-of-n, GRPO against the
# proxy evaluated along training, the fits, `WORKDIR/overopt.png` and
# `WORKDIR/overopt.json`. No KL penalty in GRPO (`rl.kl_beta=0`): the point is to watch
# what unconstrained optimisation does to the gold reward. The fits' table: each
# curve's alpha, beta, R^2 and the KL at which the fitted gain peaks.

# %%
result = overopt.run_overopt(workdir, sizes=SIZES, length_bias=LENGTH_BIAS)

# %% [markdown]
# ## GRPO against the proxy with a length penalty
#
# `rl.reward_sources` combines reward sources with `rl.reward_weights`: `model` is
# the trained reward model at `rl.reward_model`, `python:module.function` any batched
# function in TRL's convention, `(prompts, completions, **columns) -> floats` (it may
# name only the columns it uses, here none). A function defined in this notebook is
# importable as `__main__.length_penalty`. Its evaluations report the proxy alone
# (`rewards/model/sampled`) next to the combined reward, so both runs are scored by
# the same proxy.


# %%
def length_penalty(prompts, completions):
    """-len/40 per completion: about -1 for the longest answers the task allows."""
    return [-len(c) / 40.0 for c in completions]


mitigated = overopt.grpo_config(SIZES, 0, sft_params, proxy_params,
                                sources="model,python:__main__.length_penalty",
                                weights=[1.0, PENALTY])
curves = {"biased proxy": result["results"][0]["rl"]["single"],
          "proxy + length penalty": overopt.rl_curve(
              loop.run(mitigated, os.path.join(seed_dir, "rl_length_penalty")))}
best_of_n = result["results"][0]["best_of_n"]
mitigated_fit = overopt.fit_curve(curves["proxy + length penalty"], "rl")
print(f"Gao RL fit, proxy + length penalty: alpha={mitigated_fit.alpha:.4f} "
      f"beta={mitigated_fit.beta:.4f} R^2={mitigated_fit.r2:.3f}")

# %%
import matplotlib.pyplot as plt  # noqa: E402
from IPython.display import Image, display  # noqa: E402

display(Image(os.path.join(workdir, "overopt.png")))  # gold and proxy gain vs sqrt(KL), fits
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
for ax, key in zip(axes, ("proxy", "gold")):
    ax.plot([r["kl"] for r in best_of_n], [r[key] for r in best_of_n], marker="s",
            label="best-of-n (biased proxy)")
    for name, rows in curves.items():
        ax.plot([max(r["kl"], 0) for r in rows], [r[key] for r in rows], marker="o",
                label=f"GRPO, {name}")
    ax.set_title(f"{key} reward")
    ax.set_xlabel("KL to the SFT model")
    ax.set_xscale("symlog", linthresh=1.0)
axes[1].legend(fontsize=7)
fig.tight_layout()
fig.savefig(os.path.join(workdir, "reward_hacking.png"), dpi=110)

# %% [markdown]
# ## The numbers
#
# For each run: the SFT start, the evaluation with the highest gold reward, and the
# end. "Hacked" means that from the gold peak to the end the proxy rose while the
# gold reward fell (by more than 0.05) and the KL grew.

# %%
def points(rows):
    peak = max(rows, key=lambda r: r["gold"])
    return {"start": rows[0], "peak gold": peak, "end": rows[-1]}


print(f"{'n':>4}{'KL':>8}{'proxy':>9}{'gold':>8}   best-of-n against the proxy")
for r in best_of_n:
    print(f"{r['n']:>4}{r['kl']:>8.3f}{r['proxy']:>9.3f}{r['gold']:>8.3f}")
print()
print(f"{'run':<24}{'point':<11}{'step':>5}{'proxy':>9}{'gold':>8}{'KL':>8}")
for name, rows in curves.items():
    for label, r in points(rows).items():
        print(f"{name:<24}{label:<11}{r['step']:>5}{r['proxy']:>9.3f}{r['gold']:>8.3f}"
              f"{r['kl']:>8.2f}")
print()
falls = {}
for name, rows in curves.items():
    p = points(rows)
    peak, end = p["peak gold"], p["end"]
    falls[name] = peak["gold"] - end["gold"]
    hacked = (end["proxy"] > peak["proxy"] and falls[name] > 0.05 and end["kl"] > peak["kl"])
    print(f"{name}: from the gold peak (step {peak['step']}, KL {peak['kl']:.2f}) to the end "
          f"(KL {end['kl']:.2f}) the proxy went {peak['proxy']:.3f} -> {end['proxy']:.3f} and the "
          f"gold reward {peak['gold']:.3f} -> {end['gold']:.3f}: "
          + ("gold FELL while the proxy ROSE at high KL (reward hacking)." if hacked else
             "no such divergence (not hacked by this definition)."))
biased, mitigated_fall = falls["biased proxy"], falls["proxy + length penalty"]
print(f"Gold fall from peak to end: biased proxy {biased:.3f}, with the length penalty "
      f"{mitigated_fall:.3f} -> the mitigation's fall was "
      + ("SMALLER." if mitigated_fall < biased else "NOT smaller."))
top_n = max(best_of_n, key=lambda r: r["gold"])
print(f"Best-of-n: gold peaks at n={top_n['n']} (KL {top_n['kl']:.2f}, gold {top_n['gold']:.3f}; "
      f"n=1: {best_of_n[0]['gold']:.3f}, n={best_of_n[-1]['n']}: {best_of_n[-1]['gold']:.3f}).")
for name, fit in result["fits"].items():
    f = fit["gold"]
    print(f"Gao fit of the gold gain, {name}: alpha={f['alpha']:.4f} beta={f['beta']:.4f} "
          f"R^2={f['r2']:.3f}" + (f", fitted peak at KL {f['peak_kl']:.2f}" if f["peak_kl"] is not None else
                                  ", no fitted peak (beta <= 0)"))
