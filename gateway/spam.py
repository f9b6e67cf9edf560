"""The spam filter: rspamd's verdict on inbound mail, over its HTTP protocol.

Theory of operation
-------------------
:class:`Filter` is the daemon's one client of rspamd's normal worker
(``POST /checkv2``) and controller (``/learnspam``, ``/learnham``): one
``aiohttp`` connection pool, every request bounded by ``[spam] timeout`` and
at most ``[spam] max_in_flight`` in flight (waiting for a slot counts
against the timeout). rspamd gets the envelope (``From``, ``Rcpt``), the
client's ``IP`` and ``Helo`` on relay-in, and the tenant as ``Deliver-To``
so its statistics can be kept per tenant.

:class:`Result` is the pure part: rspamd's answer, what it means for a
tenant (:meth:`Result.refusal` on relay-in, :meth:`Result.junk` everywhere)
and the header block the source prepends to the message before delivery
(``Authentication-Results:`` from rspamd's SPF, DKIM and DMARC symbols,
``X-Spam-Score:``, ``X-Spam-Action:``, and ``X-Spam-Flag: YES`` for spam).

When rspamd cannot answer (refused, timed out, an HTTP error, a malformed
answer), ``mailgate_spam_check_errors_total`` counts it and ``on_error``
decides: ``accept`` returns an unscanned result (its header says so) and
``tempfail`` raises :class:`Unavailable`, whose SMTP reply is ``451 4.7.1``
(relay-in) and which makes a pull pass retry later. Nothing is lost either
way. The pool reconnects by itself: a restarted rspamd is used again at once.

:class:`Learner` teaches rspamd from agents' moves into and out of ``\\Junk``
(``mailgate_spam_learned_total``), in the background.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import structlog
from sqlalchemy import select

from gateway import metrics
from gateway.config import Config, SpamSection, TenantSection, TenantSpamSection
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Message, SpamVerdict

log = structlog.get_logger(__name__)

REJECT = "reject"
SOFT_REJECT = "soft reject"
GREYLIST = "greylist"
ADD_HEADER = "add header"
REWRITE_SUBJECT = "rewrite subject"
NO_ACTION = "no action"
UNSCANNED = "unscanned"
# Actions that file a message into \Junk (on relay-in "reject" is refused before).
_JUNK = frozenset({ADD_HEADER, REWRITE_SUBJECT, REJECT})
_ACTIONS = frozenset({REJECT, SOFT_REJECT, GREYLIST, ADD_HEADER, REWRITE_SUBJECT, NO_ACTION})

UNAVAILABLE = "451 4.7.1 Spam filter unavailable, try again later"

# rspamd's symbols -> RFC 8601 results, per method.
_AUTH_SYMBOLS: tuple[tuple[str, Mapping[str, str]], ...] = (
    (
        "spf",
        {
            "R_SPF_ALLOW": "pass",
            "R_SPF_FAIL": "fail",
            "R_SPF_SOFTFAIL": "softfail",
            "R_SPF_NEUTRAL": "neutral",
            "R_SPF_NA": "none",
            "R_SPF_DNSFAIL": "temperror",
            "R_SPF_PERMFAIL": "permerror",
        },
    ),
    (
        "dkim",
        {
            "R_DKIM_ALLOW": "pass",
            "R_DKIM_REJECT": "fail",
            "R_DKIM_TEMPFAIL": "temperror",
            "R_DKIM_PERMFAIL": "permerror",
            "R_DKIM_NA": "none",
        },
    ),
    (
        "dmarc",
        {
            "DMARC_POLICY_ALLOW": "pass",
            "DMARC_POLICY_ALLOW_WITH_FAILURES": "pass",
            "DMARC_POLICY_REJECT": "fail",
            "DMARC_POLICY_QUARANTINE": "fail",
            "DMARC_POLICY_SOFTFAIL": "fail",
            "DMARC_NA": "none",
            "DMARC_DNSFAIL": "temperror",
            "DMARC_BAD_POLICY": "permerror",
        },
    ),
)
# What may stand in a header or a reply line taken from rspamd or the envelope.
_UNSAFE = re.compile(r"[^\x21-\x7e ]+")
_ADDRESS = re.compile(r"^[^\s;()<>\"\\]{1,254}$")


class Unavailable(Exception):
    """rspamd did not answer and ``on_error = "tempfail"``: try again later."""

    smtp_reply = UNAVAILABLE


def _clean(text: str, limit: int = 200) -> str:
    return _UNSAFE.sub(" ", text).strip()[:limit]


@dataclass(frozen=True, slots=True)
class Result:
    """rspamd's verdict on one message (or why there is none)."""

    action: str  # rspamd's action, or "unscanned"
    score: float | None  # None: unscanned
    required: float | None  # rspamd's reject threshold
    message: str = ""  # rspamd's SMTP message (for a refusal)
    auth: tuple[tuple[str, str], ...] = ()  # (method, result): spf, dkim, dmarc
    error: str = ""  # unscanned: why

    @classmethod
    def parse(cls, body: bytes) -> Result:
        """rspamd's ``/checkv2`` JSON answer; ValueError if it is not one."""
        data = json.loads(body)
        if not isinstance(data, dict) or data.get("action") not in _ACTIONS:
            raise ValueError("not an rspamd /checkv2 answer")
        symbols = data.get("symbols") or {}
        auth: list[tuple[str, str]] = []
        for method, table in _AUTH_SYMBOLS:
            found = next((table[s] for s in table if s in symbols), None)
            if found is not None:
                auth.append((method, found))
        messages = data.get("messages") or {}
        message = messages.get("smtp_message", "") if isinstance(messages, dict) else ""
        return cls(
            action=str(data["action"]),
            score=float(data.get("score", 0.0)),
            required=float(data.get("required_score", 0.0)),
            message=_clean(str(message)),
            auth=tuple(auth),
        )

    @classmethod
    def unscanned(cls, error: str) -> Result:
        return cls(action=UNSCANNED, score=None, required=None, error=_clean(error, 80))

    def rejected(self, settings: TenantSpamSection) -> bool:
        if self.score is None:
            return False
        if settings.reject_score is not None:
            return self.score >= settings.reject_score
        return self.action == REJECT

    def junk(self, settings: TenantSpamSection) -> bool:
        """Whether the message goes to ``\\Junk`` (anything from ``add header`` up)."""
        if self.score is None:
            return False
        if settings.junk_score is not None:
            return self.score >= settings.junk_score or self.rejected(settings)
        return self.action in _JUNK or self.rejected(settings)

    def refusal(self, settings: TenantSpamSection) -> str | None:
        """Relay-in's answer instead of accepting, or None to accept."""
        if self.rejected(settings):
            return f"550 5.7.1 {_clean(self.message) or 'Message refused as spam'}"
        if self.action in (SOFT_REJECT, GREYLIST):
            return f"451 4.7.1 {_clean(self.message) or 'Try again later'}"
        return None

    @property
    def reason(self) -> str:
        """Why it is spam, as ``rules test`` and the log say it."""
        return f"rspamd: {self.action}, score {self.score:.2f}/{self.required or 0:.2f}"

    def header_block(self, hostname: str, settings: TenantSpamSection, mail_from: str = "") -> bytes:
        """The header fields to prepend to the message (CRLF-terminated)."""
        if self.score is None:
            return f"X-Spam-Action: {UNSCANNED} ({self.error})\r\n".encode()
        methods = []
        for method, result in self.auth:
            if method == "spf" and mail_from and _ADDRESS.match(mail_from):
                methods.append(f"spf={result} smtp.mailfrom={mail_from}")
            else:
                methods.append(f"{method}={result}")
        lines = [
            f"Authentication-Results: {_clean(hostname, 100)}; " + ("; ".join(methods) or "none"),
            f"X-Spam-Score: {self.score:.2f} / {self.required or 0:.2f}",
            f"X-Spam-Action: {self.action}",
        ]
        if self.junk(settings):
            lines.append("X-Spam-Flag: YES")
        return ("\r\n".join(lines) + "\r\n").encode()


