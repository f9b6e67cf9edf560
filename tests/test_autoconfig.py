"""Client autoconfiguration (issue #14): Thunderbird's config-v1.1.xml and Outlook's POX autodiscover.

Both answers are parsed back with ElementTree and checked against what their
formats require and what the configuration says (host, ports, security), with
and without TLS. The autodiscover request parser is fed hostile bodies.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.admin.autoconfig import (
    MAX_REQUEST,
    OUTLOOK_NS,
    RESPONSE_NS,
    autodiscover,
    request_address,
    thunderbird,
)
from gateway.config import Config, parse_config

REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
TLS = {"cert_file": "/etc/mailgate/cert.pem", "key_file": "/etc/mailgate/key.pem"}  # never read here
ALL = {"imap": "0.0.0.0:143", "imaps": "0.0.0.0:993", "submission": "[::]:587", "submissions": "[::]:465"}
PLAIN = {"imap": "127.0.0.1:2143", "submission": "127.0.0.1:2587"}


def make_config(listen: dict[str, str], tls: bool, hostname: str = "mail.example.net") -> Config:
    data: dict[str, Any] = {
        "gateway": {"hostname": hostname},
        "listen": listen,
        "tenants": [
            {"id": "acme", "name": "ACME Secret Name", "domains": ["acme.test", "acme-other.test"]},
            {"id": "beta", "domains": ["beta.test"], "addresses": ["only@beta.test"]},
        ],
    }
    if tls:
        data["tls"] = TLS
    return parse_config(data)


def request_body(address: str, ns: str = REQUEST_NS) -> bytes:
    root = ET.Element("Autodiscover", xmlns=ns)
    request = ET.SubElement(root, "Request")
    ET.SubElement(request, "EMailAddress").text = address
    ET.SubElement(request, "AcceptableResponseSchema").text = OUTLOOK_NS
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def parse(data: bytes) -> ET.Element:
    """Our own answers, or a test's literal: trusted input."""
    return ET.fromstring(data)  # noqa: S314


def text(element: ET.Element, path: str, ns: dict[str, str] | None = None) -> str | None:
    found = element.find(path, ns)
    assert found is not None, f"{path} missing"
    return found.text


# (listen, tls) -> (IMAP port, socketType), (submission port, socketType)
CASES = [
    pytest.param(ALL, True, (993, "SSL"), (465, "SSL"), id="implicit-tls-preferred"),
    pytest.param(PLAIN, True, (2143, "STARTTLS"), (2587, "STARTTLS"), id="starttls"),
    pytest.param(PLAIN, False, (2143, "plain"), (2587, "plain"), id="no-tls"),
    pytest.param(
        {"imaps": "0.0.0.0:993", "submission": "0.0.0.0:587"},
        True,
        (993, "SSL"),
        (587, "STARTTLS"),
        id="mixed",
    ),
]


# --------------------------------------------------------------------------- Thunderbird


@pytest.mark.parametrize(("listen", "tls", "imap", "smtp"), CASES)
def test_thunderbird_names_the_configured_host_ports_and_security(
    listen: dict[str, str], tls: bool, imap: tuple[int, str], smtp: tuple[int, str]
) -> None:
    answer = thunderbird(make_config(listen, tls), "Anna@ACME.test")
    assert answer is not None
    root = parse(answer)
    assert root.tag == "clientConfig"
    assert root.get("version") == "1.1"
    providers = root.findall("emailProvider")
    assert len(providers) == 1
    provider = providers[0]
    assert provider.get("id") == "acme.test"
    assert [d.text for d in provider.findall("domain")] == ["acme.test"]
    assert text(provider, "displayName") == "acme.test"
    incoming = provider.findall("incomingServer")
    outgoing = provider.findall("outgoingServer")
    assert [s.get("type") for s in incoming] == ["imap"]
    assert [s.get("type") for s in outgoing] == ["smtp"]
    for server, (port, socket_type) in ((incoming[0], imap), (outgoing[0], smtp)):
        assert text(server, "hostname") == "mail.example.net"
        assert text(server, "port") == str(port)
        assert text(server, "socketType") == socket_type
        assert text(server, "username") == "%EMAILADDRESS%"
        assert text(server, "authentication") == "password-cleartext"


