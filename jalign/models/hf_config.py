"""Hugging Face config.json <-> ModelConfig for the families jalign loads and writes.

Reads both forms of config.json: transformers 4.x (rope_theta, rope_scaling,
rope_local_base_freq, sliding_window_pattern) and 5.x (rope_parameters,
layer_types). Writes rope in the 4.x form, which both read.
"""

from __future__ import annotations

from typing import Any, Mapping

from jalign.models.config import ModelConfig

_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                "gemma2": "gemma2", "gemma3_text": "gemma3"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
_LLAMA_LIKE = dict(qkv_bias=False, qk_norm=False, norm_unit_offset=False, sandwich_norms=False,
                   mlp_activation="silu", scale_embeddings=False, query_pre_attn_scalar=None,
                   attn_logit_softcap=None, final_logit_softcap=None, rope_local_theta=None)
_GEMMA = dict(_LLAMA_LIKE, norm_unit_offset=True, sandwich_norms=True,
              mlp_activation="gelu_tanh", scale_embeddings=True)
# What each family fixes; the rest comes from config.json.
_FAMILY_OPTIONS = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE,
    "qwen2": dict(_LLAMA_LIKE, qkv_bias=True), "qwen3": dict(_LLAMA_LIKE, qk_norm=True),
    "gemma2": _GEMMA, "gemma3": dict(_GEMMA, qk_norm=True),
}
_FREE_IN = {"gemma2": ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"),
            "gemma3": ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
                       "rope_local_theta")}
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings")}


def _rope_from_hf(hf: Mapping[str, Any], family: str) -> tuple[float, dict | None, float | None]:
    """(rope_theta, rope_scaling, rope_local_theta) from old (rope_theta, rope_scaling)
    or new (rope_parameters, per layer type for Gemma 3) config.json keys."""
    params = hf.get("rope_parameters")
    local = None
    default_theta = 1e6 if family == "gemma3" else 10000.0
    if params and "full_attention" in params:
        full, local_params = dict(params["full_attention"]), dict(params["sliding_attention"])
        if local_params.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters.sliding_attention: rope_type "
                             f"{local_params['rope_type']!r} is not supported (only 'default')")
        local = float(local_params.get("rope_theta", 10000.0))
    elif params:
        full = dict(params)
    else:
        full = dict(hf.get("rope_scaling") or {})
        full.setdefault("rope_theta", hf.get("rope_theta", default_theta))
    if family == "gemma3" and local is None:
        local = float(hf.get("rope_local_base_freq", 10000.0))
    theta = float(full.get("rope_theta", default_theta))
    kind = full.get("rope_type", full.get("type", "default"))
    if kind == "default":
        return theta, None, local
    if kind not in _ROPE_KEYS:
        raise ValueError(f"rope type {kind!r} in config.json is not supported; "
                         f"valid: 'default', {', '.join(map(repr, _ROPE_KEYS))}")
    if float(full.get("attention_factor") or 1.0) != 1.0:
        raise ValueError("rope attention_factor != 1 in config.json is not supported")
    return theta, {"rope_type": kind, **{k: full[k] for k in _ROPE_KEYS[kind]}}, local


