"""Micro-batching scheduler: one worker thread runs the model; the event loop only queues and streams.

Requests with the same sampling settings (steps, guidance, shift, sampler) that wait together are
run as one `ln3diff_rt.runner.run`: sampled and decoded once, then meshed, exported and previewed
request by request, each result sent as soon as it is ready. The worker waits at most `max_wait_s`
after the oldest waiting request for partners, so a lone request pays that much latency and a
burst fills the batch. Cancellation (client cancel, deadline, shutdown) is checked by the runner
between stages, after every sampling step, per field-query chunk and per preview ray chunk; a
request that is gone is dropped, and a batch whose requests are all gone stops at once. The time
the worker still spends on a batch after its last wanted request went away is measured
(`ln3diff_worker_blocked_seconds`): one chunk's time, or an uninterruptible step (marching cubes,
decimation, export), each bounded by the server's cost limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import threading
import time
from dataclasses import dataclass, field

from PIL import Image

from ln3diff_rt.mesh_export import export_file_name, to_trimesh
from ln3diff_rt.pipeline import Generator
from ln3diff_rt.runner import BATCH_STAGES, Cancelled, GenerationResult, Request, run
from serve.observability import Metrics

log = logging.getLogger("serve.scheduler")


class QueueFull(Exception):
    """The bounded queue is full; the RPC answers RESOURCE_EXHAUSTED."""


class ShuttingDown(Exception):
    """The scheduler has stopped taking work; the RPC answers UNAVAILABLE."""


@dataclass
class Output:
    """What one request produced, ready to stream."""

    meshes: list[tuple[str, bytes, str]]  # (format, file bytes, sha256 hex): every file of the asset
    previews: list[bytes]  # PNG files
    mesh_empty: bool
    vertex_count: int
    face_count: int
    bounds: tuple[list[float], list[float]] | None  # exported asset's (min xyz, max xyz)
    batch_size: int
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)  # about the request's prompt (Generator.prompt_warnings)
    file_names: dict[str, str] = field(default_factory=dict)  # format -> the name the files refer to it by


@dataclass
class Job:
    """One admitted request. Events go to the event loop that owns `events`, thread-safely."""

    spec: Request
    request_id: str
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() at which the client stops waiting
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    enqueued_at: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _cancelled_at: float | None = None

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share one sampler call."""
        return self.spec.sampling_key

    def cancel(self) -> None:
        if self._cancelled_at is None:
            self._cancelled_at = time.monotonic()
        self._cancelled.set()

    @property
    def gone_at(self) -> float | None:
        """When nobody wanted the result any more (cancel or deadline), if that has happened yet."""
        now = time.monotonic()
        passed = [t for t in (self._cancelled_at, self.deadline) if t is not None and t <= now]
        return min(passed) if passed else None

    @property
    def gone(self) -> bool:
        """Cancelled, or past its deadline: nobody is waiting for the result any more."""
        return self._cancelled.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)

    def post(self, kind: str, payload) -> None:
        """Hand an event to the RPC: "progress" (stage, step, total), "result" Output, or "error" / "shutdown"
        with a message."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: the server is gone
            self.cancel()


class Scheduler:
    def __init__(self, generator: Generator, metrics: Metrics, max_batch: int = 8, max_wait_s: float = 0.02,
                 max_queue: int = 32, object_threads: int = 1):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0 or object_threads < 1:
            raise ValueError(f"max_batch={max_batch}, max_queue={max_queue}, max_wait_s={max_wait_s}, "
                             f"object_threads={object_threads}: expected max_batch >= 1, max_queue >= 1, "
                             "max_wait_s >= 0, object_threads >= 1")
        self.generator, self.metrics, self.object_threads = generator, metrics, object_threads
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._queue: list[Job] = []
        self._running: list[Job] = []  # the batch the worker runs now
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ln3diff-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse queued requests, cancel the running batch (it stops at its next check), join the worker."""
        with self._cond:
            self._stopping = True
            dropped, self._queue = self._queue, []
            running = list(self._running)
            self.metrics.queue_depth.set(0)
            self._cond.notify_all()
        for job in dropped:
            job.cancel()
            job.post("shutdown", "the server is shutting down; retry on another replica or later")
        for job in running:
            job.cancel()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the worker did not stop in time", extra={"fields": {"timeout_seconds": timeout}})

    def submit(self, job: Job) -> int:
        """Queue a job; returns how many were waiting ahead of it. QueueFull when `max_queue` wait already."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down; retry on another replica or later")
            waiting = len(self._queue)
            if waiting >= self.max_queue:
                raise QueueFull(f"the queue is full ({waiting} requests waiting); retry later")
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify_all()
            return waiting

    # -- the worker thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._run_batch(batch)
            except Exception:  # a bug must not kill the only worker; the requests get INTERNAL
                log.exception("batch failed", extra={"fields": {"requests": [j.request_id for j in batch]}})
                for job in batch:
                    job.post("error", "internal error while generating; see the server log")
            finally:
                with self._cond:
                    self._running = []

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting job and up to max_batch - 1 compatible ones, waiting up to max_wait_s for them."""
        with self._cond:
            while True:
                self._queue = [j for j in self._queue if not j.gone]
                if self._stopping:
                    return None
                if not self._queue:
                    self._cond.wait()
                    continue
                first = self._queue[0]
                batch = [j for j in self._queue if j.key == first.key][:self.max_batch]
                remaining = first.enqueued_at + self.max_wait_s - time.monotonic()
                if len(batch) >= self.max_batch or remaining <= 0:
                    break
                self._cond.wait(remaining)
            taken = set(map(id, batch))
            self._queue = [j for j in self._queue if id(j) not in taken]
            self._running = batch
            self.metrics.queue_depth.set(len(self._queue))
            return batch

    def _run_batch(self, batch: list[Job]) -> None:
        """One `runner.run` for the batch; each job gets its progress events, then its Output."""
        started = time.monotonic()
        self.metrics.batch_size.observe(len(batch))

        def progress(stage: str, step: int, total: int, index: int | None) -> None:
            for job in batch if index is None else [batch[index]]:
                if not job.gone:
                    job.post("progress", (stage, step, total))

        first, served = True, {}  # id(job) -> when its result was posted
        try:
            for result in run(self.generator, [j.spec for j in batch], progress=progress,
                              alive=lambda i: not batch[i].gone, object_threads=self.object_threads):
                job = batch[result.index]
                for stage, seconds in result.timings.items():  # the batch's stages once, not once per request
                    if first or stage not in BATCH_STAGES:
                        self.metrics.stage_seconds.labels(stage).observe(seconds)
                first = False
                out = request_output(result, {"queue": started - job.enqueued_at, **result.timings}, len(batch))
                out.warnings = self.generator.prompt_warnings(job.spec.prompt)
                job.post("result", out)
                served[id(job)] = time.monotonic()
        except Cancelled:
            log.info("batch cancelled", extra={"fields": {"requests": [j.request_id for j in batch]}})
        finally:
            end = time.monotonic()  # the worker was blocked from when the last job it served or still wanted left
            wanted_until = max(served.get(id(j)) or j.gone_at or end for j in batch)
            self.metrics.worker_blocked.observe(max(0.0, end - wanted_until))


def request_output(result: GenerationResult, timings: dict[str, float], batch_size: int) -> Output:
    """What the RPC streams: the asset's files with their sha256 and names, PNG previews, counts and the exported
    bounds."""
    mesh = result.mesh
    empty = mesh is None or mesh.empty
    bounds = None
    if not empty:
        lo, hi = to_trimesh(mesh, result.placement).bounds
        bounds = ([float(v) for v in lo], [float(v) for v in hi])
    meshes = [(fmt, data, hashlib.sha256(data).hexdigest()) for fmt, data in result.exports.items()]
    return Output(meshes, [_png(frame) for frame in result.previews], mesh is not None and mesh.empty,
                  0 if empty else len(mesh.vertices), 0 if empty else len(mesh.faces), bounds, batch_size, timings,
                  file_names={key: export_file_name(result.stem, key) for key in result.exports})


def _png(frame) -> bytes:
    """[H, W, 3] uint8 -> PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()

