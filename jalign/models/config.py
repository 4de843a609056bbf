"""Model configuration: one dataclass for every decoder family jalign supports."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
REMAT_POLICIES = ("none", "full", "save_dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer (Llama family).

    `head_dim` defaults to hidden_size // num_heads. `rope_scaling` is None or a
    mapping in Hugging Face's form, e.g. {"rope_type": "llama3", "factor": 8.0,
    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}.
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

    def __post_init__(self):
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
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

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
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        d = self.head_size
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * h * i + 2 * h
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
