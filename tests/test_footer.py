"""Agent footers (issue #14): gateway.footer by tables and hypothesis, and through submission end to end.

The end-to-end tests run the in-process gateway of tests/test_relay.py (submission
listener, Outbox, relay worker) with a real SMTP client (smtplib) and the test
smarthost (aiosmtpd): what the smarthost receives and what \\Sent holds are checked.
"""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import html
import quopri
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import Config, parse_config
from gateway.footer import add_footer
from tests.conftest import config_dict
from tests.test_relay import HASH, relay_settings, reply_as, running, smarthost

pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")

FOOTER = "Anna Kowalska\nDział obsługi klienta - ACME\nhttps://acme.test"
ASCII = "Anna\nACME Support"
HEAD = b"From: Biuro <biuro@acme.test>\r\nTo: customer@example.org\r\nSubject: Re: order 17\r\n"
PDF = b"%PDF-1.4\r\n-- \r\nAnna\r\n</body>\r\n" + bytes(range(256)) * 4


def b64(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"".join(encoded[i : i + 76] + b"\r\n" for i in range(0, len(encoded), 76))


def part(ctype: bytes, body: bytes, *fields: bytes) -> bytes:
    return b"Content-Type: " + ctype + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body


def multipart(subtype: bytes, boundary: bytes, *parts: bytes) -> bytes:
    inner = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    return (
        b"Content-Type: multipart/" + subtype + b'; boundary="' + boundary + b'"\r\n\r\n'
        b"This is a multi-part message in MIME format.\r\n" + inner + b"--" + boundary + b"--\r\n"
    )


PLAIN_UTF8 = part(b"text/plain; charset=UTF-8; format=flowed", "Dzień dobry,\r\n\r\nwysłane.\r\n".encode(),
                  b"Content-Transfer-Encoding: 8bit")  # fmt: skip
HTML_QP = part(
    b"text/html; charset=UTF-8",
    b"<html><head><title>x</title></head><body>\r\n<p>Dzie=C5=84 dobry,</p>\r\n<p>wys=C5=82ane.</p>\r\n"
    b"</body>\r\n</html>\r\n",
    b"Content-Transfer-Encoding: quoted-printable",
)
ATTACHMENT = part(
    b'application/pdf; name="faktura.pdf"',
    b64(PDF),
    b'Content-Disposition: attachment; filename="faktura.pdf"',
    b"Content-Transfer-Encoding: base64",
)
ALTERNATIVE = multipart(b"alternative", b"------------alt4567", PLAIN_UTF8, HTML_QP)
THUNDERBIRD = (
    HEAD + b"Message-ID: <tb-1@acme.test>\r\nMIME-Version: 1.0\r\nUser-Agent: Mozilla Thunderbird\r\n"
    + multipart(b"mixed", b"------------mix0123", ALTERNATIVE, ATTACHMENT)
)  # fmt: skip
PLAIN = HEAD + b"Message-ID: <plain-1@acme.test>\r\n\r\nYour order ships today.\r\nx = 1\r\n"

SIG_PLAIN = "-- \r\nAnna Kowalska\r\nDział obsługi klienta - ACME\r\nhttps://acme.test\r\n".encode()
SIG_PLAIN_QP = b"--=20\r\nAnna Kowalska\r\nDzia=C5=82 obs=C5=82ugi klienta - ACME\r\nhttps://acme.test\r\n"
SIG_HTML = (
    '<div class="mailgate-footer">-- <br>\r\nAnna Kowalska<br>\r\nDział obsługi klienta - ACME<br>\r\n'
    "https://acme.test</div>\r\n"
).encode()
SIG_HTML_QP = quopri.encodestring(SIG_HTML.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")


# --------------------------------------------------------------------------- tables


@pytest.mark.parametrize(
    ("message", "footer", "expected"),
    [
        pytest.param(
            HEAD + b"\r\nHello\r\n",
            ASCII,
            HEAD + b"\r\nHello\r\n-- \r\nAnna\r\nACME Support\r\n",
            id="plain-ascii",
        ),
        pytest.param(
            HEAD + b"\r\nHello",
            ASCII,
            HEAD + b"\r\nHello\r\n-- \r\nAnna\r\nACME Support\r\n",
            id="plain-without-final-newline",
        ),
        pytest.param(HEAD + b"\r\n", ASCII, HEAD + b"\r\n-- \r\nAnna\r\nACME Support\r\n", id="empty-body"),
        pytest.param(
            HEAD + b"\r\nx = 1\r\n",
            FOOTER,
            HEAD
            + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
            b"MIME-Version: 1.0\r\n\r\nx =3D 1\r\n" + SIG_PLAIN_QP,
            id="non-ascii-footer-upgrades-a-7bit-us-ascii-message-to-utf-8-quoted-printable",
        ),
        pytest.param(
            HEAD + b'MIME-Version: 1.0\r\nContent-Type: text/plain;\r\n\tcharset="us-ascii"; format=fixed\r\n'
            b"Content-Transfer-Encoding: 7bit\r\n\r\nHello\r\n",
            FOOTER,
            HEAD + b"MIME-Version: 1.0\r\nContent-Type: text/plain;\r\n\tcharset=utf-8; format=fixed\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\nHello\r\n" + SIG_PLAIN_QP,
            id="folded-charset-replaced-in-place",
        ),
        pytest.param(
            HEAD + b"Content-Type: text/plain; charset=iso-8859-2\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            b"Dzie\xf1 dobry\r\n",
            "Łukasz",
            HEAD + b"Content-Type: text/plain; charset=iso-8859-2\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            b"Dzie\xf1 dobry\r\n-- \r\n\xa3ukasz\r\n",
            id="8bit-footer-in-the-parts-own-charset",
        ),
        pytest.param(
            HEAD
            + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
            b"\r\nA long line that is soft-broken by its encoder at the end of the body=\r\n",
            FOOTER,
            HEAD
            + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
            b"\r\nA long line that is soft-broken by its encoder at the end of the body=\r\n\r\n"
            + SIG_PLAIN_QP,
            id="quoted-printable-keeps-its-bytes-and-ends-the-soft-broken-line",
        ),
        pytest.param(
            HEAD
            + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + b64(b"Hello\r\n"),
            FOOTER,
            HEAD
            + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + b64(b"Hello\r\n" + SIG_PLAIN),
            id="base64-re-encoded",
        ),
        pytest.param(
            HEAD + b"Content-Type: text/plain; charset=utf-8; format=flowed\r\n\r\nHello\r\n",
            "From the desk of\n> Anna",
            HEAD + b"Content-Type: text/plain; charset=utf-8; format=flowed\r\n\r\nHello\r\n"
            b"-- \r\n From the desk of\r\n > Anna\r\n",
            id="flowed-space-stuffed",
        ),
        pytest.param(
            HEAD + b"Content-Type: text/html; charset=utf-8\r\n\r\n<html><BODY><p>Hi</p></BODY ></html>\r\n",
            "A & <B>\n",
            HEAD + b"Content-Type: text/html; charset=utf-8\r\n\r\n<html><BODY><p>Hi</p>"
            b'<div class="mailgate-footer">-- <br>\r\nA &amp; &lt;B&gt;</div>\r\n</BODY ></html>\r\n',
            id="html-escaped-before-body-end",
        ),
        pytest.param(
            HEAD + b"Content-Type: text/html\r\n\r\n<p>Hi</p>",
            ASCII,
            HEAD + b"Content-Type: text/html\r\n\r\n<p>Hi</p>\r\n"
            b'<div class="mailgate-footer">-- <br>\r\nAnna<br>\r\nACME Support</div>\r\n',
            id="html-without-body-end-at-the-end",
        ),
        pytest.param(
            THUNDERBIRD,
            FOOTER,
            THUNDERBIRD.replace(
                b"wys\xc5\x82ane.\r\n\r\n--", b"wys\xc5\x82ane.\r\n" + SIG_PLAIN + b"\r\n--"
            ).replace(b"</p>\r\n</body>", b"</p>\r\n" + SIG_HTML_QP + b"</body>"),
            id="thunderbird-both-alternatives-not-the-pdf",
        ),
        pytest.param(
            HEAD
            + multipart(
                b"mixed",
                b"b",
                part(b"text/plain", b"Hi\r\n"),
                part(b"image/png", b"iVBORw0KGgo=\r\n", b"Content-Transfer-Encoding: base64"),
                part(b"text/plain", b"more\r\n"),
            ),
            ASCII,
            HEAD
            + multipart(
                b"mixed",
                b"b",
                part(b"text/plain", b"Hi\r\n"),
                part(b"image/png", b"iVBORw0KGgo=\r\n", b"Content-Transfer-Encoding: base64"),
                part(b"text/plain", b"more\r\n-- \r\nAnna\r\nACME Support\r\n"),
            ),
            id="mixed-last-body-text-only",
        ),
        pytest.param(
            HEAD
            + multipart(
                b"related",
                b"r",
                part(b"text/html", b"<body>Hi</body>"),
                part(b"text/html", b"<body>resource</body>", b"Content-ID: <x@y>"),
            ),
            "A",
            HEAD
            + multipart(
                b"related",
                b"r",
                part(b"text/html", b'<body>Hi<div class="mailgate-footer">-- <br>\r\nA</div>\r\n</body>'),
                part(b"text/html", b"<body>resource</body>", b"Content-ID: <x@y>"),
            ),
            id="related-root-only",
        ),
    ],
)
def test_footer_is_spliced_into_the_body_text(message: bytes, footer: str, expected: bytes) -> None:
    assert add_footer(message, footer) == expected
    assert add_footer(expected, footer) == expected


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(HEAD + b"\r\nHello\r\n-- \r\nAnna\r\n  ACME   Support\r\n", id="client-added-it-plain"),
        pytest.param(
            HEAD + b"Content-Type: text/html\r\n\r\n<body><p>Hi</p><div class=moz-signature>-- <br>Anna<br>"
            b"<b>ACME</b> Support</div></body>",
            id="client-added-it-html",
        ),
        pytest.param(
            HEAD
            + b"Content-Type: text/plain\r\nContent-Disposition: attachment; filename=notes.txt\r\n\r\nx\r\n",
            id="text-attachment",
        ),
        pytest.param(HEAD + b"Content-Type: text/plain; name=notes.txt\r\n\r\nx\r\n", id="named-text-part"),
        pytest.param(HEAD + b"Content-Type: text/calendar\r\n\r\nBEGIN:VCALENDAR\r\n", id="other-text-type"),
        pytest.param(HEAD + b"Content-Type: message/rfc822\r\n\r\n" + PLAIN, id="forwarded-message"),
        pytest.param(
            HEAD
            + multipart(
                b"signed",
                b"s",
                part(b"text/plain", b"Hi\r\n"),
                part(b"application/pgp-signature", b"sig\r\n"),
            ),
            id="signed",
        ),
        pytest.param(
            HEAD + b"Content-Type: text/plain; charset=x-no-such\r\n\r\nx\r\n", id="unknown-charset"
        ),
        pytest.param(
            HEAD + b"Content-Type: text/plain; charset=base64\r\n\r\nx\r\n", id="not-a-text-charset"
        ),
        pytest.param(HEAD + b"Content-Transfer-Encoding: x-uuencode\r\n\r\nx\r\n", id="unknown-encoding"),
        pytest.param(
            HEAD + b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\nHi\r\n--x--\r\n", id="no-boundary"
        ),
        pytest.param(HEAD, id="no-body"),
    ],
)
def test_footer_is_not_added(message: bytes) -> None:
    assert add_footer(message, ASCII) == message


