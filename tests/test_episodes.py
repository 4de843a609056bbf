"""Multi-turn rollouts (jalign.algorithms.episodes): cache continuation equals re-encoding,
behaviour log-probs equal a full forward, observation tokens are masked and get no
gradient, tool failures become counted error observations, and one multi-turn GRPO
iteration on 8 devices equals 1 device."""

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.algorithms.episodes import (EpisodeRunner, EpisodeSpec, episode_spec,
                                        make_environment)
from jalign.environments import Environment
from jalign.losses.rl import clipped_policy_loss
from jalign.models.config import ModelConfig
from jalign.models.transformer import Decoder
from jalign.steps.common import shifted_logprobs
from jalign.tokenizer import builtin_tokenizer
from jalign.tools import ToolEnvironment, calculator, format_tool_call
from tests.train_helpers import load_config, read_metrics

TOK = builtin_tokenizer()
CFG = ModelConfig(vocab_size=TOK.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                  num_kv_heads=2, intermediate_size=48)


def _params(eos_boost: float, seed: int = 0):
    """A random model whose EOS logit is scaled up, so that its turns end by themselves."""
    params = nn.meta.unbox(Decoder(CFG).init(jax.random.PRNGKey(seed),
                                             jnp.zeros((1, 8), jnp.int32))["params"])
    params["embed"] = params["embed"].at[TOK.eos_id].multiply(eos_boost)
    return params


class Countdown(Environment):
    """Answers every turn with a short user message; ends after the third turn. A reward of
    0.1 per turn."""

    def step(self, episodes, completions):
        obs = [None if e.turn >= 3 else f"n{e.turn}:{len(c) % 10}" for e, c in
               zip(episodes, completions)]
        return obs, [0.1] * len(obs), [o is None for o in obs]


def _rows(n):
    return [{"prompt": [{"role": "user", "content": "go" * (1 + i % 3)}]} for i in range(n)]


SPEC = EpisodeSpec("countdown", max_turns=4, max_new_tokens=10, episode_tokens=4 * (10 + 24),
                   max_observation_tokens=24)


def _observation_positions(batch, row):
    """Token positions of row `row` that belong to observations ("\\nuser: n..\\nassistant: ")."""
    n = int(batch["segment_ids"][row].sum())
    text = [TOK.decode([int(t)], skip_special_tokens=False) for t in batch["tokens"][row][:n]]
    joined = "".join(text)
    starts, out, offset = [], [], 0
    for i, piece in enumerate(text):
        starts.append(offset)
        offset += len(piece)
    k = joined.find("\nuser: n")
    while k >= 0:
        end = joined.index("assistant: ", k) + len("assistant: ")
        out += [i for i, s in enumerate(starts) if k <= s < end]
        k = joined.find("\nuser: n", end)
    return out


# A sliding window of 6 tokens on the first layer: shorter than one turn and its
# observation, so it cuts across the empty cache slots between turns.
SLIDING = dataclasses.replace(CFG, sliding_window=6,
                              layer_types=("sliding_attention", "full_attention"))


@pytest.mark.parametrize("cfg", [CFG, SLIDING], ids=["full", "sliding"])
def test_cache_continuation_equals_reencoding_each_turn(cfg):
    params = _params(eos_boost=25.0)
    runner = EpisodeRunner(cfg, TOK, Countdown(), SPEC, greedy=True)
    rows = _rows(6)
    played = runner.run(params, rows, jax.random.PRNGKey(1))
    reference = runner.run_reencoding(params, rows, jax.random.PRNGKey(1))
    assert max(e.turn for e in played.episodes) >= 3  # really several turns
    for i, ids in enumerate(reference):
        n = int(played.batch["segment_ids"][i].sum())
        assert played.batch["tokens"][i][:n].tolist() == ids, f"episode {i}"
    # Sampled too: the same uniforms give the same tokens.
    sampler = EpisodeRunner(cfg, TOK, Countdown(), SPEC, temperature=1.0)
    played = sampler.run(params, rows, jax.random.PRNGKey(2))
    reference = sampler.run_reencoding(params, rows, jax.random.PRNGKey(2))
    for i, ids in enumerate(reference):
        n = int(played.batch["segment_ids"][i].sum())
        assert played.batch["tokens"][i][:n].tolist() == ids, f"episode {i}"
    # The behaviour log-probs (cached, with empty slots between turns) equal the trainer's
    # on the compacted rows, where the window counts tokens; with the window, they differ
    # from a full-attention model's.
    batch = {k: v for k, v in played.batch.items() if k != "old_logps"}
    mask = batch["loss_mask"][:, 1:]
    logps = np.asarray(shifted_logprobs(params, cfg, batch)[0]) * mask
    np.testing.assert_allclose(logps, played.batch["old_logps"], atol=1e-5)
    if cfg is SLIDING:
        full = np.asarray(shifted_logprobs(params, CFG, batch)[0]) * mask
        assert np.abs(full - logps).max() > 1e-3


