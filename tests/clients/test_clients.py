"""The game clients against a real daemon on loopback: the C tests (ctest) and the C# test
program (mono), both through the native library built by scripts/build_clients.sh.

The daemon runs the real engine over the tiny random Llama, with one plain persona and
LoRA personas, so that 16 NPCs mix adapters in one batch; the merchant declares emotions
and actions, for the structured flow. The restart flows start and kill their own daemon
(NPCD_TEST_DAEMON_CMD) on a second port. The busy flows use a third daemon whose queue holds one
request (RESOURCE_EXHAUSTED and its retry hint); the offline flows need none. The secure flows
use a fourth daemon serving mutual TLS with a bearer token (certificates made with openssl).

Without the toolchain (cmake, a C++ compiler, grpc++, protoc, mcs, mono) the module is
skipped, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from server_helpers import serve_argv, serve_env, spawn_daemon, write_persona

pytestmark = pytest.mark.slow  # starts subprocesses

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("cmake", "c++", "protoc", "grpc_cpp_plugin", "pkg-config", "mcs", "mono", "openssl")
FLOWS = ("stream", "tick", "cancel", "structured", "restart", "busy", "offline", "secure", "large", "personas")
TOKEN = "npcd-test-token-8f3a"
LORA_PERSONAS = ("elf", "guard", "merchant")
# What the structured flow's persona may feel and do (the flows check the events, not the choice), and its metadata.
MERCHANT_EXTRA = """\
metadata: {voice_id: merchant_01}
emotions: [cheerful, greedy, worried]
actions:
  - name: sell
    description: hand the player an item for a price in silver
    args:
      type: object
      properties:
        item: {enum: [rope, lantern, potion]}
        price: {type: integer, minimum: 1, maximum: 1000}
  - name: haggle
    description: name a counter price in silver
    args:
      type: object
      properties:
        price: {type: integer, minimum: 1, maximum: 1000}
  - name: none
    description: just talk
