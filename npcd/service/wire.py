"""The service registered on the gRPC server with request decoding of our own.

gRPC's generated registration decodes requests before our code runs, and a
payload that is not a valid message (or a string field that is not UTF-8) ends
the call with UNKNOWN "Unexpected DecodeError", and inside a Session the whole
stream with it. Decoding here instead turns such a payload into `Undecodable`:
a unary call is answered INVALID_ARGUMENT naming the message type and what
could not be decoded; a Session gets an Error event for that tick and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from npcd.service._proto import npcd_pb2 as pb


@dataclass(frozen=True)
class Undecodable:
    """A request payload that did not decode as `message_type`."""

    message_type: str
    problem: str

    @property
    def message(self) -> str:
        return f"the request could not be decoded as {self.message_type}: {self.problem}"


def _decoder(message_class: Any) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Undecodable(message_class.DESCRIPTOR.full_name, str(exc) or "malformed protobuf")
    return decode


def _unary_guard(handler: Callable) -> Callable:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await handler(request, context)
    return guarded


def _unary_stream_guard(handler: Callable) -> Callable:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        async for item in handler(request, context):
            yield item
    return guarded


def add_service(servicer: Any, server: grpc.aio.Server) -> None:
    """Registers every method of npcd.v1.Npcd (read from the proto's descriptor, so none can be missed)."""
    service = pb.DESCRIPTOR.services_by_name["Npcd"]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        implementation = getattr(servicer, method.name)
        options = {"request_deserializer": _decoder(request_class),
                   "response_serializer": response_class.SerializeToString}
        if method.client_streaming:  # the handler reads Undecodable items itself (Session)
            make = grpc.stream_stream_rpc_method_handler if method.server_streaming \
                else grpc.stream_unary_rpc_method_handler
            handlers[method.name] = make(implementation, **options)
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(_unary_stream_guard(implementation),
                                                                         **options)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(_unary_guard(implementation), **options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
