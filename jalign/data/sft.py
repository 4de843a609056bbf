"""SFT tokenisation: a (prompt, completion) pair -> tokens and a loss mask.

Layout of one example (before truncation):

    tokens    = [bos] + prompt + completion + [eos]
    loss_mask =   0   +  0...  +   1...     +   1

`loss_mask[t] = 1` means token t is a target: it is predicted from tokens[:t].
The first token is never a target (nothing precedes it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from jalign.data.sources import DataError
from jalign.data.truncation import Truncation

TRUNCATION_MODES = ("keep_end", "keep_start")


class TokenizerLike(Protocol):
    """The tokenizer interface the data pipeline relies on (jalign.tokenizer)."""

    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int | None

    def encode(self, text: str) -> list[int]:
        ...

    def apply_chat_template(self, messages, *,
                            add_generation_prompt: bool = False) -> str:
        ...


class PromptTooLongError(DataError):
    """The (truncated) prompt leaves no room for a completion token.

    Raised by `tokenize_prompt_completion` without an origin; the pipeline
    re-raises it naming the record (or skips it, under on_bad_row="skip").
    """

    def __init__(self, message: str):
        super().__init__(message, reason="prompt_too_long")


def _is_conversation(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def render_conversation(prompt: Sequence[Mapping[str, str]],
                        completion: Sequence[Mapping[str, str]],
                        tokenizer: TokenizerLike) -> tuple[str, str]:
    """Renders message lists with the chat template into (prompt, completion) text.

    The prompt is rendered with the generation prompt (e.g. the assistant
    header); the completion text is the full rendered conversation with that
    prompt text removed from its front.

    Raises:
        DataError: if the template fails, or does not render the full
            conversation as an extension of the rendered prompt.
    """
    try:
        prompt_text = tokenizer.apply_chat_template(
            list(prompt), add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            list(prompt) + list(completion), add_generation_prompt=False)
    except ValueError as e:
        raise DataError(str(e), reason="chat_template") from None
    if not full_text.startswith(prompt_text):
        raise DataError(
            "chat template: the rendered conversation does not start with the "
            "rendered prompt (with add_generation_prompt=True); cannot split "
            "it into prompt and completion", reason="chat_template")
    return prompt_text, full_text[len(prompt_text):]


def _assistant_pieces(completion_text: str, messages: Sequence[Mapping[str, str]],
                      eos_token: str | None) -> list[tuple[str, bool]] | None:
    """The rendered completion cut into (text, trained) pieces: each assistant message's
    content and the EOS right after it are trained; the other messages (tool results,
    user turns) and the template's framing are not, as in a multi-turn rollout, where
    those tokens are observations. None when some message's content is not found
    verbatim, in order (a template that rewrites content)."""
    spans, cursor = [], 0
    for message in messages:
        content = message.get("content")
        if not isinstance(content, str) or not content:
            continue
        start = completion_text.find(content, cursor)
        if start < 0:
            return None
        end = start + len(content)
        if message.get("role") == "assistant":
            if eos_token and completion_text.startswith(eos_token, end):
                end += len(eos_token)
            spans.append((start, end))
        cursor = end
    pieces, pos = [], 0
    for start, end in spans:
        pieces += [(completion_text[pos:start], False), (completion_text[start:end], True)]
        pos = end
    pieces.append((completion_text[pos:], False))
    return [(text, trained) for text, trained in pieces if text]


def _truncate(ids: list[int], length: int, truncation: str) -> list[int]:
    if len(ids) <= length:
        return ids
    return ids[len(ids) - length:] if truncation == "keep_end" else ids[:length]


def tokenize_prompt_completion(
    prompt: str | Sequence[Mapping[str, str]],
    completion: str | Sequence[Mapping[str, str]],
    tokenizer: TokenizerLike,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: str = "keep_end",
    add_bos: bool = True,
) -> dict[str, np.ndarray]:
    """Tokenises one SFT example; `fit_prompt_completion` without the `Truncation`."""
    return fit_prompt_completion(prompt, completion, tokenizer, max_length=max_length,
                                 max_prompt_length=max_prompt_length, truncation=truncation,
                                 add_bos=add_bos)[0]


def fit_prompt_completion(
    prompt: str | Sequence[Mapping[str, str]],
    completion: str | Sequence[Mapping[str, str]],
    tokenizer: TokenizerLike,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: str = "keep_end",
    add_bos: bool = True,
) -> tuple[dict[str, np.ndarray], Truncation]:
    """Tokenises one SFT example and says what truncation cut from it.

    `tokens = [bos] + prompt + completion + [eos]`, `loss_mask` is 1 exactly on
    the completion tokens and the EOS; in a conversation whose completion holds tool
    results or user turns (multi-turn demonstrations), only on the assistant
    messages' contents and the EOS after each (their pieces are tokenised apart, as
    a multi-turn rollout tokenises observations apart from the policy's turns). BOS is added only if `add_bos` and the
    tokenizer has one.

    Message lists are rendered with the chat template first (see
    `render_conversation`); prompt and completion must both be strings or both
    be message lists. The rendered text keeps the template's special tokens,
    except that a leading BOS it wrote is replaced by the `add_bos` rule above,
    and the EOS is appended only if the rendered completion holds none (the
    template usually ends the assistant turn with it).

    Truncation, in order:
      1. the prompt to `max_prompt_length` tokens (BOS not counted; None or 0
         means no prompt limit):
         "keep_end" keeps its last tokens (left truncation), "keep_start" its
         first tokens;
      2. the whole sequence to `max_length` by cutting the end of the
         completion (the EOS goes first, so a truncated completion is not
         taught to stop there).

    Args:
        prompt: text, or a list of {"role", "content"} messages.
        completion: text, or a list of messages (usually one assistant turn).
        tokenizer: see `TokenizerLike`.
        max_length: maximum total length, BOS and EOS included.
        max_prompt_length: optional cap on prompt tokens (None or 0: none).
        truncation: "keep_end" or "keep_start" (applies to the prompt).
        add_bos: prepend the tokenizer's BOS if it has one.

    Returns:
        (dict(tokens=int32[L], loss_mask=int32[L]) with L <= max_length, the
        `Truncation`: which parts were cut and the untruncated lengths).

    Raises:
        PromptTooLongError: the prompt after step 1 (plus BOS) fills
            `max_length`, leaving no completion token.
        DataError: a conversation the chat template cannot split, or a
            string/messages mix.
    """
    if truncation not in TRUNCATION_MODES:
        raise ValueError(
            f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 0:
        raise ValueError(f"max_prompt_length must be >= 0 (0: no prompt limit), got "
                         f"{max_prompt_length}")
    if _is_conversation(prompt) != _is_conversation(completion):
        raise DataError("prompt and completion must both be strings or both be "
                        "message lists", reason="wrong_type")
    conversation = _is_conversation(prompt)
    pieces = None
    if conversation:
        messages = list(completion)
        prompt, completion = render_conversation(prompt, completion, tokenizer)
        if any(m.get("role") != "assistant" for m in messages):  # tool results, user turns
            pieces = _assistant_pieces(completion, messages, getattr(tokenizer, "eos_token", None))

    bos_id = tokenizer.bos_id
    prefix = [bos_id] if add_bos and bos_id is not None else []
    prompt_ids = list(tokenizer.encode(prompt))
    if bos_id is not None and prompt_ids[:1] == [bos_id]:
        # The chat template wrote a BOS; `add_bos` alone decides whether one is
        # kept, so it is never doubled (nor lost to prompt truncation).
        prompt_ids = prompt_ids[1:]
    full_prompt = len(prefix) + len(prompt_ids)
    if max_prompt_length:
        prompt_ids = _truncate(prompt_ids, max_prompt_length, truncation)
    n_context = len(prefix) + len(prompt_ids)
    if n_context >= max_length:
        raise PromptTooLongError(
            f"prompt is {n_context} tokens (with BOS), which leaves no room for "
            f"the completion within max_length={max_length}; set "
            f"max_prompt_length below max_length or skip such rows")
    if pieces:
        encoded = [(list(tokenizer.encode(text)), trained) for text, trained in pieces]
        completion_ids = [t for ids, _ in encoded for t in ids]
        trained_ids = [int(trained) for ids, trained in encoded for _ in ids]
    else:
        completion_ids = list(tokenizer.encode(completion))
        trained_ids = [1] * len(completion_ids)
    if not conversation or tokenizer.eos_id not in completion_ids:
        # A chat template usually ends the assistant turn itself.
        completion_ids.append(tokenizer.eos_id)
        trained_ids.append(1)

    sequence = prefix + prompt_ids + completion_ids
    tokens = np.asarray(sequence, dtype=np.int32)[:max_length]
    # The completion always holds an EOS (appended above); the last one ends the turn.
    end_of_turn = len(sequence) - 1 - completion_ids[::-1].index(tokenizer.eos_id)
    cuts = Truncation(
        prompt_truncated=len(prefix) + len(prompt_ids) < full_prompt,
        completion_truncated=len(sequence) > max_length,
        end_of_turn_lost=end_of_turn >= max_length,
        prompt_tokens=full_prompt,
        sequence_tokens=full_prompt + len(completion_ids))
    loss_mask = np.asarray([0] * n_context + trained_ids, np.int32)[:max_length]
    # Nothing precedes the first token, so it can never be a target (matters
    # only for an empty prompt without BOS).
    loss_mask[0] = 0
    return {"tokens": tokens, "loss_mask": loss_mask}, cuts
