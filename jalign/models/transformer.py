"""One decoder-only transformer in Flax, returning final hidden states.

One module with options covers Llama, Mistral, Qwen2/3 and Gemma 2/3 (see
`ModelConfig`). The unembedding is applied by the caller through
`jalign.ops.token_logprobs`, so [tokens, vocab] logits are never built here (the
callers pass `config.final_logit_softcap` to it). Every parameter carries logical
axis names; `jalign.sharding` maps them to mesh axes with the config's rule table.

Logical axes used: "vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp",
"norm", "layers" (parameters) and "batch", "length", "act_embed" (activations).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix

from jalign.models import attention
from jalign.models.config import ModelConfig
from jalign.models.projection import project

_INIT = nn.initializers.normal(stddev=0.02)


def _param(module: nn.Module, name: str, shape, axes, init=_INIT):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                        module.config.weight_dtype)


# LoRA A starts like a fan-in uniform layer, B at zero, so a fresh adapter is a no-op.
_LORA_A_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _project(module: nn.Module, name: str, equation: str, x, shape, axes):
    """`einsum(equation, x, W)` for the weight `name`, plus its LoRA delta if it has one.

    W may be stored quantised (a qwix QArray, for QLoRA): it is dequantised here.
    `config.projection_backward` picks how W's gradient is computed
    (`jalign.models.projection`).
    The adapters `name_lora_a` [in..., r] and `name_lora_b` [r, out...] are created
    at init when the config targets `name`; at apply they are used only if present,
    so a params tree without them computes the base model exactly.
    """
    c = module.config
    dt = c.compute_dtype
    w = _param(module, name, shape, axes)
    if isinstance(w, qwix.QArray):  # quantised frozen base (jalign.lora.freeze_base)
        w = qwix.dequantize(w)
    w = w.astype(dt)
    y = project(equation, x, w, c.projection_backward)
    if not c.lora_rank or name not in c.lora_targets:
        return y
    a_name, b_name = f"{name}_lora_a", f"{name}_lora_b"
    if not module.is_initializing() and not module.has_variable("params", a_name):
        return y  # adapters disabled: the base model
    inputs, out = equation.split("->")
    x_sub, w_sub = inputs.split(",")
    n_in = sum(ch in x_sub for ch in w_sub)  # W's leading axes are contracted with x
    r = c.lora_rank
    a = _param(module, a_name, tuple(shape[:n_in]) + (r,), tuple(axes[:n_in]) + ("lora",),
               _LORA_A_INIT)
    b = _param(module, b_name, (r,) + tuple(shape[n_in:]), ("lora",) + tuple(axes[n_in:]),
               nn.initializers.zeros)
    if c.lora_dropout > 0 and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - c.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - c.lora_dropout), 0).astype(x.dtype)
    xa = jnp.tensordot(x, a.astype(dt), axes=n_in)
    delta = jnp.tensordot(xa, b.astype(dt), axes=1)
    return y + (delta * (c.lora_alpha / r)).astype(y.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * scale, or * (1 + scale) with `norm_unit_offset` (Gemma)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        offset = self.config.norm_unit_offset
        init = nn.initializers.zeros if offset else nn.initializers.ones
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), init).astype(jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return (y * (1.0 + scale if offset else scale)).astype(self.config.compute_dtype)


def rope_frequencies(config: ModelConfig, *, local: bool = False) -> jax.Array:
    """Inverse frequencies [head_dim/2], with llama3 / linear rope scaling applied.

    `local=True` gives the sliding layers' frequencies: base `rope_local_theta`,
    unscaled (Gemma 3).
    """
    d = config.head_size
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scaling = None if local else config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        old_ctx = float(scaling["original_max_position_embeddings"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return jnp.where(medium, smoothed, scaled)
    if kind == "default":
        return inv_freq
    raise ValueError(f"model.rope_scaling.rope_type {kind!r} is not supported; "
                     "valid: 'default', 'linear', 'llama3'")


def apply_rope(x_BxTxNxD, cos_BxTxD, sin_BxTxD):
    """Rotary embedding in the 'rotate half' layout used by Hugging Face checkpoints."""
    half = x_BxTxNxD.shape[-1] // 2
    x32 = x_BxTxNxD.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos_BxTxD[:, :, None, :] + rotated * sin_BxTxD[:, :, None, :]
    return out.astype(x_BxTxNxD.dtype)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxH, cos, sin, mask_Bx1x1xTxS, cache=None, cache_index=None):
        """`mask_Bx1x1xTxS` is a dense mask (the "xla" path) or `attention.Segments`
        (the other `config.attention_impl`s, which build the mask themselves).

        With `cache` = (k, v) [B, nkv, S, d], the new keys/values are written at
        `cache_index`; returns (output, updated cache). Attention then runs over all S
        cache slots (a dense [B, 1, 1, T, S] mask, "xla"), over the new tokens only
        (`Segments`: the prefill of an empty cache) or over the filled key blocks
        (`attention.CachedSlots`: decoding)."""
        c = self.config
        h, d, nq, nkv = c.hidden_size, c.head_size, c.num_heads, c.num_kv_heads
        dt = c.compute_dtype
        q = _project(self, "q_proj", "bth,hnd->btnd", x_BxTxH, (h, nq, d),
                     ("embed", "q_heads", "head_dim"))
        k = _project(self, "k_proj", "bth,hnd->btnd", x_BxTxH, (h, nkv, d),
                     ("embed", "kv_heads", "head_dim"))
        v = _project(self, "v_proj", "bth,hnd->btnd", x_BxTxH, (h, nkv, d),
                     ("embed", "kv_heads", "head_dim"))
        if c.qkv_bias:
            zeros = nn.initializers.zeros
            q = q + _param(self, "q_bias", (nq, d), ("q_heads", "head_dim"), zeros).astype(dt)
            k = k + _param(self, "k_bias", (nkv, d), ("kv_heads", "head_dim"), zeros).astype(dt)
            v = v + _param(self, "v_bias", (nkv, d), ("kv_heads", "head_dim"), zeros).astype(dt)
        if c.qk_norm:
            q, k = RMSNorm(c, name="q_norm")(q), RMSNorm(c, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_new, v_new = k, v
        if cache is not None:
            # Slots after heads, so both attention products read the cache as it lies.
            k = jax.lax.dynamic_update_slice_in_dim(
                cache[0], k.transpose(0, 2, 1, 3).astype(cache[0].dtype), cache_index, 2)
            v = jax.lax.dynamic_update_slice_in_dim(
                cache[1], v.transpose(0, 2, 1, 3).astype(cache[1].dtype), cache_index, 2)
            cache = (k, v)
        if isinstance(mask_Bx1x1xTxS, attention.Segments):  # a kernel builds the mask
            # no earlier slots; the sampler's prefill is not split over "sequence"
            out = attention.attend(q, k_new, v_new, mask_Bx1x1xTxS, c,
                                   context_parallel=cache is None)
        elif isinstance(mask_Bx1x1xTxS, attention.CachedSlots):
            out = attention.attend_cached(q, k, v, mask_Bx1x1xTxS, c)
        else:
            if cache is None:
                k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            out = attention.xla_attention(
                q, k, v, mask_Bx1x1xTxS, softcap=c.attn_logit_softcap, cached=cache is not None,
                scale_divisor=math.sqrt(c.query_pre_attn_scalar or d))
        out = _project(self, "o_proj", "btnd,ndh->bth", out, (nq, d, h),
                       ("q_heads", "head_dim", "embed"))
        return out if cache is None else (out, cache)


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxH):
        c = self.config
        h, i = c.hidden_size, c.intermediate_size
        g = _project(self, "gate_proj", "bth,hi->bti", x_BxTxH, (h, i), ("embed", "mlp"))
        u = _project(self, "up_proj", "bth,hi->bti", x_BxTxH, (h, i), ("embed", "mlp"))
        if c.mlp_activation == "gelu_tanh":
            g = nn.gelu(g, approximate=True)
        else:
            g = nn.silu(g)
        return _project(self, "down_proj", "bti,ih->bth", g * u, (i, h), ("mlp", "embed"))


class Block(nn.Module):
    """Pre-norm block; with `sandwich_norms` the sub-layer outputs are normed too.

    `rope` and `masks` hold the (full, sliding) variants; `is_sliding` (scanned
    over the layers) picks one per layer.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, rope, masks, is_sliding, cache=None, cache_index=None):
        c = self.config
        (cos, sin), mask = rope[0], masks[0]
        if c.rope_local_theta is not None:
            cos = jnp.where(is_sliding, rope[1][0], cos)
            sin = jnp.where(is_sliding, rope[1][1], sin)
        if isinstance(mask, (attention.Segments, attention.CachedSlots)):
            mask = mask._replace(sliding=is_sliding if any(c.sliding_layers) else False)
        elif any(c.sliding_layers):
            mask = jnp.where(is_sliding, masks[1], mask)
        y = Attention(c, name="attn")(RMSNorm(c, name="attn_norm")(x), cos, sin, mask,
                                      cache, cache_index)
        if cache is not None:
            y, cache = y
        if c.sandwich_norms:
            y = RMSNorm(c, name="post_attn_norm")(y)
        x = x + y
        y = MLP(c, name="mlp")(RMSNorm(c, name="mlp_norm")(x))
        if c.sandwich_norms:
            y = RMSNorm(c, name="post_mlp_norm")(y)
        x = x + y
        # Training splits tokens over "length" (context parallelism); the sampler does not.
        x = nn.with_logical_constraint(x, ("batch", "length" if cache is None else None,
                                           "act_embed"))
        return x, cache


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The same saved projections, kept in pinned host memory until the backward pass
    # (device memory for longer sequences, at the price of host transfers).
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


