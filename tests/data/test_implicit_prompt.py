"""TRL's implicit-prompt preference rows: only "chosen" and "rejected", sharing the prompt."""

import json
import os
import random

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jalign.data import (DataError, extract_prompt, load_preference_records,
                         make_preference_dataset, preference_records_from_dicts,
                         validate_preference_record)
from jalign.tokenizer import Tokenizer, builtin_tokenizer

# A second template: no BOS, the role in brackets, each turn ended by EOS.
BRACKET_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}")


def bracket_tokenizer():
    builtin = builtin_tokenizer()  # cached and shared: never mutate it
    return Tokenizer(builtin.backend, eos_token=builtin.eos_token,
                     pad_token=builtin.pad_token, bos_token=builtin.bos_token,
                     unk_token=builtin.unk_token, chat_template=BRACKET_TEMPLATE)


def msg(role, content):
    return {"role": role, "content": content}


SYSTEM, Q1, A1, Q2 = (msg("system", "be brief"), msg("user", "2+2?"),
                      msg("assistant", "4"), msg("user", "and 3+3?"))


def test_strings_split_before_the_space_that_precedes_the_first_difference():
    prompt = "\n\nHuman: sky colour?\n\nAssistant:"
    assert extract_prompt(prompt + " blue", prompt + " green") == (prompt, " blue", " green")
    # No space before the difference: the prompt keeps everything shared.
    assert extract_prompt("Q: 2+2\nA:4", "Q: 2+2\nA:5") == ("Q: 2+2\nA:", "4", "5")
    # By character, as TRL: responses sharing their first letters lend them to the prompt.
    assert extract_prompt("Assistant: yes", "Assistant: yeah") == (
        "Assistant: ye", "s", "ah")
    # One extends the other: the shorter's last character stays in both responses.
    assert extract_prompt("Assistant: no", "Assistant: no way") == (
        "Assistant: n", "o", "o way")


def test_random_strings_match_an_independent_statement_of_trls_rule():
    rng = random.Random(0)
    for _ in range(2000):
        chosen, rejected = ("".join(rng.choice("ab ") for _ in range(rng.randint(1, 8)))
                            for _ in range(2))
        common = os.path.commonprefix([chosen, rejected])
        if common in (chosen, rejected):
            split = min(len(chosen), len(rejected)) - 1
        else:
            split = len(common) - common.endswith(" ")
        valid = (chosen != rejected and chosen[:split].strip()
                 and chosen[split:].strip() and rejected[split:].strip())
        if valid:
            assert extract_prompt(chosen, rejected) == (
                chosen[:split], chosen[split:], rejected[split:])
        else:
            with pytest.raises(DataError):
                extract_prompt(chosen, rejected)


def test_conversations_share_every_turn_before_the_first_differing_message():
    chosen = [Q1, msg("assistant", "4")]
    rejected = [Q1, msg("assistant", "5")]
    assert extract_prompt(chosen, rejected) == ([Q1], chosen[1:], rejected[1:])
    # Multi-turn: earlier assistant turns are part of the prompt.
    shared = [SYSTEM, Q1, A1, Q2]
    chosen, rejected = shared + [msg("assistant", "6")], shared + [msg("assistant", "7")]
    assert extract_prompt(chosen, rejected) == (shared, chosen[4:], rejected[4:])
    # The responses may hold several turns, of different counts.
    chosen = [Q1, A1, Q2, msg("assistant", "6")]
    rejected = [Q1, msg("assistant", "5")]
    assert extract_prompt(chosen, rejected) == ([Q1], chosen[1:], rejected[1:])
    # Messages are compared whole: the same content with another role differs.
    assert extract_prompt([Q1, msg("user", "x")], [Q1, msg("assistant", "x")])[0] == [Q1]
    # One conversation extends the other: its last message starts both responses.
    assert extract_prompt([Q1, A1], [Q1, A1, Q2, msg("assistant", "6")]) == (
        [Q1], [A1], [A1, Q2, msg("assistant", "6")])


@pytest.mark.parametrize("chosen, rejected, reason, message", [
    ("yes", "no", "no_shared_prompt", "their texts share no common prefix"),
    ("  \n yes", "  \n no", "no_shared_prompt", "share nothing but whitespace"),
    ([Q1, A1], [Q2, A1], "no_shared_prompt", "their first messages differ"),
    ("Q: x A: 1", "Q: x A: 1", "chosen_equals_rejected", "chosen and rejected are identical"),
    ([Q1, A1], [Q1, A1], "chosen_equals_rejected", "chosen and rejected are identical"),
    ("Q: x\n", "Q: x\t", "empty_field", "field 'chosen' is only whitespace after"),
    ("Q: x A: 1", [Q1, A1], "wrong_type", "both be strings or both be message lists"),
])
def test_pairs_without_a_usable_prompt_raise(chosen, rejected, reason, message):
    with pytest.raises(DataError, match=message) as e:
        extract_prompt(chosen, rejected)
    assert e.value.reason == reason


