"""Debian's Roundcube webmail served by PHP's built-in web server on 127.0.0.1, for tests.

Roundcube runs from Debian's install (``roundcube-core``: code in
/usr/share/roundcube, web root /var/lib/roundcube/public_html) through a
private install tree of links to it (:meth:`Roundcube._install`) whose plugins
folder adds the repository's plugins (webmail/roundcube/plugins, enabled: what
an operator does), with a private configuration directory
(``ROUNDCUBE_CONFIG_DIR``), an SQLite database made from Roundcube's own
schema, and temp and log directories below the test's directory: nothing under
/etc/roundcube or /var/lib/roundcube is written.
``imap_debug`` and ``smtp_debug`` are on, so ``logs/imap.log`` and
``logs/smtp.log`` hold every exchange (shown by :meth:`Roundcube.logs`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, missing_peer, peer

WEB_ROOT = Path("/var/lib/roundcube/public_html")
INSTALL = WEB_ROOT.parent  # Debian's install tree: links to /usr/share/roundcube, the plugins folder
OUR_PLUGINS = REPO / "webmail" / "roundcube" / "plugins"
SCHEMA = Path("/usr/share/roundcube/SQL/sqlite.initial.sql")
DEFAULTS = Path("/etc/roundcube/defaults.inc.php")
HOST = "127.0.0.1"
# How much of the end of each log a failure shows (characters).
LOG_TAILS = {
    "errors.log": 4000,
    "imap.log": 6000,
    "smtp.log": 3000,
    "sendmail.log": 1000,
    "php-server.log": 1500,
}


def installed() -> str:
    """PHP's path once PHP and Roundcube are installed; else skip (or fail, see ``missing_peer``)."""
    php = peer("php")
    for needed in (WEB_ROOT / "index.php", SCHEMA, DEFAULTS):
        if not needed.is_file():
            missing_peer(f"Roundcube is not installed ({needed} is missing; make peers installs it)")
    return php


def php_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Roundcube:
    """Roundcube pointed at an IMAP server and an SMTP server on 127.0.0.1; ``url`` once started."""

    def __init__(self, root: Path, imap_port: int, smtp_port: int) -> None:
        self.php = installed()
        self.root, self.imap_port, self.smtp_port = root, imap_port, smtp_port
        self.config_dir, self.log_dir, self.temp_dir = root / "config", root / "logs", root / "temp"
        self.install = root / "install"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def _install(self) -> list[str]:
        """Debian's install tree again, as links, with the repository's plugins in its plugins
        folder next to Debian's (``index.php`` in the web root is a copy: Roundcube finds its tree
        as the folder above it); the names of our plugins."""
        web = self.install / "public_html"
        (web / "program").mkdir(parents=True)
        for name in ("index.php", "program", "skins", "SQL"):
            (self.install / name).symlink_to((INSTALL / name).resolve())
        plugins = self.install / "plugins"
        plugins.mkdir()
        for plugin in (*(INSTALL / "plugins").iterdir(), *OUR_PLUGINS.iterdir()):
            (plugins / plugin.name).symlink_to(plugin.resolve())
        shutil.copy(WEB_ROOT / "index.php", web / "index.php")
        for name in ("plugins", "skins"):
            (web / name).symlink_to(self.install / name)
        for name in ("js", "resources"):
            (web / "program" / name).symlink_to(self.install / "program" / name)
        return sorted(p.name for p in OUR_PLUGINS.iterdir())

    def _configure(self) -> None:
        for d in (self.config_dir, self.log_dir, self.temp_dir):
            d.mkdir(parents=True, exist_ok=True)
        db = self.root / "roundcube.db"
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.executescript(SCHEMA.read_text())  # Roundcube's own schema, as its installer loads it
        (self.config_dir / "defaults.inc.php").symlink_to(DEFAULTS)
        settings = {
            "db_dsnw": f"sqlite:///{db}?mode=0600",
            "imap_host": f"{HOST}:{self.imap_port}",
            "smtp_host": f"{HOST}:{self.smtp_port}",
            "smtp_user": "%u",
            "smtp_pass": "%p",
            "des_key": secrets.token_hex(12),
            "temp_dir": f"{self.temp_dir}/",
            "log_dir": f"{self.log_dir}/",
            "product_name": "Roundcube Webmail",
            "skin": "elastic",
            "language": "en_US",
            "support_url": "",
        }
        lines = [f"$config[{php_string(k)}] = {php_string(v)};" for k, v in settings.items()]
        plugins = ", ".join(php_string(name) for name in self._install())
        lines += [
            f"$config['plugins'] = [{plugins}];",
            "$config['enable_installer'] = false;",
            "$config['enable_spellcheck'] = false;",
            "$config['imap_debug'] = true;",
            "$config['smtp_debug'] = true;",
            "$config['imap_timeout'] = 15;",
            "$config['smtp_timeout'] = 15;",
            "$config['login_rate_limit'] = 0;",
            "$config['draft_autosave'] = 0;",  # no Drafts APPENDs while the test composes
            "$config['refresh_interval'] = 0;",
        ]
        (self.config_dir / "config.inc.php").write_text("<?php\n$config = [];\n" + "\n".join(lines) + "\n")

    def start(self, timeout: float = 20.0) -> Roundcube:
        """Write the configuration and database, start ``php -S``, wait until the login page answers."""
        self._configure()
        env = {**os.environ, "ROUNDCUBE_CONFIG_DIR": str(self.config_dir)}
        for _attempt in range(3):  # a free port can race away before php binds it
            self.port = free_port()
            with (self.log_dir / "php-server.log").open("ab") as log:
                self.proc = subprocess.Popen(
                    [self.php, "-S", f"{HOST}:{self.port}", "-t", str(self.install / "public_html")],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            if self._wait_ready(timeout):
                return self
            exited = self.proc is not None and self.proc.poll() is not None
            self.stop()
            if not exited:  # running but not answering: another port will not help
                break
        pytest.fail(f"Roundcube (php -S) did not start:\n{self.logs()}")

    def _wait_ready(self, timeout: float) -> bool:
        """True once the login page is served; False if php exits (e.g. the port was taken) or on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url, timeout=5) as page:  # noqa: S310 (http on loopback)
                    if b"rcmloginuser" in page.read():
                        return True
            except OSError:  # urllib's URLError is one
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def logs(self) -> str:
        """The end of Roundcube's logs: errors, IMAP and SMTP exchanges, mail sent, web requests."""
        parts = []
        for name, tail in LOG_TAILS.items():
            path = self.log_dir / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)
