"""The revise stage: Constitutional AI's supervised step (critique -> revision -> SFT data).

`run_revise(config, workdir)` samples one completion per prompt from the policy
(`config.init_from`, in a pipeline the SFT stage's model), then has the feedback model
(`config.judge.path`, the judge's model, read with the judge's chat setting) write

  1. a critique of the completion under a principle drawn from the constitution
     (`config.judge.constitution`): `config.revise.critique_template` with {principle},
     {prompt}, {completion};
  2. a revision of the completion that answers the critique:
     `config.revise.revision_template` with {principle}, {prompt}, {completion}, {critique}.

Both are sampled with jalign's KV-cache sampler (`config.revise.critic_temperature`), one
batched program per width, the feedback model frozen on one device. The stage writes
WORKDIR/revisions.jsonl, one row per prompt with a non-empty revision,

    {"prompt", "completion" (the revision), "original", "critique", "principle",
     "gold_original", "gold_revision"}      (gold_* when the prompts are a built-in task's)

which a later SFT stage trains on (`config.data.source = "jsonl"`, `config.data.path =
"stage:revise/revisions.jsonl"`; the SL-CAI model). Only the revision's first line is
kept when `config.revise.first_line` (a one-line task's answer; a small model's revision
tends to run on). WORKDIR/revise_summary.json counts the rows, the empty revisions
dropped, the unchanged ones and, on a task, the gold reward of originals and revisions.

Reference: Bai et al., "Constitutional AI", arXiv:2212.08073, section 3 (the
supervised stage: critique, revision, fine-tuning on the revisions).
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
from jalign.data.prompts import PROMPT_IDS_KEY
from jalign.label import as_response, load_policy, prompt_records, shown_prompt

REVISIONS_FILE = "revisions.jsonl"
SUMMARY_FILE = "revise_summary.json"
TEMPLATES = {
    "critique": ("Principle: {principle}\n\nTask: {prompt}\nAnswer: {completion}\n\n"
                 "Point out how the answer fails the principle, in one or two sentences."),
    "revision": ("Principle: {principle}\n\nTask: {prompt}\nAnswer: {completion}\n"
                 "Critique: {critique}\n\nRewrite the answer so that it follows the principle. "
                 "Reply with the new answer only."),
}
_FIELDS = {"critique": ("principle", "prompt", "completion"),
           "revision": ("principle", "prompt", "completion", "critique")}


@dataclasses.dataclass(frozen=True)
class ReviseSpec:
    num_prompts: int
    max_new_tokens: int          # the policy's completion
    temperature: float           # the policy's sampling
    critique_tokens: int
    revision_tokens: int
    critic_temperature: float
    batch_size: int
    first_line: bool
    critique_template: str
    revision_template: str
    judge: judges.JudgeSpec


def _template(value: str, which: str) -> str:
    text = value or TEMPLATES[which]
    if value and os.path.isfile(value):
        with open(value) as f:
            text = f.read()
    missing = [k for k in _FIELDS[which] if "{" + k + "}" not in text]
    if missing:
        raise ValueError(f"config.revise.{which}_template has no {{{missing[0]}}}; a {which} "
                         f"template shows {', '.join('{' + k + '}' for k in _FIELDS[which])}")
    return text


def spec(config) -> ReviseSpec:
    """`config.revise` and the feedback model's `config.judge` (path, constitution), checked."""
    r = config.revise
    for key in ("num_prompts", "max_new_tokens", "critique_tokens", "revision_tokens",
                "batch_size"):
        if int(r[key]) < 1:
            raise ValueError(f"config.revise.{key} must be at least 1, got {r[key]!r}")
    for key in ("temperature", "critic_temperature"):
        if not float(r[key]) > 0:
            raise ValueError(f"config.revise.{key} must be > 0 (the stage samples), got {r[key]!r}")
    return ReviseSpec(int(r.num_prompts), int(r.max_new_tokens), float(r.temperature),
                      int(r.critique_tokens), int(r.revision_tokens),
                      float(r.critic_temperature), int(r.batch_size), bool(r.first_line),
                      _template(r.critique_template, "critique"),
                      _template(r.revision_template, "revision"),
                      judges.judge_spec(config.judge))


def _sample(params, model, tokenizer, rows: Sequence[Sequence[int]], *, max_new_tokens: int,
            temperature: float, seed: int, batch_size: int) -> list[str]:
    """One sampled completion per row of token ids."""
    out = sample_best_of_n(params, model, tokenizer, rows,
                           lambda indices, texts, lengths: np.zeros(len(texts)), n=1,
                           max_new_tokens=max_new_tokens, seed=seed, temperature=temperature,
                           batch_size=batch_size)
    return [c[0] for c in out.completions]


