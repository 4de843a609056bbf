"""The label stage: AI-feedback preference pairs from the current policy (RLAIF).

`run_label(config, workdir)` samples `config.label.num_samples` completions per prompt
from the policy (`config.init_from`, in a pipeline the SFT stage's model) with jalign's
sampler, pairs them (1st with 2nd, 3rd with 4th, ...), has the pairwise judge of
`config.judge` label each pair under a principle drawn from the constitution, and writes
WORKDIR/pairs.jsonl: one row per decided pair,

    {"prompt", "chosen", "rejected", "judge_probability", "principle",
     "gold_chosen", "gold_rejected"}       (gold_* when the prompts are a built-in task's)

which a later stage reads as preference data (`config.data.source = "jsonl"`,
`config.data.path = "stage:label/pairs.jsonl"`). Identical or empty completions and ties
(|p - 1/2| < config.judge.margin) are dropped and counted. `config.label.labeller =
"gold"` labels the same pairs by the task's gold reward instead (the control for
measuring the judge). It trains nothing; WORKDIR/label_summary.json holds the counts
and, on a task, the judge's agreement with gold and its length bias.

References: Bai et al., "Constitutional AI", arXiv:2212.08073 (section 4, the RL stage's
AI labels); Lee et al., "RLAIF", arXiv:2309.00267.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from jalign import judges
from jalign import sharding as shd
from jalign.best_of_n import sample_best_of_n
from jalign.config_utils import resolve_start
from jalign.data import load_records
from jalign.data.prompts import PROMPT_IDS_KEY, prepare_prompt_records
from jalign.models import hf
from jalign.models.config import ModelConfig
from jalign.models.transformer import decoder_init_fn
from jalign.tasks import get_task
from jalign.tokenizer import Tokenizer, builtin_tokenizer

PAIRS_FILE = "pairs.jsonl"
SUMMARY_FILE = "label_summary.json"
LABELLERS = ("judge", "gold")


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    num_prompts: int
    num_samples: int
    max_new_tokens: int
    temperature: float
    batch_size: int
    labeller: str
    judge: judges.JudgeSpec | None


def spec(config) -> LabelSpec:
    """`config.label` and (for the judge labeller) `config.judge`, checked."""
    label = config.label
    if label.labeller not in LABELLERS:
        raise ValueError(f"config.label.labeller = {label.labeller!r} is not valid; "
                         f"valid: {list(LABELLERS)}")
    if int(label.num_samples) < 2 or int(label.num_samples) % 2:
        raise ValueError("config.label.num_samples must be even and at least 2 (completions "
                         f"are paired 1st-2nd, 3rd-4th, ...), got {label.num_samples}")
    for key in ("num_prompts", "max_new_tokens", "batch_size"):
        if int(label[key]) < 1:
            raise ValueError(f"config.label.{key} must be at least 1, got {label[key]!r}")
    if label.labeller == "gold" and config.data.source != "task":
        raise ValueError("config.label.labeller='gold' needs a built-in task's prompts "
                         "(config.data.source='task')")
    judge = None
    if label.labeller == "judge":
        judge = judges.judge_spec(config.judge)
        if judge.kind != "pairwise":
            raise ValueError("the label stage compares pairs: config.judge.kind must be "
                             f"'pairwise', got {judge.kind!r}")
    return LabelSpec(int(label.num_prompts), int(label.num_samples), int(label.max_new_tokens),
                     float(label.temperature), int(label.batch_size), str(label.labeller), judge)


def load_policy(config, mesh, rules) -> tuple[Any, ModelConfig, Tokenizer]:
    """The policy's params (frozen; split over `mesh` by the logical-axis `rules`, as the
    train steps split them), architecture and tokenizer."""
    config, source = resolve_start(config)
    model = ModelConfig.from_mapping(config.model)
    abstract = hf.abstract_params(model, mesh=mesh, rules=rules)
    if source is None:
        init = jax.jit(lambda rng: nn.meta.unbox(decoder_init_fn(model)(rng)),
                       out_shardings=jax.tree.map(lambda a: a.sharding, abstract))
        params = init(jax.random.PRNGKey(config.seed))
    else:
        params = source.load(abstract)
    tokenizer = (Tokenizer.from_file(config.data.tokenizer) if config.data.tokenizer
                 else builtin_tokenizer())
    return params, model, tokenizer


def prompt_records(config, tokenizer, n: int) -> tuple[list[dict], Any]:
    data = config.data
    task = None
    if data.source == "task":
        task = get_task(data.task)
        records = task.prompt_records(n, seed=config.seed, split="train")
    else:
        if not data.path:
            raise ValueError("the label stage samples from prompts: config.data.path must name "
                             f"the {data.source} prompt file(s), or use a built-in task")
        records = load_records([p for p in data.path.split(",") if p],
                               required_fields=("prompt",), on_bad_row=data.on_bad_row)[0][:n]
    limit = data.max_prompt_length or data.max_length
    return prepare_prompt_records(records, tokenizer, max_prompt_length=limit,
                                  on_bad_row=data.on_bad_row), task


def shown_prompt(prompt) -> str:
    """The prompt as the judge reads it: the text, or a conversation's last user turn."""
    if isinstance(prompt, str):
        return prompt.strip()
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def as_response(prompt, text: str):
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def _mean_or_none(values) -> float | None:
    values = np.asarray(values, np.float64)
    return float(values.mean()) if values.size else None


