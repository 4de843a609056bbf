"""Model configuration: one dataclass for every decoder family jalign supports."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax.numpy as jnp

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
REMAT_POLICIES = ("none", "full", "save_dots", "offload_dots")
# The Hugging Face families a config can be exported as (jalign.models.hf); the
# options below, not the family, decide what the model computes.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Projections LoRA adapters can wrap (the names of the decoder's weights).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_QUANTIZATION = ("none", "int8", "nf4")
# How the projections' weight gradients are computed (jalign.models.projection).
PROJECTION_BACKWARDS = ("autodiff", "cpu_transposed")
# How training-time attention is computed (jalign.models.attention).
ATTENTION_IMPLS = ("auto", "xla", "chunked", "splash", "cudnn")


def attention_impl_errors(config: "ModelConfig", impl: str | None = None) -> list[str]:
    """Why `impl` (default `config.attention_impl`) cannot compute this model (empty
    when it can).

    Only cuDNN's flash attention lacks features: it has no logit soft-capping and
    runs in bf16/fp16 only, with a head size that is a multiple of 8, <= 256.
    """
    impl = impl or config.attention_impl
    if impl not in ATTENTION_IMPLS:
        return [f"model.attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}"]
    errors = []
    for name in ("attention_block_q", "attention_block_kv"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value <= 0):
            errors.append(f"model.{name} must be None or a positive int, got {value!r}")
    if impl == "cudnn":
        if config.attn_logit_softcap is not None:
            errors.append("model.attention_impl='cudnn' cannot express attention logit "
                          "soft-capping (model.attn_logit_softcap, Gemma 2); use 'chunked' "
                          "or 'xla'")
        if config.dtype not in ("bfloat16", "float16"):
            errors.append("model.attention_impl='cudnn' needs model.dtype bfloat16 or float16 "
                          f"(cuDNN flash attention), got {config.dtype!r}")
        if config.head_size % 8 or config.head_size > 256:
            errors.append("model.attention_impl='cudnn' needs a head size that is a multiple "
                          f"of 8 and at most 256, got {config.head_size}")
    return errors


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer.

    The defaults give the Llama architecture; the options after `remat` switch
    on what other families need (all off by default):

    * `qkv_bias`: biases on the q/k/v projections (Qwen2).
    * `qk_norm`: RMSNorm of every query and key head before rope (Qwen3, Gemma 3).
    * `norm_unit_offset`: RMSNorm scales by (1 + weight), weights start at 0 (Gemma).
    * `sandwich_norms`: extra norms on the attention and MLP outputs (Gemma 2/3).
    * `mlp_activation`: "silu" or "gelu_tanh" for the gated MLP.
    * `scale_embeddings`: multiply embeddings by sqrt(hidden_size) (Gemma).
    * `query_pre_attn_scalar`: attention scores use 1/sqrt(this) instead of
      1/sqrt(head_dim) (Gemma).
    * `attn_logit_softcap`, `final_logit_softcap`: `cap * tanh(z / cap)` on the
      attention scores / the output logits (Gemma 2). The final one is applied by
      the callers of `jalign.ops.token_logprobs` (logit_softcap=), not the model.
    * `sliding_window`, `layer_types`: sliding layers attend to the last
      `sliding_window` tokens (themselves included). `layer_types` names each layer
      "full_attention" or "sliding_attention"; None means every layer slides when
      `sliding_window` is set (Mistral), none otherwise.
    * `rope_local_theta`: rope base of the sliding layers, unscaled (Gemma 3);
      None means the sliding layers share the global rope.
    * `family`: the Hugging Face family the model is exported as.

    LoRA (Hu et al. 2021; QLoRA, Dettmers et al. 2023), off while `lora_rank` is 0:
    each projection named in `lora_targets` gains adapters `<name>_lora_a` [in, r]
    and `<name>_lora_b` [r, out] (B starts at zero) and computes
    `x @ W + (alpha / r) * dropout(x) @ A @ B`. Params without the adapters give the
    base model exactly (that is how a LoRA run's reference is computed, see
    jalign.lora). `lora_base_dtype` stores the frozen base weights in that dtype (float32
    by default, as PEFT keeps the loaded model; bfloat16 halves the base's memory) and
    `lora_quantization` ("int8" or "nf4", via qwix, in blocks of
    `lora_quantization_block` along the input axis) quantises its projections.

    `head_dim` defaults to hidden_size // num_heads. `rope_scaling` is None or a
    mapping in Hugging Face's form, e.g. {"rope_type": "llama3", "factor": 8.0,
    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}.

    `attention_impl`: how training and scoring attend (cached decoding always uses
    "xla"): "auto" (splash on TPU, cudnn on GPU when it can express the model, else
    chunked; on CPU xla below 1024 tokens, chunked from there), "xla" (dense float32 scores, the reference), "chunked"
    (blocked, O(T x block) memory, any backend), "splash" (Pallas TPU kernels) or
    "cudnn" (GPU). See `jalign.models.attention`; an option that cannot express a
    feature of the model is refused here, by name. `attention_block_q` /
    `attention_block_kv` set the chunked and splash tiles (None: their defaults).

    `projection_backward`: "autodiff" (default, every backend) or "cpu_transposed",
    a weight-gradient layout that is faster on XLA:CPU; the gradients are the same
    up to float rounding (`jalign.models.projection`); forward mode works under both.
    """

    vocab_size: int = 128
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    intermediate_size: int = 344
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_position_embeddings: int = 2048
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"
    family: str = "llama"
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_unit_offset: bool = False
    sandwich_norms: bool = False
    mlp_activation: str = "silu"
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_base_dtype: str = "float32"
    lora_quantization: str = "none"
    lora_quantization_block: int = 64
    projection_backward: str = "autodiff"
    attention_impl: str = "auto"
    attention_block_q: int | None = None
    attention_block_kv: int | None = None

    def __post_init__(self):
        if self.layer_types is not None and not isinstance(self.layer_types, tuple):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets",
                               tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()))
        elif not isinstance(self.lora_targets, tuple):
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        errors = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                errors.append(f"model.{name} must be a positive int, got {value!r}")
        if not errors and self.num_heads % self.num_kv_heads:
            errors.append(f"model.num_heads ({self.num_heads}) must be a multiple of "
                          f"model.num_kv_heads ({self.num_kv_heads})")
        if not errors and self.head_dim is None and self.hidden_size % self.num_heads:
            errors.append(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                          f"model.num_heads ({self.num_heads}) unless model.head_dim is set")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                errors.append(f"model.{name} must be one of {sorted(_DTYPES)}, "
                              f"got {getattr(self, name)!r}")
        if self.remat not in REMAT_POLICIES:
            errors.append(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.family not in FAMILIES:
            errors.append(f"model.family must be one of {FAMILIES}, got {self.family!r}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            errors.append(f"model.mlp_activation must be one of {MLP_ACTIVATIONS}, "
                          f"got {self.mlp_activation!r}")
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
                     "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                errors.append(f"model.{name} must be None or positive, got {value!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window <= 0):
            errors.append(f"model.sliding_window must be None or a positive int, "
                          f"got {self.sliding_window!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                errors.append(f"model.layer_types has {len(self.layer_types)} entries but "
                              f"model.num_layers is {self.num_layers}")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                errors.append(f"model.layer_types: unknown {bad}; valid: {LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                errors.append("model.layer_types has sliding_attention layers but "
                              "model.sliding_window is None")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            errors.append(f"model.lora_rank must be an int >= 0 (0 = no LoRA), got {self.lora_rank!r}")
        elif self.lora_rank:
            bad = sorted(set(self.lora_targets) - set(LORA_TARGETS))
            if bad or not self.lora_targets:
                errors.append(f"model.lora_targets: unknown {bad or 'empty'}; valid: {LORA_TARGETS}")
            if not 0.0 <= self.lora_dropout < 1.0:
                errors.append(f"model.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
            if self.lora_base_dtype not in _DTYPES:
                errors.append(f"model.lora_base_dtype must be one of {sorted(_DTYPES)}, "
                              f"got {self.lora_base_dtype!r}")
            if self.lora_quantization not in LORA_QUANTIZATION:
                errors.append(f"model.lora_quantization must be one of {LORA_QUANTIZATION}, "
                              f"got {self.lora_quantization!r}")
            if not isinstance(self.lora_quantization_block, int) or self.lora_quantization_block <= 0:
                errors.append("model.lora_quantization_block must be a positive int, "
                              f"got {self.lora_quantization_block!r}")
        if self.projection_backward not in PROJECTION_BACKWARDS:
            errors.append(f"model.projection_backward must be one of {PROJECTION_BACKWARDS}, "
                          f"got {self.projection_backward!r}")
        if not errors:
            errors += attention_impl_errors(self)
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it use the sliding window?"""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        if self.layer_types is None:
            return (True,) * self.num_layers
        return tuple(kind == "sliding_attention" for kind in self.layer_types)

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def base_dtype(self):
        """Storage dtype of the frozen base weights of a LoRA model."""
        return _DTYPES[self.lora_base_dtype]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Builds a config from a dict / ConfigDict, naming unknown keys."""
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; valid keys: {sorted(known)}")
        if values.get("rope_scaling") is not None:
            values["rope_scaling"] = dict(values["rope_scaling"])
        if values.get("layer_types") is not None:
            values["layer_types"] = tuple(values["layer_types"])
        if values.get("lora_targets") is not None and not isinstance(values["lora_targets"], str):
            values["lora_targets"] = tuple(values["lora_targets"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __hash__(self):
        # The generated hash fails on the rope_scaling dict; configs are static
        # arguments of jitted functions (jalign.generate), so they must hash.
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        d = self.head_size
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * d
        per_layer = attn + 3 * h * i + (4 if self.sandwich_norms else 2) * h
        embed = v * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embed + h


PRESETS = {
    # The embedded default: learns the built-in tasks on a laptop CPU in minutes.
    "tiny": dict(vocab_size=128, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=344),
    # The DPO benchmark shape (issue: vocab 4096, hidden 256, 4 layers, 4 heads, ffn 688).
    "bench": dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                  intermediate_size=688),
    "llama3_1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                      num_kv_heads=8, intermediate_size=8192, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192},
                      max_position_embeddings=131072, dtype="bfloat16"),
    "llama3_8b": dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                      num_kv_heads=8, intermediate_size=14336, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192},
                      tie_embeddings=False, max_position_embeddings=131072, dtype="bfloat16"),
}
