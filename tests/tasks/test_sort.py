"""Gold reward of the sort task on hand-worked examples."""

import pytest

from jalign.tasks import get_task

PROMPT = "sort: 7 3 9 1\n"


@pytest.mark.parametrize("completion, expected", [
    ("1 3 7 9", 1.0),
    ("1  3 7 9", 0.9),      # Right digits, wrong spacing.
    ("1 3 7 8", 0.75),      # One wrong digit: (3 + 3) / 8.
    ("1 7 3 9", 0.625),     # One swapped pair: (2 + 3) / 8.
    ("1 3 9", 0.625),       # Dropped element: (2 + 3) / 8.
    ("1 3 5 7 9", 0.6),     # Extra element: (2 + 4) / 10.
    ("7 3 9 1", 0.375),     # Copied unsorted: (1 + 2) / 8.
    ("9 7 3 1", 0.125),     # Descending: (0 + 1) / 8.
    ("1379", 0.0),
    ("hello world", 0.0),
    ("", 0.0),
])
def test_gold_reward_examples(completion, expected):
    reward = get_task("sort").gold_reward([PROMPT], [completion])[0]
    assert reward == pytest.approx(expected)


def test_reference_and_prompt_format():
    task = get_task("sort")
    assert task.reference(PROMPT) == "1 3 7 9"
    assert task.reference("sort: 5 0 5\n") == "0 5 5"
    for prompt in task.prompts(200, seed=0):
        digits = prompt.removeprefix("sort: ").removesuffix("\n").split(" ")
        assert 3 <= len(digits) <= 6 and all(len(d) == 1 and d.isdigit() for d in digits)
    for bad in ("sort: 7 3 9 1", "sort: 12 3\n", "add: 1+2="):
        with pytest.raises(ValueError, match="not a 'sort' prompt"):
            task.reference(bad)