def test_a_quoted_footer_does_not_count_as_present() -> None:
    plain = HEAD + b"\r\nThanks!\r\n\r\n> -- \r\n> Anna\r\n> ACME Support\r\n"
    assert add_footer(plain, ASCII) == plain + b"-- \r\nAnna\r\nACME Support\r\n"
    quote = b"<blockquote>-- <br>Anna<br>ACME Support</blockquote>"
    html = HEAD + b"Content-Type: text/html\r\n\r\n<body>Thanks!" + quote + b"</body>"
    assert b"mailgate-footer" in add_footer(html, ASCII)


@pytest.mark.parametrize("footer", ["", "\n \n", "\x00\x01"])
def test_empty_footer_changes_nothing(footer: str) -> None:
    assert add_footer(THUNDERBIRD, footer) == THUNDERBIRD


def test_footer_in_utf_16_part_is_re_encoded_as_utf_8() -> None:
    body = b64("Cześć\r\n".encode("utf-16"))
    message = (
        HEAD + b"Content-Type: text/plain; charset=utf-16\r\nContent-Transfer-Encoding: base64\r\n\r\n" + body
    )
    out = add_footer(message, FOOTER)
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed.get_content_charset() == "utf-8"
    assert parsed["Content-Transfer-Encoding"] == "base64"
    assert parsed.get_content() == "Cześć\r\n" + SIG_PLAIN.decode()


