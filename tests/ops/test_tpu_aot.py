"""Ahead-of-time Mosaic compiles of impl="pallas_tpu" for real TPU chips, on any host.

`jax.experimental.topologies` describes TPU devices through libtpu (the `test`
extra installs it); lowering with shardings on those devices and calling
`.compile()` runs the real TPU compiler, Mosaic included, with no TPU attached.
The compiles run in a subprocess (this file as a script) so that libtpu stays
out of the test process; ALLOW_MULTIPLE_LIBTPU_LOAD=1 lets it start while
another process holds libtpu's lock file.
"""

import sys

import pytest

from tests.ops.tpu_topology import compiled_cases, print_cases

# name: (topology, dtype, tokens, hidden, vocab, (data, fsdp, tensor) mesh or None,
#        whether the caller runs the op inside its own shard_map over every axis)
CASES = {
    "v5e_bf16": ("v5e:2x2", "bfloat16", 8192, 1024, 131072, None, False),
    "v5p_bf16": ("v5p:2x2x1", "bfloat16", 8192, 1024, 131072, None, False),
    "v6e_f32": ("v6e:2x2", "float32", 8192, 1024, 131072, None, False),
    "v6e_ragged": ("v6e:2x2", "bfloat16", 8000, 1000, 50257, None, False),
    "v5e_mesh": ("v5e:2x2", "bfloat16", 8192, 1024, 131072, (2, 1, 2), False),
    "v5e_caller_shard_map": ("v5e:2x2", "bfloat16", 8192, 1024, 32768, (2, 1, 2), True),
}


def compile_fwd_bwd(topology, dtype, tokens, hidden, vocab, mesh_shape, in_caller_shard_map,
                    impl="pallas_tpu"):
    """Compiles value_and_grad of a loss on every output; returns compile facts."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jalign.ops import token_logprobs
    from jalign.sharding import MESH_AXES

    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    data, fsdp, tensor = mesh_shape or (1, 1, 1)
    shape = (data, fsdp, 1, tensor)  # MESH_AXES: data, fsdp, sequence, tensor
    mesh = Mesh(np.asarray(devices[:int(np.prod(shape))]).reshape(shape), MESH_AXES)
    tok, voc = (("data", "fsdp"), "tensor") if mesh_shape else (None, None)
    if in_caller_shard_map:
        tok, voc = MESH_AXES, None
    args = [jax.ShapeDtypeStruct((tokens, hidden), jnp.dtype(dtype),
                                 sharding=NamedSharding(mesh, P(tok, None))),
            jax.ShapeDtypeStruct((hidden, vocab), jnp.dtype(dtype),
                                 sharding=NamedSharding(mesh, P(None, voc))),
            jax.ShapeDtypeStruct((tokens,), jnp.int32, sharding=NamedSharding(mesh, P(tok)))]

    def loss(hidden_NxH, unembed_HxV, targets_N):
        out = token_logprobs(hidden_NxH, unembed_HxV, targets_N, impl=impl,
                             return_lse=True, return_entropy=True)
        return -jnp.sum(out.logps) + jnp.sum(out.entropy) + 0.1 * jnp.sum(out.lse)

    if in_caller_shard_map:  # tokens over every axis, unembedding replicated (check_vma on)
        per_shard = jax.shard_map(lambda *a, f=loss: f(*a)[None], mesh=mesh,
                                  in_specs=(P(tok), P(), P(tok)), out_specs=P(tok))
        loss = lambda *a: jnp.sum(per_shard(*a))  # noqa: E731

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    if mesh_shape and not in_caller_shard_map:
        with jax.set_mesh(mesh):
            compiled = fn.lower(*args).compile()
    else:
        compiled = fn.lower(*args).compile()
    text = compiled.as_text()
    return dict(temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes),
                device_kind=devices[0].device_kind,
                mosaic_kernels=text.count('custom_call_target="tpu_custom_call"'),
                all_gathers=text.count("all-gather"), all_reduces=text.count("all-reduce"))


@pytest.fixture(scope="module")
def compiled():
    return compiled_cases(__file__, list(CASES))


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if case[5] is None])
def test_pallas_tpu_compiles_with_temporaries_far_below_tokens_x_vocab(compiled, name):
    _, dtype, tokens, hidden, vocab, _, _ = CASES[name]
    facts = compiled[name]
    assert facts["mosaic_kernels"] == 3, facts  # forward, dh, dW
    itemsize = 2 if dtype == "bfloat16" else 4
    # Residuals and per-token vectors are O(tokens); ragged sizes add zero-padded
    # copies of the inputs, O(tokens x hidden + hidden x vocab). Never tokens x vocab.
    assert facts["temp_bytes"] <= 4 * (tokens * hidden + hidden * vocab) * itemsize, facts
    assert facts["temp_bytes"] < tokens * vocab * 4 / 4, facts
    if vocab % 512 == 0 and tokens % 512 == 0 and hidden % 128 == 0:
        assert facts["temp_bytes"] <= 2 * tokens * hidden * 4, facts


def test_mesh_runs_kernels_per_shard_without_gathering(compiled):
    facts = compiled["v5e_mesh"]
    assert facts["mosaic_kernels"] == 3, facts
    # The vocabulary-sharded combine is all-reduces of per-token vectors and the
    # gradient sums; the [H, V] unembedding is never gathered.
    assert facts["all_reduces"] > 0 and facts["all_gathers"] == 0, facts
    assert facts["temp_bytes"] <= 2 * 8192 * 1024 * 4, facts


def test_op_compiles_inside_a_callers_shard_map(compiled):
    """Already-manual axes are left alone; the kernels run on the caller's shards."""
    facts = compiled["v5e_caller_shard_map"]
    assert facts["mosaic_kernels"] == 3 and facts["all_gathers"] == 0, facts


if __name__ == "__main__":
    print_cases(compile_fwd_bwd, CASES, sys.argv[1:])