def test_thunderbird_answers_every_domain_of_a_tenant_naming_only_the_asked_one() -> None:
    config = make_config(ALL, True)
    answer = thunderbird(config, "x@acme-other.test")
    assert answer is not None
    assert b">acme.test<" not in answer
    assert b"ACME Secret Name" not in answer
    assert parse(answer).find("emailProvider/domain") is not None
    # A tenant restricted to some addresses still owns its domain's configuration.
    assert thunderbird(config, "anyone@beta.test") is not None


# --------------------------------------------------------------------------- Outlook


@pytest.mark.parametrize(("listen", "tls", "imap", "smtp"), CASES)
def test_autodiscover_names_the_configured_host_ports_and_security(
    listen: dict[str, str], tls: bool, imap: tuple[int, str], smtp: tuple[int, str]
) -> None:
    answer = autodiscover(make_config(listen, tls), "anna@acme.test")
    assert answer is not None
    root = parse(answer)
    ns = {"r": RESPONSE_NS, "o": OUTLOOK_NS}
    assert root.tag == f"{{{RESPONSE_NS}}}Autodiscover"
    account = root.find("o:Response/o:Account", ns)
    assert account is not None
    assert text(account, "o:AccountType", ns) == "email"
    assert text(account, "o:Action", ns) == "settings"
    protocols = account.findall("o:Protocol", ns)
    assert [text(p, "o:Type", ns) for p in protocols] == ["IMAP", "SMTP"]
    encryption = {"SSL": "SSL", "STARTTLS": "TLS", "plain": "None"}
    for protocol, (port, socket_type) in zip(protocols, (imap, smtp), strict=True):
        assert text(protocol, "o:Server", ns) == "mail.example.net"
        assert text(protocol, "o:Port", ns) == str(port)
        assert text(protocol, "o:SSL", ns) == ("off" if socket_type == "plain" else "on")
        assert text(protocol, "o:Encryption", ns) == encryption[socket_type]
        assert text(protocol, "o:SPA", ns) == "off"
        assert text(protocol, "o:LoginName", ns) == "anna@acme.test"
        assert text(protocol, "o:AuthRequired", ns) == "on"


def test_answers_escape_the_address_and_the_host_name() -> None:
    config = make_config(PLAIN, True, hostname='mail&"co<x>')
    for answer in (thunderbird(config, "a&b@acme.test"), autodiscover(config, "a&b@acme.test")):
        assert answer is not None
        assert b'&"co<x>' not in answer
        root = parse(answer)
        assert {e.text for e in root.iter() if e.tag in ("hostname", f"{{{OUTLOOK_NS}}}Server")} == {
            'mail&"co<x>'
        }
    answer = autodiscover(config, "a&b@acme.test")
    assert answer is not None
    assert {e.text for e in parse(answer).iter(f"{{{OUTLOOK_NS}}}LoginName")} == {"a&b@acme.test"}


# --------------------------------------------------------------------------- no answer


@pytest.mark.parametrize(
    "address",
    [
        "anna@unknown.test",
        "anna@sub.acme.test",
        "",
        "acme.test",
        "anna@",
        "@acme.test",
        "a b@acme.test",
        "a\x01b@acme.test",
        "a\ud800b@acme.test",
        "a\ufffeb@acme.test",
        "<anna@acme.test>",
    ],
)
def test_no_answer_for_an_address_outside_the_tenants_or_malformed(address: str) -> None:
    config = make_config(ALL, True)
    assert thunderbird(config, address) is None
    assert autodiscover(config, address) is None


@pytest.mark.parametrize(
    "listen",
    [{"imap": "0.0.0.0:143"}, {"submission": "0.0.0.0:587"}, {}],
    ids=["no-submission", "no-imap", "none"],
)
def test_no_answer_without_both_an_imap_and_a_submission_listener(listen: dict[str, str]) -> None:
    config = make_config(listen, True)
    assert thunderbird(config, "anna@acme.test") is None
    assert autodiscover(config, "anna@acme.test") is None


# --------------------------------------------------------------------------- the request


@pytest.mark.parametrize(
    "ns", [REQUEST_NS, REQUEST_NS.replace("http:", "https:"), ""], ids=["http", "https-as-documented", "none"]
)
def test_request_address_reads_the_email_address_in_lower_case(ns: str) -> None:
    assert request_address(request_body(" Anna@ACME.test ", ns)) == "anna@acme.test"


def test_request_address_reads_a_utf_16_request() -> None:
    body = request_body("anna@acme.test").decode("utf-8").replace("utf-8", "utf-16")
    assert request_address(body.encode("utf-16")) == "anna@acme.test"


