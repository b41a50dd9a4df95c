"""A DDP rank that a launcher started ends with that launcher, instead of running on as an orphan."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_launcher() -> None:
    """Ask the kernel to SIGKILL this process when its parent ends, if a launcher started it as a DDP rank.

    Lightning starts ranks 1..N-1 as children of rank 0 (torchrun starts every rank under its agent) with LOCAL_RANK
    set. Lightning ends rank 0 when a child fails, but a child whose rank 0 raised or was killed waits for its peers
    in its next collective, up to the process group's timeout (30 min), and one busy elsewhere never learns. torch's
    own `mp.spawn` ranks do the same (`_prctl_pr_set_pdeathsig`). Linux only; elsewhere a no-op.
    """
    if sys.platform != "linux" or "LOCAL_RANK" not in os.environ:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
