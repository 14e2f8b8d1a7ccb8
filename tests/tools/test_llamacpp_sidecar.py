"""The llama.cpp sidecar over gRPC: real llama.cpp, real converted adapters, started as the load test starts it.

On the tiny model its base is converted to an f32 GGUF, so greedy lines must
match the naive (transformers + PEFT) sidecar's token for token: that checks
the adapter conversion, the rsLoRA scale and the per-request switching. On the
real model it serves a bundled persona from the bundled Q4_1 GGUF.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from server_helpers import check_stream, write_persona

from npcd.engine.config import EngineConfig
from npcd.service._proto import npcd_pb2 as pb
from npcd.service._proto import npcd_pb2_grpc
from npcd.tools.loadtest import llamacpp_gguf
from npcd.tools.loadtest.targets import BASELINES

pytestmark = [pytest.mark.slow,  # starts subprocesses
              pytest.mark.skipif(llamacpp_gguf.missing() is not None,
                                 reason=f"llama.cpp sidecar: {llamacpp_gguf.missing()}")]

NAIVE, LLAMACPP = (next(b for b in BASELINES if b.server == name) for name in ("naive", "llama.cpp"))
RPC_TIMEOUT_S = 30


def say(address: str, persona: str, line: str = "Any news from the road?", max_tokens: int = 6,
        **fields) -> list[pb.Event]:
    with grpc.insecure_channel(address) as channel:
        return list(npcd_pb2_grpc.NpcdStub(channel).Say(pb.SayRequest(
            request_id=f"{persona}-1", persona=persona, line=line,
            sampling=pb.SamplingOverrides(max_tokens=max_tokens, temperature=0), **fields), timeout=RPC_TIMEOUT_S))


def test_lines_match_the_naive_sidecar_per_adapter(tmp_path, tiny_model_dir, tiny_adapters):
    personas = tmp_path / "personas"
    personas.mkdir()
    write_persona(personas, "elf", adapter=tiny_adapters["elf"])
    write_persona(personas, "merchant", adapter=tiny_adapters["merchant"])  # rsLoRA
    write_persona(personas, "plain")
    engine = EngineConfig(base=str(tiny_model_dir), threads=1, max_seq_len=256)
    llama, naive = LLAMACPP.process(personas, engine), NAIVE.process(personas, engine)
    llama.start()
    naive.start()  # both load at once; requests below go to one at a time
    with llama, naive:
        texts = {}
        for persona in ("elf", "merchant", "plain"):
            ours = check_stream(say(llama.address, persona), f"{persona}-1")
            theirs = check_stream(say(naive.address, persona), f"{persona}-1")
            assert ours.completion_tokens == theirs.completion_tokens >= 1
            assert ours.text == theirs.text, persona
            texts[persona] = ours.text
        assert texts["merchant"] != texts["plain"]  # the adapter is applied, and switched off again
        for address in (llama.address, naive.address):  # the daemon's max_seq_len rule, in both
            with pytest.raises(grpc.RpcError) as refused:
                say(address, "plain", history=[pb.Turn(speaker="Player", text="word " * 300)])
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_seq_len is 256" in refused.value.details()


def test_a_bundled_persona_streams_from_the_bundled_gguf(tmp_path, real_model_dir):
    """The shipped town_guard, and a copy of it without its adapter, on the embedded base."""
    repo = Path(__file__).resolve().parents[2]
    personas = tmp_path / "personas"
    (personas / "adapters").mkdir(parents=True)
    guard = (repo / "personas" / "town_guard.yaml").read_text()
    (personas / "town_guard.yaml").write_text(guard)
    (personas / "guard_no_adapter.yaml").write_text(
        guard.replace("id: town_guard", "id: guard_no_adapter").replace("adapter: adapters/town_guard\n", ""))
    (personas / "adapters" / "town_guard").symlink_to(repo / "personas" / "adapters" / "town_guard")
    with LLAMACPP.process(personas, EngineConfig(threads=1)) as llama:
        events = say(llama.address, "town_guard", max_tokens=12)
        finished = check_stream(events, "town_guard-1")
        assert finished.text.strip() and 1 <= finished.completion_tokens <= 12
        assert sum(e.HasField("delta") for e in events) >= 2  # streamed, not sent at the end
        assert finished.reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        plain = check_stream(say(llama.address, "guard_no_adapter", max_tokens=12), "guard_no_adapter-1")
        assert plain.text != finished.text  # the persona's LoRA changes what the base says
