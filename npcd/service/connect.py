"""A client channel to a daemon as its own settings describe it: TLS when it serves TLS, its token when it has one.

The `npcd` commands that call a daemon (`say`, `personas`) read the same
npcd.yaml / NPCD_* settings as `npcd serve`, so on the machine that runs the
daemon they connect without extra flags. The server certificate doubles as
the root to trust, which is what a self-signed certificate needs.
"""

from __future__ import annotations

from typing import Any

from npcd.service.config import DaemonConfig


def open_channel(address: str, config: DaemonConfig) -> tuple[Any, tuple[tuple[str, str], ...]]:
    """(a grpc channel to `address`, the call metadata every call must send)."""
    import grpc

    metadata = (("authorization", f"Bearer {config.token}"),) if config.token else ()
    if config.tls_cert is None:
        return grpc.insecure_channel(address), metadata
    credentials = grpc.ssl_channel_credentials(root_certificates=config.tls_cert.read_bytes())
    return grpc.secure_channel(address, credentials), metadata
