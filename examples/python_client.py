"""The smallest npcd client: one NPC line, streamed. Start the daemon first (`make serve`).

Usage: python examples/python_client.py [PERSONA] [HOST:PORT]
"""
import sys

import grpc

from npcd.service._proto import npcd_pb2 as pb
from npcd.service._proto import npcd_pb2_grpc

persona = sys.argv[1] if len(sys.argv) > 1 else "town_guard"
address = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1:50051"
with grpc.insecure_channel(address) as channel:
    request = pb.SayRequest(persona=persona, speaker="Player", line="Any news from the road?",
                            context={"location": "the village square"}, priority=pb.PRIORITY_PLAYER)
    for event in npcd_pb2_grpc.NpcdStub(channel).Say(request, timeout=60):
        if event.HasField("delta"):
            print(event.delta.text, end="", flush=True)
        elif event.HasField("finished"):
            print(f"\n[{event.finished.completion_tokens} tokens, {event.finished.timings.total_ms:.0f} ms]")