# --------------------------------------------------------------------------- properties

CHARSETS = ["us-ascii", "utf-8", "iso-8859-2", "windows-1250", "koi8-r", "shift_jis", "iso-2022-jp", "utf-16"]
ODD_CHARSETS = ["utf-7", "punycode", "idna", "unicode_escape", "base64", "x-unknown"]
ENCODINGS = ["", "7bit", "8bit", "quoted-printable", "base64"]


def encode_body(text: str, charset: str, cte: str) -> bytes:
    data = text.encode(charset if charset in CHARSETS else "utf-8", "replace")
    if cte == "quoted-printable":
        return quopri.encodestring(data.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    if cte == "base64":
        return b64(data)
    return data


@st.composite
def leaves(draw: st.DrawFn) -> bytes:
    ctype = draw(st.sampled_from(["text/plain", "text/html", "application/octet-stream", "image/png"]))
    charset = draw(st.sampled_from(CHARSETS + ODD_CHARSETS))
    cte = draw(st.sampled_from(ENCODINGS))
    fields = [f"Content-Type: {ctype}; charset={charset}" + draw(st.sampled_from(["", "; format=flowed"]))]
    fields += [f"Content-Transfer-Encoding: {cte}"] if cte else []
    fields += draw(
        st.sampled_from([[], ["Content-Disposition: attachment; filename=a.txt"], ["Content-ID: <c>"]])
    )
    text = draw(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60))
    text = (
        draw(st.sampled_from(["", "<html><body>", "> "]))
        + text
        + draw(st.sampled_from(["", "</body>", "\r\n"]))
    )
    return "\r\n".join(fields).encode() + b"\r\n\r\n" + encode_body(text, charset, cte)


