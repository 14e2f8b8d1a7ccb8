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

import configparser
import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tarfile
import tomllib
import zipfile
from pathlib import Path
from typing import Iterator

import pytest
from server_helpers import serve_argv, serve_env, spawn_daemon, write_persona

pytestmark = pytest.mark.slow  # starts subprocesses

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("cmake", "c++", "protoc", "grpc_cpp_plugin", "pkg-config", "mcs", "mono", "openssl")
FLOWS = ("stream", "tick", "cancel", "structured", "restart", "busy", "offline", "secure", "large", "personas",
         "conversations")
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
    subprocess.run([str(ROOT / "scripts" / "build_clients.sh"), str(out), str(out / "dist")], check=True, timeout=900)
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


@pytest.mark.parametrize("flow", ["offline", "structured", "conversations"])
def test_the_c_abi_is_memcheck_clean(clients_build, test_env, restart_log, flow):
    """The C flows that refuse bad strings (NUL, lone surrogates, bad addresses), queue while connecting, parse
    structured and sentence events and carry a save game's blob out and back, under memcheck: no invalid read or
    write. (Leaks are not checked: c-ares, under
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


def _assert_needs_only_the_system_runtime(library: Path) -> None:
    dynamic = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    needed = {line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line}
    assert needed and needed <= SYSTEM_RUNTIME, (library, needed - SYSTEM_RUNTIME)
    resolved = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=True).stdout
    loaded = {line.split()[0].rsplit("/", 1)[-1] for line in resolved.splitlines() if line.strip()}
    assert loaded <= SYSTEM_RUNTIME, (library, loaded - SYSTEM_RUNTIME)


def test_the_native_library_needs_only_the_system_runtime(clients_build):
    """The shipped library loads on any glibc Linux: no grpc++, protobuf, abseil or OpenSSL of this distribution."""
    _assert_needs_only_the_system_runtime(clients_build / "native" / "libnpcd_client.so")


def test_staged_packages_carry_the_one_binding(clients_build):
    """The C# sources live once, in csharp/Npcd: the Unity and Godot packages carry exact copies."""
    binding = {p.name: p.read_bytes() for p in (ROOT / "csharp" / "Npcd").glob("*.cs")}
    for copies in (clients_build / "unity" / "com.npcd.client" / "Runtime" / "Binding",
                   clients_build / "godot" / "addons" / "npcd" / "binding"):
        assert {p.name: p.read_bytes() for p in copies.glob("*.cs")} == binding, copies


# ---- the shipped packages (dist/): unpacked as a game developer gets them


def _project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def unpacked(clients_build, tmp_path_factory) -> dict[str, Path]:
    """dist/'s Unity tarball and Godot zip unpacked, and its Unreal folder: each package's root."""
    dist = clients_build / "dist"
    version = _project_version()
    into = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(dist / f"com.npcd.client-{version}.tgz") as tgz:
        names = tgz.getnames()
        assert names and all(n == "package" or n.startswith("package/") for n in names), names[:5]
        tgz.extractall(into / "unity", filter="data")
    with zipfile.ZipFile(dist / f"npcd-godot-{version}.zip") as archive:
        names = archive.namelist()
        files = [n for n in names if not n.endswith("/")]
        assert "addons/npcd/plugin.cfg" in files and all(n.startswith("addons/npcd/") for n in files), names[:5]
        archive.extractall(into / "godot")
    return {"unity": into / "unity" / "package", "godot": into / "godot" / "addons" / "npcd",
            "unreal": dist / "unreal" / "NpcdClient"}


def test_the_packages_manifests_name_the_release(unpacked):
    version = _project_version()
    unity = json.loads((unpacked["unity"] / "package.json").read_text())
    assert unity["name"] == "com.npcd.client" and unity["version"] == version
    assert unity["license"] == "MIT" and unity["author"]["name"] and "com.unity.ugui" in unity["dependencies"]
    assert all((unpacked["unity"] / s["path"]).is_dir() for s in unity["samples"])
    assert (unpacked["unity"] / "CHANGELOG.md").read_text().count(f"[{version}]") == 1
    godot = configparser.ConfigParser()
    godot.read_string((unpacked["godot"] / "plugin.cfg").read_text())
    assert godot["plugin"]["version"].strip('"') == version
    assert (unpacked["godot"] / godot["plugin"]["script"].strip('"')).is_file()
    unreal = json.loads((unpacked["unreal"] / "NpcdClient.uplugin").read_text())
    assert unreal["VersionName"] == version and [m["Name"] for m in unreal["Modules"]] == ["NpcdClient"]
    assert (unpacked["unreal"] / "Source" / "NpcdClient" / "NpcdClient.Build.cs").is_file()
    assert ((unpacked["unreal"] / "ThirdParty" / "npcd_client" / "include" / "npcd_client.h").read_bytes()
            == (ROOT / "cpp_client" / "include" / "npcd_client.h").read_bytes())
    license_text = (ROOT / "LICENSE").read_text()
    for staged in (unpacked["unity"] / "LICENSE.md", unpacked["godot"] / "LICENSE", unpacked["unreal"] / "LICENSE"):
        assert staged.read_text() == license_text, staged


NATIVE_IN_PACKAGE = {"unity": "Plugins/Linux/x86_64/libnpcd_client.so", "godot": "bin/linux-x64/libnpcd_client.so",
                     "unreal": "ThirdParty/npcd_client/lib/Linux/libnpcd_client.so"}


