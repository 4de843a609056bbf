"""Gold reward of the sentiment task on hand-worked examples."""

import pytest

from jalign.tasks import get_task
from jalign.tasks.sentiment import NEGATIVE, POSITIVE, PROMPTS

PROMPT = "review: the film was "


@pytest.mark.parametrize("completion, expected", [
    ("great, fun", 1.0),
    ("Great!", 1.0),                    # Case and edge punctuation ignored.
    ("great and fun", 2 / 3),           # A filler word dilutes.
    ("great, great", 0.5),              # Repeats count once.
    ("fun but a bit slow", 0.0),        # (1 - 1) / 5.
    ("dull and boring", 0.0),
    ("it was a bit long", 0.0),
    ("great and fun, the plot was a bit long", 2 / 9 * 0.8**3),
    ("xq#@! zz", 0.0),
])
def test_gold_reward_examples(completion, expected):
    reward = get_task("sentiment").gold_reward([PROMPT], [completion])[0]
    assert reward == pytest.approx(expected)


def test_long_answers_are_not_rewarded_beyond_max_words():
    task = get_task("sentiment")
    rewards = [task.gold_reward([PROMPT], [" ".join(POSITIVE[:n])])[0] for n in range(1, 11)]
    assert rewards[:6] == [1.0] * 6
    assert all(a > b for a, b in zip(rewards[5:], rewards[6:]))


def test_vocabulary_and_prompts():
    task = get_task("sentiment")
    assert PROMPT in PROMPTS and not set(POSITIVE) & set(NEGATIVE)
    assert task.gold_reward([PROMPT], [task.reference(PROMPT)])[0] == 1.0
    assert max(map(len, PROMPTS)) <= 40
    with pytest.raises(ValueError, match="not a 'sentiment' prompt"):
        task.reference("review: the film was")