def entities() -> st.SearchStrategy[bytes]:
    return st.recursive(
        leaves(),
        lambda children: st.builds(
            lambda subtype, parts: multipart(subtype, b"b%d" % len(parts[0]), *parts),
            st.sampled_from([b"mixed", b"alternative", b"related", b"signed"]),
            st.lists(children, min_size=1, max_size=3),
        ),
        max_leaves=6,
    )


footers = st.text(max_size=40) | st.sampled_from([FOOTER, ASCII, "> quoted\n\nFrom me", "</body>", "-- "])


def walk(raw: bytes) -> list[email.message.Message]:
    return list(email.message_from_bytes(raw, policy=email.policy.compat32).walk())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entities(), footers)
def test_footer_keeps_the_structure_and_every_other_part_and_is_idempotent(
    entity: bytes, footer: str
) -> None:
    message = HEAD + b"MIME-Version: 1.0\r\n" + entity
    once = add_footer(message, footer)
    assert add_footer(once, footer) == once
    before, after = walk(message), walk(once)
    assert [p.get_content_type() for p in before] == [p.get_content_type() for p in after]
    key = [line.strip() for line in footer.splitlines() if line.strip()][:1]
    for old, new in zip(before, after, strict=True):
        if old.is_multipart():
            continue
        if old.get_content_type() not in ("text/plain", "text/html") or old.get_filename():
            assert new.as_bytes() == old.as_bytes()
        elif new.get_payload(decode=True) != old.get_payload(decode=True):
            text = new.get_payload(decode=True).decode(new.get_content_charset("us-ascii"), "replace")
            text = html.unescape(text) if new.get_content_type() == "text/html" else text
            assert "-- " in text
            assert all(k.split()[0] in text for k in key if k.isprintable() and k.split()[0].isascii())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), footers)
def test_footer_never_crashes_on_arbitrary_bytes_and_is_idempotent(data: bytes, footer: str) -> None:
    once = add_footer(data, footer)
    assert add_footer(once, footer) == once