def test_a_present_prompt_is_never_replaced():
    row = {"prompt": "Q: x", "chosen": "Q: x A: 1", "rejected": "Q: x A: 2"}
    record = validate_preference_record(row, "row")
    assert {k: record[k] for k in row} == row
    with pytest.raises(DataError, match="row: field 'prompt' is missing"):
        validate_preference_record({**row, "prompt": None}, "row")
    # Unpaired (KTO) rows always need their prompt.
    with pytest.raises(DataError, match=r"records\[0\]: field 'prompt' is missing"):
        preference_records_from_dicts([{"completion": "c", "label": True}], paired=False)


# The same pairs, explicit (TRL's split: a string response starts with its space).
STRING_PROMPTS = ["\n\nHuman: sort 3 1\n\nAssistant:",
                  "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: sort 2 9 4\n\nAssistant:",
                  "Q: add 12 and 30\nA:"]
CHAT_PROMPTS = [[Q1], [SYSTEM, Q1, A1, Q2], [Q1, A1, msg("user", "again?")]]


def explicit_rows(conversation, n=10):
    rows = []
    for i in range(n):
        if conversation:
            prompt = CHAT_PROMPTS[i % 3]
            chosen = [msg("assistant", f"C{i}" + "c" * (i % 4))]
            rejected = [msg("assistant", f"R{i}" + "r" * (i % 3))]
            if i % 4 == 3:  # A longer rejected response, with a follow-up turn.
                rejected += [msg("user", "sure?"), msg("assistant", "yes")]
        else:
            prompt = STRING_PROMPTS[i % 3]
            chosen, rejected = f" C{i}" + "c" * (i % 4), f" R{i}" + "r" * (i % 3)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "id": i})
    return rows


def implicit(row):
    return {"chosen": row["prompt"] + row["chosen"],
            "rejected": row["prompt"] + row["rejected"], "id": row["id"]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def without_origin(records):
    return [{k: v for k, v in r.items() if k != "_origin"} for r in records]


@pytest.mark.parametrize("conversation, template", [
    (False, "builtin"), (True, "builtin"), (True, "bracket")])
@pytest.mark.parametrize("mixed", [False, True])
def test_implicit_and_explicit_files_give_identical_batches(tmp_path, conversation, template,
                                                            mixed):
    tokenizer = bracket_tokenizer() if template == "bracket" else builtin_tokenizer()
    rows = explicit_rows(conversation)
    # Mixed: every other row implicit, in one file.
    implicit_rows = [row if mixed and i % 2 else implicit(row) for i, row in enumerate(rows)]
    explicit, _ = load_preference_records(write_jsonl(tmp_path / "explicit.jsonl", rows))
    records, report = load_preference_records(
        write_jsonl(tmp_path / "implicit.jsonl", implicit_rows))
    assert report.total == 0
    assert without_origin(records) == without_origin(explicit)
    assert records[4]["_origin"] == f"{tmp_path / 'implicit.jsonl'}:5"

    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
    for packing in (False, True):
        def batches(recs):
            return list(make_preference_dataset(
                recs, tokenizer, batch_size=4, max_length=96, seed=1, num_epochs=1,
                packing=packing, bucket_boundaries=(32, 64, 96), read_options=read))
        got, want = batches(records), batches(explicit)
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert sum(b["pair_mask"].sum() for b in got) == len(rows)


def test_parquet_files_without_a_prompt_column(tmp_path):
    rows = explicit_rows(conversation=False, n=4)
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([implicit(r) for r in rows]), path)
    records, _ = load_preference_records(str(path))
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in records] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in rows]


def test_rows_without_a_shared_prompt_name_file_and_line_or_are_counted(tmp_path):
    rows = [implicit(r) for r in explicit_rows(conversation=False, n=3)]
    rows += [{"chosen": "yes", "rejected": "no"},                        # line 4
             {"chosen": [Q1, A1], "rejected": [Q2, A1]},                 # line 5
             {"chosen": "Q: 1 A: 2", "rejected": "Q: 1 A: 2"},           # line 6
             {"chosen": "Q: 1 A: 2"}]                                    # line 7
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    first_bad = write_jsonl(tmp_path / "first.jsonl", rows[:5])
    with pytest.raises(DataError, match=f"{first_bad}:4: no 'prompt' field, and chosen and "
                       "rejected cannot supply one: their texts share no common prefix"):
        load_preference_records(first_bad)
    records, report = load_preference_records(path, on_bad_row="skip")
    assert [r["_origin"] for r in records] == [f"{path}:{line}" for line in (1, 2, 3)]
    assert dict(report.counts) == {"no_shared_prompt": 2, "chosen_equals_rejected": 1,
                                   "missing_field": 1}
    examples = "\n".join(report.examples)
    assert f"{path}:5: no 'prompt' field, and chosen and rejected cannot supply one: " \
           "their first messages differ" in examples
    assert f"{path}:6: chosen and rejected are identical" in examples
    assert f"{path}:7: field 'rejected' is missing" in examples
    # In-memory rows are named by index.
    with pytest.raises(DataError, match=r"pairs\[1\]: no 'prompt' field"):
        preference_records_from_dicts(rows[2:4], name="pairs")
