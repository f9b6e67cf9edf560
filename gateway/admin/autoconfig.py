"""Client autoconfiguration: an agent types an address and a password, the client finds the rest.

Theory of operation
-------------------
Two formats are answered, both from the configuration alone (no database, no I/O):

- Thunderbird's autoconfig (``clientConfig`` version 1.1, served at
  ``/mail/config-v1.1.xml?emailaddress=...`` and
  ``/.well-known/autoconfig/mail/config-v1.1.xml``): :func:`thunderbird`.
- Outlook's autodiscover "POX" (``POST /autodiscover/autodiscover.xml``, response
  schema ``.../outlook/responseschema/2006a``): :func:`request_address` reads the
  address out of the request body, :func:`autodiscover` answers it.

Both describe one IMAP and one SMTP submission server, at ``gateway.hostname``
and on the configured listener's own port: implicit TLS (``imaps``,
``submissions``) is preferred; else the plain listener (``imap``,
``submission``) with STARTTLS when ``[tls]`` has a certificate, or without
any security when it has none (then the listeners take passwords only from
loopback, so such an answer is for a development machine). The login is the
address itself, sent as a cleartext password over that connection.

An answer is given only for a well-formed address whose domain is a tenant's,
and only when both an IMAP and a submission listener are configured: a client
that could read but not send (or the reverse) is not "set up". Otherwise the
functions return None and the HTTP layer answers 404. The answer names only
the asked-for domain, never the tenant's other domains or its name, and does
not tell whether the address is an agent's login.

XML is built with :mod:`xml.etree.ElementTree`, which escapes text and
attributes. The request body is untrusted: it is refused when larger than
:data:`MAX_REQUEST` and refused at its ``<!DOCTYPE`` (a document type is the
only place entities are declared, so none is ever expanded and no external
resource is ever named); any parse error is an absent address, never an
exception.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal

from pydantic import TypeAdapter, ValidationError

from gateway.config import Address, Config

MAX_REQUEST = 64 * 1024  # bytes of an autodiscover request body; Outlook's are a few hundred

RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"

SocketType = Literal["SSL", "STARTTLS", "plain"]  # Thunderbird's names
_ENCRYPTION: dict[SocketType, str] = {"SSL": "SSL", "STARTTLS": "TLS", "plain": "None"}  # Outlook's

_ADDRESS: TypeAdapter[str] = TypeAdapter(Address)


@dataclass(frozen=True)
class Endpoint:
    """Where a client connects for one protocol, and how it secures the connection."""

    port: int
    socket_type: SocketType


@dataclass(frozen=True)
class Servers:
    """What both answers describe: the address asked about, and its IMAP and submission endpoints."""

    address: str
    hostname: str
    imap: Endpoint
    submission: Endpoint

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]


def _endpoint(config: Config, implicit: str, explicit: str) -> Endpoint | None:
    """The implicit-TLS listener if configured, else the plain one (STARTTLS when TLS is set up)."""
    socket_type: SocketType = "STARTTLS" if config.tls.cert_file is not None else "plain"
    if listen := getattr(config.listen, implicit):
        socket_type = "SSL"
    elif not (listen := getattr(config.listen, explicit)):
        return None
    return Endpoint(int(listen.rpartition(":")[2]), socket_type)  # a listen value is "host:port"


def _address(text: str | None) -> str | None:
    """``text`` as a lower-case address, or None when it is not one (or could not be written in XML)."""
    try:
        address = _ADDRESS.validate_python(text)
    except ValidationError:
        return None
    return address if address.isprintable() else None  # no control, surrogate or non-characters


def servers(config: Config, address: str) -> Servers | None:
    """The endpoints for ``address``; None unless its domain is a tenant's and both listeners exist."""
    normal = _address(address)
    if normal is None or config.tenant_for_domain(normal.rpartition("@")[2]) is None:
        return None
    imap = _endpoint(config, "imaps", "imap")
    submission = _endpoint(config, "submissions", "submission")
    if imap is None or submission is None:
        return None
    return Servers(normal, config.gateway.hostname, imap, submission)


