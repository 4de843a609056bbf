"""Parity with transformers on tiny random models of every supported family.

Each family's model is built and saved by transformers, loaded by jalign and
compared logit by logit (float32, sequences longer than the sliding windows,
rope scaling on); jalign's export must load back into transformers with no
warning and give the same logits, and its tensors must be byte-identical to
the ones transformers wrote.
"""

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

from jalign import sharding as shd  # noqa: E402
from jalign.generate import generate, left_pad  # noqa: E402
from jalign.models import (Decoder, abstract_params, from_pretrained,  # noqa: E402
                           logits_from_hidden, save_pretrained)

VOCAB, WINDOW, LENGTH = 128, 5, 20
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    # rope scaled past its original 16 positions by the 20-token inputs
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
        tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
        attn_logit_softcapping=3.0, final_logit_softcapping=2.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_scaling={"rope_type": "linear", "factor": 2.0}, final_logit_softcapping=5.0)),
}
TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, LENGTH))


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def _jalign_logits(config, params, tokens):
    hidden = Decoder(config).apply({"params": params}, jnp.asarray(tokens, jnp.int32))
    return np.asarray(logits_from_hidden(hidden, params, config))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """family -> (transformers model, its folder), built once per family.

    Random weights everywhere (norms and biases included); saved sharded, so the
    loader goes through model.safetensors.index.json.
    """
    torch.set_num_threads(1)
    cache = {}

    def build(family):
        if family not in cache:
            config_cls, model_cls, options = FAMILIES[family]
            torch.manual_seed(0)
            model = getattr(transformers, model_cls)(
                getattr(transformers, config_cls)(**BASE, **options))
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0.0, 0.3)
            path = tmp_path_factory.mktemp(family) / "hf"
            model.eval().save_pretrained(path, max_shard_size="40KB")
            assert (path / "model.safetensors.index.json").exists()
            cache[family] = model, path
        return cache[family]

    return build


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(hf_model, family):
    model, path = hf_model(family)
    config, params = from_pretrained(str(path))
    assert config.family == family
    diff = np.abs(_jalign_logits(config, params, TOKENS) - _hf_logits(model, TOKENS)).max()
    assert diff <= 1e-4, f"{family}: max abs logit difference {diff}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_loads_in_transformers_unchanged(hf_model, family, tmp_path):
    model, path = hf_model(family)
    config, params = from_pretrained(str(path))
    out = tmp_path / "export"
    save_pretrained(config, params, str(out), max_shard_size="30KB")
    assert (out / "model.safetensors.index.json").exists()

    # transformers -> jalign -> export: the same tensors, byte for byte.
    def tensors(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    theirs, ours = tensors(path), tensors(out)
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, name
        assert ours[name].tobytes() == value.tobytes(), name

    # ... and transformers loads it silently, to the same logits.
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = transformers.logging.get_logger()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reloaded, info = type(model).from_pretrained(out, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    assert [str(w.message) for w in caught] == []
    np.testing.assert_array_equal(_hf_logits(reloaded.eval(), TOKENS), _hf_logits(model, TOKENS))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_sharded_load_and_bfloat16(hf_model, family):
    """On a 4x2 (fsdp, tensor) mesh every parameter lands on its logical sharding."""
    model, path = hf_model(family)
    mesh = shd.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    config, params = from_pretrained(str(path), mesh=mesh)
    want = abstract_params(config, mesh=mesh)
    for got, spec in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert got.sharding.is_equivalent_to(spec.sharding, got.ndim)
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(params))
    logits = jax.jit(lambda p: logits_from_hidden(
        Decoder(config).apply({"params": p}, jnp.asarray(TOKENS, jnp.int32)), p, config))(params)
    np.testing.assert_allclose(np.asarray(logits), _hf_logits(model, TOKENS), atol=1e-4)

    config16, params16 = from_pretrained(str(path), dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    logits16 = _jalign_logits(config16, params16, TOKENS)
    assert np.abs(logits16 - _hf_logits(model, TOKENS)).mean() < 0.05


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
def test_greedy_generation_matches_transformers(hf_model, family):
    """Left-padded batch generation past the sliding window, as transformers does it alone."""
    model, path = hf_model(family)
    config, params = from_pretrained(str(path))
    prompts = [[5, 17, 3], [9, 8, 7, 6, 5, 4]]
    tokens, mask = left_pad(prompts, pad_id=0)
    new = 10
    out = generate(params, config, jnp.asarray(tokens), jnp.asarray(mask), jax.random.PRNGKey(0),
                   max_new_tokens=new, eos_id=-1, pad_id=0, greedy=True)
    for row, prompt in zip(np.asarray(out.tokens), prompts):
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].numpy()
        np.testing.assert_array_equal(row[tokens.shape[1]:], want)
