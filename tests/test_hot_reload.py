"""Persona hot-reload in a running daemon: edits apply to new requests, bad edits keep the last good version,
deleted files retire their persona once its running requests finish."""

from __future__ import annotations

import shutil
import time

import grpc
import pytest

from npcd._proto import npcd_pb2 as pb
from server_helpers import check_stream, engine_config, running_daemon, say, wait_for, write_persona


@pytest.fixture
def live(tmp_path, tiny_model_dir, tiny_adapters):
    directory = tmp_path / "personas"
    directory.mkdir()
    write_persona(directory, "elf", adapter=tiny_adapters["elf"])
    write_persona(directory, "plain")
    with running_daemon(directory, engine_config(tiny_model_dir)) as (daemon, stub):
        yield directory, daemon, stub


def status(stub, persona_id: str) -> pb.Persona | None:
    reply = stub.ListPersonas(pb.ListPersonasRequest(), timeout=10)
    return next((p for p in reply.personas if p.id == persona_id), None)


def start_long_say(stub, persona_id: str, request_id: str):
    """A request that runs for a while; returns the call and its event iterator, past Started."""
    call = stub.Say(pb.SayRequest(request_id=request_id, persona=persona_id, line="Tell the whole saga.",
                                  sampling=pb.SamplingOverrides(max_tokens=300)), timeout=60)
    events = iter(call)
    first = next(events)
    assert first.WhichOneof("kind") == "started"
    return call, [first], events


def test_saved_edit_applies_to_new_requests_within_a_second(live):
    directory, _, stub = live
    before = check_stream(say(stub, request_id="a", persona="plain", line="Hi"), "a")
    write_persona(directory, "plain", display_name="Old Tom",
                  system_prompt="You are Old Tom, a fisherman who has seen every storm of the last sixty years.")
    took = wait_for(lambda: stub.GetPersona(pb.GetPersonaRequest(id="plain"), timeout=10).display_name == "Old Tom",
                    3, "the edit to apply")
    assert took < 1.0
    after = check_stream(say(stub, request_id="b", persona="plain", line="Hi"), "b")
    assert after.prompt_tokens > before.prompt_tokens  # the new, longer system prompt is used


def test_running_request_finishes_with_the_version_it_started_with(live, tiny_adapters):
    directory, daemon, stub = live
    version = daemon.backend.adapters()["elf"].version
    call, events, rest = start_long_say(stub, "elf", "old")
    write_persona(directory, "elf", adapter=tiny_adapters["villain"], display_name="New Elf")
    wait_for(lambda: daemon.backend.adapters()["elf"].version > version, 3, "the new adapter to load")
    assert daemon.backend.adapters()["elf"].rank == 2  # the villain adapter's rank
    events += list(rest)
    assert check_stream(events, "old").completion_tokens == 300  # untouched by the swap
    check_stream(say(stub, request_id="new", persona="elf", line="Hi"), "new")


def test_invalid_edit_keeps_the_last_good_version_and_reports_it(live):
    directory, _, stub = live
    path = directory / "plain.yaml"
    good = path.read_text()
    path.write_text(good.replace("sampling: {temperature: 0, max_tokens: 8}",
                                 "sampling:\n  temperature: 3.5\n  max_tokens: 8"))
    wait_for(lambda: status(stub, "plain").status == pb.LOAD_STATUS_STALE, 3, "the persona to turn stale")
    listed = status(stub, "plain")
    assert "plain.yaml:6: sampling.temperature: must be between 0 and 2, got 3.5" in listed.error
    assert listed.display_name == "Plain"  # the last good version is still described and served
    reply = stub.ReloadPersonas(pb.ReloadPersonasRequest(), timeout=30)
    assert any("plain.yaml:6: sampling.temperature" in e for e in reply.errors)
    assert {p.id: p.status for p in reply.personas}["plain"] == pb.LOAD_STATUS_STALE
    assert check_stream(say(stub, request_id="still", persona="plain", line="Hi"), "still").completion_tokens == 8
    path.write_text(good)
    wait_for(lambda: status(stub, "plain").status == pb.LOAD_STATUS_READY, 3, "the fix to apply")
    assert status(stub, "plain").error == ""


def test_new_files_appear_and_broken_new_files_are_errors(live):
    directory, _, stub = live
    write_persona(directory, "smith")
    (directory / "broken.yaml").write_text("id: broken\ndisplay_name: [unclosed\n")
    wait_for(lambda: status(stub, "smith") is not None and status(stub, "broken") is not None, 3,
             "the new files to be seen")
    assert status(stub, "smith").status == pb.LOAD_STATUS_READY
    broken = status(stub, "broken")
    assert broken.status == pb.LOAD_STATUS_ERROR and "broken.yaml:" in broken.error
    with pytest.raises(grpc.RpcError) as info:
        say(stub, request_id="x", persona="broken", line="Hi")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "failed to load" in info.value.details()
    check_stream(say(stub, request_id="y", persona="smith", line="Hi"), "y")


def test_deleted_file_retires_the_persona_after_its_running_requests(live):
    directory, daemon, stub = live
    call, events, rest = start_long_say(stub, "elf", "last-words")
    (directory / "elf.yaml").unlink()
    wait_for(lambda: status(stub, "elf").status == pb.LOAD_STATUS_RETIRING, 3, "the persona to retire")
    with pytest.raises(grpc.RpcError) as info:
        say(stub, request_id="late", persona="elf", line="Hi")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "retiring" in info.value.details()
    assert "elf" in daemon.backend.adapters()  # still needed by the running request
    events += list(rest)
    assert check_stream(events, "last-words").completion_tokens == 300
    wait_for(lambda: status(stub, "elf") is None, 3, "the retired persona to be removed")
    assert "elf" not in daemon.backend.adapters()


def test_vanished_directory_keeps_everything(live):
    directory, _, stub = live
    moved = directory.with_name("moved")
    shutil.move(directory, moved)
    time.sleep(0.6)
    reply = stub.ReloadPersonas(pb.ReloadPersonasRequest(), timeout=30)
    assert any("does not exist" in e for e in reply.errors)
    assert {p.id: p.status for p in reply.personas} == {"elf": pb.LOAD_STATUS_READY, "plain": pb.LOAD_STATUS_READY}
    check_stream(say(stub, request_id="z", persona="plain", line="Hi"), "z")


def test_broken_adapter_files_keep_the_last_good_adapter(live, tiny_adapters):
    directory, daemon, stub = live
    adapter = directory / "adapters" / "elf"
    shutil.copytree(tiny_adapters["guard"], adapter)
    write_persona(directory, "elf", adapter=adapter)
    wait_for(lambda: daemon.backend.adapters()["elf"].rank == 4, 3, "the persona's own adapter to load")
    (adapter / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    wait_for(lambda: status(stub, "elf").status == pb.LOAD_STATUS_STALE, 3, "the broken adapter to be refused")
    error = status(stub, "elf").error
    assert error.startswith(f"{directory / 'elf.yaml'}: adapter: ") and f"{adapter}" in error, error
    assert "adapter_model.safetensors" in error, error
    assert daemon.backend.adapters()["elf"].rank == 4  # the last good adapter still serves
    check_stream(say(stub, request_id="ok", persona="elf", line="Hi"), "ok")