def test_request_address_refuses_a_doctype_even_when_its_entity_is_harmless() -> None:
    body = (
        b'<!DOCTYPE x [<!ENTITY e "anna@acme.test">]>'
        b"<Autodiscover><Request><EMailAddress>&e;</EMailAddress></Request></Autodiscover>"
    )
    assert parse(body).find("Request/EMailAddress") is not None  # a plain parser would answer
    assert request_address(body) is None


def test_request_address_takes_a_body_up_to_the_size_limit() -> None:
    body = request_body("anna@acme.test")
    assert request_address(body + b" " * (MAX_REQUEST - len(body))) == "anna@acme.test"
    assert request_address(body + b" " * (MAX_REQUEST - len(body) + 1)) is None


BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE Autodiscover [<!ENTITY a "aaaaaaaaaa">'
    + b"".join(b'<!ENTITY %c "%s">' % (c, b"&%c;" % (c - 1) * 10) for c in range(ord("b"), ord("k")))
    + b"]><Autodiscover><Request><EMailAddress>&j;@acme.test</EMailAddress></Request></Autodiscover>"
)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(BILLION_LAUGHS, id="entity-expansion"),
        pytest.param(
            b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/hostname">]>'
            b"<Autodiscover><Request><EMailAddress>&e;</EMailAddress></Request></Autodiscover>",
            id="external-entity",
        ),
        pytest.param(
            b'<!DOCTYPE Autodiscover SYSTEM "http://127.0.0.1:9/x.dtd">'
            + request_body("anna@acme.test")[38:],
            id="external-dtd",
        ),
        pytest.param(
            '<?xml version="1.0" encoding="utf-16"?><!DOCTYPE x [<!ENTITY e "anna@acme.test">]>'
            "<Autodiscover><Request><EMailAddress>&e;</EMailAddress></Request></Autodiscover>".encode(
                "utf-16"
            ),
            id="doctype-in-utf-16",
        ),
        pytest.param(
            b"<Autodiscover><Request><EMailAddress>&e;</EMailAddress></Request></Autodiscover>",
            id="undeclared-entity",
        ),
        pytest.param(request_body("anna@acme.test") + b" " * MAX_REQUEST, id="huge"),
        pytest.param(b"", id="empty"),
        pytest.param(b"<Autodiscover><Request><EMailAddress>anna@acme.test", id="truncated"),
        pytest.param(b"<Autodiscover><Request></Request></Autodiscover>", id="no-email-address"),
        pytest.param(request_body(""), id="empty-email-address"),
        pytest.param(request_body("not an address"), id="not-an-address"),
        pytest.param(
            b"<Other><Request><EMailAddress>anna@acme.test</EMailAddress></Request></Other>", id="other-root"
        ),
        pytest.param(
            b"<Autodiscover><EMailAddress>anna@acme.test</EMailAddress></Autodiscover>", id="outside-request"
        ),
        pytest.param(b'<?xml version="1.0" encoding="no-such-codec"?><a/>', id="unknown-encoding"),
        pytest.param(b'<?xml version="1.0" encoding="utf-32"?><a/>', id="multibyte-encoding"),
        pytest.param(b"<Autodiscover>\xff\xfe</Autodiscover>", id="invalid-utf-8"),
        pytest.param(b"<a>" * 20_000 + b"</a>" * 20_000, id="deep-nesting"),
    ],
)
def test_request_address_refuses_hostile_or_useless_bodies(body: bytes) -> None:
    assert request_address(body) is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000))
def test_request_address_never_raises_on_bytes(body: bytes) -> None:
    found = request_address(body)
    assert found is None or "@" in found


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.text(max_size=60), st.text(max_size=30).map(lambda local: f"{local}@acme.test")),
    st.sampled_from(["utf-8", "utf-16", "latin-1"]),
)
def test_request_address_never_raises_and_answers_are_well_formed(address: str, encoding: str) -> None:
    header = f'<?xml version="1.0" encoding="{encoding}"?>'
    body = (header + request_body("PLACEHOLDER").decode("utf-8").split("?>", 1)[1]).replace(
        "PLACEHOLDER", address
    )
    try:
        raw = body.encode(encoding)
    except UnicodeEncodeError:
        raw = body.encode("utf-8", "surrogatepass")
    found = request_address(raw)
    config = make_config(ALL, True)
    for answer in (thunderbird(config, found or address), autodiscover(config, found or address)):
        if answer is not None:
            parse(answer)  # well-formed whatever was asked
