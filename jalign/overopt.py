"""Reward-model over-optimisation, measured: best-of-n and RL against a flawed proxy.

    python -m jalign.overopt --workdir=/tmp/overopt [--small] [--seeds=3] \\
        [--variants=single,mean,uncertainty,min,warm] [--sizes=rl_steps=40,max_n=16]

On the built-in `sentiment` task, for each seed (WORKDIR/seed_K):

1. SFT on demonstrations, half of them imperfect (`data.demo_quality=0.5`).
2. Proxy reward model(s) on preference pairs from a flawed labeller
   (`data.length_bias`, `data.label_noise`): `--members` of them (seeds K*100+j),
   three when an ensemble or WARM variant is asked for.
3. Best-of-n against the first proxy for n in 1, 2, 4, ..., max_n: max_n samples per
   held-out prompt, scored once; each n keeps the proxy's best of every block of n
   (max_n / n blocks per prompt), at the analytical KL log n - (n - 1) / n.
4. GRPO against each variant's reward (no KL penalty): "single" (the first proxy),
   "mean" / "uncertainty" / "min" (the ensemble of all members, config.rl.reward_ensemble)
   and "warm" (their weight average, jalign.warm), evaluated along training on the
   held-out prompts: gold reward, proxy reward (the reward it is trained on) and KL to
   the SFT model (sampled completions, `kl/ref`).
5. Gao et al.'s forms fitted to the gold (and proxy) gain over the SFT model against
   d = sqrt(KL) (jalign.gao): d (alpha - beta d) for best-of-n, d (alpha - beta log d)
   for RL, each run's d = 0 point included; coefficients and R^2 printed.

WORKDIR/overopt.png plots gold and proxy against sqrt(KL) with the fitted curves;
WORKDIR/overopt.json holds every point, the fits (per seed and pooled over seeds) and,
per RL variant, the peak gold reward and the KL at which it peaks with their spread
over seeds (jalign.sweep.spread). A finished stage is not trained again on a rerun.

Reference: Gao, Schulman, Hilton, "Scaling Laws for Reward Model Overoptimization",
arXiv:2210.10760.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import matplotlib
import numpy as np

from jalign import checkpoint, loop
from jalign.algorithms.rl_inputs import best_of_n_evaluator, rl_inputs
from jalign.algorithms.rl_spec import rl_spec
from jalign.config_utils import base_config
from jalign.gao import fit_gao, gao_curve, sqrt_kl
from jalign.models import ModelConfig, decoder_init_fn
from jalign.sweep import spread
from jalign.warm import average_saved

VARIANTS = ("single", "mean", "uncertainty", "min", "warm")


@dataclasses.dataclass(frozen=True)
class Sizes:
    sft_steps: int = 200
    reward_steps: int = 150
    rl_steps: int = 60
    eval_every: int = 10        # RL evals along training (and at step 0)
    prompts: int = 8            # RL prompts per step
    group: int = 4              # GRPO group size
    eval_prompts: int = 64      # held-out prompts of every eval (RL and best-of-n)
    max_n: int = 32             # best-of-n: samples per prompt
    max_new_tokens: int = 40


# "small": CI's (the notebook and the tests run the whole study in a few minutes; the
# curves are noisy at this size, and nothing is claimed from them).
SIZES = {"full": Sizes(), "small": Sizes(sft_steps=100, reward_steps=50, rl_steps=12,
                                          eval_every=4, eval_prompts=32, max_n=8)}


def task_config(algo: str, steps: int, sizes: Sizes, seed: int):
    """The `sentiment` task's config for one stage (colabs/reward_hacking.py's sizes)."""
    config = base_config()
    config.algo = algo
    config.seed = seed
    config.data.task = "sentiment"
    config.data.max_length = 96
    config.data.max_prompt_length = 48
    config.train.num_steps = steps
    config.train.log_every = 10
    config.train.eval_every = steps
    config.train.checkpoint_every = steps
    config.eval.num_prompts = sizes.eval_prompts
    config.eval.batch_size = sizes.eval_prompts
    config.eval.max_new_tokens = sizes.max_new_tokens
    config.mesh.fsdp = -1
    return config


def sft_config(sizes: Sizes, seed: int):
    config = task_config("sft", sizes.sft_steps, sizes, seed)
    config.data.demo_quality = 0.5
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 20
    return config


def reward_config(sizes: Sizes, seed: int, sft_params: str, *, length_bias: float,
                  label_noise: float):
    config = task_config("reward", sizes.reward_steps, sizes, seed)
    config.init_from = sft_params
    config.data.length_bias = length_bias
    config.data.label_noise = label_noise
    config.optimizer.learning_rate = 1e-3
    return config


def grpo_config(sizes: Sizes, seed: int, sft_params: str, reward_model: str, *,
                ensemble: str = "mean", sources: str = "model",
                weights: Sequence[float] = (1.0,)):
    """GRPO from the SFT model against `reward_model` (a comma list: an ensemble combined
    as `ensemble`), no KL penalty, evaluated every sizes.eval_every steps and at step 0."""
    config = task_config("grpo", sizes.rl_steps, sizes, seed)
    config.init_from = sft_params
    config.rl.reward_sources = sources
    config.rl.reward_weights = list(weights)
    config.rl.reward_model = reward_model
    config.rl.reward_ensemble = ensemble
    config.rl.group_size = sizes.group
    config.rl.max_new_tokens = sizes.max_new_tokens
    config.rl.kl_beta = 0.0
    config.data.batch_size = sizes.prompts
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.train.log_every = 5
    config.train.eval_every = sizes.eval_every
    config.train.eval_at_start = True
    return config


def train(config, workdir: str) -> dict[str, Any]:
    """loop.run, or the saved summary of a run that already finished in `workdir`."""
    done = os.path.join(workdir, "summary.json")
    if os.path.exists(done) and os.path.isdir(os.path.join(workdir, "final_params")):
        with open(done) as f:
            return json.load(f)
    return loop.run(config, workdir)


def rl_curve(summary: dict) -> list[dict[str, float]]:
    """An RL run's held-out evals as points: step, kl (to SFT), gold and proxy (sampled)."""
    rows = []
    for e in summary["evals"]:
        proxy = e.get("rewards/model/sampled", e.get("reward/sampled"))
        rows.append({"step": e["step"], "kl": float(e.get("kl/ref", 0.0)),
                     "gold": e["gold_reward/sampled"], "gold_sem": e.get("gold_reward/sampled_sem"),
                     "proxy": proxy})
    return rows


