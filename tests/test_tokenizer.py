"""Tests for jalign.tokenizer and the shipped character-level tokenizer."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models

from jalign.tasks import _make_tokenizer
from jalign.tokenizer import Tokenizer, builtin_tokenizer

PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n"


def test_builtin_special_ids_and_vocab():
    tok = builtin_tokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 4 + 95 + 1
    assert tok.encode(PRINTABLE) == list(range(4, 100))


@pytest.mark.parametrize("text", [
    "",
    " ",
    "sort: 7 3 9 1\n",
    "  leading and trailing spaces  ",
    "a  b\n\nc \n d",
    "MiXeD CaSe ~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./",
    PRINTABLE * 3,
])
def test_builtin_round_trip_is_exact_one_id_per_char(text):
    tok = builtin_tokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, np.int32)) == text


def test_builtin_random_round_trips():
    tok = builtin_tokenizer()
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list(PRINTABLE), size=rng.integers(0, 60)))
             for _ in range(200)]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in batch] == texts


def test_unknown_characters_become_unk():
    tok = builtin_tokenizer()
    ids = tok.encode("a\té")
    assert ids == [tok.encode("a")[0], tok.unk_id, tok.unk_id]


def test_decode_skips_special_tokens_unless_asked():
    tok = builtin_tokenizer()
    ids = [tok.bos_id] + tok.encode("hi there") + [tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(ids) == "hi there"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>hi there<eos><pad><pad>"


def test_shipped_assets_match_generator(tmp_path):
    _make_tokenizer.write_assets(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shipped = json.loads((_make_tokenizer.ASSETS_DIR / name).read_text())
        assert shipped == json.loads((tmp_path / name).read_text()), name


def test_builtin_chat_template():
    tok = builtin_tokenizer()
    messages = [{"role": "user", "content": "sort: 3 1"},
                {"role": "assistant", "content": "1 3"},
                {"role": "user", "content": "sort: 2 0"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<bos>user: sort: 3 1\nassistant: 1 3<eos>\nuser: sort: 2 0\nassistant: "
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 1
    no_prompt = tok.apply_chat_template(messages[:1])
    assert no_prompt == "<bos>user: sort: 3 1\n"


def _save(tokenizer, path):
    tokenizer.save(str(path))
    return path


@pytest.mark.parametrize("template, expected", [
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{{ messages.append(1) }}", "unsafe"),
    ("{% for m in messages %}", "for"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
])
def test_chat_template_failures_are_value_errors(template, expected):
    tok = Tokenizer(builtin_tokenizer().backend, eos_token="<eos>", chat_template=template)
    with pytest.raises(ValueError, match="chat template failed") as info:
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    assert expected in str(info.value)


def test_no_chat_template_is_a_value_error():
    tok = Tokenizer(builtin_tokenizer().backend, eos_token="<eos>")
    with pytest.raises(ValueError, match="no chat_template"):
        tok.apply_chat_template([])


def _word_level(vocab_tokens, specials):
    vocab = {t: i for i, t in enumerate(vocab_tokens)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=vocab_tokens[0]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True) for s in specials])
    return tok


def test_hf_folder_with_dict_tokens_and_eos_as_pad(tmp_path):
    _save(_word_level(["[UNK]", "<s>", "</s>", "hello", "world"], ["<s>", "</s>"]),
          tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "lstrip": False},
        "eos_token": {"content": "</s>"},
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }))
    tok = Tokenizer.from_file(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.encode("hello world") == [3, 4]
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey"
    # The file itself finds the config beside it too.
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").bos_id == 1


def test_bare_file_guesses_eos(tmp_path):
    path = _save(_word_level(["[UNK]", "<|endoftext|>", "a"], ["<|endoftext|>"]),
                 tmp_path / "custom.json")
    tok = Tokenizer.from_file(path)
    assert tok.eos_id == tok.pad_id == 1
    assert tok.bos_id is None and tok.chat_template is None


def test_missing_eos_is_a_value_error(tmp_path):
    path = _save(_word_level(["[UNK]", "a"], []), tmp_path / "custom.json")
    with pytest.raises(ValueError, match="no EOS token.*custom.json"):
        Tokenizer.from_file(path)


def test_config_naming_absent_token_is_a_value_error(tmp_path):
    _save(_word_level(["[UNK]", "</s>"], ["</s>"]), tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ValueError, match="pad_token '<pad>' is not in"):
        Tokenizer.from_file(tmp_path)


def test_missing_and_unparsable_files_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="not found: .*nowhere.json"):
        Tokenizer.from_file(tmp_path / "nowhere.json")
    with pytest.raises(ValueError, match="not found: .*empty_dir.tokenizer.json"):
        (tmp_path / "empty_dir").mkdir()
        Tokenizer.from_file(tmp_path / "empty_dir")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="could not parse tokenizer file .*bad.json"):
        Tokenizer.from_file(bad)
    folder = tmp_path / "folder"
    folder.mkdir()
    _save(builtin_tokenizer().backend, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="could not parse .*tokenizer_config.json"):
        Tokenizer.from_file(folder)


def test_builtin_is_cached():
    assert builtin_tokenizer() is builtin_tokenizer()
