#!/usr/bin/env python3
"""kill -9 during load loses no acknowledged request (SPEC §11 durability).

    python bench/kill9.py                    # SQLite, then Postgres
    python bench/kill9.py --backend sqlite --seconds 5 --connections 32

For each backend: start `python whatstracking.py` (a fresh SQLite file, or a fresh Postgres database
`wt_bench_kill9` on `--pg-url`, dropped at the end), drive it with an aiohttp-based load generator
(`--connections` concurrent clients, half sending POST /tracking, half POST /webhook with Evolution
messages.upsert envelopes), note every request answered 200 (its unique page URL, its unique
message id), `kill -9` the server after `--seconds` while requests are in flight, then open the
database directly and look every acknowledged request up: its tracking event, its stored webhook
delivery and processed message. Prints the counts; exits 1 if any acknowledged request is missing.
Requests cut off by the kill were never acknowledged: they may or may not be stored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402  (server start, company add, database helpers)


async def load(port: int, secret: str, connections: int, seconds: float,
               kill) -> dict[str, list[str]]:
    import aiohttp

    acked: dict[str, list[str]] = {"tracking": [], "webhook": []}
    sent = {"tracking": 0, "webhook": 0}
    template = run.webhook_template()
    stop = asyncio.Event()
    base = f"http://127.0.0.1:{port}"

    async def client(n: int, session: aiohttp.ClientSession) -> None:
        kind = "tracking" if n % 2 == 0 else "webhook"
        i = 0
        while not stop.is_set() and i < 1_000_000:
            i += 1
            key = f"k9c{n}x{i}"
            if kind == "tracking":
                url = f"https://shop.example.com/p?req={key}&utm_source=google"
                body = json.dumps({"company_id": run.COMPANY, "visitor_id": key,
                                   "page_url": url})
                target, headers, ident = "/tracking", {"Content-Type": "text/plain"}, url
            else:
                body = (template.replace("XXIDXX", key)
                        .replace("XXPHONEXX", str(5511000000000 + n * 1_000_000 + i))
                        .replace("XXLIDXX", str(900000000000 + n * 1_000_000 + i))
                        .replace("XXTEXTXX", "Oi, quero saber o preço"))
                target = "/webhook/bench/messages-upsert"
                headers = {"Content-Type": "application/json", "X-Webhook-Secret": secret}
                ident = key
            sent[kind] += 1
            try:
                async with session.post(base + target, data=body, headers=headers) as resp:
                    answer = await resp.read()
                    if resp.status == 200 and json.loads(answer).get("ok") is True:
                        acked[kind].append(ident)
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, ValueError):
                if stop.is_set():
                    return
                await asyncio.sleep(0.01)

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(client(n, session)) for n in range(connections)]
        await asyncio.sleep(seconds)
        stop.set()  # no new requests; those in flight are cut off by the kill
        kill()
        await asyncio.wait(tasks, timeout=15)
        for task in tasks:
            task.cancel()
    print(f"  sent {sent['tracking']} tracking and {sent['webhook']} webhook requests; "
          f"acknowledged (200) {len(acked['tracking'])} and {len(acked['webhook'])}")
    return acked


def check(db: run.Db, acked: dict[str, list[str]]) -> int:
    """Every acknowledged request's rows; returns the number missing."""
    missing = 0
    rows = {"tracking": set(), "webhook": set(), "messages": set()}
    if db.pg:
        fetch = lambda sql: [r[0] for r in db.loop.run_until_complete(db.conn.fetch(sql))]  # noqa
    else:
        fetch = lambda sql: [r[0] for r in db.conn.execute(sql).fetchall()]  # noqa
    rows["tracking"] = set(fetch("SELECT page_url FROM tracking_events "
                                 "WHERE page_url LIKE 'https://shop.example.com/p?req=k9c%'"))
    # the raw delivery (stored before processing) and the processed message, for each webhook
    bodies = fetch("SELECT body FROM webhook_deliveries WHERE status = 'processed'")
    rows["webhook"] = {json.loads(bytes(b))["data"]["key"]["id"] for b in bodies}
    rows["messages"] = set(fetch("SELECT message_id FROM messages WHERE lead_id IS NOT NULL"))
    for kind, found, what in (("tracking", rows["tracking"], "tracking events"),
                              ("webhook", rows["webhook"], "processed webhook deliveries"),
                              ("webhook", rows["messages"], "messages with their lead")):
        lost = [x for x in acked[kind] if x not in found]
        extra = len(found) - (len(acked[kind]) - len(lost))
        missing += len(lost)
        print(f"  {what}: {len(acked[kind])} acknowledged, {len(acked[kind]) - len(lost)} of them "
              f"found, {len(lost)} missing; {extra} more rows committed but never acknowledged "
              "(cut off by the kill)")
        if lost:
            print(f"    missing e.g. {lost[:5]}")
    return missing


def one(backend: str, args: argparse.Namespace, workdir: Path) -> int:
    print(f"{backend}:")
    if backend == "sqlite":
        url = f"sqlite:///{workdir / 'kill9.db'}"
    else:
        url = run.pg_url_for(args.pg_url, args.pg_database)
        run.pg_admin(args.pg_url, f"DROP DATABASE IF EXISTS {args.pg_database} WITH (FORCE)")
        run.pg_admin(args.pg_url, f"CREATE DATABASE {args.pg_database}")
    try:
        company = run.company_add(url, workdir, {})
        port = run.free_port()
        server = run.Server(f"kill9-{backend}", [sys.executable, str(run.WT)],
                            run.wt_env(url, port, {}), port, workdir)
        pid = server.proc.pid

        def kill() -> None:
            os.kill(pid, signal.SIGKILL)
            print(f"  kill -9 {pid} after {args.seconds:g} s of load")

        started = time.monotonic()
        acked = asyncio.run(load(port, company["webhook_secret"], args.connections,
                                 args.seconds, kill))
        server.proc.wait(30)
        print(f"  server exit status {server.proc.returncode}; load ran "
              f"{time.monotonic() - started:.1f} s")
        server.logfile.close()
        db = run.Db(url)  # SQLite recovers its WAL on open, as the next server start would
        try:
            missing = check(db, acked)
        finally:
            db.close()
        print(f"  {'OK: no acknowledged request lost' if not missing else 'FAILED'}")
        return missing
    finally:
        if backend == "postgres":
            run.pg_admin(args.pg_url, f"DROP DATABASE IF EXISTS {args.pg_database} WITH (FORCE)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--seconds", type=float, default=5, help="load before the kill (5)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--pg-url", default=os.environ.get(
        "TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--pg-database", default="wt_bench_kill9")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="wt-kill9-"))
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    try:
        missing = sum(one(b, args, workdir) for b in backends)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
