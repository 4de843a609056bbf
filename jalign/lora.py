"""LoRA / QLoRA around the one decoder: split, quantise, merge.

The decoder creates adapters itself when `ModelConfig.lora_rank > 0` (see
`jalign.models.transformer._project`); this module handles the trees:

* `split(params)` -> (trainable, base): the adapters (plus any scalar head of a
  reward model or critic) are trained; everything else is the frozen base, kept
  in `state.frozen["base"]` with no optimizer state.
* `freeze_base(base, config)` stores the base in `config.lora_base_dtype`, with
  the projections quantised (int8 / nf4, qwix QArrays) when
  `config.lora_quantization` asks for it.
* `merge(base, trainable)` is the model's params again (dict union: no copy).
  The base alone is the model with its adapters disabled: that is the reference
  of a LoRA run (DPO / PPO / GRPO), so no second parameter tree exists.
* `merge_adapters(params, config)` folds `W + alpha/r * A @ B` into dense weights
  for export (`python -m jalign.convert --lora_base=...`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jalign.models.config import LORA_TARGETS, ModelConfig

ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
# Trained fully next to the adapters (TRL/PEFT's modules_to_save for a score head).
TRAINED_WITH_ADAPTERS = ("score_head", "score_bias")
# Leading input axes of each stacked projection [layers, in..., out...].
_INPUT_AXES = {name: (1, 2) if name == "o_proj" else (1,) for name in LORA_TARGETS}


def _is_trainable(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES) or name in TRAINED_WITH_ADAPTERS


def split(params: Any) -> tuple[dict, dict]:
    """(trainable, base) nested dicts; a leaf goes to trainable if its name is an adapter."""
    trainable, base = {}, {}
    for key, value in params.items():
        if isinstance(value, dict):
            t, b = split(value)
            if t:
                trainable[key] = t
            if b:
                base[key] = b
        elif _is_trainable(key):
            trainable[key] = value
        else:
            base[key] = value
    return trainable, base


def without_adapters(params: Any) -> Any:
    """The tree with every adapter leaf removed (what a checkpoint of the base holds)."""
    if not isinstance(params, dict):
        return params
    return {k: without_adapters(v) for k, v in params.items() if not k.endswith(ADAPTER_SUFFIXES)}


def merge(base: Any, trainable: Any) -> Any:
    """The union of two nested dicts (trainable entries win); arrays are shared, not copied."""
    if not isinstance(trainable, dict) or not isinstance(base, dict):
        return trainable
    out = dict(base)
    for key, value in trainable.items():
        out[key] = merge(base[key], value) if key in base else value
    return out


def _boxed(fn, leaf):
    """Applies fn to a (possibly LogicallyPartitioned) leaf, keeping its box."""
    if isinstance(leaf, nn.LogicallyPartitioned):
        return leaf.replace_boxed(fn(leaf.value))
    return fn(leaf)


def quantize(w, name: str, qtype: str, block: int, scale_dtype):
    """A stacked projection [L, in..., out...] as a qwix QArray: per output channel
    (and layer) scales, in blocks of `block` along the last input axis."""
    import qwix  # deferred: a heavy import only QLoRA runs need

    in_axes = _INPUT_AXES[name]
    last_in = in_axes[-1]
    channelwise = [i for i in range(w.ndim) if i != last_in]
    tiled = {}
    if w.shape[last_in] % block == 0 and w.shape[last_in] > block:
        tiled = {last_in: block}
    return qwix.quantize(w, jnp.int8 if qtype == "int8" else qtype,
                         channelwise_axes=channelwise, tiled_axes=tiled,
                         scale_dtype=scale_dtype)


def dequantize(qarray) -> jax.Array:
    import qwix  # deferred: a heavy import only QLoRA runs need
    return qwix.dequantize(qarray)


def _quantize_leaf(leaf, name: str, config: ModelConfig):
    scale_dtype = config.base_dtype
    if not isinstance(leaf, nn.LogicallyPartitioned):
        return quantize(leaf, name, config.lora_quantization, config.lora_quantization_block,
                        scale_dtype)
    q = quantize(leaf.value, name, config.lora_quantization, config.lora_quantization_block,
                 scale_dtype)
    # The scale keeps the weight's logical axis only where it is not reduced.
    scale_names = tuple(n if s == full else None
                        for n, s, full in zip(leaf.names, q.scale.shape, q.qvalue.shape))
    return q.replace(qvalue=leaf.replace_boxed(q.qvalue),
                     scale=nn.LogicallyPartitioned(q.scale, scale_names, mesh=leaf.mesh,
                                                   rules=leaf.rules))


def freeze_base(base: dict, config: ModelConfig) -> dict:
    """The frozen base as stored: `lora_base_dtype`, projections quantised if configured."""
    out = {}
    for key, value in base.items():
        if isinstance(value, dict):
            out[key] = freeze_base(value, config)
        elif config.lora_quantization != "none" and key in LORA_TARGETS:
            out[key] = _quantize_leaf(value, key, config)
        else:
            out[key] = _boxed(lambda v: v.astype(config.base_dtype), value)
    return out


def merge_adapters(params: dict, config: ModelConfig) -> dict:
    """Dense params with every adapter folded in: W + alpha/r * A @ B (float32 math).

    The result has no adapter leaves and the base's structure, ready for
    `jalign.models.hf.save_pretrained` or a later stage's `init_from`.
    """
    scale = config.lora_alpha / max(config.lora_rank, 1)
    out = {}
    for key, value in params.items():
        if key.endswith(ADAPTER_SUFFIXES):
            continue
        if isinstance(value, dict):
            out[key] = merge_adapters(value, config)
            continue
        w = dequantize(value) if hasattr(value, "qvalue") else value
        a, b = params.get(f"{key}_lora_a"), params.get(f"{key}_lora_b")
        if a is not None:
            # Stacked layers: A [L, in..., r], B [L, r, out...] -> delta [L, in..., out...].
            delta = jax.vmap(lambda a_, b_: jnp.tensordot(a_, b_, axes=1))(
                a.astype(jnp.float32), b.astype(jnp.float32))
            w = (w.astype(jnp.float32) + scale * delta).astype(config.weight_dtype)
        else:
            w = w.astype(config.weight_dtype)
        out[key] = w
    return out


def num_params(tree: Any) -> int:
    """Number of parameters (quantised arrays count their values, not their scales)."""
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "qvalue")):
        total += int(np.prod((leaf.qvalue if hasattr(leaf, "qvalue") else leaf).shape))
    return total
