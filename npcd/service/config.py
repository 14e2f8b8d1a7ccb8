"""The daemon's own settings (`npcd.yaml`), separate from the engine definition.

Precedence, lowest to highest: built-in defaults, `npcd.yaml`, `NPCD_*`
environment variables, command-line flags. Each layer only names what it
changes, so a deployment can pin the bind address in the environment while a
developer overrides the personas directory on the command line.

Relative paths in `npcd.yaml` are resolved against the file's own directory
(so the bundled file works from any working directory); paths given in the
environment or on the command line are relative to the working directory, as
a shell user would expect.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from npcd.engine.api import SAMPLING_BOUNDS, STOP_STRINGS
from npcd.service.sentences import CLAUSE_MARKS, SENTENCE_MARKS, marks_problem

DEFAULT_FILE = "npcd.yaml"


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for; anything beyond is INVALID_ARGUMENT.

    They keep one careless or hostile client from stalling a batch that many
    NPCs share (a 100k-character line would be prefilled ahead of everyone).
    """

    max_line_chars: int = 2000       # the line, each history turn's text, each context value
    max_history_turns: int = 32
    max_context_entries: int = 32
    max_stop_strings: int = 8        # extra stop strings a request may add
    max_tokens: int = 512            # cap on sampling.max_tokens (persona default or override)
    max_id_chars: int = 128          # request_id, npc_id, persona, speaker, context keys
    max_deadline_ms: int = 600_000
    max_schema_chars: int = 16_384   # response_format and each action's args_schema_json
    max_conversation_turns: int = 256  # turns a kept conversation stores (the oldest are deleted beyond)
    max_conversations: int = 10_000  # conversations one client keeps (x-npcd-client; all without one)


@dataclass(frozen=True)
class DaemonConfig:
    listen: str = "127.0.0.1:50051"
    engine: Path = Path("engines/default.yaml")
    personas: Path = Path("personas")
    metrics: str = "127.0.0.1:9464"  # "0" turns the metrics endpoint off
    openai_listen: str = "0"         # the OpenAI-compatible HTTP endpoint (npcd.service.openai_http); "0": off
    tick_window_ms: float = 3.0      # requests arriving this close together are submitted together
    grace_s: float = 10.0            # on SIGTERM: time in-flight requests get to finish
    log_json: bool = False
    log_level: str = "info"
    limits: Limits = field(default_factory=Limits)
    # Exposure. On loopback none of this is needed; any other address needs TLS and a token, or insecure_lan.
    tls_cert: Path | None = None     # PEM server certificate (chain); with tls_key the port speaks TLS only
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA: clients must present a certificate it signed (mutual TLS)
    token: str = ""                  # bearer token every call must carry (metadata authorization: Bearer ...)
    insecure_lan: bool = False       # allow a non-loopback address without TLS and a token (logged as a warning)
    reflection: bool = True          # gRPC server reflection (grpcurl, Postman); off hides the API's shape
    admin: bool = True               # ReloadPersonas; off: only the file watcher reloads
    reload_min_interval_s: float = 1.0  # ReloadPersonas more often than this is RESOURCE_EXHAUSTED
    conversations: Path | None = None  # SQLite file of the conversations the daemon keeps; None: in memory only
    # Sentence events (SayRequest.segmentation): a piece ends at one of these marks; clause mode also at these
    sentence_marks: str = SENTENCE_MARKS
    clause_marks: str = CLAUSE_MARKS

    @property
    def metrics_enabled(self) -> bool:
        return self.metrics != "0"

    @property
    def openai_enabled(self) -> bool:
        return self.openai_listen != "0"

    def validate(self, source: str) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"{source}: {msg}")

        need(_is_host_port(self.listen), f"listen must be HOST:PORT, got {self.listen!r}")
        need(self.metrics == "0" or _is_host_port(self.metrics),
             f"metrics must be HOST:PORT or 0 (off), got {self.metrics!r}")
        need(not self.openai_enabled or _is_host_port(self.openai_listen),
             f"openai_listen must be HOST:PORT or 0 (off), got {self.openai_listen!r}")
        need(0 <= self.tick_window_ms <= 1000, f"tick_window_ms must be in 0..1000, got {self.tick_window_ms:g}")
        need(0 <= self.grace_s <= 3600, f"grace_s must be in 0..3600, got {self.grace_s:g}")
        need(self.log_level in ("debug", "info", "warning", "error"),
             f"log_level must be debug, info, warning or error, got {self.log_level!r}")
        need((self.tls_cert is None) == (self.tls_key is None), "tls_cert and tls_key go together; got only one")
        need(self.tls_client_ca is None or self.tls_cert is not None, "tls_client_ca needs tls_cert and tls_key")
        need(self.conversations is None or self.conversations.parent.is_dir(),
             f"conversations: the directory of {self.conversations} does not exist")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            need(path is None or path.is_file(), f"{name}: {path} is not a file")
        need(0 <= self.reload_min_interval_s <= 3600,
             f"reload_min_interval_s must be in 0..3600, got {self.reload_min_interval_s:g}")
        for name in ("sentence_marks", "clause_marks"):
            problem = marks_problem(getattr(self, name))
            need(problem is None, f"{name} {problem}")
        both = sorted(set(self.sentence_marks) & set(self.clause_marks))
        need(not both, f"sentence_marks and clause_marks share {''.join(both)!r}; a mark ends either a sentence "
                       f"or a clause")
        # both doors to the same personas: the HTTP one is exposed under exactly the gRPC port's rules
        for name, address in (("listen", self.listen), ("openai_listen", self.openai_listen)):
            host = address.rpartition(":")[0]
            need(address == "0" or is_loopback(host) or self.insecure_lan
                 or (self.tls_cert is not None and bool(self.token)),
                 f"{name} {address} is not a loopback address: serving beyond this machine needs TLS (tls_cert, "
                 f"tls_key) and a token, or insecure_lan: true to accept that anyone on the network can use it")
        for name, value in dataclasses.asdict(self.limits).items():
            need(value >= 1, f"limits.{name} must be >= 1, got {value}")
        # these caps narrow the sampling table (npcd.engine.api); a higher value would silently do nothing
        for name, bound in (("max_tokens", SAMPLING_BOUNDS["max_tokens"]), ("max_stop_strings", STOP_STRINGS)):
            value = getattr(self.limits, name)
            need(value <= bound.high, f"limits.{name} must be <= {bound.high:g} (the engine's bound), got {value}")


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 <= int(port) <= 65535)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _to_int(value: Any) -> int:
    if isinstance(value, (bool, float)):
        raise ValueError
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    return float(value)


