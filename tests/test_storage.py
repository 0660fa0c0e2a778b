"""Storage-level behaviours (SPEC §2, §3): migrations, units of work, the Postgres/Supabase rules
and configuration checks. Storage tests run on SQLite and on a real Postgres."""

from __future__ import annotations

import asyncio

import pytest

import whatstracking
from conftest import postgres_schema_url
from whatstracking import ConfigError, PostgresStorage, SqliteStorage, Storage


async def make_table(db) -> None:
    async def run(tx):
        await tx.execute("CREATE TABLE unit_items (id INTEGER PRIMARY KEY, label TEXT NOT NULL)")
    await db.transact(run)


async def labels(db) -> list[str]:
    return sorted(r["label"] for r in await db.fetchall("SELECT label FROM unit_items"))


class Boom(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# Migrations
# ------------------------------------------------------------------------------------------------

async def test_migrations_are_idempotent(database_url):
    every = [version for version, _sql in whatstracking.MIGRATIONS]
    storage = Storage.from_url(database_url)
    await storage.connect()
    try:
        assert await storage.migrate() == every
        assert await storage.migrate() == []
        rows = await storage.fetchall("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == every
    finally:
        await storage.close()
    # A new process (a second start) finds nothing to do and keeps the data.
    storage = Storage.from_url(database_url)
    await storage.connect()
    try:
        await whatstracking.create_company(storage, "acme", "Acme")
        assert await storage.migrate() == []
        assert (await whatstracking.get_company(storage, "acme")).name == "Acme"
    finally:
        await storage.close()


async def test_concurrent_migrations_apply_each_version_once(database_url):
    first, second = Storage.from_url(database_url), Storage.from_url(database_url)
    await first.connect()
    await second.connect()
    try:
        applied = await asyncio.gather(first.migrate(), second.migrate())
        every = [version for version, _sql in whatstracking.MIGRATIONS]
        assert sorted(applied[0] + applied[1]) == every
    finally:
        await first.close()
        await second.close()


# ------------------------------------------------------------------------------------------------
# Units of work
# ------------------------------------------------------------------------------------------------

async def test_transact_returns_after_commit(db):
    await make_table(db)

    async def insert(tx):
        await tx.execute("INSERT INTO unit_items (id, label) VALUES (?, ?)", 1, "one")
        return "done"

    assert await db.transact(insert) == "done"
    # Visible at once to a read outside any unit of work.
    assert await labels(db) == ["one"]


async def test_failing_unit_is_rolled_back_and_reported_while_others_commit(db, monkeypatch):
    await make_table(db)
    batches: list[int] = []
    if isinstance(db, SqliteStorage):
        run_batch = db._run_batch

        async def recording(batch):
            batches.append(len(batch))
            await run_batch(batch)

        monkeypatch.setattr(db, "_run_batch", recording)

    def unit(n: int, fail: bool = False):
        async def run(tx):
            await tx.execute("INSERT INTO unit_items (id, label) VALUES (?, ?)", n, f"item-{n}")
            await tx.execute("INSERT INTO unit_items (id, label) VALUES (?, ?)", 100 + n,
                             f"extra-{n}")
            if fail:
                raise Boom(f"unit {n} failed")
            return n
        return run

    results = await asyncio.gather(*(db.transact(unit(n, fail=(n == 3))) for n in range(6)),
                                   return_exceptions=True)
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]
    assert isinstance(results[3], Boom) and str(results[3]) == "unit 3 failed"
    got = await labels(db)
    assert "item-3" not in got and "extra-3" not in got
    assert got == sorted([f"item-{n}" for n in (0, 1, 2, 4, 5)]
                         + [f"extra-{n}" for n in (0, 1, 2, 4, 5)])
    if isinstance(db, SqliteStorage):
        assert batches == [6]  # all six units really were committed together


async def test_database_error_in_one_unit_does_not_undo_the_others(db):
    await make_table(db)
    await db.transact(lambda tx: tx.execute(
        "INSERT INTO unit_items (id, label) VALUES (?, ?)", 1, "existing"))

    def insert(n: int, label: str):
        return lambda tx: tx.execute("INSERT INTO unit_items (id, label) VALUES (?, ?)", n, label)

    results = await asyncio.gather(db.transact(insert(2, "a")), db.transact(insert(1, "dup")),
                                   db.transact(insert(3, "b")), return_exceptions=True)
    assert results[0] == 1 and results[2] == 1
    assert isinstance(results[1], Exception)
    assert await labels(db) == ["a", "b", "existing"]
    # The storage keeps working after the failure.
    await db.transact(insert(4, "c"))
    assert await labels(db) == ["a", "b", "c", "existing"]


async def test_many_concurrent_units_all_commit(db):
    await make_table(db)
    n = 300
    results = await asyncio.gather(*(db.transact(
        lambda tx, i=i: tx.execute("INSERT INTO unit_items (id, label) VALUES (?, ?)", i, f"u{i}"))
        for i in range(n)))
    assert results == [1] * n
    row = await db.fetchone("SELECT COUNT(*) AS n FROM unit_items")
    assert row["n"] == n


async def test_sqlite_close_flushes_units_still_queued_for_the_group_commit(tmp_path):
    # Postgres units run on their caller's task; SQLite's sit in the group-commit queue, and
    # closing (shutdown) must commit them rather than drop them.
    database_url = f"sqlite:///{tmp_path / 'flush.db'}"
    storage = Storage.from_url(database_url)
    await storage.connect()
    await storage.migrate()
    await make_table(storage)
    tasks = [asyncio.create_task(storage.transact(
        lambda tx, i=i: tx.execute("INSERT INTO unit_items (id, label) VALUES (?, ?)", i, f"q{i}")))
        for i in range(20)]
    await asyncio.sleep(0)  # let every task queue its unit
    await storage.close()
    assert [await t for t in tasks] == [1] * 20
    with pytest.raises(whatstracking.StorageError):
        await storage.transact(lambda tx: tx.execute("SELECT 1"))
    storage = Storage.from_url(database_url)
    await storage.connect()
    try:
        row = await storage.fetchone("SELECT COUNT(*) AS n FROM unit_items")
        assert row["n"] == 20
    finally:
        await storage.close()


async def test_savepoint_inside_a_unit_rolls_back_only_its_part(db):
    await make_table(db)

    async def run(tx):
        await tx.execute("INSERT INTO unit_items (id, label) VALUES (?, ?)", 1, "kept")
        with pytest.raises(Boom):
            async with tx.savepoint():
                await tx.execute("INSERT INTO unit_items (id, label) VALUES (?, ?)", 2, "undone")
                raise Boom()
        return "ok"

    assert await db.transact(run) == "ok"
    assert await labels(db) == ["kept"]


async def test_sqlite_reads_do_not_see_uncommitted_work(tmp_path):
    storage = SqliteStorage(f"sqlite:///{tmp_path / 'iso.db'}")
    await storage.connect()
    await make_table(storage)
    seen = []

    async def run(tx):
        await tx.execute("INSERT INTO unit_items (id, label) VALUES (?, ?)", 1, "pending")
        seen.append(await labels(storage))  # an outside read while the unit is open
        return True

    try:
        await storage.transact(run)
        assert seen == [[]]
        assert await labels(storage) == ["pending"]
    finally:
        await storage.close()


# ------------------------------------------------------------------------------------------------
# Postgres specifics
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sql,expected", [
    ("SELECT 1", "SELECT 1"),
    ("SELECT * FROM t WHERE a = ?", "SELECT * FROM t WHERE a = $1"),
    ("INSERT INTO t (a, b, c) VALUES (?, ?, ?)", "INSERT INTO t (a, b, c) VALUES ($1, $2, $3)"),
    ("UPDATE t SET a = ? WHERE b IN (?, ?) AND c = ?",
     "UPDATE t SET a = $1 WHERE b IN ($2, $3) AND c = $4"),
    ("?", "$1"),
    ("x=?,y=?", "x=$1,y=$2"),
])
def test_to_dollar_params(sql, expected):
    assert whatstracking.to_dollar_params(sql) == expected


