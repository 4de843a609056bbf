"""WARM: one reward model whose weights are the average of several.

Reward models fine-tuned from one initialisation (e.g. the same SFT model, with
different seeds, data orders or hyper-parameters) stay linearly connected, so the
mean of their parameters is itself a reward model, as cheap to run as one and, per
Ramé et al., more robust than each member. Averaging models that did not share an
initialisation gives a model of no use, and nothing here can tell: pass members of
one run family.

    python -m jalign.convert average --params=RM1/final_params,RM2/final_params --out=WARM

Reference: Ramé, Vieillard, Hussenot, Dadashi, Cideron, Bachem, Ferret, "WARM: On the
Benefits of Weight Averaged Reward Models", arXiv:2401.12187.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from jalign import checkpoint


def _leaves(tree: Any) -> dict[str, Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}


def average_params(members: Sequence[Any], names: Sequence[str] | None = None) -> Any:
    """The element-wise mean of k parameter trees of one structure, in each leaf's dtype.

    Each leaf is summed in float64 and divided by k before casting back, so a float32
    result is the correctly rounded mean (not a running float32 sum). Raises ValueError
    naming the parameter path (and the member, by `names` or index) for a tree whose
    structure, shape or dtype differs from the first member's.
    """
    if not members:
        raise ValueError("average_params needs at least one parameter tree")
    names = list(names) if names is not None else [f"member {i}" for i in range(len(members))]
    first = _leaves(members[0])
    for name, member in zip(names[1:], members[1:]):
        leaves = _leaves(member)
        missing, extra = sorted(set(first) - set(leaves)), sorted(set(leaves) - set(first))
        if missing or extra:
            raise ValueError(f"{name} has another structure than {names[0]}: missing "
                             f"{missing[:3]}, unexpected {extra[:3]}")
        for path, leaf in first.items():
            got = leaves[path]
            if np.shape(got) != np.shape(leaf) or np.asarray(got).dtype != np.asarray(leaf).dtype:
                raise ValueError(f"{name}: {path} is {np.shape(got)} {np.asarray(got).dtype}, "
                                 f"but {np.shape(leaf)} {np.asarray(leaf).dtype} in {names[0]}")

    def mean(*leaves):
        total = sum(np.asarray(x, np.float64) for x in leaves)
        return (total / len(leaves)).astype(np.asarray(leaves[0]).dtype)
    return jax.tree.map(mean, *members)


def average_saved(paths: Sequence[str], out: str) -> Any:
    """Averages the trees saved at `paths` (`checkpoint.save_params` folders, e.g. reward
    stages' WORKDIR/final_params) and saves the mean at `out`; returns it."""
    averaged = average_params([checkpoint.load_saved(p) for p in paths], names=list(paths))
    checkpoint.save_params(out, averaged)
    return averaged
