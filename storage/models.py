"""SQLAlchemy models: the IMAP-shaped storage schema (DESIGN.md section 5).

Usage counters live on ``tenants`` and ``folders`` and are changed in the same
transaction as the messages they count, so a quota check is one row read.
``tenants.used_bytes`` excludes the ``\\Junk`` folder by construction.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so migrations can name what they alter.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY, so big ids are plain
# INTEGER there and BIGINT elsewhere.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every engine (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: storage takes timezone-aware datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime()}  # noqa: RUF012 (SQLAlchemy's own idiom)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    quota_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # The last UIDVALIDITY handed to one of this tenant's folders: a folder
    # deleted and created again always gets a new, larger one.
    last_uidvalidity: Mapped[int] = mapped_column(BigInteger, default=0)
    # Bytes and messages stored in every folder but the \Junk one.
    used_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    used_messages: Mapped[int] = mapped_column(BigInteger, default=0)
    # The tenant's definition (JSON: the keys of a [[tenants]] table), its agents,
    # rules and mailboxes included; the rows above and in domains/agents/folders follow it.
    spec: Mapped[str | None] = mapped_column(Text)
    # The plan lifecycle's steps, when the scheduler took them (gateway.lifecycle).
    noticed_at: Mapped[datetime | None] = mapped_column()
    read_only_at: Mapped[datetime | None] = mapped_column()
    renewed_at: Mapped[datetime | None] = mapped_column()


class Plan(Base):
    """A plan's definition (JSON: the keys of a [plans.NAME] table)."""

    __tablename__ = "plans"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    spec: Mapped[str] = mapped_column(Text)


class CatalogGeneration(Base):
    """One row: bumped by every change of a tenant or plan, so each instance notices it by polling."""

    __tablename__ = "catalog_generation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger, default=0)


