"""Who may call the server: the bearer-token interceptor and the TLS credentials, each checked with a message
that names the real cause (gRPC itself says only "Failed to bind to address" for a bad key)."""

from __future__ import annotations

import hmac
import ssl
from pathlib import Path

import grpc

from serve.observability import Metrics


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless the metadata holds exactly one `authorization: Bearer <token>`; health stays open to
    probes. The refusal comes before the request is decoded, so the metrics count what the client got."""

    EXEMPT = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str, metrics: Metrics):
        self.expected, self.metrics = f"Bearer {token}".encode(), metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.EXEMPT):
            return handler
        sent = [value for key, value in details.invocation_metadata or () if key == "authorization"]
        if len(sent) == 1 and hmac.compare_digest(_bytes(sent[0]), self.expected):
            return handler
        self.metrics.requests.labels(details.method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()
        reason = (f"{len(sent)} authorization headers: send exactly one, 'authorization: Bearer <token>'"
                  if len(sent) > 1 else "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'")
        return _refusal(handler, reason)


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _refusal(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return kind[handler.request_streaming, handler.response_streaming](
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def tls_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    """Server credentials from a PEM certificate chain and its private key, both checked first with Python's ssl:
    ValueError naming the file and what is wrong with it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=str(cert))
    except ssl.SSLError as e:
        raise ValueError(f"TLS certificate {cert}: no PEM certificate in it ({e.reason or e})") from e
    try:
        context.load_cert_chain(str(cert), str(key), password="")  # an encrypted key fails instead of prompting
    except ssl.SSLError as e:
        raise ValueError(f"TLS key {key}: not an unencrypted PEM private key matching the certificate in {cert} "
                         f"({e.reason or e})") from e
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
