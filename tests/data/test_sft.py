"""tokenize_prompt_completion: layout, masks and truncation."""

import numpy as np
import pytest

from jalign.data import DataError, PromptTooLongError, tokenize_prompt_completion


def ids(tokenizer, text):
    return list(tokenizer.encode(text))


def test_layout_and_mask(tokenizer):
    out = tokenize_prompt_completion("Q: 2+2?", " 4", tokenizer, max_length=64)
    prompt, completion = ids(tokenizer, "Q: 2+2?"), ids(tokenizer, " 4")
    expected = [tokenizer.bos_id] + prompt + completion + [tokenizer.eos_id]
    np.testing.assert_array_equal(out["tokens"], expected)
    np.testing.assert_array_equal(
        out["loss_mask"], [0] * (1 + len(prompt)) + [1] * (len(completion) + 1))
    assert out["tokens"].dtype == out["loss_mask"].dtype == np.int32


def test_without_bos_the_first_token_is_still_unscored(tokenizer):
    out = tokenize_prompt_completion("ab", "cd", tokenizer, max_length=64, add_bos=False)
    np.testing.assert_array_equal(out["tokens"], ids(tokenizer, "abcd") + [tokenizer.eos_id])
    np.testing.assert_array_equal(out["loss_mask"], [0, 0, 1, 1, 1])


@pytest.mark.parametrize("truncation,kept", [("keep_end", "6789"), ("keep_start", "0123")])
def test_prompt_truncation(tokenizer, truncation, kept):
    out = tokenize_prompt_completion("0123456789", "xy", tokenizer, max_length=64,
                                     max_prompt_length=4, truncation=truncation)
    expected = [tokenizer.bos_id] + ids(tokenizer, kept + "xy") + [tokenizer.eos_id]
    np.testing.assert_array_equal(out["tokens"], expected)
    assert out["loss_mask"].sum() == 3


def test_max_length_cuts_the_completion_end_and_its_eos(tokenizer):
    out = tokenize_prompt_completion("abc", "defghij", tokenizer, max_length=6)
    np.testing.assert_array_equal(out["tokens"], [tokenizer.bos_id] + ids(tokenizer, "abcde"))
    np.testing.assert_array_equal(out["loss_mask"], [0, 0, 0, 0, 1, 1])
    assert tokenizer.eos_id not in out["tokens"]


def test_prompt_filling_max_length_raises(tokenizer):
    with pytest.raises(PromptTooLongError, match="max_length=5") as info:
        tokenize_prompt_completion("abcd", "e", tokenizer, max_length=5)
    assert isinstance(info.value, DataError) and info.value.reason == "prompt_too_long"
    # Truncating the prompt makes room again.
    out = tokenize_prompt_completion("abcd", "e", tokenizer, max_length=5,
                                     max_prompt_length=2)
    assert out["loss_mask"].tolist() == [0, 0, 0, 1, 1]


def test_conversation_scores_only_the_assistant_turn(tokenizer):
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    completion = [{"role": "assistant", "content": "yo"}]
    out = tokenize_prompt_completion(prompt, completion, tokenizer, max_length=128)
    tokens, mask = out["tokens"], out["loss_mask"].astype(bool)
    full = tokenizer.apply_chat_template(prompt + completion)
    # The template's own BOS and EOS are neither doubled nor dropped.
    assert tokenizer.decode(tokens, skip_special_tokens=False) == full
    assert (tokens == tokenizer.bos_id).sum() == 1 and (tokens == tokenizer.eos_id).sum() == 1
    scored = tokenizer.decode(tokens[mask], skip_special_tokens=False)
    assert scored == full[len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True)):]
    assert scored.startswith("yo")
    assert mask[-1] and not mask[: len(tokens) - len(ids(tokenizer, scored))].any()


def test_mixing_text_and_messages_is_an_error(tokenizer):
    with pytest.raises(DataError, match="both be strings or both be message lists"):
        tokenize_prompt_completion("hi", [{"role": "assistant", "content": "yo"}],
                                   tokenizer, max_length=64)


def test_bad_truncation_mode(tokenizer):
    with pytest.raises(ValueError, match="truncation"):
        tokenize_prompt_completion("a", "b", tokenizer, max_length=8, truncation="left")


@pytest.mark.parametrize("which", ["tokenizer", "chatml_tokenizer"])
def test_multi_turn_completion_trains_only_the_assistant_turns(which, request):
    """Tool results and the template's framing between turns are not trained on, and the
    untrained text between two assistant turns is exactly what a multi-turn rollout
    prefills as the observation (jalign.algorithms.episodes.ChatFrame)."""
    from jalign.algorithms.episodes import ChatFrame
    tokenizer = request.getfixturevalue(which)
    prompt = [{"role": "user", "content": "12*34="}]
    tool = {"role": "tool", "content": "408"}
    completion = [{"role": "assistant", "content": "<tool_call>12*34</tool_call>"}, tool,
                  {"role": "assistant", "content": "408"}]
    out = tokenize_prompt_completion(prompt, completion, tokenizer, max_length=256)
    tokens, mask = out["tokens"], out["loss_mask"]
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    assert text == tokenizer.apply_chat_template(prompt + completion)
    eos = tokenizer.eos_token
    runs, current = [], []  # the trained runs of tokens, as text
    for t, m in zip(tokens.tolist(), mask.tolist()):
        if m:
            current.append(t)
        elif current:
            runs.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
    if current:
        runs.append(tokenizer.decode(current, skip_special_tokens=False))
    assert runs == ["<tool_call>12*34</tool_call>" + eos, "408" + eos]
    first_end = text.index("</tool_call>" + eos) + len("</tool_call>" + eos)
    observation = text[first_end:text.rindex("408" + eos)]
    assert observation == ChatFrame(tokenizer).observation_text([tool])
    assert "408" in observation  # the tool's answer itself is not trained