class Domain(Base):
    __tablename__ = "domains"

    name: Mapped[str] = mapped_column(String(253), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    login: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    password_hash: Mapped[str] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Folder(Base):
    __tablename__ = "folders"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    special_use: Mapped[str | None] = mapped_column(String(16))
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    uidnext: Mapped[int] = mapped_column(BigInteger, default=1)
    highestmodseq: Mapped[int] = mapped_column(BigInteger, default=1)
    quota_bytes: Mapped[int | None] = mapped_column(BigInteger)
    used_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    used_messages: Mapped[int] = mapped_column(BigInteger, default=0)
    subscribed: Mapped[bool] = mapped_column(Boolean, default=True)
    # The first UID no IMAP session has taken \Recent for (RFC 3501 2.3.2).
    recent_uid: Mapped[int] = mapped_column(BigInteger, default=1, server_default="1")
    # The highest MODSEQ of the expunge history pruned (storage.mailstore.prune_expunges): every
    # expunge above it is still in ``expunges`` (IMAP QRESYNC answers VANISHED from there).
    expunges_pruned: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("folder_id", "uid"),
        Index("ix_messages_folder_id_modseq", "folder_id", "modseq"),
        Index("ix_messages_tenant_id_message_id", "tenant_id", "message_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    folder_id: Mapped[int] = mapped_column(ForeignKey("folders.id", ondelete="CASCADE"))
    uid: Mapped[int] = mapped_column(BigInteger)
    modseq: Mapped[int] = mapped_column(BigInteger)
    # IMAP system flags as bits (see storage.flags) and keywords space-separated,
    # so that SEARCH can test flags in SQL.
    sysflags: Mapped[int] = mapped_column(Integer, default=0)
    keywords: Mapped[str] = mapped_column(Text, default="")
    size: Mapped[int] = mapped_column(BigInteger)
    internal_date: Mapped[datetime] = mapped_column()
    received_at: Mapped[datetime] = mapped_column(index=True)
    blob: Mapped[str] = mapped_column(String(64), index=True)
    message_id: Mapped[str | None] = mapped_column(Text)
    in_reply_to: Mapped[str | None] = mapped_column(Text)
    references: Mapped[str | None] = mapped_column(Text)
    subject: Mapped[str] = mapped_column(Text, default="")
    from_addr: Mapped[str] = mapped_column(Text, default="")
    to_addr: Mapped[str] = mapped_column(Text, default="")
    sent_date: Mapped[datetime | None] = mapped_column()
    # IMAP ENVELOPE, BODYSTRUCTURE and BODY in wire form, computed once at delivery.
    envelope: Mapped[bytes | None] = mapped_column(LargeBinary)
    bodystructure: Mapped[bytes | None] = mapped_column(LargeBinary)
    body: Mapped[bytes | None] = mapped_column(LargeBinary)
    # IMAP SORT keys (gateway.imap.sort.keys), i;unicode-casemap'd, computed once at delivery;
    # NULL on rows stored before migration 0010 until a SORT fills them in.
    sort_subject: Mapped[str | None] = mapped_column(Text)
    sort_from: Mapped[str | None] = mapped_column(Text)
    sort_to: Mapped[str | None] = mapped_column(Text)
    sort_cc: Mapped[str | None] = mapped_column(Text)
    sort_display_from: Mapped[str | None] = mapped_column(Text)
    sort_display_to: Mapped[str | None] = mapped_column(Text)
    # The agent whose submission this is mailgate's \\Sent copy of (its client's own copy is folded into it).
    submitted_by: Mapped[int | None] = mapped_column(ForeignKey("agents.id", ondelete="SET NULL"))


class Expunge(Base):
    """UIDs removed from a folder, with the MODSEQ and time of their removal (for IMAP resync),
    kept for ``storage.mailstore.EXPUNGE_HISTORY``."""

    __tablename__ = "expunges"
    __table_args__ = (
        Index("ix_expunges_folder_id_modseq", "folder_id", "modseq"),
        Index("ix_expunges_expunged_at", "expunged_at"),
    )

    folder_id: Mapped[int] = mapped_column(ForeignKey("folders.id", ondelete="CASCADE"), primary_key=True)
    uid: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    modseq: Mapped[int] = mapped_column(BigInteger)
    expunged_at: Mapped[datetime] = mapped_column(server_default=func.current_timestamp())


class IngestKey(Base):
    """Dedupe keys of ingested messages: a retried delivery never makes a duplicate."""

    __tablename__ = "ingest_keys"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    created_at: Mapped[datetime] = mapped_column()


class Event(Base):
    """Agent activity: ``read`` (first per agent and message), ``answered``, ``collision``."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_tenant_id_agent_id_kind", "tenant_id", "agent_id", "kind"),
        # A message counts as read once per agent, however often it is opened.
        Index(
            "uq_events_read",
            "agent_id",
            "message_id",
            unique=True,
            sqlite_where=text("kind = 'read'"),
            postgresql_where=text("kind = 'read'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"))
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column()
    # Seconds from the customer message's arrival to the answer, for ``answered``.
    response_seconds: Mapped[float | None]


class Outbound(Base):
    """A message waiting in the relay queue."""

    __tablename__ = "outbound"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # The message's one public identifier (SMTP reply, queue commands, logs, DSN); never reused.
    queue_id: Mapped[str | None] = mapped_column(String(32), unique=True)
    message_id: Mapped[str | None] = mapped_column(Text)  # its Message-ID header, for logs
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    agent_id: Mapped[int | None] = mapped_column(ForeignKey("agents.id", ondelete="SET NULL"))
    mail_from: Mapped[str] = mapped_column(Text)
    blob: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column()
    next_attempt_at: Mapped[datetime] = mapped_column(index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    # The customer message this answers (for collision detection), if any.
    original_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL"), index=True
    )
    delay_notified: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The instance attempting it now, and until when its claim holds: a
    # message is attempted by one instance at a time, and a claim left by a
    # dead instance expires.
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    claimed_until: Mapped[datetime | None] = mapped_column()
    # Set by the holder just before it sends the end of DATA, cleared when it records the
    # server's answer: still set once the claim is gone, the server may have the message, and
    # only the operator may send it again (``mailgate queue retry``) or drop it.
    ended_at: Mapped[datetime | None] = mapped_column()


class OutboundRecipient(Base):
    """Per-recipient state of a queued message: ``pending``, ``sent`` or ``failed``."""

    __tablename__ = "outbound_recipients"

    outbound_id: Mapped[int] = mapped_column(ForeignKey("outbound.id", ondelete="CASCADE"), primary_key=True)
    address: Mapped[str] = mapped_column(String(320), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    last_reply: Mapped[str | None] = mapped_column(Text)


class UpstreamMailbox(Base):
    """Health of an upstream IMAP account we pull from (``mailgate mailboxes``)."""

    __tablename__ = "upstream_mailboxes"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    state: Mapped[str] = mapped_column(String(32), default="new")
    last_success_at: Mapped[datetime | None] = mapped_column()
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None] = mapped_column()
    messages_pulled: Mapped[int] = mapped_column(BigInteger, default=0)
    # When the puller tries again after a failure (None: not backing off).
    next_attempt_at: Mapped[datetime | None] = mapped_column()


class UpstreamFolder(Base):
    """How far a folder of an upstream mailbox has been pulled.

    Changed in the same transaction as the messages it covers, so after a
    crash the next pass starts exactly after the last stored message.
    """

    __tablename__ = "upstream_folders"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(255), primary_key=True)
    folder: Mapped[str] = mapped_column(String(255), primary_key=True)
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)


class QuotaNotice(Base):
    """The warning level last reported for a quota root (``folder`` "" is the tenant)."""

    __tablename__ = "quota_notices"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    folder: Mapped[str] = mapped_column(String(255), primary_key=True)
    level: Mapped[int] = mapped_column(Integer, default=0)
    notified_at: Mapped[datetime] = mapped_column()


class Heartbeat(Base):
    """One row the readiness probe rewrites: proof that the database takes writes."""

    __tablename__ = "heartbeat"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column()


class Instance(Base):
    """A mailgate process using this database: who it is and that it lives."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column()
    heartbeat_at: Mapped[datetime] = mapped_column()


class OutboundLog(Base):
    """The history of an outgoing message (``mailgate queue show``), kept after it leaves the queue.

    Its ``queued`` rows also count a tenant's messages per month (a plan's ``max_outbound_per_month``).
    """

    __tablename__ = "outbound_log"
    __table_args__ = (Index("ix_outbound_log_tenant_id_event_at", "tenant_id", "event", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    queue_id: Mapped[str] = mapped_column(String(32), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column()
    # queued, attempt, sent, deferred, failed, retry, dropped, expired, notified
    event: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int | None] = mapped_column(Integer)
    recipient: Mapped[str | None] = mapped_column(String(320))
    smarthost: Mapped[str | None] = mapped_column(String(255))
    reply: Mapped[str | None] = mapped_column(Text)


class UpstreamWaiting(Base):
    """An upstream message that did not fit the quota: left upstream, pulled when there is room.

    Kept beside the folder's ``last_uid`` (which may pass it), so each
    message is still stored exactly once.
    """

    __tablename__ = "upstream_waiting"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(255), primary_key=True)
    folder: Mapped[str] = mapped_column(String(255), primary_key=True)
    uid: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    size: Mapped[int] = mapped_column(BigInteger)
    since: Mapped[datetime] = mapped_column()


class QuotaDeferral(Base):
    """Mail waiting because a tenant is full, per source (``smtp``, ``imap``): for notice and gauge."""

    __tablename__ = "quota_deferrals"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    source: Mapped[str] = mapped_column(String(16), primary_key=True)
    messages: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    since: Mapped[datetime] = mapped_column()
    last_at: Mapped[datetime] = mapped_column()


class Blob(Base):
    """A blob stored in the database (``[blobs] backend = "postgresql"``); its bytes are in chunks."""

    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256, hex
    size: Mapped[int] = mapped_column(BigInteger)
    chunks: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column()
    touched_at: Mapped[datetime] = mapped_column()  # last written or reused: garbage collection's grace


class BlobChunk(Base):
    """Piece ``n`` (from 0) of a blob, at most ``storage.blobs.CHUNK`` bytes."""

    __tablename__ = "blob_chunks"

    digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest", ondelete="CASCADE"), primary_key=True)
    n: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class BlobLocation(Base):
    """Where ``mailgate blobs migrate`` put the blobs (one row, none before the first move).

    ``previous`` is the backend they came from while it still holds copies to delete.
    """

    __tablename__ = "blob_location"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    backend: Mapped[str] = mapped_column(String(16))
    previous: Mapped[str | None] = mapped_column(String(16))
    switched_at: Mapped[datetime] = mapped_column()


class UpstreamLease(Base):
    """Which instance pulls an upstream folder, until when (``storage.leases``).

    Exactly one holder at a time: every change is one conditional statement
    (compare-and-set on holder and expiry); the storing transaction of a pull
    checks that its instance still holds the folder's lease.
    """

    __tablename__ = "upstream_leases"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(255), primary_key=True)
    folder: Mapped[str] = mapped_column(String(255), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255), index=True)  # an instance id
    acquired_at: Mapped[datetime] = mapped_column()  # when this holder took it
    expires_at: Mapped[datetime] = mapped_column()  # renewed well before; another may take it after


class JobRun(Base):
    """One run of a cluster-wide periodic job for one period (storage.jobs)."""

    __tablename__ = "job_runs"

    job: Mapped[str] = mapped_column(String(32), primary_key=True)
    period: Mapped[str] = mapped_column(String(32), primary_key=True)
    instance: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class SpamVerdict(Base):
    """Why a stored message is (or is not) spam: the filter's score and action, or the reason
    (an upstream header, a rule, the source's Junk folder); and what agents' moves taught the filter.

    Keyed by the message's content (its blob), so a copy or a move shares the row: a message is
    learned at most once per class.
    """

    __tablename__ = "spam_verdicts"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    blob: Mapped[str] = mapped_column(String(64), primary_key=True)
    score: Mapped[float | None] = mapped_column(Float)  # None: not scanned by the filter
    action: Mapped[str] = mapped_column(String(32))  # rspamd's action, "unscanned", or "" (no filter)
    reason: Mapped[str] = mapped_column(String(255))  # why it went to Junk; "" when it did not
    learned: Mapped[str] = mapped_column(String(16), default="")  # "spam" / "ham": last class taught
    created_at: Mapped[datetime] = mapped_column()


class AnsweringMark(Base):
    """An agent's saved draft replying to a customer message (gateway.answering): while it lasts, the
    message carries ``$Answering`` and the agent's ``$Answering<Name>`` keywords.

    The draft is named by folder and UID (never reused), not by a foreign key: a row whose draft
    was expunged is found by the sweep, which then takes the marks off.
    """

    __tablename__ = "answering_marks"
    __table_args__ = (
        Index("ix_answering_marks_tenant_id_target", "tenant_id", "target"),
        Index("ix_answering_marks_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"))
    target: Mapped[str] = mapped_column(Text)  # the customer message's Message-ID
    draft_folder_id: Mapped[int] = mapped_column(ForeignKey("folders.id", ondelete="CASCADE"))
    draft_uid: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column()
