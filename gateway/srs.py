"""The Sender Rewriting Scheme (SRS0), pure: no I/O, the clock is an argument.

A forwarded message keeps working with SPF and DMARC only if its envelope
sender is at a domain that authorises the forwarding server; bounces must
still reach the original sender. SRS does both: the envelope sender
``local@domain`` becomes ::

    SRS0=HHHHHHHH=TT=domain=local@srs-domain

the form of Shevek's SRS paper (libsrs2, postsrsd): ``TT`` is the day of
signing, in days since the epoch modulo 1024, as two base32 characters;
``HHHHHHHH`` a keyed hash over ``TT``, ``domain``, ``local`` and the SRS
domain itself. A bounce to that address comes back to us, and :meth:`Signer.reverse`
turns it into ``local@domain`` again, only if the hash is ours and the
address is at most ``max_age_days`` old.

We are the only party that ever reverses our addresses, so the hash is our
own choice within the format: HMAC-SHA256, the first 40 bits in base32
(8 characters, compared case-insensitively because mail servers may change
the case of an address), over the lower-cased fields. Covering the SRS domain
means an address signed for one tenant's domain is worthless at another's.
Several keys may verify (the first signs), so a key can be rotated without
refusing the bounces of mail forwarded before.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from datetime import datetime

PREFIX = "SRS0="
HASH_CHARS = 8
DAYS = 1024  # the timestamp's period: two base32 characters of 5 bits
DEFAULT_MAX_AGE_DAYS = 21  # libsrs2's and postsrsd's default
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


class SRSError(ValueError):
    """An address we will not reverse; ``reason`` is ``malformed``, ``forged`` or ``expired``."""

    reason = "invalid"


class Malformed(SRSError):
    """Not an SRS0 address of the form we write."""

    reason = "malformed"


class Forged(SRSError):
    """Its hash is not one any of our keys made."""

    reason = "forged"


class Expired(SRSError):
    """Signed more than ``max_age_days`` ago (or in the future)."""

    reason = "expired"


def is_srs(address: str) -> bool:
    """True when the local part of ``address`` starts with ``SRS0=`` (any case)."""
    return address[: len(PREFIX)].upper() == PREFIX


def day(now: datetime) -> int:
    """``now`` in days since the epoch, modulo :data:`DAYS`."""
    return int(now.timestamp() // 86400) % DAYS


def _stamp(days: int) -> str:
    return _BASE32[(days >> 5) & 31] + _BASE32[days & 31]


def _unstamp(text: str) -> int:
    upper = text.upper()
    if len(upper) != 2 or not all(c in _BASE32 for c in upper):
        raise Malformed(f"bad timestamp {text[:8]!r}")
    return _BASE32.index(upper[0]) << 5 | _BASE32.index(upper[1])


@dataclass(frozen=True, slots=True)
class Signer:
    """SRS keys (the first signs, every one verifies) and the longest an address stays valid."""

    keys: tuple[bytes, ...] = field(repr=False)
    max_age_days: int = DEFAULT_MAX_AGE_DAYS

    def __post_init__(self) -> None:
        if not self.keys or not all(self.keys):
            raise ValueError("an SRS signer needs at least one non-empty key")
        if not 0 < self.max_age_days < DAYS:
            raise ValueError(f"max_age_days must be between 1 and {DAYS - 1}")

    def _hash(self, key: bytes, stamp: str, domain: str, local: str, srs_domain: str) -> str:
        text = "=".join((stamp, domain, local, srs_domain)).lower().encode("utf-8", "surrogateescape")
        digest = hmac.new(key, text, hashlib.sha256).digest()
        return base64.b32encode(digest[:5]).decode("ascii")

    def forward(self, address: str, srs_domain: str, now: datetime) -> str:
        """The SRS0 address at ``srs_domain`` standing for ``address`` (``""``, the null sender, stays).

        Raises :class:`Malformed` for an address without a local part and a domain.
        """
        if not address:
            return ""
        local, _, domain = address.rpartition("@")
        if not local or not domain:
            raise Malformed(f"not an address: {address!r}")
        stamp = _stamp(day(now))
        mac = self._hash(self.keys[0], stamp, domain, local, srs_domain)
        return f"{PREFIX}{mac}={stamp}={domain}={local}@{srs_domain}"

    def reverse(self, address: str, now: datetime) -> str:
        """The original address an SRS0 address of ours stands for.

        Raises :class:`Malformed`, :class:`Forged` or :class:`Expired`.
        """
        srs_local, _, srs_domain = address.rpartition("@")
        if not is_srs(srs_local) or not srs_domain:
            raise Malformed("not an SRS0 address")
        parts = srs_local[len(PREFIX) :].split("=", 3)
        if len(parts) != 4 or not all(parts):
            raise Malformed("an SRS0 address has a hash, a timestamp, a domain and a local part")
        mac, stamp, domain, local = parts
        signed = _unstamp(stamp)
        mac = mac.upper()
        if len(mac) != HASH_CHARS or not all(c in _BASE32 for c in mac):
            raise Forged("not a hash of ours")
        expected = (self._hash(key, stamp, domain, local, srs_domain) for key in self.keys)
        if not any(hmac.compare_digest(mac, e) for e in expected):
            raise Forged("hash does not match")
        if (day(now) - signed) % DAYS > self.max_age_days:
            raise Expired(f"signed more than {self.max_age_days} days ago")
        return f"{local}@{domain}"
