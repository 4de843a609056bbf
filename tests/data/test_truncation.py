"""Truncation is never silent: every cut row is counted by kind at setup, printed with a
warning naming the config keys, and written to summary.json; the default lengths keep
real-format chat rows whole."""

import json
import os

import pytest

from jalign.algorithms import get_algorithm
from jalign.config_utils import base_config, validate_config
from jalign.data import (Truncation, TruncationReport, fit_prompt_completion,
                         records_from_dicts, tokenizable_preference_records,
                         tokenizable_sft_records)
from jalign.data.preference import preference_records_from_dicts
from jalign.data.prompts import prepare_prompt_records
from jalign.models.config import ModelConfig
from tests.data.conftest import write_chatml_tokenizer
from tests.train_helpers import parse_config

SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer briefly and say "
                                       "when you are unsure."}
# Real-format conversations: a system prompt, earlier turns, one assistant answer.
CHATS = [
    ([SYSTEM, {"role": "user", "content": "What is the boiling point of water at sea level?"}],
     "Water boils at 100 degrees Celsius (212 F) at sea level.",
     "It depends on many things, but usually around a hundred degrees, I think."),
    ([SYSTEM, {"role": "user", "content": "Hi! Can you help me plan a short trip?"},
      {"role": "assistant", "content": "Of course. Where would you like to go, and for how "
                                       "many days?"},
      {"role": "user", "content": "Lisbon, three days, and I like museums and food."}],
     "Day 1: Alfama and the Fado Museum, dinner in Bairro Alto. Day 2: the Gulbenkian Museum, "
     "then Belem for pasteis de nata. Day 3: LX Factory and a seafood lunch in Cais do Sodre.",
     "Lisbon is nice. Go to some museums and eat some food there."),
    ([SYSTEM, {"role": "user", "content": "Translate 'good morning' into Spanish."}],
     "'Good morning' in Spanish is 'buenos dias'.",
     "Hola, which is Spanish for hello, not for good morning."),
    ([SYSTEM, {"role": "user", "content": "My code prints None instead of the sum:\n"
                                          "def add(a, b):\n    a + b\nWhy?"}],
     "The function never returns the sum: write `return a + b` instead of `a + b`.",
     "Python sometimes prints None. Try restarting the interpreter."),
]


def _sft_rows():
    return [{"prompt": p, "completion": [{"role": "assistant", "content": c}]}
            for p, c, _ in CHATS]


