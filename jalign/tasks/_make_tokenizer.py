"""Builds the character-level tokenizer shipped in ``jalign/assets``.

Run ``python -m jalign.tasks._make_tokenizer`` to regenerate
``jalign/assets/tokenizer.json`` and ``tokenizer_config.json``; a test checks
that the committed files match what this module builds.

Ids: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, then the printable
ASCII characters (space to ``~``) in code-point order, then ``"\\n"``. There is
no normaliser and no pre-tokeniser, and the BPE model has no merges, so every
character becomes exactly one id; the ``Fuse`` decoder concatenates tokens
without inserting spaces, so decode inverts encode.
"""

from __future__ import annotations

import json
import pathlib

import tokenizers
from tokenizers import decoders, models

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARACTERS = tuple(chr(code) for code in range(0x20, 0x7F)) + ("\n",)

# One "role: content" line per message; the assistant turn ends with EOS so
# SFT on rendered chats learns to stop. The newline is an expression because
# trim_blocks (on, as in Hugging Face) eats a newline right after a block tag.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

TOKENIZER_CONFIG = {
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "chat_template": CHAT_TEMPLATE,
}

ASSETS_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets"


def build_char_tokenizer() -> tokenizers.Tokenizer:
    """Returns the character-level ``tokenizers.Tokenizer`` (100 ids)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tokenizer = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=False))
    tokenizer.add_special_tokens([
        tokenizers.AddedToken(token, special=True, normalized=False)
        for token in SPECIAL_TOKENS
    ])
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


def write_assets(directory: pathlib.Path = ASSETS_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    build_char_tokenizer().save(str(directory / "tokenizer.json"), pretty=True)
    (directory / "tokenizer_config.json").write_text(
        json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")


if __name__ == "__main__":
    write_assets()
    print(f"wrote {ASSETS_DIR}/tokenizer.json and tokenizer_config.json")