"""


def _require_toolchain() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not missing and subprocess.run(["pkg-config", "--exists", "grpc++", "protobuf"]).returncode != 0:
        missing.append("grpc++/protobuf development files")
    if missing:
        why = (f"client toolchain missing: {', '.join(missing)} (apt-get install cmake g++ pkg-config "
               "libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc mono-mcs mono-runtime)")
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def clients_build(tmp_path_factory) -> Path:
    _require_toolchain()
    out = tmp_path_factory.mktemp("clients")
    subprocess.run([str(ROOT / "scripts" / "build_clients.sh"), str(out)], check=True, timeout=900)
    return out


@pytest.fixture(scope="module")
def daemon_files(tmp_path_factory, tiny_model_dir, tiny_adapters) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("client-daemon")
    personas = root / "personas"
    personas.mkdir()
    write_persona(personas, "plain")
    for name in LORA_PERSONAS:
        write_persona(personas, name, adapter=tiny_adapters[name], extra=MERCHANT_EXTRA if name == "merchant" else "")
    engine = root / "engine.yaml"
    engine.write_text(f"base: {tiny_model_dir}\nweights: fp32\ndevice: cpu\nmax_batch_size: 16\n"
                      "max_seq_len: 1024\nthreads: 2\n")
    return personas, engine, ["plain", *LORA_PERSONAS]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(personas: Path, engine: Path, cwd: Path) -> Iterator[str]:
    """`npcd serve` on a free loopback port (its settings from cwd's npcd.yaml, if any): its address, then
    it is stopped."""
    proc, address, _ = spawn_daemon(personas, engine, cwd)
    try:
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def daemon(daemon_files, tmp_path_factory):
    """`npcd serve` on a free loopback port; yields its address once it listens."""
    personas, engine, _ = daemon_files
    with serving(personas, engine, tmp_path_factory.mktemp("cwd")) as address:
        yield address


@pytest.fixture(scope="module")
def busy_daemon(daemon_files, tmp_path_factory):
    """A second daemon whose admission queue holds one request: the rest of a Tick is refused."""
    personas, engine, _ = daemon_files
    busy_engine = engine.parent / "engine-busy.yaml"
    busy_engine.write_text(engine.read_text() + "max_queue: 1\n")
    with serving(personas, busy_engine, tmp_path_factory.mktemp("busy-cwd")) as address:
        yield address


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_certificates(d: Path) -> None:
    """A test CA, a server certificate for localhost / 127.0.0.1 and a client certificate, all signed by it."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=npcd test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (d / f"{name}.ext").write_text(ext)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={'localhost' if name == 'server' else 'npcd test client'}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def secure_daemon(daemon_files, tmp_path_factory):
    """A daemon serving mutual TLS and requiring TOKEN, configured by the npcd.yaml in its working directory.
    Yields (address, certificate directory)."""
    personas, engine, _ = daemon_files
    cwd = tmp_path_factory.mktemp("secure-cwd")
    _make_certificates(cwd)
    (cwd / "npcd.yaml").write_text(f"token: {TOKEN}\ntls_cert: {cwd / 'server.pem'}\ntls_key: {cwd / 'server.key'}\n"
                                   f"tls_client_ca: {cwd / 'ca.pem'}\n")
    with serving(personas, engine, cwd) as address:
        yield address, cwd


@pytest.fixture(scope="module")
def restart_log(tmp_path_factory) -> Path:
    """Where the daemons of the restart flows write their logs."""
    return tmp_path_factory.mktemp("restart") / "daemon.log"


@pytest.fixture(scope="module")
def test_env(clients_build, daemon, busy_daemon, secure_daemon, daemon_files, restart_log) -> dict[str, str]:
    personas, engine, ids = daemon_files
    restart_addr = f"127.0.0.1:{_free_port()}"
    env = serve_env()
    env.update(
        NPCD_TEST_ADDR=daemon,
        NPCD_TEST_BUSY_ADDR=busy_daemon,
        NPCD_TEST_PERSONAS=",".join(ids),
        NPCD_TEST_RESTART_ADDR=restart_addr,
        NPCD_TEST_DAEMON_CMD=shlex.join(serve_argv(personas, engine, restart_addr)) + f" 2>>{shlex.quote(str(restart_log))}",
        LD_LIBRARY_PATH=str(clients_build / "native"),
    )
    address, certs = secure_daemon
    env.update(NPCD_TEST_SECURE_ADDR=address, NPCD_TEST_TOKEN=TOKEN, NPCD_TEST_CA_PEM=str(certs / "ca.pem"),
               NPCD_TEST_CLIENT_CERT=str(certs / "client.pem"), NPCD_TEST_CLIENT_KEY=str(certs / "client.key"))
    return env


def _run(argv: list[str], env: dict[str, str], cwd: Path, restart_log: Path) -> str:
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        daemon_log = restart_log.read_text()[-4000:] if restart_log.exists() else "(none)"
        raise AssertionError(f"{argv} exited {proc.returncode}:\n{output}\nrestart daemons' log:\n{daemon_log}")
    return output


def test_ctest_flows_pass_against_the_daemon(clients_build, test_env, restart_log):
    native = clients_build / "native"
    output = _run(["ctest", "--output-on-failure", "--timeout", "300"], test_env, native, restart_log)
    assert "100% tests passed" in output and f"out of {len(FLOWS)}" in output, output
    assert "Skipped" not in output and "Not Run" not in output, output


@pytest.mark.parametrize("flow", FLOWS)
def test_csharp_flow_passes_against_the_daemon(clients_build, test_env, restart_log, flow):
    csharp = clients_build / "csharp"
    output = _run(["mono", "ClientTest.exe", flow], test_env, csharp, restart_log)
    assert output.startswith(f"{flow}:"), output


@pytest.mark.parametrize("flow", ["offline", "structured"])
def test_the_c_abi_is_memcheck_clean(clients_build, test_env, restart_log, flow):
    """The C flows that refuse bad strings (NUL, lone surrogates, bad addresses), queue while connecting and
    parse structured and sentence events, under memcheck: no invalid read or write. (Leaks are not checked: c-ares, under
    grpc's name resolver, leaves 20 bytes unfreed at exit, outside npcd's code.)"""
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    _run(["valgrind", "--error-exitcode=9", "--leak-check=no", "./npcd_client_test", flow], test_env, clients_build / "native", restart_log)


def test_csharp_reads_no_freed_native_memory_under_valgrind(clients_build, test_env, restart_log):
    """The offline flow disposes the client inside a Finished handler with more events of the batch to come:
    under memcheck no read of the freed native events may happen (mono itself is clean with these flags)."""
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    _run(["valgrind", "--error-exitcode=9", "--smc-check=all", "--undef-value-errors=no", "mono", "ClientTest.exe",
          "offline"], test_env, clients_build / "csharp", restart_log)


def test_only_the_c_abi_is_exported(clients_build):
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(clients_build / "native" / "libnpcd_client.so")],
                             capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in symbols.splitlines() if " T " in line}
    header = (ROOT / "cpp_client" / "include" / "npcd_client.h").read_text()
    assert exported and all(name.startswith("npcd_") and name + "(" in header for name in exported), exported


