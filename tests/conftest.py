"""Test-wide setup: 8 simulated CPU devices, so sharding tests run anywhere.

Set before JAX is imported; single-device tests pass explicit device lists.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_hf_llama(tmp_path_factory):
    """A random 2-layer Llama folder saved by transformers (config.json + model.safetensors),
    with jalign's character tokenizer and its chat template: a Hugging Face folder built
    offline."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the chat template is in the config
        shutil.copy(os.path.join(ROOT, "jalign", "assets", name), out)
    return str(out)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2`, the README's command), the tests that launch several
    training processes at once share one worker, so two such launches never compete for
    the same two cores with each other (their launch timeouts assume at most one)."""
    for item in items:
        if os.path.basename(str(item.fspath)) == "test_multihost.py":
            item.add_marker(pytest.mark.xdist_group("multiprocess"))
