"""Shared fixtures for the data tests: the built-in char-level tokenizer (and a
variant whose chat template rejects unknown roles)."""

import pytest

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
