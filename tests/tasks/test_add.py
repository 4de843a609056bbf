"""Gold reward of the add task on hand-worked examples."""

import pytest

from jalign.tasks import get_task

PROMPT = "add: 47+85="


@pytest.mark.parametrize("completion, expected", [
    ("132", 1.0),
    (" 132", 0.9),          # Right number, stray whitespace.
    ("122", 2 / 3),         # One wrong digit.
    ("131", 2 / 3),         # Off by one.
    ("32", 2 / 3),          # Dropped the carried digit.
    ("1132", 0.75),         # Extra leading digit.
    ("38", 1 / 3),          # The difference.
    ("abc", 0.0),
    ("", 0.0),
])
def test_gold_reward_examples(completion, expected):
    reward = get_task("add").gold_reward([PROMPT], [completion])[0]
    assert reward == pytest.approx(expected)


def test_reference_and_prompt_format():
    task = get_task("add")
    assert task.reference(PROMPT) == "132"
    assert task.reference("add: 0+0=") == "0"
    for prompt in task.prompts(200, seed=0):
        a, b = prompt.removeprefix("add: ").removesuffix("=").split("+")
        assert 1 <= len(a) <= 2 and 1 <= len(b) <= 2
        assert a == str(int(a)) and b == str(int(b))  # No leading zeros.
    for bad in ("add: 1+2", "add: 1 + 2=", "sort: 1 2\n"):
        with pytest.raises(ValueError, match="not an 'add' prompt"):
            task.reference(bad)