def _pair_rows():
    return [{"prompt": p, "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in CHATS]


def _kto_rows():
    return [{"prompt": p, "completion": [{"role": "assistant", "content": text}], "label": label}
            for p, c, r in CHATS for text, label in ((c, True), (r, False))]


def _all_reports(tokenizer, *, max_length, max_prompt_length, prompts=True):
    """TruncationReports of the chat fixture as SFT rows, pairs, KTO rows and RL prompts."""
    lengths = dict(max_length=max_length, max_prompt_length=max_prompt_length)
    reports = {kind: TruncationReport() for kind in ("sft", "pairs", "kto", "prompts")}
    sft = records_from_dicts(_sft_rows(), required_fields=("prompt", "completion"))[0]
    tokenizable_sft_records(sft, tokenizer, truncation_report=reports["sft"], **lengths)
    for kind, rows, paired in (("pairs", _pair_rows(), True), ("kto", _kto_rows(), False)):
        records = preference_records_from_dicts(rows, paired=paired)[0]
        tokenizable_preference_records(records, tokenizer, paired=paired,
                                       truncation_report=reports[kind], **lengths)
    # RL prompts are never cut (one over the limit is an error); their limit is
    # max_prompt_length, or max_length if that is 0.
    if prompts:
        prepare_prompt_records([{"prompt": p} for p, _, _ in CHATS], tokenizer,
                               max_prompt_length=max_prompt_length or max_length,
                               truncation_report=reports["prompts"])
    return reports


def test_default_lengths_keep_every_real_chat_row_whole(chatml_tokenizer):
    data = base_config().data
    reports = _all_reports(chatml_tokenizer, max_length=data.max_length,
                           max_prompt_length=data.max_prompt_length)
    for kind, report in reports.items():
        rows = len(CHATS) * (2 if kind == "kto" else 1)
        assert (report.rows, report.truncated) == (rows, 0), (kind, report.as_dict())
        # Long enough that the built-in tasks' old defaults (64, 48) would not do.
        assert report.longest_prompt > 64, kind
    # The old defaults cut every row: the system header goes with the prompt's start
    # and every answer loses its <|im_end|>.
    old = _all_reports(chatml_tokenizer, max_length=64, max_prompt_length=48, prompts=False)
    for kind in ("sft", "pairs", "kto"):
        rows = len(CHATS) * (2 if kind == "kto" else 1)
        assert old[kind].as_dict() | {"longest_prompt_tokens": 0, "longest_sequence_tokens": 0} \
            == {"rows": rows, "truncated": rows, "prompt_truncated": rows,
                "completion_truncated": rows, "end_of_turn_lost": rows,
                "longest_prompt_tokens": 0, "longest_sequence_tokens": 0}, kind


def test_each_kind_of_cut_is_told_apart(tokenizer, chatml_tokenizer):
    # Text: [BOS] + 10 prompt + 6 completion + [EOS] = 18 tokens.
    def fit(**lengths):
        return fit_prompt_completion("p" * 10, "c" * 6, tokenizer, **lengths)[1]
    assert fit(max_length=18) == Truncation(False, False, False, 11, 18)
    assert fit(max_length=18, max_prompt_length=0) == Truncation(False, False, False, 11, 18)
    assert fit(max_length=18, max_prompt_length=4) == Truncation(True, False, False, 11, 18)
    assert fit(max_length=17) == Truncation(False, True, True, 11, 18)  # only the EOS went
    # Chat: the answer ends "<|im_end|>\n"; losing the newline keeps the end of turn.
    prompt = [{"role": "user", "content": "Hi"}]
    answer = [{"role": "assistant", "content": "Hello"}]
    example, cut = fit_prompt_completion(prompt, answer, chatml_tokenizer, max_length=1024)
    n = len(example["tokens"])
    assert example["tokens"][-2:].tolist() == [chatml_tokenizer.eos_id,
                                               chatml_tokenizer.encode("\n")[0]]
    assert cut == Truncation(False, False, False, n - 7, n)  # "Hello<|im_end|>\n": 7 tokens
    _, cut = fit_prompt_completion(prompt, answer, chatml_tokenizer, max_length=n - 1)
    assert (cut.completion_truncated, cut.end_of_turn_lost) == (True, False)
    _, cut = fit_prompt_completion(prompt, answer, chatml_tokenizer, max_length=n - 2)
    assert (cut.completion_truncated, cut.end_of_turn_lost) == (True, True)


def _text_rows():
    """Texts of known lengths (1 token a character, plus BOS and EOS)."""
    return [
        {"prompt": "p" * 4, "completion": "c" * 4},    # 10 tokens, prompt 5: whole
        {"prompt": "p" * 12, "completion": "c" * 2},   # prompt 13: cut to 8 + BOS
        {"prompt": "p" * 6, "completion": "c" * 20},   # 28 tokens: completion cut
        {"prompt": "p" * 10, "completion": "c" * 20},  # both
    ]


def test_sft_pair_and_kto_cuts_are_counted_exactly(tokenizer):
    lengths = dict(max_length=20, max_prompt_length=8)
    sft = TruncationReport()
    records = records_from_dicts(_text_rows(), required_fields=("prompt", "completion"))[0]
    assert len(tokenizable_sft_records(records, tokenizer, truncation_report=sft,
                                       **lengths)) == 4
    assert sft.as_dict() == {"rows": 4, "truncated": 3, "prompt_truncated": 2,
                             "completion_truncated": 2, "end_of_turn_lost": 2,
                             "longest_prompt_tokens": 13, "longest_sequence_tokens": 32}
    # A pair is cut if either response is; both share the prompt.
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "r" * 3}
             for r in _text_rows()]
    report = TruncationReport()
    tokenizable_preference_records(preference_records_from_dicts(pairs)[0], tokenizer,
                                   truncation_report=report, **lengths)
    assert report.as_dict() == sft.as_dict()
    kto = [{**r, "label": i % 2 == 0} for i, r in enumerate(_text_rows())]
    report = TruncationReport()
    tokenizable_preference_records(preference_records_from_dicts(kto, paired=False)[0],
                                   tokenizer, paired=False, truncation_report=report, **lengths)
    assert report.as_dict() == sft.as_dict()


