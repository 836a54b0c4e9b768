"""Users get ``email_key``: the address under the service's rule of sameness
(service/emails.py: Unicode case folding of the part before the @), with the unique index and
the lookup on it. The unique index it replaces, on ``lower(email)``, mapped one character at a
time: ``ς``, ``µ`` and ``ſ`` kept their own forms (so ``λογος`` and ``ΛΟΓΟΣ`` were two users)
and ``İ`` became ``i``.

The key is computed by the service's Python (email-validator's IDNA mapping and Python's case
folding), which SQL cannot run: so this migration is Python, run by the same runner in one
transaction. It reads every row, keys it, and refuses, changing nothing, when

- users that exist are one address under the new rule (``Straße@…`` and ``strasse@…``): merging
  or dropping one is a person's decision, not a migration's; or
- a user's e-mail is not an address the service accepts today, so it has no key.

The refusal names the ids (never the addresses: they are personal data, and this line goes to
logs). README.md, "E-mail addresses", says how to resolve them.

The table is locked (``ALTER TABLE``) from the first statement until the commit, and every row
is rewritten once: reads and writes of users wait meanwhile.
"""

from __future__ import annotations

import asyncpg
from pydantic_core import PydanticCustomError

from service.backends.db import MigrationRefused
from service.emails import key_of

# Rows keyed per round trip; the keys go to the server in batches, not held all at once.
BATCH = 10_000
# Sets of ids named in the refusal; the rest are counted (resolving these shows the next).
SHOWN = 50


async def migrate(conn: asyncpg.Connection) -> None:
    await conn.execute('ALTER TABLE users ADD COLUMN email_key text COLLATE "C"')
    await conn.execute(
        "CREATE TEMPORARY TABLE email_keys"
        ' (id bigint PRIMARY KEY, email_key text COLLATE "C") ON COMMIT DROP'
    )
    not_addresses: list[int] = []
    batch: list[tuple[int, str]] = []
    async for row in conn.cursor("SELECT id, email FROM users ORDER BY id", prefetch=BATCH):
        try:
            batch.append((row["id"], key_of(row["email"])))
        except PydanticCustomError:
            not_addresses.append(row["id"])
        if len(batch) == BATCH:
            await conn.copy_records_to_table("email_keys", records=batch, schema_name="pg_temp")
            batch = []
    if batch:
        await conn.copy_records_to_table("email_keys", records=batch, schema_name="pg_temp")
    shared = [
        list(row["ids"])
        for row in await conn.fetch(
            "SELECT array_agg(id ORDER BY id) AS ids FROM pg_temp.email_keys"
            " GROUP BY email_key HAVING count(*) > 1 ORDER BY min(id)"
        )
    ]
    if shared or not_addresses:
        raise MigrationRefused(_refusal(shared, not_addresses))
    await conn.execute(
        "UPDATE users SET email_key = k.email_key FROM pg_temp.email_keys AS k"
        " WHERE k.id = users.id"
    )
    await conn.execute("ALTER TABLE users ALTER COLUMN email_key SET NOT NULL")
    await conn.execute("CREATE UNIQUE INDEX users_email_key_key ON users (email_key)")
    await conn.execute("DROP INDEX IF EXISTS users_email_lower_key")


def _refusal(shared: list[list[int]], not_addresses: list[int]) -> str:
    parts = []
    if shared:
        sets = "; ".join(", ".join(str(i) for i in ids) for ids in shared[:SHOWN])
        more = f" (and {len(shared) - SHOWN} more sets)" if len(shared) > SHOWN else ""
        parts.append(
            f"{len(shared)} set(s) of users whose e-mails are one address under Unicode case "
            f"folding, ids {sets}{more}: keep one user of each set, and change the others' "
            "e-mails or delete those users"
        )
    if not_addresses:
        ids = ", ".join(str(i) for i in not_addresses[:SHOWN])
        more = f" (and {len(not_addresses) - SHOWN} more)" if len(not_addresses) > SHOWN else ""
        parts.append(
            f"users whose e-mail is not an address the service accepts, ids {ids}{more}: "
            "correct their e-mails or delete them"
        )
    return (
        f"0003_users_email_key refused, nothing changed: {'; and '.join(parts)}; then migrate "
        "again (README.md, E-mail addresses)"
    )
