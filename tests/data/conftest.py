"""Shared fixtures for the data tests: the built-in char-level tokenizer (and a
variant whose chat template rejects unknown roles), and a ChatML chat tokenizer."""

import json
import pathlib

import pytest
import tokenizers

from jalign.tokenizer import Tokenizer, builtin_tokenizer


@pytest.fixture
def tokenizer():
    return builtin_tokenizer()


ROLE_CHECKING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ('user', 'assistant') %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture
def role_checking_tokenizer():
    """The built-in tokenizer with a chat template that raises on roles it does not know."""
    builtin = builtin_tokenizer()  # cached and shared: never mutate it
    return Tokenizer(builtin.backend, eos_token=builtin.eos_token,
                     pad_token=builtin.pad_token, bos_token=builtin.bos_token,
                     unk_token=builtin.unk_token, chat_template=ROLE_CHECKING_TEMPLATE)


# ChatML as SmolLM2-Instruct and Qwen write it: a default system turn when the
# conversation has none, every turn closed by <|im_end|> and a newline.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_chatml_tokenizer(folder) -> str:
    """A Hugging Face tokenizer folder: the built-in characters plus <|im_start|> and
    <|im_end|> (EOS), the ChatML template, no BOS. Returns the folder's path."""
    backend = tokenizers.Tokenizer.from_str(builtin_tokenizer().backend.to_str())
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<pad>", "unk_token": "<unk>",
         "chat_template": CHATML_TEMPLATE}))
    return str(folder)


@pytest.fixture
def chatml_tokenizer(tmp_path):
    return Tokenizer.from_file(write_chatml_tokenizer(tmp_path / "chatml_tokenizer"))