def best_of_n_curve(config, params, ns: Sequence[int]) -> list[dict[str, float]]:
    """Best-of-n points against config's reward for each n in `ns` (dividing max(ns)):
    max(ns) samples per held-out prompt, the best of each block of n kept."""
    spec = rl_spec(config)
    model_cfg = ModelConfig.from_mapping(config.model)
    inputs = rl_inputs(config, spec, model_cfg)
    max_n = max(ns)
    _, samples = best_of_n_evaluator(config, model_cfg, inputs, n=max_n)(params)
    prompts = [r["prompt"] for r in inputs.eval_records]
    every = [c for row in samples.completions for c in row]
    gold_PxN = np.asarray(inputs.task.gold_reward([p for p in prompts for _ in range(max_n)],
                                                  every), np.float64).reshape(len(prompts), max_n)
    return best_of_n_points(gold_PxN, samples.rewards, ns)


def best_of_n_points(gold_PxN, proxy_PxN, ns: Sequence[int]) -> list[dict[str, float]]:
    """For each n: the gold and proxy reward of the proxy's best in each block of n
    columns (the first max_n // n blocks of every row; NaN proxy = never kept), averaged
    over blocks then prompts, with the gold's sem over prompts and the analytical KL."""
    gold_PxN = np.asarray(gold_PxN, np.float64)
    proxy_PxN = np.asarray(proxy_PxN, np.float64)
    proxy_PxN = np.where(np.isnan(proxy_PxN), -np.inf, proxy_PxN)
    num_prompts, max_n = gold_PxN.shape
    rows = []
    for n in ns:
        blocks = max_n // n
        if blocks < 1:
            raise ValueError(f"n={n} exceeds the {max_n} samples per prompt")
        proxy_PxBxn = proxy_PxN[:, :blocks * n].reshape(num_prompts, blocks, n)
        pick = proxy_PxBxn.argmax(-1)[..., None]
        gold = np.take_along_axis(gold_PxN[:, :blocks * n].reshape(proxy_PxBxn.shape), pick, -1)
        proxy = np.take_along_axis(proxy_PxBxn, pick, -1)
        per_prompt = gold[..., 0].mean(-1)
        rows.append({"n": n, "kl": math.log(n) - (n - 1) / n, "gold": float(per_prompt.mean()),
                     "gold_sem": float(per_prompt.std(ddof=1) / math.sqrt(num_prompts)),
                     "proxy": float(proxy.mean())})
    return rows


def load_policy(config, path: str):
    model_cfg = ModelConfig.from_mapping(config.model)
    abstract = nn.meta.unbox(jax.eval_shape(decoder_init_fn(model_cfg), jax.random.PRNGKey(0)))
    return checkpoint.load_params(path, abstract)


def fit_curve(rows: Sequence[dict], form: str, key: str = "gold"):
    """Gao's `form` fitted to the gain of `key` over the d = 0 row(s) (the first row's
    value for RL, n = 1 for best-of-n), every row included."""
    base = rows[0][key]
    return fit_gao(sqrt_kl([r["kl"] for r in rows]), [r[key] - base for r in rows], form)


