"""Engine and registry values as wire messages, and engine refusals as gRPC codes."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import struct_pb2

from npcd.engine.api import FinishReason, InvalidRequest, QueueFull, UnknownAdapter
from npcd.service._proto import npcd_pb2 as pb
from npcd.service.registry import Status

FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: pb.FINISH_REASON_DEADLINE,
}
STATUSES = {
    Status.READY: pb.LOAD_STATUS_READY,
    Status.ERROR: pb.LOAD_STATUS_ERROR,
    Status.STALE: pb.LOAD_STATUS_STALE,
    Status.RETIRING: pb.LOAD_STATUS_RETIRING,
}
BACKEND_CODES = {
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnknownAdapter: grpc.StatusCode.NOT_FOUND,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
}


def _plain(value: Any) -> Any:
    """YAML values as JSON-like ones, so that any metadata fits a protobuf Struct."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # dates and the like


def struct(data: dict) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(_plain(data))
    return out