class Decoder(nn.Module):
    """Decoder-only transformer: tokens -> final (normed) hidden states [B, T, H].

    Packed sequences: `segment_ids` (0 = padding) keep attention inside a segment,
    `positions` restart per segment. Under a mesh with a "sequence" axis the
    activations are split along the tokens (logical "length"): positions, segment
    ids and masks stay global, so rope and packing are those of one device. Layers are scanned, so parameters of the
    blocks are stacked along a leading "layers" axis.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None, cache=None,
                 cache_index=None):
        """Returns hidden states; with a `cache` (see `init_cache`) returns (hidden, cache).

        Cached decoding: the T new tokens occupy cache slots [cache_index, cache_index + T);
        they attend to every earlier valid slot (cache["valid"]) and to themselves causally.
        """
        c = self.config
        b, t = tokens_BxT.shape
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones((b, t), jnp.int32)
        embed = _param(self, "embed", (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        if not c.tie_embeddings:
            _param(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"))
        x = jnp.take(embed, tokens_BxT, axis=0).astype(c.compute_dtype)
        if c.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(c.hidden_size), c.compute_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length" if cache is None else None,
                                           "act_embed"))

        def rope(local):
            angles = positions_BxT.astype(jnp.float32)[..., None] * rope_frequencies(c, local=local)
            angles = jnp.concatenate([angles, angles], axis=-1)
            return jnp.cos(angles), jnp.sin(angles)

        rope_full = rope(False)
        rope_local = rope(True) if c.rope_local_theta is not None else rope_full
        if cache is not None:
            valid = jax.lax.dynamic_update_slice_in_dim(
                cache["valid"], (segment_ids_BxT > 0).astype(cache["valid"].dtype), cache_index, 1)
            cache = dict(cache, valid=valid)
        # Context parallelism ("sequence" mesh axis) attends from segment ids, any impl.
        context_parallel = cache is None and attention.sequence_shards() > 1
        dense = not context_parallel and attention.resolve_impl(
            c, t if cache is None else valid.shape[1]) == "xla"
        if cache is None and not dense:
            # The kernels build causal / segment / window masks from the ids: no [T, T] mask.
            segments = attention.Segments(segment_ids_BxT)
            masks = (segments, segments)
        elif cache is not None and not dense:
            # Prefilling an empty cache: the prompt attends within itself, through the
            # attention_impl. Decoding: only the cache's filled key blocks.
            prefill = isinstance(cache_index, int) and cache_index == 0
            slots = (attention.Segments(segment_ids_BxT) if prefill
                     else attention.CachedSlots(valid, cache_index))
            masks = (slots, slots)
        elif cache is None:
            q_slot, k_slot = jnp.arange(t), jnp.arange(t)
            same_segment = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
        else:
            q_slot = cache_index + jnp.arange(t)
            k_slot = jnp.arange(valid.shape[1])
            same_segment = jnp.broadcast_to(valid[:, None, :] > 0, (b, t, valid.shape[1]))
        if dense:
            causal = k_slot[None, :] <= q_slot[:, None]
            mask = (causal[None] & same_segment)[:, None, None]
            mask_sliding = mask
            if c.sliding_window is not None and cache is None:
                # Window over sequence indices: within a packed segment these differ
                # exactly as the positions do.
                near = k_slot[None, :] > q_slot[:, None] - c.sliding_window
                mask_sliding = mask & near[None, None, None]
            elif c.sliding_window is not None:
                # A cache may hold empty slots (a multi-turn episode's, between turns):
                # the window counts filled slots, the tokens between.
                token_BxS = jnp.cumsum((valid > 0).astype(jnp.int32), axis=1)
                q_token_BxT = jax.lax.dynamic_slice_in_dim(token_BxS, cache_index, t, 1)
                near = token_BxS[:, None, :] > q_token_BxT[:, :, None] - c.sliding_window
                mask_sliding = mask & near[:, None, None]
            masks = (mask, mask_sliding)

        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=_REMAT[c.remat], prevent_cse=False)
        is_sliding_L = jnp.asarray(c.sliding_layers, bool)
        if cache is None:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast, 0),
                            length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(c, name="layers")(x, (rope_full, rope_local), masks, is_sliding_L)
            return RMSNorm(c, name="final_norm")(x)
        # Cached decoding unrolls the layers over per-layer cache arrays: scanned, each
        # step copied every layer's cache out of the stacked array and back (XLA:CPU).
        # The stacked parameters are sliced here, or come pre-split (`unstack_layers`).
        layers = self.variables["params"]["layers"]
        new_k, new_v = [], []
        for i in range(c.num_layers):
            params_i = (layers[i] if isinstance(layers, (tuple, list))
                        else jax.tree.map(lambda w: w[i], layers))
            x, (k, v) = Block(c, parent=None).apply(
                {"params": params_i}, x, (rope_full, rope_local), masks,
                c.sliding_layers[i], (cache["k"][i], cache["v"][i]), cache_index)
            new_k.append(k)
            new_v.append(v)
        return RMSNorm(c, name="final_norm")(x), dict(cache, k=tuple(new_k), v=tuple(new_v))


def decoder_init_fn(model_cfg: ModelConfig):
    """rng -> decoder params boxed with their logical axis names."""
    def init(rng):
        return Decoder(model_cfg).init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
    return init


def init_cache(config: ModelConfig, batch: int, length: int) -> dict:
    """An empty KV cache for `length` slots: per layer k, v [B, nkv, S, d]; valid [B, S]."""
    shape = (batch, config.num_kv_heads, length, config.head_size)
    zeros = lambda: tuple(jnp.zeros(shape, config.compute_dtype) for _ in range(config.num_layers))
    return {"k": zeros(), "v": zeros(), "valid": jnp.zeros((batch, length), jnp.int32)}


def unstack_layers(params: Any, config: ModelConfig) -> Any:
    """`params` with the stacked "layers" split into a tuple of per-layer trees.

    Only cached decoding reads this form; a decode loop splits once, outside the loop,
    instead of slicing every weight in every step.
    """
    layers = params["layers"]
    return {**params, "layers": tuple(jax.tree.map(lambda w: w[i], layers)
                                      for i in range(config.num_layers))}


def unembedding(params: Any, config: ModelConfig) -> jax.Array:
    """The [hidden, vocab] output projection (the tied embedding transposed, or lm_head)."""
    if config.tie_embeddings:
        return params["embed"].T
    return params["lm_head"]


def logits_from_hidden(hidden_BxTxH: jax.Array, params: Any, config: ModelConfig) -> jax.Array:
    """Full float32 logits [B, T, V] with the final softcap: for generation and tests.

    Training and scoring go through `jalign.ops.token_logprobs` instead, which
    never materialises these.
    """
    logits = jnp.einsum("bth,hv->btv", hidden_BxTxH,
                        unembedding(params, config).astype(hidden_BxTxH.dtype),
                        preferred_element_type=jnp.float32)
    cap = config.final_logit_softcap
    if cap is not None:
        logits = cap * jnp.tanh(logits / cap)
    return logits
