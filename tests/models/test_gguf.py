"""GGUF -> Hugging Face folder with numpy only, checked against transformers' own GGUF
loader on a tiny Llama written here (quantised Q8_0 and float32 tensors, llama.cpp's
rotary permutation, a byte-level BPE vocabulary with a control token)."""

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jalign import convert  # noqa: E402
from jalign.models import gguf as jalign_gguf  # noqa: E402
from jalign.tokenizer import Tokenizer  # noqa: E402

TEXTS = ["the cat sat on the mat 1234", "  two spaces\nand a new line", "<|im_end|> done",
         "café naïve ✓"]
TEMPLATE = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"


def _llama_cpp_permute(w, heads):
    """What llama.cpp's converter does to q/k rows (the transform jalign must undo)."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def _bpe():
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20,
                                trainer)
    return backend


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    backend = _bpe()
    state = json.loads(backend.to_str())["model"]
    tokens = sorted(state["vocab"], key=state["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1)
    model = transformers.LlamaForCausalLM(config).eval()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}

    writer = gguf.GGUFWriter(str(out / "tiny.gguf"), "llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(16)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t in ("<|endoftext|>", "<|im_end|>") else 1 for t in tokens])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_chat_template(TEMPLATE)
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
            "output_norm.weight", "lm_head.weight": "output.weight"}
    for name, w in sd.items():
        if name in glob:
            gname = glob[name]
        else:
            _, _, i, *rest = name.split(".")
            gname = f"blk.{i}.{layer['.'.join(rest[:-1])]}.weight"
        if gname.endswith("attn_q.weight"):
            w = _llama_cpp_permute(w, 4)
        elif gname.endswith("attn_k.weight"):
            w = _llama_cpp_permute(w, 2)
        if w.ndim == 2:  # matrices quantised, as in real files; norms stay float32
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gname, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gname, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out, backend


def test_gguf_folder_equals_transformers_gguf_loader(tiny_gguf, tmp_path):
    out, backend = tiny_gguf
    assert convert.main(["gguf", f"--gguf={out / 'tiny.gguf'}", f"--out={tmp_path}"]) == 0
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), gguf_file="tiny.gguf").eval()
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    want = {k: v.float().numpy() for k, v in reference.state_dict().items()}
    got = {k: v.float().numpy() for k, v in ours.state_dict().items()}
    assert sorted(got) == sorted(want)
    for name in want:  # both dequantise Q8_0 exactly
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    from jalign.models import Decoder, from_pretrained, logits_from_hidden
    import jax
    import jax.numpy as jnp
    config, params = from_pretrained(str(tmp_path))
    ids = [[5, 17, 42, 3, 99, 150, 7, 8]]
    with torch.no_grad():
        expect = reference(torch.tensor(ids)).logits.numpy()
    logits = logits_from_hidden(Decoder(config).apply({"params": params}, jnp.asarray(ids)),
                                params, config)
    np.testing.assert_allclose(np.asarray(jax.device_get(logits)), expect, atol=2e-5)

    tokenizer = Tokenizer.from_file(str(tmp_path))
    for text in TEXTS:
        assert tokenizer.encode(text) == backend.encode(text).ids, text
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text
    assert tokenizer.encode("<|im_end|>") == [backend.token_to_id("<|im_end|>")]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi<|im_end|>"
    assert tokenizer.eos_id == 1


def test_unsupported_architecture_and_missing_file_are_named(tmp_path, capsys):
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert convert.main(["gguf", f"--gguf={path}", f"--out={tmp_path / 'o'}"]) == 1
    assert "general.architecture='mamba' is not supported" in capsys.readouterr().err
    assert convert.main(["gguf", "--gguf=/nonexistent.gguf", f"--out={tmp_path / 'o'}"]) == 1
    assert "--gguf=/nonexistent.gguf: no such file" in capsys.readouterr().err


def test_rotary_unpermute_inverts_llama_cpp():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    np.testing.assert_array_equal(jalign_gguf.unpermute_rotary(_llama_cpp_permute(w, 8), 8), w)
