"""Tie a child process's life to its parent's (Linux), set up by the child itself.

A supervisor that forks replicas wants them gone when it dies, or a standby taking over
would find orphans. PR_SET_PDEATHSIG does that, but setting it between fork and exec
(preexec_fn) is unsafe in a multi-threaded parent. So the parent passes its pid in
MODELGW_PARENT_PID and the child calls `exit_with_parent()` first thing. A program that
cannot make that call (etcd) runs behind a small shim that does and then execs it (the
death signal survives exec): see tied_to_this_process.

The death signal comes when the *thread* that started the child ends, not the process:
start such children from the main thread (or one that lives as long as the process).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping

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


def python_module(module: str, python: str = sys.executable) -> list[str]:
    """argv that runs `python -m module` isolated from the caller's working directory: -P
    (Python 3.11+) keeps the cwd off sys.path, so a folder named `modelgw` there (the parent
    of a checkout) cannot shadow the installed package. Every process modelgw spawns of
    itself starts so."""
    return [python, "-P", "-m", module]


def tied_to_this_process(argv: list[str], env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """(argv, env) that run the program `argv` so that it gets SIGTERM when this process
    dies, for a program that cannot call exit_with_parent() itself: `python -m
    modelgw.process PROGRAM ARGS...` arms the death signal, then execs the program."""
    return [*python_module("modelgw.process"), *argv], {**env, PARENT_PID_ENV: str(os.getpid())}


if __name__ == "__main__":
    exit_with_parent()
    os.execvp(sys.argv[1], sys.argv[1:])
