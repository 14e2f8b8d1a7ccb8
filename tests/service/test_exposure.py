"""A daemon reachable beyond loopback: TLS (and mutual TLS), the bearer token, and the switches for reflection
and the admin RPC, each against a real daemon on loopback with real certificates made by openssl."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_helpers import engine_config, write_persona

from npcd import cli
from npcd.service._proto import npcd_pb2 as pb
from npcd.service._proto import npcd_pb2_grpc
from npcd.service.config import DaemonConfig
from npcd.service.daemon import DaemonThread

TOKEN = "s3cret-token"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A server certificate for localhost/127.0.0.1, and a CA with one client certificate."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.pem",
            "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", cwd=d)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=npcd test CA", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr",
            "-subj", "/CN=game client", cwd=d)
    openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "client.pem", "-days", "1", cwd=d)
    return d


@pytest.fixture(scope="module")
def personas(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("personas")
    write_persona(d, "elf")
    return d


def daemon(personas: Path, tiny_model_dir: Path, **settings) -> DaemonThread:
    config = DaemonConfig(listen="127.0.0.1:0", personas=personas, metrics="0", grace_s=1.0, **settings)
    return DaemonThread(config, engine_config(tiny_model_dir))


def tls_channel(address: str, pki: Path, client_cert: bool = False) -> grpc.Channel:
    extra = {}
    if client_cert:
        extra = {"private_key": (pki / "client.key").read_bytes(), "certificate_chain": (pki / "client.pem").read_bytes()}
    credentials = grpc.ssl_channel_credentials(root_certificates=(pki / "server.pem").read_bytes(), **extra)
    return grpc.secure_channel(address, credentials)


def say(channel: grpc.Channel, metadata=()) -> pb.Finished:
    events = list(npcd_pb2_grpc.NpcdStub(channel).Say(pb.SayRequest(persona="elf", line="Hi."), timeout=30,
                                                       metadata=metadata))
    return events[-1].finished


def test_tls_and_token(pki, personas, tiny_model_dir):
    with daemon(personas, tiny_model_dir, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                token=TOKEN) as d:
        with grpc.insecure_channel(d.address) as plain:  # the port speaks TLS only
            with pytest.raises(grpc.RpcError) as info:
                say(plain, (("authorization", f"Bearer {TOKEN}"),))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with tls_channel(d.address, pki) as channel:
            for metadata, why in (((), "missing"), ((("authorization", "Bearer guess"),), "wrong")):
                with pytest.raises(grpc.RpcError) as info:
                    say(channel, metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert info.value.details().startswith(f"the bearer token is {why}")
                with pytest.raises(grpc.RpcError, match="UNAUTHENTICATED"):
                    npcd_pb2_grpc.NpcdStub(channel).ListPersonas(pb.ListPersonasRequest(), timeout=10,
                                                                 metadata=metadata)
            assert say(channel, (("authorization", f"Bearer {TOKEN}"),)).completion_tokens > 0
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no secret


def test_mutual_tls_needs_a_client_certificate(pki, personas, tiny_model_dir):
    with daemon(personas, tiny_model_dir, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                tls_client_ca=pki / "ca.pem") as d:
        with tls_channel(d.address, pki) as anonymous:
            with pytest.raises(grpc.RpcError) as info:
                say(anonymous)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with tls_channel(d.address, pki, client_cert=True) as channel:
            assert say(channel).completion_tokens > 0


def test_reflection_and_admin_can_be_switched_off_and_reload_is_rate_limited(personas, tiny_model_dir):
    with daemon(personas, tiny_model_dir, reflection=False, admin=False) as d:
        with grpc.insecure_channel(d.address) as channel:
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as info:
                list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]),
                                                                                         timeout=10))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            with pytest.raises(grpc.RpcError) as info:
                npcd_pb2_grpc.NpcdStub(channel).ReloadPersonas(pb.ReloadPersonasRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin: false" in info.value.details()
    with daemon(personas, tiny_model_dir, reload_min_interval_s=30) as d:
        with grpc.insecure_channel(d.address) as channel:
            stub = npcd_pb2_grpc.NpcdStub(channel)
            assert [p.id for p in stub.ReloadPersonas(pb.ReloadPersonasRequest(), timeout=30).personas] == ["elf"]
            with pytest.raises(grpc.RpcError) as info:
                stub.ReloadPersonas(pb.ReloadPersonasRequest(), timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            retry = int(dict(info.value.trailing_metadata())["retry-after-ms"])
            assert 25_000 < retry <= 30_001 and re.search(r"at most once per 30 s; try again in \d+ ms",
                                                           info.value.details())


@pytest.mark.parametrize("settings, message", [
    ({"listen": "0.0.0.0:50051"}, "listen 0.0.0.0:50051 is not a loopback address: serving beyond this machine "
                                  "needs TLS (tls_cert, tls_key) and a token, or insecure_lan: true"),
    ({"listen": "192.168.1.20:50051", "token": TOKEN}, "is not a loopback address"),
    ({"tls_cert": Path("server.pem")}, "tls_cert and tls_key go together"),
    ({"tls_cert": Path("nope.pem"), "tls_key": Path("nope.key")}, "tls_cert: nope.pem is not a file"),
])
def test_exposure_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        dataclasses.replace(DaemonConfig(), **settings).validate("npcd.yaml")


def test_insecure_lan_and_loopback_names_are_accepted(pki):
    for settings in ({"listen": "0.0.0.0:50051", "insecure_lan": True}, {"listen": "localhost:50051"},
                     {"listen": "[::1]:50051"},
                     {"listen": "0.0.0.0:50051", "token": TOKEN, "tls_cert": pki / "server.pem",
                      "tls_key": pki / "server.key"}):
        dataclasses.replace(DaemonConfig(), **settings).validate("npcd.yaml")


def test_the_cli_uses_the_daemon_settings_token_and_certificate(pki, personas, tiny_model_dir, monkeypatch, capsys):
    with daemon(personas, tiny_model_dir, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                token=TOKEN) as d:
        address = f"localhost:{d.address.rpartition(':')[2]}"
        assert cli.main(["say", "elf", "Hi.", "--address", address]) == 1  # no token, no TLS: refused
        monkeypatch.setenv("NPCD_TOKEN", TOKEN)
        monkeypatch.setenv("NPCD_TLS_CERT", str(pki / "server.pem"))
        monkeypatch.setenv("NPCD_TLS_KEY", str(pki / "server.key"))
        assert cli.main(["say", "elf", "Hi.", "--address", address]) == 0
        assert cli.main(["personas", "--address", address]) == 0
    assert "elf" in capsys.readouterr().out
