"""Micro-batching scheduler: one worker thread runs the model; the event loop only queues and streams.

Requests with the same sampling settings (steps, guidance, shift, sampler) that wait together are
sampled in one `sample_latents` call and decoded once; meshing, export and previews then run per
request. The worker waits at most `max_wait_s` after the oldest waiting request for partners, so a
lone request pays that much latency and a burst fills the batch. Cancellation (client cancel,
deadline, shutdown) is checked after every sampling step and between stages; a batch whose
requests are all gone stops at once and the worker takes the next one.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import threading
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from ln3diff_rt.mesh_export import mesh_bytes, to_trimesh
from ln3diff_rt.pipeline import Generator
from serve.observability import Metrics
from serve.validation import RequestSpec

log = logging.getLogger("serve.scheduler")


class Cancelled(Exception):
    """Every request of the batch was cancelled or ran past its deadline: stop working on it."""


class QueueFull(Exception):
    """The bounded queue is full; the RPC answers RESOURCE_EXHAUSTED."""


class ShuttingDown(Exception):
    """The scheduler has stopped taking work; the RPC answers UNAVAILABLE."""


@dataclass
class Output:
    """What one request produced, ready to stream."""

    meshes: list[tuple[str, bytes, str]]  # (format, file bytes, sha256 hex)
    previews: list[bytes]  # PNG files
    mesh_empty: bool
    vertex_count: int
    face_count: int
    bounds: tuple[list[float], list[float]] | None  # exported asset's (min xyz, max xyz)
    batch_size: int
    timings: dict[str, float]


@dataclass
class Job:
    """One admitted request. Events go to the event loop that owns `events`, thread-safely."""

    spec: RequestSpec
    request_id: str
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() at which the client stops waiting
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    enqueued_at: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share one sampler call."""
        o = self.spec.options
        return (o.steps, o.guidance, o.shift, o.sampler)

    def cancel(self) -> None:
        self._cancelled.set()

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
                 max_queue: int = 32):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch={max_batch}, max_queue={max_queue}, max_wait_s={max_wait_s}: expected "
                             "max_batch >= 1, max_queue >= 1, max_wait_s >= 0")
        self.generator, self.metrics = generator, metrics
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ln3diff-worker", daemon=True)
        self.batches_run = 0
        self._cuda = str(generator.device).startswith("cuda")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse queued requests, let the running batch notice its cancelled requests, join the worker."""
        with self._cond:
            self._stopping = True
            dropped, self._queue = self._queue, []
            self.metrics.queue_depth.set(0)
            self._cond.notify_all()
        for job in dropped:
            job.cancel()
            job.post("shutdown", "the server is shutting down; retry on another replica or later")
        self._thread.join(timeout)

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
            self.metrics.queue_depth.set(len(self._queue))
            return batch

    def _stage(self, timings: dict[str, float], name: str, start: float) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        timings[name] = time.perf_counter() - start
        self.metrics.stage_seconds.labels(name).observe(timings[name])

    def _run_batch(self, batch: list[Job]) -> None:
        started = time.monotonic()
        gen, options = self.generator, batch[0].spec.options
        self.metrics.batch_size.observe(len(batch))
        self.batches_run += 1

        def progress(stage: str, step: int, total: int) -> None:
            alive = [j for j in batch if not j.gone]
            if not alive:
                raise Cancelled
            for job in alive:
                job.post("progress", (stage, step, total))

        shared: dict[str, float] = {}
        prompts, seeds = [j.spec.prompt for j in batch], [j.spec.seed for j in batch]
        try:
            progress("encode_text", 0, 1)
            t = time.perf_counter()
            gen.encode_text(prompts)
            self._stage(shared, "encode_text", t)
            t = time.perf_counter()
            latents = gen.sample_latents(prompts, seeds, options, progress)  # [B, 3, c, h, w]
            self._stage(shared, "sample", t)
            progress("decode", 0, 1)
            t = time.perf_counter()
            planes = gen.decode(latents)  # [B, 3, C, R, R]
            self._stage(shared, "decode", t)
        except Cancelled:
            log.info("batch cancelled", extra={"fields": {"requests": [j.request_id for j in batch]}})
            return
        for i, job in enumerate(batch):
            if job.gone:
                continue
            timings = {"queue": started - job.enqueued_at, **shared}
            try:
                job.post("result", self._finish(job, planes[i], timings, len(batch)))
            except Cancelled:
                continue
            except Exception:
                log.exception("request failed", extra={"fields": {"request_id": job.request_id}})
                job.post("error", "internal error while meshing or rendering; see the server log")

    def _finish(self, job: Job, planes: torch.Tensor, timings: dict[str, float], batch_size: int) -> Output:
        """Mesh, export and previews for one request of the batch; planes [3, C, R, R]."""
        spec, gen = job.spec, self.generator

        def stage(name: str, step: int, total: int = 1) -> None:
            if job.gone:
                raise Cancelled
            job.post("progress", (name, step, total))

        meshes, mesh_empty, counts, bounds = [], False, (0, 0), None
        if spec.mesh:
            stage("mesh", 0)
            t = time.perf_counter()
            mesh = gen.extract_mesh(planes, spec.options)
            self._stage(timings, "mesh", t)
            stage("mesh", 1)
            mesh_empty = mesh.empty
            if not mesh_empty:
                stage("export", 0)
                t = time.perf_counter()
                lo, hi = to_trimesh(mesh).bounds
                bounds = ([float(v) for v in lo], [float(v) for v in hi])
                counts = (len(mesh.vertices), len(mesh.faces))
                for fmt in spec.formats:
                    data = mesh_bytes(mesh, fmt)
                    meshes.append((fmt, data, hashlib.sha256(data).hexdigest()))
                self._stage(timings, "export", t)
                stage("export", 1)
        previews = []
        if spec.options.preview_views:
            stage("preview", 0)
            t = time.perf_counter()
            previews = [_png(frame) for frame in gen.render_previews(planes, spec.options)]
            self._stage(timings, "preview", t)
            stage("preview", 1)
        return Output(meshes, previews, mesh_empty, *counts, bounds, batch_size, timings)


def _png(frame) -> bytes:
    """[H, W, 3] uint8 -> PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()