def test_behaviour_logps_equal_a_full_forward_and_observations_get_no_gradient():
    params = _params(eos_boost=25.0)
    played = EpisodeRunner(CFG, TOK, Countdown(), SPEC).run(params, _rows(8),
                                                            jax.random.PRNGKey(3))
    batch = played.batch
    assert max(e.turn for e in played.episodes) >= 2
    obs = {i: _observation_positions(batch, i) for i in range(8)}
    assert sum(map(len, obs.values())) > 20
    for i, positions in obs.items():  # observation (and template) tokens: loss mask 0
        assert all(batch["loss_mask"][i][p] == 0 for p in positions)
    assert batch["loss_mask"].sum() == played.generated.sum() > 0
    trainer = {k: v for k, v in batch.items() if k != "old_logps"}
    logps, _ = shifted_logprobs(params, CFG, trainer)
    mask = batch["loss_mask"][:, 1:]
    np.testing.assert_allclose(np.asarray(logps) * mask, batch["old_logps"], atol=1e-5)
    # The first update's importance ratio is 1, and only generated tokens carry gradient.
    advantages = jnp.asarray(np.linspace(-1, 1, 8), jnp.float32)

    def loss(lp):
        return clipped_policy_loss(lp, jnp.asarray(batch["old_logps"]), advantages,
                                   jnp.asarray(mask))[0]
    lp = jnp.asarray(np.asarray(logps))
    _, metrics = clipped_policy_loss(lp, jnp.asarray(batch["old_logps"]), advantages,
                                     jnp.asarray(mask))
    assert float(metrics["policy/clipfrac_avg"]) == 0.0
    ratio = np.exp(np.asarray(lp) - batch["old_logps"])[mask > 0]
    np.testing.assert_allclose(ratio, 1.0, atol=1e-5)
    grad = np.asarray(jax.grad(loss)(lp))
    assert np.all(grad[mask == 0] == 0.0)
    for i, positions in obs.items():  # position t scores token t + 1
        assert all(grad[i, p - 1] == 0.0 for p in positions)
    assert np.abs(grad[mask > 0]).min() > 0


def test_episode_metrics_and_turn_rewards():
    played = EpisodeRunner(CFG, TOK, Countdown(), SPEC).run(_params(25.0), _rows(8),
                                                            jax.random.PRNGKey(3))
    turns = np.asarray([e.turn for e in played.episodes])
    assert played.metrics["env/turns"] == pytest.approx(turns.mean())
    # Every turn the environment stepped earned 0.1; a turn cut at max_new_tokens was not.
    rewards = [sum(e.rewards) for e in played.episodes]
    assert played.metrics["env/turn_reward"] == pytest.approx(np.mean(rewards))
    for e, truncated in zip(played.episodes, played.truncated):
        assert len(e.rewards) == e.turn - (1 if truncated else 0)


def test_turn_rewards_sit_at_each_turns_last_token_and_ppo_rewards_keep_the_score():
    from jalign.algorithms.episodes import turn_reward_tokens
    from jalign.algorithms.rl import token_rewards
    played = EpisodeRunner(CFG, TOK, Countdown(), SPEC).run(_params(25.0), _rows(8),
                                                            jax.random.PRNGKey(3))
    mask = played.batch["loss_mask"]
    placed = turn_reward_tokens(mask, played.episodes)
    assert max(len(e.rewards) for e in played.episodes) >= 2  # several rewarded turns
    for i, e in enumerate(played.episodes):
        gen = np.flatnonzero(mask[i])
        turn_ends = gen[np.append(np.diff(gen) > 1, True)]  # last token of each turn
        assert len(turn_ends) == e.turn
        want = np.zeros(mask.shape[1] - 1, np.float32)
        for k, r in zip(e.reward_turns, e.rewards):
            want[turn_ends[k] - 1] += r  # index t scores token t + 1
        np.testing.assert_allclose(placed[i], want)
    # PPO's per-token rewards: turn rewards where the turns end, the rest of the score
    # (the reward functions') on the last token; each row still sums to its score.
    rng = np.random.default_rng(0)
    m = jnp.asarray(mask[:, 1:], jnp.float32)
    kl = jnp.asarray(rng.normal(size=m.shape), jnp.float32) * m
    scores = jnp.asarray([sum(e.rewards) for e in played.episodes], jnp.float32) + 1.0
    flat = token_rewards(kl, m, scores, 0.1)
    split = token_rewards(kl, m, scores, 0.1, jnp.asarray(placed))
    np.testing.assert_allclose(split.sum(-1), flat.sum(-1), rtol=1e-5, atol=1e-5)
    moved = np.asarray(split - flat)
    last = mask.shape[1] - 2 - np.argmax(np.asarray(m)[:, ::-1], axis=1)
    for i, e in enumerate(played.episodes):
        before = np.delete(moved[i], last[i])
        np.testing.assert_allclose(before, np.delete(placed[i], last[i]), atol=1e-6)


