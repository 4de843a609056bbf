"""Hugging Face checkpoints in and out: safetensors <-> params (config: hf_config.py).

`from_pretrained` reads a local folder (config.json and one or many
*.safetensors) straight onto the parameter shardings: each jalign parameter is
assembled on the host alone (all layers of it stacked), then every device takes
only its shard through `jax.make_array_from_callback`, so host memory peaks near
the largest stacked parameter, not the model. `save_pretrained` writes the
reverse, layer slice by layer slice, in shards of at most `max_shard_size`.

Safetensors only: no pickle, no remote code. Families: Llama 2/3, Mistral,
Qwen2/2.5, Qwen3, Gemma 2 and Gemma 3 (text). HF linear weights are [out, in];
jalign keeps [in, ...out] with heads split ([H, heads, head_dim]) and layers
stacked on a leading axis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import glob
import json
import math
import os
import re
import shutil
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import save_file

from jalign import sharding as shd
from jalign.models.config import ModelConfig
from jalign.models.hf_config import config_from_hf, config_to_hf
from jalign.models.transformer import Decoder

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
# Non-architecture keys save_pretrained copies from `extra_config`.
EXTRA_CONFIG_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# config.json keys without a default (config_from_hf indexes them).
_REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads")
__all__ = ["abstract_params", "config_from_hf", "config_to_hf", "from_pretrained",
           "save_pretrained"]


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One jalign parameter and its HF tensor name ("{i}" = layer index).

    kind: "copy" (same shape), "flat" (HF [n*d] -> jalign [n, d]), "in" (HF
    [out, in] -> jalign [in, *out]) or "out" (HF [out, in] -> jalign [*in, out]).
    """

    path: tuple[str, ...]
    hf: str
    kind: str

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.kind == "in":
            return (math.prod(shape[1:]), shape[0])
        if self.kind == "out":
            return (shape[-1], math.prod(shape[:-1]))
        if self.kind == "flat":
            return (math.prod(shape),)
        return tuple(shape)

    def to_jalign(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return (w if self.kind in ("copy", "flat") else w.T).reshape(shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        shape = self.hf_shape(x.shape)
        if self.kind in ("copy", "flat"):
            return np.ascontiguousarray(x.reshape(shape))
        return np.ascontiguousarray(x.reshape(shape[::-1]).T)


def _tensor_table(config: ModelConfig) -> list[_Tensor]:
    """Every parameter of `config`'s Decoder with its HF name, in HF's order."""
    layer = "model.layers.{i}."
    table = [_Tensor(("embed",), "model.embed_tokens.weight", "copy")]
    norms = [("attn_norm", "input_layernorm")]
    if config.sandwich_norms:
        norms += [("post_attn_norm", "post_attention_layernorm"),
                  ("mlp_norm", "pre_feedforward_layernorm"),
                  ("post_mlp_norm", "post_feedforward_layernorm")]
    else:
        norms += [("mlp_norm", "post_attention_layernorm")]
    table += [_Tensor(("layers", ours, "scale"), layer + f"{theirs}.weight", "copy")
              for ours, theirs in norms]
    for name in ("q", "k", "v", "o"):
        table.append(_Tensor(("layers", "attn", f"{name}_proj"),
                             layer + f"self_attn.{name}_proj.weight", "out" if name == "o" else "in"))
    if config.qkv_bias:
        table += [_Tensor(("layers", "attn", f"{n}_bias"), layer + f"self_attn.{n}_proj.bias", "flat")
                  for n in "qkv"]
    if config.qk_norm:
        table += [_Tensor(("layers", "attn", f"{n}_norm", "scale"),
                          layer + f"self_attn.{n}_norm.weight", "copy") for n in "qk"]
    table += [_Tensor(("layers", "mlp", f"{n}_proj"), layer + f"mlp.{n}_proj.weight", "in")
              for n in ("gate", "up", "down")]
    table.append(_Tensor(("final_norm", "scale"), "model.norm.weight", "copy"))
    if not config.tie_embeddings:
        table.append(_Tensor(("lm_head",), "lm_head.weight", "in"))
    return table


def _boxed_params(config: ModelConfig):
    """Boxed (logically annotated) ShapeDtypeStructs of the Decoder's params."""
    init = lambda: Decoder(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    return jax.eval_shape(init)["params"]


def abstract_params(config: ModelConfig, *, mesh: Mesh | None = None, rules=None) -> Any:
    """ShapeDtypeStructs of the params with their NamedShardings (e.g. for load_params).

    `mesh` None means the first device alone; `rules` None the default rule table.
    """
    boxed = _boxed_params(config)
    shardings = shd.logical_shardings(boxed, mesh or _default_mesh(),
                                      shd.rules_from_config(rules))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        nn.meta.unbox(boxed), shardings)


def _hf_names(entry: _Tensor, shape, num_layers: int):
    """[(hf name, layer index or None, per-tensor jalign shape)]."""
    if entry.path[0] == "layers":
        return [(entry.hf.format(i=i), i, tuple(shape[1:])) for i in range(num_layers)]
    return [(entry.hf, None, tuple(shape))]


def _weight_map(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file name, from the index or the files themselves."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        for file in sorted(set(weight_map.values())):
            if not os.path.exists(os.path.join(path, file)):
                raise ValueError(f"{index} names {file}, which is not in {path}")
        return weight_map
    files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        pickles = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt*"))
        hint = (" (found pickle weights; jalign loads safetensors only — convert them with "
                "transformers' save_pretrained(safe_serialization=True))") if pickles else ""
        raise ValueError(f"no *.safetensors in {path}{hint}")
    weight_map = {}
    for file in files:
        with _safe_open(os.path.join(path, file)) as f:
            for name in f.keys():
                if name in weight_map:
                    raise ValueError(f"tensor {name} is in both {weight_map[name]} and {file}")
                weight_map[name] = file
    return weight_map


def _safe_open(file: str):
    try:
        return safe_open(file, framework="numpy")
    except Exception as e:  # SafetensorError: a truncated or corrupt file
        raise ValueError(f"{file} is not a readable safetensors file ({e}); it may be "
                         "truncated: download or save it again") from e


def _read_config_json(config_path: str) -> dict[str, Any]:
    try:
        with open(config_path) as f:
            hf_config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(hf_config, dict):
        raise ValueError(f"{config_path} should hold a JSON object, got {type(hf_config).__name__}")
    for key in _REQUIRED_CONFIG_KEYS:
        if key not in hf_config:
            raise ValueError(f"{config_path} has no {key!r} (a Hugging Face config.json of a "
                             "supported family names it)")
    return hf_config


def _default_mesh() -> Mesh:
    return shd.make_mesh({}, jax.devices()[:1])


def from_pretrained(path: str, *, mesh: Mesh | None = None, dtype: str | None = None,
                    rules=None) -> tuple[ModelConfig, Any]:
    """Loads a local Hugging Face folder as (ModelConfig, params placed on `mesh`).

    Args:
      path: folder with config.json and model.safetensors or shards plus
        model.safetensors.index.json.
      mesh: ("data", "fsdp", "tensor") mesh; None puts everything on the first device.
      dtype: parameter and compute dtype ("float32", "bfloat16", "float16"); None
        keeps the checkpoint's (that of model.embed_tokens.weight).
      rules: logical axis rule table (jalign.sharding.DEFAULT_RULES when None).

    Returns:
      (config, params): params unboxed, each a jax.Array with its NamedSharding.

    Raises:
      ValueError naming the tensor and file for a missing, unexpected or
      wrongly shaped tensor, or naming the unsupported config.json key.
    """
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no config.json in {path} (expected a Hugging Face model folder)")
    hf_config = _read_config_json(config_path)
    weight_map = _weight_map(path)
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(_safe_open(os.path.join(path, name)))
                 for name in sorted(set(weight_map.values()))}
        if dtype is None and "model.embed_tokens.weight" in weight_map:
            stored = files[weight_map["model.embed_tokens.weight"]].get_slice(
                "model.embed_tokens.weight").get_dtype()
            dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(stored)
        config = config_from_hf(hf_config, dtype=dtype)
        params = _load_tensors(config, path, weight_map, files,
                               abstract_params(config, mesh=mesh or _default_mesh(), rules=rules))
    return config, params


def load_weights(path: str, abstract: Any) -> Any:
    """The weights of the Hugging Face folder `path` as the params `abstract` describes.

    `abstract` is a params tree of ShapeDtypeStructs with shardings (e.g. the
    training state's, `jalign.state.abstract_with_shardings`): each tensor is read,
    cast to the struct's dtype and placed on its sharding, one tensor at a time.
    Raises ValueError naming the tensor and file when the folder does not fit it.
    """
    hf_config = _read_config_json(os.path.join(path, "config.json"))
    weight_map = _weight_map(path)
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(_safe_open(os.path.join(path, name)))
                 for name in sorted(set(weight_map.values()))}
        return _load_tensors(config_from_hf(hf_config), path, weight_map, files, abstract)


def _load_tensors(config, path, weight_map, files, abstract):
    structs = traverse_util.flatten_dict(abstract)
    shardings = {k: v.sharding for k, v in structs.items()}
    shapes = structs
    table = _tensor_table(config)
    assert {e.path for e in table} == set(shapes), "tensor table out of date with Decoder"
    plan = {e.path: _hf_names(e, shapes[e.path].shape, config.num_layers) for e in table}
    expected = {name for names in plan.values() for name, _, _ in names}
    ignored = {"lm_head.weight"} if config.tie_embeddings else set()  # a tied duplicate
    missing = sorted(expected - set(weight_map))
    if missing:
        raise ValueError(f"tensor {missing[0]} is missing from {path} ({len(missing)} missing "
                         f"in all; a {config.family} model with this config.json needs them)")
    extra = sorted(set(weight_map) - expected - ignored)
    if extra:
        raise ValueError(f"unexpected tensor {extra[0]} in {os.path.join(path, weight_map[extra[0]])}"
                         f" ({len(extra)} unexpected in all; not part of a {config.family} model "
                         "with this config.json)")
    keys = {file: set(handle.keys()) for file, handle in files.items()}
    for entry in table:
        for name, _, shape in plan[entry.path]:
            if name not in keys[weight_map[name]]:
                raise ValueError(f"tensor {name} is missing from "
                                 f"{os.path.join(path, weight_map[name])}, where {INDEX_FILE} "
                                 "puts it")
            got = tuple(files[weight_map[name]].get_slice(name).get_shape())
            if got != entry.hf_shape(shape):
                raise ValueError(f"tensor {name} in {os.path.join(path, weight_map[name])} has "
                                 f"shape {got}, expected {entry.hf_shape(shape)} from config.json")
    params = {}
    for entry in table:
        struct = shapes[entry.path]
        host = np.empty(struct.shape, struct.dtype)  # the one full-size host buffer
        for name, layer, shape in plan[entry.path]:
            w = entry.to_jalign(files[weight_map[name]].get_tensor(name), shape)
            host[() if layer is None else layer] = w
            del w
        params[entry.path] = jax.make_array_from_callback(
            struct.shape, shardings[entry.path], lambda index, host=host: host[index])
        # device_put leaves the host buffer in a reference cycle; without a
        # collection here every stacked buffer would stay alive until the end.
        del host
        gc.collect(0)
    return traverse_util.unflatten_dict(params)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '500MB', '5GB'")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def save_pretrained(config: ModelConfig, params: Any, path: str, *, tokenizer_dir: str | None = None,
                    max_shard_size: int | str = "5GB",
                    extra_config: Mapping[str, Any] | None = None) -> None:
    """Writes `params` as a Hugging Face folder transformers loads as `config.family`.

    Writes config.json, model.safetensors (or model-0000k-of-0000n.safetensors
    shards of at most `max_shard_size` plus model.safetensors.index.json) and
    copies the tokenizer files found in `tokenizer_dir`. `extra_config` may set
    bos/eos/pad token ids. Host memory holds one shard at a time. In multi-process
    runs every process must call this; process 0 writes.
    """
    hf_config = config_to_hf(config)
    for key, value in (extra_config or {}).items():
        if key in EXTRA_CONFIG_KEYS:
            hf_config[key] = value
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    table = _tensor_table(config)
    shapes = traverse_util.flatten_dict(nn.meta.unbox(_boxed_params(config)))
    for entry in table:
        if entry.path not in flat:
            raise ValueError(f"params has no {'/'.join(entry.path)} (needed by this model config)")
        if tuple(flat[entry.path].shape) != shapes[entry.path].shape:
            raise ValueError(f"params {'/'.join(entry.path)} has shape {flat[entry.path].shape}, "
                             f"expected {shapes[entry.path].shape} from the model config")
    extra = sorted("/".join(p) for p in set(flat) - {e.path for e in table})
    if extra:
        raise ValueError(f"params has tensors this model config does not use: {extra[:5]}")
    # HF order: embedding, then layer by layer, then the final norm and head.
    items = []
    for entry in table:
        for name, layer, shape in _hf_names(entry, flat[entry.path].shape, config.num_layers):
            nbytes = math.prod(shape) * np.dtype(flat[entry.path].dtype).itemsize
            key = (-1 if entry.path[0] == "embed" else config.num_layers if layer is None else layer)
            items.append((key, len(items), name, entry, layer, nbytes))
    items.sort(key=lambda item: item[:2])
    limit, shards = _parse_size(max_shard_size), [[]]
    for item in items:
        if shards[-1] and sum(i[-1] for i in shards[-1]) + item[-1] > limit:
            shards.append([])
        shards[-1].append(item)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = ("model.safetensors" if len(shards) == 1
                else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
        tensors = {}
        for _, _, name, entry, layer, _ in shard:
            value = flat[entry.path] if layer is None else flat[entry.path][layer]
            tensors[name] = entry.to_hf(_host(value))
            weight_map[name] = file
        if writer:
            save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        del tensors
    if not writer:
        return
    if len(shards) > 1:
        total = sum(item[-1] for item in items)
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer_dir is not None:
        found = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer_dir, n))]
        if not found:
            raise ValueError(f"no tokenizer files in {tokenizer_dir}; looked for {TOKENIZER_FILES}")
        for name in found:
            shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(path, name))
