"""Multi-turn rollouts: the policy talks to an environment (jalign.environments) and
every turn continues from the KV cache.

One `EpisodeRunner.run` plays a batch of episodes in lockstep:

1. the environment's `reset` gives each episode its prompt (text, or chat messages
   rendered with the tokenizer's chat template and the environment's tool schemas);
   one prefill fills the cache;
2. each turn, `jalign.generate.decode_steps` samples up to `config.rl.max_new_tokens`
   tokens per live episode into the next cache slots; the loop ends as soon as every
   live episode stopped (EOS), so finished episodes cost no extra decode steps;
3. the host decodes each live episode's turn and calls the environment's `step`;
   each observation is rendered through the chat template (followed by the next
   assistant header), tokenised, and prefilled into the same cache after the turn: the
   conversation is never re-encoded.

All episodes of the batch share one slot counter, so an episode whose turn ended
early leaves masked (invalid) slots behind it; rope positions count only its own
valid tokens, and masked slots take no part in attention, so every token sees exactly
the conversation before it. The episode's context is `max_episode_tokens` slots after
the prompt; an episode ends (and is counted in `env/truncated`) when a turn reaches
`max_new_tokens` without EOS, when `max_turns` turns ran without the environment
ending it, when an observation is longer than `max_observation_tokens`, or when the
context cannot hold the next observation and one more token.

The result is one token sequence per episode (the valid slots in order, right-padded to
the longest episode rounded up to a multiple of 64)
with a loss mask that is 1 exactly on the tokens the policy generated (observation,
tool-result and template tokens are 0) and the behaviour log-probs of those tokens,
aligned like a log-prob function's output. They are the log-probs of the same
tokens under a full forward pass over the final conversation (tests/test_episodes.py),
so the first update's importance ratio is 1.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jalign.data.prompts import prompt_token_ids
from jalign.distributed import agreed_max, any_process
from jalign.environments import Environment, Episode
from jalign.evaluate import _sequence_logps, summarize_scores
from jalign.generate import decode_steps, generate, left_pad
from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder, init_cache, unstack_layers
from jalign.tasks.guess import GuessEnvironment
from jalign.tools import CALL_FORMATS, ToolEnvironment, load_tools

ENVIRONMENTS = ("tools", "guess")
# A string no chat template writes, marking where an assistant turn's content ends.
_MARK = "\x1fjalign-mark\x1f"


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    """`config.rl`'s multi-turn settings, checked."""
    environment: str
    max_turns: int
    max_new_tokens: int          # per turn
    episode_tokens: int          # context slots after the prompt
    max_observation_tokens: int
    tools: str = ""
    tool_call_format: str = "hermes"
    tool_timeout: float = 5.0


def episode_spec(config, task=None, *, max_new_tokens: int | None = None) -> EpisodeSpec | None:
    """The multi-turn settings of `config.rl`, or None for single-turn rollouts.

    `config.rl.environment` "" takes a built-in task's own environment (and its tools
    when `config.rl.tools` is empty); "none" forces single-turn rollouts.
    `max_new_tokens` replaces config.rl.max_new_tokens (evaluation samples
    config.eval.max_new_tokens per turn).
    """
    rl = config.rl
    name, tools = str(rl.get("environment", "")), str(rl.get("tools", ""))
    if not name and task is not None:
        name = getattr(task, "environment", "")
        tools = tools or getattr(task, "tools", "")
    if name in ("", "none"):
        return None
    if name not in ENVIRONMENTS and not name.startswith("python:"):
        raise ValueError(f"config.rl.environment = {name!r} is not valid; valid: "
                         f"{', '.join(ENVIRONMENTS)}, 'python:module.Class', 'none' or '' "
                         "(a built-in task's own environment)")
    for key in ("max_turns", "max_observation_tokens"):
        if int(rl[key]) < 1:
            raise ValueError(f"config.rl.{key} must be at least 1, got {rl[key]!r}")
    if int(rl.max_episode_tokens) < 0:
        raise ValueError(f"config.rl.max_episode_tokens must be >= 0 (0: automatic), got "
                         f"{rl.max_episode_tokens!r}")
    if rl.tool_call_format not in CALL_FORMATS:
        raise ValueError(f"config.rl.tool_call_format = {rl.tool_call_format!r} is not valid; "
                         f"valid: {list(CALL_FORMATS)}")
    if float(rl.tool_timeout) <= 0:
        raise ValueError(f"config.rl.tool_timeout must be > 0 seconds, got {rl.tool_timeout!r}")
    if name == "tools" and not tools.strip(" ,"):
        raise ValueError("config.rl.environment='tools' needs config.rl.tools: a comma list of "
                         "built-in tools ('calculator') or 'python:module.function'")
    turns, new = int(rl.max_turns), int(max_new_tokens or rl.max_new_tokens)
    budget = int(rl.max_episode_tokens) or turns * (new + int(rl.max_observation_tokens))
    if budget < new:
        raise ValueError(f"config.rl.max_episode_tokens ({budget}) must hold at least one turn "
                         f"({new} new tokens)")
    return EpisodeSpec(environment=name, max_turns=turns, max_new_tokens=new,
                       episode_tokens=budget,
                       max_observation_tokens=int(rl.max_observation_tokens), tools=tools,
                       tool_call_format=str(rl.tool_call_format),
                       tool_timeout=float(rl.tool_timeout))


