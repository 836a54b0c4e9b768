"""Migrations that have been released cannot change: the runner records each applied file's
SHA-256 and refuses to start against a database whose record differs (MigrationChanged, exit 4).
An edit as small as a comment would stop every deployment that had applied the file, so the
released files' checksums are written down here, and a new migration is added to the list when
it is released."""

from service.backends.db import checksum, migration_files

RELEASED = {
    "0001_users.sql": "ecd3b7d567d256bf1f136ad72e9485d5429eb45d9f2b49e417b2f4860918d89c",
    "0002_users_created_at.sql": "80062950af05cb13e4ba198bf02851babc5d75fd806daa0254a66c937424e483",
    "0003_users_email_key.py": "d4c1cdfb2e0f93a4f86fdb4c9663aab7c0370a6a3b96ddfb1ecb7169f823a65e",
}


def test_released_migrations_keep_their_bytes() -> None:
    found = {path.name: checksum(path) for _, _, path in migration_files()}
    changed = {name for name, digest in RELEASED.items() if found.get(name) != digest}
    assert not changed, f"released migrations changed or gone: {sorted(changed)}"


def test_every_migration_is_listed() -> None:
    # A new migration is added to RELEASED with its checksum, so that it is held from then on.
    names = {path.name for _, _, path in migration_files()}
    assert names == set(RELEASED)