# What a player's Linux machine has anyway: glibc's libraries and the loader (libstdc++ and libgcc are linked in).
SYSTEM_RUNTIME = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "ld-linux-x86-64.so.2",
                  "linux-vdso.so.1"}


def test_the_native_library_needs_only_the_system_runtime(clients_build):
    """The shipped library loads on any glibc Linux: no grpc++, protobuf, abseil or OpenSSL of this distribution."""
    library = clients_build / "native" / "libnpcd_client.so"
    dynamic = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    needed = {line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line}
    assert needed and needed <= SYSTEM_RUNTIME, needed - SYSTEM_RUNTIME
    resolved = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=True).stdout
    loaded = {line.split()[0].rsplit("/", 1)[-1] for line in resolved.splitlines() if line.strip()}
    assert loaded <= SYSTEM_RUNTIME, loaded - SYSTEM_RUNTIME


def test_staged_packages_carry_the_one_binding(clients_build):
    binding = sorted(p.name for p in (ROOT / "csharp" / "Npcd").glob("*.cs"))
    unity = clients_build / "unity" / "com.npcd.client"
    godot = clients_build / "godot" / "addons" / "npcd"
    assert sorted(p.name for p in (unity / "Runtime" / "Binding").glob("*.cs")) == binding
    assert sorted(p.name for p in (godot / "binding").glob("*.cs")) == binding
    missing_meta = [p for p in unity.rglob("*") if not p.name.endswith(".meta")
                    and "Samples~" not in p.parts and not (p.parent / (p.name + ".meta")).exists()]
    assert not missing_meta, missing_meta
    assert (unity / "Plugins" / "Linux" / "x86_64" / "libnpcd_client.so").is_file()
    assert (godot / "bin" / "linux-x64" / "libnpcd_client.so").is_file()
    assert (clients_build / "unreal" / "NpcdClient" / "ThirdParty" / "npcd_client" / "include" / "npcd_client.h").is_file()
    license_text = (ROOT / "LICENSE").read_text()
    for staged in (unity / "LICENSE.md", godot / "LICENSE", clients_build / "unreal" / "NpcdClient" / "LICENSE"):
        assert staged.read_text() == license_text, staged
    manifest = json.loads((unity / "package.json").read_text())
    assert manifest["license"] == "MIT" and manifest["author"]["name"]
    assert "com.unity.ugui" in manifest["dependencies"]  # the sample's SpeechBubble is a UI Text
