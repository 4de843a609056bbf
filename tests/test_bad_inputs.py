"""The bad-input corpus (tests/bad_inputs/): every item gets an actionable error or a counted skip.

Each item goes through the path a user takes: flags parsed as `python -m jalign.train`
parses them, then `jalign.loop.run`; model folders through `jalign.models.from_pretrained`.
The error must name the file and line (or the config key, tensor, field) and come from
jalign's own checks, not from deep inside JAX, NumPy or a parser. Binary items are
written by tests/bad_inputs/_make.py.
"""

import dataclasses
import os
import re

import jax
import numpy as np
import pytest
from absl import flags

from jalign import checkpoint, models
from jalign.algorithms import get_algorithm
from jalign.config_utils import validate_config
from jalign.data import DataError, load_records
from jalign.models.config import ModelConfig
from jalign.tokenizer import Tokenizer
from jalign.loop import run
from tests.train_helpers import parse_config

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bad_inputs")
JALIGN_DIR = os.path.join(os.path.dirname(CORPUS), os.pardir, "jalign")


@dataclasses.dataclass
class Case:
    item: str                  # file or folder under tests/bad_inputs
    flags: tuple[str, ...]     # command-line overrides; {item} is the item's path
    error: type
    message: str               # regex; {item} is the item's path (escaped)
    raised_by_jalign: bool = True  # False: the flags parser's own error, as the CLI prints it
    # Found while reading batches: checked on run()'s data path up to the first batch,
    # which skips compiling the model (seconds per case).
    first_batch: bool = False

    def __str__(self):
        return self.item


def _sft(source="jsonl"):
    return (f"--config.data.source={source}", "--config.data.path={item}")


def _pref(algo, data):
    return (f"--config.algo={algo}", "--config.data.source=jsonl",
            f"--config.data.path={os.path.join(CORPUS, data)}")


def _chat(data):
    return ("--config.data.source=jsonl", f"--config.data.path={os.path.join(CORPUS, data)}",
            "--config.data.tokenizer={item}")


RUN_CASES = [
    # JSONL rows, through SFT's loader.
    Case("sft_malformed_json.jsonl", _sft(), DataError,
         r"{item}:2: line is not valid JSON: Expecting"),
    Case("sft_not_an_object.jsonl", _sft(), DataError,
         r"{item}:2: expected a JSON object, got list"),
    Case("sft_wrong_type.jsonl", _sft(), DataError,
         r"{item}:2: field 'completion' must be a string or a list of messages, got int"),
    Case("sft_empty_field.jsonl", _sft(), DataError, r"{item}:3: field 'completion' is empty"),
    Case("sft_null_field.jsonl", _sft(), DataError, r"{item}:2: field 'completion' is missing"),
    Case("sft_non_utf8.jsonl", _sft(), DataError,
         r"{item}:2: field 'prompt' is not valid UTF-8 \(invalid continuation byte at byte 15\)"),
    Case("sft_prompt_too_long.jsonl", (*_sft(), "--config.data.max_prompt_length=48"), DataError,
         r"{item}:2: prompt is 49 tokens \(with BOS\), which leaves no room for the completion "
         r"within max_length=48", first_batch=True),
    Case("sft_empty.jsonl", _sft(), DataError, r"{item}: file is empty"),
    Case("sft_blank_lines.jsonl", _sft(), DataError, r"{item}: file has no records"),
    Case("sft_unknown_extension.csv", _sft(), DataError,
         r"{item}: unknown file type \(expected .jsonl or .parquet\)"),
    Case("no_such_file.jsonl", _sft(), DataError, r"{item}: file not found"),
    # Parquet.
    Case("sft_wrong_schema.parquet", _sft("parquet"), DataError,
         r"{item}: missing required column\(s\) \['prompt', 'completion'\]; the file has "
         r"columns \['question', 'answer'\]"),
    Case("sft_wrong_type.parquet", _sft("parquet"), DataError,
         r"{item}:row 0: field 'completion' must be a string or a list of messages, got int"),
    Case("sft_not_parquet.parquet", _sft("parquet"), DataError,
         r"{item}: not a readable Parquet file"),
    # Conversations and tokenizers.
    Case("chat_message_without_content.jsonl", _sft(), DataError,
         r"{item}:1: field 'completion' message 0 has no 'content'"),
    Case("tokenizer_unparsable", ("--config.data.tokenizer={item}",), ValueError,
         r"could not parse tokenizer file {item}/tokenizer.json"),
    Case("tokenizer_template_raises", _chat("chat_messages.jsonl"), DataError,
         r"chat_messages.jsonl:[12]: chat template failed: TemplateAssertionError: "
         r"No filter named 'no_such_filter'", first_batch=True),
    Case("tokenizer_template_checks_roles", _chat("chat_unknown_role.jsonl"), DataError,
         r"chat_unknown_role.jsonl:2: chat template failed: TemplateError: unknown role wizard",
         first_batch=True),
    # The sandbox refuses attribute access to Python internals.
    Case("tokenizer_template_escapes_sandbox", _chat("chat_messages.jsonl"), DataError,
         r"chat_messages.jsonl:[12]: chat template failed: SecurityError: access to attribute "
         r"'__class__' of 'list' object is unsafe", first_batch=True),
    # Preference data: DPO pairs and KTO labels.
    Case("dpo_chosen_equals_rejected.jsonl", _pref("dpo", "dpo_chosen_equals_rejected.jsonl"),
         DataError, r"dpo_chosen_equals_rejected.jsonl:2: chosen and rejected are identical"),
    Case("dpo_ref_logps_nan.jsonl", _pref("dpo", "dpo_ref_logps_nan.jsonl"), DataError,
         r"dpo_ref_logps_nan.jsonl:2: field 'ref_chosen_logps' is nan, not a finite number"),
    Case("kto_label_not_bool.jsonl", _pref("kto", "kto_label_not_bool.jsonl"), DataError,
         r"kto_label_not_bool.jsonl:2: field 'label' must be a bool or 0/1, got str 'no'"),
    # Config overrides (one flag per line in the .flags file).
    Case("config_typo.flags", (), AttributeError,
         r'Did you mean "num_steps" instead of "num_stesp"', raised_by_jalign=False),
    Case("config_not_an_int.flags", (), flags.IllegalFlagValueError,
         r"flag --config.train.num_steps=abc: invalid literal for int\(\)", raised_by_jalign=False),
    Case("config_not_a_float.flags", (), flags.IllegalFlagValueError,
         r"flag --config.optimizer.learning_rate=fast: could not convert string to float",
         raised_by_jalign=False),
    Case("config_bad_choice.flags", (), ValueError,
         r"config.data.on_bad_row = 'skipp' is not valid \(did you mean 'skip'\?\)"),
    Case("config_not_positive.flags", (), ValueError,
         r"config.train.checkpoint_every must be positive, got 0"),
    Case("config_mesh_does_not_divide.flags", (), ValueError,
         r"mesh .*do not divide the 8"),
    # Saved params: a pickle is refused, never loaded.
    Case("params.pkl", ("--config.init_from={item}",), FileNotFoundError,
         r"{item} is a file, not a directory written by jalign.checkpoint.save_params; jalign "
         r"never unpickles"),
    Case("params_pickle_dir", ("--config.init_from={item}",), ValueError,
         r"config.init_from='{item}' holds no model jalign can start from \(found "
         r"\['params.pkl'\]\).*params.pkl looks pickled, and jalign never unpickles"),
]


