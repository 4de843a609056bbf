"""How busy the machine is: the benchmarks report it next to their timings."""

import os


def cpu_snapshot():
    """(machine busy CPU seconds, this process's CPU seconds); machine part None off Linux."""
    own = sum(os.times()[:2])
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = None
    return busy, own


def others_busy(start, end, wall_s: float):
    """Average number of cores other processes kept busy between two `cpu_snapshot`s."""
    if start[0] is None or end[0] is None:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / wall_s)