def test_to_dollar_params_handles_more_than_nine_placeholders():
    sql = "VALUES (" + ", ".join("?" * 12) + ")"
    assert whatstracking.to_dollar_params(sql) == (
        "VALUES (" + ", ".join(f"${n}" for n in range(1, 13)) + ")")


def test_supabase_transaction_pooler_port_disables_the_statement_cache():
    assert PostgresStorage("postgresql://u@h:6543/db").statement_cache_size == 0
    assert PostgresStorage("postgres://u:p@pooler.supabase.com:6543/postgres"
                           "?sslmode=require").statement_cache_size == 0


@pytest.mark.parametrize("url", ["postgresql://u@h:5432/db", "postgresql://u@h/db",
                                 "postgresql://u@db.supabase.co:5432/postgres"])
def test_other_ports_keep_a_statement_cache(url):
    assert PostgresStorage(url).statement_cache_size > 0


def test_statement_cache_size_query_overrides_and_is_stripped_from_the_dsn():
    storage = PostgresStorage("postgresql://u@h:6543/db?statement_cache_size=50")
    assert storage.statement_cache_size == 50
    assert "statement_cache_size" not in storage.dsn
    storage = PostgresStorage(
        "postgresql://u@h:5432/db?sslmode=require&statement_cache_size=0&application_name=wt")
    assert storage.statement_cache_size == 0
    assert "statement_cache_size" not in storage.dsn
    assert "sslmode=require" in storage.dsn
    assert "application_name=wt" in storage.dsn
    assert storage.dsn.startswith("postgresql://u@h:5432/db?")


def test_bad_statement_cache_size_is_a_config_error():
    with pytest.raises(ConfigError, match="statement_cache_size"):
        PostgresStorage("postgresql://u@h/db?statement_cache_size=lots")


async def test_postgres_without_statement_cache_works():
    database_url, drop = await postgres_schema_url()
    sep = "&" if "?" in database_url else "?"
    storage = Storage.from_url(database_url + sep + "statement_cache_size=0")
    assert storage.statement_cache_size == 0
    await storage.connect()
    try:
        await storage.migrate()
        await whatstracking.create_company(storage, "acme", "Acme")
        for _ in range(3):  # the same query again: no prepared statement may be reused
            assert (await whatstracking.get_company(storage, "acme")).id == "acme"
    finally:
        await storage.close()
        await drop()


