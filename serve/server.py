"""The ln3diff.v1 gRPC server on grpc.aio: validation, admission, streaming, auth, health and reflection.

The event loop never runs the model: handlers check the request, queue a `Job` for the
scheduler's worker thread and relay its events (progress, then the result) to the client.
Health reports NOT_SERVING until the model is loaded and warmed, then SERVING, and NOT_SERVING
again from the start of a graceful shutdown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
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

from ln3diff_rt.checkpoint import file_sha256
from ln3diff_rt.mesh_export import FORMATS as MESH_FORMATS
from ln3diff_rt.options import GenerationOptions, InvalidOption
from ln3diff_rt.pipeline import Generator
from ln3diff_rt.runner import Request, run
from serve.ln3diff.v1 import generator_pb2 as pb
from serve.ln3diff.v1 import generator_pb2_grpc as pb_grpc
from serve.observability import Metrics
from serve.scheduler import Job, Output, QueueFull, Scheduler, ShuttingDown
from serve.validation import DEFAULT_FORMATS, Limits, check_request

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
    token: str | None = None  # bearer token required on every RPC but health checks
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; 0 picks a free port
    limits: Limits = field(default_factory=Limits)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless the metadata holds `authorization: Bearer <token>`; health stays open to probes."""

    EXEMPT = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str, metrics: Metrics):
        self.expected, self.metrics = f"Bearer {token}".encode(), metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.EXEMPT):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(sent.encode(), self.expected):
            return handler
        self.metrics.requests.labels(details.method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'")

    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return kind[handler.request_streaming, handler.response_streaming](
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


class GeneratorService(pb_grpc.GeneratorServicer):
    def __init__(self, config: ServerConfig, metrics: Metrics):
        self.config, self.metrics = config, metrics
        self.scheduler: Scheduler | None = None
        self.info: pb.ModelInfo | None = None

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        await self._handle("Generate", request, context, stream=True)

    async def GenerateUnary(self, request: pb.GenerateRequest,
                            context: grpc.aio.ServicerContext) -> pb.GenerateUnaryResponse:
        return await self._handle("GenerateUnary", request, context, stream=False)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        if self.info is None:
            self.metrics.requests.labels("GetModelInfo", "UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is loading; retry when health says SERVING")
        self.metrics.requests.labels("GetModelInfo", "OK").inc()
        return self.info

    async def _handle(self, method: str, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                      stream: bool) -> pb.GenerateUnaryResponse | None:
        """Admit, relay progress (streaming only), then send the result; metrics and one log line per RPC."""
        start, code, job = time.monotonic(), grpc.StatusCode.OK, None
        request_id = uuid.uuid4().hex[:16]
        try:
            if self.scheduler is None:
                code = grpc.StatusCode.UNAVAILABLE
                await context.abort(code, "the model is loading; retry when health says SERVING")
            try:
                spec = check_request(request, self.config.limits, self.scheduler.generator)
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
            result = result_message(job, payload)
            if not stream:
                return pb.GenerateUnaryResponse(result=result, meshes=[pb.Mesh(format=f, data=d) for f, d, _ in
                                                                        payload.meshes],
                                                previews=[pb.Preview(index=i, png=p) for i, p in
                                                          enumerate(payload.previews)])
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


def result_message(job: Job, out: Output) -> pb.Result:
    o = job.spec.options
    result = pb.Result(
        request_id=job.request_id, seed=job.spec.seed, steps=o.steps, guidance=o.guidance, shift=o.shift,
        sampler=o.sampler, mesh_resolution=o.mesh_resolution if job.spec.mesh else 0,
        faces_budget=(o.faces or 0) if job.spec.mesh else 0,
        meshes=[pb.MeshInfo(format=f, size=len(d), sha256=h) for f, d, h in out.meshes], mesh_empty=out.mesh_empty,
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


def model_info(generator: Generator, config: ServerConfig) -> pb.ModelInfo:
    """The model, and every option's effective bounds (the option's own, tightened by Limits) and default."""
    cfg, lim, defaults = generator.config, config.limits, generator.default_options()
    limits = pb.Limits(max_prompt_chars=lim.max_prompt_chars, max_queue=config.max_queue, max_batch=config.max_batch,
                       max_image_bytes=lim.max_image_bytes)
    for name, (lo, hi) in lim.effective_bounds().items():
        for prefix, value in (("min_", lo), ("max_", hi)):
            if prefix + name in pb.Limits.DESCRIPTOR.fields_by_name:
                setattr(limits, prefix + name, value)
    return pb.ModelInfo(
        preset=cfg.preset, checkpoint=generator.models.path.name, checkpoint_sha256=file_sha256(generator.models.path),
        backend=generator.backend, device=str(generator.device), latent_shape=list(cfg.latent_shape),
        triplane_shape=list(cfg.triplane_shape), text_encoder=cfg.text_encoder, formats=list(MESH_FORMATS),
        samplers=list(generator.samplers), limits=limits,
        defaults=pb.Defaults(formats=list(DEFAULT_FORMATS), **dataclasses.asdict(defaults)),
        text_input=not cfg.image_only, image_input=cfg.takes_images, vocabulary=list(cfg.vocabulary))


def warm_up(generator: Generator) -> None:
    """One tiny request through every stage, so the first client does not pay for lazy initialisation."""
    options = GenerationOptions(steps=1, mesh_resolution=16, faces=0, preview_views=1, preview_size=16)
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
        pb_grpc.add_GeneratorServicer_to_server(self.service, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc)
        address = f"{c.host}:{c.port}"
        if (c.tls_cert is None) != (c.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (PEM files)")
        try:
            if c.tls_cert is not None:
                credentials = grpc.ssl_server_credentials([(Path(c.tls_key).read_bytes(),
                                                            Path(c.tls_cert).read_bytes())])
                self.port = self.grpc.add_secure_port(address, credentials)
            else:
                self.port = self.grpc.add_insecure_port(address)
        except RuntimeError as e:  # gRPC says only "Failed to bind to address"
            raise OSError(f"cannot listen on {address}: the port is in use (another server?) or the address is not "
                          f"this machine's ({e})") from e
        await self.grpc.start()
        if c.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(c.metrics_port, c.host)
        log.info("listening", extra={"fields": {"host": c.host, "port": self.port, "tls": c.tls_cert is not None,
                                                "auth": bool(c.token), "metrics_port": self.metrics_port}})
        return self.port

    async def load(self) -> None:
        t = time.perf_counter()
        generator, info = await asyncio.to_thread(self._load_and_warm)
        self.scheduler = Scheduler(generator, self.metrics, self.config.max_batch, self.config.max_wait_ms / 1e3,
                                   self.config.max_queue)
        self.scheduler.start()
        self.service.info, self.service.scheduler = info, self.scheduler
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"fields": {"preset": info.preset, "checkpoint": info.checkpoint,
                                              "backend": info.backend, "device": info.device,
                                              "load_and_warm_seconds": round(time.perf_counter() - t, 3)}})

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
