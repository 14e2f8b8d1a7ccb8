"""`npcd personas`: the personas of a running daemon; `npcd personas check DIR` validates files offline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from npcd.service import config as daemon_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="daemon address (default: listen from npcd.yaml / NPCD_LISTEN)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    check = sub.add_parser("check", help="validate persona files without a model; exits 1 on any error")
    check.add_argument("directory", nargs="?", type=Path,
                       help="personas directory (default: personas from npcd.yaml / NPCD_PERSONAS)")


def run(args: argparse.Namespace) -> int:
    if args.action == "check":
        return check(args.directory or daemon_config.load().personas)
    config = daemon_config.load()
    return list_personas(args.address or config.listen, config)


def check(directory: Path) -> int:
    from npcd.personas.loader import load_dir

    personas, errors = load_dir(directory)
    for persona_id, persona in sorted(personas.items()):
        adapter = f"adapter {persona.adapter_path}" if persona.adapter_path else "base model"
        print(f"ok     {persona_id:<20} {persona.source.name} ({adapter})")
    for error in errors:
        print(f"error  {error}")
    print(f"{len(personas)} persona(s) valid, {len(errors)} error(s) in {directory}")
    return 1 if errors else 0


def list_personas(address: str, config: daemon_config.DaemonConfig) -> int:
    import grpc

    from npcd.service._proto import npcd_pb2 as pb
    from npcd.service._proto import npcd_pb2_grpc
    from npcd.service.connect import open_channel

    channel, metadata = open_channel(address, config)
    with channel:
        try:
            reply = npcd_pb2_grpc.NpcdStub(channel).ListPersonas(pb.ListPersonasRequest(), timeout=10,
                                                                  metadata=metadata)
        except grpc.RpcError as exc:
            print(f"npcd personas: cannot list personas at {address}: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            return 1
    rows = [("ID", "STATUS", "ADAPTER", "SOURCE / ERROR")]
    for p in reply.personas:
        status = pb.LoadStatus.Name(p.status).removeprefix("LOAD_STATUS_")
        adapter = f"r{p.adapter.rank}" if p.HasField("adapter") and p.adapter.rank else (
            "missing" if p.HasField("adapter") else "-")
        rows.append((p.id, status, adapter, p.error or p.source))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    return 0
