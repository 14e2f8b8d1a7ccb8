"""The OpenAI-compatible HTTP door: `POST /v1/chat/completions` and `GET /v1/models` over the same servicer.

Mods and tools that only speak the OpenAI API (Mantella-style dialogue mods, LLM front ends) get npcd's personas
and its mixed-adapter batching without a gRPC stack. This module only translates: a chat request becomes one
`SayRequest` handed to `NpcdServicer.open_line`, exactly what a gRPC `Say` does, so validation, limits, fair
shares, refusal counting and the one log line per request are the gRPC path's own.

How a chat maps onto a line (README "OpenAI-compatible endpoint" says the same for users):

* `model` is the persona id. `GET /v1/models` lists the personas that can serve (a version loaded, not retiring).
* The last message must be the user's: it is the `line`, its `name` the `speaker`. Earlier user and assistant
  messages are `history` turns; assistant turns are spoken by the persona's display name, user turns by their
  `name` (else the default speaker). The persona keeps its own system prompt (its prefix stays cached), so system
  and developer messages go into `context` under `scene` (SCENE_KEY) rather than being dropped.
* Sampling: max_tokens / max_completion_tokens, temperature, top_p, seed and stop, plus the extensions top_k and
  repetition_penalty (SamplingOverrides has them). Parameters that would change what the reply means (n > 1,
  tools, logprobs, penalties ...) are refused with 400 naming them, never ignored; unknown ones likewise.
  IGNORED lists those accepted without effect because they change nothing about the reply.
* `response_format` json_schema is SayRequest.response_format; json_object is `structured` (the persona's
  {say, emotion, action} reply). The content is then the reply's JSON; streamed, it comes as one chunk when the
  line finishes, because the engine streams only the spoken `say` field as text.
* `user` names the client (like gRPC's x-npcd-client metadata, which is honoured as a header too): its fair
  share, and whose kept conversations the line reads and writes. Without a name each connection is its own
  client, and conversations are the one shared set, as over gRPC.
* `conversation` (an extension) is SayRequest.conversation: the daemon keeps that conversation's turns.
* Every line is PRIORITY_PLAYER: a client of this door is almost always a person waiting for the reply.
* finish_reason: STOP is "stop", LENGTH "length"; a line cut short otherwise (cancelled at shutdown, deadline,
  preempted) is "length" too, OpenAI's only reason that says the text is incomplete ("stop" would claim the NPC
  finished its sentence).
* Refusals: the servicer's gRPC status as HTTP (STATUS_HTTP), the body OpenAI's error object, its `param` the
  request parameter at fault (the servicer's SayRequest field names translated back); 429 carries Retry-After.
  An error after the stream started is an SSE `data: {"error": ...}` event that ends the stream.

A client that disconnects has its line cancelled: the servicer's event iterator is closed, which cancels the
engine request within a step (and still accounts the line), streamed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import socket
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from npcd.service._proto import npcd_pb2 as pb
from npcd.service.config import DaemonConfig
from npcd.service.registry import PersonaRegistry, Status
from npcd.service.servicer import CLIENT_KEY, identity
from npcd.service.validation import DEFAULT_SPEAKER, RequestError

if TYPE_CHECKING:
    from npcd.service.servicer import NpcdServicer

SCENE_KEY = "scene"            # the context key that system and developer messages are given under
OWNER = "npcd"                 # owned_by of every model
MAX_BODY_BYTES = 1 << 20       # far above what the request limits let through; stops a huge body being buffered
SHUTDOWN_S = 5                 # after the drain every line has ended; this only bounds clients that stopped reading
UINT32, UINT64 = 2**32 - 1, 2**64 - 1  # the SamplingOverrides fields' ranges

STATUS_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}  # any other status is 500
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop"}  # every other reason ends the text early: "length"

# Accepted only at the value that changes nothing; any other value is refused naming the parameter.
NEUTRAL: dict[str, Any] = {
    "n": 1, "logprobs": False, "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0,
    "tools": [], "functions": [], "tool_choice": "none", "function_call": "none", "logit_bias": {},
    "modalities": ["text"],
}
# Accepted and without effect: none of them changes the reply (parallel_tool_calls only matters with tools).
IGNORED = frozenset({"metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                     "parallel_tool_calls"})
# OpenAI parameter -> (SamplingOverrides field, largest integer it holds; None for a float)
SAMPLING: dict[str, tuple[str, int | None]] = {
    "max_tokens": ("max_tokens", UINT32),
    "max_completion_tokens": ("max_tokens", UINT32),
    "temperature": ("temperature", None),
    "top_p": ("top_p", None),
    "top_k": ("top_k", UINT32),
    "repetition_penalty": ("repetition_penalty", None),
    "seed": ("seed", UINT64),
}
HANDLED = frozenset({"model", "messages", "stream", "stream_options", "stop", "response_format", "user",
                     "conversation", *SAMPLING})


class Refusal(Exception):
    """An HTTP error answered with OpenAI's error object; raised anywhere in a handler, rendered by the app."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        kind = ("rate_limit_error" if self.status == 429 else "server_error" if self.status >= 500
                else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(param: str, problem: str) -> Refusal:
    return Refusal(400, f"{param}: {problem}", param=param, code=grpc.StatusCode.INVALID_ARGUMENT.name.lower())