def _read_first_batch(config, workdir):
    """What run() does with the data before its first step, without building the model."""
    validate_config(config)
    algo = get_algorithm(config.algo)
    setup = algo.setup(config, ModelConfig.from_mapping(config.model), algo.spec(config), workdir)
    return next(iter(setup.dataset(0, 1)))


def _expand(case, text, escape):
    path = os.path.join(CORPUS, case.item)
    return text.replace("{item}", re.escape(path) if escape else path)


def _raised_in_jalign(excinfo) -> bool:
    frame = excinfo.traceback[-1]
    return os.path.realpath(str(frame.path)).startswith(os.path.realpath(JALIGN_DIR) + os.sep)


def _check(excinfo, case):
    err = excinfo.value
    assert not isinstance(err, (KeyError, IndexError)), repr(err)
    assert re.search(_expand(case, case.message, escape=True), str(err)), str(err)
    if case.raised_by_jalign:
        assert _raised_in_jalign(excinfo), f"raised from {excinfo.traceback[-1]}"


@pytest.fixture(autouse=True)
def _no_pickle_runs(monkeypatch):
    # Corpus pickles set this variable when unpickled: nothing may ever load them.
    monkeypatch.delenv("JALIGN_PICKLE_EXECUTED", raising=False)
    yield
    assert "JALIGN_PICKLE_EXECUTED" not in os.environ, "a pickle was unpickled"


