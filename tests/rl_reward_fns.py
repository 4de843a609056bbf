"""Reward functions the online-RL tests name as "python:tests.rl_reward_fns.NAME"."""

import math

SEEN: list[dict] = []  # what check_columns received, call by call


def check_columns(prompts, completions, answer, difficulty, completion_lengths, **kwargs):
    """Records its inputs; 1.0 if the completion contains the answer's first character."""
    assert len(prompts) == len(completions) == len(answer) == len(difficulty)
    assert len(completion_lengths) == len(prompts)
    SEEN.append({"prompts": list(prompts), "answer": list(answer),
                 "difficulty": list(difficulty), "extra": sorted(kwargs)})
    return [float(a[:1] in c) for a, c in zip(answer, completions)]


def none_for_hard(prompts, completions, difficulty, **_):
    """Scores only the easy rows (None for the hard ones, left out of the mean)."""
    return [None if d == "hard" else 0.5 for d in difficulty]


def positional_only(prompts, completions, answer):
    """No **kwargs: receives only the column it names."""
    return [0.0 for _ in prompts]


def needs_missing_column(prompts, completions, solution, **_):
    return [0.0 for _ in prompts]


def raises_on_seven(prompts, completions, **_):
    return [1.0 / (0 if "7" in p else 1) for p in prompts]


def wrong_length(prompts, completions, **_):
    return [0.0] * (len(prompts) + 1)


def returns_text(prompts, completions, **_):
    return ["good" for _ in prompts]


def returns_nan(prompts, completions, **_):
    return [math.nan for _ in prompts]


def returns_a_string(prompts, completions, **_):
    return "1.0"


def always_zero(prompts, completions, **_):
    return [0.0 for _ in prompts]


def digit_fraction(prompts, completions, **_):
    """The fraction of the completion's characters that are digits: varies between the
    samples of even an untrained policy (whose completions all run to the length limit)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def digits_if_even(prompts, completions, **kwargs):
    """`digit_fraction` for "add: A+B=" prompts with an even A, else 0: about half the
    groups tie (all zero), the others vary."""
    scores = digit_fraction(prompts, completions)
    return [s if int(p.split(":")[1].split("+")[0]) % 2 == 0 else 0.0
            for p, s in zip(prompts, scores)]


def length_fraction(prompts, completions, **_):
    """min(length, 20) / 20 of the completion: a signal even a random model earns."""
    return [min(len(c), 20) / 20 for c in completions]
