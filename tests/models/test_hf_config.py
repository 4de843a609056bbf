"""config.json mapping, tensor checks and the options' semantics, without torch.

Hub configs are in their published (transformers 4.x) form; parameter counts are
the published ones, so every shape-bearing field must map right.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jalign.models import (PRESETS, Decoder, ModelConfig, abstract_params, from_pretrained,
                           save_pretrained)
from jalign.models.hf import config_from_hf, config_to_hf

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256}
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 896,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 151936}
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
    "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
    "torch_dtype": "float32", "vocab_size": 256000}
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26,
    "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
    "vocab_size": 262144}


@pytest.mark.parametrize("hf, num_params", [(LLAMA_31_8B, 8_030_261_248),
                                            (QWEN25_05B, 494_032_768),
                                            (GEMMA2_2B, 2_614_341_888),
                                            (GEMMA3_1B, 999_885_952)])
def test_hub_configs_give_the_published_sizes(hf, num_params):
    config = config_from_hf(hf)
    assert config.num_params() == num_params
    # ModelConfig.num_params agrees with the module itself.
    shapes = jax.tree.leaves(abstract_params(config))
    assert sum(int(np.prod(s.shape)) for s in shapes) == num_params


def test_hub_config_details():
    llama = config_from_hf(LLAMA_31_8B)
    preset = ModelConfig(**{**PRESETS["llama3_8b"], "param_dtype": "bfloat16"})
    assert llama == preset
    assert config_from_hf(QWEN25_05B).sliding_window is None  # use_sliding_window: false
    gemma2 = config_from_hf(GEMMA2_2B)
    assert gemma2.layer_types[:2] == ("sliding_attention", "full_attention")
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (50.0, 30.0)
    gemma3 = config_from_hf(GEMMA3_1B)
    assert gemma3.sliding_layers[:6] == (True,) * 5 + (False,)
    assert (gemma3.rope_theta, gemma3.rope_local_theta) == (1e6, 1e4)
    # The new (transformers 5) form of the same config maps to the same thing.
    new = {k: v for k, v in GEMMA3_1B.items() if k not in ("rope_theta", "rope_local_base_freq")}
    new["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert config_from_hf(new) == gemma3
    for hf in (LLAMA_31_8B, QWEN25_05B, GEMMA2_2B, GEMMA3_1B):
        assert config_from_hf(config_to_hf(config_from_hf(hf))) == config_from_hf(hf)


def test_unsupported_configs_are_named():
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        config_from_hf({**LLAMA_31_8B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        config_from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="text model"):
        config_from_hf({"model_type": "gemma3", "text_config": {}})
    with pytest.raises(ValueError, match="mlp_bias"):
        config_from_hf({**LLAMA_31_8B, "mlp_bias": True})
    with pytest.raises(ValueError, match="cannot export as llama: model.qk_norm"):
        config_to_hf(ModelConfig(qk_norm=True))


TINY = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=48, family="qwen2", qkv_bias=True, tie_embeddings=False)


def _random_params(config, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        abstract_params(config))


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "hf"
    save_pretrained(TINY, _random_params(TINY), str(path))
    return path


def _rewrite(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_extra_and_misshapen_tensors_are_named(folder):
    _rewrite(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.k_proj.bias is missing"):
        from_pretrained(str(folder))
    _rewrite(folder, lambda t: t.update({"model.layers.1.self_attn.k_proj.bias": np.zeros(16, np.float32),
                                         "model.layers.2.mlp.up_proj.weight": np.zeros(2, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor model.layers.2.mlp.up_proj.weight "
                                         r"in .*model.safetensors"):
        from_pretrained(str(folder))
    _rewrite(folder, lambda t: (t.pop("model.layers.2.mlp.up_proj.weight"),
                                t.update({"lm_head.weight": np.zeros((64, 31), np.float32)})))
    with pytest.raises(ValueError, match=r"lm_head.weight in .*model.safetensors has shape "
                                         r"\(64, 31\), expected \(64, 32\)"):
        from_pretrained(str(folder))


def test_index_must_match_the_files(tmp_path):
    save_pretrained(TINY, _random_params(TINY), str(tmp_path), max_shard_size="20KB")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    index["weight_map"][name] = next(f for f in set(index["weight_map"].values())
                                     if f != index["weight_map"][name])
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{name} is missing from .*model-000"):
        from_pretrained(str(tmp_path))


def test_tied_checkpoints_may_repeat_the_head(tmp_path):
    """Some hub checkpoints store lm_head.weight although tied; transformers ignores it."""
    tied = ModelConfig(**{**TINY.to_dict(), "tie_embeddings": True})
    save_pretrained(tied, _random_params(tied), str(tmp_path))
    _rewrite(tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
    config, params = from_pretrained(str(tmp_path))
    assert config.tie_embeddings and "lm_head" not in params


def test_safetensors_only(tmp_path, folder):
    os.remove(folder / "model.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="safetensors only"):
        from_pretrained(str(folder))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(str(tmp_path))


def test_save_load_round_trip_without_torch(folder, tmp_path):
    """jalign -> HF folder -> jalign gives the same params, shards and index included."""
    params = _random_params(TINY)
    save_pretrained(TINY, params, str(tmp_path / "sharded"), max_shard_size="10KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    config, loaded = from_pretrained(str(tmp_path / "sharded"))
    assert config == TINY
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded), params)


def test_llama_param_names_unchanged():
    params = abstract_params(ModelConfig())
    names = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert names == {"embed", "final_norm/scale", "layers/attn_norm/scale", "layers/mlp_norm/scale",
                     "layers/attn/q_proj", "layers/attn/k_proj", "layers/attn/v_proj",
                     "layers/attn/o_proj", "layers/mlp/gate_proj", "layers/mlp/up_proj",
                     "layers/mlp/down_proj"}


def test_sliding_window_sees_exactly_the_last_tokens():
    """d hidden[t] / d embed[s] is non-zero exactly for t - window < s <= t (one layer)."""
    window, t = 3, 8
    config = ModelConfig(vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                         intermediate_size=32, sliding_window=window, family="mistral")
    params = _random_params(config)
    tokens = jnp.arange(t, dtype=jnp.int32)[None]  # token s sits at position s

    def hidden_sum(embed):
        return Decoder(config).apply({"params": dict(params, embed=embed)}, tokens)[0].sum(-1)

    jac = np.abs(np.asarray(jax.jit(jax.jacrev(hidden_sum))(params["embed"]))).sum(-1)  # [t, V]
    for pos in range(t):
        seen = {s for s in range(t) if jac[pos, s] > 0}
        assert seen == set(range(max(0, pos - window + 1), pos + 1)), pos


def test_sliding_layers_keep_packed_segments_apart():
    config = ModelConfig(vocab_size=32, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                         intermediate_size=48, sliding_window=3, rope_local_theta=100.0,
                         layer_types=("sliding_attention", "full_attention", "sliding_attention"),
                         qk_norm=True, sandwich_norms=True, norm_unit_offset=True,
                         mlp_activation="gelu_tanh", scale_embeddings=True,
                         attn_logit_softcap=5.0, family="gemma3")
    params = _random_params(config)
    a, b = jnp.arange(1, 7), jnp.arange(10, 15)
    packed = jnp.concatenate([a, b, jnp.zeros(2, jnp.int32)])[None]
    segments = jnp.array([[1] * 6 + [2] * 5 + [0] * 2])
    positions = jnp.array([list(range(6)) + list(range(5)) + [0, 0]])
    apply = jax.jit(lambda *args: Decoder(config).apply({"params": params}, *args)[0])
    h_packed = apply(packed, positions, segments)
    ones = lambda x: jnp.ones(x.shape, jnp.int32)[None]
    h_a = apply(a[None], jnp.arange(6)[None], ones(a))
    h_b = apply(b[None], jnp.arange(5)[None], ones(b))
    np.testing.assert_allclose(h_packed[:6], h_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_packed[6:11], h_b, rtol=1e-5, atol=1e-5)
