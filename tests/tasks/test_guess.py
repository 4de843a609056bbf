"""The guess task and GuessEnvironment: hidden secrets, binary-search demonstrations."""

import collections
import math

import numpy as np
import pytest

from jalign.data.sft import fit_prompt_completion
from jalign.environments import Episode
from jalign.tasks import GuessEnvironment, get_task
from jalign.tokenizer import builtin_tokenizer

PROMPT = "guess 1-16 (k7q)"   # Secret 2.
MESSAGES = [{"role": "user", "content": PROMPT}]


def _guesses(demo):
    return [int(m["content"]) for m in demo["completion"] if m["role"] == "assistant"]


def _check_transcript(demo, secret):
    """Turns alternate assistant guess / user feedback, and the feedback is right."""
    turns = demo["completion"]
    assert [m["role"] for m in turns] == ["assistant", "user"] * (len(turns) // 2) + ["assistant"]
    for guess, answer in zip(turns[::2], turns[1::2]):
        assert answer["content"] == ("higher" if secret > int(guess["content"]) else "lower")


def test_secret_is_a_hash_of_the_tag():
    task = get_task("guess")
    assert task.environment == "guess" and task.tools == ""
    assert task.reference(PROMPT) == task.reference(MESSAGES) == "2"
    assert [task.secret(f"guess 1-16 ({tag})") for tag in ("abc", "zzz", "000")] == [14, 14, 12]
    assert task.max_guesses == 5 and get_task("guess", high=100).max_guesses == 8
    records = task.prompt_records(2000, seed=0)
    for record, prompt in zip(records, task.prompts(2000, seed=0)):
        assert record == {"prompt": [{"role": "user", "content": prompt}],
                          "answer": task.reference(prompt)}
    # Every secret is common, and none is written in its prompt's tag.
    counts = collections.Counter(int(r["answer"]) for r in records)
    assert sorted(counts) == list(range(1, 17)) and min(counts.values()) > 2000 / 16 / 2
    for bad in ("guess 1-16", "guess 1-8 (k7q)", "guess 1-16 (K7Q)", "guess 1-16 (k7q) "):
        with pytest.raises(ValueError, match="not a 'guess' prompt"):
            task.reference(bad)
    assert get_task("guess", high=8).prompts(1, seed=0)[0].startswith("guess 1-8 (")
    with pytest.raises(ValueError, match="high"):
        get_task("guess", high=1)


@pytest.mark.parametrize("completion, expected", [
    ("2", 1.0), (" 2\n", 1.0), ("02", 1.0),
    ("3", 0.0), ("2!", 0.0), ("it is 2", 0.0), ("", 0.0), (None, 0.0),
    ([{"role": "assistant", "content": "8"}, {"role": "user", "content": "lower"},
      {"role": "assistant", "content": "2"}], 1.0),
    ([{"role": "assistant", "content": "2"}, {"role": "user", "content": "oops"},
      {"role": "assistant", "content": "4"}], 0.0),   # Only the final turn counts.
])
def test_gold_reward_of_the_final_turn(completion, expected):
    task = get_task("guess")
    for prompt in (PROMPT, MESSAGES):
        assert task.gold_reward([prompt], [completion])[0] == expected


def test_quality_one_demonstrations_are_binary_searches():
    task = get_task("guess")
    demos = task.demonstrations(400, seed=0, quality=1.0)
    by_secret = {}
    for demo in demos:
        secret = task.secret(demo["prompt"])
        _check_transcript(demo, secret)
        guesses = _guesses(demo)
        low, high = 1, 16
        for guess in guesses:
            assert guess == (low + high) // 2
            low, high = (guess + 1, high) if secret > guess else (low, guess - 1)
        assert guesses[-1] == secret
        assert len(guesses) <= math.ceil(math.log2(16)) + 1
        by_secret[secret] = guesses
    assert sorted(by_secret) == list(range(1, 17))
    assert by_secret[11] == [8, 12, 10, 11] and by_secret[16] == [8, 12, 14, 15, 16]
    assert by_secret[8] == [8]
    np.testing.assert_array_equal(
        task.gold_reward([d["prompt"] for d in demos], [d["completion"] for d in demos]), 1.0)


def test_quality_zero_demonstrations_are_unwise_but_consistent():
    task = get_task("guess")
    demos = task.demonstrations(400, seed=0, quality=0.0)
    assert [d["prompt"] for d in demos] == [
        d["prompt"] for d in task.demonstrations(400, seed=0, quality=1.0)]
    lengths = []
    for demo in demos:
        secret = task.secret(demo["prompt"])
        _check_transcript(demo, secret)
        guesses = _guesses(demo)
        assert guesses[0] != 8                    # Never the binary search.
        assert guesses[-1] == secret or len(guesses) == 5
        assert len(guesses) <= 5 and len(set(guesses)) == len(guesses)
        lengths.append(len(guesses))
    gold = task.gold_reward([d["prompt"] for d in demos], [d["completion"] for d in demos])
    assert 0.3 < gold.mean() < 0.95      # Some run out of guesses.
    assert np.mean(lengths) > np.mean([len(_guesses(d)) for d in task.demonstrations(
        400, seed=0, quality=1.0)]) + 0.5


def test_demonstrations_render_with_the_builtin_chat_template():
    tok = builtin_tokenizer()
    completion = [{"role": "assistant", "content": "8"}, {"role": "user", "content": "lower"},
                  {"role": "assistant", "content": "2"}]
    example, _ = fit_prompt_completion(MESSAGES, completion, tok, max_length=512)
    assert tok.decode(example["tokens"], skip_special_tokens=False) == (
        f"<bos>user: {PROMPT}\nassistant: 8<eos>\nuser: lower\nassistant: 2<eos>\n")
    lengths = []
    for demo in get_task("guess").demonstrations(300, seed=0, quality=0.5):
        example, cuts = fit_prompt_completion(demo["prompt"], demo["completion"], tok,
                                              max_length=150)
        assert not cuts.completion_truncated
        lengths.append(len(example["tokens"]))
    # One guess is 38 tokens; five guesses and four answers at most 150.
    assert min(lengths) == 38 and max(lengths) == 150


def _episode(secret):
    return Episode(row={"prompt": MESSAGES, "answer": str(secret)}, messages=list(MESSAGES))


def test_environment_step():
    env = GuessEnvironment()
    episodes = [_episode(11) for _ in range(6)]
    observations, rewards, done = env.step(episodes, ["8", "12", "11", "abc", " 11 ", "x 3"])
    assert observations == ["higher", "lower", None, "say a number", None, "say a number"]
    assert rewards == [-0.05, -0.05, 0.0, -0.05, 0.0, -0.05]
    assert done == [False, False, True, False, True, False]
    assert [e.stats for e in episodes] == [{}, {}, {}, {"invalid_guesses": 1.0}, {},
                                           {"invalid_guesses": 1.0}]
    env.step(episodes[3:4], [""])
    assert episodes[3].stats == {"invalid_guesses": 2.0}
    assert env.step([], []) == ([], [], [])


def test_binary_search_policy_solves_every_episode():
    task, env = get_task("guess"), GuessEnvironment()
    rows = task.prompt_records(64, seed=0, split="eval")
    episodes = [Episode(row=row, messages=env.reset([row])[0]) for row in rows]
    bounds = [[1, 16] for _ in rows]
    finals, turns = [None] * len(rows), [0] * len(rows)
    live = list(range(len(rows)))
    while live:
        guesses = [str(sum(bounds[i]) // 2) for i in live]
        observations, rewards, done = env.step([episodes[i] for i in live], guesses)
        assert all(r == (0.0 if d else -0.05) for r, d in zip(rewards, done))
        for i, guess, observation in zip(live, guesses, observations):
            turns[i] += 1
            finals[i] = guess
            if observation == "higher":
                bounds[i][0] = int(guess) + 1
            elif observation == "lower":
                bounds[i][1] = int(guess) - 1
        live = [i for i, finished in zip(live, done) if not finished]
        assert max(turns) <= task.max_guesses
    np.testing.assert_array_equal(task.gold_reward([r["prompt"] for r in rows], finals), 1.0)
