"""Ahead-of-time Mosaic compiles of token_divergence(impl="pallas_tpu") for v5e, v5p, v6e.

Same mechanism as test_tpu_aot.py: TPU topologies from libtpu, lowered and compiled
with the real TPU compiler in a subprocess (this file as a script), no TPU attached.
One shape per chip; together they cover the mixture (two forward kernels), both
endpoints (one), a frozen teacher (student gradients only), bf16 and f32, and
ragged sizes that need padding.
"""

import sys

import pytest

from tests.ops.tpu_topology import compiled_cases, print_cases

# name: (topology, dtype, tokens, student hidden, teacher hidden, vocab, beta, frozen teacher)
CASES = {
    "v5e_mixture_frozen_teacher": ("v5e:2x2", "bfloat16", 4096, 512, 1024, 32768, 0.5, True),
    "v5p_reverse_all_grads": ("v5p:2x2x1", "bfloat16", 4096, 512, 1024, 32768, 1.0, False),
    "v6e_forward_ragged_f32": ("v6e:2x2", "float32", 4000, 500, 1000, 50257, 0.0, False),
}


def compile_divergence(topology, dtype, tokens, hidden_s, hidden_t, vocab, beta, frozen,
                       impl="pallas_tpu"):
    """Compiles value_and_grad of the summed divergence; returns compile facts."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    from jalign.ops import token_divergence

    device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
    sharding = SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)
            for shape in ((tokens, hidden_s), (hidden_s, vocab), (tokens, hidden_t),
                          (hidden_t, vocab))]

    def loss(hs, ws, ht, wt):
        if frozen:
            ht, wt = jax.lax.stop_gradient((ht, wt))
        return jnp.sum(token_divergence(hs, ws, ht, wt, beta=beta, temperature=0.8,
                                        impl=impl, student_softcap=30.0))

    argnums = (0, 1) if frozen else (0, 1, 2, 3)
    compiled = jax.jit(jax.value_and_grad(loss, argnums=argnums)).lower(*args).compile()
    text = compiled.as_text()
    return dict(temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes),
                device_kind=device.device_kind,
                mosaic_kernels=text.count('custom_call_target="tpu_custom_call"'))


@pytest.fixture(scope="module")
def compiled():
    return compiled_cases(__file__, list(CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_divergence_kernels_compile_without_tokens_x_vocab_temporaries(compiled, name):
    _, dtype, tokens, hidden_s, hidden_t, vocab, beta, _ = CASES[name]
    facts = compiled[name]
    # lse (+ mix for 0 < beta < 1) forward kernels, dh and dW backward kernels.
    assert facts["mosaic_kernels"] == (4 if 0 < beta < 1 else 3), facts
    itemsize = 2 if dtype == "bfloat16" else 4
    # Residuals are O(tokens); ragged sizes add zero-padded copies of the inputs and
    # of the dW outputs, O((tokens + vocab) x H). Materialising needs two float32
    # [tokens, vocab] logits arrays and their gradients: 4 x tokens x vocab x 4 bytes.
    inputs = (tokens + vocab) * (hidden_s + hidden_t) * itemsize
    assert facts["temp_bytes"] <= 4 * inputs, facts
    assert facts["temp_bytes"] < tokens * vocab * 4, facts
    if tokens % 512 == 0 and vocab % 512 == 0:  # no padding: O(tokens) residuals only
        assert facts["temp_bytes"] <= tokens * (hidden_s + hidden_t) * 4, facts


if __name__ == "__main__":
    print_cases(compile_divergence, CASES, sys.argv[1:])
