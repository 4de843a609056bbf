"""The calc task: chat-message records, exact gold reward, tool-using demonstrations."""

import numpy as np
import pytest

from jalign.data.sft import fit_prompt_completion
from jalign.tasks import AddTask, get_task
from jalign.tokenizer import builtin_tokenizer
from jalign.tools import BUILTIN_TOOLS, format_tool_call

PROMPT = "4821*937="
PRODUCT = "4517277"
MESSAGES = [{"role": "user", "content": PROMPT}]
TOOL_CALL = ('<tool_call>{"name":"calculator","arguments":{"expression":"4821*937"}}'
             '</tool_call>')


def _conversation(final):
    return [{"role": "assistant", "content": TOOL_CALL},
            {"role": "tool", "content": PRODUCT},
            {"role": "assistant", "content": final}]


def test_declares_its_environment_and_tool():
    task = get_task("calc")
    assert (task.environment, task.tools) == ("tools", "calculator")
    assert (AddTask.environment, AddTask.tools) == ("", "")
    assert task.max_completion_chars == len(format_tool_call(
        "calculator", {"expression": "9999*9999"})) == 83


def test_prompts_and_records():
    task = get_task("calc")
    assert task.reference(PROMPT) == task.reference(MESSAGES) == PRODUCT
    records = task.prompt_records(200, seed=0)
    for record, prompt in zip(records, task.prompts(200, seed=0)):
        assert record == {"prompt": [{"role": "user", "content": prompt}],
                          "answer": task.reference(prompt)}
        a, b = prompt.removesuffix("=").split("*")
        assert 3 <= len(a) <= 4 and 3 <= len(b) <= 4
        assert a == str(int(a)) and b == str(int(b))
        assert record["answer"] == str(int(a) * int(b))
    for prompt in get_task("calc", min_digits=2, max_digits=2).prompts(50, seed=0):
        assert [len(x) for x in prompt.removesuffix("=").split("*")] == [2, 2]
    for bad in ("4821*937", "4821+937=", [{"role": "assistant", "content": PROMPT}]):
        with pytest.raises(ValueError, match="not a 'calc' prompt"):
            task.reference(bad)
    with pytest.raises(ValueError, match="min_digits"):
        get_task("calc", min_digits=5, max_digits=4)


@pytest.mark.parametrize("completion, expected", [
    (PRODUCT, 1.0),
    (f" {PRODUCT}\n", 1.0),          # Exact after strip.
    ("4517276", 0.0),                # No partial credit.
    ("45172770", 0.0),
    (TOOL_CALL, 0.0),                # A tool call is not an answer.
    ("", 0.0),
    (None, 0.0),
    (_conversation(PRODUCT), 1.0),   # The final assistant turn counts...
    (_conversation("4517276"), 0.0),
    (_conversation(PRODUCT)[:2], 0.0),  # ...even when it is the tool call.
])
def test_gold_reward_is_exact_success(completion, expected):
    task = get_task("calc")
    for prompt in (PROMPT, MESSAGES):
        rewards = task.gold_reward([prompt], [completion])
        assert rewards.dtype == np.float32
        assert rewards[0] == expected


def test_demonstrations_call_the_calculator_with_probability_quality():
    task = get_task("calc")
    calculator = BUILTIN_TOOLS["calculator"]
    good = task.demonstrations(300, seed=0, quality=1.0)
    for demo in good:
        expression = demo["prompt"][0]["content"].removesuffix("=")
        product = task.reference(demo["prompt"])
        assert demo["completion"] == [
            {"role": "assistant",
             "content": format_tool_call("calculator", {"expression": expression})},
            {"role": "tool", "content": calculator(expression=expression)},
            {"role": "assistant", "content": product}]
        assert calculator(expression=expression) == product
    bad = task.demonstrations(300, seed=0, quality=0.0)
    assert [d["prompt"] for d in bad] == [d["prompt"] for d in good]
    for demo in bad:
        [turn] = demo["completion"]
        assert turn["role"] == "assistant" and "tool_call" not in turn["content"]
        assert turn["content"].isdigit()
    prompts = [d["prompt"] for d in good]
    np.testing.assert_array_equal(task.gold_reward(prompts, [d["completion"] for d in good]), 1.0)
    np.testing.assert_array_equal(task.gold_reward(prompts, [d["completion"] for d in bad]), 0.0)
    # Near misses stay close: mostly the right length (a lost row may cost digits).
    lengths = [len(d["completion"][0]["content"]) - len(task.reference(d["prompt"])) for d in bad]
    assert max(np.abs(lengths)) <= 2 and np.mean(np.equal(lengths, 0)) > 0.5
    mixed = task.demonstrations(1000, seed=0, quality=0.5)
    assert abs(np.mean([len(d["completion"]) == 3 for d in mixed]) - 0.5) < 0.05


def test_demonstrations_render_with_the_builtin_chat_template():
    tok = builtin_tokenizer()
    task = get_task("calc")
    example, cuts = fit_prompt_completion(MESSAGES, _conversation(PRODUCT), tok, max_length=512)
    assert tok.decode(example["tokens"], skip_special_tokens=False) == (
        f"<bos>user: {PROMPT}\nassistant: {TOOL_CALL}<eos>\ntool: {PRODUCT}\n"
        f"assistant: {PRODUCT}<eos>\n")
    assert len(example["tokens"]) == 146 and not cuts.completion_truncated
    prompt_tokens = len(f"<bos>user: {PROMPT}\nassistant: ") - len("<bos>") + 1
    # Trained: the tool call and the answer, each with its EOS; not the tool's result, nor
    # the framing between the turns.
    call, observation = len(TOOL_CALL) + 1, len(f"\ntool: {PRODUCT}\nassistant: ")
    answer = len(PRODUCT) + 1
    assert example["loss_mask"].tolist() == ([0] * prompt_tokens + [1] * call
                                             + [0] * observation + [1] * answer + [0])
    lengths = []
    for demo in task.demonstrations(200, seed=0, quality=0.5):
        example, cuts = fit_prompt_completion(demo["prompt"], demo["completion"], tok,
                                              max_length=150)
        assert not cuts.completion_truncated and not cuts.end_of_turn_lost
        lengths.append(len(example["tokens"]))
    # A tool-call demonstration of two 4-digit operands is 150 characters.
    assert max(lengths) == 150 and min(lengths) < 45
