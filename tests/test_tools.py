"""Tools for multi-turn rollouts: schemas, the calculator, call formats, the executor, the environment."""

import signal
import threading
import time
from typing import Literal, Optional

import pytest

from jalign.environments import Episode
from jalign.tools import (BUILTIN_TOOLS, CALL_FORMATS, ToolCall, ToolEnvironment, ToolExecutor,
                          calculator, format_tool_call, function_schema, load_tools,
                          parse_tool_calls)


def search(query: str, limit: int = 5, tags: Optional[list[int]] = None,
           mode: Literal["fast", "exact"] = "fast", scale: float | None = None,
           verbose: bool = False, filters: dict = None) -> str:
    """Search the index for documents.

    Longer text that is not the summary's first line
    but still part of the description.

    Args:
        query: the words to look for.
        limit: how many results to return,
            at most 100.
        tags (list[int]): tag ids to filter on.
        mode: "fast" or "exact".
        scale: a score multiplier.
        verbose: whether to explain.
        filters: extra field filters.

    Returns:
        The matching documents, one per line.
    """
    return query


def test_function_schema_of_a_documented_function():
    assert function_schema(search) == {
        "type": "function",
        "function": {
            "name": "search",
            "description": ("Search the index for documents. Longer text that is not the "
                            "summary's first line but still part of the description."),
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "the words to look for."},
                    "limit": {"type": "integer",
                              "description": "how many results to return, at most 100."},
                    "tags": {"type": "array", "items": {"type": "integer"},
                             "description": "tag ids to filter on."},
                    "mode": {"type": "string", "enum": ["fast", "exact"],
                             "description": '"fast" or "exact".'},
                    "scale": {"type": "number", "description": "a score multiplier."},
                    "verbose": {"type": "boolean", "description": "whether to explain."},
                    "filters": {"type": "object", "description": "extra field filters."},
                },
                "required": ["query"],
            },
        },
    }


def test_function_schema_refuses_missing_or_unsupported_hints():
    def no_hint(a: int, b) -> int:
        """Add."""
        return a

    def bad_hint(a: int, b: object) -> int:
        """Add."""
        return a

    with pytest.raises(ValueError, match=r"no_hint.*parameter 'b' has no type hint"):
        function_schema(no_hint)
    with pytest.raises(ValueError, match=r"bad_hint.*parameter 'b' has an unsupported"):
        function_schema(bad_hint)


