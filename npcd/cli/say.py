"""`npcd say PERSONA "line"`: one NPC line, streamed to the terminal through the gRPC API."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from npcd.service import config as daemon_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("persona", help="persona id")
    parser.add_argument("line", help="the line the NPC answers")
    parser.add_argument("--speaker", default="Player", help="who says the line (default Player)")
    parser.add_argument("--npc-id", default="", help="which NPC instance speaks")
    parser.add_argument("--context", action="append", default=[], metavar="KEY=VALUE",
                        help="world context, repeatable (e.g. --context location=tavern)")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--deadline-ms", type=int, default=0)
    parser.add_argument("--conversation", default="", metavar="ID",
                        help="a conversation the daemon keeps: earlier lines with this id are remembered")
    parser.add_argument("--actions", action="store_true",
                        help="structured reply: stream the line, then print the emotion and action the NPC chose "
                             "from its persona's `emotions` and `actions`")
    parser.add_argument("--address", help="daemon address (default: listen from npcd.yaml / NPCD_LISTEN)")
    parser.add_argument("--local", action="store_true",
                        help="start an in-process daemon on a free loopback port instead of calling one")
    parser.add_argument("--personas", type=Path, help="with --local: personas directory")
    parser.add_argument("--engine", type=Path, help="with --local: engine definition")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="give up after this long")


def request_from_args(args: argparse.Namespace):
    from npcd.service._proto import npcd_pb2 as pb

    context = {}
    for item in args.context:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--context must be KEY=VALUE, got {item!r}")
        context[key] = value
    sampling = pb.SamplingOverrides()
    for name in ("max_tokens", "temperature", "seed"):
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    return pb.SayRequest(request_id="cli", persona=args.persona, npc_id=args.npc_id, speaker=args.speaker,
                         line=args.line, context=context, sampling=sampling, priority=pb.PRIORITY_PLAYER,
                         deadline_ms=args.deadline_ms, structured=args.actions, conversation=args.conversation)


def run(args: argparse.Namespace) -> int:
    request = request_from_args(args)
    config = daemon_config.load()
    if not args.local:
        return say(args.address or config.listen, request, args.timeout_s, config)
    from npcd.service import logs
    from npcd.service.daemon import DaemonThread

    logs.configure(level="warning")
    overrides = {k: getattr(args, k) for k in ("personas", "engine") if getattr(args, k) is not None}
    local = dataclasses.replace(config, listen="127.0.0.1:0", metrics="0", grace_s=1.0, **overrides)
    with DaemonThread(local) as daemon:
        return say(daemon.address, request, args.timeout_s, local)


def say(address: str, request, timeout_s: float, config: daemon_config.DaemonConfig) -> int:
    """Streams the reply to stdout and a summary to stderr; 0 when the NPC finished its line."""
    import grpc

    from npcd.service._proto import npcd_pb2 as pb
    from npcd.service._proto import npcd_pb2_grpc

    from npcd.service.connect import open_channel

    channel, metadata = open_channel(address, config)
    with channel:
        stream = npcd_pb2_grpc.NpcdStub(channel).Say(request, timeout=timeout_s, metadata=metadata)
        try:
            for event in stream:
                kind = event.WhichOneof("kind")
                if kind == "delta":
                    sys.stdout.write(event.delta.text)
                    sys.stdout.flush()
                elif kind == "emotion":
                    print(f"\n[emotion: {event.emotion.label}]", end="", flush=True)
                elif kind == "action":
                    print(f"\n[action: {event.action.name} {event.action.args_json}]", end="", flush=True)
                elif kind == "finished":
                    f = event.finished
                    reason = pb.FinishReason.Name(f.reason).removeprefix("FINISH_REASON_").lower()
                    print(flush=True)
                    print(f"[{reason}, {f.completion_tokens} tokens, first token {f.timings.first_token_ms:.0f} ms,"
                          f" total {f.timings.total_ms:.0f} ms]", file=sys.stderr)
                    return 0
                elif kind == "error":
                    print(f"\nnpcd say: {event.error.status}: {event.error.message}", file=sys.stderr)
                    return 1
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" not in (exc.details() or ""):
                print(f"npcd say: no daemon answers at {address} (start one with `npcd serve`, or use --local)",
                      file=sys.stderr)
            else:
                print(f"npcd say: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print("npcd say: the stream ended without a Finished event", file=sys.stderr)
    return 1
