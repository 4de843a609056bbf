"""Writes the binary items of the bad-input corpus (and the tokenizer folders).

    python tests/bad_inputs/_make.py

Deterministic; rerun after changing it and commit the output. The text items
(JSONL, flags) are written by hand.
"""

import json
import os
import pathlib
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import save_file

HERE = pathlib.Path(__file__).resolve().parent
BUILTIN = HERE.parent.parent / "jalign" / "assets"

# A tiny Llama in Hugging Face layout (tied embeddings: no lm_head).
TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=16,
                  hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
                  hidden_act="silu", dtype="float32")


def _tiny_llama_tensors():
    rng = np.random.default_rng(0)
    h, i, v = TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"], TINY_LLAMA["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
              "model.layers.0.input_layernorm.weight": (h,),
              "model.layers.0.post_attention_layernorm.weight": (h,),
              "model.layers.0.mlp.gate_proj.weight": (i, h),
              "model.layers.0.mlp.up_proj.weight": (i, h),
              "model.layers.0.mlp.down_proj.weight": (h, i)}
    for name in "qkvo":
        shapes[f"model.layers.0.self_attn.{name}_proj.weight"] = (h, h)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in sorted(shapes.items())}


def _hf_folder(name, config, *, truncate=0):
    folder = HERE / name
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    path = folder / "model.safetensors"
    save_file(_tiny_llama_tensors(), str(path), metadata={"format": "pt"})
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[:-truncate])


class _RunsCode:
    """Unpickling this runs code: it sets an environment variable the tests look for."""

    def __reduce__(self):
        return exec, ("import os; os.environ['JALIGN_PICKLE_EXECUTED'] = '1'",)


def _tokenizer_folder(name, chat_template):
    folder = HERE / name
    folder.mkdir(exist_ok=True)
    shutil.copyfile(BUILTIN / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((BUILTIN / "tokenizer_config.json").read_text())
    config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main():
    # A row whose prompt holds the bytes of Latin-1 "café" (0xe9 is not UTF-8).
    (HERE / "sft_non_utf8.jsonl").write_bytes(
        b'{"prompt": "sort: 3 1\\n", "completion": "1 3"}\n'
        b'{"prompt": "caf\xe9 sort: 2 1\\n", "completion": "1 2"}\n')
    pq.write_table(pa.table({"question": ["sort: 3 1\n"], "answer": ["1 3"]}),
                   HERE / "sft_wrong_schema.parquet")
    pq.write_table(pa.table({"prompt": ["sort: 3 1\n", "sort: 2 1\n"],
                             "completion": pa.array([13, 12], pa.int64())}),
                   HERE / "sft_wrong_type.parquet")
    (HERE / "sft_not_parquet.parquet").write_bytes(b"prompt,completion\nsort: 3 1,1 3\n")

    _hf_folder("hf_truncated_safetensors", TINY_LLAMA, truncate=100)
    _hf_folder("hf_config_missing_field",
               {k: v for k, v in TINY_LLAMA.items() if k != "hidden_size"})
    folder = HERE / "hf_pickle_only"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA, indent=2) + "\n")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode()))
    (HERE / "params.pkl").write_bytes(pickle.dumps(_RunsCode()))
    folder = HERE / "params_pickle_dir"
    folder.mkdir(exist_ok=True)
    (folder / "params.pkl").write_bytes(pickle.dumps(_RunsCode()))

    folder = HERE / "tokenizer_unparsable"
    folder.mkdir(exist_ok=True)
    text = (BUILTIN / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text(text[: len(text) // 2])  # cut mid-file
    _tokenizer_folder("tokenizer_template_raises",
                      "{% for m in messages %}{{ m['content'] | no_such_filter }}{% endfor %}")
    _tokenizer_folder(
        "tokenizer_template_checks_roles",
        "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    _tokenizer_folder(
        "tokenizer_template_escapes_sandbox",
        "{{ messages.__class__.__mro__[1].__subclasses__() }}"
        "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}")


if __name__ == "__main__":
    main()
