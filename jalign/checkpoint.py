"""Orbax checkpoints holding the train state, the grain iterator position and the
loop's counters (cumulative num_tokens, skipped steps: exact Python ints, as JSON)."""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A workdir holds a checkpoint that does not fit the configured model."""


def make_manager(directory: str, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                "counters": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator=None, *,
         counters: dict[str, int] | None = None, force: bool = False) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if counters is not None:
        items["counters"] = ocp.args.JsonSave(dict(counters))
    manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore_counters(manager: ocp.CheckpointManager, step: int) -> dict[str, int]:
    """The counters saved with `step` ({} for a checkpoint written without them)."""
    if "counters" not in manager.item_metadata(step).keys():
        return {}
    return dict(manager.restore(step, args=ocp.args.Composite(
        counters=ocp.args.JsonRestore()))["counters"])


def _check_shapes(manager: ocp.CheckpointManager, step: int, abstract_state: Any, where: str):
    """Names the first parameter whose saved shape differs from the configured one."""
    try:
        saved = manager.item_metadata(step)["state"]
    except Exception:  # metadata unavailable: let the restore itself report
        return
    _compare_trees(saved, abstract_state, f"{where} (step {step})")


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator=None, *,
            step: int | None = None) -> tuple[int, Any]:
    """Restores the latest (or given) step onto the shardings in `abstract_state`.

    `abstract_state` is a tree of jax.ShapeDtypeStruct with `.sharding` set; the
    arrays come back placed on those shardings (the mesh may differ from the one
    that wrote them). The data iterator, if given, is restored in place.
    """
    step = manager.latest_step() if step is None else step
    _check_shapes(manager, step, abstract_state, str(manager.directory))
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return step, restored["state"]


def save_params(path: str, params: Any) -> None:
    """Writes a parameter tree alone (the stage's model, for later stages / export)."""
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, params, force=True)


def load_saved(path: str) -> Any:
    """Reads a tree written by `save_params` as it was saved (structure, shapes and dtypes
    from the checkpoint, on the default device): for tools that work on any model."""
    path = _check_saved_dir(path)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path)


def _check_saved_dir(path: str) -> str:
    path = os.path.abspath(path)
    if os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is a file, not a directory written by jalign.checkpoint.save_params; "
            "jalign never unpickles, so .pkl/.bin/.pt params cannot be loaded (convert a "
            "Hugging Face safetensors folder with `python -m jalign.convert import`)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no saved model at {path} (expected a directory written by "
                                "jalign.checkpoint.save_params, e.g. an earlier stage's final_params)")
    if not any(os.path.exists(os.path.join(path, name))
               for name in ("_CHECKPOINT_METADATA", "_METADATA")):
        raise ValueError(f"no saved model at {path}: the directory holds no Orbax checkpoint "
                         f"(found {sorted(os.listdir(path))[:5]}); expected one written by "
                         "jalign.checkpoint.save_params, e.g. an earlier stage's final_params")
    return path


def load_params(path: str, abstract_params: Any) -> Any:
    """Reads a tree written by `save_params` onto the shardings in `abstract_params`."""
    path = _check_saved_dir(path)
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            saved = checkpointer.metadata(path)
            saved_tree = getattr(saved, "item_metadata", saved)
            saved_tree = getattr(saved_tree, "tree", saved_tree)
            _compare_trees(saved_tree, abstract_params, path)
        except CheckpointMismatchError:
            raise
        except Exception:  # metadata layout differs across orbax versions: restore reports
            pass
        return checkpointer.restore(path, abstract_params)


def _path_name(path) -> str:
    """'params/layers/attn/q_proj' whatever the containers (dicts, dataclasses, tuples)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _flat(tree: Any) -> dict[str, Any]:
    return {_path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _compare_trees(saved: Any, want: Any, where: str) -> None:
    saved_flat, want_flat = _flat(saved), _flat(want)
    missing = sorted(set(want_flat) - set(saved_flat))
    extra = sorted(set(saved_flat) - set(want_flat))
    if missing or extra:
        raise CheckpointMismatchError(
            f"{where} holds a checkpoint of another model: missing {missing[:3]}, "
            f"unexpected {extra[:3]}. Use a fresh --workdir or the model config that wrote it.")
    for key, w in want_flat.items():
        got = getattr(saved_flat[key], "shape", None)
        if got is not None and tuple(got) != tuple(np.shape(w)):
            raise CheckpointMismatchError(
                f"{where} holds a checkpoint of another model shape: {key} is {tuple(got)} "
                f"there but {tuple(np.shape(w))} in this config. Use a fresh --workdir or the "
                "model config that wrote it.")
