"""`python -m jalign.convert`: import -> export reproduces the Hugging Face folder."""

import json
import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jalign import convert
from jalign.models import ModelConfig, abstract_params, save_pretrained

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, intermediate_size=48, family="gemma2", norm_unit_offset=True,
                     sandwich_norms=True, mlp_activation="gelu_tanh", scale_embeddings=True,
                     query_pre_attn_scalar=16.0, attn_logit_softcap=50.0,
                     final_logit_softcap=30.0, sliding_window=4,
                     layer_types=("sliding_attention", "full_attention"))
REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def hf_folder(tmp_path):
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                          abstract_params(CONFIG))
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"model": {}}')
    (tokenizer / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    path = tmp_path / "hf"
    save_pretrained(CONFIG, params, str(path), tokenizer_dir=str(tokenizer),
                    max_shard_size="20KB", extra_config={"eos_token_id": 1, "bos_token_id": 2})
    return path


def _tensors(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_import_then_export_reproduces_the_folder(hf_folder, tmp_path):
    out = tmp_path / "jalign"
    assert convert.main(["import", f"--hf={hf_folder}", f"--out={out}"]) == 0
    saved = json.loads((out / "model_config.json").read_text())
    assert ModelConfig.from_mapping(saved) == CONFIG
    assert (out / "tokenizer.json").exists() and (out / "params").is_dir()

    back = tmp_path / "back"
    assert convert.main(["export", f"--params={out / 'params'}",
                         f"--model-config={out / 'model_config.json'}", f"--out={back}",
                         f"--tokenizer={out}", f"--hf-config={out / 'hf_config.json'}",
                         "--max-shard-size=20KB"]) == 0
    assert json.loads((back / "config.json").read_text()) == \
        json.loads((hf_folder / "config.json").read_text())
    assert (back / "tokenizer_config.json").read_text() == '{"eos_token": "<eos>"}'
    theirs, ours = _tensors(hf_folder), _tensors(back)
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert ours[name].dtype == value.dtype and ours[name].tobytes() == value.tobytes(), name


def test_errors_are_clear(hf_folder, tmp_path, capsys):
    assert convert.main(["import", f"--hf={tmp_path}", f"--out={tmp_path / 'x'}"]) == 1
    assert "no config.json in" in capsys.readouterr().err
    assert convert.main(["export", f"--params={tmp_path / 'nothing'}", "--model-config=tiny",
                         f"--out={tmp_path / 'y'}"]) == 1
    assert "no saved model at" in capsys.readouterr().err
    assert convert.main(["export", f"--params={tmp_path}", "--model-config=no_such.json",
                         f"--out={tmp_path / 'y'}"]) == 1
    assert "not a preset" in capsys.readouterr().err
    out = tmp_path / "jalign"
    assert convert.main(["import", f"--hf={hf_folder}", f"--out={out}"]) == 0
    # Params of one model exported with another's config: named, not a traceback.
    assert convert.main(["export", f"--params={out / 'params'}", "--model-config=tiny",
                         f"--out={tmp_path / 'z'}"]) == 1
    assert "another model" in capsys.readouterr().err


def test_model_config_forms():
    assert convert.read_model_config("bench") == ModelConfig(vocab_size=4096, hidden_size=256,
                                                             num_layers=4, num_heads=4,
                                                             num_kv_heads=4, intermediate_size=688)
    from_py = convert.read_model_config(str(REPO / "configs" / "quickstart.py") + ":test")
    assert isinstance(from_py, ModelConfig)