def _to_path(value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError
    return Path(value)


def _to_str(value: Any) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ValueError
    return str(value)


# setting -> (converter, what the error says it must be)
_Conv = tuple[Callable[[Any], Any], str]
_SCALARS: dict[str, _Conv] = {
    "listen": (_to_str, "HOST:PORT"),
    "engine": (_to_path, "a path"),
    "personas": (_to_path, "a path"),
    "metrics": (_to_str, "HOST:PORT or 0"),
    "openai_listen": (_to_str, "HOST:PORT or 0"),
    "tick_window_ms": (_to_float, "a number"),
    "grace_s": (_to_float, "a number"),
    "log_json": (_to_bool, "true or false"),
    "log_level": (_to_str, "a string"),
    "tls_cert": (_to_path, "a path"),
    "tls_key": (_to_path, "a path"),
    "tls_client_ca": (_to_path, "a path"),
    "token": (_to_str, "a string"),
    "insecure_lan": (_to_bool, "true or false"),
    "reflection": (_to_bool, "true or false"),
    "admin": (_to_bool, "true or false"),
    "reload_min_interval_s": (_to_float, "a number"),
    "conversations": (_to_path, "a path"),
    "sentence_marks": (_to_str, "a string of punctuation marks"),
    "clause_marks": (_to_str, "a string of punctuation marks"),
}
_LIMITS = [f.name for f in dataclasses.fields(Limits)]


def env_name(key: str) -> str:
    """`tick_window_ms` -> `NPCD_TICK_WINDOW_MS`; limits share the namespace: `NPCD_MAX_LINE_CHARS`."""
    return "NPCD_" + key.upper()


def _convert(key: str, value: Any, conv: _Conv, source: str) -> Any:
    try:
        return conv[0](value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {key} must be {conv[1]}, got {value!r}") from None


def _overlay(config: DaemonConfig, data: Mapping[str, Any], source: str, base_dir: Path | None) -> DaemonConfig:
    """`data` (top-level settings plus a `limits` mapping) over `config`, validated, errors naming `source`."""
    known = sorted([*_SCALARS, "limits"])
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {unknown}; known: {known}")
    top: dict[str, Any] = {}
    for key, value in data.items():
        if key == "limits":
            continue
        converted = _convert(key, value, _SCALARS[key], source)
        if isinstance(converted, Path) and base_dir is not None and not converted.is_absolute():
            converted = base_dir / converted
        top[key] = converted
    limits = data.get("limits") or {}
    if not isinstance(limits, Mapping):
        raise ValueError(f"{source}: limits must be a mapping, got {limits!r}")
    bad = sorted(set(limits) - set(_LIMITS))
    if bad:
        raise ValueError(f"{source}: unknown limit(s) {bad}; known: {_LIMITS}")
    new_limits = {k: _convert(f"limits.{k}", v, (_to_int, "an integer"), source) for k, v in limits.items()}
    config = dataclasses.replace(config, **top, limits=dataclasses.replace(config.limits, **new_limits))
    config.validate(source)
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per setting; flags left unset leave the lower layers alone."""
    parser.add_argument("--config", help=f"daemon settings file (default: ./{DEFAULT_FILE} if present, or NPCD_CONFIG)")
    parser.add_argument("--listen", help="gRPC bind address HOST:PORT (default 127.0.0.1:50051)")
    parser.add_argument("--engine", help="engine definition YAML (default engines/default.yaml)")
    parser.add_argument("--personas", help="personas directory (default personas/)")
    parser.add_argument("--metrics", help="Prometheus endpoint HOST:PORT, or 0 for off (default 127.0.0.1:9464)")
    parser.add_argument("--openai-listen", dest="openai_listen",
                        help="OpenAI-compatible HTTP endpoint HOST:PORT (/v1/chat/completions), or 0 for off "
                             "(default 0)")
    parser.add_argument("--tick-window-ms", dest="tick_window_ms",
                        help="submit requests arriving within this window together (default 3)")
    parser.add_argument("--grace-s", dest="grace_s", help="shutdown grace period in seconds (default 10)")
    parser.add_argument("--log-json", dest="log_json", action="store_const", const=True,
                        help="log JSON lines instead of console text")
    parser.add_argument("--log-level", dest="log_level", help="debug, info, warning or error")
    parser.add_argument("--tls-cert", dest="tls_cert", help="PEM server certificate: serve TLS only")
    parser.add_argument("--tls-key", dest="tls_key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", dest="tls_client_ca", help="PEM CA that client certificates must chain to")
    parser.add_argument("--insecure-lan", dest="insecure_lan", action="store_const", const=True,
                        help="allow a non-loopback --listen without TLS and a token (anyone on the network can use it)")
    parser.add_argument("--no-reflection", dest="reflection", action="store_const", const=False,
                        help="switch gRPC server reflection off")
    parser.add_argument("--conversations", help="SQLite file the daemon keeps conversations in (default: "
                        "conversations.sqlite3 beside npcd.yaml; without npcd.yaml, in memory only)")
    parser.add_argument("--no-admin", dest="admin", action="store_const", const=False,
                        help="switch ReloadPersonas off (the file watcher still reloads)")
    parser.add_argument("--sentence-marks", dest="sentence_marks", metavar="MARKS",
                        help="marks that end a sentence for Sentence events (default: . ! ? … 。！？ ؟ । ॥ and kin)")
    parser.add_argument("--clause-marks", dest="clause_marks", metavar="MARKS",
                        help="marks that also end a clause in SEGMENTATION_CLAUSE (default: , ; : — – ，、；： ، ؛ and kin)")
    for name in _LIMITS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="N", help=f"limits.{name}")


def load(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None,
         cwd: Path | None = None) -> DaemonConfig:
    """Defaults < npcd.yaml < NPCD_* environment < flags."""
    environ = os.environ if environ is None else environ
    explicit = (getattr(args, "config", None) if args is not None else None) or environ.get("NPCD_CONFIG")
    path = Path(explicit) if explicit else (cwd or Path.cwd()) / DEFAULT_FILE
    config = DaemonConfig()
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}  # YAML is UTF-8: the marks are not ASCII
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: must be a mapping of settings")
        config = _overlay(config, data, str(path), path.resolve().parent)
    elif explicit:
        raise ValueError(f"{path}: daemon config file not found")

    env: dict[str, Any] = {k: environ[env_name(k)] for k in _SCALARS if env_name(k) in environ}
    env["limits"] = {k: environ[env_name(k)] for k in _LIMITS if env_name(k) in environ}
    config = _overlay(config, env, "environment", None)
    if args is not None:
        flags: dict[str, Any] = {k: getattr(args, k) for k in _SCALARS if getattr(args, k, None) is not None}
        flags["limits"] = {k: getattr(args, k) for k in _LIMITS if getattr(args, k, None) is not None}
        config = _overlay(config, flags, "command line", None)
    return config
