"""Behaviour every built-in task shares: splits, determinism, data knobs."""

import numpy as np
import pytest

from jalign.tasks import TASKS, Task, get_task
from jalign.tokenizer import builtin_tokenizer

N_PAIRS = 2000


def _gold(task, rows, key="completion"):
    return task.gold_reward([r["prompt"] for r in rows], [r[key] for r in rows])


@pytest.fixture(params=TASKS)
def task(request) -> Task:
    return get_task(request.param)


# Multi-turn tasks (an environment answers between turns) have chat-message data and exact
# success rewards; tests/tasks/test_calc.py and test_guess.py check them.
SINGLE_TURN = [name for name in TASKS if not get_task(name).environment]


@pytest.fixture(params=SINGLE_TURN)
def single_turn_task(request) -> Task:
    return get_task(request.param)


def test_registry():
    assert set(TASKS) >= {"sort", "add", "sentiment"}
    for name in TASKS:
        assert get_task(name).name == name
    with pytest.raises(ValueError, match="unknown task 'nope'.*sort.*add.*sentiment"):
        get_task("nope")
    with pytest.raises(ValueError, match="unknown option.*digits.*valid options: min_len, max_len"):
        get_task("sort", digits=3)
    with pytest.raises(ValueError, match="min_len"):
        get_task("sort", min_len=5, max_len=2)


def test_options_change_the_task():
    prompts = get_task("add", min_digits=3, max_digits=3).prompts(50, seed=0)
    for prompt in prompts:
        a, b = prompt.removeprefix("add: ").removesuffix("=").split("+")
        assert len(a) == len(b) == 3
    sort_prompts = get_task("sort", min_len=2, max_len=2).prompts(50, seed=0)
    assert all(len(p.split()) == 3 for p in sort_prompts)


def test_references_score_one(task):
    for split in ("train", "eval"):
        prompts = task.prompts(300, seed=1, split=split)
        rewards = task.gold_reward(prompts, [task.reference(p) for p in prompts])
        assert rewards.dtype == np.float32 and rewards.shape == (300,)
        np.testing.assert_array_equal(rewards, 1.0)


def test_imperfect_candidates_score_below_one(single_turn_task):
    task = single_turn_task
    demos = task.demonstrations(500, seed=0, quality=0.0)
    rewards = _gold(task, demos)
    assert np.all(rewards < 1.0)
    # A spread of qualities, not one value.
    assert len(np.unique(np.round(rewards, 3))) >= 5
    assert rewards.max() >= 0.5


def test_garbage_never_raises_and_scores_near_zero(task):
    rng = np.random.default_rng(0)
    printable = [chr(c) for c in range(0x20, 0x7F)] + ["\n"]
    garbage = ["".join(rng.choice(printable, size=rng.integers(1, 30))) for _ in range(300)]
    odd = ["", " ", "\n\n", "é ü ☃ 中文", "\x00\x01", "9" * 10_000, "1 " * 5_000,
           "<eos>", "great " * 500, None, 12, b"bytes"]
    prompts = task.prompts(len(garbage) + len(odd), seed=0)
    rewards = task.gold_reward(prompts, garbage + odd)
    assert rewards.dtype == np.float32
    assert np.all((rewards >= 0.0) & (rewards <= 1.0))
    assert rewards[:len(garbage)].mean() < 0.05
    assert np.all(rewards[len(garbage):] <= 0.2)


def test_bad_inputs_raise_value_errors(task):
    with pytest.raises(ValueError, match="not a.*prompt"):
        task.gold_reward(["what is this"], ["x"])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        task.gold_reward(task.prompts(2, seed=0), ["x"])
    with pytest.raises(ValueError, match="split"):
        task.prompts(3, seed=0, split="test")
    with pytest.raises(ValueError, match="label_noise"):
        task.preference_pairs(3, seed=0, label_noise=0.6)
    with pytest.raises(ValueError, match="quality"):
        task.demonstrations(3, seed=0, quality=1.5)


def test_splits_are_disjoint_for_any_seeds(single_turn_task):
    task = single_turn_task
    train = set(task.prompts(1000, seed=0, split="train"))
    train |= {d["prompt"] for d in task.demonstrations(300, seed=5)}
    train |= {p["prompt"] for p in task.preference_pairs(300, seed=6)}
    evals = set(task.prompts(1000, seed=1, split="eval"))
    evals |= {d["prompt"] for d in task.demonstrations(300, seed=7, split="eval")}
    assert train and evals and not train & evals
    assert {task.split_of(p) for p in train} == {"train"}
    assert {task.split_of(p) for p in evals} == {"eval"}


def test_deterministic_in_seed(task):
    assert task.prompts(50, seed=3) == task.prompts(50, seed=3)
    assert task.prompts(50, seed=3) != task.prompts(50, seed=4)
    assert task.prompts(50, seed=3)[:20] == task.prompts(20, seed=3)
    assert task.demonstrations(40, seed=3, quality=0.5) == task.demonstrations(
        40, seed=3, quality=0.5)
    assert task.preference_pairs(40, seed=3, label_noise=0.2) == task.preference_pairs(
        40, seed=3, label_noise=0.2)
    assert task.unpaired(40, seed=3) == task.unpaired(40, seed=3)
    prompt = task.prompts(1, seed=0)[0]
    assert task.candidates(prompt, 10, seed=0) == task.candidates(prompt, 10, seed=0)
    # Rebuilding the task does not change anything.
    assert get_task(task.name).prompts(50, seed=3) == task.prompts(50, seed=3)