def _controller_url(spam: SpamSection) -> str:
    if spam.controller_url:
        return spam.controller_url
    parts = urlsplit(spam.url)
    return urlunsplit((parts.scheme, f"{parts.hostname}:11334", "", "", ""))


class Filter:
    """The daemon's client of rspamd (one pool; a bounded number of requests in flight)."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self.config = config
        self._slots = asyncio.Semaphore(config().spam.max_in_flight)
        # aiohttp rather than httpx: a third of the CPU per request (0.3 ms instead of 0.85 ms
        # against rspamd, which opens a new connection per scan; docs/benchmarks.md, issue #18).
        # Made on first use, in the loop that uses it.
        self._client: aiohttp.ClientSession | None = None

    def enabled(self, tenant: TenantSection) -> bool:
        return self.config().spam.engine == "rspamd" and tenant.spam.enabled

    async def check(
        self,
        tenant: TenantSection,
        raw: bytes,
        *,
        mail_from: str = "",
        recipients: Sequence[str] = (),
        ip: str | None = None,
        helo: str | None = None,
        queue_id: str | None = None,
    ) -> Result | None:
        """rspamd's verdict on ``raw`` for ``tenant``; None when the tenant is not filtered.

        Raises :class:`Unavailable` when rspamd fails and ``on_error = "tempfail"``.
        """
        if not self.enabled(tenant):
            return None
        spam = self.config().spam
        headers: list[tuple[str, str]] = [("Deliver-To", tenant.id)]
        if mail_from and mail_from != "<>":
            headers.append(("From", mail_from))
        headers += [("Rcpt", r) for r in recipients]
        if ip:
            headers.append(("IP", ip))
        if helo:
            headers.append(("Helo", _clean(helo, 255)))
        if queue_id:
            headers.append(("Queue-Id", queue_id))
        try:
            body = await self._post(spam, f"{spam.url}/checkv2", raw, headers)
            return Result.parse(body)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            metrics.SPAM_CHECK_ERRORS.inc()
            log.warning(
                "spam.check_failed", tenant=tenant.id, error=type(exc).__name__, on_error=spam.on_error
            )
            if spam.on_error == "tempfail":
                raise Unavailable from exc
            return Result.unscanned(f"rspamd unreachable: {type(exc).__name__}")

    async def learn(self, tenant: TenantSection, raw: bytes, cls: str) -> bool:
        """Teach rspamd that ``raw`` is ``cls`` ("spam" or "ham"); False if it could not be told."""
        spam = self.config().spam
        try:
            await self._post(spam, f"{_controller_url(spam)}/learn{cls}", raw, [("Deliver-To", tenant.id)])
        except (aiohttp.ClientError, TimeoutError) as exc:
            metrics.SPAM_CHECK_ERRORS.inc()
            log.warning("spam.learn_failed", tenant=tenant.id, cls=cls, error=type(exc).__name__)
            return False
        metrics.SPAM_LEARNED.labels(tenant.id, cls).inc()
        return True

    async def _post(self, spam: SpamSection, url: str, raw: bytes, headers: list[tuple[str, str]]) -> bytes:
        if self._client is None:
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=spam.max_in_flight), trust_env=False
            )
        async with asyncio.timeout(spam.timeout.total_seconds()), self._slots:
            # bytes, never a buffer: a stream would be sent chunked, which rspamd does not read.
            content = raw if type(raw) is bytes else bytes(raw)
            async with self._client.post(url, data=content, headers=headers) as response:
                response.raise_for_status()
                return await response.read()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


class Learner:
    """Teaches rspamd from agents' moves: into ``\\Junk`` is spam, out of it ham.

    :meth:`teach` returns at once (the IMAP reply never waits); a task reads the
    messages' blobs and posts them to rspamd's controller, each message at most
    once per class: the class is claimed in ``spam_verdicts.learned`` (keyed by
    the message's content, so a copy or a move back shares it) before rspamd is
    asked, and given back if rspamd could not be told, so a later move retries.
    """

    def __init__(self, spam: Filter, db: Database, blobs: BlobStore) -> None:
        self.filter = spam
        self.db = db
        self.blobs = blobs
        self._tasks: set[asyncio.Task[None]] = set()

    def teach(self, tenant_id: str, folder_id: int, uids: Sequence[int], cls: str) -> None:
        """Learn the messages now at ``uids`` of ``folder_id`` as ``cls`` ("spam" or "ham"), later."""
        tenant = next((t for t in self.filter.config().tenants if t.id == tenant_id), None)
        if tenant is None or not uids or not self.filter.enabled(tenant):
            return
        task = asyncio.create_task(self._teach(tenant, folder_id, list(uids), cls), name="spam-learn")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _teach(self, tenant: TenantSection, folder_id: int, uids: list[int], cls: str) -> None:
        try:
            async with self.db.read() as s:
                blobs = set(
                    (
                        await s.scalars(
                            select(Message.blob).where(Message.folder_id == folder_id, Message.uid.in_(uids))
                        )
                    ).all()
                )
            for blob in sorted(blobs):
                if not await self._claim(tenant.id, blob, cls):
                    continue
                if not await self.filter.learn(tenant, await self.blobs.get(blob), cls):
                    await self._unclaim(tenant.id, blob, cls)
        except Exception:
            log.exception("spam.learn_task_failed", tenant=tenant.id, cls=cls)

    async def _claim(self, tenant_id: str, blob: str, cls: str) -> bool:
        """Mark ``blob`` learned as ``cls``; False if it already was."""
        async with self.db.write() as s:
            row = await s.get(SpamVerdict, (tenant_id, blob))
            if row is None:
                s.add(
                    SpamVerdict(
                        tenant_id=tenant_id,
                        blob=blob,
                        score=None,
                        action="",
                        reason="",
                        learned=cls,
                        created_at=datetime.now(UTC),
                    )
                )
                return True
            learned = set(filter(None, row.learned.split(",")))
            if cls in learned:
                return False
            row.learned = ",".join(sorted({*learned, cls}))
            return True

    async def _unclaim(self, tenant_id: str, blob: str, cls: str) -> None:
        async with self.db.write() as s:
            row = await s.get(SpamVerdict, (tenant_id, blob))
            if row is not None:
                row.learned = ",".join(sorted(set(filter(None, row.learned.split(","))) - {cls}))

    async def drain(self, grace: float = 10.0) -> None:
        """Wait for the learns in flight (at shutdown), up to ``grace`` seconds."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
