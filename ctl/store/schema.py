"""Versioned migrations (PRAGMA user_version), applied in one transaction on a writable open.

Version 1 is the original Go daemon's schema (tables meta, auth_state, remote_config, apps,
with the staleness columns it adds by column check), so a database it wrote opens and
migrates forward. Version 2 adds the append-only `audit` table.
"""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 2

V1 = """
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL DEFAULT 0,
    checksum TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL DEFAULT ''
);
INSERT OR IGNORE INTO meta (id, revision, checksum, updated_at) VALUES (1, 0, '', '');
CREATE TABLE IF NOT EXISTS auth_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    initialized INTEGER NOT NULL DEFAULT 0,
    password_hash TEXT,
    updated_at TEXT NOT NULL DEFAULT ''
);
INSERT OR IGNORE INTO auth_state (id, initialized, password_hash, updated_at)
    VALUES (1, 0, NULL, '');
CREATE TABLE IF NOT EXISTS remote_config (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    payload BLOB NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS apps (
    name TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    updated_at TEXT NOT NULL
);
"""

STALENESS_COLUMNS = (
    ("password_stale", "INTEGER NOT NULL DEFAULT 0"),
    ("password_stale_at", "TEXT NOT NULL DEFAULT ''"),
    ("password_ack_at", "TEXT NOT NULL DEFAULT ''"),
    ("recovery_stale", "INTEGER NOT NULL DEFAULT 0"),
    ("recovery_stale_at", "TEXT NOT NULL DEFAULT ''"),
    ("recovery_ack_at", "TEXT NOT NULL DEFAULT ''"),
)

V2 = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    data TEXT NOT NULL DEFAULT '{}'
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
"""


class SchemaTooNew(Exception):
    """The database was written by a newer version: never downgrade it."""


def _statements(script: str) -> list[str]:
    """Split a script into statements (trigger bodies contain semicolons)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    return [s for s in out if s]


def _run(db: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it would commit the enclosing migration transaction.
    for statement in _statements(script):
        db.execute(statement)


def _add_staleness(db: sqlite3.Connection) -> None:
    have = {row[1] for row in db.execute("PRAGMA table_info(auth_state)")}
    for name, decl in STALENESS_COLUMNS:
        if name not in have:
            db.execute(f"ALTER TABLE auth_state ADD COLUMN {name} {decl}")


def migrate(db: sqlite3.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION in one transaction; returns the old version."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(f"control.db has schema version {version}, "
                               f"this daemon knows {SCHEMA_VERSION}")
        if version < 1:
            _run(db, V1)
        _add_staleness(db)  # also repairs a v1 database that predates the columns
        if version < 2:
            _run(db, V2)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return int(version)