def _add(parent: ET.Element, tag: str, text: str) -> None:
    ET.SubElement(parent, tag).text = text


def _xml(root: ET.Element) -> bytes:
    out = io.BytesIO()
    ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)
    return out.getvalue()


# --------------------------------------------------------------------------- Thunderbird


def thunderbird(config: Config, address: str) -> bytes | None:
    """The ``config-v1.1.xml`` document for ``address``, or None (see the module's docstring)."""
    found = servers(config, address)
    if found is None:
        return None
    root = ET.Element("clientConfig", version="1.1")
    provider = ET.SubElement(root, "emailProvider", id=found.domain)
    _add(provider, "domain", found.domain)
    _add(provider, "displayName", found.domain)
    _add(provider, "displayShortName", found.domain)
    for tag, kind, endpoint in (
        ("incomingServer", "imap", found.imap),
        ("outgoingServer", "smtp", found.submission),
    ):
        server = ET.SubElement(provider, tag, type=kind)
        _add(server, "hostname", found.hostname)
        _add(server, "port", str(endpoint.port))
        _add(server, "socketType", endpoint.socket_type)
        _add(server, "username", "%EMAILADDRESS%")  # Thunderbird substitutes what the user typed
        _add(server, "authentication", "password-cleartext")
    return _xml(root)


# --------------------------------------------------------------------------- Outlook


class _Refused(ValueError):
    """The request declares a document type."""


class _NoDoctype(ET.TreeBuilder):
    """A tree builder that stops the parser at ``<!DOCTYPE``, before any entity is declared."""

    def doctype(self, name: str, pubid: str | None, system: str | None) -> None:
        raise _Refused(name)


def _local(tag: str) -> str:
    """An element's name without its ``{namespace}`` (requests are seen with http and https ones)."""
    return tag.rpartition("}")[2]


def request_address(body: bytes) -> str | None:
    """The lower-case ``EMailAddress`` of an autodiscover request, or None for anything else.

    None for a body over :data:`MAX_REQUEST`, one with a DOCTYPE, malformed XML,
    a root other than ``Autodiscover``/``Request``, or no well-formed address.
    """
    if len(body) > MAX_REQUEST:
        return None
    # Untrusted input, made safe by refusing DTDs (no entities, no external references) and by the size cap.
    parser = ET.XMLParser(target=_NoDoctype())  # noqa: S314
    try:
        parser.feed(body)
        root = parser.close()
    except (ET.ParseError, ValueError, LookupError):  # LookupError: an unknown encoding declared
        return None
    if _local(root.tag) != "Autodiscover":
        return None
    for request in root:
        if _local(request.tag) == "Request":
            for element in request:
                if _local(element.tag).lower() == "emailaddress":
                    return _address(element.text)
    return None


def autodiscover(config: Config, address: str) -> bytes | None:
    """The POX autodiscover response (schema 2006a) for ``address``, or None (see the module's docstring)."""
    found = servers(config, address)
    if found is None:
        return None
    root = ET.Element("Autodiscover", xmlns=RESPONSE_NS)
    response = ET.SubElement(root, "Response", xmlns=OUTLOOK_NS)
    account = ET.SubElement(response, "Account")
    _add(account, "AccountType", "email")
    _add(account, "Action", "settings")
    for kind, endpoint in (("IMAP", found.imap), ("SMTP", found.submission)):
        protocol = ET.SubElement(account, "Protocol")
        _add(protocol, "Type", kind)
        _add(protocol, "Server", found.hostname)
        _add(protocol, "Port", str(endpoint.port))
        _add(protocol, "DomainRequired", "off")
        _add(protocol, "LoginName", found.address)
        _add(protocol, "SPA", "off")  # on (the default) would ask for NTLM
        _add(protocol, "SSL", "off" if endpoint.socket_type == "plain" else "on")
        _add(protocol, "Encryption", _ENCRYPTION[endpoint.socket_type])  # Outlook 2010+, over SSL
        _add(protocol, "AuthRequired", "on")
    return _xml(root)
