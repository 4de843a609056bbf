"""Built-in RLVR reward functions (jalign.rewards): hand-worked examples, the calling
convention and the spec resolver. Pure Python, no JAX."""

import sys
import types

import pytest

from jalign import rewards
from jalign.rewards import (BUILTIN_REWARDS, answers_equal, extract_answer, format_match,
                            length_penalty, math_answer_match, resolve, soft_overlong_penalty,
                            think_answer_format)


def score(completions, answers, **columns):
    return math_answer_match(["p"] * len(completions), completions, answer=answers, **columns)


# ---------------------------------------------------------------------- answer extraction

@pytest.mark.parametrize("text, expected", [
    (r"so the answer is \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\sqrt{\frac{a}{b}}} done", r"\sqrt{\frac{a}{b}}"),
    (r"first \boxed{3}, corrected: \boxed{5}", "5"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),                       # escaped braces are not groups
    (r"\boxed{[0, 1\}} and more", r"[0, 1\}"),
    (r"\boxed{7} then a truncated \boxed{\frac{1}{", "7"),     # unclosed box is skipped
    (r"\boxed {9}", "9"),
    (r"<answer>12</answer> but \boxed{13}", "13"),              # boxed wins over tags
    ("<think>hm</think><answer>a</answer><answer>\n b </answer>", "\n b "),
    ("<answer>x</answer> and later 99", "x"),                   # tags win over numbers
    ("we get 3 apples, then 1,250.5 pears.", "1,250.5"),
    ("it is -7", "-7"),
    ("3 - 2 = 1", "1"),
    ("the ratio is 3/4", "3/4"),
    (r"the answer is $\frac{1}{2}$.", r"\frac{1}{2}"),
    ("about .5 of them", ".5"),
    ("no digits here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---------------------------------------------------------------------- normalisation

@pytest.mark.parametrize("a, b", [
    ("0.5", "1/2"), (r"\frac{1}{2}", ".5"), (r"\dfrac{1}{2}", r"\tfrac{1}{2}"),
    ("3", "3.0"), ("3", " 3. "), ("1,000", "1000"), ("1{,}000,000", "1000000"),
    ("-1,234.5", "-1234.5"), ("+7", "7"), (r"-\frac{3}{4}", "-0.75"),
    (r"\frac{-3}{4}", "-3/4"), ("$5$", "5"), (r"\$5", "5"), ("2/4", "0.5"),
    ("0.3333333333", "1/3"),                                    # within rel. tol. 1e-9
    ("1e3", "1000"), ("x = 5", "5"), (r"k_{1}=2", "2"),
    (r"\left( 1, 2 \right)", "(1,2)"), (r"3\!\,\;000", "3000"),
    (r"\text{New   York}", "new york"), (r"\textbf{\text{Yes}}", "YES"),
    ("x + 1", "x+1"), (r"\sqrt{2}", r"\sqrt{ 2 }"),
])
def test_answers_equal(a, b):
    assert answers_equal(a, b)
    assert answers_equal(b, a)


@pytest.mark.parametrize("a, b", [
    ("2", "3"), ("0.333333", "1/3"), ("1,2", "12"), ("1/0", "0"), ("new york", "newyork"),
    (r"\frac{1}{2}", r"\frac{2}{1}"), ("-5", "5"), (r"\pi r", r"\pir"), ("", "0"),
    (r"\rightarrow", "arrow"),
])
def test_answers_differ(a, b):
    assert not answers_equal(a, b)


# ---------------------------------------------------------------------- math_answer_match

def test_math_answer_match_hand_worked():
    completions = [
        r"<think>1+1</think> so \boxed{2}",
        r"\boxed{\dfrac{1}{2}}",
        r"\boxed{3} no wait \boxed{4}",
        "We sell 1,000 units.",
        r"\boxed{\text{Paris}}",
        "I do not know.",
        r"\boxed{5}",
        r"\boxed{5}",
        r"\boxed{5}",
    ]
    answers = ["2", "0.5", "3", "1000", "paris", "7", None, "  ", 5]
    assert score(completions, answers) == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, None, None, 1.0]


def test_math_answer_match_gsm8k_reference():
    assert score(["so 72 clips", "so 70"], ["48 + 24 = 72.\n#### 72"] * 2) == [1.0, 0.0]


def test_math_answer_match_needs_answer_column():
    with pytest.raises(ValueError, match="'answer' column"):
        math_answer_match(["p"], ["1"])
    with pytest.raises(ValueError, match="2 'answer' values for 1 completions"):
        math_answer_match(["p"], ["1"], answer=["1", "2"])


# ---------------------------------------------------------------------- format

def test_think_answer_format():
    good = ["<think>\nstep 1\nstep 2\n</think>\n<answer>\n42\n</answer>",
            "  <think>a</think><answer>b</answer>\n"]
    bad = ["<think>a</think>", "<answer>b</answer>", "<think>a</think><answer>b</answer> extra",
           "preamble <think>a</think><answer>b</answer>", "<think>a<answer>b</answer>", ""]
    assert think_answer_format(["p"] * 8, good + bad) == [1.0, 1.0] + [0.0] * 6
    assert think_answer_format.__name__ == "think_answer_format"


def test_format_match_custom_pattern_is_full_match():
    fn = format_match(r"\d+")
    assert fn(["p"] * 3, ["123", " 45 ", "12a"]) == [1.0, 1.0, 0.0]


def test_format_match_invalid_pattern():
    with pytest.raises(ValueError, match=r"invalid format pattern '\(unclosed'"):
        format_match("(unclosed")


# ---------------------------------------------------------------------- length rewards

def test_soft_overlong_regions():
    fn = soft_overlong_penalty(max_completion_length=100, soft_cache_length=20)
    lengths = [0, 79, 80, 81, 90, 99, 100, 101, 500]
    expected = [0.0, 0.0, 0.0, -1 / 20, -0.5, -19 / 20, -1.0, -1.0, -1.0]
    assert fn(["p"] * 9, ["c"] * 9, completion_lengths=lengths) == pytest.approx(expected)


def test_soft_overlong_is_continuous_at_both_boundaries():
    fn = soft_overlong_penalty(100, 20)
    at_start, after_start, at_end, after_end = fn(
        ["p"] * 4, ["c"] * 4, completion_lengths=[80, 80 + 1e-9, 100, 100 + 1e-9])
    assert after_start == pytest.approx(at_start, abs=1e-6)
    assert after_end == pytest.approx(at_end, abs=1e-6) == -1.0


def test_soft_overlong_cache_equal_to_max():
    fn = soft_overlong_penalty(10, 10)
    assert fn(["p"] * 3, ["c"] * 3, completion_lengths=[0, 5, 10]) == [0.0, -0.5, -1.0]


@pytest.mark.parametrize("max_len, cache", [(100, 0), (100, -5), (100, 101)])
def test_soft_overlong_validates(max_len, cache):
    with pytest.raises(ValueError, match="0 < soft_cache_length <= max_completion_length"):
        soft_overlong_penalty(max_len, cache)


@pytest.mark.parametrize("fn", [soft_overlong_penalty(10, 5), length_penalty()])
def test_length_rewards_need_completion_lengths(fn):
    with pytest.raises(ValueError, match="trainer must pass the 'completion_lengths'"):
        fn(["p"], ["a long completion"])
    with pytest.raises(ValueError, match="1 'completion_lengths' values for 2 completions"):
        fn(["p"] * 2, ["a", "b"], completion_lengths=[3])


def test_length_penalty():
    fn = length_penalty(target_length=64, coef=0.01)
    out = fn(["p"] * 4, ["c"] * 4, completion_lengths=[0, 64, 65, 164])
    assert out == pytest.approx([0.0, 0.0, -0.01, -1.0])
    assert length_penalty(coef=2)(["p"], ["c"], completion_lengths=[3]) == [-6.0]
    with pytest.raises(ValueError, match="coef >= 0"):
        length_penalty(coef=-1.0)


# ---------------------------------------------------------------------- calling convention

@pytest.mark.parametrize("fn", [math_answer_match, think_answer_format,
                                soft_overlong_penalty(8, 4), length_penalty(2, 0.5)])
def test_calling_convention(fn):
    n = 5
    out = fn(prompts=["q"] * n, completions=[r"<think>t</think><answer>\boxed{1}</answer>"] * n,
             answer=["1"] * n, completion_lengths=[1, 3, 5, 7, 9],
             trainer_state=object(), solution=["x"] * n, unknown_column=list(range(n)))
    assert type(out) is list and len(out) == n
    assert all(type(r) is float for r in out)


# ---------------------------------------------------------------------- resolve

def test_resolve_builtins():
    assert resolve("math_answer") == ("math_answer", math_answer_match)
    assert resolve(" think_answer_format ") == ("think_answer_format", think_answer_format)
    name, fn = resolve("soft_overlong:max=512,cache=128")
    assert name == "soft_overlong"
    assert fn(["p"] * 2, ["c"] * 2, completion_lengths=[384, 448]) == [0.0, -0.5]
    name, fn = resolve("length_penalty: target = 64 , coef = 0.01")
    assert name == "length_penalty"
    assert fn(["p"], ["c"], completion_lengths=[164]) == pytest.approx([-1.0])
    name, fn = resolve("length_penalty")      # defaults: target 0, coef 1e-3
    assert fn(["p"], ["c"], completion_lengths=[1000]) == pytest.approx([-1.0])
    assert set(BUILTIN_REWARDS) == {"math_answer", "think_answer_format", "soft_overlong",
                                    "length_penalty", "tool_use"}


@pytest.mark.parametrize("spec, message", [
    ("math_answr", r"unknown reward 'math_answr' \(did you mean 'math_answer'\?\); valid: "
                   r"math_answer, think_answer_format, soft_overlong, length_penalty"),
    ("zzz", r"unknown reward 'zzz'; valid: math_answer"),
    ("soft_overlong", r"needs parameter\(s\) max, cache, e.g. 'soft_overlong:max=...,cache=...'"),
    ("soft_overlong:max=512", r"needs parameter\(s\) cache"),
    ("soft_overlong:max=512,cach=128", r"unknown parameter 'cach' for reward 'soft_overlong'; "
                                       r"valid: max, cache"),
    ("soft_overlong:max=abc,cache=1", r"parameter 'max' of reward 'soft_overlong' must be int, "
                                      r"got 'abc'"),
    ("soft_overlong:max=512,max=256,cache=1", r"parameter 'max' .* given once"),
    ("soft_overlong:max,cache=1", r"parameter 'max' .* given once as max=VALUE"),
    ("soft_overlong:max=64,cache=128", r"0 < soft_cache_length <= max_completion_length"),
    ("length_penalty:coef=lots", r"parameter 'coef' of reward 'length_penalty' must be float"),
    ("math_answer:strict=1", r"reward 'math_answer' takes no parameters"),
])
def test_resolve_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve(spec)


@pytest.fixture
def user_module(monkeypatch):
    module = types.ModuleType("my_user_rewards")

    def brevity(prompts, completions, **_):
        return [-float(len(c)) for c in completions]
    module.brevity = brevity
    module.not_callable = 3
    monkeypatch.setitem(sys.modules, "my_user_rewards", module)
    return module


def test_resolve_python(user_module):
    name, fn = resolve("python:my_user_rewards.brevity")
    assert (name, fn) == ("brevity", user_module.brevity)
    name, fn = resolve("python:jalign.rewards.math_answer_match")
    assert (name, fn) == ("math_answer_match", rewards.math_answer_match)


@pytest.mark.parametrize("spec, message", [
    ("python:no_such_module_xyz.fn", r"'python:no_such_module_xyz.fn': no module named "
                                     r"'no_such_module_xyz'"),
    ("python:jalign.no_such_sub.fn", r"no module named 'jalign.no_such_sub'"),
    ("python:my_user_rewards.missing", r"module 'my_user_rewards' has no function 'missing'"),
    ("python:my_user_rewards.not_callable", r"has no function 'not_callable'"),
    ("python:brevity", r"must name module.function"),
])
def test_resolve_python_errors(user_module, spec, message):
    with pytest.raises(ValueError, match=message):
        resolve(spec)


def test_resolve_python_keeps_errors_inside_the_module(monkeypatch, tmp_path):
    # A module that exists but fails its own import must not be reported as missing.
    (tmp_path / "broken_user_rewards.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        resolve("python:broken_user_rewards.fn")


def test_tool_use_pays_for_episodes_whose_calls_all_ran():
    from jalign.rewards import resolve
    name, fn = resolve("tool_use")
    ok = {"role": "tool", "content": "408"}
    failed = {"role": "tool", "content": "error: calculator raised ZeroDivisionError"}
    turns = [[ok], [ok, failed], [], [{"role": "user", "content": "error: not a tool"}]]
    conversations = [[{"role": "user", "content": "q"}, *t] for t in turns]
    assert name == "tool_use"
    assert fn(["q"] * 4, ["a"] * 4, conversation=conversations) == [1.0, 0.0, 0.0, 0.0]
    assert fn(["q"], ["a"]) == [None]  # single-turn samples: not scored
