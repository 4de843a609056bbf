"""Tokenizer wrapper: the ids jalign needs on top of ``tokenizers.Tokenizer``.

``builtin_tokenizer()`` is the character-level tokenizer shipped in
``jalign/assets`` (no download): one id per character of printable ASCII plus
``"\\n"``, and ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3.
``Tokenizer.from_file`` also reads Hugging Face tokenizer folders.

Text is encoded exactly as given: no special tokens are added. As in every
``tokenizers`` tokenizer, a literal special-token string in the text (say
``"<eos>"``) encodes to that token's id; chat templates rely on this.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any, Iterable, Sequence

import jinja2
import jinja2.sandbox
import tokenizers

_ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
# Tried in order when a tokenizer has no config naming its EOS token.
_EOS_GUESSES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>",
                "<|im_end|>", "<|eot_id|>")


class Tokenizer:
    """Thin wrapper over tokenizers.Tokenizer with the ids jalign needs.

    Attributes:
      vocab_size: number of ids, added tokens included.
      pad_id: padding id (the EOS id when the tokenizer names no pad token).
      eos_id: end-of-sequence id.
      bos_id: beginning-of-sequence id, or None.
      unk_id: unknown-token id, or None.
      chat_template: Jinja2 chat template, or None.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        eos_token: str,
        pad_token: str | None = None,
        bos_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
    ):
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token = eos_token
        self.eos_id = self._id_of(eos_token, "eos_token")
        self.pad_token = eos_token if pad_token is None else pad_token
        self.pad_id = self._id_of(self.pad_token, "pad_token")
        self.bos_token = bos_token
        self.bos_id = None if bos_token is None else self._id_of(bos_token, "bos_token")
        self.unk_token = unk_token
        self.unk_id = None if unk_token is None else self._id_of(unk_token, "unk_token")
        self.chat_template = chat_template

    def _id_of(self, token: str, role: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{role} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; no special tokens are added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (any int sequence or 1-D array)."""
        return self._tokenizer.decode(
            [int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """Renders ``messages`` with the chat template in a Jinja2 sandbox.

        The template sees ``messages``, ``add_generation_prompt``,
        ``bos_token``, ``eos_token``, ``pad_token``, ``tools`` (JSON schemas of the
        tools the model may call, or None; see jalign.tools.function_schema) and
        ``raise_exception(msg)``, as Hugging Face templates expect.

        Raises:
          ValueError: no chat template, or the template fails to compile or
            render (including sandbox violations); the message says why.
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template")
        try:
            template = _compile_template(self.chat_template)
            return template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token,
                pad_token=self.pad_token,
                tools=list(tools) if tools else None,
            )
        except Exception as e:  # Any failure inside a user template.
            raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from e

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> Tokenizer:
        """Loads a ``tokenizer.json`` file, or a folder holding one.

        Token names and the chat template come from ``tokenizer_config.json``
        (and ``special_tokens_map.json``, ``chat_template.jinja``) beside
        ``tokenizer.json``, as in Hugging Face folders; tokens may be strings
        or ``{"content": ...}`` dicts. Without an EOS token in the config, a
        conventional one ("</s>", "<|endoftext|>", ...) is looked up; without a
        pad token, EOS pads.

        Raises:
          ValueError: a file is missing or unparsable, or no EOS token is found.
        """
        path = pathlib.Path(path)
        if path.is_dir():
            json_path = path / "tokenizer.json"
            folder = path
        else:
            json_path = path
            # A bare file named otherwise is taken to stand alone.
            folder = path.parent if path.name == "tokenizer.json" else None
        if not json_path.is_file():
            raise ValueError(f"tokenizer file not found: {json_path}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(json_path))
        except Exception as e:  # tokenizers raises bare Exception on bad json.
            raise ValueError(f"could not parse tokenizer file {json_path}: {e}") from e

        config: dict[str, Any] = {}
        if folder is not None:
            config.update(_read_json_if_present(folder / "special_tokens_map.json"))
            config.update(_read_json_if_present(folder / "tokenizer_config.json"))
        tokens = {
            key: _token_content(config.get(key), key)
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        if tokens["eos_token"] is None:
            vocab = backend.get_vocab(with_added_tokens=True)
            tokens["eos_token"] = next((t for t in _EOS_GUESSES if t in vocab), None)
            if tokens["eos_token"] is None:
                raise ValueError(
                    f"no EOS token for {json_path}: name one as eos_token in "
                    "tokenizer_config.json beside it")
        if tokens["unk_token"] is None:
            tokens["unk_token"] = getattr(backend.model, "unk_token", None)
        chat_template = _chat_template(config.get("chat_template"), json_path)
        if chat_template is None and folder is not None:
            jinja_path = folder / "chat_template.jinja"
            if jinja_path.is_file():
                chat_template = jinja_path.read_text()
        return cls(backend, chat_template=chat_template, **tokens)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id}, bos_id={self.bos_id})")


@functools.cache
def builtin_tokenizer() -> Tokenizer:
    """The character-level tokenizer shipped with jalign (100 ids)."""
    return Tokenizer.from_file(_ASSETS_DIR)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_template_error
    return env.from_string(source)


def _raise_template_error(message: str):
    raise jinja2.TemplateError(message)


def _read_json_if_present(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"could not parse {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(token: Any, key: str) -> str | None:
    if token is None or isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    raise ValueError(f"{key} should be a string or a {{'content': ...}} dict, got {token!r}")


def _chat_template(template: Any, json_path: pathlib.Path) -> str | None:
    if template is None or isinstance(template, str):
        return template
    # Some configs list named templates: [{"name": "default", "template": ...}].
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"unsupported chat_template in the config beside {json_path}")
