"""Evaluation: held-out prompts' completions (greedy and sampled) scored by a task's gold
reward or by reward functions, KL to a reference, lengths."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jalign.generate import decode_completions, generate, left_pad
from jalign.models.config import ModelConfig
from jalign.steps.common import shifted_logprobs
from jalign.winrate import preferences, win_rates


def _sequence_logps_fn(params, config, batch):
    logps, mask = shifted_logprobs(params, config, batch)
    return jnp.where(mask > 0, logps, 0.0).sum(-1)


# Summed completion log-probs [B]; `config` is static (a frozen dataclass).
_sequence_logps = jax.jit(_sequence_logps_fn, static_argnums=1)


def mean_and_sem(values) -> tuple[float, float]:
    """Mean and standard error of the mean over n values: sample std (ddof=1) / sqrt(n)
    (NaN for n < 2)."""
    values = np.asarray(values, np.float64)
    n = values.size
    sem = float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return float(values.mean()), sem


def summarize_scores(scores: dict[str, list]) -> dict[str, float]:
    """{NAME: [score arrays]} -> NAME (the mean over scored samples; NaN = not scored) and
    NAME_sem (`mean_and_sem`), for every name that scored something."""
    out = {}
    for key, parts in scores.items():
        values = np.concatenate(parts)
        values = values[~np.isnan(values)]
        if values.size:
            out[key], sem = mean_and_sem(values)
            if values.size > 1:
                out[f"{key}_sem"] = sem
    return out


def evaluate_policy(params, config: ModelConfig, tokenizer, task, prompts: Sequence[str], *,
                    max_new_tokens: int, seed: int = 0, ref_params: Any = None,
                    batch_size: int = 64, temperature: float = 1.0,
                    score_fn: Callable | None = None,
                    prompt_ids: Sequence[Sequence[int]] | None = None,
                    win_rate: bool = False,
                    win_rate_by: Sequence[str] = (),
                    pairwise_fn: Callable | None = None) -> dict[str, float]:
    """Greedy and sampled completions on held-out prompts, scored.

    Scores: `score_fn(indices, completions, lengths) -> {name: scores [n]}` (NaN =
    not scored) for the prompts at `indices`; by default the task's gold reward,
    {"gold_reward": ...}. `prompt_ids` (the prompts' token ids, BOS included)
    replaces encoding `prompts` (e.g. prompts rendered by a chat template).

    Returns NAME/greedy and NAME/sampled (the mean over scored prompts) for every
    score with NAME/greedy_sem and NAME/sampled_sem, its standard error over prompts
    (`mean_and_sem`: a difference of a few sems between two evals is prompt noise, not
    a change of the policy), completions/mean_length (sampled, in tokens, EOS included) and, when
    `ref_params` is given, kl/ref: the mean over sampled completions of
    sum_t [log pi(y_t) - log pi_ref(y_t)] (a k1 estimate of KL(pi || pi_ref) per
    sequence). With `win_rate` and `ref_params`, the reference's sampled completions (the
    same uniforms) are scored too and `jalign.winrate.win_rates` of the first score
    (winrate/raw, winrate/length_controlled, ...) compares the two, by prompt (over the
    prompts both completions have a finite score for). `win_rate_by` names the scores to
    compare by (default: the first); the first gives winrate/..., each further NAME
    winrate/NAME/... (e.g. the gold reward and a length-biased reward model side by side).
    `pairwise_fn(indices, policy_completions, reference_completions) -> {name: p [n]}`
    adds scores that compare the two completions directly (a pairwise judge's
    p(policy > reference), NaN = not compared); a `win_rate_by` name it gives uses p as
    the (fractional) preference, as AlpacaEval's judge probabilities are used.
    """
    if score_fn is None:
        def score_fn(indices, completions, lengths):
            del lengths
            return {"gold_reward": task.gold_reward([prompts[i] for i in indices], completions)}
    if prompt_ids is None:
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        prompt_ids = [bos + tokenizer.encode(p) for p in prompts]
    scores: dict[str, list] = {}
    lengths, kls, ref_lengths = [], [], []
    ref_scores: dict[str, list] = {}
    pairwise_names: set[str] = set()  # win_rate_by names pairwise_fn gives
    rng = jax.random.PRNGKey(seed)
    for start in range(0, len(prompts), batch_size):
        indices = list(range(start, min(start + batch_size, len(prompts))))
        n = len(indices)
        encoded = [list(prompt_ids[i]) for i in indices]
        encoded += [encoded[-1]] * (batch_size - n)  # fixed shapes: one compile
        width = max(len(e) for e in encoded)
        width = -(-width // 16) * 16
        prompt, mask = left_pad(encoded, tokenizer.pad_id, width)
        kwargs = dict(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        g_tokens, g_mask, _ = generate(params, config, prompt, mask, rng, greedy=True, **kwargs)
        s_tokens, s_mask, _ = generate(params, config, prompt, mask, jax.random.fold_in(rng, start),
                                    greedy=False, temperature=temperature, **kwargs)
        for mode, tokens, tmask in (("greedy", g_tokens, g_mask), ("sampled", s_tokens, s_mask)):
            texts = decode_completions(tokenizer, tokens[:, width:], tmask)[:n]
            sampled_texts = texts
            for name, values in score_fn(indices, texts, np.asarray(tmask).sum(-1)[:n]).items():
                scores.setdefault(f"{name}/{mode}", []).append(np.asarray(values, np.float64))
        lengths.append(np.asarray(s_mask).sum(-1)[:n])
        if ref_params is not None:
            full_mask = np.concatenate([np.zeros_like(mask), np.asarray(s_mask)], 1)
            segments = np.concatenate([mask, np.asarray(s_mask)], 1)
            batch = {"tokens": s_tokens, "loss_mask": full_mask, "segment_ids": segments,
                     "positions": np.maximum(np.cumsum(segments, 1) - 1, 0).astype(np.int32)}
            lp = _sequence_logps(params, config, batch)
            lr = _sequence_logps(ref_params, config, batch)
            kls.append(np.asarray(lp - lr)[:n])
        if win_rate and ref_params is not None:
            r_tokens, r_mask, _ = generate(ref_params, config, prompt, mask,
                                           jax.random.fold_in(rng, start), greedy=False,
                                           temperature=temperature, **kwargs)
            texts = decode_completions(tokenizer, r_tokens[:, width:], r_mask)[:n]
            r_lengths = np.asarray(r_mask).sum(-1)[:n]
            ref = score_fn(indices, texts, r_lengths)
            names = list(win_rate_by) or [next(iter(ref))]
            direct = [name for name in names if name not in ref]
            if direct and pairwise_fn is not None:
                ref.update(pairwise_fn(indices, sampled_texts, texts))
                pairwise_names = {name for name in direct if name in ref}
            unknown = [name for name in names if name not in ref]
            if unknown:
                raise ValueError(f"config.eval.win_rate_by names {unknown[0]!r}, which this "
                                 f"evaluation does not score; valid: {sorted(ref)}")
            for name in names:
                ref_scores.setdefault(name, []).append(np.asarray(ref[name], np.float64))
            ref_lengths.append(r_lengths)
    out = summarize_scores(scores)
    out["completions/mean_length"] = float(np.concatenate(lengths).mean())
    if kls:
        out["kl/ref"] = float(np.concatenate(kls).mean())
    for i, (name, theirs) in enumerate(ref_scores.items()):
        theirs = np.concatenate(theirs)
        if name in pairwise_names:  # p(policy > reference), the preference itself
            prefs = theirs
            scored = np.isfinite(prefs)
        else:
            ours = np.concatenate(scores[f"{name}/sampled"])
            scored = np.isfinite(ours) & np.isfinite(theirs)  # NaN: a prompt a score skips
            prefs = preferences(ours, theirs)
        if scored.any():
            rates = win_rates(prefs[scored], np.concatenate(lengths)[scored],
                              np.concatenate(ref_lengths)[scored])
            prefix = "winrate/" if i == 0 else f"winrate/{name}/"
            out.update({prefix + key.removeprefix("winrate/"): v for key, v in rates.items()})
    return out
