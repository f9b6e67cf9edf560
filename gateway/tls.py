"""TLS contexts for our listeners."""

from __future__ import annotations

import ssl

from gateway.config import TLSSection


def server_context(tls: TLSSection) -> ssl.SSLContext | None:
    """A server context from ``[tls]``, or None when no certificate is configured."""
    if tls.cert_file is None or tls.key_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx
