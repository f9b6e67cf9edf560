"""Modified UTF-7 for IMAP mailbox names (RFC 3501 section 5.1.3)."""

from __future__ import annotations

import base64
import binascii


def encode(name: str) -> str:
    """A mailbox name as modified UTF-7: printable ASCII as is, ``&`` as ``&-``."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be", "surrogatepass")
            out.append("&" + base64.b64encode(data).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def decode(name: str) -> str:
    """The mailbox name a modified UTF-7 string stands for; ValueError if malformed."""
    out: list[str] = []
    i = 0
    while i < len(name):
        ch = name[i]
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = name.find("-", i)
        if end < 0:
            raise ValueError(f"unterminated shift in {name!r}")
        chunk = name[i + 1 : end]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            try:
                data = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
                text = data.decode("utf-16-be")
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise ValueError(f"invalid modified UTF-7 in {name!r}") from exc
            if any(" " <= c <= "~" for c in text):  # RFC 3501 5.1.3: such a character stands for itself
                raise ValueError(f"printable ASCII encoded in {name!r}")
            out.append(text)
        i = end + 1
    return "".join(out)
