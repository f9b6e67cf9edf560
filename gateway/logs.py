"""Structured logging: JSON lines when not on a terminal, console otherwise.

Secrets never reach a log line: configuration secrets are SecretStr (masked
repr), and the :func:`redact` processor masks any event field whose name
suggests a credential, whatever its value.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEY = re.compile(r"pass|secret|token|credential|auth_data|authorization", re.IGNORECASE)
MASK = "**********"


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Mask values of fields named like credentials."""
    for key in list(event):
        if _SECRET_KEY.search(key):
            event[key] = MASK
    return event


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written (not when logging was configured).

    Loggers are cached on first use; one bound to the stderr of that moment
    would write to a closed file once it is replaced (a test's captured
    stderr, say).
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(*, json: bool | None = None, level: str = "info") -> None:
    """Set up structlog (and route the standard library's logging to stderr)."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    # aiosmtpd logs message lines and AUTH exchanges at DEBUG/INFO, and nags at WARNING.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
