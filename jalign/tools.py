"""Tool use for multi-turn RL rollouts: schemas, call formats, a safe executor, an environment.

A tool is a plain Python function with type hints and a Google-style docstring;
`function_schema` turns it into the Hugging Face `tools` schema that chat
templates render. The policy calls a tool in one of `CALL_FORMATS`:

    hermes:  <tool_call>{"name":"calculator","arguments":{"expression":"2+2"}}</tool_call>
    llama3:  {"name":"calculator","parameters":{"expression":"2+2"}}

and `ToolEnvironment` parses each turn, runs the calls (with a timeout) and answers
with one `{"role": "tool"}` message per call. An episode ends on the first turn
that makes no call. Errors (bad JSON, unknown tool, a tool that raises or hangs)
become observations the model reads, never exceptions.

    env = ToolEnvironment(load_tools("calculator,python:mypkg.tools.search"))
"""

from __future__ import annotations

import ast
import collections.abc
import dataclasses
import importlib
import inspect
import json
import math
import operator
import re
import signal
import threading
import time
import types
import typing
from typing import Any, Callable, Mapping, Sequence

from jalign.environments import Environment, Episode

CALL_FORMATS = ("hermes", "llama3")

# ---------------------------------------------------------------------------- schemas

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean",
               dict: "object", list: "array", tuple: "array", type(None): "null"}
_SECTION = re.compile(r"^(Args|Arguments|Parameters|Returns|Yields|Raises|Examples?|Notes?)\s*:\s*$")
_ARG_LINE = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(summary: the text before the first section, {arg: description}) of a Google docstring."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary, args = [], {}
    i = 0
    while i < len(lines) and not _SECTION.match(lines[i].strip()):
        summary.append(lines[i].strip())
        i += 1
    while i < len(lines):
        header = _SECTION.match(lines[i].strip())
        i += 1
        in_args = bool(header) and header.group(1) in ("Args", "Arguments", "Parameters")
        current = None
        while i < len(lines) and not _SECTION.match(lines[i].strip()):
            line = lines[i]
            i += 1
            if not in_args or not line.strip():
                continue
            indent = len(line) - len(line.lstrip())
            match = _ARG_LINE.match(line.strip())
            if match and (current is None or indent <= args[current][0]):
                current = match.group(1).lstrip("*")
                args[current] = (indent, match.group(2).strip())
            elif current is not None:  # a continuation line, indented deeper
                args[current] = (args[current][0], f"{args[current][1]} {line.strip()}".strip())
    summary_text = " ".join(" ".join(summary).split())
    return summary_text, {name: text for name, (_, text) in args.items()}


def _hint_schema(hint: Any) -> dict | None:
    """JSON schema of a type hint, or None if it has no JSON equivalent."""
    origin, hint_args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if origin is typing.Literal:
        schema: dict[str, Any] = {}
        kinds = {type(value) for value in hint_args}
        if len(kinds) == 1 and next(iter(kinds)) in _JSON_TYPES:
            schema["type"] = _JSON_TYPES[next(iter(kinds))]
        schema["enum"] = list(hint_args)
        return schema
    if origin in (typing.Union, types.UnionType):
        members = [a for a in hint_args if a is not type(None)]
        schemas = [_hint_schema(a) for a in members]
        if any(s is None for s in schemas):
            return None
        if len(schemas) == 1:  # Optional[X] / X | None
            return schemas[0]
        if all(set(s) == {"type"} for s in schemas):
            return {"type": [s["type"] for s in schemas]}
        return None
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence):
        schema = {"type": "array"}
        if origin is tuple and len(hint_args) == 2 and hint_args[1] is Ellipsis:
            hint_args = hint_args[:1]
        if len(set(hint_args)) == 1:
            items = _hint_schema(hint_args[0])
            if items is None:
                return None
            schema["items"] = items
        return schema
    if origin in (dict, collections.abc.Mapping):
        return {"type": "object"}
    return None


