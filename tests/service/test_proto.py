"""The committed stubs in npcd/service/_proto match proto/npcd/v1/npcd.proto (regenerate with `make proto`).

We compare what protoc compiles from the proto today with the descriptor the
committed module carries, rather than the generated text, so that a newer
grpcio-tools (which words its output differently) does not fail the check.
"""

from __future__ import annotations

from pathlib import Path

import grpc_tools
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from npcd.service._proto import npcd_pb2, npcd_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_the_proto(tmp_path):
    out = tmp_path / "npcd.pb"
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"-I{Path(grpc_tools.__file__).parent / '_proto'}",
                      f"--descriptor_set_out={out}", str(ROOT / "proto" / "npcd" / "v1" / "npcd.proto")])
    assert rc == 0
    [compiled] = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    for message in compiled.message_type:
        _drop_json_names(message)  # protoc adds them to descriptor sets, never to generated modules
    committed = descriptor_pb2.FileDescriptorProto.FromString(npcd_pb2.DESCRIPTOR.serialized_pb)
    assert committed == compiled, "npcd/service/_proto is stale: run `make proto`"


def _drop_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _drop_json_names(nested)


def test_grpc_stub_has_every_method_of_the_service():
    service = npcd_pb2.DESCRIPTOR.services_by_name["Npcd"]
    source = Path(npcd_pb2_grpc.__file__).read_text()
    for method in service.methods:
        assert f"'/npcd.v1.Npcd/{method.name}'" in source, f"npcd_pb2_grpc lacks {method.name}: run `make proto`"
    assert [m.name for m in service.methods] == [
        "Say", "Session", "ListPersonas", "GetPersona", "ReloadPersonas", "GetConversation", "ListConversations",
        "AddTurns", "SetConversation", "ResetConversation", "ExportConversations", "ImportConversations"]