def config_from_hf(hf: Mapping[str, Any], *, dtype: str | None = None) -> ModelConfig:
    """Maps a Hugging Face config.json (as a dict) onto a ModelConfig."""
    model_type = hf.get("model_type")
    if model_type == "gemma3" and "text_config" in hf:
        raise ValueError("model_type 'gemma3' is the multimodal Gemma 3; only the text model "
                         "(model_type 'gemma3_text', Gemma3ForCausalLM) is supported")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"config.json model_type {model_type!r} is not supported; "
                         f"valid: {sorted(_MODEL_TYPES)}")
    family = _MODEL_TYPES[model_type]
    for key in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
        if hf.get(key) and not (family == "qwen2" and key == "attention_bias"):
            raise ValueError(f"config.json {key}=true is not supported for {model_type}")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    want = "gelu_pytorch_tanh" if family.startswith("gemma") else "silu"
    if act != want:
        raise ValueError(f"config.json activation {act!r} is not supported for {model_type} "
                         f"(only {want!r})")
    heads = hf["num_attention_heads"]
    theta, scaling, local_theta = _rope_from_hf(hf, family)
    num_layers = hf["num_hidden_layers"]
    window, layer_types = hf.get("sliding_window"), hf.get("layer_types")
    if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
        window = None
    if window is None:
        layer_types = None
    elif family in ("qwen2", "qwen3") and layer_types is None:
        first = hf.get("max_window_layers", num_layers)
        layer_types = ["sliding_attention" if i >= first else "full_attention"
                       for i in range(num_layers)]
    elif family in ("gemma2", "gemma3") and layer_types is None:
        every = 2 if family == "gemma2" else hf.get("sliding_window_pattern", 6)
        layer_types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                       for i in range(num_layers)]
    options = dict(_FAMILY_OPTIONS[family])
    if family in ("gemma2", "gemma3"):
        options.update(query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
                       attn_logit_softcap=hf.get("attn_logit_softcapping",
                                                 50.0 if family == "gemma2" else None),
                       final_logit_softcap=hf.get("final_logit_softcapping",
                                                  30.0 if family == "gemma2" else None))
    if family == "gemma3":
        options["rope_local_theta"] = local_theta
    dtype = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=num_layers,
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=None if hf.get("head_dim") in (None, hf["hidden_size"] // heads) else hf["head_dim"],
        intermediate_size=hf["intermediate_size"], rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", family.startswith("gemma"))),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        dtype=dtype, param_dtype=dtype, family=family, sliding_window=window,
        layer_types=None if layer_types is None else tuple(layer_types), **options)


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x  # transformers' configs type-check


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The config.json dict for `config.family`; a ValueError if it cannot say `config`."""
    family = config.family
    for key, want in _FAMILY_OPTIONS[family].items():
        if key not in _FREE_IN.get(family, ()) and getattr(config, key) != want:
            raise ValueError(f"cannot export as {family}: model.{key} is "
                             f"{getattr(config, key)!r} but {family} needs {want!r}")
    sliding = config.sliding_layers
    hf = dict(
        architectures=[_ARCHITECTURES[family]],
        model_type={v: k for k, v in _MODEL_TYPES.items()}[family],
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_size, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        rope_scaling=dict(config.rope_scaling) if config.rope_scaling else None,
        tie_word_embeddings=config.tie_embeddings, dtype=config.param_dtype,
        hidden_act="silu", attention_dropout=0.0)
    if family in ("llama", "qwen3", "gemma2", "gemma3"):
        hf["attention_bias"] = False
    if family == "llama":
        hf["mlp_bias"] = False
    if family in ("llama", "mistral") and any(sliding) != all(sliding):
        raise ValueError(f"cannot export as {family}: layers must all slide or none "
                         f"(model.layer_types={config.layer_types})")
    if family == "llama" and any(sliding):
        raise ValueError("cannot export as llama: model.sliding_window is set (use mistral)")
    if family == "mistral":
        hf["sliding_window"] = config.sliding_window
    types = ["sliding_attention" if s else "full_attention" for s in sliding]
    if family in ("qwen2", "qwen3"):
        first = sliding.index(True) if any(sliding) else config.num_layers
        if not all(sliding[first:]):
            raise ValueError(f"cannot export as {family}: sliding layers must be the last ones")
        hf.update(use_sliding_window=any(sliding), sliding_window=config.sliding_window,
                  max_window_layers=first, layer_types=types)
    if family in ("gemma2", "gemma3"):
        del hf["hidden_act"]
        hf.update(hidden_activation="gelu_pytorch_tanh", layer_types=types,
                  sliding_window=config.sliding_window or config.max_position_embeddings,
                  query_pre_attn_scalar=_int_if_whole(config.query_pre_attn_scalar
                                                      or config.head_size),
                  attn_logit_softcapping=config.attn_logit_softcap,
                  final_logit_softcapping=config.final_logit_softcap)
    if family == "gemma3":
        if config.rope_local_theta is None:
            raise ValueError("cannot export as gemma3: model.rope_local_theta is None "
                             "(Gemma 3's sliding layers have their own rope base)")
        hf.update(rope_local_base_freq=config.rope_local_theta, use_bidirectional_attention=False)
    return hf