# ------------------------------------------------------------------------------------------------
# Storage.from_url and load_config
# ------------------------------------------------------------------------------------------------

def test_from_url_picks_the_backend(tmp_path):
    assert isinstance(Storage.from_url(f"sqlite:///{tmp_path / 'a.db'}"), SqliteStorage)
    assert isinstance(Storage.from_url("postgresql://u@h/db"), PostgresStorage)
    assert isinstance(Storage.from_url("postgres://u@h/db"), PostgresStorage)
    # A relative path is beside whatstracking.py, not in the working directory.
    assert Storage.from_url("sqlite:///relative.db").path == str(whatstracking.HERE / "relative.db")
    assert Storage.from_url(f"sqlite:///{tmp_path}/abs.db").path == f"{tmp_path}/abs.db"


@pytest.mark.parametrize("url", ["mysql://u@h/db", "http://h/db", "whatstracking.db", "",
                                 "sqlite:///:memory:", "sqlite://"])
def test_from_url_rejects_other_urls_with_config_error(url):
    with pytest.raises(ConfigError) as info:
        Storage.from_url(url)
    assert "DATABASE_URL" in str(info.value)


async def test_unreachable_database_is_a_config_error_naming_it(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    for url in (f"sqlite:///{tmp_path / 'a-file' / 'wt.db'}",
                "postgresql://postgres:s3cret@127.0.0.1:1/nowhere"):
        storage = Storage.from_url(url)
        with pytest.raises(ConfigError) as info:
            await storage.connect()
        assert str(info.value).startswith("DATABASE_URL")
        assert "s3cret" not in str(info.value)


def test_load_config_defaults():
    config = whatstracking.load_config({})
    assert config.host == "0.0.0.0"
    assert config.port == 8080
    assert config.database_url == "sqlite:///whatstracking.db"
    assert config.log_format == "text"
    assert config.trust_proxy == "loopback"
    assert config.retention_days == 0


def test_load_config_reads_values():
    config = whatstracking.load_config({
        "HOST": "127.0.0.1", "PORT": "9000", "DATABASE_URL": "postgresql://u@h/db",
        "PUBLIC_URL": "https://wt.example.com/", "LOG_FORMAT": "JSON", "LOG_LEVEL": "debug",
        "TRUST_PROXY": "yes", "RETENTION_DAYS": "90", "ADMIN_TOKEN": " secret "})
    assert (config.host, config.port) == ("127.0.0.1", 9000)
    assert config.public_url == "https://wt.example.com"
    assert config.log_format == "json" and config.log_level == "DEBUG"
    assert config.trust_proxy == "true"
    assert config.retention_days == 90
    assert config.admin_token == "secret"


@pytest.mark.parametrize("env,name", [
    ({"PORT": "http"}, "PORT"),
    ({"PORT": "70000"}, "PORT"),
    ({"PORT": "-1"}, "PORT"),
    ({"DATABASE_URL": "mysql://u@h/db"}, "DATABASE_URL"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ({"TRUST_PROXY": "maybe"}, "TRUST_PROXY"),
    ({"RETENTION_DAYS": "-3"}, "RETENTION_DAYS"),
    ({"RETENTION_DAYS": "ninety"}, "RETENTION_DAYS"),
    ({"PUBLIC_URL": "wt.example.com"}, "PUBLIC_URL"),
    ({"EVOLUTION_API_URL": "ftp://evo"}, "EVOLUTION_API_URL"),
    ({"META_GRAPH_URL": "graph.facebook.com"}, "META_GRAPH_URL"),
    ({"SQLITE_SYNCHRONOUS": "OFF"}, "SQLITE_SYNCHRONOUS"),
])
def test_load_config_rejects_bad_values_with_a_readable_sentence(env, name):
    with pytest.raises(ConfigError) as info:
        whatstracking.load_config(env)
    message = str(info.value)
    assert message.startswith(name)
    assert message.endswith(".")
    assert "\n" not in message
    assert len(message) < 200


async def test_a_write_waits_for_another_process_holding_the_sqlite_write_lock(db):
    """BEGIN is tried on the loop without waiting; with the lock taken (by a CLI command, say)
    the group waits for it in the writer thread, and the server's loop keeps serving."""
    if not isinstance(db, SqliteStorage):
        pytest.skip("SQLite only: Postgres has no database-wide write lock")
    import sqlite3

    await make_table(db)
    other = sqlite3.connect(db.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        write = asyncio.create_task(db.transact(lambda tx: tx.execute(
            "INSERT INTO unit_items (id, label) VALUES (1, 'after the lock')")))
        ticks = 0
        for _ in range(20):  # the loop is free meanwhile
            await asyncio.sleep(0.01)
            ticks += 1
        assert not write.done() and ticks == 20
    finally:
        other.execute("COMMIT")
        other.close()
    assert await asyncio.wait_for(write, 5) == 1
    assert await labels(db) == ["after the lock"]
