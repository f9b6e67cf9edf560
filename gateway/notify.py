"""In-process change notices: writers announce changed folders, idling readers wake up and the
folder index (gateway/imap/index.py) marks them stale."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager


class Changes:
    """Folder-change announcements within one daemon process."""

    def __init__(self) -> None:
        self._waiters: defaultdict[int, set[asyncio.Event]] = defaultdict(set)
        self._listeners: list[Callable[[set[int]], None]] = []

    def subscribe(self, listener: Callable[[set[int]], None]) -> None:
        """Call ``listener`` with the changed folders on every notice, before anyone is woken."""
        self._listeners.append(listener)

    def publish(self, folder_ids: Iterable[int]) -> None:
        """Tell the listeners, then wake every session watching one of these folders."""
        changed = set(folder_ids)
        for listener in self._listeners:
            listener(changed)
        for folder_id in changed:
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
