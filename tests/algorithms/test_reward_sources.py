"""Reward functions with TRL's calling convention: columns, None, named failures."""

import json

import numpy as np
import pytest

from jalign.algorithms.reward_sources import (RewardFunctionError, build_sources, check_columns,
                                              task_gold_reward)
from jalign.data import load_records
from jalign.data.prompts import (PROMPT_IDS_KEY, make_prompt_dataset, prepare_prompt_records,
                                 reward_columns)
from jalign.data.sources import DataError, SkipReport
from jalign.tasks import get_task
from jalign.tokenizer import builtin_tokenizer
from tests import rl_reward_fns


def _write(tmp_path, rows, name="prompts.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows():
    return [{"prompt": f"add: {a}+{b}=", "answer": str(a + b),
             "difficulty": "hard" if a > 5 else "easy", "metadata": {"id": i}}
            for i, (a, b) in enumerate([(1, 2), (7, 1), (3, 3), (9, 9)])]


def _records(tmp_path, rows=None):
    records, _ = load_records(_write(tmp_path, rows or _rows()), required_fields=("prompt",))
    return prepare_prompt_records(records, builtin_tokenizer(), max_prompt_length=32)


def _combined(*names, weights=None):
    names = [f"python:tests.rl_reward_fns.{n}" for n in names]
    return build_sources(names, weights or [1.0] * len(names), gold=None, reward_model=None)


def test_reward_functions_receive_the_rows_columns(tmp_path):
    records = _records(tmp_path)
    reward = _combined("check_columns", "positional_only")
    rl_reward_fns.SEEN.clear()
    completions = ["3", "x", "6", "18"]
    scores, metrics = reward(records, [r["prompt"] for r in records], completions, [1, 1, 1, 2])
    seen = rl_reward_fns.SEEN[-1]
    assert seen["answer"] == ["3", "8", "6", "18"]
    assert seen["difficulty"] == ["easy", "hard", "easy", "hard"]
    assert seen["extra"] == ["metadata"]  # every other column, none of jalign's private keys
    np.testing.assert_array_equal(scores, [1.0, 0.0, 1.0, 1.0])
    assert metrics["rewards/check_columns/mean"] == 0.75
    assert metrics["rewards/positional_only/mean"] == 0.0 and metrics["reward"] == 0.75


def test_none_is_left_out_of_the_functions_mean_and_adds_nothing(tmp_path):
    records = _records(tmp_path)
    reward = _combined("none_for_hard", "check_columns", weights=[2.0, 1.0])
    scores, metrics = reward(records, [r["prompt"] for r in records], ["3", "8", "x", "x"],
                             [1] * 4)
    assert metrics["rewards/none_for_hard/mean"] == 0.5  # over the two easy rows only
    assert metrics["rewards/none_for_hard/std"] == 0.0
    np.testing.assert_allclose(scores, [2 * 0.5 + 1, 0 + 1, 2 * 0.5 + 0, 0 + 0])
    assert metrics["reward"] == pytest.approx(scores.mean())


@pytest.mark.parametrize("name, message", [
    ("raises_on_seven", r"reward function 'raises_on_seven' raised ZeroDivisionError: float division "
                        r"by zero on .*prompts.jsonl:2 \(prompt 'add: 7\+1='\)"),
    ("wrong_length", r"'wrong_length' returned 5 scores for 4 completions"),
    ("returns_text", r"'returns_text' returned 'good' \(str\) for .*prompts.jsonl:1; expected a "
                     r"float or None"),
    ("returns_nan", r"'returns_nan' returned nan for .*prompts.jsonl:1; return None for a sample"),
    ("returns_a_string", r"'returns_a_string' returned str, not a list of 4 floats"),
])
def test_a_failing_reward_function_is_named_with_its_row(tmp_path, name, message):
    records = _records(tmp_path)
    with pytest.raises(RewardFunctionError, match=message):
        _combined(name)(records, [r["prompt"] for r in records], ["1"] * 4, [1] * 4)


def test_a_column_the_function_needs_is_checked_at_setup(tmp_path):
    records = _records(tmp_path)
    reward = _combined("needs_missing_column")
    with pytest.raises(ValueError, match=r"reward function 'needs_missing_column' needs the "
                                         r"column 'solution', which data.jsonl does not have"):
        check_columns(reward.sources, list(reward_columns(records)), "data.jsonl")
    check_columns(_combined("check_columns").sources, list(reward_columns(records)), "x")


def test_unknown_sources_and_duplicates_are_named():
    with pytest.raises(ValueError, match="needs a built-in task"):
        build_sources(["gold"], [1.0], gold=None, reward_model=None)
    with pytest.raises(ValueError, match="names 'math_answer' twice"):
        build_sources(["math_answer", "math_answer"], [1.0, 1.0], gold=None, reward_model=None)
    with pytest.raises(ValueError, match="math_answer"):
        build_sources(["math_answr"], [1.0], gold=None, reward_model=None)


def test_builtin_math_verifier_on_a_task_equals_its_exact_match(tmp_path):
    task = get_task("add")
    rows = task.prompt_records(32, seed=0)
    records = prepare_prompt_records(rows, builtin_tokenizer(), max_prompt_length=32)
    reward = build_sources(["math_answer", "gold"], [1.0, 0.0], gold=task_gold_reward(task),
                           reward_model=None)
    completions = [r["answer"] if i % 3 else "0" for i, r in enumerate(rows)]
    scores, metrics = reward(records, [r["prompt"] for r in rows], completions, [2] * 32)
    gold = task.gold_reward([r["prompt"] for r in rows], completions)
    np.testing.assert_array_equal(scores, (gold == 1.0).astype(np.float32))
    assert metrics["rewards/gold/mean"] == pytest.approx(float(gold.mean()))


def test_prompts_are_rendered_tokenised_and_too_long_ones_named(tmp_path):
    rows = _rows() + [{"prompt": "add: " + "9" * 40 + "+1=", "answer": "0"}]
    records, _ = load_records(_write(tmp_path, rows), required_fields=("prompt",))
    tokenizer = builtin_tokenizer()
    with pytest.raises(DataError, match=r"prompts.jsonl:5: prompt is 49 tokens \(with BOS\), more "
                                        r"than config.data.max_prompt_length=32"):
        prepare_prompt_records(records, tokenizer, max_prompt_length=32)
    report = SkipReport()
    kept = prepare_prompt_records(records, tokenizer, max_prompt_length=32, on_bad_row="skip",
                                  skip_report=report)
    assert len(kept) == 4 and report.counts == {"prompt_too_long": 1}
    assert list(kept[0][PROMPT_IDS_KEY]) == [tokenizer.bos_id] + tokenizer.encode("add: 1+2=")


def test_prompt_dataset_yields_indices_and_resumes(tmp_path):
    records = _records(tmp_path)
    ds = make_prompt_dataset(records, batch_size=2, seed=0)
    it = iter(ds)
    first = [next(it)["prompt_index"].tolist() for _ in range(3)]
    assert all(len(b) == 2 for b in first) and sorted(first[0] + first[1]) == [0, 1, 2, 3]
    it = iter(ds)
    next(it)
    state = it.get_state()
    want = [next(it)["prompt_index"].tolist() for _ in range(2)]
    again = iter(ds)
    again.set_state(state)
    assert [next(again)["prompt_index"].tolist() for _ in range(2)] == want
    # Two processes split the prompts.
    shards = [next(iter(make_prompt_dataset(records, batch_size=2, seed=0, shard_index=i,
                                            shard_count=2)))["prompt_index"].tolist()
              for i in range(2)]
    assert sorted(shards[0] + shards[1]) == [0, 1, 2, 3]