@pytest.mark.parametrize("expression, expected", [
    ("2 + 3 * 4", "14"), ("(2 + 3) * 4", "20"), ("2131 * 2127 - 360", "4532277"),
    ("7 / 2", "3.5"), ("7 // 2", "3"), ("-7 % 3", "2"), ("2 ** 10", "1024"),
    ("-3 ** 2", "-9"), ("--4", "4"), ("1 / 3", "0.3333333333"), ("6.0 / 2", "3"),
    ("0.1 + 0.2", "0.3"), ("2 ** -1", "0.5"), ("10 ** 30", "1" + "0" * 30),
])
def test_calculator_values(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize("expression, message", [
    ("x + 1", "names are not allowed"), ("abs(-1)", "function calls are not allowed"),
    ("__import__('os').system('true')", "function calls are not allowed"),
    ("(1).real", "attribute access is not allowed"), ("'a' * 3", "unsupported constant"),
    ("1 +", "invalid expression"), ("2 < 3", "unsupported syntax"),
    ("(-8) ** 0.5", "not a real number"), ("10.0 ** 400", "too large"),
])
def test_calculator_refusals(expression, message):
    with pytest.raises(ValueError, match=message):
        calculator(expression)


def test_calculator_huge_power_fails_fast():
    started = time.monotonic()
    for expression in ("9 ** 9 ** 9", "2 ** 100000", "(10 ** 600) * (10 ** 600)"):
        with pytest.raises(ValueError, match="digits"):
            calculator(expression)
    assert time.monotonic() - started < 1.0
    with pytest.raises(ZeroDivisionError):
        calculator("1 / (2 - 2)")


def test_load_tools():
    assert load_tools("calculator") == [calculator]
    assert load_tools(" calculator , python:tests.test_tools.search") == [calculator, search]
    assert BUILTIN_TOOLS == {"calculator": calculator}
    with pytest.raises(ValueError, match="unknown tool 'nope'"):
        load_tools("calculator,nope")
    with pytest.raises(ValueError, match="python:no_such_module.fn.*cannot import"):
        load_tools("python:no_such_module.fn")
    with pytest.raises(ValueError, match="python:json.nope.*no attribute 'nope'"):
        load_tools("python:json.nope")
    with pytest.raises(ValueError, match="'__doc__' is not callable"):
        load_tools("python:json.__doc__")


def test_call_formats_round_trip():
    assert CALL_FORMATS == ("hermes", "llama3")
    args = {"expression": "2 + 2", "n": [1, 2]}
    assert format_tool_call("calculator", args) == (
        '<tool_call>{"name":"calculator","arguments":{"expression":"2 + 2","n":[1,2]}}</tool_call>')
    assert format_tool_call("calculator", args, "llama3") == (
        '{"name":"calculator","parameters":{"expression":"2 + 2","n":[1,2]}}')
    for fmt in CALL_FORMATS:
        text = format_tool_call("calculator", args, fmt)
        assert parse_tool_calls(text, fmt) == ([ToolCall("calculator", args)], [])
        assert parse_tool_calls("The answer is 4.", fmt) == ([], [])
    two = ("Let me compute. " + format_tool_call("a", {"x": 1}) + "\nand "
           + format_tool_call("b", {}) + " done")
    assert parse_tool_calls(two, "hermes") == ([ToolCall("a", {"x": 1}), ToolCall("b", {})], [])
    llama = '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {}}'
    assert parse_tool_calls(llama, "llama3") == ([ToolCall("a", {"x": 1}), ToolCall("b", {})], [])
    # Arguments given as a JSON string holding an object are accepted.
    as_string = '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>'
    assert parse_tool_calls(as_string, "hermes") == ([ToolCall("a", {"x": 1})], [])


def test_malformed_calls_are_errors_not_exceptions():
    calls, errors = parse_tool_calls('<tool_call>{"name": "a", </tool_call>', "hermes")
    assert calls == [] and len(errors) == 1 and errors[0].startswith("invalid JSON in <tool_call>")
    good = format_tool_call("a", {})
    assert parse_tool_calls(good + ' <tool_call>{"name": "b"', "hermes") == (
        [ToolCall("a", {})], ["unclosed <tool_call> (expected </tool_call>)"])
    assert parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>', "hermes") == (
        [], ['tool call has no "name" string'])
    assert parse_tool_calls('<tool_call>{"name": "a"}</tool_call>', "hermes") == (
        [], ["tool call to 'a' has no \"arguments\" object"])
    assert parse_tool_calls('<tool_call>[1]</tool_call>', "hermes") == (
        [], ["tool call must be a JSON object, got list"])
    calls, errors = parse_tool_calls('{"name": "a", "parameters": {}} and more', "llama3")
    assert calls == [ToolCall("a", {})] and errors == ["unexpected text after tool call: 'and more'"]
    calls, errors = parse_tool_calls('{"name": "a", "parameters": ', "llama3")
    assert calls == [] and errors[0].startswith("invalid JSON in tool call")
    with pytest.raises(ValueError, match="hermes"):
        parse_tool_calls("", "xml")


def _boom(x: int) -> int:
    """Fail."""
    raise RuntimeError(f"bad {x}")


def _slow(x: int) -> int:
    """Sleep."""
    time.sleep(5)
    return x


def _lookup(key: str) -> dict:
    """Return a record."""
    return {"key": key, "values": [1, 2]}