def test_warning_names_the_keys_above_one_percent():
    report = TruncationReport()
    whole = Truncation(False, False, False, 10, 20)
    for _ in range(199):
        report.add(whole)
    report.add(Truncation(False, True, True, 10, 700))
    assert report.warning(max_length=512, max_prompt_length=0) is None  # 1 of 200: 0.5%
    report.add(Truncation(True, False, False, 300, 400))
    report.add(Truncation(True, True, False, 300, 600))
    text = report.warning(max_length=512, max_prompt_length=256)  # 3 of 202
    assert text.startswith("3 of 202 rows (1%) are cut to fit (prompt_truncated 2, "
                           "completion_truncated 2, end_of_turn_lost 1); raise ")
    assert "config.data.max_prompt_length=256 (the longest prompt is 300 tokens" in text
    assert "config.data.max_length=512 (the longest row is 700 tokens)" in text


@pytest.mark.parametrize("algo", ["sft", "dpo", "kto"])
def test_setup_prints_counts_warns_and_summarizes(algo, tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    if algo == "sft":
        rows = _text_rows()
    elif algo == "dpo":
        rows = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": "r" * 3}
                for r in _text_rows()]
    else:
        rows = [{**r, "label": i % 2 == 0} for i, r in enumerate(_text_rows())]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = parse_config(f"--config.algo={algo}",
                          "--config.data.source=jsonl", f"--config.data.path={path}",
                          "--config.data.max_length=20", "--config.data.max_prompt_length=8")
    validate_config(config)
    spec = get_algorithm(algo)
    setup = spec.setup(config, ModelConfig.from_mapping(config.model), spec.spec(config),
                       str(tmp_path / "workdir"))
    out = capsys.readouterr().out
    assert ("training data: 4 rows, 3 cut to fit (prompt_truncated 2, completion_truncated 2, "
            "end_of_turn_lost 2); longest prompt 13 tokens, longest row 32 tokens") in out
    assert "warning: training data: 3 of 4 rows (75%) are cut to fit" in out
    assert "config.data.max_length=20 (the longest row is 32 tokens)" in out
    assert setup.summarize([], {})["truncated_rows"] == {
        "rows": 4, "truncated": 3, "prompt_truncated": 2, "completion_truncated": 2,
        "end_of_turn_lost": 2, "longest_prompt_tokens": 13, "longest_sequence_tokens": 32}


def test_summary_json_of_a_chat_run_counts_its_cuts(tmp_path, capsys):
    """A real run (2 SFT steps) on chat rows, with the lengths the built-in tasks use."""
    from jalign.loop import run
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _sft_rows()))
    config = parse_config("--config.data.source=jsonl", f"--config.data.path={path}",
                          "--config.data.tokenizer=" + write_chatml_tokenizer(tmp_path / "tok"),
                          "--config.data.max_length=64", "--config.data.max_prompt_length=48",
                          "--config.data.batch_size=8", "--config.train.num_steps=2",
                          "--config.train.eval_every=0", "--config.train.eval_at_start=False")
    run(config, str(tmp_path / "workdir"))
    out = capsys.readouterr().out
    assert "warning: training data: 4 of 4 rows (100%) are cut to fit" in out
    with open(os.path.join(tmp_path, "workdir", "summary.json")) as f:
        summary = json.load(f)
    truncated = summary["truncated_rows"]
    assert {k: truncated[k] for k in ("rows", "truncated", "prompt_truncated",
                                      "completion_truncated", "end_of_turn_lost")} == {
        "rows": 4, "truncated": 4, "prompt_truncated": 4, "completion_truncated": 4,
        "end_of_turn_lost": 4}