HTML_TOKENS = [
    "<body>",
    "</body>",
    "<blockquote>",
    "</blockquote>",
    "<br>",
    "<!--",
    "-->",
    "<title>",
    "</title>",
    "<p>",
    "Anna",
    "ACME Support",
    "\r\n",
    "-- ",
    "&amp;",
    "<",
    ">",
    '<div class="mailgate-footer">',
]
markups = st.lists(st.sampled_from(HTML_TOKENS) | st.text(max_size=5), max_size=30).map("".join)


@settings(max_examples=300, deadline=None)
@given(markups, footers)
def test_footer_on_arbitrary_html_is_idempotent(markup: str, footer: str) -> None:
    message = HEAD + b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    once = add_footer(message + markup.encode("utf-8", "replace"), footer)
    assert add_footer(once, footer) == once


# --------------------------------------------------------------------------- through submission


def footer_config(tmp_path: Path, db_url: str, host: Any) -> Config:
    data = config_dict(tmp_path, db_url)
    data["tenants"][0]["smtp"] = relay_settings(host, tmp_path, username=None, password_env=None)
    data["tenants"][0]["agents"] = [
        {"login": "anna@acme.test", "password_hash": HASH, "footer": FOOTER},
        {"login": "piotr@acme.test", "password_hash": HASH},
    ]
    return parse_config(data)


def texts(raw: bytes) -> dict[str, str]:
    """The decoded text (LF line ends) of each text part of a message by type, attachments left out."""
    found = {}
    for p in email.message_from_bytes(raw, policy=email.policy.default).walk():
        if p.get_content_maintype() == "text" and not p.is_attachment():
            assert isinstance(p, email.message.EmailMessage)
            found[p.get_content_type()] = p.get_content().replace("\r\n", "\n")
    return found


async def test_submitted_replies_carry_the_agents_footer_once_in_each_text_part(
    tmp_path: Path, db_url: str
) -> None:
    async with smarthost("none", auth=False) as host, running(footer_config(tmp_path, db_url, host)) as g:
        for message in (THUNDERBIRD, PLAIN):
            assert (await reply_as(g, "anna@acme.test", message)).startswith("250 ")
        await g.relay()
        thunderbird, plain = sorted((r.data for r in host.received), key=len, reverse=True)
        assert await g.folder("Sent") == [thunderbird, plain]  # the very bytes that went out

        # Thunderbird's reply: the footer in both alternatives, the headers and the PDF as they were.
        assert thunderbird.split(b"\r\n\r\n", 1)[0] == THUNDERBIRD.split(b"\r\n\r\n", 1)[0]
        assert ATTACHMENT in thunderbird
        parsed = email.message_from_bytes(thunderbird, policy=email.policy.default)
        (pdf,) = parsed.iter_attachments()
        assert pdf.get_payload(decode=True) == PDF
        found = texts(thunderbird)
        assert found["text/plain"].endswith(
            "wysłane.\n-- \nAnna Kowalska\nDział obsługi klienta - ACME\nhttps://acme.test\n"
        )
        assert found["text/html"].count("Dział obsługi klienta - ACME") == 1
        assert "Anna Kowalska<br>" in found["text/html"].split("<body>")[1].split("</body>")[0]
        assert sum(t.count("Anna Kowalska") for t in found.values()) == 2

        # The plain one: 7bit US-ASCII becomes UTF-8 quoted-printable to carry the footer.
        assert plain.startswith(
            PLAIN.split(b"\r\n\r\n", 1)[0] + b"\r\nContent-Type: text/plain; charset=utf-8"
        )
        assert texts(plain) == {"text/plain": "Your order ships today.\nx = 1\n-- \n" + FOOTER + "\n"}

        # Submitted again with the footer already in it (a resend, or the client put it there): once.
        for message in (thunderbird, plain):
            assert (await reply_as(g, "anna@acme.test", message)).startswith("250 ")
        await g.relay()
        assert sorted(r.data for r in host.received[2:]) == sorted([thunderbird, plain])


async def test_agent_without_footer_sends_the_message_byte_exact(tmp_path: Path, db_url: str) -> None:
    async with smarthost("none", auth=False) as host, running(footer_config(tmp_path, db_url, host)) as g:
        assert (await reply_as(g, "piotr@acme.test", THUNDERBIRD)).startswith("250 ")
        await g.relay()
        assert [r.data for r in host.received] == [THUNDERBIRD]
