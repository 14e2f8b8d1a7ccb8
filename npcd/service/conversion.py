"""Engine and registry values as wire messages, and engine refusals as gRPC codes."""

from __future__ import annotations

import json
from typing import Any

import grpc
from google.protobuf import struct_pb2

from npcd.engine.api import FinishReason, InvalidRequest, QueueFull, UnknownAdapter
from npcd.personas.actions import ACTION_FIELD, EMOTION_FIELD
from npcd.service._proto import npcd_pb2 as pb
from npcd.service.registry import Status

FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: pb.FINISH_REASON_DEADLINE,
    FinishReason.PREEMPTED: pb.FINISH_REASON_PREEMPTED,
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


def _action(value: Any) -> pb.Action | None:
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return pb.Action(name=value["name"], args_json=json.dumps(value.get("args") or {}, ensure_ascii=False))
    return None


def field_event(request_id: str, name: str, value: Any) -> pb.Event | None:
    """A finished top-level field of a structured reply as its wire event; None for fields with no event of
    their own (a custom response_format's: they arrive in Finished.json)."""
    if name == EMOTION_FIELD and isinstance(value, str):
        return pb.Event(request_id=request_id, emotion=pb.Emotion(label=value))
    action = _action(value) if name == ACTION_FIELD else None
    return pb.Event(request_id=request_id, action=action) if action is not None else None


def structured_parts(finished: pb.Finished) -> None:
    """Fills Finished.emotion and .action from its JSON (a reply cut short by max_seq_len may have neither)."""
    if not finished.json:
        return
    try:
        reply = json.loads(finished.json)
    except json.JSONDecodeError:
        return
    if not isinstance(reply, dict):
        return
    if isinstance(reply.get(EMOTION_FIELD), str):
        finished.emotion.label = reply[EMOTION_FIELD]
    action = _action(reply.get(ACTION_FIELD))
    if action is not None:
        finished.action.CopyFrom(action)
