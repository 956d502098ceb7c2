"""Per-stage timing shared by the pipeline and the profiler.

On a GPU the stages are timed with CUDA events, so the clock does not serialise the host with
the device between stages; on the CPU with perf_counter.
"""

from __future__ import annotations

import contextlib
import time

import torch


class StageClock:
    """Accumulates per-stage times; CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: str, times: dict[str, float] | None = None):
        self.cuda = str(device).startswith("cuda")
        self.times: dict[str, float] = dict(times or {})

    def now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start

    def add(self, stage: str, seconds: float) -> None:
        self.times[stage] = self.times.get(stage, 0.0) + seconds

    @contextlib.contextmanager
    def time(self, stage: str):
        """Adds the time of the `with` block to `stage` (also when the block raises)."""
        start = self.now()
        try:
            yield
        finally:
            self.add(stage, self.elapsed(start, self.now()))
