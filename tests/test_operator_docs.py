"""Issue #11, "docs that stand alone": what the README promises an operator, checked.

- ``restore --snapshot latest`` names the newest snapshot;
- a changed ``snapshots.at`` applies on reload, without a restart;
- the README and docs refer only to files in the repository.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

from gateway.config import parse_config
from gateway.daemon import open_store
from gateway.ingest import Pipeline
from gateway.scheduler import Scheduler
from tests.conftest import REPO, config_dict
from tests.test_cli import toml_str

LINK = re.compile(
    r"\]\(([^)#]+)(?:#[^)]*)?\)|`((?:docs|config|tests|bench|systemd|gateway|storage)/[^`\s:]+)"
)


def test_readme_and_docs_refer_only_to_files_in_the_repository() -> None:
    documents = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]
    missing = []
    for doc in documents:
        text = doc.read_text(encoding="utf-8")
        assert "../shared" not in text, f"{doc.name} points outside the repository"
        for link, path in LINK.findall(text):
            target = link or path
            if target.startswith(("http://", "https://", "mailto:")) or "*" in target or "<" in target:
                continue
            if not (doc.parent / target).exists() and not (REPO / target).exists():
                missing.append(f"{doc.relative_to(REPO)}: {target}")
    assert missing == []


def test_restore_latest_snapshot(tmp_path: Path) -> None:
    config = tmp_path / "mailgate.toml"
    config.write_text(
        f"[gateway]\ndata_dir = {toml_str(tmp_path / 'var')}\n"
        f"[snapshots]\ndir = {toml_str(tmp_path / 'snapshots')}\n"
        '[[tenants]]\nid = "acme"\ndomains = ["acme.test"]\n',
        encoding="utf-8",
    )

    def mailgate(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "gateway", "-c", str(config), *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)

    none = mailgate("restore", "--snapshot", "latest", "--tenant", "acme")
    assert none.returncode == 1
    assert "no snapshot" in none.stderr
    assert mailgate("snapshot", "create").returncode == 0
    assert mailgate("snapshot", "create").returncode == 0
    names = [line.split()[0] for line in mailgate("snapshot", "list").stdout.splitlines()[1:]]
    restored = mailgate("restore", "--snapshot", "latest", "--tenant", "acme")
    assert restored.returncode == 0, restored.stderr
    assert f"Restored/{max(names)[:8]}/" in restored.stdout


async def test_snapshot_time_change_applies_on_reload(tmp_path: Path) -> None:
    """The daily snapshot waits for ``snapshots.at``; a reload that moves it reschedules the wait."""
    now = datetime.now().astimezone().replace(second=59, microsecond=0)
    data = config_dict(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'mailgate.db'}")
    data["snapshots"] = {
        "dir": str(tmp_path / "snapshots"),
        "at": (now - timedelta(hours=1)).strftime("%H:%M"),
    }
    config = parse_config(data)
    db, blobs = await open_store(config)
    current = [config]
    scheduler = Scheduler(lambda: current[0], db, blobs, Pipeline(db, blobs), clock=lambda: now)
    task = asyncio.create_task(scheduler._daily_snapshots())
    try:
        await asyncio.sleep(0.5)
        assert scheduler.last_snapshot is None  # waiting for tomorrow
        data["snapshots"]["at"] = (now + timedelta(minutes=1)).strftime("%H:%M")  # one second from "now"
        current[0] = parse_config(data)
        scheduler.reschedule()
        for _ in range(100):
            if scheduler.last_snapshot is not None:
                break
            await asyncio.sleep(0.1)
        assert scheduler.last_snapshot is not None
    finally:
        task.cancel()
        await db.close()


def _advertised(*, tls: bool, loopback: bool, logged_in: bool) -> set[str]:
    from gateway.imap.session import Session, State

    config = parse_config(config_dict(Path("/nonexistent")))
    session = Session(
        config=lambda: config,
        db=None,  # type: ignore[arg-type]  (capabilities touch no database)
        blobs=None,  # type: ignore[arg-type]
        auth=None,  # type: ignore[arg-type]
        changes=None,  # type: ignore[arg-type]
        index=None,  # type: ignore[arg-type]
        peer="192.0.2.1",
        tls=tls,
        starttls_available=True,
        loopback=loopback,
    )
    if logged_in:
        session.state = State.AUTHENTICATED
    return {c.split("=")[0] if c.startswith("APPENDLIMIT=") else c for c in session.capabilities().split()}


def test_readme_lists_every_imap_capability_and_nothing_else() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = set(re.findall(r"^\| `([A-Za-z0-9=+-]+)` \| (\d{4}) \|", readme, re.MULTILINE))
    listed = {cap for cap, _ in table}
    offered = set().union(
        *(
            _advertised(tls=tls, loopback=loopback, logged_in=logged_in)
            for tls in (False, True)
            for loopback in (False, True)
            for logged_in in (False, True)
        )
    )
    assert listed == offered
