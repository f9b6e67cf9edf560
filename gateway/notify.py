"""In-process change notices: writers announce changed folders, idling readers wake up."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class Changes:
    """Folder-change announcements within one daemon process."""

    def __init__(self) -> None:
        self._waiters: defaultdict[int, set[asyncio.Event]] = defaultdict(set)

    def publish(self, folder_ids: Iterable[int]) -> None:
        """Wake every session watching one of these folders."""
        for folder_id in set(folder_ids):
            for event in self._waiters.get(folder_id, ()):
                event.set()

    @contextmanager
    def watch(self, *folder_ids: int) -> Iterator[asyncio.Event]:
        """An event set when one of the folders changes, for the duration of the block."""
        event = asyncio.Event()
        for folder_id in folder_ids:
            self._waiters[folder_id].add(event)
        try:
            yield event
        finally:
            for folder_id in folder_ids:
                self._waiters[folder_id].discard(event)
                if not self._waiters[folder_id]:
                    del self._waiters[folder_id]