def function_schema(fn: Callable) -> dict:
    """The Hugging Face tool schema of `fn` (the shape of transformers' `get_json_schema`).

    Args:
        fn: a function whose every parameter has a type hint; its docstring's summary
            becomes the description and its "Args:" section the parameter descriptions.

    Returns:
        {"type": "function", "function": {"name", "description", "parameters": {"type":
        "object", "properties": {arg: {"type", "description"}}, "required": [...]}}}.

    Raises:
        ValueError: a parameter without a type hint, with a hint JSON cannot express,
        or a *args / **kwargs parameter.
    """
    name = getattr(fn, "__name__", type(fn).__name__)
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # an annotation naming something undefined
        raise ValueError(f"function_schema({name}): cannot resolve its type hints: {e}") from e
    summary, arg_docs = _parse_docstring(inspect.getdoc(fn))
    properties, required = {}, []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ValueError(f"function_schema({name}): *args/**kwargs parameter "
                             f"'{param.name}' cannot be described as JSON")
        if param.name not in hints:
            raise ValueError(f"function_schema({name}): parameter '{param.name}' has no type hint")
        schema = _hint_schema(hints[param.name])
        if schema is None:
            raise ValueError(f"function_schema({name}): parameter '{param.name}' has an "
                             f"unsupported type hint {hints[param.name]!r}")
        if param.name in arg_docs:
            schema["description"] = arg_docs[param.name]
        properties[param.name] = schema
        if param.default is param.empty:
            required.append(param.name)
    return {"type": "function",
            "function": {"name": name, "description": summary,
                         "parameters": {"type": "object", "properties": properties,
                                        "required": required}}}

# ---------------------------------------------------------------------------- calculator

_MAX_DIGITS = 1000           # integer results beyond this are refused
_MAX_EXPRESSION_CHARS = 2000
_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
               ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv,
               ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _check_size(value: int | float) -> int | float:
    if not isinstance(value, (int, float)):  # e.g. (-8) ** 0.5 is complex
        raise ValueError("result is not a real number")
    if isinstance(value, int) and value.bit_length() > _MAX_DIGITS * 3.33:
        raise ValueError(f"result has more than {_MAX_DIGITS} digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("result is too large (not finite)")
    return value


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):
            raise ValueError(f"unsupported constant {node.value!r}")
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(left) > 1 and right > 0:
            # Estimate the size first: 9**9**9 must fail now, not after minutes of work.
            if right * math.log10(abs(left)) > _MAX_DIGITS:
                raise ValueError(f"exponent too large: the result would exceed {_MAX_DIGITS} digits")
        try:
            return _check_size(_BINARY_OPS[type(node.op)](left, right))
        except OverflowError as e:
            raise ValueError(f"result is too large ({e})") from e
    if isinstance(node, ast.Name):
        raise ValueError(f"names are not allowed (found '{node.id}')")
    if isinstance(node, ast.Call):
        raise ValueError("function calls are not allowed")
    if isinstance(node, ast.Attribute):
        raise ValueError("attribute access is not allowed")
    raise ValueError(f"unsupported syntax: {type(node).__name__}")