def make_environment(spec: EpisodeSpec) -> Environment:
    """The environment `spec.environment` names."""
    name = spec.environment
    if name == "tools":
        return ToolEnvironment(load_tools(spec.tools), call_format=spec.tool_call_format,
                               timeout_s=spec.tool_timeout)
    if name == "guess":
        return GuessEnvironment()
    target = name[len("python:"):]
    module_name, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"config.rl.environment = {name!r}: cannot import {target!r} ({e})") from None
    env = cls()
    if not (callable(getattr(env, "reset", None)) and callable(getattr(env, "step", None))):
        raise ValueError(f"config.rl.environment = {name!r}: {target} needs reset(rows) and "
                         "step(episodes, completions) methods (see jalign.environments)")
    return env


def _as_messages(observation, role: str) -> list[dict]:
    if isinstance(observation, str):
        return [{"role": role, "content": observation}]
    if isinstance(observation, Mapping):
        return [dict(observation)]
    if isinstance(observation, (list, tuple)) and all(isinstance(m, Mapping) for m in observation):
        return [dict(m) for m in observation]
    raise ValueError(f"an observation must be a string, a {{'role', 'content'}} message or a "
                     f"list of them, got {type(observation).__name__}: {observation!r:.80}")


class ChatFrame:
    """Token ids of prompts and observations as the tokenizer's chat template frames them."""

    def __init__(self, tokenizer, tools: Sequence[dict] | None = None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("multi-turn rollouts render observations with the tokenizer's chat "
                             "template, and this tokenizer has none (config.tokenizer / the "
                             "model folder's tokenizer_config.json)")
        self.tokenizer, self.tools = tokenizer, list(tools) if tools else None
        self._cache: dict[str, list[int]] = {}

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                  tools=self.tools)

    def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return prompt_token_ids(prompt, self.tokenizer)
        return prompt_token_ids(self._render(list(prompt), True), self.tokenizer)

    def observation_text(self, messages: Sequence[dict]) -> str:
        """What follows the policy's EOS: the end of its turn as the template writes it, the
        observation messages, and the next assistant header."""
        base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _MARK}]
        before = self._render(base, False)
        after = self._render(base + list(messages), True)
        if not after.startswith(before):
            raise ValueError("the chat template does not render a conversation with an "
                             "observation as an extension of the conversation before it, so "
                             "observations cannot be appended to the KV cache")
        tail = before[before.rindex(_MARK) + len(_MARK):]
        eos = self.tokenizer.eos_token
        tail = tail.split(eos, 1)[1] if eos and eos in tail else tail
        return tail + after[len(before):]

    def observation_ids(self, messages: Sequence[dict]) -> list[int]:
        return self.tokenizer.encode(self.observation_text(messages))


@dataclasses.dataclass
class EpisodeBatch:
    """Played episodes: the training rows (host arrays) and what the rewards read."""
    batch: dict[str, np.ndarray]     # tokens, segment_ids, loss_mask, positions [B, W]; old_logps [B, W-1]
    episodes: list[Episode]
    final_turns: list[str]           # each episode's last assistant turn (the reward functions' completion)
    generated: np.ndarray            # [B] tokens the policy generated over all turns
    truncated: np.ndarray            # [B] bool
    metrics: dict[str, float]


