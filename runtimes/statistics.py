"""Per model version inference statistics, as Triton's ModelStatistics reports them.

The runtime server counts every request that reached a served model version:

    stats = statistics.of("simple", "1")
    stats.succeeded(rows=8, total=..., queue=..., compute_input=..., compute_infer=..., compute_output=...)
    stats.failed(total=...)          # a request that failed after it reached the model
    statistics.message(served)       # -> pb.ModelStatistics

Durations are seconds in, nanoseconds out. `inference_count` counts rows (a batch of 8 is 8
inferences, as Triton counts them); `execution_count` counts model executions (a batch the
dynamic batcher merged from several requests is one). The gateway adds up the figures of
every replica that serves a version (modelgw/oip/triton.py: add_statistics).
"""

from __future__ import annotations

import time
from typing import Any

from modelgw.protos import inference_pb2 as pb


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


class VersionStatistics:
    """The counters of one model version, for as long as the runtime runs."""

    __slots__ = ("compute_infer", "compute_input", "compute_output", "executions", "fail", "inference_count",
                 "last_inference", "queue", "success")

    def __init__(self) -> None:
        # [count, ns] pairs: a dataclass per duration would cost more on every request
        self.success = [0, 0]
        self.fail = [0, 0]
        self.queue = [0, 0]
        self.compute_input = [0, 0]
        self.compute_infer = [0, 0]
        self.compute_output = [0, 0]
        self.inference_count = 0
        self.executions = 0  # executions not counted by a runner: async predict, generate
        self.last_inference = 0  # ms since the epoch

    def succeeded(self, rows: int, total: float, queue: float, compute_input: float, compute_infer: float,
                  compute_output: float) -> None:
        for pair, seconds in ((self.success, total), (self.queue, queue), (self.compute_input, compute_input),
                              (self.compute_infer, compute_infer), (self.compute_output, compute_output)):
            pair[0] += 1
            pair[1] += _ns(seconds)
        self.inference_count += max(1, rows)
        self.last_inference = int(time.time() * 1000)

    def failed(self, total: float) -> None:
        self.fail[0] += 1
        self.fail[1] += _ns(total)
        self.last_inference = int(time.time() * 1000)

    def message(self, name: str, version: str, runner_executions: int) -> pb.ModelStatistics:
        def duration(pair: list[int]) -> pb.StatisticDuration:
            return pb.StatisticDuration(count=pair[0], ns=pair[1])

        return pb.ModelStatistics(
            name=name,
            version=version,
            last_inference=self.last_inference,
            inference_count=self.inference_count,
            execution_count=self.executions + runner_executions,
            inference_stats=pb.InferStatistics(
                success=duration(self.success),
                fail=duration(self.fail),
                queue=duration(self.queue),
                compute_input=duration(self.compute_input),
                compute_infer=duration(self.compute_infer),
                compute_output=duration(self.compute_output),
            ),
        )


class Statistics:
    """(model, version) -> its VersionStatistics; kept across reloads of a version."""

    def __init__(self) -> None:
        self._versions: dict[tuple[str, str], VersionStatistics] = {}

    def of(self, name: str, version: str) -> VersionStatistics:
        stats = self._versions.get((name, version))
        if stats is None:
            stats = self._versions[(name, version)] = VersionStatistics()
        return stats

    def message(self, served: Any) -> pb.ModelStatistics:
        """A served version's figures (a ServedModel: its runner counts the executions of
        predict calls, batched or not, since the version was last loaded)."""
        return self.of(served.name, served.version).message(served.name, served.version, served.runner.predict_calls)

