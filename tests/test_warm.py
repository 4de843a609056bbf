"""WARM (jalign.warm, `python -m jalign.convert average`): the weight average of reward
models is exactly the members' mean; mismatched members are named by parameter path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign import checkpoint
from jalign.convert import main as convert_main
from jalign.warm import average_params


def _member(seed, hidden=8):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"decoder": {"layers": {"w": jax.random.normal(keys[0], (2, hidden, 4))},
                        "embed": jax.random.normal(keys[1], (16, hidden))},
            "score_head": jax.random.normal(keys[2], (hidden,)), "score_bias": jnp.float32(seed)}


def test_saved_members_average_to_their_exact_float32_mean(tmp_path):
    members = [_member(k) for k in range(3)]
    paths = []
    for k, m in enumerate(members):
        paths.append(str(tmp_path / f"rm{k}"))
        checkpoint.save_params(paths[-1], m)
    out = str(tmp_path / "warm")
    assert convert_main(["average", f"--params={','.join(paths)}", f"--out={out}"]) == 0
    averaged = checkpoint.load_saved(out)
    assert jax.tree.structure(averaged) == jax.tree.structure(members[0])
    for got, *leaves in zip(jax.tree.leaves(averaged), *map(jax.tree.leaves, members)):
        want = np.mean(np.stack([np.asarray(x, np.float64) for x in leaves]), 0).astype(np.float32)
        assert np.asarray(got).dtype == np.float32
        np.testing.assert_array_equal(np.asarray(got), want)


def test_mismatched_members_are_named_by_path(tmp_path):
    a = _member(0)
    with pytest.raises(ValueError, match=r"b: decoder/embed is \(16, 16\) float32, but \(16, 8\)"):
        average_params([a, _member(1, hidden=16)], names=["a", "b"])
    b = _member(1)
    del b["score_bias"]
    with pytest.raises(ValueError, match="b has another structure.*missing \\['score_bias'\\]"):
        average_params([a, b], names=["a", "b"])
    c = {**_member(2), "score_head": _member(2)["score_head"].astype(jnp.bfloat16)}
    with pytest.raises(ValueError, match="member 1: score_head is .*bfloat16"):
        average_params([a, c])
    assert convert_main(["average", f"--params={tmp_path / 'nothing'},x", "--out=y"]) == 1