def peak(rows: Sequence[dict]) -> dict[str, float]:
    top = max(rows, key=lambda r: r["gold"])
    return {"peak_gold": top["gold"], "peak_kl": top["kl"], "peak_step": top["step"],
            "start_gold": rows[0]["gold"], "end_gold": rows[-1]["gold"], "end_kl": rows[-1]["kl"]}


def run_seed(workdir: str, seed: int, sizes: Sizes, *, variants: Sequence[str], members: int,
             length_bias: float, label_noise: float, ns: Sequence[int]) -> dict[str, Any]:
    """Every stage of one seed in `workdir` (see the module docstring); returns the points."""
    sft = sft_config(sizes, seed)
    train(sft, os.path.join(workdir, "sft"))
    sft_params = os.path.join(workdir, "sft", "final_params")
    proxies = []
    for j in range(members):
        cfg = reward_config(sizes, seed * 100 + j, sft_params, length_bias=length_bias,
                            label_noise=label_noise)
        summary = train(cfg, os.path.join(workdir, f"reward_{j}"))
        print(f"proxy {j}: accuracy on gold-labelled held-out pairs "
              f"{summary['final'].get('eval_accuracy', float('nan')):.3f}")
        proxies.append(os.path.join(workdir, f"reward_{j}", "final_params"))
    sources = {"single": (proxies[0], "mean"), "warm": (os.path.join(workdir, "warm"), "mean")}
    sources.update({c: (",".join(proxies), c) for c in ("mean", "uncertainty", "min")})
    if "warm" in variants and not os.path.isdir(sources["warm"][0]):
        average_saved(proxies, sources["warm"][0])
    bon_config = grpo_config(sizes, seed, sft_params, proxies[0])
    bon_config.eval.batch_size = 256  # samples per generate call: fewer, larger calls
    bon_path = os.path.join(workdir, "best_of_n.json")
    if os.path.exists(bon_path):
        with open(bon_path) as f:
            bon = json.load(f)
    else:
        bon = best_of_n_curve(bon_config, load_policy(bon_config, sft_params), ns)
        with open(bon_path, "w") as f:
            json.dump(bon, f, indent=2)
    out = {"seed": seed, "best_of_n": bon, "rl": {}}
    for variant in variants:
        path, how = sources[variant]
        cfg = grpo_config(sizes, seed, sft_params, path, ensemble=how)
        out["rl"][variant] = rl_curve(train(cfg, os.path.join(workdir, f"rl_{variant}")))
    return out


def fits_of(seed_results: Sequence[dict], variants: Sequence[str]) -> dict[str, Any]:
    """Gao fits of the gold and proxy gains: best-of-n and each RL variant, pooled over seeds
    (each seed's gains over its own d = 0 point)."""
    def pooled(curves, form, key):
        d, gain = [], []
        for rows in curves:
            d += list(sqrt_kl([r["kl"] for r in rows]))
            gain += [r[key] - rows[0][key] for r in rows]
        return fit_gao(d, gain, form).as_dict()
    fits = {"best_of_n": {k: pooled([s["best_of_n"] for s in seed_results], "bon", k)
                          for k in ("gold", "proxy")}}
    for v in variants:
        fits[f"rl_{v}"] = {k: pooled([s["rl"][v] for s in seed_results], "rl", k)
                           for k in ("gold", "proxy")}
    return fits


def peaks_of(seed_results: Sequence[dict], variants: Sequence[str]) -> dict[str, Any]:
    out = {}
    for v in variants:
        per_seed = [peak(s["rl"][v]) for s in seed_results]
        out[v] = {"per_seed": per_seed}
        if len(per_seed) > 1:
            out[v].update({k: spread([p[k] for p in per_seed])
                           for k in ("peak_gold", "peak_kl", "start_gold", "end_gold")})
    return out