class EpisodeRunner:
    """Plays batches of episodes of `env` with a policy; see the module docstring."""

    def __init__(self, model_cfg: ModelConfig, tokenizer, env: Environment, spec: EpisodeSpec, *,
                 temperature: float = 1.0, greedy: bool = False):
        self.cfg, self.tok, self.env, self.spec = model_cfg, tokenizer, env, spec
        self._greedy, self._temperature = greedy, temperature
        self.frame = ChatFrame(tokenizer, getattr(env, "tools", None))
        n = spec.max_new_tokens
        eos, pad = tokenizer.eos_id, tokenizer.pad_id

        def start(params, prompt_BxP, mask_BxP, slots):
            b, p = prompt_BxP.shape
            cache = init_cache(model_cfg, b, slots)
            positions = jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0)
            hidden, cache = Decoder(model_cfg).apply(
                {"params": unstack_layers(params, model_cfg)}, prompt_BxP, positions, mask_BxP,
                cache=cache, cache_index=0)
            return cache, hidden[:, -1]

        def observe(params, cache, h_last, tokens_BxO, mask_BxO, positions_BxO, slot):
            hidden, cache = Decoder(model_cfg).apply(
                {"params": unstack_layers(params, model_cfg)}, tokens_BxO, positions_BxO,
                mask_BxO, cache=cache, cache_index=slot)
            seen = mask_BxO.sum(1) > 0
            return cache, jnp.where(seen[:, None], hidden[:, -1], h_last)

        def turn(params, cache, h_last, pos, done, slot, limit, rng, turn_index):
            b = h_last.shape[0]
            u = 1.0 - jax.random.uniform(jax.random.fold_in(rng, turn_index), (n, b))
            return decode_steps(params, model_cfg, cache, h_last, pos, done, slot, limit, u,
                                eos_id=eos, pad_id=pad, greedy=greedy, temperature=temperature)

        self._start = jax.jit(start, static_argnums=3)
        self._observe = jax.jit(observe, donate_argnums=1)
        self._turn = jax.jit(turn, donate_argnums=1)

    def run(self, params, rows: Sequence[Mapping], rng, *, put: Callable | None = None,
            fetch: Callable | None = None) -> EpisodeBatch:
        """Plays one episode per row. `put` sends this process's rows of a host array to
        the devices (split over the batch; default: as is) and `fetch` brings them back."""
        put = put or jnp.asarray
        fetch = fetch or np.asarray
        spec, tok, env = self.spec, self.tok, self.env
        b = len(rows)
        prompts = env.reset(rows)
        if len(prompts) != b:
            raise ValueError(f"{type(env).__name__}.reset returned {len(prompts)} prompts for "
                             f"{b} rows")
        episodes = [Episode(row=r, messages=[{"role": "user", "content": p}] if isinstance(p, str)
                            else [dict(m) for m in p]) for r, p in zip(rows, prompts)]
        ids = [self.frame.prompt_ids(p) for p in prompts]
        width = agreed_max(-(-max(len(x) for x in ids) // 16) * 16)
        slots = width + spec.episode_tokens
        tokens = np.full((b, slots), tok.pad_id, np.int32)
        valid = np.zeros((b, slots), np.int32)
        generated = np.zeros((b, slots), np.int32)
        logps = np.zeros((b, slots), np.float32)
        tokens[:, :width], valid[:, :width] = left_pad(ids, tok.pad_id, width)
        count = valid.sum(1)
        cache, h_last = self._start(params, put(tokens[:, :width]), put(valid[:, :width]), slots)
        slot = width
        active = np.ones(b, bool)
        truncated = np.zeros(b, bool)
        finals = [""] * b
        long_obs = 0
        for turn in range(spec.max_turns):
            limit = min(spec.max_new_tokens, slots - slot)
            if limit <= 0 or not any_process(bool(active.any())):
                break
            out = self._turn(params, cache, h_last, put((count - 1).astype(np.int32)),
                             put(~active), jnp.int32(slot), jnp.int32(limit), rng, turn)
            cache, h_last, steps = out[0], out[1], int(out[7])
            new_t, new_m, new_lp = (fetch(x)[:, :steps] for x in out[4:7])
            tokens[:, slot:slot + steps] = np.where(new_m > 0, new_t, tok.pad_id)
            valid[:, slot:slot + steps] = new_m
            generated[:, slot:slot + steps] = new_m
            logps[:, slot:slot + steps] = new_lp
            count += new_m.sum(1)
            slot += steps
            observations, cut = self._end_turn(episodes, new_t, new_m, active, truncated,
                                               finals, turn)
            long_obs += cut
            obs_width = agreed_max(-(-max((len(x) for x in observations.values()), default=0) // 8) * 8)
            if obs_width == 0:
                continue
            if slot + obs_width + 1 > slots:  # the context is full: these episodes end here
                for i in observations:
                    active[i], truncated[i] = False, True
                break
            block, block_mask = left_pad([observations.get(i, []) for i in range(b)],
                                         tok.pad_id, obs_width)
            positions = np.maximum(count[:, None] + np.cumsum(block_mask, 1) - 1, 0).astype(np.int32)
            cache, h_last = self._observe(params, cache, h_last, put(block), put(block_mask),
                                          put(positions), jnp.int32(slot))
            tokens[:, slot:slot + obs_width] = block
            valid[:, slot:slot + obs_width] = block_mask
            count += block_mask.sum(1)
            slot += obs_width
        del cache
        # The training rows are as wide as the longest episode, rounded up to a multiple of
        # 64 (a few step shapes over a run, not one per step), at most the whole context.
        longest = agreed_max(int(valid.sum(1).max()))
        batch = _compact(tokens, valid, generated, logps, tok.pad_id,
                         width=min(-(-longest // 64) * 64, -(-slots // 16) * 16))
        gen_counts = generated.sum(1)
        metrics = {**episode_metrics(episodes, truncated),
                   "env/observation_too_long": long_obs / b,
                   "completions/mean_length": float(gen_counts.mean())}
        return EpisodeBatch(batch, episodes, finals, gen_counts, truncated, metrics)

    def _end_turn(self, episodes, new_t, new_m, active, truncated, finals, turn):
        """Records each live episode's turn (tokens `new_t` where `new_m`), ends those that
        stop here and steps the environment for the rest. Updates `active`, `truncated` and
        `finals` in place; returns ({episode: observation token ids}, observations too long)."""
        spec, tok, env = self.spec, self.tok, self.env
        stepping, observations, long_obs = [], {}, 0
        for i in np.flatnonzero(active):
            turn_ids = new_t[i][new_m[i] > 0]
            finals[i] = tok.decode([int(t) for t in turn_ids if t != tok.eos_id])
            episodes[i].messages.append({"role": "assistant", "content": finals[i]})
            episodes[i].turn += 1
            if not (turn_ids.size and turn_ids[-1] == tok.eos_id):
                active[i], truncated[i] = False, True      # cut at max_new_tokens
            elif turn == spec.max_turns - 1:
                active[i], truncated[i] = False, True      # out of turns
            else:
                stepping.append(i)
        if not stepping:
            return observations, long_obs
        obs, rewards, done = env.step([episodes[i] for i in stepping],
                                      [finals[i] for i in stepping])
        if not len(obs) == len(rewards) == len(done) == len(stepping):
            raise ValueError(f"{type(env).__name__}.step must return one observation, reward "
                             f"and done flag per episode ({len(stepping)})")
        for i, o, r, d in zip(stepping, obs, rewards, done):
            if r is not None:
                episodes[i].rewards.append(float(r))
                episodes[i].reward_turns.append(episodes[i].turn - 1)
            if d:
                active[i] = False
                continue
            if o is None:
                raise ValueError(f"{type(env).__name__}.step gave no observation to an episode "
                                 f"it did not end (row {episodes[i].row.get('_origin', i)})")
            messages = _as_messages(o, getattr(env, "observation_role", "user"))
            episodes[i].messages.extend(messages)
            obs_ids = self.frame.observation_ids(messages)
            if len(obs_ids) > spec.max_observation_tokens:
                active[i], truncated[i] = False, True
                long_obs += 1
            else:
                observations[i] = obs_ids
        return observations, long_obs

    def run_reencoding(self, params, rows: Sequence[Mapping], rng) -> list[list[int]]:
        """The reference `run` is checked and timed against (tests/test_episodes.py,
        benchmarks/multiturn.py): every turn re-encodes the whole conversation with
        `jalign.generate.generate` instead of continuing from the cache. Same turns, same
        uniforms; returns each episode's token ids (prompt and every turn). One process."""
        spec, tok = self.spec, self.tok
        b = len(rows)
        prompts = self.env.reset(rows)
        episodes = [Episode(row=r, messages=[{"role": "user", "content": p}] if isinstance(p, str)
                            else [dict(m) for m in p]) for r, p in zip(rows, prompts)]
        convs = [self.frame.prompt_ids(p) for p in prompts]
        width = -(-max(len(x) for x in convs) // 16) * 16
        room = width + spec.episode_tokens   # the cached run's context
        active, truncated, finals = np.ones(b, bool), np.zeros(b, bool), [""] * b
        for turn in range(spec.max_turns):
            live = np.flatnonzero(active)
            if not live.size:
                break
            w = -(-max(len(convs[i]) for i in live) // 16) * 16
            prompt, mask = left_pad([convs[i] if active[i] else convs[i][-1:] for i in range(b)],
                                    tok.pad_id, w)
            n = self.spec.max_new_tokens
            out = generate(params, self.cfg, prompt, mask, jax.random.fold_in(rng, turn),
                           max_new_tokens=n, eos_id=tok.eos_id, pad_id=tok.pad_id,
                           greedy=self._greedy, temperature=self._temperature)
            new_t = np.asarray(out.tokens)[:, w:]
            new_m = np.asarray(out.completion_mask) * active[:, None]
            for i in live:
                convs[i] += [int(t) for t in new_t[i][new_m[i] > 0]]
            observations, _ = self._end_turn(episodes, new_t, new_m, active, truncated, finals,
                                             turn)
            for i, ids in observations.items():
                if len(convs[i]) + len(ids) + 1 > room:
                    active[i], truncated[i] = False, True
                else:
                    convs[i] += ids
        return convs


def episode_metrics(episodes: Sequence[Episode], truncated: np.ndarray) -> dict[str, float]:
    """env/turns, env/truncated, each environment counter (env/NAME) and, when any turn was
    rewarded, env/turn_reward: means per episode."""
    metrics = {"env/turns": float(np.mean([e.turn for e in episodes])),
               "env/truncated": float(np.mean(truncated))}
    for name in sorted({k for e in episodes for k in e.stats}):
        metrics[f"env/{name}"] = float(np.mean([e.stats.get(name, 0.0) for e in episodes]))
    if any(e.rewards for e in episodes):
        metrics["env/turn_reward"] = float(np.mean([sum(e.rewards) for e in episodes]))
    return metrics


def _compact(tokens, valid, generated, logps, pad_id: int, width: int) -> dict[str, np.ndarray]:
    """Each row's valid slots in order, right-padded to `width`, in the rollout-batch layout."""
    b = tokens.shape[0]
    out = {"tokens": np.full((b, width), pad_id, np.int32),
           "segment_ids": np.zeros((b, width), np.int32),
           "loss_mask": np.zeros((b, width), np.int32),
           "old_logps": np.zeros((b, width - 1), np.float32)}
    for i in range(b):
        idx = np.flatnonzero(valid[i])
        n = idx.size
        out["tokens"][i, :n] = tokens[i, idx]
        out["segment_ids"][i, :n] = 1
        out["loss_mask"][i, :n] = generated[i, idx]
        # Position t scores token t + 1.
        out["old_logps"][i, :n - 1] = logps[i, idx[1:]]
    out["positions"] = np.maximum(np.cumsum(out["segment_ids"], 1) - 1, 0).astype(np.int32)
    return out


def turn_reward_tokens(loss_mask_BxW: np.ndarray, episodes: Sequence[Episode]) -> np.ndarray:
    """[B, W-1] float32: each per-turn environment reward at its turn's last generated
    token, aligned like log-probs (index t scores token t + 1), for PPO's GAE. A turn is
    a run of loss-mask-1 tokens (observations between turns are 0); a reward whose turn
    has no run left (the turn's tokens cut off) goes to the last generated token."""
    out = np.zeros((loss_mask_BxW.shape[0], loss_mask_BxW.shape[1] - 1), np.float32)
    for i, episode in enumerate(episodes):
        if not episode.rewards:
            continue
        m = np.concatenate([[0], np.asarray(loss_mask_BxW[i]) > 0, [0]]).astype(np.int8)
        ends = np.flatnonzero(np.diff(m) == -1) - 1  # the last token of each run
        if not ends.size:
            continue
        for turn, r in zip(episode.reward_turns, episode.rewards):
            end = ends[min(turn, ends.size - 1)]
            out[i, max(end, 1) - 1] += r  # token 0 (BOS) is never generated
    return out


def score_episodes(played: EpisodeBatch, rows: Sequence[Mapping], reward) -> tuple[np.ndarray, dict]:
    """Each episode's score: its per-turn rewards plus the reward functions on its prompt
    and final assistant turn (with the whole conversation as the `conversation` column)."""
    records = [{**r, "conversation": e.messages} for r, e in zip(rows, played.episodes)]
    scores, metrics = reward(records, [r["prompt"] for r in rows], played.final_turns,
                             played.generated)
    turn_rewards = np.asarray([sum(e.rewards) for e in played.episodes], np.float32)
    return (np.asarray(scores, np.float32) + turn_rewards), metrics


def evaluate_episodes(params, model_cfg: ModelConfig, tokenizer, env, spec: EpisodeSpec,
                      rows: Sequence[Mapping], score_fn: Callable, *, seed: int = 0,
                      batch_size: int = 64, temperature: float = 1.0, ref_params: Any = None,
                      runners: dict | None = None) -> dict[str, float]:
    """Greedy and sampled episodes on held-out rows, scored like `evaluate_policy`:
    `score_fn(rows, episodes, final_turns, lengths) -> {name: scores}` gives NAME/greedy,
    NAME/sampled and their sems; env/* metrics of the sampled episodes, their generated
    length and (with `ref_params`) kl/ref over the generated tokens."""
    if runners is None:
        runners = {}
    for mode in ("greedy", "sampled"):
        if mode not in runners:
            runners[mode] = EpisodeRunner(model_cfg, tokenizer, env, spec, temperature=temperature,
                                          greedy=mode == "greedy")
    scores: dict[str, list] = {}
    env_metrics: dict[str, list] = {}
    lengths, kls = [], []
    rng = jax.random.PRNGKey(seed)
    for start in range(0, len(rows), batch_size):
        chunk = list(rows[start:start + batch_size])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)   # fixed shapes: one compile
        for mode, runner in runners.items():
            played = runner.run(params, chunk, jax.random.fold_in(rng, start))
            for name, values in score_fn(chunk[:n], played.episodes[:n], played.final_turns[:n],
                                         played.generated[:n]).items():
                scores.setdefault(f"{name}/{mode}", []).append(np.asarray(values, np.float64))
            if mode == "sampled":
                lengths.append(played.generated[:n])
                for k, v in episode_metrics(played.episodes[:n], played.truncated[:n]).items():
                    env_metrics.setdefault(k, []).append(v * n)
                if ref_params is not None:
                    batch = {k: v for k, v in played.batch.items() if k != "old_logps"}
                    kls.append(np.asarray(_sequence_logps(params, model_cfg, batch)
                                          - _sequence_logps(ref_params, model_cfg, batch))[:n])
    out = summarize_scores(scores)
    out["completions/mean_length"] = float(np.concatenate(lengths).mean())
    out.update({k: sum(v) / len(rows) for k, v in env_metrics.items()})
    if kls:
        out["kl/ref"] = float(np.concatenate(kls).mean())
    return out


def episode_evaluator(config, model_cfg: ModelConfig, tokenizer, task, rows: Sequence[Mapping], *,
                      reward=None) -> Callable | None:
    """`(params, start_params) -> metrics` on held-out `rows` as multi-turn episodes, when
    config.rl (or the built-in `task`) names an environment; else None. Each turn samples
    config.eval.max_new_tokens. Scores: the task's gold reward of the final assistant turn
    (gold_reward/*), and with `reward` (a CombinedReward) the run's reward functions with
    each episode's per-turn rewards (reward/*, rewards/NAME/*)."""
    spec = episode_spec(config, task, max_new_tokens=int(config.eval.max_new_tokens))
    if spec is None or not rows:
        return None
    env = make_environment(spec)
    runners: dict = {}

    def score_fn(chunk, episodes, finals, lengths):
        out = {}
        if task is not None:
            out["gold_reward"] = task.gold_reward([r["prompt"] for r in chunk], finals)
        if reward is not None:
            records = [{**r, "conversation": e.messages} for r, e in zip(chunk, episodes)]
            total, per_function = reward.scores(records, [r["prompt"] for r in chunk], finals,
                                                lengths)
            out["reward"] = total + np.asarray([sum(e.rewards) for e in episodes], np.float32)
            out.update({f"rewards/{name}": values for name, values in per_function.items()})
        return out

    def evaluate(params, start_params):
        return evaluate_episodes(params, model_cfg, tokenizer, env, spec, rows, score_fn,
                                 seed=config.seed, batch_size=config.eval.batch_size,
                                 temperature=config.eval.temperature, ref_params=start_params,
                                 runners=runners)
    return evaluate
