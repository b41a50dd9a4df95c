"""How many processes and threads this process's share of the machine affords: loader workers, file checks."""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (a SLURM allocation's, not the node's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers(processes_per_node: int = 1) -> int:
    """One loader process per core of this process's share, leaving one to the training loop; at most 16."""
    return max(1, min(16, available_cores() // processes_per_node - 1))
