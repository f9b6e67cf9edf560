"""Done means 1 of issue #15, any size: three instances on one PostgreSQL pull, one is killed mid-pull.

Runs :func:`tests.test_leases.cluster_pull`, the scenario of
``test_three_instances_pull_every_message_once_and_take_over_a_killed_ones_folders``
(which runs it at 12 x 500): a private Dovecot (``tests/dovecot.py``,
127.0.0.1 only) with K mailboxes, and ``mailgate run`` as instances a, b and c
on one fresh PostgreSQL database (``MAILGATE_TEST_PG``'s server) with blobs
in PostgreSQL, one tenant watching the K mailboxes (polling every second,
``after_fetch = "keep"``). Once the upstream leases are spread evenly, M
messages per mailbox arrive (a batch to each mailbox in turn); when a
fraction of them is stored, the instance holding the most leases is killed
with SIGKILL. Printed: when the leases were spread (and ``mailgate cluster
status``), the kill and what its folders held, how long until its folders had
new holders, the pull's duration and rate; then the end state is checked:
every message stored exactly once, by Message-ID and by sha256. Exits non-zero
when it is not.

    .venv/bin/python bench/cluster_pull.py [--mailboxes 12] [--messages 500] [--size 3000] [--kill-at 0.2]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import new_database  # noqa: E402 (after the path is set)
from tests.dovecot import running_dovecot  # noqa: E402
from tests.test_leases import assert_cluster_stored_exactly_once, cluster_pull  # noqa: E402


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="mailgate-cluster-") as tmp, running_dovecot() as dovecot:
        root = Path(tmp)
        async with new_database("postgresql", root / "unused.db") as url:
            run = await cluster_pull(
                root, url, dovecot, args.mailboxes, args.messages, args.size, args.kill_at, say=print
            )
            total = args.mailboxes * args.messages
            print(f"all {run.stored} of {total} stored {run.done_at:.1f}s after the spawn")
            print(
                f"pull: {run.pull_seconds:.1f}s from the first delivery (upstream complete at "
                f"{run.delivered_at:.1f}s), {total / run.pull_seconds:.0f} msgs/s including the takeover"
            )
            try:
                await assert_cluster_stored_exactly_once(url, dovecot, args.mailboxes)
            except AssertionError as exc:
                print(f"NOT exactly once: {exc}")
                return 1
            print("every message stored exactly once (Message-ID and sha256)")
            return 0 if run.taken_over_after <= 45 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=12)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--size", type=int, default=3000, help="bytes per message, about")
    parser.add_argument("--kill-at", type=float, default=0.2, help="fraction stored when the kill comes")
    sys.exit(asyncio.run(main(parser.parse_args())))
