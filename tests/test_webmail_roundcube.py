"""A real webmail against mailgate (issue #12, "Done means 3"): Roundcube in a headless Chromium.

Debian's Roundcube (``php -S`` on 127.0.0.1 with its own SQLite database, see
tests/roundcube.py) is pointed at ``mailgate run``'s IMAP and submission
listeners; the tenant's smarthost is ``tests.smarthost``. Playwright drives
Debian's Chromium: the agent logs in, lists INBOX sorted by date, then in
thread mode, opens the message with a Polish subject and a PDF attachment,
moves another one to a folder (checked over IMAP) and replies; the smarthost
must receive the reply, and Sent hold it once. A screenshot of the message
list is kept: ``roundcube-list-<server>.png`` in the test's directory, copied
to ``$MAILGATE_ARTIFACTS`` when that is set.

The very same scenario runs against a private Dovecot, with Roundcube
submitting straight to the smarthost: a check of the test itself.

Roundcube runs with the repository's plugin ``mailgate_answering``
(webmail/roundcube/plugins): issue #19, "Done means 5". A colleague's draft
reply marks the customer's message ``$Answering``; the agent's message list
shows who is answering on that row (``roundcube-answering.png``, kept as
above), then, at the next refresh after the colleague's reply went out, who
answered instead; an internal note's row shows that it is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import os
import shutil
import smtplib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest
from argon2 import PasswordHasher

from tests.conftest import free_port, missing_peer, peer
from tests.daemon import Daemon
from tests.dovecot import Dovecot, quote_mailbox
from tests.roundcube import Roundcube, installed
from tests.smarthost import Smarthost

if TYPE_CHECKING:
    from playwright.async_api import Locator, Page

pytestmark = [
    pytest.mark.peers,
    pytest.mark.timeout(90),
    # The Dovecot run's smarthost requires AUTH without TLS on purpose; aiosmtpd warns about it.
    pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning"),
]

T = TypeVar("T")

AGENT = "anna@acme.test"
COLLEAGUE = "piotr@acme.test"  # the other agent of the shared inbox, named "Piotr"
PASSWORD = "agent-password"
HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)
CUSTOMER = "klient@example.org"
FOLDER = "Załatwione"
POLISH = "Faktura \N{EN DASH} zażółć gęślą jaźń"
ATTACHMENT = "faktura-żółć.pdf"
WAIT = 15.0  # seconds, for every wait in the browser and over IMAP


@dataclass(frozen=True)
class Seed:
    subject: str
    date: datetime
    msgid: str
    in_reply_to: str | None = None
    attachment: bool = False

    def raw(self) -> bytes:
        m = EmailMessage()
        m["From"] = f"Klient <{CUSTOMER}>"
        m["To"] = f"Anna <{AGENT}>"
        m["Subject"] = self.subject
        m["Date"] = format_datetime(self.date)
        m["Message-ID"] = self.msgid
        if self.in_reply_to:
            m["In-Reply-To"] = m["References"] = self.in_reply_to
        m.set_content(f"Treść: {self.subject}.\n")
        if self.attachment:
            pdf = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
            m.add_attachment(pdf, maintype="application", subtype="pdf", filename=ATTACHMENT)
        return m.as_bytes(policy=policy.SMTP)  # RFC 2047 subject, RFC 2231 file name, CRLF


def june(day: int) -> datetime:
    return datetime(2026, 6, day, 9, 0, tzinfo=UTC)


ORDER = Seed("Zamówienie 1001", june(2), "<order-1001@example.org>")
INVOICE = Seed(POLISH, june(1), "<invoice-7@example.org>", attachment=True)
NEWSLETTER = Seed("Newsletter czerwiec", datetime(2026, 5, 30, 9, tzinfo=UTC), "<news-6@example.org>")
REPLY_TO_ORDER = Seed(f"Re: {ORDER.subject}", june(3), "<order-1001-re@example.org>", ORDER.msgid)
QUESTION = Seed("Pytanie o dostawę", june(4), "<delivery-q@example.org>")
# APPENDed in this order, now: neither UIDs nor arrival times follow the Date headers.
SEEDS = [INVOICE, QUESTION, NEWSLETTER, ORDER, REPLY_TO_ORDER]
BY_DATE = [s.subject for s in sorted(SEEDS, key=lambda s: s.date, reverse=True)]
# Thread mode: the reply hides under its order (collapsed) and shows below it once expanded.
# The order's thread sorts between the question and the invoice both by its first message
# (THREAD=REFERENCES, mailgate) and by its last (THREAD=REFS, Dovecot).
THREADS = [s for s in BY_DATE if s != REPLY_TO_ORDER.subject]
_after_order = THREADS.index(ORDER.subject) + 1
EXPANDED = [*THREADS[:_after_order], REPLY_TO_ORDER.subject, *THREADS[_after_order:]]


# --------------------------------------------------------------------------- servers


@dataclass
class MailServer:
    """Where Roundcube's IMAP and SMTP go, and the smarthost that must receive the reply."""

    name: str
    imap_port: int
    smtp_port: int
    smarthost: Smarthost
    log: Callable[[], str]  # the server's log, for failure messages