@dataclass
class Chat:
    """A chat request as a line: the SayRequest, how to answer, and which request parameter each of the
    SayRequest's fields came from (so that the servicer's refusals name what the client sent)."""

    request: pb.SayRequest
    user: str = ""            # the client's own name for itself (OpenAI's `user`), "" when not given
    stream: bool = False
    include_usage: bool = False
    params: dict[str, str] = field(default_factory=dict)  # SayRequest field path -> OpenAI parameter

    @property
    def structured(self) -> bool:
        return self.request.structured or bool(self.request.response_format)


def _text(param: str, content: Any) -> str:
    """A message's content as text: a string, or the text parts of a list joined (other parts are refused)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(param, f"must be a string or a list of text parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _bad(f"{param}[{j}]", f"only text parts are supported, got {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def _number(param: str, value: Any, largest: int | None) -> int | float:
    if largest is None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(param, f"must be a number, got {json.dumps(value)[:40]}")
        try:
            return float(value)
        except OverflowError:  # an integer past float's range (JSON has no bound on them)
            raise _bad(param, f"must be a number in float range, got {str(value)[:40]}...") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= largest:
        raise _bad(param, f"must be an integer in [0, {largest}], got {json.dumps(value)[:40]}")
    return value


def translate(body: Any, display_name: str) -> Chat:
    """A chat completion request as a SayRequest for the persona named by `model`, whose display name speaks the
    assistant turns; everything that cannot be honoured is a 400 naming the parameter."""
    if not isinstance(body, dict):
        raise Refusal(400, f"request body: must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "required: the persona id (GET /v1/models lists them)")
    for key, value in body.items():
        if key in NEUTRAL:
            if value is not None and value != NEUTRAL[key]:
                raise _bad(key, f"not supported by npcd (only {json.dumps(NEUTRAL[key])})")
        elif key not in HANDLED and key not in IGNORED:
            raise _bad(key, "not supported by npcd")
    chat = Chat(pb.SayRequest(persona=model, priority=pb.PRIORITY_PLAYER), params={"persona": "model"})
    _messages(chat, body.get("messages"), display_name)
    _sampling(chat, body)
    _output(chat, body)
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise _bad("user", "must be a string")
        chat.user = user
    conversation = body.get("conversation")
    if conversation is not None:
        if not isinstance(conversation, str):
            raise _bad("conversation", "must be a string")
        chat.request.conversation = conversation
        chat.params["conversation"] = "conversation"
    return chat


def _messages(chat: Chat, messages: Any, display_name: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "required: a non-empty list, the user's line last")
    req, params = chat.request, chat.params
    params["history"] = "messages"
    scene: list[tuple[int, str]] = []
    last = len(messages) - 1
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, "must be an object")
        role = message.get("role")
        for key in ("tool_calls", "function_call", "audio"):
            if message.get(key):
                raise _bad(f"{where}.{key}", "not supported by npcd")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise _bad(f"{where}.name", "must be a string")
        if role not in ("system", "developer", "user", "assistant"):
            raise _bad(f"{where}.role", f"must be system, developer, user or assistant, got {role!r}")
        text = _text(f"{where}.content", message.get("content"))
        if i == last:
            if role != "user":
                raise _bad(f"{where}.role", f"the last message is the line the NPC answers: must be user, "
                                            f"got {role!r}")
            req.line, req.speaker = text, name or ""
            params |= {"line": f"{where}.content", "speaker": f"{where}.name"}
        elif role in ("system", "developer"):
            scene.append((i, text))
        else:
            k = len(req.history)
            req.history.add(speaker=display_name if role == "assistant" else name or DEFAULT_SPEAKER, text=text)
            params |= {f"history[{k}].text": f"{where}.content", f"history[{k}].speaker": f"{where}.name"}
    if scene:
        req.context[SCENE_KEY] = "\n".join(text for _, text in scene)
        params[f"context[{SCENE_KEY!r}]"] = f"messages[{scene[0][0]}].content" if len(scene) == 1 else "messages"


def _sampling(chat: Chat, body: Mapping[str, Any]) -> None:
    given = [k for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
    if len(given) == 2 and body["max_tokens"] != body["max_completion_tokens"]:
        raise _bad("max_completion_tokens", "differs from max_tokens; give one of them")
    sampling = chat.request.sampling
    for param, (name, largest) in SAMPLING.items():
        value = body.get(param)
        if value is not None:
            setattr(sampling, name, _number(param, value, largest))
            chat.params[f"sampling.{name}"] = param
    stop = body.get("stop")
    if stop is None:
        return
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "must be a string or a list of strings")
    sampling.stop.extend(stops)
    chat.params["sampling.stop"] = "stop"
    for j in range(len(stops)):
        chat.params[f"sampling.stop[{j}]"] = "stop" if isinstance(stop, str) else f"stop[{j}]"


def _output(chat: Chat, body: Mapping[str, Any]) -> None:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    chat.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not chat.stream:
            raise _bad("stream_options", "only with stream: true")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise _bad("stream_options", "must be an object with include_usage: true or false")
        chat.include_usage = options.get("include_usage", False)
    fmt = body.get("response_format")
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _bad("response_format.json_schema.schema", "required: a JSON Schema object")
        chat.request.response_format = json.dumps(schema)
    elif kind == "json_object":
        chat.request.structured = True
    elif kind != "text":
        raise _bad("response_format.type", f"must be text, json_object or json_schema, got {kind!r}")
    chat.params |= {"response_format": "response_format", "structured": "response_format"}


def in_openai_terms(exc: RequestError, params: Mapping[str, str]) -> Refusal:
    """A servicer refusal as OpenAI's error: the status as HTTP, the SayRequest field it names as the request
    parameter it came from, the retry hint as Retry-After (whole seconds, rounded up)."""
    status = STATUS_HTTP.get(exc.code, 500)
    message, param, code = exc.message, None, exc.code.name.lower()
    if exc.code is grpc.StatusCode.NOT_FOUND:  # the persona: unknown, retiring, failed to load, unloaded
        param, code = "model", "model_not_found"
    elif exc.code is grpc.StatusCode.INVALID_ARGUMENT:
        name, sep, problem = message.partition(": ")
        if sep and name in params:
            param = params[name]
            message = f"{param}: {problem}"
    headers = {"Retry-After": str(math.ceil(exc.retry_after_ms / 1000))} if exc.retry_after_ms else None
    return Refusal(status, message, param=param, code=code, headers=headers)


async def _json_body(request: Request) -> Any:
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY_BYTES:
            raise Refusal(413, f"request body: at most {MAX_BODY_BYTES} bytes")

    def no_constant(name: str) -> None:  # NaN and Infinity are not JSON; a NaN temperature must not slip in
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(data, parse_constant=no_constant)
    except UnicodeDecodeError:
        raise Refusal(400, "request body: not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise Refusal(400, f"request body: not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:
        raise Refusal(400, f"request body: not JSON: {exc}") from None


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read by then, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """A streamed reply that closes its body generator however the response ends. When the client leaves,
    starlette cancels the sending loop, which may leave the generator suspended at a `yield` until garbage
    collection, and the line running on for nobody; closing it closes the line's events, which cancels it."""

    def __init__(self, body: AsyncGenerator[str, None]):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.aclose()


