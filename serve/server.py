"""The ln3diff.v1 gRPC server on grpc.aio: validation, admission, streaming, auth, health and reflection.

The event loop never runs the model: handlers check the request, queue a `Job` for the
scheduler's worker thread and relay its events (progress, then the result) to the client.
Health reports NOT_SERVING until the model is loaded and warmed, then SERVING, and NOT_SERVING
again from the start of a graceful shutdown. Requests arrive as bytes and each handler decodes its
own, after the token check: bytes that are no message are INVALID_ARGUMENT like any bad field, counted
in the metrics and logged in the RPC's one line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ln3diff_rt.options import FORMATS as MESH_FORMATS
from ln3diff_rt.options import GenerationOptions, InvalidOption
from ln3diff_rt.pipeline import Generator
from ln3diff_rt.runner import Request, run
from serve.auth import BearerTokenInterceptor, tls_credentials
from serve.ln3diff.v1 import generator_pb2 as pb
from serve.ln3diff.v1 import generator_pb2_grpc as pb_grpc
from serve.observability import Metrics
from serve.scheduler import Job, Output, QueueFull, Scheduler, ShuttingDown
from serve.validation import (
    DEFAULT_FORMATS,
    Limits,
    check_request,
    decode_request,
    unary_reply_bytes,
    unary_reply_refusal,
)

log = logging.getLogger("serve")
SERVICE = pb.DESCRIPTOR.services_by_name["Generator"].full_name  # "ln3diff.v1.Generator"
CHUNK_BYTES = 1 << 20  # mesh bytes per stream message, well under the 4 MiB default receive limit
_ADMISSION_CODES = {QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED, ShuttingDown: grpc.StatusCode.UNAVAILABLE}


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    max_batch: int = 8
    max_wait_ms: float = 20.0
    max_queue: int = 32
    object_threads: int = 1  # objects of a batch finished at once (runner.run): 2 raises CPU throughput under load
    token: str | None = None  # bearer token required on every RPC but health checks
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; 0 picks a free port
    metrics_host: str = "127.0.0.1"  # where /metrics listens: this machine only unless told otherwise
    limits: Limits = field(default_factory=Limits)


class GeneratorService(pb_grpc.GeneratorServicer):
    def __init__(self, config: ServerConfig, metrics: Metrics):
        self.config, self.metrics = config, metrics
        self.scheduler: Scheduler | None = None
        self.info: pb.ModelInfo | None = None

    async def Generate(self, data: bytes, context: grpc.aio.ServicerContext) -> None:
        await self._handle("Generate", data, context, stream=True)

    async def GenerateUnary(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.GenerateUnaryResponse:
        return await self._handle("GenerateUnary", data, context, stream=False)

    async def GetModelInfo(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            decode_request(pb.GetModelInfoRequest, data)
        except InvalidOption as e:
            self.metrics.requests.labels("GetModelInfo", "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.info is None:
            self.metrics.requests.labels("GetModelInfo", "UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is loading; retry when health says SERVING")
        self.metrics.requests.labels("GetModelInfo", "OK").inc()
        return self.info

    async def _handle(self, method: str, data: bytes, context: grpc.aio.ServicerContext,
                      stream: bool) -> pb.GenerateUnaryResponse | None:
        """Admit, relay progress (streaming only), then send the result; metrics and one log line per RPC."""
        start, code, job = time.monotonic(), grpc.StatusCode.OK, None
        request_id = uuid.uuid4().hex[:16]
        limits = self.config.limits
        try:
            if self.scheduler is None:
                code = grpc.StatusCode.UNAVAILABLE
                await context.abort(code, "the model is loading; retry when health says SERVING")
            try:
                spec = check_request(decode_request(pb.GenerateRequest, data), limits, self.scheduler.generator)
                if not stream and (estimate := unary_reply_bytes(spec)) > limits.max_unary_reply_bytes:
                    raise unary_reply_refusal(spec, estimate, limits.max_unary_reply_bytes, measured=False)
            except InvalidOption as e:
                code = grpc.StatusCode.INVALID_ARGUMENT
                await context.abort(code, str(e))
            remaining = context.time_remaining()
            job = Job(spec, request_id, asyncio.get_running_loop(),
                      deadline=None if remaining is None else time.monotonic() + remaining)
            try:
                ahead = self.scheduler.submit(job)
            except (QueueFull, ShuttingDown) as e:
                code, job = _ADMISSION_CODES[type(e)], None
                await context.abort(code, str(e))
            context.add_done_callback(lambda _: job.cancel())  # client cancel or deadline: free the worker
            self.metrics.in_flight.inc()
            if stream:
                await context.write(pb.GenerateResponse(progress=pb.Progress(stage="queued", total=ahead)))
            while True:
                kind, payload = await job.events.get()
                if kind == "progress" and stream:
                    stage, step, total = payload
                    await context.write(pb.GenerateResponse(progress=pb.Progress(stage=stage, step=step, total=total)))
                elif kind in ("error", "shutdown"):
                    code = grpc.StatusCode.INTERNAL if kind == "error" else grpc.StatusCode.UNAVAILABLE
                    await context.abort(code, payload)
                elif kind == "result":
                    break
            payload.timings["total"] = time.monotonic() - start
            result = result_message(job.spec, job.request_id, payload)
            if not stream:
                reply = unary_message(payload, result)
                if (size := reply.ByteSize()) > limits.max_unary_reply_bytes:  # the estimate missed: never send it
                    code = grpc.StatusCode.INVALID_ARGUMENT
                    await context.abort(code, str(unary_reply_refusal(job.spec, size, limits.max_unary_reply_bytes,
                                                                      measured=True)))
                return reply
            for message in stream_messages(payload, result):
                await context.write(message)
            return None
        except asyncio.CancelledError:
            # gRPC's own timer fires at the deadline; ours, read a moment later, can be a hair late
            late = job is not None and job.deadline is not None and time.monotonic() >= job.deadline - 0.05
            code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
            raise
        except Exception as e:
            if code == grpc.StatusCode.OK and not isinstance(e, grpc.aio.AbortError):
                code = grpc.StatusCode.INTERNAL
                log.exception("handler failed", extra={"fields": {"request_id": request_id}})
            raise
        finally:
            if job is not None:
                job.cancel()
                self.metrics.in_flight.dec()
            seconds = time.monotonic() - start
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.request_seconds.labels(method).observe(seconds)
            fields = {"request_id": request_id, "method": method, "code": code.name, "seconds": round(seconds, 4),
                      "peer": context.peer()}
            if job is not None:
                o = job.spec.options
                fields.update(seed=job.spec.seed, steps=o.steps, guidance=o.guidance, prompt_chars=len(job.spec.prompt))
            log.info("rpc", extra={"fields": fields})


def result_message(spec: Request, request_id: str, out: Output) -> pb.Result:
    """The Result of one request: the settings it ran with and what it produced (this server and serve.ray_app)."""
    o = spec.options
    result = pb.Result(
        request_id=request_id, seed=spec.seed, steps=o.steps, guidance=o.guidance, shift=o.shift,
        sampler=o.sampler, mesh_resolution=o.mesh_resolution if spec.mesh else 0,
        faces_budget=(o.faces or 0) if spec.mesh else 0,
        meshes=[pb.MeshInfo(format=f, size=len(d), sha256=h, file_name=out.file_names.get(f, "")) for f, d, h in
                out.meshes], mesh_empty=out.mesh_empty,
        vertex_count=out.vertex_count, face_count=out.face_count, preview_count=len(out.previews),
        batch_size=out.batch_size, timings=out.timings, warnings=out.warnings)
    if out.bounds is not None:
        result.bounding_box.min.extend(out.bounds[0])
        result.bounding_box.max.extend(out.bounds[1])
    return result


def stream_messages(out: Output, result: pb.Result):
    """Previews, then every mesh in CHUNK_BYTES pieces, then the Result with sizes and sha256."""
    for i, png in enumerate(out.previews):
        yield pb.GenerateResponse(preview=pb.Preview(index=i, png=png))
    for fmt, data, _ in out.meshes:
        for offset in range(0, len(data), CHUNK_BYTES):
            yield pb.GenerateResponse(mesh_chunk=pb.MeshChunk(format=fmt, offset=offset,
                                                              data=data[offset:offset + CHUNK_BYTES]))
    yield pb.GenerateResponse(result=result)


def unary_message(out: Output, result: pb.Result) -> pb.GenerateUnaryResponse:
    """GenerateUnary's reply: the Result with every mesh file and preview in one message."""
    return pb.GenerateUnaryResponse(result=result, meshes=[pb.Mesh(format=f, data=d) for f, d, _ in out.meshes],
                                    previews=[pb.Preview(index=i, png=p) for i, p in enumerate(out.previews)])