def clean_revision(text: str, first_line: bool) -> str:
    text = text.strip()
    return text.split("\n", 1)[0].strip() if first_line else text


def revision_rows(records: Sequence[Mapping], originals: Sequence[str],
                  critiques: Sequence[str], revisions: Sequence[str],
                  principles: Sequence[str], task) -> tuple[list[dict], dict[str, Any]]:
    """(JSONL rows, report): one row per prompt whose revision is not empty."""
    keep = [i for i, r in enumerate(revisions) if r]
    rows = []
    for i in keep:
        prompt = records[i]["prompt"]
        rows.append({"prompt": prompt, "completion": as_response(prompt, revisions[i]),
                     "original": originals[i], "critique": critiques[i],
                     "principle": principles[i]})
    report: dict[str, Any] = {
        "revise/prompts": len(records), "revise/rows": len(rows),
        "revise/empty_revisions": len(records) - len(rows),
        "revise/unchanged": int(sum(revisions[i] == originals[i].strip() for i in keep))}
    if task is not None and rows:
        prompts = [records[i]["prompt"] for i in keep]
        before = task.gold_reward(prompts, [originals[i] for i in keep])
        after = task.gold_reward(prompts, [revisions[i] for i in keep])
        for row, b, a in zip(rows, before, after):
            row["gold_original"], row["gold_revision"] = float(b), float(a)
        report.update({"gold/original": float(np.mean(before)),
                       "gold/revision": float(np.mean(after)),
                       "gold/revision_better": float(np.mean(after > before)),
                       "gold/revision_worse": float(np.mean(after < before))})
    return rows, report


def _revise(config, spec_, policy, critic):
    """(revision rows, report, prompt records): sample, critique and revise."""
    params, model, tokenizer = policy
    records, task = prompt_records(config, tokenizer, spec_.num_prompts)
    originals = _sample(params, model, tokenizer, [r[PROMPT_IDS_KEY] for r in records],
                        max_new_tokens=spec_.max_new_tokens, temperature=spec_.temperature,
                        seed=config.seed, batch_size=spec_.batch_size)
    principles = judges.sample_principles(spec_.judge.principles, len(records), config.seed)
    shown = [shown_prompt(r["prompt"]) for r in records]
    sample = dict(temperature=spec_.critic_temperature, batch_size=spec_.batch_size)
    critiques = [c.strip() for c in _sample(
        critic.params, critic.model, critic.tokenizer,
        [critic.encode(spec_.critique_template.format(principle=c, prompt=p, completion=y))
         for c, p, y in zip(principles, shown, originals)],
        max_new_tokens=spec_.critique_tokens, seed=config.seed + 1, **sample)]
    revisions = [clean_revision(t, spec_.first_line) for t in _sample(
        critic.params, critic.model, critic.tokenizer,
        [critic.encode(spec_.revision_template.format(principle=c, prompt=p, completion=y,
                                                      critique=k))
         for c, p, y, k in zip(principles, shown, originals, critiques)],
        max_new_tokens=spec_.revision_tokens, seed=config.seed + 2, **sample)]
    rows, report = revision_rows(records, originals, critiques, revisions, principles, task)
    return rows, report, records


def run_revise(config, workdir: str) -> dict[str, Any]:
    """Samples, critiques, revises and writes WORKDIR/revisions.jsonl (module docstring);
    a finished stage (its summary file exists) is not redone. Returns the stage's summary."""
    summary_path = os.path.join(workdir, SUMMARY_FILE)
    if os.path.exists(summary_path) and os.path.exists(os.path.join(workdir, REVISIONS_FILE)):
        with open(summary_path) as f:
            return json.load(f)
    spec_ = spec(config)
    # The policy and the feedback model are split over the run's mesh (config.mesh).
    mesh = shd.make_mesh(config.mesh)
    rules = shd.rules_from_config(config.get("logical_axis_rules"))
    policy = load_policy(config, mesh, rules)
    critic = judges.cached_judge(spec_.judge, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        rows, report, records = _revise(config, spec_, policy, critic)
    if not rows:
        raise ValueError(f"the revise stage's feedback model (config.judge.path="
                         f"{spec_.judge.path!r}) wrote no non-empty revision for "
                         f"{len(records)} prompts: raise config.revise.revision_tokens or "
                         "check config.revise.revision_template")
    summary = {"algo": "revise", "final_metrics": report, "final": {},
               "revisions": os.path.join(workdir, REVISIONS_FILE)}
    print("[revise] " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in report.items()), flush=True)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = os.path.join(workdir, REVISIONS_FILE + ".tmp")
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, os.path.join(workdir, REVISIONS_FILE))
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
    return summary
