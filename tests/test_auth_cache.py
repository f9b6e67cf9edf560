"""The verified-login cache (issue #13): a login verified once skips argon2 until it must not.

argon2 runs are counted by wrapping ``Authenticator._check`` (the one place
that verifies); the clock is a variable, so expiry needs no sleeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from gateway.auth import Authenticator
from gateway.config import Config, parse_config
from gateway.daemon import open_store
from storage.db import Database
from tests.conftest import config_dict

PASSWORD = "agent-password"
HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
HASH = HASHER.hash(PASSWORD)


def make_config(tmp_path: Path, db_url: str, password_hash: str = HASH, **auth: Any) -> Config:
    data = config_dict(tmp_path, db_url)
    data["tenants"][0]["agents"] = [{"login": "anna@acme.test", "password_hash": password_hash}]
    data["limits"] = {"auth": {"max_failures": 100, **auth}}
    return parse_config(data)


class Counted:
    """An Authenticator whose config can be swapped, with its argon2 checks counted and a settable clock."""

    def __init__(self, config: Config, db: Database) -> None:
        self.config, self.now, self.checks = config, 1000.0, 0
        self.auth = Authenticator(lambda: self.config, db, failure_delay=0, clock=lambda: self.now)
        check = self.auth._check

        def counting(hashed: str, password: str) -> bool:
            self.checks += 1
            return check(hashed, password)

        self.auth._check = counting  # type: ignore[method-assign]

    async def login(self, password: str = PASSWORD) -> bool:
        return await self.auth.verify("anna@acme.test", password, "192.0.2.1", "imap") is not None


@pytest.fixture
async def counted(tmp_path: Path, db_url: str) -> AsyncIterator[Counted]:
    config = make_config(tmp_path, db_url)
    db, _ = await open_store(config)
    try:
        yield Counted(config, db)
    finally:
        await db.close()


async def test_a_verified_login_skips_argon2_within_the_ttl(counted: Counted) -> None:
    assert await counted.login()
    assert [await counted.login() for _ in range(5)] == [True] * 5
    assert counted.checks == 1
    counted.now += 3600  # cache_ttl 1 h: expired
    assert await counted.login()
    assert counted.checks == 2


async def test_a_wrong_password_is_always_verified_and_drops_the_entry(counted: Counted) -> None:
    assert await counted.login()
    assert not await counted.login("wrong")  # never answered from the cache
    assert counted.checks == 2
    assert await counted.login()  # the entry went with the failure: verified again
    assert counted.checks == 3


async def test_a_new_password_hash_is_not_served_from_the_cache(counted: Counted, tmp_path: Path) -> None:
    assert await counted.login()
    new = HASHER.hash("new-password")
    counted.config = make_config(tmp_path, counted.config.gateway.database_url, new)
    assert not await counted.login()  # the old password: the hash it was checked against changed
    assert await counted.login("new-password")
    assert counted.checks == 3


async def test_reload_forgets_and_ttl_zero_never_remembers(counted: Counted, tmp_path: Path) -> None:
    assert await counted.login()
    counted.auth.forget()
    assert await counted.login()
    assert counted.checks == 2
    counted.config = make_config(tmp_path, counted.config.gateway.database_url, cache_ttl="0s")
    counted.auth.forget()
    for _ in range(3):
        assert await counted.login()
    assert counted.checks == 5


async def test_the_cache_holds_no_password_and_stays_bounded(counted: Counted, tmp_path: Path) -> None:
    assert await counted.login()
    (entry,) = counted.auth._verified.values()
    assert all(PASSWORD.encode() not in repr(v).encode() for v in dataclasses.astuple(entry))
    counted.config = make_config(tmp_path, counted.config.gateway.database_url, cache_size=0)
    counted.auth.forget()
    assert await counted.login()
    assert not counted.auth._verified


async def test_simultaneous_logins_of_one_agent_run_argon2_once(counted: Counted) -> None:
    """Regression (issue #16): eight sessions logging in at once as one agent ran argon2 eight times, one
    after another (``concurrent_checks`` 1), though the first success was remembered while the others
    waited their turn; a wrong password among them is still checked, and still fails."""
    results = await asyncio.gather(*(counted.login() for _ in range(8)), counted.login("wrong"))
    assert list(results) == [True] * 8 + [False]
    assert counted.checks == 2  # one for the right password, one for the wrong one