def _slow(seconds: float) -> str:
    """Sleeps.

    Args:
      seconds: how long.
    """
    time.sleep(seconds)
    return "slept"


def _broken(x: int) -> str:
    """Always fails.

    Args:
      x: anything.
    """
    raise RuntimeError(f"broken on {x}")


class ScriptedTools(ToolEnvironment):
    """The policy's first turn is replaced by a scripted call: malformed, raising, slow, good."""

    SCRIPT = ('<tool_call>{"name": "calculator", "argum',
              format_tool_call("_broken", {"x": 3}),
              format_tool_call("_slow", {"seconds": 5}),
              format_tool_call("calculator", {"expression": "12*34"}))

    def step(self, episodes, completions):
        completions = [self.SCRIPT[e.row["script"]] if e.turn == 1 else c
                       for e, c in zip(episodes, completions)]
        return super().step(episodes, completions)


def test_tool_failures_become_counted_error_observations_and_the_run_goes_on():
    env = ScriptedTools([calculator, _broken, _slow], timeout_s=0.3)
    spec = dataclasses.replace(SPEC, max_turns=2, max_observation_tokens=96,
                               episode_tokens=2 * (10 + 96))
    rows = [{"prompt": "x", "script": i} for i in range(4)]
    start = time.monotonic()
    played = EpisodeRunner(CFG, TOK, env, spec).run(_params(60.0), rows, jax.random.PRNGKey(0))
    assert time.monotonic() - start < 60
    tool_messages = [[m["content"] for m in e.messages if m["role"] == "tool"]
                     for e in played.episodes]
    assert all(len(t) == 1 for t in tool_messages), tool_messages
    assert tool_messages[0][0].startswith("error:")
    assert "RuntimeError" in tool_messages[1][0] and "broken on 3" in tool_messages[1][0]
    assert "timed out" in tool_messages[2][0]
    assert tool_messages[3] == ["408"]
    assert all(e.turn == 2 for e in played.episodes)  # every episode played its second turn
    assert played.metrics["env/tool_calls"] == 1.0
    assert played.metrics["env/tool_errors"] == 0.75


def test_config_errors_name_the_key():
    config = load_config("grpo_tools_tiny", "test")
    assert episode_spec(config, None) is None  # no environment named, no task's own
    from jalign.tasks import get_task
    spec = episode_spec(config, get_task("calc"))
    assert (spec.environment, spec.tools) == ("tools", "calculator")
    config.rl.environment = "none"
    assert episode_spec(config, get_task("calc")) is None
    for key, value, match in (("environment", "chess", "config.rl.environment"),
                              ("max_turns", 0, "config.rl.max_turns"),
                              ("tool_call_format", "xml", "config.rl.tool_call_format"),
                              ("tool_timeout", 0.0, "config.rl.tool_timeout")):
        bad = load_config("grpo_tools_tiny", "test")
        bad.rl.environment = "tools"
        bad.rl.tools = "calculator"
        bad.rl[key] = value
        with pytest.raises(ValueError, match=match):
            episode_spec(bad)
    bad = load_config("grpo_tools_tiny", "test")
    bad.rl.environment = "tools"
    with pytest.raises(ValueError, match="config.rl.tools"):
        episode_spec(bad)
    bad.rl.environment = "python:tests.test_episodes.Countdown"
    assert isinstance(make_environment(episode_spec(bad)), Countdown)
    bad.rl.environment = "python:tests.test_episodes.Nope"
    with pytest.raises(ValueError, match="cannot import"):
        make_environment(episode_spec(bad))


