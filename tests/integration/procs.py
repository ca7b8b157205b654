"""Process helpers for tests that start Ray (or a whole cluster) in a process session of their own."""
from __future__ import annotations

import os


def session_pids(session: int) -> list[int]:
    """PIDs of every live process in `session` (so teardown kills only what the test started)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(entry)) == session:
                pids.append(int(entry))
        except (ProcessLookupError, PermissionError):
            pass
    return pids
