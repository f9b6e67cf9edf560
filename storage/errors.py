"""Storage errors. Each carries its wire replies; front-ends translate them in one place."""

from __future__ import annotations


class StoreError(Exception):
    """A mail-store operation that cannot be done as asked."""

    imap_code = "CANNOT"
    smtp_reply = "451 4.3.0 Temporary storage failure, try again later"


class NoSuchFolder(StoreError):
    """The named folder does not exist."""

    imap_code = "NONEXISTENT"

    def __init__(self, name: str) -> None:
        super().__init__(f"no folder {name!r}")


class FolderExists(StoreError):
    """A folder with that name exists already."""

    imap_code = "ALREADYEXISTS"

    def __init__(self, name: str) -> None:
        super().__init__(f"folder {name!r} exists already")