def judge_report(prob, gold_x, gold_y, len_x, len_y, margin: float) -> dict[str, Any]:
    """How a judge's pair probabilities p(x > y) compare with a gold reward.

    judge/gold_agreement: among pairs gold does not tie and the judge decides, how often
    the judge prefers the higher-gold answer; judge/ties: the judge's undecided share;
    judge/prefers_longer and gold/prefers_longer: among pairs of different lengths that
    each decides, how often it prefers the longer (the judge's length bias shows as the
    difference).
    """
    pref = judges.preference(prob, margin)
    gold = np.sign(np.asarray(gold_x, np.float64) - np.asarray(gold_y, np.float64))
    longer = np.sign(np.asarray(len_x, np.float64) - np.asarray(len_y, np.float64))
    decided = pref != 0.5
    judge_sign = np.where(pref == 1.0, 1.0, -1.0)
    both = decided & (gold != 0)
    return {"judge/pairs": int(len(pref)), "judge/ties": float(np.mean(~decided)),
            "judge/gold_agreement": _mean_or_none((judge_sign == gold)[both]),
            "judge/prefers_longer": _mean_or_none((judge_sign == longer)[decided & (longer != 0)]),
            "gold/prefers_longer": _mean_or_none((gold == longer)[(gold != 0) & (longer != 0)])}


