"""Shared fixtures for the data tests: the built-in char-level tokenizer."""

import pytest

from jalign.tokenizer import builtin_tokenizer


@pytest.fixture
def tokenizer():
    return builtin_tokenizer()
