"""Your model, your data, one command: `python -m jalign.train --config=configs/{sft,dpo,...}.py
--config.init_from=DIR` where DIR is a Hugging Face folder, a `convert import` folder or an
earlier run's WORKDIR/final_params; the architecture and tokenizer come from DIR."""

import json
import os

import numpy as np
import pytest

from jalign import loop
from jalign.config_utils import validate_config
from jalign.convert import import_hf
from jalign.models import abstract_params, from_pretrained
from jalign.models.config import ModelConfig
from tests.train_helpers import ROOT, parse_config, read_metrics, run_train

PAIRS = os.path.join(ROOT, "tests", "data", "files", "chat_pairs.jsonl")
SFT_ROWS = os.path.join(ROOT, "tests", "data", "files", "chat_sft.jsonl")
# float32 compute on CPU (the default is the checkpoint's dtype, as a bf16 TRL run).
F32 = "--config.model.dtype=float32"


def _data(path):
    return f"--config.data.path={path}", f"--config.data.eval_path={path}"


def test_dpo_from_a_hugging_face_folder_in_one_command(tiny_hf_llama, tmp_path):
    proc = run_train(tmp_path, f"--config.init_from={tiny_hf_llama}", *_data(PAIRS), F32,
                     config="configs/dpo.py:test")
    assert f"a llama model, 0.1M parameters, from hugging face folder {tiny_hf_llama}" in proc.stdout
    assert f"tokenizer {tiny_hf_llama}" in proc.stdout
    metrics = read_metrics(tmp_path)
    assert sorted(metrics) == [1, 2, 3, 4] and np.isfinite(metrics[4]["loss"])
    assert abs(metrics[1]["loss"] - np.log(2)) < 1e-6  # the reference is the starting model
    # The run's model states its architecture and tokenizer for the next stage / export.
    saved = ModelConfig.from_mapping(json.load(open(tmp_path / "model_config.json")))
    hf_config, _ = from_pretrained(tiny_hf_llama)
    assert (saved.hidden_size, saved.vocab_size, saved.dtype, saved.param_dtype) == (
        hf_config.hidden_size, hf_config.vocab_size, "float32", "float32")
    assert (tmp_path / "tokenizer.json").exists()


def test_sft_then_dpo_from_its_final_params_and_from_a_converted_folder(tiny_hf_llama, tmp_path):
    """SFT from the HF folder; DPO from SFT's WORKDIR/final_params (model_config.json and
    the tokenizer beside it); DPO from a `convert import` folder equals DPO from the HF
    folder it was made from."""
    sft = parse_config(f"--config.init_from={tiny_hf_llama}", *_data(SFT_ROWS), F32,
                       config="configs/sft.py:test")
    loop.run(sft, str(tmp_path / "sft"))
    start = str(tmp_path / "sft" / "final_params")
    dpo = parse_config(f"--config.init_from={start}", *_data(PAIRS), F32,
                       config="configs/dpo.py:test")
    summary = loop.run(dpo, str(tmp_path / "dpo"))
    assert "eval_rewards/accuracies" in summary["final"]

    converted = str(tmp_path / "converted")
    import_hf(tiny_hf_llama, converted)
    losses = {}
    for name, init_from in (("hf", tiny_hf_llama), ("converted", converted)):
        cfg = parse_config(f"--config.init_from={init_from}", *_data(PAIRS), F32,
                           "--config.train.num_steps=2", "--config.train.eval_every=0",
                           "--config.train.eval_at_start=False", "--config.train.memory_report=False",
                           config="configs/dpo.py:test")
        loop.run(cfg, str(tmp_path / name))
        losses[name] = [read_metrics(tmp_path / name)[s]["loss"] for s in (1, 2)]
    assert losses["hf"] == losses["converted"]


def test_the_start_params_are_the_checkpoints_weights(tiny_hf_llama):
    """The HF folder loads onto the given shardings with exactly the tensors
    `from_pretrained` reads."""
    import jax

    from jalign.models import pretrained
    config, params = from_pretrained(tiny_hf_llama)
    loaded = pretrained.find(tiny_hf_llama).load(abstract_params(config))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, loaded)


def test_a_conflicting_model_key_is_refused_naming_it(tiny_hf_llama, tmp_path):
    cfg = parse_config(f"--config.init_from={tiny_hf_llama}", *_data(PAIRS),
                       "--config.model.hidden_size=32", config="configs/dpo.py:test")
    with pytest.raises(ValueError, match=r"config.model.hidden_size=32 disagrees with 64 in "
                                         r".*config.json"):
        loop.run(cfg, str(tmp_path))
    # A tiny-preset config (the built-in tasks') names the clash too, not a shape error.
    cfg = parse_config(f"--config.init_from={tiny_hf_llama}", "--config.algo=dpo")
    with pytest.raises(ValueError, match=r"config.model.hidden_size=128 disagrees"):
        loop.run(cfg, str(tmp_path))
    # Without init_from, the real-model configs say what is missing.
    cfg = parse_config(*_data(PAIRS), config="configs/dpo.py:test")
    with pytest.raises(ValueError, match=r"config.model.vocab_size is not set .* give "
                                         r"--config.init_from=DIR"):
        loop.run(cfg, str(tmp_path))


def test_none_valued_keys_are_settable_from_the_command_line():
    cfg = parse_config("--config.model.rope_scaling=None", "--config.model.sliding_window=16",
                       "--config.dpo.loss_weights=[1.0,0.5]", "--config.logical_axis_rules=None",
                       config="configs/dpo_1b_lora.py:lora")
    assert cfg.model.rope_scaling is None and cfg.model.sliding_window == 16
    assert cfg.dpo.loss_weights == [1.0, 0.5]
    cfg = parse_config("--config.model.num_layers=4", "--config.model.head_dim=32",
                       config="configs/dpo.py")
    assert (cfg.model.num_layers, cfg.model.head_dim, cfg.model.hidden_size) == (4, 32, None)


def test_algo_with_pipeline_stages_is_an_error_naming_both():
    cfg = parse_config("--config.algo=dpo", config="configs/quickstart.py")
    with pytest.raises(ValueError, match=r"config.algo='dpo' and config.pipeline.stages="
                                         r"'sft,reward,dpo' are both set"):
        validate_config(cfg, algorithms=("sft", "reward", "dpo"))


def test_grpo_on_prompt_files_from_a_hugging_face_folder(tiny_hf_llama, tmp_path):
    from tests.train_helpers import write_prompt_files
    train, held_out = write_prompt_files(tmp_path, num_train=16, num_eval=4)
    cfg = parse_config(f"--config.init_from={tiny_hf_llama}", f"--config.data.path={train}",
                       f"--config.data.eval_path={held_out}", F32, config="configs/grpo.py:test")
    summary = loop.run(cfg, str(tmp_path / "grpo"))
    metrics = read_metrics(tmp_path / "grpo")
    assert np.isfinite(metrics[2]["loss"]) and "rewards/math_answer/mean" in metrics[2]
    assert any(k.startswith("rewards/math_answer") for k in summary["final"])
