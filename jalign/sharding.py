"""Device mesh and the logical-axis rule table: declared once, used by the loop.

The model names logical axes on every parameter (see jalign.models.transformer);
the config maps them to the mesh axes ("data", "fsdp", "sequence", "tensor") with a
short rule table. The training loop derives shardings from these once.

"sequence" is context parallelism: activations are split along their tokens
(logical "length"), no parameter is, and attention gathers keys and values across
the axis (`jalign.models.attention`). It sits next to "tensor", the innermost
axis, because every layer exchanges K/V over it: neighbouring chips.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# Logical axis -> mesh axes. Parameters are fully sharded over "fsdp" on their
# embedding dimension and over "tensor" on heads / mlp / vocab; activations are
# split over "data" and "fsdp" along the batch and over "sequence" along the tokens.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("lora", None),          # LoRA rank: adapters are sharded like their base weight
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ("data", "fsdp", "sequence", "tensor") mesh; one axis may be -1 (use
    the rest); an axis not named has size 1.

    Raises a ValueError naming the config keys when the sizes do not divide the
    device count.
    """
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown} in config.mesh; valid axes: {MESH_AXES}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {free}")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"config.mesh sizes must be positive (or -1), got {sizes}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if n % fixed:
            raise ValueError(f"config.mesh {sizes}: the fixed axes ({fixed} devices) do not "
                             f"divide the {n} available devices")
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise ValueError(
            f"config.mesh {sizes} needs {math.prod(sizes.values())} devices but {n} are "
            f"available; set config.mesh.data/fsdp/sequence/tensor so their product is {n} "
            "(one of them may be -1)")
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Normalises a config rule table [(logical, mesh axis or list or None), ...]."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        logical, target = rule
        if isinstance(target, list):
            target = tuple(target)
        for axis in (target if isinstance(target, tuple) else (target,)):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"config.logical_axis_rules: {logical!r} maps to unknown mesh "
                                 f"axis {axis!r}; valid: {MESH_AXES}")
        out.append((str(logical), target))
    return tuple(out)


def check_context_parallel(mesh: Mesh, rules) -> None:
    """A "sequence" axis > 1 must split the tokens: the rules' "length" must name it.

    (Otherwise every device of the axis would repeat the same work.)
    """
    if dict(mesh.shape).get("sequence", 1) == 1:
        return
    target = dict(rules).get("length")
    if "sequence" not in (target if isinstance(target, tuple) else (target,)):
        raise ValueError(
            f"config.mesh.sequence={mesh.shape['sequence']} but config.logical_axis_rules maps "
            f"'length' to {target!r}: map it to 'sequence' (as jalign.sharding.DEFAULT_RULES "
            "does) so the tokens are split over that axis, or set config.mesh.sequence=1")


def logical_shardings(abstract_boxed_tree: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of (possibly flax-Partitioned) leaves."""
    specs = nn.get_partition_spec(abstract_boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def data_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of a [batch, ...] array: batch over the axes the "batch" rule names.

    Not split over "sequence": one sharding fits every leaf of a batch ([B] per-row
    values, [B, T] ids of any width T), and the token ids are a few bytes a token; the
    decoder's first activation constraint splits the tokens (a local slice, no
    communication)."""
    spec = nn.logical_to_mesh_axes(("batch",), rules)
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