def imap(port: int, login: str = AGENT) -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    client.login(login, PASSWORD)
    return client


def seed(port: int) -> None:
    """The folders Roundcube uses (created and subscribed), and INBOX's messages APPENDed."""
    with imap(port) as c:
        for folder in ("Sent", "Drafts", "Trash", FOLDER):
            typ, data = c.create(quote_mailbox(folder))
            assert typ == "OK" or b"ALREADYEXISTS" in data[0], data
            assert c.subscribe(quote_mailbox(folder))[0] == "OK"
        for s in SEEDS:
            typ, data = c.append("INBOX", "", None, s.raw())
            assert typ == "OK", data


def subjects(port: int, folder: str, criteria: str = "ALL") -> list[str]:
    """The (decoded) subjects of the folder's messages matching a SEARCH, in UID order."""
    with imap(port) as c:
        assert c.select(quote_mailbox(folder), readonly=True)[0] == "OK"
        _, found = c.uid("SEARCH", criteria)
        uids = b",".join(found[0].split()).decode()
        if not uids:
            return []
        _, data = c.uid("FETCH", uids, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    heads = [message_from_bytes(d[1], policy=policy.default) for d in data if isinstance(d, tuple)]
    return [str(h["Subject"]) for h in heads]


@contextlib.contextmanager
def mailgate(tmp_path: Path, smarthost: Smarthost) -> Iterator[MailServer]:
    imap_port, submission = free_port(), free_port()
    config = tmp_path / "mailgate.toml"
    config.write_text(
        f"""
[gateway]
hostname = "mx.test"
data_dir = "{tmp_path / "var"}"

[listen]
smtp = ""
submission = "127.0.0.1:{submission}"
imap = "127.0.0.1:{imap_port}"

[queue]
retry = ["1s"]

[[tenants]]
id = "acme"
domains = ["acme.test"]

[tenants.smtp]
host = "127.0.0.1"
port = {smarthost.port}
security = "none"
from = "biuro@acme.test"

[[tenants.agents]]
login = "{AGENT}"
name = "Anna"
password_hash = "{HASH}"

[[tenants.agents]]
login = "{COLLEAGUE}"
name = "Piotr"
password_hash = "{HASH}"
""",
        encoding="utf-8",
    )
    d = Daemon(config, submission, tmp_path, also=(imap_port,))
    d.start()
    try:
        yield MailServer("mailgate", imap_port, submission, smarthost, lambda: d.log.read_text()[-4000:])
    finally:
        d.stop()


@contextlib.contextmanager
def dovecot(smarthost: Smarthost) -> Iterator[MailServer]:
    with Dovecot() as server:
        server.add_user(AGENT, PASSWORD)
        yield MailServer("dovecot", server.port, smarthost.port, smarthost, lambda: server.log()[-4000:])


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium, once Playwright, PHP and Roundcube are there too; else skip (or fail)."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        missing_peer("playwright is not installed (it is in the test extras: pip install -e '.[test]')")
    installed()
    return peer("chromium")


@pytest.fixture(params=["mailgate", "dovecot"])
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MailServer]:
    """mailgate relaying to the smarthost, or Dovecot with Roundcube submitting to the smarthost."""
    if request.param == "mailgate":
        smarthost = await Smarthost().start()
        running = mailgate(tmp_path, smarthost)
    else:  # Roundcube authenticates as the agent wherever it submits
        smarthost = await Smarthost(username=AGENT, password=PASSWORD).start()
        running = dovecot(smarthost)
    try:
        with running as s:
            await asyncio.to_thread(seed, s.imap_port)
            yield s
    finally:
        await smarthost.stop()


