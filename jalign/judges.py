"""Language-model judges: pairwise preferences and pointwise scores from a frozen causal LM.

A judge is any model jalign can start from (a Hugging Face folder, a `jalign.convert
import` folder, a run's WORKDIR or WORKDIR/final_params), a prompt template and a
constitution: a plain text file of principles, one a line ('#' comments and blank lines
ignored). Nothing is sampled: the judge reads its verdict from the next-token log-probs
of a few answer labels after the rendered template.

  pairwise   template with {principle}, {prompt}, {first}, {second}; labels "A,B".
             p(x > y) = 1/2 [P(A | x first, y second) + P(B | y first, x second)],
             each P normalised over the two labels, so p(x > y) = 1 - p(y > x) by
             construction and a judge that always answers "A" scores every pair 1/2
             (position bias averages out, as in Zheng et al. 2023's swap).
  pointwise  template with {principle}, {prompt}, {completion}; labels "Yes,No" give
             P(Yes) normalised over the two; labels "1,...,9" give the expected rating
             sum_k k P(k) (each label's float value), normalised over the labels.

Every rendered prompt of a batch goes through ONE jitted forward of the judge's Decoder
(left-padded, fixed widths); the last position's hidden state is projected onto the
label tokens' unembedding columns only, plus one logsumexp over the vocabulary at that
position (so the log-probs are the model's, and the labels' total mass is reported).
Given the run's mesh (`load_judge(spec, mesh, rules)`, as the label and revise stages and
the RL judge reward do), the weights are split over it by the policy's logical-axis rules
and each batch over its batch axes; the forward runs under the mesh like a train step.

References: Bai et al., "Constitutional AI", arXiv:2212.08073; Lee et al., "RLAIF",
arXiv:2309.00267; Zheng et al., "Judging LLM-as-a-judge", arXiv:2306.05685.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jalign import sharding as shd
from jalign.generate import left_pad
from jalign.models import hf, pretrained
from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder, unembedding
from jalign.tokenizer import Tokenizer, builtin_tokenizer

KINDS = ("pairwise", "pointwise")
TEMPLATES = {
    "pairwise": ("Principle: {principle}\n\nTask: {prompt}\nAnswer A: {first}\n"
                 "Answer B: {second}\n\nWhich answer follows the principle better, A or B? "
                 "Reply with one letter."),
    "pointwise": ("Principle: {principle}\n\nTask: {prompt}\nAnswer: {completion}\n\n"
                  "Does the answer follow the principle? Reply Yes or No."),
}
DEFAULT_LABELS = {"pairwise": "A,B", "pointwise": "Yes,No"}
_FIELDS = {"pairwise": ("principle", "prompt", "first", "second"),
           "pointwise": ("principle", "prompt", "completion")}


@dataclasses.dataclass(frozen=True)
class JudgeSpec:
    """`config.judge`, checked (see jalign.config_utils for the keys)."""
    path: str
    kind: str
    template: str                 # the template text (a file's contents when a path was given)
    principles: tuple[str, ...]
    labels: tuple[str, ...]
    margin: float                 # pairwise: |p - 1/2| < margin is a tie
    chat: bool                    # render the template as a user turn of the chat template
    max_length: int
    batch_size: int
    dtype: str


def read_constitution(path: str, key: str = "config.judge.constitution") -> tuple[str, ...]:
    """The principles of a constitution file: one a line, '#' comments and blanks ignored."""
    if not path:
        raise ValueError(f"{key} is not set: give a constitution file (one principle a line), "
                         "e.g. configs/constitutions/helpful_concise.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}={path!r}: no such file")
    with open(path) as f:
        principles = tuple(s for s in (line.strip() for line in f) if s and not s.startswith("#"))
    if not principles:
        raise ValueError(f"{key}={path!r} holds no principle (one a line; '#' starts a comment)")
    return principles


def judge_spec(judge) -> JudgeSpec:
    """`config.judge` (a ConfigDict or mapping) read once and checked."""
    kind = judge["kind"]
    if kind not in KINDS:
        raise ValueError(f"config.judge.kind = {kind!r} is not valid; valid: {list(KINDS)}")
    if not judge["path"]:
        raise ValueError("config.judge.path is not set: give the judge model (a Hugging Face "
                         "folder, a jalign WORKDIR or its final_params; \"stage:NAME\" in a "
                         "pipeline)")
    template = judge["template"] or TEMPLATES[kind]
    if judge["template"] and os.path.isfile(judge["template"]):
        with open(judge["template"]) as f:
            template = f.read()
    missing = [k for k in _FIELDS[kind] if "{" + k + "}" not in template]
    if missing:
        raise ValueError(f"config.judge.template has no {{{missing[0]}}}; a {kind} template "
                         f"shows {', '.join('{' + k + '}' for k in _FIELDS[kind])}")
    labels = tuple(s for s in (judge["labels"] or DEFAULT_LABELS[kind]).split(",") if s)
    if len(labels) < 2 or (kind == "pairwise" and len(labels) != 2):
        raise ValueError(f"config.judge.labels = {judge['labels']!r}: a {kind} judge needs "
                         f"{'two labels' if kind == 'pairwise' else 'two or more labels'}")
    if kind == "pointwise" and len(labels) > 2:
        try:
            [float(s) for s in labels]
        except ValueError:
            raise ValueError(f"config.judge.labels = {judge['labels']!r}: more than two "
                             "pointwise labels are a rating scale and must be numbers") from None
    return JudgeSpec(str(judge["path"]), kind, template,
                     read_constitution(judge["constitution"]), labels,
                     float(judge["margin"]), bool(judge["chat"]), int(judge["max_length"]),
                     int(judge["batch_size"]), str(judge["dtype"]))


def label_token_ids(tokenizer: Tokenizer, labels: Sequence[str], where: str) -> tuple[int, ...]:
    """The single token id of each answer label; a ValueError naming the label and the
    tokenizer when one is several tokens (its verdict would not be one next-token
    log-prob)."""
    ids = []
    for label in labels:
        encoded = tokenizer.encode(label)
        if len(encoded) != 1:
            pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in encoded]
            raise ValueError(f"judge label {label!r} is {len(encoded)} tokens {pieces} in the "
                             f"tokenizer of {where}; each label must be one token (set "
                             "config.judge.labels, e.g. 'A,B', 'Yes,No' or '1,2,3,4,5')")
        ids.append(encoded[0])
    if len(set(ids)) < len(ids):
        raise ValueError(f"judge labels {list(labels)} share a token in the tokenizer of {where}")
    return tuple(ids)


def _label_logprobs_fn(params, config: ModelConfig, tokens_BxT, mask_BxT, label_ids_K):
    """(log-probs of the label tokens [B, K] after each left-padded row, log of their
    total probability [B]): the full-vocabulary normaliser at the last position only."""
    positions = jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0)
    hidden_BxTxH = Decoder(config).apply({"params": params}, tokens_BxT, positions, mask_BxT)
    last_BxH = hidden_BxTxH[:, -1]
    w_HxV = unembedding(params, config).astype(last_BxH.dtype)
    logits_BxV = jnp.einsum("bh,hv->bv", last_BxH, w_HxV, preferred_element_type=jnp.float32)
    label_BxK = jnp.einsum("bh,hk->bk", last_BxH, jnp.take(w_HxV, label_ids_K, axis=1),
                           preferred_element_type=jnp.float32)
    cap = config.final_logit_softcap
    if cap is not None:
        logits_BxV, label_BxK = cap * jnp.tanh(logits_BxV / cap), cap * jnp.tanh(label_BxK / cap)
    logps_BxK = label_BxK - jax.nn.logsumexp(logits_BxV, axis=-1, keepdims=True)
    return logps_BxK, jax.nn.logsumexp(logps_BxK, axis=-1)


label_logprobs = jax.jit(_label_logprobs_fn, static_argnums=1)


class Judge:
    """A loaded judge: `pairwise(...)` or `pointwise(...)` on strings, batched."""

    def __init__(self, spec: JudgeSpec, params: Any, model: ModelConfig, tokenizer: Tokenizer,
                 mesh: Mesh | None = None, rules=None):
        """`mesh`/`rules`: where `params` live (as `load_judge` placed them); each batch of
        rendered prompts is then split over the mesh's batch axes (`jalign.sharding.
        data_sharding`) and the forward runs under the mesh, as the policy's steps do."""
        self.spec, self.params, self.model, self.tokenizer = spec, params, model, tokenizer
        self.label_ids = label_token_ids(tokenizer, spec.labels, spec.path)
        self.truncated = 0  # rendered prompts longer than spec.max_length (their start was cut)
        self.mesh, self.rules = mesh, shd.rules_from_config(rules)
        self.batch_size = spec.batch_size
        self.batch_sharding = None
        if mesh is not None:
            self.batch_sharding = shd.data_sharding(mesh, self.rules)
            split = mesh.size // self.batch_sharding.shard_shape((mesh.size,))[0]
            self.batch_size = -(-spec.batch_size // split) * split  # a multiple of the split

    def render(self, **fields: str) -> list[int]:
        return self.encode(self.spec.template.format(**fields))

    def encode(self, text: str) -> list[int]:
        """Token ids of a request to the judge model: BOS, then `text` as a user turn of
        its chat template (with config.judge.chat and a template) or as it is."""
        if self.spec.chat and self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      add_generation_prompt=True)
            if self.tokenizer.bos_token and text.startswith(self.tokenizer.bos_token):
                text = text[len(self.tokenizer.bos_token):]
        bos = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
        return bos + self.tokenizer.encode(text)

    def label_logprobs(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(log-probs [N, K] of the labels, log of their total mass [N]) after each row,
        in fixed-size batches (one compile per width)."""
        size = self.batch_size
        logps, mass = [], []
        for start in range(0, len(rows), size):
            chunk = [list(r) for r in rows[start:start + size]]
            n = len(chunk)
            self.truncated += sum(len(r) > self.spec.max_length for r in chunk)
            chunk += [chunk[-1]] * (size - n)
            width = min(-(-max(len(r) for r in chunk) // 64) * 64, self.spec.max_length)
            tokens, mask = left_pad(chunk, self.tokenizer.pad_id, width)
            label_ids = jnp.asarray(self.label_ids, jnp.int32)
            if self.mesh is None:
                lp, m = label_logprobs(self.params, self.model, tokens, mask, label_ids)
            else:
                tokens, mask = jax.device_put((tokens, mask), self.batch_sharding)
                with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                    lp, m = label_logprobs(self.params, self.model, tokens, mask, label_ids)
            logps.append(np.asarray(lp)[:n])
            mass.append(np.asarray(m)[:n])
        return np.concatenate(logps), np.concatenate(mass)

    def pairwise(self, prompts: Sequence[str], xs: Sequence[str], ys: Sequence[str],
                 principles: Sequence[str]) -> dict[str, np.ndarray]:
        """p(x > y) per pair, symmetric by construction (module docstring).

        Returns {"prob": p [N], "first_prob": P(first label) averaged over the two orders
        [N] (1/2 = no position bias), "label_mass": the labels' total probability [N]}."""
        rows = []
        for p, x, y, c in zip(prompts, xs, ys, principles):
            rows.append(self.render(principle=c, prompt=p, first=x, second=y))
            rows.append(self.render(principle=c, prompt=p, first=y, second=x))
        logps, mass = self.label_logprobs(rows)
        p_first = np.asarray(jax.nn.softmax(logps, axis=-1))[:, 0].astype(np.float64)
        x_first, y_first = p_first[0::2], p_first[1::2]
        return {"prob": 0.5 * (x_first + (1.0 - y_first)),
                "first_prob": 0.5 * (x_first + y_first),
                "label_mass": np.exp(0.5 * (mass[0::2] + mass[1::2]))}

    def pointwise(self, prompts: Sequence[str], completions: Sequence[str],
                  principles: Sequence[str] | None = None) -> np.ndarray:
        """A score per completion, the mean over the constitution's principles (or one
        given principle each): P(first label) for two labels, else the expected rating."""
        given = principles is not None
        each = [[c] for c in principles] if given else [list(self.spec.principles)] * len(prompts)
        rows = [self.render(principle=c, prompt=p, completion=y)
                for p, y, cs in zip(prompts, completions, each) for c in cs]
        probs = np.asarray(jax.nn.softmax(self.label_logprobs(rows)[0], axis=-1), np.float64)
        if len(self.spec.labels) == 2:
            values = probs[:, 0]
        else:
            values = probs @ np.asarray([float(s) for s in self.spec.labels])
        counts = [len(cs) for cs in each]
        return np.asarray([v.mean() for v in np.split(values, np.cumsum(counts)[:-1])])


def preference(prob, margin: float) -> np.ndarray:
    """1 (x preferred), 0 (y preferred) or 0.5 (a tie: |p - 1/2| < margin)."""
    prob = np.asarray(prob, np.float64)
    return np.where(np.abs(prob - 0.5) < margin, 0.5, (prob > 0.5).astype(np.float64))


def sample_principles(principles: Sequence[str], n: int, seed: int) -> list[str]:
    """n principles drawn uniformly (CAI samples one per comparison), deterministic in seed."""
    rng = np.random.default_rng((seed, 0x6a75646765))
    return [principles[i] for i in rng.integers(0, len(principles), n)]


def load_judge(spec: JudgeSpec, mesh: Mesh | None = None, rules=None) -> Judge:
    """The judge's weights (frozen), config and tokenizer. With a `mesh` (the policy's,
    `jalign.sharding.make_mesh(config.mesh)`) and `rules` (config.logical_axis_rules) the
    weights are split over it exactly as a policy of the judge's architecture would be
    (fsdp/tensor axes by the logical-axis rules); without, they sit on the first device."""
    try:
        source = pretrained.find(spec.path)
    except (FileNotFoundError, ValueError) as e:
        message = str(e).replace(f"config.init_from={spec.path!r}", "")
        raise ValueError(f"config.judge.path={spec.path!r}: {message.strip(' :')}") from None
    if source.model is None:
        raise ValueError(f"config.judge.path={spec.path!r} states no architecture (no "
                         f"{pretrained.MODEL_CONFIG_FILE} beside it): give the run's WORKDIR "
                         "or a Hugging Face folder")
    model = dataclasses.replace(source.model, dtype=spec.dtype, param_dtype=spec.dtype,
                                remat="none", lora_rank=0)
    abstract = hf.abstract_params(model, mesh=mesh, rules=rules)  # mesh None: the first device
    tokenizer = Tokenizer.from_file(source.tokenizer) if source.tokenizer else builtin_tokenizer()
    return Judge(spec, source.load(abstract), model, tokenizer, mesh, rules)


@functools.lru_cache(maxsize=2)
def _cached_judge(spec: JudgeSpec, mesh: Mesh | None, rules) -> Judge:
    return load_judge(spec, mesh, rules)


def cached_judge(spec: JudgeSpec, mesh: Mesh | None = None, rules=None) -> Judge:
    """`load_judge`, once per (spec, mesh, rules) in a process (a pipeline's stages share it)."""
    return _cached_judge(spec, mesh, shd.rules_from_config(rules))
