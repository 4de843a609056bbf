"""Built-in reward functions for RL with verifiable rewards (RLVR).

Every function follows TRL's GRPOTrainer calling convention:

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

`prompts[i]`, `completions[i]` and `columns[name][i]` belong to sample i (the
columns are the dataset row's other fields, e.g. `answer`, plus
`completion_lengths`, the number of generated tokens, from jalign's trainer).
Unknown columns are ignored. `None` means "this function cannot score this
sample" and is left out of that function's mean.

    name, fn = resolve("soft_overlong:max=512,cache=128")
    rewards = fn(prompts, completions, completion_lengths=lengths)
"""

from __future__ import annotations

import difflib
import importlib
import re
from fractions import Fraction
from typing import Any, Callable, Sequence

RewardFn = Callable[..., list]

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A number in free text: an integer fraction (\frac{a}{b}, a/b), thousands-grouped or plain.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\\[dt]?frac\{-?\d+\}\{-?\d+\}"
                     r"|\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+/\d+|\d*\.?\d+)")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?")
_FRACTION = re.compile(r"(-?)(?:\\frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)/(-?\d+))")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_ASSIGNMENT = re.compile(r"^[a-z](?:_\{?\w+\}?)?\s*=\s*(?=\S)")
_DROPPED = re.compile(r"\\(?:left|right)(?![a-zA-Z])|\\[!,;:$]|\$")
_REL_TOL = Fraction(1, 10**9)


def _balanced_group(text: str, start: int) -> int | None:
    """Index just past the '}' matching the '{' before `start`; None if unclosed."""
    depth, i = 1, start
    while i < len(text):
        c = text[i]
        if c == "\\":  # an escaped brace (\{ \}) does not count
            i += 2
            continue
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return i + 1
        i += 1
    return None


