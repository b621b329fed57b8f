"""asyncio task helpers every long-running component shares (after kopf's aiotasks).

    await stop_tasks(publisher, follower)        # cancel, then wait until they have ended
    task = guard(loop.create_task(run()), "the endpoint publisher", log)   # logs if it dies
    outage = OutageLog(log, "lease 1a2b: keep-alive")
    outage.failed(exc)      # logs the first failure of an outage only, as a warning
    outage.recovered()      # logs "works again" once, when an outage ends

Background loops retry for as long as etcd is away; without OutageLog each logged every
retry (a 30 s outage filled the log with a few hundred identical lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging


async def stop_tasks(*tasks: asyncio.Future | None) -> None:
    """Cancel the tasks (None entries are skipped) and wait until every one has ended;
    what they raise on the way out is theirs to log (see guard), not the caller's."""
    pending = [t for t in tasks if t is not None]
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def guard(task: asyncio.Task, what: str, log: logging.Logger) -> asyncio.Task:
    """Log (with its traceback) when `task`, a background loop meant to run until
    cancelled, ends by an exception: nobody awaits such a task until shutdown, so its
    death would otherwise pass unseen. Returns the task."""

    def done(finished: asyncio.Task) -> None:
        if finished.cancelled():
            return
        exc = finished.exception()
        if exc is not None:
            log.error("%s died: %s", what, exc, exc_info=exc)

    task.add_done_callback(done)
    return task


class OutageLog:
    """Log a failure once per outage, not once per retry, and the recovery once."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.failing = False

    def failed(self, exc: BaseException | str, retry: str = "retrying") -> None:
        if not self.failing:
            self.log.warning("%s failed, %s: %s", self.what, retry, exc)
        self.failing = True

    def recovered(self, message: str = "works again") -> None:
        if self.failing:
            self.log.info("%s %s", self.what, message)
        self.failing = False