# --------------------------------------------------------------------------- the browser


async def until(what: str, check: Callable[[], Awaitable[T]], seconds: float = WAIT) -> T:
    """Await ``check()`` until it returns something true; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    last = await check()
    while not last:
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {seconds}s (last: {last!r})")
        await asyncio.sleep(0.1)
        last = await check()
    return last


def save_artifact(path: Path) -> None:
    print(f"screenshot of the message list: {path}")
    target = os.environ.get("MAILGATE_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        print(f"copied to {shutil.copy(path, target)}")


async def login(page: Page, url: str) -> None:
    """Log in as the agent: INBOX's message list shown."""
    await page.goto(url)
    await page.fill("#rcmloginuser", AGENT)
    await page.fill("#rcmloginpwd", PASSWORD)
    await page.click("#rcmloginsubmit")
    await page.wait_for_selector("#messagelist tbody tr")


@contextlib.asynccontextmanager
async def webmail(chromium: str, s: MailServer, tmp_path: Path) -> AsyncIterator[tuple[Page, str]]:
    """Roundcube pointed at the server, and a Chromium page: the page and Roundcube's address.
    No page may raise a JavaScript error; a failure shows Roundcube's logs and the server's."""
    from playwright.async_api import async_playwright  # the chromium fixture made sure it is there

    rc = Roundcube(tmp_path / "roundcube", s.imap_port, s.smtp_port).start()
    errors: list[str] = []  # uncaught JavaScript errors: Roundcube's or the plugin's
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium)
            try:
                page = await browser.new_page(viewport={"width": 1400, "height": 900}, locale="en-US")
                page.set_default_timeout(WAIT * 1000)
                page.on("pageerror", lambda error: errors.append(str(error)))
                yield page, rc.url
                assert errors == [], errors
            finally:
                await browser.close()
    except BaseException as exc:
        exc.add_note(f"--- JavaScript errors: {errors}\n--- Roundcube's logs\n{rc.logs()}")
        exc.add_note(f"--- {s.name}'s log\n{s.log()}")
        raise
    finally:
        rc.stop()