def extract_answer(text: str) -> str | None:
    """The final answer a completion states, or None when it states none.

    In order of preference: the content of the last complete `\\boxed{...}` (braces
    matched, so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`; a truncated one is
    skipped); else the content of the last `<answer>...</answer>`; else the last
    number in the text (`1,000`, `-2.5`, `.5`, or an integer fraction `3/4` or
    `\\frac{3}{4}`).
    """
    for match in reversed(list(_BOXED.finditer(text))):
        end = _balanced_group(text, match.end())
        if end is not None:
            return text[match.end():end - 1]
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """Canonical text of an answer; the rules are listed in `answers_equal`."""
    s = answer
    for _ in range(3):  # nested wrappers such as \text{\mathrm{m}}
        s = _TEXT_WRAPPER.sub(r"\1", s)
    s = _DROPPED.sub("", s)
    s = s.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac").replace("{,}", ",")
    s = " ".join(s.split()).lower()
    s = s.rstrip(".").strip()
    s = _ASSIGNMENT.sub("", s)
    if s.startswith("+"):
        s = s[1:].lstrip()
    # Whitespace only separates words; around symbols it carries nothing (x + 1 == x+1).
    s = re.sub(r"(?<!\w) | (?!\w)", "", s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def _as_number(s: str) -> Fraction | None:
    """The exact value of a normalised numeric answer, or None if it is not one."""
    if _DECIMAL.fullmatch(s):
        return Fraction(s)
    m = _FRACTION.fullmatch(s)
    if not m or int(m[3] or m[5]) == 0:
        return None
    value = Fraction(int(m[2] or m[4]), int(m[3] or m[5]))
    return -value if m[1] else value


def answers_equal(predicted: str, reference: str) -> bool:
    """Whether two final answers agree after normalisation.

    Both sides: `\\text{..}`/`\\textbf`/`\\mathrm`/`\\mbox` unwrapped; `$`, `\\$`,
    `\\left`, `\\right` and the spacing commands `\\! \\, \\; \\:` removed;
    `\\dfrac`/`\\tfrac` -> `\\frac`; whitespace collapsed and lower-cased; trailing `.`,
    a leading `+` and a leading single-variable assignment (`x = `) removed; spaces
    kept only between two word characters; thousands separators (`1,000`, `1{,}000`)
    removed. Numbers (decimals, `a/b`, `\\frac{a}{b}` with integers a, b) compare by
    exact value within a relative tolerance of 1e-9; anything else compares as text.
    """
    a, b = normalize_answer(predicted), normalize_answer(reference)
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        return abs(x - y) <= _REL_TOL * max(abs(x), abs(y))
    return a == b


def _column(values: Sequence | None, name: str, n: int, fn_name: str) -> Sequence:
    if values is None:
        raise ValueError(f"{fn_name} needs the {name!r} column")
    if len(values) != n:
        raise ValueError(f"{fn_name}: {len(values)} {name!r} values for {n} completions")
    return values


def math_answer_match(prompts: Sequence[str], completions: Sequence[str],
                      answer: Sequence[Any] | None = None, **_) -> list[float | None]:
    """1.0 if the completion's final answer equals the reference `answer`, else 0.0.

    r_i = [answers_equal(extract_answer(completion_i), reference_i)]: the exact-match
    correctness reward of RLVR (Lambert et al. 2024, Tulu 3, arXiv:2411.15124;
    DeepSeek-AI 2025, DeepSeek-R1, arXiv:2501.12948). A completion with no
    extractable answer scores 0.0; a missing or empty reference gives None. A
    reference holding a GSM8K-style rationale (`... #### 72`) is reduced to the
    text after its last `####`.
    """
    del prompts
    refs = _column(answer, "answer", len(completions), "math_answer_match")
    rewards: list[float | None] = []
    for completion, ref in zip(completions, refs):
        ref = "" if ref is None else str(ref).rpartition("####")[2]
        if not ref.strip():
            rewards.append(None)
            continue
        predicted = extract_answer(completion)
        rewards.append(float(predicted is not None and answers_equal(predicted, ref)))
    return rewards


THINK_ANSWER_PATTERN = r"^<think>.*?</think>\s*<answer>.*?</answer>$"


def format_match(pattern: str = THINK_ANSWER_PATTERN) -> RewardFn:
    """A reward of 1.0 when the whole stripped completion matches `pattern`, else 0.0.

    r_i = [re.fullmatch(pattern, completion_i.strip(), re.DOTALL)]. The default is the
    DeepSeek-R1 template's format reward (arXiv:2501.12948, section 2.2.2): reasoning
    in <think>..</think>, then the answer in <answer>..</answer>.

    Raises:
      ValueError: `pattern` is not a valid regular expression.
    """
    try:
        regex = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"invalid format pattern {pattern!r}: {e}") from None

    def format_reward(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
        return [float(regex.fullmatch(c.strip()) is not None) for c in completions]
    return format_reward


think_answer_format = format_match()
think_answer_format.__name__ = "think_answer_format"


def _lengths(completions: Sequence[str], completion_lengths, fn_name: str) -> list[float]:
    if completion_lengths is None:
        raise ValueError(f"{fn_name} needs token counts: the trainer must pass the "
                         "'completion_lengths' column (generated tokens per completion)")
    return [float(n) for n in _column(completion_lengths, "completion_lengths",
                                    len(completions), fn_name)]


def soft_overlong_penalty(max_completion_length: int, soft_cache_length: int) -> RewardFn:
    """DAPO's soft overlong punishment on the completion length L in tokens.

    With Lmax = max_completion_length and Lcache = soft_cache_length:
      r = 0                          if L <= Lmax - Lcache
      r = (Lmax - Lcache - L) / Lcache  if Lmax - Lcache < L <= Lmax
      r = -1                         if L > Lmax
    continuous at both edges: the "soft overlong punishment" of Yu et al. 2025, DAPO
    (arXiv:2503.14476). Needs the `completion_lengths` column.

    Raises:
      ValueError: unless 0 < soft_cache_length <= max_completion_length.
    """
    if not 0 < soft_cache_length <= max_completion_length:
        raise ValueError("soft_overlong_penalty needs 0 < soft_cache_length <= "
                         f"max_completion_length, got {soft_cache_length}, {max_completion_length}")
    start = max_completion_length - soft_cache_length

    def soft_overlong(prompts: Sequence[str], completions: Sequence[str], *,
                      completion_lengths: Sequence[int] | None = None, **_) -> list[float]:
        lengths = _lengths(completions, completion_lengths, "soft_overlong_penalty")
        return [0.0 if n <= start else -1.0 if n > max_completion_length
                else (start - n) / soft_cache_length for n in lengths]
    return soft_overlong


def length_penalty(target_length: int = 0, coef: float = 1e-3) -> RewardFn:
    """A linear penalty on tokens beyond a target length.

    r = -coef * max(0, L - target_length), L the completion length in tokens, so
    `coef` is the reward lost per excess token; target_length=0 gives the plain
    -coef * L. Counters the length bias of reward models and RL (Singhal et al. 2023,
    "A Long Way to Go", arXiv:2310.03716). Needs the `completion_lengths` column.

    Raises:
      ValueError: a negative target_length or coef.
    """
    if target_length < 0 or coef < 0:
        raise ValueError(f"length_penalty needs target_length >= 0 and coef >= 0, "
                         f"got {target_length} and {coef}")

    def length_reward(prompts: Sequence[str], completions: Sequence[str], *,
                      completion_lengths: Sequence[int] | None = None, **_) -> list[float]:
        lengths = _lengths(completions, completion_lengths, "length_penalty")
        return [0.0 - coef * max(0, n - target_length) for n in lengths]
    return length_reward


def tool_use(prompts: Sequence[str], completions: Sequence[str], *,
             conversation: Sequence | None = None, **_) -> list[float | None]:
    """1.0 when a multi-turn episode called a tool and every call succeeded, else 0.0.

    Reads the `conversation` column a multi-turn rollout passes (jalign.algorithms.episodes):
    the episode's `tool` messages, where a failed call (malformed, unknown tool, a tool
    that raised or timed out) reads "error: ..." (jalign.tools.ToolExecutor). A shaping
    term for tool use (weight it below the task's reward): it pays for calling tools
    well, not for answering right. None for a sample without a conversation.
    """
    conversations = conversation if conversation is not None else [None] * len(completions)
    out: list[float | None] = []
    for messages in conversations:
        if messages is None:
            out.append(None)
            continue
        results = [m.get("content", "") for m in messages if m.get("role") == "tool"]
        out.append(float(bool(results) and not any(str(r).startswith("error:")
                                                    for r in results)))
    return out


# Reward functions by name; for the names in _PARAMS, the factory that builds one.
BUILTIN_REWARDS: dict[str, Callable] = {
    "math_answer": math_answer_match,
    "think_answer_format": think_answer_format,
    "soft_overlong": soft_overlong_penalty,
    "length_penalty": length_penalty,
    "tool_use": tool_use,
}
# Spec parameter -> (factory keyword, type, required).
_PARAMS: dict[str, dict[str, tuple[str, type, bool]]] = {
    "soft_overlong": {"max": ("max_completion_length", int, True),
                      "cache": ("soft_cache_length", int, True)},
    "length_penalty": {"target": ("target_length", int, False), "coef": ("coef", float, False)},
}


def _parse_params(name: str, text: str) -> dict[str, Any]:
    valid, kwargs = _PARAMS[name], {}
    for item in text.split(",") if text else ():
        key, eq, value = (part.strip() for part in item.partition("="))
        if key not in valid:
            raise ValueError(f"unknown parameter {key!r} for reward {name!r}; "
                             f"valid: {', '.join(valid)}")
        kwarg, kind, _ = valid[key]
        if not eq or kwarg in kwargs:
            raise ValueError(f"parameter {key!r} of reward {name!r} must be given once "
                             f"as {key}=VALUE")
        try:
            kwargs[kwarg] = kind(value)
        except ValueError:
            raise ValueError(f"parameter {key!r} of reward {name!r} must be "
                             f"{kind.__name__}, got {value!r}") from None
    missing = [key for key, (kwarg, _, required) in valid.items()
               if required and kwarg not in kwargs]
    if missing:
        example = ",".join(f"{key}=..." for key in valid)
        raise ValueError(f"reward {name!r} needs parameter(s) {', '.join(missing)}, "
                         f"e.g. '{name}:{example}'")
    return kwargs


def _import_reward(path: str) -> tuple[str, RewardFn]:
    module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward 'python:{path}' must name module.function")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(f"reward 'python:{path}': no module named {e.name!r}") from None
        raise  # the module exists but one of its own imports is missing
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ValueError(f"reward 'python:{path}': module {module_name!r} "
                         f"has no function {attr!r}")
    return getattr(fn, "__name__", attr), fn


def resolve(spec: str) -> tuple[str, RewardFn]:
    """The (metric name, reward function) a reward spec names.

    Specs:
      "NAME"                     a built-in (`BUILTIN_REWARDS`) with its defaults;
      "NAME:key=value,key=value" a built-in factory with parameters:
                                   soft_overlong: max (int), cache (int), both required;
                                   length_penalty: target (int), coef (float);
      "python:module.function"   a user function, imported.
    The name is the built-in's short name or the function's __name__; metrics are
    logged as rewards/<name>/mean.

    Raises:
      ValueError: an unknown name (with the valid ones and a close match), an unknown
        or malformed parameter, or a module or function that cannot be found.
    """
    spec = spec.strip()
    if spec.startswith("python:"):
        return _import_reward(spec[len("python:"):].strip())
    name, colon, params = (part.strip() for part in spec.partition(":"))
    if name not in BUILTIN_REWARDS:
        close = difflib.get_close_matches(name, BUILTIN_REWARDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown reward {name!r}{hint}; valid: {', '.join(BUILTIN_REWARDS)}, "
                         "or python:module.function")
    if name in _PARAMS:
        return name, BUILTIN_REWARDS[name](**_parse_params(name, params))
    if colon:
        raise ValueError(f"reward {name!r} takes no parameters, got {params!r}")
    return name, BUILTIN_REWARDS[name]


__all__ = [
    "BUILTIN_REWARDS", "THINK_ANSWER_PATTERN", "answers_equal", "extract_answer",
    "format_match", "length_penalty", "math_answer_match", "normalize_answer", "resolve",
    "soft_overlong_penalty", "think_answer_format", "tool_use",
]
