"""Preference records: validation, loading and tokenisation of pairs and KTO rows.

Records. Paired: "prompt", "chosen", "rejected"; unpaired: "prompt",
"completion", "label" (bool, or 0/1). Texts are strings or message lists (see
`jalign.data.sources`); optional float reference log-probs ("ref_chosen_logps"
and "ref_rejected_logps", or "ref_logps" and "ref_kl_logps") are carried into
the batch. `example_index` in a batch is the record's "_index" if it has one,
else its position in `records`, so a precompute pass can write log-probs back.

Paired rows come in three forms (docs/data.md has examples):
  * explicit prompt: {"prompt", "chosen", "rejected"}, three strings;
  * conversations: the same three fields as message lists, the prompt's
    turns first and each response's turns after them (usually one assistant
    turn), rendered by the tokenizer's chat template;
  * implicit prompt (TRL's format, e.g. Anthropic HH): no "prompt" key;
    "chosen" and "rejected" are each the whole text or the whole
    conversation, and the prompt is their longest common prefix
    (`extract_prompt`). The split happens when the record is validated
    (`validate_preference_record`, so at loading time), and the record is
    then the explicit one: nothing later knows which form a row had.
  A row with a "prompt" key is taken as given. Unpaired rows always need
  their "prompt".

Batches built from these records: `jalign.data.preference_batches`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jalign.data.pipeline import tokenizable_indices
from jalign.data.sft import TokenizerLike, fit_prompt_completion
from jalign.data.sources import (ORIGIN_KEY, DataError, SkipReport,
                                 load_records, records_from_dicts, validate_record)
from jalign.data.truncation import Truncation, TruncationReport

PAIRED_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("prompt", "completion", "label")
PAIRED_REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")
UNPAIRED_REF_FIELDS = ("ref_logps", "ref_kl_logps")
INDEX_KEY = "_index"
# How far to look for a valid record whose prompt a KL pair can borrow.
_MAX_KL_PARTNER_TRIES = 32


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _identical_error() -> DataError:
    return DataError("chosen and rejected are identical; a preference pair needs "
                     "two different responses", reason="chosen_equals_rejected")


def extract_prompt(chosen, rejected) -> tuple[Any, Any, Any]:
    """Splits an implicit-prompt pair into (prompt, chosen, rejected), as TRL does.

    The prompt is the longest common prefix of `chosen` and `rejected`: of
    their characters (strings) or of their messages (conversations, compared
    as whole dicts), so a conversation's prompt holds every shared turn,
    earlier assistant turns included, and the responses are the messages
    from the first one that differs. Like TRL's `extract_prompt`:
      * strings: when the character before the first difference is a space,
        that space starts the responses instead of ending the prompt
        ("Assistant: yes" / "Assistant: no" -> "Assistant:", " yes", " no");
        the split is by character, so it can fall inside a word;
      * when one response is a prefix of the other, the last element (character
        or message) of the shorter one is left to both responses, so neither
        is empty.
    Unlike TRL, a pair with no common prefix (only whitespace, for strings)
    or with identical responses raises instead of yielding an empty prompt
    or a pair that teaches nothing.

    Args:
        chosen, rejected: both strings, or both lists of {"role", "content"}
            messages (already validated, see `jalign.data.sources`).

    Returns:
        (prompt, chosen, rejected): strings, or message lists.

    Raises:
        DataError: without an origin; reason "chosen_equals_rejected",
            "no_shared_prompt", "empty_field" (a string response that is only
            whitespace after the prompt) or "wrong_type" (a string and a
            message list).
    """
    conversation = isinstance(chosen, (list, tuple))
    if conversation != isinstance(rejected, (list, tuple)):
        raise DataError("with no 'prompt' field, chosen and rejected must both be "
                        "strings or both be message lists", reason="wrong_type")
    if chosen == rejected:
        raise _identical_error()
    n = min(len(chosen), len(rejected))
    split = next((i for i in range(n) if chosen[i] != rejected[i]), None)
    if split is None:  # One extends the other.
        split = n - 1
    elif not conversation and split > 0 and chosen[split - 1] == " ":
        split -= 1
    prompt = chosen[:split]
    if not (prompt if conversation else prompt.strip()):
        what = "first messages differ" if conversation else (
            "texts share no common prefix" if not prompt else
            "texts share nothing but whitespace at the start")
        raise DataError(f"no 'prompt' field, and chosen and rejected cannot supply "
                        f"one: their {what}; add the prompt as a 'prompt' field",
                        reason="no_shared_prompt")
    chosen, rejected = chosen[split:], rejected[split:]
    if conversation:
        return list(prompt), list(chosen), list(rejected)
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise DataError(f"field '{field}' is only whitespace after the shared "
                            f"prompt {prompt!r}", reason="empty_field")
    return prompt, chosen, rejected


def _with_implicit_prompt(row: Mapping, origin: str) -> dict:
    record = validate_record(row, origin, PAIRED_FIELDS[1:])
    try:
        prompt, chosen, rejected = extract_prompt(record["chosen"], record["rejected"])
    except DataError as e:
        raise DataError(f"{origin}: {e}", reason=e.reason) from None
    return {"prompt": prompt, **record, "chosen": chosen, "rejected": rejected}


def validate_preference_record(row: Any, origin: str, *, paired: bool = True,
                               require_ref: bool = False) -> dict:
    """Checks one paired or unpaired record; returns a new dict ("_origin" set).

    Beyond `validate_record` on the text fields: a paired row without a
    "prompt" key gets one from `extract_prompt` (TRL's implicit prompt; a
    "prompt" that is present, even null, is never replaced); paired chosen !=
    rejected; unpaired "label" is a bool or 0/1 (returned as bool); reference
    log-prob fields, if any is present (or `require_ref`), are all present
    and finite numbers (returned as float).

    Raises:
        DataError: naming `origin` and the field; reasons as in `sources`, plus
            "chosen_equals_rejected" and "no_shared_prompt".
    """
    if paired and isinstance(row, Mapping) and "prompt" not in row:
        record = _with_implicit_prompt(row, origin)
    else:
        record = validate_record(row, origin,
                                 PAIRED_FIELDS if paired else UNPAIRED_FIELDS[:2])
    if paired and record["chosen"] == record["rejected"]:
        raise DataError(f"{origin}: {_identical_error()}",
                        reason="chosen_equals_rejected")
    if not paired:
        label = record.get("label")
        if label is None:
            raise DataError(f"{origin}: field 'label' is missing",
                            reason="missing_field")
        if not (isinstance(label, (bool, np.bool_)) or (
                isinstance(label, (int, np.integer)) and label in (0, 1))):
            raise DataError(f"{origin}: field 'label' must be a bool or 0/1, got "
                            f"{_type_name(label)} {label!r}", reason="wrong_type")
        record["label"] = bool(label)
    ref_fields = PAIRED_REF_FIELDS if paired else UNPAIRED_REF_FIELDS
    if require_ref or any(f in record for f in ref_fields):
        for field in ref_fields:
            value = record.get(field)
            if value is None:
                raise DataError(f"{origin}: field '{field}' is missing (needed "
                                f"with {', '.join(ref_fields)})",
                                reason="missing_field")
            if isinstance(value, (bool, np.bool_)) or not isinstance(
                    value, (int, float, np.integer, np.floating)):
                raise DataError(f"{origin}: field '{field}' must be a number, got "
                                f"{_type_name(value)}", reason="wrong_type")
            if not math.isfinite(value):
                raise DataError(f"{origin}: field '{field}' is {value}, not a "
                                "finite number", reason="not_finite")
            record[field] = float(value)
    return record


def _finish_records(records: list[dict], report: SkipReport, *, paired: bool,
                    on_bad_row: str, name: str) -> tuple[list[dict], SkipReport]:
    valid = []
    for record in records:
        try:
            valid.append(validate_preference_record(record, record[ORIGIN_KEY],
                                                    paired=paired))
        except DataError as e:
            if on_bad_row == "raise":
                raise
            report.add(e)
    if not valid:
        raise DataError(f"{name}: no valid records; {report.summary()}")
    for i, record in enumerate(valid):
        record[INDEX_KEY] = i
    return valid, report


def preference_records_from_dicts(rows: Sequence[Mapping[str, Any]], *,
                                  paired: bool = True, on_bad_row: str = "raise",
                                  name: str = "records") -> tuple[list[dict], SkipReport]:
    """Validates in-memory paired (or unpaired) rows, e.g. built-in task data.

    Like `records_from_dicts`, plus the checks of `validate_preference_record`;
    each kept record gets "_index", its position in the returned list.
    """
    fields = PAIRED_FIELDS[1:] if paired else UNPAIRED_FIELDS[:2]  # prompt may be implicit
    records, report = records_from_dicts(rows, required_fields=fields,
                                         on_bad_row=on_bad_row, name=name)
    return _finish_records(records, report, paired=paired, on_bad_row=on_bad_row,
                           name=name)


def load_preference_records(path_or_paths, *, paired: bool = True,
                            on_bad_row: str = "raise") -> tuple[list[dict], SkipReport]:
    """`load_records` for paired (or unpaired) files.

    See `preference_records_from_dicts`; "_index" is the position in the
    returned list.
    """
    fields = PAIRED_FIELDS[1:] if paired else UNPAIRED_FIELDS[:2]  # prompt may be implicit
    records, report = load_records(path_or_paths, required_fields=fields,
                                   on_bad_row=on_bad_row)
    return _finish_records(records, report, paired=paired, on_bad_row=on_bad_row,
                           name=str(path_or_paths))


def tokenize_preference_pair(prompt, chosen, rejected, tokenizer: TokenizerLike, *,
                             max_length: int, max_prompt_length: int | None = None,
                             truncation: str = "keep_end",
                             add_bos: bool = True) -> dict[str, np.ndarray]:
    """Tokenises a preference pair; `fit_preference_pair` without the `Truncation`s."""
    return fit_preference_pair(prompt, chosen, rejected, tokenizer, max_length=max_length,
                               max_prompt_length=max_prompt_length, truncation=truncation,
                               add_bos=add_bos)[0]


def fit_preference_pair(prompt, chosen, rejected, tokenizer: TokenizerLike, *,
                        max_length: int, max_prompt_length: int | None = None,
                        truncation: str = "keep_end", add_bos: bool = True,
                        ) -> tuple[dict[str, np.ndarray], tuple[Truncation, Truncation]]:
    """Tokenises a preference pair: `fit_prompt_completion` for each response.

    Both sequences start with the same (identically truncated) prompt; the
    prompt tokens are never scored, the response and its EOS are.

    Returns:
        (dict(chosen_tokens, chosen_loss_mask, rejected_tokens,
        rejected_loss_mask), int32 1-D arrays of length <= max_length;
        the chosen and the rejected sequence's `Truncation`).

    Raises:
        PromptTooLongError: the prompt leaves no room for a response.
        DataError: the two sequences are identical after truncation (reason
            "chosen_equals_rejected"), or a conversation the template cannot
            split.
    """
    out, cuts = {}, []
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        example, cut = fit_prompt_completion(
            prompt, completion, tokenizer, max_length=max_length,
            max_prompt_length=max_prompt_length, truncation=truncation,
            add_bos=add_bos)
        out[f"{name}_tokens"] = example["tokens"]
        out[f"{name}_loss_mask"] = example["loss_mask"]
        cuts.append(cut)
    if np.array_equal(out["chosen_tokens"], out["rejected_tokens"]):
        raise DataError(f"chosen and rejected are identical after truncation to "
                        f"max_length={max_length}", reason="chosen_equals_rejected")
    return out, tuple(cuts)


@dataclasses.dataclass
class TokenizePreference:
    """Picklable map: (index, record) -> tokenised example; DataError names the record.

    The grain map of `jalign.data.preference_batches`. Paired examples hold
    `tokenize_preference_pair`'s arrays; unpaired ones the record's tokens and
    loss mask, its label and its KL pair (the completion after the prompt of
    the next valid record, see the batch layout).
    """

    records: Sequence[Mapping]  # For the KL partners of unpaired records.
    tokenizer: TokenizerLike
    paired: bool
    with_ref: bool
    max_length: int
    max_prompt_length: int | None
    truncation: str

    def __call__(self, item):
        index, record = item
        example, _ = self._tokenize(index, record)
        if not self.paired:
            prompt_ids = self._kl_prompt(index)
            if prompt_ids is None:  # No valid partner: a matched pair.
                prompt_ids = example["tokens"][:example["prompt_length"]]
            completion = example["tokens"][example["prompt_length"]:]
            kl_tokens = np.concatenate([prompt_ids, completion])[:self.max_length]
            kl_mask = np.zeros_like(kl_tokens)
            kl_mask[len(prompt_ids):] = 1
            example.update(kl_tokens=kl_tokens, kl_loss_mask=kl_mask)
        return example

    def check(self, item) -> tuple[Truncation, ...]:
        """The row's `Truncation`s (one per sequence, the KL pair's not counted);
        raises the DataError `__call__` would raise (the KL pair cannot fail)."""
        return self._tokenize(*item)[1]

    def _tokenize(self, index: int, record: Mapping) -> tuple[dict, tuple[Truncation, ...]]:
        origin = record.get(ORIGIN_KEY, f"records[{index}]") if isinstance(
            record, Mapping) else f"records[{index}]"
        record = validate_preference_record(record, origin, paired=self.paired,
                                            require_ref=self.with_ref)
        kwargs = dict(max_length=self.max_length, truncation=self.truncation,
                      max_prompt_length=self.max_prompt_length)
        try:
            if self.paired:
                example, cuts = fit_preference_pair(
                    record["prompt"], record["chosen"], record["rejected"],
                    self.tokenizer, **kwargs)
            else:
                example, cut = fit_prompt_completion(
                    record["prompt"], record["completion"], self.tokenizer, **kwargs)
                cuts = (cut,)
                # The first target is the first completion token.
                example["prompt_length"] = int(np.argmax(example["loss_mask"]))
                example["label"] = np.float32(record["label"])
        except DataError as e:
            raise DataError(f"{origin}: {e}", reason=e.reason) from None
        example["example_index"] = int(record.get(INDEX_KEY, index))
        if self.with_ref:
            for field in PAIRED_REF_FIELDS if self.paired else UNPAIRED_REF_FIELDS:
                example[field] = np.float32(record[field])
        return example, cuts

    def _kl_prompt(self, index: int) -> np.ndarray | None:
        n = len(self.records)
        for step in range(1, min(n, _MAX_KL_PARTNER_TRIES + 1)):
            partner = (index + step) % n
            try:
                example, _ = self._tokenize(partner, self.records[partner])
            except DataError:
                continue  # Counted (or raised) when the dataset was built.
            return example["tokens"][:example["prompt_length"]]
        return None


def has_ref_fields(records: Sequence[Mapping], paired: bool) -> bool:
    """Whether any record carries a reference log-prob field (then all must)."""
    ref_fields = PAIRED_REF_FIELDS if paired else UNPAIRED_REF_FIELDS
    return any(isinstance(r, Mapping) and any(f in r for f in ref_fields)
               for r in records)


def tokenizable_preference_records(
    records: Sequence[Mapping], tokenizer: TokenizerLike, *, paired: bool = True,
    max_length: int, max_prompt_length: int | None = None,
    truncation: str = "keep_end", on_bad_row: str = "raise",
    skip_report: SkipReport | None = None,
    truncation_report: TruncationReport | None = None,
) -> list[dict]:
    """The records `make_preference_dataset` (`make_unpaired_dataset` if not
    `paired`) with these arguments would keep.

    For a training run to check (and count) its records once at start-up, in
    the report that counted the file's bad rows; building datasets from the
    returned list then skips nothing. Kept records are shallow copies whose
    "_index" is renumbered to their position in the returned list (as
    `load_preference_records` numbers them), so a precompute pass can index
    arrays of that length. What truncation cuts from the kept rows is counted
    in `truncation_report` (a pair is cut if either response is). Other
    arguments as in `make_preference_dataset`.
    """
    prepare = TokenizePreference(records, tokenizer, paired,
                                 has_ref_fields(records, paired), max_length,
                                 max_prompt_length, truncation)
    kept = tokenizable_indices(records, prepare.check, on_bad_row=on_bad_row,
                               skip_report=skip_report,
                               truncation_report=truncation_report)
    if len(kept) == len(records):
        return list(records)
    return [{**records[i], INDEX_KEY: j} for j, i in enumerate(kept)]


