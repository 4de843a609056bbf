"""Per-device memory accounting: the train state by its shardings, a compiled step's plan.

Used by the loop's start-up report (`train.memory_report`) and the TPU fit check
(`jalign.aot`).
"""

from __future__ import annotations

import math

import jax

from jalign import lora

GIB = 1024 ** 3


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays / ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        # in bits first: 4-bit values (QLoRA's nf4) pack two to a byte on the device
        total += -(-math.prod(shape) * jax.dtypes.itemsize_bits(leaf.dtype) // 8)
    return total


def state_memory(state) -> dict[str, int]:
    """Per-device bytes of each part of a train state (arrays or sharded ShapeDtypeStructs):
    trained params, optimizer state, and each frozen tree (reference, LoRA base, ...)."""
    parts = {"params": per_device_bytes(state.params),
             "opt_state": per_device_bytes(state.opt_state)}
    for name, tree in (state.frozen or {}).items():
        parts[f"frozen/{name}"] = per_device_bytes(tree)
    if isinstance(state.params, dict) and "critic" in state.params:
        parts["params/critic"] = per_device_bytes(state.params["critic"])
    return parts


def format_bytes(n: float) -> str:
    return f"{n / GIB:9.2f} GiB" if abs(n) >= GIB / 10 else f"{n / 2**20:9.2f} MiB"


def memory_report(state, compiled) -> str:
    """The start-up memory report of the training loop: the state by parts and the
    compiled step's plan (from its memory analysis), per device."""
    parts = state_memory(state)
    memory = compiled.memory_analysis()
    lines = ["memory per device (state by its shardings; the step as XLA plans it):"]
    lines += [f"  {name:<22}{format_bytes(n)}" for name, n in parts.items()]
    if memory is not None:
        total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                 - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
        lines += [f"  {'step temporaries':<22}{format_bytes(memory.temp_size_in_bytes)}",
                  f"  {'step total':<22}{format_bytes(total)}   (arguments + outputs - donated + "
                  "temporaries)"]
    lines.append(f"  trained parameters: {lora.num_params(state.params):,}")
    return "\n".join(lines)