def add_generator_service(service: GeneratorService, server: grpc.aio.Server) -> None:
    """Register the Generator methods as the generated add_GeneratorServicer_to_server does, but with the request
    bytes left undecoded: gRPC would answer bytes that are no message with UNKNOWN and log a traceback."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Generator"].methods:
        kind = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        reply = getattr(pb, method.output_type.name)
        handlers[method.name] = kind(getattr(service, method.name), response_serializer=reply.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def model_info(generator: Generator, config: ServerConfig) -> pb.ModelInfo:
    """The model, and every option's effective bounds (the option's own, tightened by Limits) and default."""
    cfg, lim, defaults = generator.config, config.limits, generator.default_options()
    limits = pb.Limits(max_prompt_chars=lim.max_prompt_chars, max_queue=config.max_queue, max_batch=config.max_batch,
                       max_image_bytes=lim.max_image_bytes, max_preview_pixels=lim.max_preview_pixels,
                       max_unary_reply_bytes=lim.max_unary_reply_bytes)
    for name, (lo, hi) in lim.effective_bounds().items():
        for prefix, value in (("min_", lo), ("max_", hi)):
            if prefix + name in pb.Limits.DESCRIPTOR.fields_by_name:
                setattr(limits, prefix + name, value)
    return pb.ModelInfo(
        preset=cfg.preset, checkpoint=generator.models.path.name, checkpoint_sha256=generator.models.sha256,
        backend=generator.backend, device=str(generator.device), latent_shape=list(cfg.latent_shape),
        triplane_shape=list(cfg.triplane_shape), text_encoder=cfg.text_encoder, formats=list(MESH_FORMATS),
        samplers=list(generator.samplers), limits=limits,
        defaults=pb.Defaults(formats=list(DEFAULT_FORMATS), **dataclasses.asdict(defaults)),
        text_input=not cfg.image_only, image_input=cfg.takes_images, vocabulary=list(cfg.vocabulary))


def warm_up(generator: Generator) -> None:
    """One tiny request through every stage, so the first client does not pay for lazy initialisation."""
    options = GenerationOptions(steps=1, mesh_resolution=16, faces=0, preview_views=1, preview_size=16, texture=64)
    for _ in run(generator, [Request("warm-up", 1, options, ("glb",))]):
        pass


class Server:
    """Lifecycle: `start()` binds and serves health (NOT_SERVING), `load()` loads, warms and turns SERVING,
    `stop(grace)` refuses new RPCs, lets in-flight ones finish for `grace` seconds, then cancels them."""

    def __init__(self, load_generator: Callable[[], Generator], config: ServerConfig):
        self.load_generator, self.config = load_generator, config
        self.metrics = Metrics()
        self.service = GeneratorService(config, self.metrics)
        self.health = health.aio.HealthServicer()
        self.scheduler: Scheduler | None = None
        self.port = self.metrics_port = None

    async def start(self) -> int:
        c = self.config
        interceptors = [BearerTokenInterceptor(c.token, self.metrics)] if c.token else []
        # No SO_REUSEPORT: gRPC sets it by default, and a second server on a bound port then starts and silently
        # takes half the requests; without it the bind fails and the second server says so.
        self.grpc = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        add_generator_service(self.service, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc)
        address = f"{c.host}:{c.port}"
        if (c.tls_cert is None) != (c.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (PEM files)")
        if c.token and c.tls_cert is None:
            log.warning("a bearer token without TLS: the token and every request cross the network readable; give "
                        "a TLS certificate and key, or keep the server on 127.0.0.1",
                        extra={"fields": {"host": c.host}})
        credentials = tls_credentials(Path(c.tls_cert), Path(c.tls_key)) if c.tls_cert is not None else None
        try:
            if credentials is not None:
                self.port = self.grpc.add_secure_port(address, credentials)
            else:
                self.port = self.grpc.add_insecure_port(address)
        except RuntimeError as e:  # gRPC says only "Failed to bind to address"
            raise OSError(f"cannot listen on {address}: the port is in use (another server?) or the address is not "
                          f"this machine's ({e})") from e
        await self.grpc.start()
        if c.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(c.metrics_port, c.metrics_host)
        log.info("listening", extra={"fields": {"host": c.host, "port": self.port, "tls": c.tls_cert is not None,
                                                "auth": bool(c.token), "metrics_host": c.metrics_host,
                                                "metrics_port": self.metrics_port}})
        return self.port

    async def load(self) -> None:
        t = time.perf_counter()
        generator, info = await asyncio.to_thread(self._load_and_warm)
        self.scheduler = Scheduler(generator, self.metrics, self.config.max_batch, self.config.max_wait_ms / 1e3,
                                   self.config.max_queue, self.config.object_threads)
        self.scheduler.start()
        self.service.info, self.service.scheduler = info, self.scheduler
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"fields": {"preset": info.preset, "checkpoint": info.checkpoint,
                                              "checkpoint_sha256": info.checkpoint_sha256,
                                              "backend": info.backend, "device": info.device,
                                              "load_and_warm_seconds": round(time.perf_counter() - t, 3)}})
        if not self.scheduler.generator.models.sha256_verified:
            log.warning("the checkpoint records no tensor digests (written before they were), so its integrity was "
                        "not checked; re-save it to add them", extra={"fields": {"checkpoint": info.checkpoint}})

    def _load_and_warm(self) -> tuple[Generator, pb.ModelInfo]:
        generator = self.load_generator()
        warm_up(generator)
        return generator, model_info(generator, self.config)

    async def stop(self, grace: float | None) -> None:
        log.info("shutting down", extra={"fields": {"grace_seconds": grace}})
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(grace)
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.stop, 30.0)
        self.metrics.close()
        log.info("stopped")


class ServerThread:
    """A Server on its own event loop in a daemon thread, for tests, benchmarks and notebooks.

    The constructor binds (health answers NOT_SERVING) and starts loading; `wait_serving()` blocks
    until the model is loaded and warmed."""

    def __init__(self, load_generator: Callable[[], Generator], config: ServerConfig):
        self.server = Server(load_generator, config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ln3diff-server", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(60.0)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self._loading = asyncio.run_coroutine_threadsafe(self.server.load(), self._loop)

    def wait_serving(self, timeout: float = 120.0) -> ServerThread:
        self._loading.result(timeout)
        return self

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics(self) -> Metrics:
        return self.server.metrics

    def stop(self, grace: float | None = 0.0) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result(60.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