@pytest.mark.parametrize("package", sorted(NATIVE_IN_PACKAGE))
def test_each_package_carries_the_self_contained_library(unpacked, clients_build, package):
    library = unpacked[package] / NATIVE_IN_PACKAGE[package]
    assert library.read_bytes() == (clients_build / "native" / "libnpcd_client.so").read_bytes()
    _assert_needs_only_the_system_runtime(library)


def test_the_unity_package_imports_without_the_inspector(unpacked):
    """Unity ignores a file without a .meta in an immutable package, and the library's .meta carries its
    platforms (Editor and Standalone, Linux x86_64 only), so nothing needs saving in the Inspector."""
    unity = unpacked["unity"]
    missing = [p for p in unity.rglob("*") if not p.name.endswith(".meta") and "Samples~" not in p.parts
               and not (p.parent / (p.name + ".meta")).exists()]
    assert not missing, missing
    meta = (unity / (NATIVE_IN_PACKAGE["unity"] + ".meta")).read_text()
    assert "PluginImporter:" in meta
    platforms = re.findall(r"- first:\n\s+(.*?)\n\s+second:\n\s+enabled: (\d)", meta)
    enabled = {name.strip() for name, on in platforms if on == "1"}
    assert enabled == {"Editor: Editor", "Standalone: Linux64"}, platforms
    assert "OS: Linux" in meta and "CPU: x86_64" in meta


def test_the_unity_sample_scene_builder_sets_fields_the_sample_has(unpacked):
    """The sample's scene is built by an editor menu (no .unity file to go stale between Unity versions):
    it ships in the sample's Editor folder, and every field it sets is a public field of the sample's
    components, so a rename in a component cannot leave the menu setting a field that is gone."""
    sample = unpacked["unity"] / "Samples~" / "NpcDialogue"
    builder = (sample / "Editor" / "NpcdSampleScene.cs").read_text()
    assert '[MenuItem("Tools/npcd/Create Sample Scene")]' in builder
    variables = {"speaker": "NpcSpeaker", "bubble": "SpeechBubble"}
    assigned = re.findall(r"\b(speaker|bubble)\.(\w+) = ", builder)
    assigned += [("AskOnKey", field) for field in re.findall(r"AddComponent<AskOnKey>\(\)\.(\w+) = ", builder)]
    assert len(assigned) >= 6, assigned
    for variable, field in assigned:
        component = variables.get(variable, variable)
        source = (sample / f"{component}.cs").read_text()
        assert re.search(rf"public [\w<>, \[\]]+ {field}\b", source), (component, field)
    for component in ("NpcdConnection", "SpeechBubble", "NpcSpeaker", "AskOnKey"):
        assert f"<{component}>" in builder, component


@pytest.mark.parametrize("package, binding", [("unity", "Runtime/Binding"), ("godot", "binding")])
def test_the_sample_speaks_through_the_packaged_binding(unpacked, package, binding, test_env, daemon_files, tmp_path,
                                                        restart_log):
    """What a developer runs first: csharp/samples/FirstLine.cs compiled against the binding inside the package,
    loading the library inside it, lists the personas and streams a line from a real daemon."""
    sources = sorted(str(p) for p in (unpacked[package] / binding).glob("*.cs"))
    assert len(sources) == len(list((ROOT / "csharp" / "Npcd").glob("*.cs")))
    exe = tmp_path / "FirstLine.exe"
    subprocess.run(["mcs", "-langversion:7.2", f"-out:{exe}", *sources, str(ROOT / "csharp" / "samples" / "FirstLine.cs")],
                   check=True, capture_output=True, timeout=120)
    env = dict(test_env, LD_LIBRARY_PATH=str((unpacked[package] / NATIVE_IN_PACKAGE[package]).parent))
    output = _run(["mono", str(exe), test_env["NPCD_TEST_ADDR"], "elf", "Any news from the road?"], env, tmp_path,
                  restart_log)
    _, _, ids = daemon_files
    assert all(f"persona {persona}" in output for persona in ids), output
    assert "elf finished (" in output, output


def test_publish_upm_commits_the_package_as_a_branch_root(clients_build, tmp_path):
    """The git-URL install (…/npcd.git#upm) needs a branch whose root is the package: scripts/publish_upm.sh writes
    it (and the upm-VERSION tag) without touching the working tree, once per change of the package."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    package = clients_build / "unity" / "com.npcd.client"
    env = dict(os.environ, UPM_REPO=str(repo))
    publish = [str(ROOT / "scripts" / "publish_upm.sh"), str(package)]
    subprocess.run(publish, env=env, check=True, capture_output=True, timeout=120)
    files = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", "--name-only", "upm"], capture_output=True,
                           text=True, check=True).stdout.split()
    assert {"package.json", "package.json.meta", "Runtime/Binding/NpcdClient.cs",
            NATIVE_IN_PACKAGE["unity"], NATIVE_IN_PACKAGE["unity"] + ".meta"} <= set(files)
    assert len(files) == sum(1 for p in package.rglob("*") if p.is_file())
    tagged = subprocess.run(["git", "-C", str(repo), "rev-parse", f"upm-{_project_version()}", "upm"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert tagged[0] == tagged[1]
    again = subprocess.run(publish, env=env, check=True, capture_output=True, text=True, timeout=120).stdout
    assert "already holds" in again
    assert not subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True,
                              check=True).stdout
