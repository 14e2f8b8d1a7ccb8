"""Who may call: the bearer token every call must carry, and the server credentials for TLS.

The token travels as gRPC metadata `authorization: Bearer <token>` (what
grpcurl's -H, the C ABI and the C# binding send); it is compared in constant
time. Health checks stay open so that a supervisor can probe the daemon
without the secret; everything else, reflection included, needs the token.
"""

from __future__ import annotations

import hmac
from typing import Any, Awaitable, Callable

import grpc

from npcd.service.config import DaemonConfig

OPEN_METHODS = ("/grpc.health.v1.Health/",)


def server_credentials(config: DaemonConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's PEM files, or None for a plaintext (loopback) port."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without the daemon's token with UNAUTHENTICATED, before any handler runs."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(sent.encode() if isinstance(sent, str) else sent, self._expected):
            return handler
        why = "missing" if not sent else "wrong"
        return _refusal(handler, f"the bearer token is {why}: send metadata 'authorization: Bearer <token>'")


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only aborts."""
    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
