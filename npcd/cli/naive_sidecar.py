"""The naive sidecar for `npcd loadtest --compare-naive`: transformers + PEFT, one request at a time, over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc

from npcd.personas.loader import load_dir
from npcd.service._proto import npcd_pb2_grpc
from npcd.tools.loadtest.naive import NaiveGenerator, NaiveServicer


async def serve(listen: str, personas_dir: Path, base: str, threads: int) -> int:
    from npcd.engine.weights import resolve_base

    personas, errors = load_dir(personas_dir)
    for error in errors:
        print(f"naive sidecar: skipping {error}", file=sys.stderr)
    generator = await asyncio.to_thread(NaiveGenerator, resolve_base(base), personas, threads)
    server = grpc.aio.server()
    npcd_pb2_grpc.add_NpcdServicer_to_server(NaiveServicer(generator), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    print(f"naive sidecar listening on {listen.rpartition(':')[0]}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)
    generator.worker.shutdown(wait=False, cancel_futures=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m npcd.cli.naive_sidecar", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 picks a free one)")
    parser.add_argument("--personas", type=Path, default=Path("personas"), help="personas directory")
    parser.add_argument("--base", default="embedded:smollm2-135m-instruct", help="base model, as in an engine file")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores")
    args = parser.parse_args(argv)
    return asyncio.run(serve(args.listen, args.personas, args.base, args.threads))


if __name__ == "__main__":
    sys.exit(main())