def plot(seed_results: Sequence[dict], fits: dict, path: str) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the non-interactive backend

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    curves = {"best-of-n": ("best_of_n", [s["best_of_n"] for s in seed_results])}
    for v in seed_results[0]["rl"]:
        curves[f"RL ({v})"] = (f"rl_{v}", [s["rl"][v] for s in seed_results])
    for i, (label, (name, runs)) in enumerate(curves.items()):
        color = f"C{i}"
        d_max = max(float(sqrt_kl(r["kl"])) for rows in runs for r in rows) or 1.0
        grid = np.linspace(0, d_max, 100)
        for ax, key in zip(axes, ("gold", "proxy")):
            for rows in runs:
                ax.plot(sqrt_kl([r["kl"] for r in rows]), [r[key] - rows[0][key] for r in rows],
                        "o", color=color, alpha=0.6, ms=4)
            fit = fits[name][key]
            form = "d(a - b d)" if name == "best_of_n" else "d(a - b log d)"
            ax.plot(grid, gao_curve(grid, fit["form"], fit["alpha"], fit["beta"]), "-", color=color,
                    label=f"{label}: {form}, a={fit['alpha']:.3f} b={fit['beta']:.3f} "
                          f"R²={fit['r2']:.2f}")
    for ax, key in zip(axes, ("gold", "proxy")):
        ax.set_xlabel("d = sqrt(KL to SFT)")
        ax.set_title(f"{key} reward gain over SFT")
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_fits(fits: dict) -> str:
    lines = [f"{'curve':<16}{'reward':<8}{'form':<16}{'alpha':>9}{'beta':>9}{'R^2':>7}{'peak KL':>9}"]
    for name, by_key in fits.items():
        for key, f in by_key.items():
            form = "d(a - b d)" if f["form"] == "bon" else "d(a - b log d)"
            kl = f"{f['peak_kl']:.2f}" if f["peak_kl"] is not None else "-"
            lines.append(f"{name:<16}{key:<8}{form:<16}{f['alpha']:>9.4f}{f['beta']:>9.4f}"
                         f"{f['r2']:>7.3f}{kl:>9}")
    return "\n".join(lines)


def format_peaks(peaks: dict) -> str:
    lines = [f"{'RL variant':<12}{'peak gold':>18}{'KL at peak':>18}{'gold at end':>18}"]
    for v, p in peaks.items():
        if "peak_gold" in p:
            cells = [f"{p[k]['mean']:.3f} ± {p[k]['std']:.3f}"
                     for k in ("peak_gold", "peak_kl", "end_gold")]
        else:
            cells = [f"{p['per_seed'][0][k]:.3f}" for k in ("peak_gold", "peak_kl", "end_gold")]
        lines.append(f"{v:<12}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def run_overopt(workdir: str, *, small: bool = False, seeds: int = 1,
                variants: Sequence[str] = ("single",), members: int | None = None,
                length_bias: float = 1.0, label_noise: float = 0.0,
                sizes: Sizes | None = None) -> dict[str, Any]:
    """Every seed's stages, the fits, WORKDIR/overopt.png and WORKDIR/overopt.json."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variants must be among {VARIANTS}, got {list(variants)}")
    sizes = sizes or SIZES["small" if small else "full"]
    if members is None:
        members = 3 if set(variants) - {"single"} else 1
    if members < 2 and set(variants) - {"single"}:
        raise ValueError(f"variants {list(variants)} need members >= 2")
    ns = [2 ** i for i in range(int(math.log2(sizes.max_n)) + 1)]
    os.makedirs(workdir, exist_ok=True)
    results = [run_seed(os.path.join(workdir, f"seed_{k}"), k, sizes, variants=variants,
                        members=members, length_bias=length_bias, label_noise=label_noise, ns=ns)
               for k in range(seeds)]
    fits, peaks = fits_of(results, variants), peaks_of(results, variants)
    summary = {"sizes": dataclasses.asdict(sizes), "seeds": seeds, "members": members,
               "length_bias": length_bias, "label_noise": label_noise, "results": results,
               "fits": fits, "peaks": peaks}
    print(format_fits(fits))
    print(format_peaks(peaks))
    if jax.process_index() == 0:
        plot(results, fits, os.path.join(workdir, "overopt.png"))
        with open(os.path.join(workdir, "overopt.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jalign.overopt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--small", action="store_true", help="CI sizes (fewer steps and prompts, n <= 8)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--variants", default="single",
                        help=f"comma list of RL reward variants among {','.join(VARIANTS)}")
    parser.add_argument("--members", type=int, default=None,
                        help="proxy reward models per seed (default 3 with an ensemble or WARM)")
    parser.add_argument("--length_bias", type=float, default=1.0)
    parser.add_argument("--label_noise", type=float, default=0.0)
    parser.add_argument("--sizes", default="",
                        help="overrides of the sizes (Sizes' fields), e.g. rl_steps=40,max_n=16")
    args = parser.parse_args(argv)
    sizes = SIZES["small" if args.small else "full"]
    if args.sizes:
        pairs = [item.split("=", 1) for item in args.sizes.split(",") if item.strip()]
        sizes = dataclasses.replace(sizes, **{k.strip(): int(v) for k, v in pairs})
    run_overopt(args.workdir, small=args.small, seeds=args.seeds,
                variants=[v.strip() for v in args.variants.split(",") if v.strip()],
                members=args.members, length_bias=args.length_bias, label_noise=args.label_noise,
                sizes=sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