async def scenario(page: Page, url: str, s: MailServer, shot: Path) -> None:
    async def listed() -> list[str]:
        """Subjects of the message list's visible rows, top to bottom."""
        return await page.locator("#messagelist tbody tr:visible td.subject span.subject a").all_inner_texts()

    def lists(expected: list[str]) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return await listed() == expected

        return check

    def row(subject: str) -> Locator:
        return page.locator("#messagelist tbody tr", has_text=subject).first

    async def list_options(mode: str) -> None:
        """The list options dialog: sorted by (sent) date, newest first, as a list or in threads."""
        await page.click("#listmenulink")
        dialog = page.locator(".ui-dialog:visible")
        await dialog.locator("select[name=sort_col]").select_option("date")
        await dialog.locator("select[name=sort_ord]").select_option("DESC")
        await dialog.locator("select[name=mode]").select_option(mode)
        await dialog.locator(".ui-dialog-buttonpane button.mainaction").click()
        threads = "true" if mode == "threads" else "false"
        await page.wait_for_function(
            f"rcmail.env.sort_col == 'date' && rcmail.env.sort_order == 'DESC'"
            f" && !!rcmail.env.threading == {threads} && !rcmail.busy"
        )

    await login(page, url)

    # INBOX sorted by date, then in thread mode; the collapsed thread expanded.
    await list_options("list")
    await until("INBOX sorted by date", lists(BY_DATE))
    await list_options("threads")
    await until("INBOX in threads", lists(THREADS))
    thread = page.locator("#messagelist tbody tr.thread", has_text=ORDER.subject)
    await thread.locator("div[id^=rcmexpando].collapsed").click()
    await until("the thread expanded", lists(EXPANDED))
    await page.screenshot(path=str(shot), full_page=True)
    save_artifact(shot)

    # Open the message with the Polish subject: subject and attachment name shown.
    await row(POLISH).click()
    preview = page.frame_locator("#messagecontframe")
    await preview.locator("h2.subject").filter(has_text=POLISH).wait_for()
    await preview.locator("#attachment-list").filter(has_text=ATTACHMENT).wait_for()

    # Move the newsletter to the folder: More > Move to... (once its preview is in: the preview's
    # loading closes open menus).
    await row(NEWSLETTER.subject).click()
    await preview.locator("h2.subject").filter(has_text=NEWSLETTER.subject).wait_for()
    await page.click("#messagemenulink")
    await page.locator("#message-menu a.move.active").click()
    await page.locator("#folder-selector li a", has_text=FOLDER).first.click()
    await until("the moved row gone", lists([x for x in EXPANDED if x != NEWSLETTER.subject]))
    await page.wait_for_function("!rcmail.busy")  # the row goes before the server is asked

    async def moved() -> bool:
        there = await asyncio.to_thread(subjects, s.imap_port, FOLDER)
        inbox = await asyncio.to_thread(subjects, s.imap_port, "INBOX")
        return there == [NEWSLETTER.subject] and NEWSLETTER.subject not in inbox

    await until(f"the newsletter in {FOLDER} over IMAP", moved)

    # Reply to the Polish message and send it.
    await row(POLISH).click()
    await preview.locator("h2.subject").filter(has_text=POLISH).wait_for()
    await page.locator("#toolbar-menu a.reply").click()
    body = page.locator("#composebody")
    await body.press("Control+Home")
    await body.press_sequentially("Dziękujemy, zapłacimy jutro.\n")
    await page.locator("button.send").click()
    await page.wait_for_url(lambda u: "_action=compose" not in u)

    async def received() -> int:
        return len(s.smarthost.received)

    await until("the reply at the smarthost", received)
    (reply,) = s.smarthost.received
    sent = message_from_bytes(reply.data, policy=policy.default)
    assert reply.rcpts == [CUSTOMER]
    assert str(sent["Subject"]) == f"Re: {POLISH}"
    assert sent["In-Reply-To"] == INVOICE.msgid
    text = sent.get_body(("plain",))
    assert text is not None
    assert "zapłacimy jutro" in text.get_content()

    # Sent holds the reply once (mailgate files its own copy and folds Roundcube's into it),
    # and the invoice is \Answered.
    async def filed() -> bool:
        sent = await asyncio.to_thread(subjects, s.imap_port, "Sent")
        answered = await asyncio.to_thread(subjects, s.imap_port, "INBOX", "ANSWERED")
        return sent == [f"Re: {POLISH}"] and answered == [POLISH]

    await until("the reply in Sent and the invoice answered", filed)


async def test_roundcube_agent_scenario(chromium: str, server: MailServer, tmp_path: Path) -> None:
    async with webmail(chromium, server, tmp_path) as (page, url):
        await scenario(page, url, server, tmp_path / f"roundcube-list-{server.name}.png")


# --------------------------------------------------------------------------- who is answering

DRAFT_TO_QUESTION = Seed(f"Re: {QUESTION.subject}", june(5), "<draft-piotr@acme.test>", QUESTION.msgid)
NOTE_ON_ORDER = Seed(f"Re: {ORDER.subject}", june(5), "<note-piotr@acme.test>", ORDER.msgid)


