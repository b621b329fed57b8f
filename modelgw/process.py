"""Tie a child process's life to its parent's (Linux), set up by the child itself.

A supervisor that forks replicas wants them gone when it dies, or a standby taking over
would find orphans. PR_SET_PDEATHSIG does that, but setting it between fork and exec
(preexec_fn) is unsafe in a multi-threaded parent. So the parent passes its pid in
MODELGW_PARENT_PID and the child calls `exit_with_parent()` first thing.
"""

from __future__ import annotations

import ctypes
import os
import signal

PARENT_PID_ENV = "MODELGW_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def exit_with_parent() -> None:
    """If MODELGW_PARENT_PID names our parent, get SIGTERM when it dies (Linux only)."""
    expected = os.environ.pop(PARENT_PID_ENV, None)
    if not expected or not expected.isdigit():
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != expected and not _exists(int(expected)):
        # the parent died before the death signal was armed (when it still exists, a
        # wrapper such as `sh -c` stands between us and we die with the wrapper: a
        # supervisor's command should exec the runtime)
        os.kill(os.getpid(), signal.SIGTERM)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True