def _sse(data: Mapping[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(finished: pb.Finished) -> dict[str, Any]:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finished.cached_prompt_tokens}}


def _event_refusal(error: pb.Error) -> Refusal:
    """An Error event (the line failed after it was admitted) as the refusal a client is given."""
    code = grpc.StatusCode.__members__.get(error.status, grpc.StatusCode.INTERNAL)
    return in_openai_terms(RequestError(code, error.message, error.retry_after_ms), {})


class OpenAIServer:
    """The HTTP door on the daemon's own event loop: uvicorn serving a starlette app, bound before start returns.

    Its exposure follows the gRPC port's (DaemonConfig.validate refuses a non-loopback openai_listen without TLS
    and a token, unless insecure_lan): TLS (mutual too) from the same files, and the same bearer token, sent the
    way OpenAI clients send their API key (`Authorization: Bearer <token>`).
    """

    def __init__(self, servicer: NpcdServicer, registry: PersonaRegistry, config: DaemonConfig, log: Any):
        self._servicer, self._registry, self._config, self._log = servicer, registry, config, log
        self._expected = f"Bearer {config.token}".encode() if config.token else None
        self._created = int(time.time())  # a persona id has no creation time of its own; the door's start stands in
        self.app = Starlette(
            routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]),
                    Route("/v1/models", self._models, methods=["GET"]),
                    Route("/v1/models/{model}", self._model, methods=["GET"])],
            exception_handlers={Refusal: self._refused, HTTPException: self._http_error})
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None
        self.address = ""

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> str:
        """Binds `openai_listen` (port 0: a free one) and serves; returns HOST:PORT."""
        config = self._config
        host, _, port = config.openai_listen.rpartition(":")
        bare = host.strip("[]")
        sock = socket.socket(socket.AF_INET6 if ":" in bare else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((bare, int(port)))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {config.openai_listen} (openai_listen): {exc.strerror or exc}") from None
        tls = {}
        if config.tls_cert is not None and config.tls_key is not None:
            tls = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
            if config.tls_client_ca is not None:
                tls |= {"ssl_ca_certs": str(config.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        # uvicorn's own logging stays out of the daemon's log: no access lines (the servicer logs each line once),
        # no startup banner; only its errors reach the standard library's last-resort handler.
        server_config = uvicorn.Config(self.app, lifespan="off", ws="none", log_config=None, log_level="error",
                                       access_log=False, proxy_headers=False, server_header=False,
                                       timeout_graceful_shutdown=SHUTDOWN_S, **tls)
        try:
            server_config.load()  # a bad certificate fails here, in start, not later in the serving task
        except BaseException:
            sock.close()
            raise
        self._server = _Server(server_config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:  # uvicorn says it is serving by this flag alone
            if self._task.done():
                self._task.result()
                raise OSError(f"the OpenAI endpoint on {config.openai_listen} stopped while starting")
            await asyncio.sleep(0.01)
        self.address = f"{host}:{sock.getsockname()[1]}"
        return self.address

    async def stop(self) -> None:
        """Closes the port and waits for open responses to end. Called after the servicer's drain, so every line
        has already ended with its Finished (a streamed one with its last chunk and [DONE])."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task

    # --- handlers ------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self._expected is None:
            return
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode("latin-1"), self._expected):
            why = "missing" if not sent else "wrong"
            raise Refusal(401, f"the API key (bearer token) is {why}: send 'Authorization: Bearer <token>'",
                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _client(self, request: Request, chat: Chat) -> tuple[str, str]:
        """(who asks, for fair shares; whose conversations the line reads and writes), as gRPC's caller() and
        owner() say for x-npcd-client: the `user` field or that header names the client; without a name each
        connection is its own client, and conversations are the one shared set."""
        peer = request.client
        return identity(chat.user or request.headers.get(CLIENT_KEY, ""),
                        f"http:{peer.host}:{peer.port}" if peer else "http")

    def _display_name(self, persona_id: str) -> str:
        """Who speaks the assistant turns; an unknown persona's id stands in (the servicer refuses it anyway)."""
        state = self._registry.get(persona_id)
        return state.persona.display_name if state is not None and state.persona is not None else persona_id

    async def _chat(self, request: Request) -> Response:
        self._authorize(request)
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        model = ""
        try:
            body = await _json_body(request)
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                model = body["model"]
            chat = translate(body, self._display_name(model))
        except Refusal as refusal:
            self._log_refusal(refusal, pb.SayRequest(request_id=request_id,
                                                     persona=model[:self._config.limits.max_id_chars]))
            raise
        chat.request.request_id = request_id
        try:
            who, owner = self._client(request, chat)
            events = await self._servicer.open_line(chat.request, who, owner=owner)
        except RequestError as exc:
            refusal = in_openai_terms(exc, chat.params)
            self._log_refusal(refusal, chat.request, exc.code, exc.retry_after_ms)
            raise refusal from None
        except Exception as exc:  # a bug in one request must not look like a transport error
            self._log.exception("request failed", id=request_id, persona=chat.request.persona)
            raise Refusal(500, f"the request failed before it started: {exc!r}", code="internal") from None
        if chat.stream:
            return _EventStream(self._stream(chat, events))
        return await self._complete(request, chat, events)

    def _log_refusal(self, refusal: Refusal, request: pb.SayRequest,
                     code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT, retry_after_ms: int = 0) -> None:
        """Counted and logged by the servicer, like a refused Say, in the words the client was given."""
        self._servicer.rejected(RequestError(code, refusal.message, retry_after_ms), request)

    @staticmethod
    def _chunk(chat: Chat, created: int, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        return _sse({"id": chat.request.request_id, "object": "chat.completion.chunk", "created": created,
                     "model": chat.request.persona, "system_fingerprint": None, "choices": choices, "usage": usage})

    @staticmethod
    def _choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]

    async def _stream(self, chat: Chat, events: AsyncIterator[pb.Event]) -> AsyncGenerator[str, None]:
        """The line's events as chat.completion.chunk events; closing this generator closes the line's events."""
        created = int(time.time())
        try:
            async for event in events:
                kind = event.WhichOneof("kind")
                if kind == "started":
                    yield self._chunk(chat, created, self._choice({"role": "assistant", "content": ""}))
                elif kind == "delta" and not chat.structured:
                    yield self._chunk(chat, created, self._choice({"content": event.delta.text}))
                elif kind == "finished":
                    finished = event.finished
                    if chat.structured:
                        yield self._chunk(chat, created, self._choice({"content": finished.json}))
                    usage = _usage(finished)
                    finish = FINISH_REASONS.get(finished.reason, "length")
                    # OpenAI's include_usage form: one more chunk without choices; else the last chunk has it
                    yield self._chunk(chat, created, self._choice({}, finish), None if chat.include_usage else usage)
                    if chat.include_usage:
                        yield self._chunk(chat, created, [], usage)
                    yield _sse("[DONE]")
                elif kind == "error":
                    yield _sse(_event_refusal(event.error).body())
                    return
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def _complete(self, request: Request, chat: Chat, events: AsyncIterator[pb.Event]) -> Response:
        """The whole reply as one chat.completion; the line is cancelled if the client leaves while it runs."""
        async def last() -> pb.Event | None:
            end = None
            async for event in events:
                if event.WhichOneof("kind") in ("finished", "error"):
                    end = event
            return end

        created = int(time.time())
        reading = asyncio.create_task(last())
        gone = asyncio.create_task(_disconnected(request))
        try:
            await asyncio.wait((reading, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not reading.done():
                reading.cancel()  # the client left (or the server gave up on it): end the line's events
            with contextlib.suppress(asyncio.CancelledError):
                await reading
            await events.aclose()  # type: ignore[attr-defined]
        end = None if reading.cancelled() else reading.result()
        if end is None:  # the client is gone: this status is never read, it only ends the handler
            return Response(status_code=499)
        if end.WhichOneof("kind") == "error":
            return _event_refusal(end.error).response()
        finished = end.finished
        return JSONResponse({
            "id": chat.request.request_id, "object": "chat.completion", "created": created,
            "model": chat.request.persona, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "refusal": None,
                                                 "content": finished.json if chat.structured else finished.text},
                         "finish_reason": FINISH_REASONS.get(finished.reason, "length"), "logprobs": None}],
            "usage": _usage(finished)})

    def _serving(self) -> Iterator[str]:
        """Ids of the personas a request can be served by: a version loaded, and not retiring."""
        return (s.id for s in self._registry.states() if s.persona is not None and s.status is not Status.RETIRING)

    def _model_object(self, persona_id: str) -> dict[str, Any]:
        return {"id": persona_id, "object": "model", "created": self._created, "owned_by": OWNER}

    async def _models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_object(i) for i in self._serving()]})

    async def _model(self, request: Request) -> Response:
        self._authorize(request)
        persona_id = request.path_params["model"]
        serving = list(self._serving())
        if persona_id not in serving:
            raise Refusal(404, f"unknown persona {persona_id!r}; known personas: {', '.join(serving) or 'none'}",
                          param="model", code="model_not_found")
        return JSONResponse(self._model_object(persona_id))

    async def _refused(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refusal)
        return exc.response()

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        """Starlette's own 404 / 405 in OpenAI's error form, so a client's error handling sees one shape."""
        assert isinstance(exc, HTTPException)
        return Refusal(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                       code="not_found" if exc.status_code == 404 else None).response()


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the daemon owns SIGTERM and SIGINT (`npcd serve` stops everything in
    order on them); uvicorn's would replace them and re-raise the signal after its own shutdown."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

