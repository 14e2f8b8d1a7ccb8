"""The OpenAI-compatible endpoint end to end: the official `openai` client against a real daemon (real engine, tiny
model), its replies checked against the gRPC door's for the same line, its refusals against OpenAI's error form."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import openai
import pytest
from server_helpers import engine_config, engine_ids, running_daemon, say, spawn_daemon, wait_for, write_persona

from npcd.service import config as daemon_config
from npcd.service._proto import npcd_pb2 as pb
from npcd.service.config import DaemonConfig
from npcd.service.daemon import Daemon, DaemonThread
from npcd.service.openai_http import in_openai_terms
from npcd.service.validation import RequestError

TIMEOUT_S = 60
TOKEN = "s3cret-token"
# A chat with everything that maps: a scene (system), a named player, the NPC's earlier reply, the line to answer.
CHAT = [
    {"role": "system", "content": "It is raining in the village."},
    {"role": "user", "name": "Ayla", "content": "Hi there."},
    {"role": "assistant", "content": "Hello, traveller."},
    {"role": "user", "content": [{"type": "text", "text": "Where is"}, {"type": "text", "text": "the inn?"}]},
]
# The same line as a gRPC SayRequest, as the README says it maps.
SAY = dict(persona="elf", line="Where is\nthe inn?", context={"scene": "It is raining in the village."},
           history=[pb.Turn(speaker="Ayla", text="Hi there."), pb.Turn(speaker="Elf", text="Hello, traveller.")],
           priority=pb.PRIORITY_PLAYER)


@pytest.fixture(scope="module")
def personas(tmp_path_factory, tiny_adapters) -> Path:
    directory = tmp_path_factory.mktemp("personas")
    write_persona(directory, "elf", adapter=tiny_adapters["elf"])
    write_persona(directory, "plain")
    (directory / "broken.yaml").write_text("id: broken\n")  # fails to load: never listed, never served
    return directory


@pytest.fixture(scope="module")
def served(personas, tiny_model_dir):
    with running_daemon(personas, engine_config(tiny_model_dir), openai_listen="127.0.0.1:0") as (daemon, stub):
        yield daemon, stub


@pytest.fixture
def client(served) -> openai.OpenAI:
    daemon, _ = served
    return openai.OpenAI(base_url=f"http://{daemon.openai_address}/v1", api_key="unused", max_retries=0,
                         timeout=TIMEOUT_S)


def metric(daemon, sample: str) -> float:
    body = urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics", timeout=10).read().decode()
    values = {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in body.splitlines()
              if line and not line.startswith("#")}
    return values.get(sample, 0.0)


def post(address: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{address}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# --- models ----------------------------------------------------------------------------------------


def test_models_are_the_personas_that_can_serve(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["elf", "plain"]  # broken.yaml failed to load
    assert {m.owned_by for m in models} == {"npcd"} and all(m.object == "model" for m in models)
    assert client.models.retrieve("plain").id == "plain"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("broken")


# --- replies ---------------------------------------------------------------------------------------


def test_streamed_reply_equals_the_whole_one_and_the_grpc_line(client, served):
    _, stub = served
    args = dict(model="elf", messages=CHAT, temperature=0, seed=7, max_tokens=8)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == "elf" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text and text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert [c.usage is not None for c in chunks].count(True) == 1  # the last chunk
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 10
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 8

    # the same line through gRPC: the same prompt (token count) and the same reply
    [*_, last] = say(stub, request_id="grpc", sampling=pb.SamplingOverrides(temperature=0, seed=7, max_tokens=8),
                     **SAY)
    assert last.finished.text == text and last.finished.prompt_tokens == whole.usage.prompt_tokens
    # without the scene the prompt is shorter: the system message did reach it
    bare = client.chat.completions.create(**{**args, "messages": CHAT[1:]})
    assert bare.usage.prompt_tokens < whole.usage.prompt_tokens

    # OpenAI's include_usage form: finish_reason in one chunk, then a chunk with no choices and the usage
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].usage is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_the_chat_becomes_the_personas_prompt_and_a_client_that_leaves_cancels_it(client, served):
    daemon, _ = served
    cancelled = metric(daemon, 'npcd_requests_finished_total{reason="cancelled"}')
    stream = client.chat.completions.create(model="elf", messages=CHAT, max_tokens=500, stream=True)
    first = next(stream)
    assert next(stream).choices[0].delta.content is not None
    [engine_id] = engine_ids(daemon, first.id)
    prompt = daemon.backend.tokenizer.decode(daemon.backend.engine.by_id[engine_id].request.prompt_ids)
    user_turn = prompt.split("<|im_start|>user", 1)[1]
    for said in ("[scene: It is raining in the village.]", "Ayla: Hi there.", "Elf: Hello, traveller.",
                 "Player: Where is\nthe inn?"):
        assert said in user_turn, (said, user_turn)
    stream.close()
    wait_for(lambda: not engine_ids(daemon, first.id), 10, "the engine to drop the line")
    wait_for(lambda: daemon.registry.get("elf").active == 0, 10, "the persona lease to be released")
    wait_for(lambda: metric(daemon, 'npcd_requests_finished_total{reason="cancelled"}') == cancelled + 1, 10,
             "the line to be accounted as cancelled")
    reply = client.chat.completions.create(model="elf", messages=CHAT[-1:], max_tokens=4)
    assert reply.usage.completion_tokens == 4


def test_a_whole_reply_is_cancelled_when_its_client_leaves(served):
    daemon, _ = served
    cancelled = metric(daemon, 'npcd_requests_finished_total{reason="cancelled"}')
    host, _, port = daemon.openai_address.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    connection.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                       body=json.dumps({"model": "plain", "messages": CHAT[-1:], "max_tokens": 500}))
    wait_for(lambda: daemon.backend.stats().running == 1, 10, "the line to run")
    connection.close()  # before any reply: the client is gone
    wait_for(lambda: metric(daemon, 'npcd_requests_finished_total{reason="cancelled"}') == cancelled + 1, 10,
             "the line to be accounted as cancelled")
    assert daemon.backend.stats().running == 0 and daemon.registry.get("plain").active == 0


def test_two_streams_from_threads_share_the_batch(client, served):
    daemon, _ = served
    args = [dict(model=model, messages=[{"role": "user", "content": f"Tell me about the {model}s."}],
                 temperature=0, max_tokens=32) for model in ("elf", "plain")]
    texts: dict[str, str] = {}
    batch = [0]
    start = threading.Barrier(2, timeout=TIMEOUT_S)

    def run(kwargs: dict) -> None:
        start.wait()
        parts = []
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            parts.append(chunk.choices[0].delta.content or "")
            batch[0] = max(batch[0], daemon.backend.stats().last_batch_size)
        texts[kwargs["model"]] = "".join(parts)

    threads = [threading.Thread(target=run, args=(kwargs,)) for kwargs in args]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert sorted(texts) == ["elf", "plain"]
    assert batch[0] == 2  # both lines (two adapters: elf's and none) in one engine step
    for kwargs in args:  # and batching did not change either line
        assert texts[kwargs["model"]] == client.chat.completions.create(**kwargs).choices[0].message.content


def test_json_schema_response_format_is_the_content(client):
    schema = {"type": "object", "properties": {"mood": {"enum": ["calm", "angry"]}}, "required": ["mood"]}
    args = dict(model="plain", messages=CHAT[-1:], max_tokens=40, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "mood", "schema": schema}})
    whole = client.chat.completions.create(**args)
    assert json.loads(whole.choices[0].message.content)["mood"] in ("calm", "angry")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True))
    assert streamed == whole.choices[0].message.content


# --- refusals --------------------------------------------------------------------------------------


def test_unknown_model_is_not_found_naming_the_personas(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="dragon", messages=CHAT[-1:])
    assert "unknown persona 'dragon'; known personas: elf, plain" in info.value.message
    assert (info.value.param, info.value.code) == ("model", "model_not_found")


@pytest.mark.parametrize("changes, param, words", [
    (dict(n=2), "n", "not supported"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "not supported"),
    (dict(logprobs=True), "logprobs", "not supported"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate", "not supported"),
    (dict(temperature=5), "temperature", "must be in [0, 2], got 5"),  # the servicer's check, in OpenAI's terms
    (dict(max_tokens=10_000), "max_tokens", "got 10000"),
    (dict(stop=[f"s{i}" for i in range(9)]), "stop", "at most 8 strings"),
    (dict(messages=[{"role": "user", "name": "Ay\nla", "content": "Hi"}]), "messages[0].name", "one line"),
    (dict(messages=[*CHAT[:2], {"role": "assistant", "content": "Hm."}]), "messages[2].role", "must be user"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": "Look:"},
                                                 {"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages[0].content[1]", "only text parts"),
    (dict(messages=[{"role": "tool", "content": "42", "tool_call_id": "t"}]), "messages[0].role", "got 'tool'"),
])
def test_bad_parameters_are_bad_requests_naming_them(client, served, changes, param, words):
    daemon, _ = served
    refused = metric(daemon, 'npcd_requests_rejected_total{status="INVALID_ARGUMENT"}')
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{"model": "elf", "messages": CHAT[-1:], **changes})
    assert info.value.param == param and info.value.body["type"] == "invalid_request_error"
    message = info.value.body["message"]
    assert message.startswith(f"{param}: ") and words in message, message
    assert metric(daemon, 'npcd_requests_rejected_total{status="INVALID_ARGUMENT"}') == refused + 1


@pytest.mark.parametrize("body, words", [
    (b'{"model": "elf", "messages": [', "request body: not JSON: Expecting value at line 1 column 31"),
    (b'[1, 2]', "request body: must be a JSON object, got list"),
    (b'{"model": "elf", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "NaN"),
])
def test_a_body_that_is_not_a_json_object_is_a_bad_request(served, body, words):
    daemon, _ = served
    status, reply = post(daemon.openai_address, body)
    assert status == 400 and words in reply["error"]["message"], reply


def test_other_paths_and_methods_answer_in_openais_error_form(served):
    daemon, _ = served
    for path, status in (("/v1/embeddings", 404), ("/v1/chat/completions", 405)):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://{daemon.openai_address}{path}", timeout=TIMEOUT_S)
        assert info.value.code == status
        assert json.loads(info.value.read())["error"]["message"].startswith(f"GET {path}: ")


def test_grpc_refusals_become_http_statuses_with_retry_after():
    full = in_openai_terms(RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full", 1200), {})
    assert (full.status, full.headers, full.body()["error"]["type"]) == (429, {"Retry-After": "2"},
                                                                         "rate_limit_error")
    field = in_openai_terms(RequestError(grpc.StatusCode.INVALID_ARGUMENT, "line: required"),
                            {"line": "messages[3].content"})
    assert (field.status, field.param, field.message) == (400, "messages[3].content", "messages[3].content: required")
    assert in_openai_terms(RequestError(grpc.StatusCode.UNAVAILABLE, "shutting down"), {}).status == 503
    assert in_openai_terms(RequestError(grpc.StatusCode.PERMISSION_DENIED, "no"), {}).status == 403
    assert in_openai_terms(RequestError(grpc.StatusCode.INTERNAL, "bug"), {}).status == 500


# --- exposure and shutdown -------------------------------------------------------------------------


def test_openai_listen_follows_the_grpc_exposure_rules(tmp_path):
    config = daemon_config.load(environ={"NPCD_OPENAI_LISTEN": "127.0.0.1:8000"}, cwd=tmp_path)
    assert config.openai_listen == "127.0.0.1:8000" and config.openai_enabled
    assert not daemon_config.load(environ={}, cwd=tmp_path).openai_enabled  # off by default
    with pytest.raises(ValueError, match="openai_listen 0.0.0.0:8000 is not a loopback address"):
        daemon_config.load(environ={"NPCD_OPENAI_LISTEN": "0.0.0.0:8000"}, cwd=tmp_path)
    with pytest.raises(ValueError, match="openai_listen must be HOST:PORT or 0"):
        daemon_config.load(environ={"NPCD_OPENAI_LISTEN": "8000"}, cwd=tmp_path)
    DaemonConfig(openai_listen="0.0.0.0:8000", insecure_lan=True).validate("test")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> Path:
    """A server certificate for 127.0.0.1, and a CA with one client certificate (as tests/service/test_exposure)."""
    directory = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.pem", "-days",
            "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=npcd test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr", "-subj",
            "/CN=mod")
    openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            "client.pem", "-days", "1")
    return directory


def test_token_and_tls(personas, tiny_model_dir, certificate):
    config = DaemonConfig(listen="127.0.0.1:0", personas=personas, metrics="0", grace_s=1.0,
                          openai_listen="127.0.0.1:0", token=TOKEN, tls_cert=certificate / "server.pem",
                          tls_key=certificate / "server.key")
    trust = ssl.create_default_context(cafile=str(certificate / "server.pem"))
    with DaemonThread(config, engine_config(tiny_model_dir)) as daemon:
        def connect(key: str, scheme: str = "https") -> openai.OpenAI:
            return openai.OpenAI(base_url=f"{scheme}://{daemon.openai_address}/v1", api_key=key, max_retries=0,
                                 timeout=TIMEOUT_S, http_client=openai.DefaultHttpxClient(verify=trust))

        with pytest.raises(openai.AuthenticationError) as info:
            connect("wrong").models.list()
        assert "bearer token) is wrong" in info.value.message and info.value.code == "invalid_api_key"
        with pytest.raises(urllib.error.HTTPError) as missing:  # the openai client always sends a key
            urllib.request.urlopen(f"https://{daemon.openai_address}/v1/models", context=trust, timeout=TIMEOUT_S)
        assert missing.value.code == 401 and missing.value.headers["WWW-Authenticate"] == "Bearer"
        assert "bearer token) is missing" in json.loads(missing.value.read())["error"]["message"]
        with pytest.raises(openai.AuthenticationError):
            connect("wrong").chat.completions.create(model="elf", messages=CHAT[-1:])
        with pytest.raises(openai.APIConnectionError):  # the port speaks TLS only
            connect(TOKEN, "http").models.list()
        good = connect(TOKEN)
        assert [m.id for m in good.models.list().data] == ["elf", "plain"]
        assert good.chat.completions.create(model="elf", messages=CHAT[-1:], max_tokens=3).usage.completion_tokens == 3


def test_mutual_tls_needs_a_client_certificate(personas, tiny_model_dir, certificate):
    config = DaemonConfig(listen="127.0.0.1:0", personas=personas, metrics="0", grace_s=1.0,
                          openai_listen="127.0.0.1:0", tls_cert=certificate / "server.pem",
                          tls_key=certificate / "server.key", tls_client_ca=certificate / "ca.pem")
    with DaemonThread(config, engine_config(tiny_model_dir)) as daemon:
        def models(with_certificate: bool) -> list[str]:
            context = ssl.create_default_context(cafile=str(certificate / "server.pem"))
            if with_certificate:
                context.load_cert_chain(certificate / "client.pem", certificate / "client.key")
            client = openai.OpenAI(base_url=f"https://{daemon.openai_address}/v1", api_key="unused", max_retries=0,
                                   timeout=TIMEOUT_S, http_client=openai.DefaultHttpxClient(verify=context))
            return [m.id for m in client.models.list().data]

        with pytest.raises(openai.APIConnectionError):
            models(with_certificate=False)
        assert models(with_certificate=True) == ["elf", "plain"]


@pytest.mark.slow  # starts `npcd serve` as a process
def test_sigterm_ends_an_open_stream_with_its_last_chunk_and_exits_zero(tmp_path, personas, tiny_model_dir):
    engine = tmp_path / "engine.yaml"
    engine.write_text(f"base: {tiny_model_dir}\nweights: fp32\ndevice: cpu\nmax_seq_len: 1024\nthreads: 2\n")
    proc, _, log = spawn_daemon(personas, engine, tmp_path, "--grace-s", "0", "--openai-listen", "127.0.0.1:0")
    try:
        [listening] = [e for e in log if e.get("event") == "listening"]
        client = openai.OpenAI(base_url=f"http://{listening['openai']}/v1", api_key="unused", max_retries=0,
                               timeout=TIMEOUT_S)
        stream = client.chat.completions.create(model="plain", messages=CHAT[-1:], max_tokens=500, stream=True)
        chunks = [next(stream), next(stream)]  # the role, and the first text: it is streaming
        proc.send_signal(signal.SIGTERM)  # grace 0: the drain cancels the line at once
        chunks += list(stream)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert chunks[-1].choices[0].finish_reason == "length"  # cut short: OpenAI's word for an incomplete reply
    assert 0 < chunks[-1].usage.completion_tokens < 500
    events = [e.get("event") for e in log]
    assert events.index("listening") < events.index("shutting down") < events.index("stopped")


def test_the_daemons_own_signal_handlers_stay(personas, tiny_model_dir):
    """`npcd serve` runs the daemon on the main thread, where uvicorn would install SIGTERM and SIGINT handlers of
    its own and start shutting down (before the drain) on them; the daemon's are the ones that must run."""
    config = DaemonConfig(listen="127.0.0.1:0", personas=personas, metrics="0", grace_s=0.0,
                          openai_listen="127.0.0.1:0")

    async def handlers_before_and_while_serving() -> tuple[dict, dict]:
        before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}  # asyncio.run's own too
        daemon = Daemon(config, engine_config(tiny_model_dir))
        try:
            await daemon.start()
            assert daemon.openai_address
            return before, {sig: signal.getsignal(sig) for sig in before}
        finally:
            await daemon.stop()

    assert threading.current_thread() is threading.main_thread()
    before, serving = asyncio.run(handlers_before_and_while_serving())
    assert serving == before