def test_demonstration_quality_knob(task):
    means = {q: _gold(task, task.demonstrations(1000, seed=0, quality=q)).mean()
             for q in (1.0, 0.5, 0.0)}
    assert means[1.0] == 1.0
    assert means[0.0] < means[0.5] - 0.05 < means[1.0] - 0.1
    # The prompts do not depend on quality.
    prompts = [d["prompt"] for d in task.demonstrations(100, seed=0, quality=1.0)]
    assert prompts == [d["prompt"] for d in task.demonstrations(100, seed=0, quality=0.3)]


def test_clean_pairs_always_prefer_higher_gold(task):
    pairs = task.preference_pairs(N_PAIRS, seed=0)
    assert len(pairs) == N_PAIRS
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert np.all(_gold(task, pairs, "chosen") > _gold(task, pairs, "rejected"))


def test_label_noise_inverts_that_share_of_pairs(task):
    clean = task.preference_pairs(N_PAIRS, seed=0)
    noisy = task.preference_pairs(N_PAIRS, seed=0, label_noise=0.3)
    inverted = _gold(task, noisy, "chosen") < _gold(task, noisy, "rejected")
    assert abs(inverted.mean() - 0.3) < 0.04
    # Same pairs, some labels flipped.
    for c, n, flipped in zip(clean, noisy, inverted):
        assert c["prompt"] == n["prompt"]
        assert (n["chosen"], n["rejected"]) == (
            (c["rejected"], c["chosen"]) if flipped else (c["chosen"], c["rejected"]))


def test_length_bias_prefers_longer_completions(task):
    pairs = task.preference_pairs(N_PAIRS, seed=0, length_bias=10.0)
    chosen_len = np.array([len(p["chosen"]) for p in pairs])
    rejected_len = np.array([len(p["rejected"]) for p in pairs])
    differ = chosen_len != rejected_len
    assert differ.mean() > 0.3
    assert (chosen_len > rejected_len)[differ].mean() > 0.9
    # The flawed labeller's choices are worse by the gold reward.
    clean = task.preference_pairs(N_PAIRS, seed=0)
    assert _gold(task, pairs, "chosen").mean() < _gold(task, clean, "chosen").mean() - 0.05


def test_unpaired_labels_follow_gold(task):
    rows = task.unpaired(N_PAIRS, seed=0)
    labels = np.array([r["label"] for r in rows])
    np.testing.assert_array_equal(labels, _gold(task, rows) >= 0.9)
    assert 0.15 < labels.mean() < 0.6
    noisy = np.array([r["label"] for r in task.unpaired(N_PAIRS, seed=0, label_noise=0.3)])
    assert abs((noisy != labels).mean() - 0.3) < 0.04


def test_all_text_fits_the_builtin_tokenizer_and_budgets(single_turn_task):
    task = single_turn_task
    tok = builtin_tokenizer()
    rows = task.demonstrations(300, seed=0, quality=0.5)
    rows += task.demonstrations(300, seed=0, quality=0.5, split="eval")
    completions = [r["completion"] for r in rows]
    prompts = [r["prompt"] for r in rows]
    for pair in task.preference_pairs(300, seed=0, length_bias=1.0):
        prompts.append(pair["prompt"])
        completions += [pair["chosen"], pair["rejected"]]
    for row in task.unpaired(300, seed=0):
        prompts.append(row["prompt"])
        completions.append(row["completion"])
    for text in prompts + completions:
        ids = tok.encode(text)
        assert len(ids) == len(text) and tok.decode(ids) == text
        assert not {tok.unk_id, tok.eos_id, tok.bos_id, tok.pad_id} & set(ids), text
    assert all(isinstance(t, str) and t for t in prompts + completions)
    assert max(map(len, prompts)) <= task.max_prompt_chars <= 40
    assert max(map(len, completions)) <= task.max_completion_chars <= 40


@pytest.mark.parametrize("name", [name for name in TASKS if get_task(name).environment])
def test_chat_tasks_are_deterministic_in_seed_and_splits_disjoint(name):
    task = get_task(name)
    demos = task.demonstrations(60, seed=3, quality=0.5)
    assert demos == task.demonstrations(60, seed=3, quality=0.5)
    assert demos[:20] == task.demonstrations(20, seed=3, quality=0.5)
    assert demos != task.demonstrations(60, seed=4, quality=0.5)
    assert task.prompt_records(30, seed=3) == get_task(name).prompt_records(30, seed=3)

    def user_texts(rows):
        return {row["prompt"][0]["content"] for row in rows}
    train = user_texts(task.demonstrations(500, seed=0)) | user_texts(
        task.prompt_records(500, seed=1))
    evals = user_texts(task.demonstrations(500, seed=0, split="eval")) | user_texts(
        task.prompt_records(500, seed=1, split="eval"))
    assert len(train) > 900 and len(evals) > 900 and not train & evals
    assert {task.split_of(p) for p in train} == {"train"}
    assert {task.split_of(p) for p in evals} == {"eval"}