def test_executor_results_and_errors():
    executor = ToolExecutor([calculator, _boom, _lookup], timeout_s=2.0)
    assert executor.run(ToolCall("calculator", {"expression": "2*3"})) == ("6", True)
    assert executor.run(ToolCall("_lookup", {"key": "k"})) == ('{"key": "k", "values": [1, 2]}', True)
    assert executor.run(ToolCall("calculator", {"expression": "1/0"})) == (
        "error: calculator raised ZeroDivisionError: division by zero", False)
    assert executor.run(ToolCall("_boom", {"x": 3})) == (
        "error: _boom raised RuntimeError: bad 3", False)
    assert executor.run(ToolCall("foo", {})) == (
        "error: unknown tool 'foo'; available: calculator, _boom, _lookup", False)
    assert executor.run(ToolCall("calculator", {"expression": "1", "expr": "1"})) == (
        "error: bad arguments for calculator: got an unexpected keyword argument 'expr'", False)
    assert executor.run(ToolCall("calculator", {})) == (
        "error: bad arguments for calculator: missing a required argument: 'expression'", False)
    with pytest.raises(ValueError, match="timeout_s"):
        ToolExecutor([calculator], timeout_s=0)


def test_executor_timeout_in_main_thread_restores_the_alarm():
    previous = signal.getsignal(signal.SIGALRM)
    executor = ToolExecutor([_slow], timeout_s=0.2)
    started = time.monotonic()
    assert executor.run(ToolCall("_slow", {"x": 1})) == (
        "error: tool '_slow' timed out after 0.2 s", False)
    assert time.monotonic() - started < 1.0
    assert signal.getsignal(signal.SIGALRM) is previous
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_executor_timeout_outside_the_main_thread():
    executor = ToolExecutor([_slow, calculator], timeout_s=0.2)
    results = {}

    def worker():
        started = time.monotonic()
        results["slow"] = executor.run(ToolCall("_slow", {"x": 1}))
        results["seconds"] = time.monotonic() - started
        results["calc"] = executor.run(ToolCall("calculator", {"expression": "1/0"}))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(5)
    assert results["slow"] == ("error: tool '_slow' timed out after 0.2 s", False)
    assert results["seconds"] < 1.0
    assert results["calc"] == ("error: calculator raised ZeroDivisionError: division by zero", False)


def test_tool_environment_step():
    env = ToolEnvironment([calculator])
    assert env.observation_role == "tool"
    assert env.tools == [function_schema(calculator)]
    episodes = [Episode(row={"prompt": "p"}, messages=[]) for _ in range(3)]
    completions = [
        "I will compute. " + format_tool_call("calculator", {"expression": "12*12"})
        + format_tool_call("calculator", {"expression": "1/0"}),
        '<tool_call>{"name": "calculator", "arguments": {"expression": </tool_call>',
        "The answer is 144.",
    ]
    observations, rewards, done = env.step(episodes, completions)
    assert done == [False, False, True]
    assert rewards == [None, None, None]
    assert observations[0] == [
        {"role": "tool", "name": "calculator", "content": "144"},
        {"role": "tool", "name": "calculator",
         "content": "error: calculator raised ZeroDivisionError: division by zero"}]
    assert len(observations[1]) == 1 and observations[1][0]["role"] == "tool"
    assert observations[1][0]["content"].startswith("error: invalid JSON in <tool_call>")
    assert observations[2] is None
    assert [e.stats for e in episodes] == [{"tool_calls": 2.0, "tool_errors": 1.0},
                                          {"tool_calls": 1.0, "tool_errors": 1.0},
                                          {"tool_calls": 0.0, "tool_errors": 0.0}]


def test_tool_environment_llama3_and_validation():
    env = ToolEnvironment("calculator", call_format="llama3", timeout_s=1.0)
    episode = Episode(row={}, messages=[])
    observations, _, done = env.step([episode], ['{"name":"calc","parameters":{}}'])
    assert done == [False]
    assert observations == [[{"role": "tool", "name": "calc",
                              "content": "error: unknown tool 'calc'; available: calculator"}]]
    with pytest.raises(ValueError, match=r"'hermes', 'llama3'"):
        ToolEnvironment([calculator], call_format="xml")
    with pytest.raises(ValueError, match="timeout_s"):
        ToolEnvironment([calculator], timeout_s=-1)