def _format_number(value: int | float) -> str:
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format(value, ".10g")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "(3 + 4) * 2".
    """
    if not isinstance(expression, str):
        raise TypeError(f"expression must be a string, got {type(expression).__name__}")
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {_MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"invalid expression: {e.msg}") from e
    except (RecursionError, MemoryError) as e:
        raise ValueError("expression is nested too deeply") from e
    try:
        return _format_number(_evaluate(tree))
    except RecursionError as e:
        raise ValueError("expression is nested too deeply") from e


BUILTIN_TOOLS: dict[str, Callable] = {"calculator": calculator}


def load_tools(spec: str) -> list[Callable]:
    """Tools named by a comma list: built-in names or "python:module.function"."""
    tools = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item.startswith("python:"):
            module_name, _, attr = item[len("python:"):].rpartition(".")
            if not module_name or not attr:
                raise ValueError(f"tool '{item}': expected python:module.function")
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:
                raise ValueError(f"tool '{item}': cannot import module '{module_name}': {e}") from e
            fn = getattr(module, attr, None)
            if fn is None:
                raise ValueError(f"tool '{item}': module '{module_name}' has no attribute '{attr}'")
            if not callable(fn):
                raise ValueError(f"tool '{item}': '{attr}' is not callable")
            tools.append(fn)
        elif item in BUILTIN_TOOLS:
            tools.append(BUILTIN_TOOLS[item])
        else:
            raise ValueError(f"unknown tool '{item}'; built-ins: {', '.join(sorted(BUILTIN_TOOLS))}"
                             " (or python:module.function)")
    return tools

# ---------------------------------------------------------------------------- call formats


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def format_tool_call(name: str, arguments: dict, fmt: str = "hermes") -> str:
    """The text by which a policy calls `name` in format `fmt` (compact JSON: fewer tokens)."""
    if fmt == "hermes":
        body = json.dumps({"name": name, "arguments": arguments}, separators=(",", ":"))
        return f"<tool_call>{body}</tool_call>"
    if fmt == "llama3":
        return json.dumps({"name": name, "parameters": arguments}, separators=(",", ":"))
    raise ValueError(f"unknown call format {fmt!r}; expected one of {CALL_FORMATS}")


def _call_from_json(obj: Any, args_keys: tuple[str, ...]) -> ToolCall | str:
    """A ToolCall from a decoded JSON body, or the error text for the model."""
    if not isinstance(obj, dict):
        return f"tool call must be a JSON object, got {type(obj).__name__}"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return 'tool call has no "name" string'
    key = next((k for k in args_keys if k in obj), None)
    if key is None:
        return f'tool call to {name!r} has no "{args_keys[0]}" object'
    arguments = obj[key]
    if isinstance(arguments, str):  # some models emit the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return f'tool call to {name!r}: "{key}" must be a JSON object'
    return ToolCall(name, arguments)


def _parse_hermes(text: str) -> tuple[list[ToolCall], list[str]]:
    calls, errors, pos = [], [], 0
    open_tag, close_tag = "<tool_call>", "</tool_call>"
    while (start := text.find(open_tag, pos)) != -1:
        body_start = start + len(open_tag)
        end = text.find(close_tag, body_start)
        if end == -1:
            errors.append(f"unclosed {open_tag} (expected {close_tag})")
            break
        pos = end + len(close_tag)
        try:
            obj = json.loads(text[body_start:end])
        except json.JSONDecodeError as e:
            errors.append(f"invalid JSON in {open_tag}: {e.msg} at character {e.pos}")
            continue
        call = _call_from_json(obj, ("arguments",))
        (calls if isinstance(call, ToolCall) else errors).append(call)
    return calls, errors


def _parse_llama3(text: str) -> tuple[list[ToolCall], list[str]]:
    text = text.strip().removeprefix("<|python_tag|>").strip()
    calls, errors, pos = [], [], 0
    if not text.startswith("{"):
        return calls, errors
    decoder = json.JSONDecoder()
    while pos < len(text):
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            errors.append(f"invalid JSON in tool call: {e.msg} at character {e.pos}")
            break
        call = _call_from_json(obj, ("parameters", "arguments"))
        (calls if isinstance(call, ToolCall) else errors).append(call)
        rest = text[pos:].lstrip()
        if not rest:
            break
        if not rest.startswith(";"):
            errors.append(f"unexpected text after tool call: {rest[:40]!r}")
            break
        pos = len(text) - len(rest) + 1
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return calls, errors


def parse_tool_calls(text: str, fmt: str = "hermes") -> tuple[list[ToolCall], list[str]]:
    """(calls found in `text`, parse errors as text the model will read)."""
    if fmt == "hermes":
        return _parse_hermes(text)
    if fmt == "llama3":
        return _parse_llama3(text)
    raise ValueError(f"unknown call format {fmt!r}; expected one of {CALL_FORMATS}")

# ---------------------------------------------------------------------------- execution


class _ToolTimeout(BaseException):
    """Raised inside a tool by SIGALRM; a BaseException so `except Exception` in a tool
    cannot swallow it."""


def _run_with_alarm(fn: Callable[[], Any], timeout_s: float) -> Any:
    armed = True

    def on_alarm(signum, frame):
        if armed:
            raise _ToolTimeout()

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    started = time.monotonic()
    try:
        return fn()
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM,
                      previous_handler if previous_handler is not None else signal.SIG_DFL)
        if previous_delay > 0:  # someone else's timer was running: give back what is left
            remaining = previous_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-6), previous_interval)


def _run_in_thread(fn: Callable[[], Any], timeout_s: float) -> Any:
    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True, name="jalign-tool")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():  # abandoned: a daemon thread cannot be killed
        raise _ToolTimeout()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _to_text(result: Any) -> str:
    if isinstance(result, (dict, list)):
        try:
            return json.dumps(result)
        except (TypeError, ValueError):
            pass
    return str(result)


class ToolExecutor:
    """Runs ToolCalls against named functions; `run` never raises for a bad call."""

    def __init__(self, tools: Sequence[Callable] | Mapping[str, Callable], timeout_s: float = 5.0):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        items = tools.items() if isinstance(tools, Mapping) else ((f.__name__, f) for f in tools)
        self.tools: dict[str, Callable] = {}
        for name, fn in items:
            if name in self.tools:
                raise ValueError(f"two tools are named '{name}'")
            self.tools[name] = fn
        self.timeout_s = timeout_s

    def run(self, call: ToolCall) -> tuple[str, bool]:
        """(result text, True) or (error text, False)."""
        fn = self.tools.get(call.name)
        if fn is None:
            available = ", ".join(self.tools) or "none"
            return f"error: unknown tool '{call.name}'; available: {available}", False
        try:
            bound = inspect.signature(fn).bind(**call.arguments)
        except TypeError as e:
            return f"error: bad arguments for {call.name}: {e}", False
        invoke = lambda: fn(*bound.args, **bound.kwargs)  # noqa: E731
        use_alarm = (hasattr(signal, "setitimer")
                     and threading.current_thread() is threading.main_thread())
        try:
            result = (_run_with_alarm if use_alarm else _run_in_thread)(invoke, self.timeout_s)
        except _ToolTimeout:
            return f"error: tool '{call.name}' timed out after {self.timeout_s:g} s", False
        except Exception as e:
            return f"error: {call.name} raised {type(e).__name__}: {e}", False
        return _to_text(result), True

# ---------------------------------------------------------------------------- environment


class ToolEnvironment(Environment):
    """Answers each tool call of the policy's turn; the first turn without a call ends the episode.

    Counts per episode: "tool_calls" (calls attempted, parse errors included) and
    "tool_errors" (calls that failed plus parse errors), reported as env/tool_calls, ...
    """

    observation_role = "tool"

    def __init__(self, tools: Sequence[Callable] | str, *, call_format: str = "hermes",
                 timeout_s: float = 5.0):
        if call_format not in CALL_FORMATS:
            raise ValueError(f"call_format {call_format!r} is not one of {CALL_FORMATS}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        functions = load_tools(tools) if isinstance(tools, str) else list(tools)
        self.call_format = call_format
        self.tools = [function_schema(fn) for fn in functions]
        self.executor = ToolExecutor(functions, timeout_s=timeout_s)

    def step(self, episodes: Sequence[Episode], completions: Sequence[str]):
        observations, rewards, done = [], [], []
        for episode, completion in zip(episodes, completions, strict=True):
            calls, errors = parse_tool_calls(completion, self.call_format)
            # Present on every episode, so the per-episode mean counts the ones without calls.
            episode.count("tool_calls", 0.0)
            episode.count("tool_errors", 0.0)
            rewards.append(None)
            if not calls and not errors:
                observations.append(None)
                done.append(True)
                continue
            messages = []
            for call in calls:
                content, ok = self.executor.run(call)
                messages.append({"role": "tool", "name": call.name, "content": content})
                episode.count("tool_calls")
                episode.count("tool_errors", 0.0 if ok else 1.0)
            for error in errors:
                messages.append({"role": "tool", "content": f"error: {error}"})
                episode.count("tool_calls")
                episode.count("tool_errors")
            observations.append(messages)
            done.append(False)
        return observations, rewards, done