@pytest.mark.parametrize("case", RUN_CASES, ids=str)
def test_bad_input_through_train_run(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a template that escaped the sandbox would write PWNED here
    overrides = [_expand(case, f, escape=False) for f in case.flags]
    if case.item.endswith(".flags"):
        with open(os.path.join(CORPUS, case.item)) as f:
            overrides += f.read().split()
    with pytest.raises(case.error) as excinfo:
        config = parse_config(*overrides)
        (_read_first_batch if case.first_batch else run)(config, str(tmp_path / "workdir"))
    _check(excinfo, case)
    assert not os.path.exists(tmp_path / "PWNED")


HF_CASES = [
    Case("hf_truncated_safetensors", (), ValueError,
         r"{item}/model.safetensors is not a readable safetensors file"),
    Case("hf_config_missing_field", (), ValueError,
         r"{item}/config.json has no 'hidden_size'"),
    Case("hf_pickle_only", (), ValueError,
         r"no \*.safetensors in {item} \(found pickle weights; jalign loads safetensors only"),
]


@pytest.mark.parametrize("case", HF_CASES, ids=str)
def test_bad_hugging_face_folder(case):
    with pytest.raises(case.error) as excinfo:
        models.from_pretrained(os.path.join(CORPUS, case.item))
    _check(excinfo, case)


def _tiny_params(**overrides):
    return models.abstract_params(ModelConfig(**{**dict(
        vocab_size=128, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
        **overrides}))


def test_saved_params_of_another_shape_are_named(tmp_path):
    saved = str(tmp_path / "params")
    checkpoint.save_params(saved, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                               _tiny_params(hidden_size=32)))
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match=r"holds a checkpoint of another model shape: embed is \(128, 32\) "
                             r"there but \(128, 16\) in this config"):
        checkpoint.load_params(saved, _tiny_params())


def test_skip_mode_counts_and_reports_each_reason(tmp_path, capsys):
    """on_bad_row=skip: the bad rows are dropped, counted by reason and the first ones named.

    (tests/test_train.py trains such a run to the end through the command line.)
    """
    config = parse_config(*_pref("dpo", "dpo_mixed_bad_rows.jsonl"),
                          "--config.data.on_bad_row=skip")
    batch = _read_first_batch(config, str(tmp_path / "workdir"))
    out = capsys.readouterr().out
    assert ("skipped 4 rows (chosen_equals_rejected: 1, invalid_json: 1, missing_field: 1, "
            "wrong_type: 1); first examples:") in out
    for line, problem in ((3, "line is not valid JSON"), (4, "field 'rejected' is missing"),
                          (5, "chosen and rejected are identical"),
                          (6, "field 'rejected' must be a string")):
        assert f"dpo_mixed_bad_rows.jsonl:{line}: {problem}" in out
    # The 4 good pairs fill the batch (8 pairs, repeated), none of the bad ones.
    assert sorted(set(batch["example_index"].tolist())) == [0, 1, 2, 3]


def test_skip_mode_counts_rows_that_do_not_tokenise(tmp_path, capsys):
    """A prompt that fills max_length and a row the chat template rejects are skipped at
    start-up, counted with the file-level skips, named, and put in summary.json's entry."""
    roles, too_long = (os.path.join(CORPUS, f) for f in ("chat_unknown_role.jsonl",
                                                         "sft_prompt_too_long.jsonl"))
    config = parse_config("--config.data.source=jsonl", f"--config.data.path={roles},{too_long}",
                          "--config.data.tokenizer=" + os.path.join(
                              CORPUS, "tokenizer_template_checks_roles"),
                          "--config.data.max_prompt_length=48", "--config.data.on_bad_row=skip")
    validate_config(config)
    algo = get_algorithm(config.algo)
    setup = algo.setup(config, ModelConfig.from_mapping(config.model), algo.spec(config),
                       str(tmp_path / "workdir"))
    out = capsys.readouterr().out
    assert ("training data: skipped 2 rows (chat_template: 1, prompt_too_long: 1); "
            "first examples:") in out
    assert f"{roles}:2: chat template failed: TemplateError: unknown role wizard" in out
    assert f"{too_long}:2: prompt is 49 tokens (with BOS)" in out
    assert setup.summarize([], {})["skipped_rows"] == {"chat_template": 1, "prompt_too_long": 1}
    # Only the two good rows (line 1 of each file) are in the batches.
    batch = next(iter(setup.dataset(0, 1)))
    tokenizer = Tokenizer.from_file(os.path.join(CORPUS, "tokenizer_template_checks_roles"))
    texts = {tokenizer.decode(row[mask == 1])
             for row, mask in zip(batch["tokens"], batch["loss_mask"]) if mask.any()}
    assert texts == {"1 3", "1 3\n"}
    assert capsys.readouterr().out == ""  # nothing skipped, so nothing reported, later


def test_data_that_looks_like_code_stays_text(tmp_path, monkeypatch):
    """A field holding Python or Jinja source is data: read, validated and tokenised as text."""
    monkeypatch.chdir(tmp_path)
    path = os.path.join(CORPUS, "sft_python_code.jsonl")
    (record,), _ = load_records(path, required_fields=("prompt", "completion"))
    assert record["prompt"] == "__import__('os').system('touch PWNED')\n"
    assert record["completion"].startswith("{{ cycler.__init__")
    tokenizer = Tokenizer.from_file(os.path.join(CORPUS, os.pardir, os.pardir, "jalign", "assets"))
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": record["completion"]}])
    assert record["completion"] in rendered  # a message is never rendered as a template
    assert tokenizer.decode(tokenizer.encode(record["prompt"])) == record["prompt"]
    assert not os.path.exists(tmp_path / "PWNED")