def written_by_colleague(seed: Seed, to: str) -> bytes:
    m = message_from_bytes(seed.raw(), policy=policy.SMTP)
    m.replace_header("From", f"Piotr <{COLLEAGUE}>")
    m.replace_header("To", to)
    return m.as_bytes(policy=policy.SMTP)


def save_draft(port: int) -> None:
    """The colleague's client saves a draft reply to the customer's question (APPEND to Drafts)."""
    with imap(port, COLLEAGUE) as c:
        typ, data = c.append("Drafts", "", None, written_by_colleague(DRAFT_TO_QUESTION, CUSTOMER))
        assert typ == "OK", data


def send_as_colleague(port: int, to: str, seed: Seed) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.login(COLLEAGUE, PASSWORD)
        c.sendmail(COLLEAGUE, [to], written_by_colleague(seed, to))


def question_flags(port: int) -> str:
    with imap(port) as c:
        assert c.select("INBOX", readonly=True)[0] == "OK"
        _, found = c.uid("SEARCH", "HEADER", "Message-ID", QUESTION.msgid)
        _, data = c.uid("FETCH", found[0].split()[0].decode(), "(FLAGS)")
    return str(data[0])


async def test_roundcube_shows_who_is_answering(chromium: str, tmp_path: Path) -> None:
    smarthost = await Smarthost().start()
    try:
        with mailgate(tmp_path, smarthost) as s:
            await asyncio.to_thread(seed, s.imap_port)
            await asyncio.to_thread(save_draft, s.imap_port)
            await asyncio.to_thread(send_as_colleague, s.smtp_port, "notes@acme.test", NOTE_ON_ORDER)

            async def marked() -> bool:
                return "$AnsweringPiotr" in await asyncio.to_thread(question_flags, s.imap_port)

            await until("the question marked $AnsweringPiotr over IMAP", marked)
            async with webmail(chromium, s, tmp_path) as (page, url):
                await answering_marks(page, url, s, tmp_path / "roundcube-answering.png")
    finally:
        await smarthost.stop()


async def answering_marks(page: Page, url: str, s: MailServer, shot: Path) -> None:
    await login(page, url)
    question = page.locator("#messagelist tbody tr", has_text=QUESTION.subject).first
    answering = question.locator(".mailgate-answering-mark")
    await answering.wait_for()
    assert await answering.get_attribute("title") == "Being answered by Piotr (a draft reply is saved)"
    assert await answering.inner_text() == "Piotr"
    assert "mailgate-answering" in (await question.get_attribute("class") or "").split()
    assert await page.locator("#messagelist tr.mailgate-answering").count() == 1  # that row only
    note = page.locator("#messagelist tbody tr", has_text=f"[Note] {NOTE_ON_ORDER.subject}").first
    assert await note.locator(".mailgate-note-mark").get_attribute("title") == (
        "Internal note: the customer never sees it"
    )
    await page.screenshot(path=str(shot), full_page=True)
    save_artifact(shot)

    # The colleague sends the reply: at the next refresh, the row says who answered instead.
    await asyncio.to_thread(send_as_colleague, s.smtp_port, CUSTOMER, DRAFT_TO_QUESTION)

    async def answered() -> bool:
        flags = await asyncio.to_thread(question_flags, s.imap_port)
        return "$AnsweredByPiotr" in flags and "$Answering" not in flags

    await until("the question answered by Piotr over IMAP", answered)
    await page.evaluate("rcmail.command('checkmail')")
    answered_by = question.locator(".mailgate-answeredby-mark")
    await answered_by.wait_for()
    assert await answered_by.get_attribute("title") == "Answered by Piotr"
    assert await page.locator("#messagelist .mailgate-answering-mark").count() == 0
    assert "mailgate-answering" not in (await question.get_attribute("class") or "").split()
    received = [m.rcpts for m in s.smarthost.received]
    assert received == [[CUSTOMER]], received  # the reply went out; the note did not
