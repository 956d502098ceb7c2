"""The ln3diff.v1 service as a Ray Serve application: past one machine, the same proto through Ray's gRPC proxy.

Each replica holds one `Generator` on one device (a GPU when the deployment's `ray_actor_options` ask for
one) and answers `Generate` (streaming), `GenerateUnary` and `GetModelInfo` as `ln3diff-serve` does:
requests are checked by `serve.validation` (`check_request`, the unary reply limit) and replies built by
`serve.server` (`result_message`, `stream_messages`, `unary_message`). Ray does the rest of the serving:
`@serve.batch` gathers concurrent requests (compatible ones share one `runner.run`), `autoscaling_config`
adds and removes replicas on the number of requests each replica has queued or running,
`max_queued_requests` answers RESOURCE_EXHAUSTED. A replica is routed to only once its constructor has
loaded and warmed the model, and `grpc.health.v1.Health/Check` is answered by a replica, so through the
proxy it says SERVING exactly when a warm replica exists (and fails or times out when none does).

    serve run serve/ray_config.yaml                  # a local Ray instance, gRPC on :9000
    ln3diff-serve --ray ADDRESS [--config FILE]      # the same config on a running cluster (`ray start`, KubeRay)

Needs the `cluster` extra (ray[serve]); `ln3diff-serve` without `--ray` never imports Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2
from ray import serve

from ln3diff_rt.options import InvalidOption
from ln3diff_rt.pipeline import Generator
from ln3diff_rt.runner import Cancelled, Request, run
from serve.ln3diff.v1 import generator_pb2 as pb
from serve.scheduler import Output
from serve.scheduler import request_output as output_of
from serve.server import SERVICE, ServerConfig, model_info, result_message, stream_messages, unary_message, warm_up
from serve.validation import Limits, check_request, unary_reply_bytes, unary_reply_refusal

log = logging.getLogger("serve.ray_app")
CONFIG = Path(__file__).with_name("ray_config.yaml")
REPLICA_METADATA = "ln3diff-replica"  # trailing metadata: the replica that ran the request
# What Ray's gRPC proxy registers (grpc_options.grpc_servicer_functions): the service and standard health.
GRPC_SERVICERS = ["serve.ln3diff.v1.generator_pb2_grpc.add_GeneratorServicer_to_server",
                  "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]


class _Abort(Exception):
    """Ends an RPC with the gRPC status set on its context (Ray's proxy sends that status)."""


def _abort(context, code: grpc.StatusCode, details: str):
    context.set_code(code)
    context.set_details(details)
    raise _Abort(details)


@dataclass
class _Pending:
    """One admitted request, waiting in `@serve.batch` and then running; `gone` once its caller left."""

    spec: Request
    enqueued_at: float = field(default_factory=time.monotonic)
    gone: threading.Event = field(default_factory=threading.Event)


@serve.deployment(name="ln3diff")
class GeneratorDeployment:
    """One replica: a loaded, warmed Generator and one worker thread that runs it."""

    def __init__(self, ckpt: str | None = None, device: str = "auto", backend: str = "eager", engine: str | None = None,
                 text_encoder: str | None = None, image_encoders: list[str] | None = None, max_batch: int = 8,
                 max_wait_ms: float = 20.0, max_queue: int = 32, limits: dict | None = None, precision: str = "fp32"):
        import torch

        if device == "auto":  # Ray shows a replica only the GPUs it was given (ray_actor_options.num_gpus)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.generator = Generator.from_checkpoint(ckpt, device, backend, engine, text_encoder=text_encoder,
                                                   image_encoders=tuple(image_encoders) if image_encoders else None,
                                                   precision=precision)
        warm_up(self.generator)
        self.config = ServerConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                                   limits=Limits(**(limits or {})))
        self.info = model_info(self.generator, self.config)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="ln3diff-worker")  # the model runs on one thread
        self._batch.set_max_batch_size(max_batch)
        self._batch.set_batch_wait_timeout_s(max_wait_ms / 1e3)
        self.waiting = 0  # admitted requests not yet in a running batch: the "queued" progress event's total

    # -- ln3diff.v1.Generator -----------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        spec, request_id, start = self._admit(request, grpc_context), uuid.uuid4().hex[:16], time.monotonic()
        yield pb.GenerateResponse(progress=pb.Progress(stage="queued", total=self.waiting))
        out = None
        async for stage, step, total, payload in self._events(spec, grpc_context):
            if payload is None:
                yield pb.GenerateResponse(progress=pb.Progress(stage=stage, step=step, total=total))
            else:
                out = payload
        out.timings["total"] = time.monotonic() - start
        grpc_context.set_trailing_metadata([(REPLICA_METADATA, self.replica)])  # travels with the next message
        for message in stream_messages(out, result_message(spec, request_id, out)):
            yield message

    async def GenerateUnary(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateUnaryResponse:
        spec, request_id, start = self._admit(request, grpc_context), uuid.uuid4().hex[:16], time.monotonic()
        limit = self.config.limits.max_unary_reply_bytes
        if (estimate := unary_reply_bytes(spec)) > limit:
            _abort(grpc_context, grpc.StatusCode.INVALID_ARGUMENT,
                   str(unary_reply_refusal(spec, estimate, limit, measured=False)))
        out = None
        async for *_, payload in self._events(spec, grpc_context):
            out = payload if payload is not None else out
        out.timings["total"] = time.monotonic() - start
        reply = unary_message(out, result_message(spec, request_id, out))
        if (size := reply.ByteSize()) > limit:  # the estimate missed: never send it
            _abort(grpc_context, grpc.StatusCode.INVALID_ARGUMENT,
                   str(unary_reply_refusal(spec, size, limit, measured=True)))
        grpc_context.set_trailing_metadata([(REPLICA_METADATA, self.replica)])
        return reply

    def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context) -> pb.ModelInfo:
        return self.info

    # -- grpc.health.v1.Health: only a replica that finished loading and warming up receives requests ----

    def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", SERVICE):
            _abort(grpc_context, grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    # -- batching ---------------------------------------------------------------------------------------

    def _admit(self, request: pb.GenerateRequest, grpc_context) -> Request:
        try:
            return check_request(request, self.config.limits, self.generator)
        except InvalidOption as e:
            _abort(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def _events(self, spec: Request, grpc_context) -> AsyncIterator[tuple]:
        """(stage, step, total, None) progress events, then (.., Output) once; the request leaves the batch
        (the runner drops it at its next check) when the caller stops listening: cancel, deadline, disconnect."""
        pending, error = _Pending(spec), "the request ended without a result; see the replica's log"
        self.waiting += 1
        try:
            async for event in self._batch(pending):  # ends after this request's result or error
                if isinstance(event, str):
                    error = event
                elif event is not None:
                    yield event
                    error = None if event[3] is not None else error
        finally:
            pending.gone.set()
        if error is not None:
            _abort(grpc_context, grpc.StatusCode.INTERNAL, error)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batch(self, batch: list[_Pending]) -> AsyncIterator[list]:
        """Ray's batch of requests, run on the worker thread as one `runner.run` per group of compatible ones.

        Yields one list per event, an entry per request (None where the event is not its own): Ray hands
        entry i to caller i, and StopIteration ends caller i's stream once it has its result or error."""
        self.waiting -= len(batch)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        done = object()

        def post(indices: list[int], event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (indices, event))

        work = loop.run_in_executor(self.worker, self._run_batch, batch, post, lambda: post([], done))
        while (item := await events.get())[1] is not done:
            indices, event = item
            row = [None] * len(batch)
            for i in indices:
                row[i] = event
            yield row
            if isinstance(event, str) or event[3] is not None:  # an error, or the result: that caller is done
                yield [StopIteration if i in indices else None for i in range(len(batch))]
        await work

    def _run_batch(self, batch: list[_Pending], post: Callable[[list[int], object], None],
                   finished: Callable[[], None]) -> None:
        """On the worker thread: each group of requests with equal sampling settings through `runner.run`."""
        started = time.monotonic()
        try:
            groups: dict[tuple, list[int]] = {}
            for i, pending in enumerate(batch):
                groups.setdefault(pending.spec.sampling_key, []).append(i)
            for members in groups.values():
                unanswered = set(members)
                try:
                    self._run_group(batch, members, started, post, unanswered)
                except Cancelled:
                    pass
                except Exception:  # a bug must not take the replica down; the group's requests get INTERNAL
                    log.exception("batch failed")
                    post(sorted(unanswered), "internal error while generating; see the replica's log")
        finally:
            finished()

    def _run_group(self, batch: list[_Pending], members: list[int], started: float,
                   post: Callable[[list[int], object], None], unanswered: set[int]) -> None:
        def progress(stage: str, step: int, total: int, index: int | None) -> None:
            post(members if index is None else [members[index]], (stage, step, total, None))

        for result in run(self.generator, [batch[i].spec for i in members], progress=progress,
                          alive=lambda k: not batch[members[k]].gone.is_set()):
            i = members[result.index]
            out: Output = output_of(result, {"queue": started - batch[i].enqueued_at, **result.timings},
                                    len(members))
            out.warnings = self.generator.prompt_warnings(batch[i].spec.prompt)
            post([i], ("done", 1, 1, out))
            unanswered.discard(i)


def build_app(args: dict) -> serve.Application:
    """The application `serve run` builds from a config's `args` (GeneratorDeployment's keyword arguments).

    `max_batch` and `max_queue` also set what Ray enforces: a replica takes up to two batches of requests at
    once (one running, one gathering), and callers beyond `max_queue` waiting get RESOURCE_EXHAUSTED."""
    max_batch, max_queue = int(args.get("max_batch", 8)), int(args.get("max_queue", 32))
    return GeneratorDeployment.options(max_ongoing_requests=2 * max_batch, max_queued_requests=max_queue).bind(**args)


def main(argv: list[str] | None = None) -> int:
    """`ln3diff-serve --ray ADDRESS [--config FILE]`: `serve run FILE` against the Ray cluster at ADDRESS."""
    p = argparse.ArgumentParser(prog="ln3diff-serve --ray",
                                description="Run the ln3diff.v1 service as a Ray Serve application (the cluster "
                                            "extra): `serve run` of the config file on the cluster at ADDRESS.")
    p.add_argument("--ray", required=True, metavar="ADDRESS",
                   help="a Ray cluster's address (host:6379, auto, ray://host:10001), or 'local' for a new local one")
    p.add_argument("--config", type=Path, default=CONFIG,
                   help="Ray Serve config: gRPC port, replicas, autoscaling, GPUs, model (default: %(default)s)")
    args = p.parse_args(argv)
    if not args.config.is_file():
        p.error(f"--config {args.config}: no such file")
    from ray.serve.scripts import cli

    command = ["run", str(args.config)] + ([] if args.ray == "local" else ["--address", args.ray])
    return cli.main(command, prog_name="serve")