def label_pairs(spec_: LabelSpec, records: Sequence[Mapping], completions: Sequence[Sequence[str]],
                task, *, seed: int, tokenizer, mesh=None,
                rules=None) -> tuple[list[dict], dict[str, Any]]:
    """(JSONL rows, report) for the sampled completions of `records` (see module docstring);
    the judge's weights are split over `mesh` (None: one device)."""
    prompts, xs, ys = [], [], []
    for record, samples in zip(records, completions):
        for i in range(0, len(samples) - 1, 2):
            prompts.append(record)
            xs.append(samples[i])
            ys.append(samples[i + 1])
    # A pair teaches nothing when its completions are the same, and a preference row
    # needs two non-empty responses.
    kept = [i for i in range(len(xs)) if xs[i] != ys[i] and xs[i].strip() and ys[i].strip()]
    prompts, xs, ys = ([v[i] for i in kept] for v in (prompts, xs, ys))
    texts = [shown_prompt(r["prompt"]) for r in prompts]
    gold_x = gold_y = None
    if task is not None:
        gold_x = task.gold_reward([r["prompt"] for r in prompts], xs)
        gold_y = task.gold_reward([r["prompt"] for r in prompts], ys)
    len_x = [len(tokenizer.encode(x)) for x in xs]
    len_y = [len(tokenizer.encode(y)) for y in ys]
    report: dict[str, Any] = {"label/sampled_pairs": len(completions) * (spec_.num_samples // 2),
                              "label/identical_or_empty_pairs":
                              len(completions) * (spec_.num_samples // 2) - len(xs)}
    if spec_.labeller == "gold":
        principles = [""] * len(xs)
        prob = 0.5 + 0.5 * np.sign(np.asarray(gold_x) - np.asarray(gold_y))
        margin = 0.25
    else:
        judge = judges.cached_judge(spec_.judge, mesh, rules)
        principles = judges.sample_principles(spec_.judge.principles, len(xs), seed)
        out = judge.pairwise(texts, xs, ys, principles) if xs else {
            "prob": np.zeros(0), "first_prob": np.zeros(0), "label_mass": np.zeros(0)}
        prob, margin = out["prob"], spec_.judge.margin
        report["judge/first_label_prob"] = _mean_or_none(out["first_prob"])
        report["judge/label_mass"] = _mean_or_none(out["label_mass"])
        report["judge/truncated_prompts"] = judge.truncated
        if task is not None:
            report.update(judge_report(prob, gold_x, gold_y, len_x, len_y, margin))
    rows = []
    for i, p in enumerate(np.asarray(prob, np.float64)):
        if abs(p - 0.5) < margin:
            continue
        x_wins = p > 0.5
        row = {"prompt": prompts[i]["prompt"],
               "chosen": as_response(prompts[i]["prompt"], xs[i] if x_wins else ys[i]),
               "rejected": as_response(prompts[i]["prompt"], ys[i] if x_wins else xs[i]),
               "judge_probability": float(p if x_wins else 1.0 - p), "principle": principles[i]}
        if task is not None:
            row["gold_chosen"] = float(gold_x[i] if x_wins else gold_y[i])
            row["gold_rejected"] = float(gold_y[i] if x_wins else gold_x[i])
        rows.append(row)
    report["label/pairs_written"] = len(rows)
    report["label/ties"] = len(xs) - len(rows)
    if task is not None and rows:
        report["label/gold_accuracy"] = float(np.mean(
            [r["gold_chosen"] > r["gold_rejected"] for r in rows]))
    return rows, report


def run_label(config, workdir: str) -> dict[str, Any]:
    """Samples, judges and writes WORKDIR/pairs.jsonl (see module docstring); a finished
    stage (its summary file exists) is not redone. Returns the stage's summary."""
    summary_path = os.path.join(workdir, SUMMARY_FILE)
    if os.path.exists(summary_path) and os.path.exists(os.path.join(workdir, PAIRS_FILE)):
        with open(summary_path) as f:
            return json.load(f)
    spec_ = spec(config)
    # The policy and the judge are split over the run's mesh (config.mesh) as a train step
    # would split them.
    mesh = shd.make_mesh(config.mesh)
    rules = shd.rules_from_config(config.get("logical_axis_rules"))
    params, model, tokenizer = load_policy(config, mesh, rules)
    records, task = prompt_records(config, tokenizer, spec_.num_prompts)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        samples = sample_best_of_n(
            params, model, tokenizer, [r[PROMPT_IDS_KEY] for r in records],
            lambda indices, texts, lengths: np.zeros(len(texts)), n=spec_.num_samples,
            max_new_tokens=spec_.max_new_tokens, seed=config.seed,
            temperature=spec_.temperature, batch_size=spec_.batch_size)
    rows, report = label_pairs(spec_, records, samples.completions, task, seed=config.seed,
                               tokenizer=tokenizer, mesh=mesh, rules=rules)
    if not rows:
        raise ValueError(f"the label stage decided no pair of {report['label/sampled_pairs']} "
                         "sampled (identical completions or judge ties): sample more "
                         "(config.label.num_prompts, temperature) or lower config.judge.margin")
    summary = {"algo": "label", "final_metrics": report, "final": {},
               "pairs": os.path.join(workdir, PAIRS_FILE)}
    print("[label] " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in report.items()), flush=True)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = os.path.join(workdir, PAIRS_FILE + ".tmp")
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, os.path.join(workdir, PAIRS_FILE))
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
    return summary