def test_one_multi_turn_grpo_iteration_on_8_devices_equals_1(tmp_path, monkeypatch):
    """The loop on 8 simulated devices (data 2 x fsdp 4) and on one: the same episodes,
    rewards, loss and gradient norm for one GRPO step on the calc task."""
    from jalign import loop
    from jalign import sharding as shd

    def config():
        c = load_config("grpo_tools_tiny", "test")
        c.pipeline.stages = ""
        c.algo = "grpo"
        c.data.batch_size = 4
        c.rl.group_size = 2
        c.rl.max_new_tokens = 24
        c.eval.max_new_tokens = 24
        # A signal a random model earns: the final turn's length.
        c.rl.reward_sources = "python:tests.rl_reward_fns.length_fraction"
        c.rl.reward_weights = None
        c.train.num_steps = 1
        c.train.eval_every = 0
        c.train.eval_at_start = False
        c.train.log_every = 1
        return c
    many = config()
    many.mesh.data, many.mesh.fsdp = 2, 4
    loop.run(many, str(tmp_path / "eight"))
    want = read_metrics(str(tmp_path / "eight"))[1]
    one = config()
    one.mesh.fsdp = 1
    make_mesh = shd.make_mesh
    monkeypatch.setattr(loop.shd, "make_mesh", lambda shape: make_mesh(shape, jax.devices()[:1]))
    loop.run(one, str(tmp_path / "one"))
    got = read_metrics(str(tmp_path / "one"))[1]
    assert want["reward_std"] > 0 and want["grad_norm"] > 0
    for key in ("reward", "reward_std", "env/turns", "env/tool_calls", "completions/mean_length",
                "loss", "grad_norm"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def chatty_start(tmp_path_factory):
    """Start params for the config's model whose EOS is likely: its turns end by themselves,
    so the episodes below run several turns."""
    from jalign.checkpoint import save_params
    from jalign.models.transformer import decoder_init_fn
    model_cfg = ModelConfig.from_mapping(load_config("grpo_tools_tiny", "test").model)
    params = nn.meta.unbox(decoder_init_fn(model_cfg)(jax.random.PRNGKey(0)))
    params["embed"] = params["embed"].at[TOK.eos_id].multiply(12.0)
    path = str(tmp_path_factory.mktemp("chatty") / "params")
    save_params(path, params)
    return path


@pytest.mark.parametrize("algo", ["rloo", "ppo", "online_dpo"])
def test_every_online_algorithm_trains_on_multi_turn_episodes(algo, chatty_start, tmp_path):
    from jalign import loop
    c = load_config("grpo_tools_tiny", "test")
    c.pipeline.stages = ""
    c.algo = algo
    c.init_from = chatty_start
    # Online DPO trains on one pair per prompt: 8 prompts split over the 8 devices.
    c.data.batch_size, c.rl.group_size = (8 if algo == "online_dpo" else 4), 2
    c.rl.environment = "python:tests.test_episodes.Countdown"
    c.rl.max_new_tokens = 12
    c.rl.reward_sources = "python:tests.rl_reward_fns.length_fraction"
    c.rl.reward_weights = None
    c.train.num_steps, c.train.eval_every, c.train.eval_at_start = 2, 0, False
    loop.run(c, str(tmp_path))
    metrics = read_metrics(str(tmp_path))
    assert max(m["env/turns"] for m in metrics.values()) > 1.5  # several turns per episode
    for m in metrics.values():
        assert np.isfinite(m["loss"]) and "env/truncated" in m and "env/turn_reward" in m
    assert max(m["grad_norm"] for m in metrics.values()) > 0


def test_guess_environment_answers_every_turn():
    """The built-in guessing game through the runner: every wrong or unparsable guess is
    answered as a user turn and costs 0.05; the gold reward scores the final turn."""
    from jalign.tasks import get_task
    task = get_task("guess")
    rows = task.prompt_records(8, seed=0, split="eval")
    spec = EpisodeSpec("guess", max_turns=3, max_new_tokens=6, episode_tokens=3 * (6 + 16),
                       max_observation_tokens=16)
    played = EpisodeRunner(CFG, TOK, make_environment(spec), spec).run(
        _params(25.0), rows, jax.random.PRNGKey(0))
    replies = [m["content"] for e in played.episodes for m in e.messages[1:]
               if m["role"] == "user"]
    assert replies and set(replies) <= {"higher", "lower", "say a number"}
    for e in played.episodes:
        assert sum(e.rewards) == pytest.approx(-0.05 * len(e.rewards))
        assert len(e.rewards) == sum(m["role"] == "user" for m in e.messages[1:])
    gold = task.gold_reward([r["prompt"] for r in rows], played.final_turns)
    assert set(np.unique(gold)) <= {0.0, 1.0}
