"""DAPO dynamic sampling: tied groups are replaced by groups with signal from more rounds."""

import jax
import numpy as np

from jalign import sharding as shd
from jalign.algorithms.rollout import _fill_with_signal, _tied_groups


def _round(sharding, round_, scores):
    rows = len(scores)
    ids = np.arange(rows, dtype=np.int32) + 100 * round_  # which round and row each row is
    batch = {"row": jax.make_array_from_process_local_data(sharding, ids)}
    return batch, np.asarray(scores, np.float32)


def test_tied_groups_are_replaced_by_groups_with_signal():
    sharding = shd.data_sharding(shd.make_mesh({"fsdp": 1}, jax.devices()[:1]), shd.DEFAULT_RULES)
    # 4 groups of 2: groups 1 and 3 tie in the first round.
    first = _round(sharding, 0, [1, 0, 5, 5, 0, 2, 3, 3])
    later = {1: [4, 4, 1, 2, 7, 7, 7, 7],    # round 1: one group with signal (rows 2-3)
             2: [0, 1, 9, 9, 9, 9, 9, 9]}    # round 2: one more (rows 0-1)
    calls = []

    def more(round_):
        calls.append(round_)
        return _round(sharding, round_, later[round_])

    batch, scores, host, metrics = _fill_with_signal(first, more, group_size=2, max_rounds=4,
                                                     sharding=sharding)
    assert calls == [1, 2]  # stopped as soon as 4 groups had signal
    np.testing.assert_array_equal(np.asarray(batch["row"]), [0, 1, 4, 5, 102, 103, 200, 201])
    np.testing.assert_array_equal(host, [1, 0, 0, 2, 1, 2, 0, 1])
    np.testing.assert_array_equal(np.asarray(scores), host)
    assert not _tied_groups(host, 2).any()
    assert metrics["dynamic_sampling/rounds"] == 3
    assert metrics["dynamic_sampling/frac_groups_dropped"] == 1 - 4 / 12
    assert metrics["dynamic_sampling/groups_filled_with_ties"] == 0


def test_too_few_groups_with_signal_are_filled_with_ties_and_counted():
    sharding = shd.data_sharding(shd.make_mesh({"fsdp": 1}, jax.devices()[:1]), shd.DEFAULT_RULES)
    first = _round(sharding, 0, [1, 1, 0, 3, 2, 2, 2, 2])
    batch, _, host, metrics = _fill_with_signal(
        first, lambda r: _round(sharding, r, [0] * 8), group_size=2, max_rounds=1,
        sharding=sharding)
    # The one group with signal, then tied groups of the first round in order.
    np.testing.assert_array_equal(np.asarray(batch["row"]), [2, 3, 0, 1, 4, 5, 6, 7])
    assert metrics["dynamic_sampling/rounds"] == 2
    assert metrics["dynamic_sampling/groups_filled_with_ties"] == 3
