"""The practical limits for bench/run.py.

    python bench/bare.py PORT [auto|asyncio] [DATABASE_URL]

Without DATABASE_URL: a bare aiohttp handler that reads the body, parses the same JSON WhatsTracking
parses and answers a small JSON object, with nothing else in between. Every ratio in the table is
to this handler.

With DATABASE_URL (a database WhatsTracking created; `company add` makes its tables): the same
handler, which also stores the least a server must store for a tracking request before it answers:
one `visits` row and one `tracking_events` row, group-committed with the requests waiting
alongside it and answered after COMMIT, as WhatsTracking does. No validation, no lookup of a
returning visitor, no report counters, nothing else. It shows how near to the bare handler a
server that commits before it answers, in its own process, can come on the machine.

  SQLite    one transaction per batch (the whole queue), two executemany, COMMIT in a thread;
            WAL and synchronous=FULL, WhatsTracking's defaults; the same switch interval.
  Postgres  asyncpg, up to 2 batches in flight (WhatsTracking's POSTGRES_BATCHES_IN_FLIGHT), one
            set-wise INSERT per table and batch.

Same event loop as WhatsTracking's server (``auto``: uvloop when installed; ``asyncio``: the
standard loop), no access log, 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import secrets
import sqlite3
import sys
import time
from typing import Any

from aiohttp import web

COMPANY = "bench"
VISIT_COLUMNS = ("company_id, visitor_id, code, expires_at, utm_source, utm_medium, utm_campaign, "
                 "last_touch, first_touch, pageviews, created_at, updated_at, user_agent")
EVENT_COLUMNS = "company_id, visit_id, event, page_url, referrer, created_at"


async def handle(request: web.Request) -> web.Response:
    body = json.loads(await request.read())
    return web.json_response({"ok": True, "keys": len(body)})


def visit_values(body: dict, ts: float) -> tuple:
    touch = json.dumps({"page_url": body.get("page_url")})
    return (COMPANY, str(body.get("visitor_id")), secrets.token_hex(5), ts + 86400,
            None, None, None, touch, touch, 1, ts, ts, None)


class SqliteStore:
    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.thread = concurrent.futures.ThreadPoolExecutor(1)
        sys.setswitchinterval(0.0001)

    async def write(self, bodies: list[dict]) -> list[tuple[int, str]]:
        conn, ts = self.conn, time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            first = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM visits").fetchone()[0]
            visits = [(first + i, *visit_values(b, ts)) for i, b in enumerate(bodies)]
            conn.executemany(f"INSERT INTO visits (id, {VISIT_COLUMNS}) "
                             f"VALUES (?{', ?' * 13})", visits)
            conn.executemany(f"INSERT INTO tracking_events ({EVENT_COLUMNS}) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             [(COMPANY, v[0], b.get("event"), b.get("page_url"),
                               b.get("referrer"), ts) for v, b in zip(visits, bodies)])
            await asyncio.get_running_loop().run_in_executor(self.thread, conn.execute, "COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return [(v[0], v[3]) for v in visits]


class PostgresStore:
    VISITS = (f"INSERT INTO visits ({VISIT_COLUMNS}) SELECT * FROM unnest($1::text[], $2::text[], "
              "$3::text[], $4::float8[], $5::text[], $6::text[], $7::text[], $8::text[], "
              "$9::text[], $10::int[], $11::float8[], $12::float8[], $13::text[]) RETURNING id")
    EVENTS = (f"INSERT INTO tracking_events ({EVENT_COLUMNS}) SELECT * FROM unnest($1::text[], "
              "$2::bigint[], $3::text[], $4::text[], $5::text[], $6::float8[])")

    def __init__(self, pool: Any) -> None:
        self.pool = pool  # asyncpg's, one connection per batch in flight

    async def write(self, bodies: list[dict]) -> list[tuple[int, str]]:
        ts = time.time()
        visits = [visit_values(b, ts) for b in bodies]
        async with self.pool.acquire() as conn, conn.transaction():
            ids = [row[0] for row in await conn.fetch(self.VISITS, *zip(*visits))]
            await conn.execute(self.EVENTS, [COMPANY] * len(ids), ids,
                               [b.get("event") for b in bodies],
                               [b.get("page_url") for b in bodies],
                               [b.get("referrer") for b in bodies], [ts] * len(ids))
        return [(i, v[2]) for i, v in zip(ids, visits)]


class GroupCommit:
    """Requests wait in a queue; each batch takes all of it. `in_flight` batches at a time."""

    def __init__(self, store: SqliteStore | PostgresStore, in_flight: int) -> None:
        self.store, self.waiting, self.slots = store, [], asyncio.Semaphore(in_flight)
        self.wake = asyncio.Event()
        self.task = asyncio.create_task(self.run())

    async def submit(self, body: dict) -> tuple[int, str]:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((body, future))
        self.wake.set()
        return await future

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            await self.slots.acquire()
            self.wake.clear()
            batch, self.waiting = self.waiting, []
            if batch:
                asyncio.create_task(self.commit(batch))
            else:
                self.slots.release()

    async def commit(self, batch: list) -> None:
        try:
            results = await self.store.write([body for body, _ in batch])
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
            for _, future in batch:
                future.set_exception(exc)
        else:
            for (_, future), result in zip(batch, results):
                future.set_result(result)
        finally:
            self.slots.release()


def main() -> None:
    port = int(sys.argv[1])
    database_url = sys.argv[3] if len(sys.argv) > 3 else None
    app = web.Application(client_max_size=1024 * 1024)
    tracking = handle
    if database_url:
        group = web.AppKey("group", GroupCommit)

        async def start(app: web.Application) -> None:
            if database_url.startswith("postgres"):
                import asyncpg
                pool = await asyncpg.create_pool(database_url, min_size=2, max_size=2)
                app[group] = GroupCommit(PostgresStore(pool), 2)
            else:
                app[group] = GroupCommit(SqliteStore(database_url.split("///", 1)[1]), 1)

        async def tracking(request: web.Request) -> web.Response:
            body = json.loads(await request.read())
            session_id, code = await request.app[group].submit(body)
            return web.json_response({"ok": True, "session_id": session_id, "code": code})

        app.on_startup.append(start)
    app.router.add_post("/tracking", tracking)
    app.router.add_post("/webhook/{company_id}", handle)
    app.router.add_post("/webhook/{company_id}/{suffix}", handle)
    app.router.add_get("/healthz", lambda request: web.json_response({"ok": True}))
    loop = None
    try:
        if sys.argv[2:3] == ["asyncio"]:
            raise ImportError
        import uvloop
    except ImportError:
        pass
    else:
        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
