#!/usr/bin/env python3
"""Side-by-side throughput and latency of WhatsTracking against a bare aiohttp handler (SPEC §11).

    python bench/run.py                      # everything: bare, SQLite, Postgres, report over 1 M
    python bench/run.py --quick              # 3 s per scenario, report over 100 k visits / 10 k leads
    python bench/run.py --no-postgres        # SQLite only
    python bench/run.py --rss 1000000        # RSS growth of the SQLite server over 1 M requests

One run, one machine, everything on 127.0.0.1. The load generator is wrk (Debian's `wrk` package,
`apt-get install wrk`): one thread, 32 connections (`--connections`), the same duration for every
scenario, a Lua script per scenario that sends JSON bodies with ids varying per request. Each server
is its own process started the way a user starts it (`python whatstracking.py` with DATABASE_URL,
HOST, PORT in the environment), on a fresh SQLite file or a fresh Postgres database (`wt_bench`,
created on the server of `--pg-url` and dropped at the end).

Scenarios (each also run against bench/bare.py with the same bodies, which gives the ratio):
  tracking pageview   POST /tracking, a new visitor each request (visit + event inserted)
  tracking click      POST /tracking, whatsapp_click of a returning visitor (visit updated)
  webhook code match  POST /webhook/bench, messages.upsert from a new contact carrying a live code
                      (a lead matched by code; the codes are seeded beforehand, one per request)
  webhook unmatched   POST /webhook/bench, messages.upsert from a new contact without a code
  report              GET /api/report (group_by utm_source, then day) over a seeded data set of
                      `--report-visits` visits, each with its tracking event (default 1 M), and
                      `--report-leads` leads (default 100 k) with their events; one connection

The tracking scenarios also run against `bare + store sqlite|postgres` (bench/bare.py given a
database of its own that WhatsTracking made): the bare handler plus the least a server must store
before it answers, one visit and one event row per request, group-committed. Its ratio is how near
to the bare handler a server that commits before answering, in its own process, comes on this
machine (`--no-store` leaves it out).

Requests answered with a status other than 2xx are counted in the `non2xx` column and spoil the
row. After each WhatsTracking scenario the rows are counted: every 2xx answer must have its row.
Nothing here asserts timings; bench/kill9.py checks durability under kill -9.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WT = ROOT / "whatstracking.py"
BARE = HERE / "bare.py"
FIXTURE = ROOT / "tests" / "fixtures" / "messages-upsert-conversation.json"
sys.path.insert(0, str(ROOT))

import whatstracking  # noqa: E402  (new_code for the seeded codes)

COMPANY = "bench"
COMMANDS: list[str] = []  # every command line run, printed at the end


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def record(cmd: list[str], env: dict | None = None) -> None:
    shown = " ".join(shlex.quote(str(c)) for c in cmd)
    if env:
        shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shown
    COMMANDS.append(shown)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ------------------------------------------------------------------------------------------------
# Servers
# ------------------------------------------------------------------------------------------------

class Server:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, workdir: Path,
                 shown_env: dict[str, str] | None = None) -> None:
        self.name, self.cmd, self.port = name, cmd, port
        record(cmd, env)  # the exact environment added (shown_env: unused, kept for callers)
        self.logfile = open(workdir / f"{name.replace(' ', '-')}.log", "ab")
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=workdir,
                                     stdout=self.logfile, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited at start; see {self.logfile.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"{name} did not answer /healthz within 60 s")
                time.sleep(0.1)

    @property
    def rss(self) -> float | None:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.logfile.close()


def wt_env(database_url: str, port: int, extra: dict[str, str]) -> dict[str, str]:
    # One load generator on one address: the per-address rate limits would measure themselves.
    return {"DATABASE_URL": database_url, "HOST": "127.0.0.1", "PORT": str(port),
            "LOG_LEVEL": "WARNING", "RATE_LIMIT_TRACKING": "0", "RATE_LIMIT_PUBLIC": "0", **extra}


def company_add(database_url: str, workdir: Path, extra: dict[str, str]) -> dict:
    cmd = [sys.executable, str(WT), "company", "add", COMPANY, "--name", "Bench"]
    env = {"DATABASE_URL": database_url, "LOG_LEVEL": "WARNING", **extra}
    record(cmd, {"DATABASE_URL": database_url})
    out = subprocess.run(cmd, env={**os.environ, **env}, cwd=workdir, capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"company add failed: {out.stderr}")
    return json.loads(out.stdout)


# ------------------------------------------------------------------------------------------------
# wrk and its Lua scripts
# ------------------------------------------------------------------------------------------------

LUA_DONE = r'''
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %d, ' ..
    '"p90_us": %d, "p99_us": %d, "max_us": %d, "non2xx": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d}\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.status, e.connect, e.read, e.write, e.timeout))
end
'''


def lua_string(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Lua string literal for our bodies


def lua_tracking(run: int, event: str, visitor_run: int = 0, visitors: int = 0) -> str:
    """POST /tracking; pageview: a new visitor per request (visitor ids v<run>x<n>); click: one of
    the `visitors` first visitors of pageview run `visitor_run` comes back and clicks."""
    if event == "pageview":
        visitor = f"'v{run}x' .. n"
    else:
        visitor = f"'v{visitor_run}x' .. ((n % {max(visitors, 1)}) + 1)"
    return f"""
local n = 0
request = function()
  n = n + 1
  local body = '{{"company_id":"bench","event":"{event}","page_url":"https://shop.example.com/p/' ..
    (n % 97) .. '?utm_source=google&utm_medium=cpc&utm_campaign=spring-' .. (n % 13) ..
    '&gclid=Cj0K' .. n .. '","referrer":"https://www.google.com/","visitor_id":"' .. {visitor} ..
    '","fbp":"fb.1.1700000000.' .. n .. '","ga_client_id":"1234567.1700000000",' ..
    '"whatsapp_phone":"5511999990000","first_touch":{{"utm_source":"google",' ..
    '"utm_campaign":"spring","landing_page":"https://shop.example.com/","ts":1700000000000}}}}'
  return wrk.format("POST", "/tracking", {{["Content-Type"] = "text/plain;charset=UTF-8",
    ["User-Agent"] = "Mozilla/5.0 (bench)"}}, body)
end
""" + LUA_DONE


def webhook_template() -> str:
    """The Evolution messages.upsert fixture as one compact line with placeholders."""
    envelope = json.loads(FIXTURE.read_text())
    envelope["instance"] = "bench"
    envelope.pop("apikey", None)
    key = envelope["data"]["key"]
    key["id"], key["remoteJid"], key["remoteJidAlt"] = "XXIDXX", "XXPHONEXX@s.whatsapp.net", \
        "XXLIDXX@lid"
    envelope["data"]["message"]["conversation"] = "XXTEXTXX"
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":"))


def lua_webhook(run: int, secret: str, codes_file: Path | None) -> str:
    """POST /webhook/bench: a new contact per request (phone and LID unique to run and request),
    with a live code from `codes_file` (one per request) or without a code."""
    load = ""
    text = "'Oi! Voces abrem no sabado? Pedido ' .. n"
    if codes_file is not None:
        load = f"""
local codes = {{}}
for line in io.lines({lua_string(str(codes_file))}) do codes[#codes + 1] = line end
"""
        text = "'Oi! Quero saber o preco [ref ' .. codes[((n - 1) % #codes) + 1] .. ']'"
    return load + f"""
local n = 0
local template = {lua_string(webhook_template())}
local secret = {lua_string(secret)}
request = function()
  n = n + 1
  local body = template:gsub("XXIDXX", "BENCH{run}X" .. n)
  body = body:gsub("XXPHONEXX", "55" .. (11000000000 + {run} * 1000000 + n))
  body = body:gsub("XXLIDXX", "" .. (100000000000 + {run} * 1000000 + n))
  body = body:gsub("XXTEXTXX", {text})
  return wrk.format("POST", "/webhook/bench/messages-upsert",
    {{["Content-Type"] = "application/json", ["X-Webhook-Secret"] = secret}}, body)
end
""" + LUA_DONE


def lua_report(token: str, group_by: str) -> str:
    return f'''
wrk.method = "GET"
wrk.path = "/api/report?group_by={group_by}"
wrk.headers["Authorization"] = "Bearer {token}"
''' + LUA_DONE


class Wrk:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir, self.count = args, workdir, 0

    def run(self, port: int, lua: str, duration: float, connections: int | None = None,
            show: bool = True) -> dict:
        self.count += 1
        script = self.workdir / f"load-{self.count}.lua"
        script.write_text(lua)
        connections = connections or self.args.connections
        cmd = [self.args.wrk, "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "10s",
               "-s", str(script), f"http://127.0.0.1:{port}/"]
        if show:
            record(cmd)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
        for line in out.stdout.splitlines():
            if line.startswith("WRKJSON "):
                result = json.loads(line[len("WRKJSON "):])
                result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
                result["ok"] = result["requests"] - result["non2xx"]
                return result
        raise SystemExit(f"wrk gave no result: {out.stdout}\n{out.stderr}")


# ------------------------------------------------------------------------------------------------
# Databases
# ------------------------------------------------------------------------------------------------

class Db:
    """Direct access for seeding and counting rows (bench only; the server never sees this)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pg = url.startswith("postgres")
        self.loop = asyncio.new_event_loop()
        if self.pg:
            import asyncpg
            self.conn = self.loop.run_until_complete(asyncpg.connect(url))
        else:
            self.conn = sqlite3.connect(url[len("sqlite:///"):], timeout=30,
                                        isolation_level=None)

    def scalar(self, sql: str) -> int:
        if self.pg:
            return self.loop.run_until_complete(self.conn.fetchval(sql))
        return self.conn.execute(sql).fetchone()[0]

    def execute(self, sql: str) -> None:
        if self.pg:
            self.loop.run_until_complete(self.conn.execute(sql))
        else:
            self.conn.executescript(sql)

    def insert_many(self, table: str, columns: list[str], rows: list[tuple]) -> None:
        if self.pg:
            self.loop.run_until_complete(self.conn.copy_records_to_table(
                table, records=rows, columns=columns))
        else:
            marks = ", ".join("?" for _ in columns)
            self.conn.execute("BEGIN")
            self.conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                                  rows)
            self.conn.execute("COMMIT")

    def close(self) -> None:
        if self.pg:
            self.loop.run_until_complete(self.conn.close())
        else:
            self.conn.close()
        self.loop.close()


def seed_codes(db: Db, count: int) -> list[str]:
    """`count` live visits with fresh codes, for the code-match webhook scenario."""
    codes: set[str] = set()
    while len(codes) < count:
        codes.add(whatstracking.new_code())
    ordered = sorted(codes)
    ts = time.time()
    touch = json.dumps({"utm_source": "google", "utm_medium": "cpc", "utm_campaign": "spring",
                        "gclid": "Cj0Kbench", "landing_page": "https://shop.example.com/"})
    rows = [(COMPANY, f"seed{i}", code, ts + 30 * 86400, "google", "cpc", "spring", touch, touch,
             1, 1, ts, "5511999990000", ts, ts) for i, code in enumerate(ordered)]
    db.insert_many("visits", ["company_id", "visitor_id", "code", "expires_at", "utm_source",
                              "utm_medium", "utm_campaign", "last_touch", "first_touch",
                              "pageviews", "clicks", "clicked_at", "click_phone", "created_at",
                              "updated_at"], rows)
    return ordered


def numbers(db: Db, n: int) -> str:
    if db.pg:
        return f"generate_series(1::bigint, {n}) AS g(i)"
    return (f"(WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {n}) "
            "SELECT i FROM c) AS g")


SOURCES = "CASE i % 8 WHEN 0 THEN 'google' WHEN 1 THEN 'facebook' WHEN 2 THEN 'instagram' " \
          "WHEN 3 THEN 'tiktok' WHEN 4 THEN 'bing' WHEN 5 THEN 'newsletter' WHEN 6 THEN 'direct' " \
          "ELSE 'partner' END"
METHODS = "CASE i % 4 WHEN 0 THEN 'code' WHEN 1 THEN 'ctwa' WHEN 2 THEN 'none' ELSE 'code' END"


def seed_report(db: Db, visits: int, leads: int) -> None:
    """`visits` visits, each with one tracking event, spread over the last 29 days; `leads` leads
    (one visit in ten brought one), each with its `lead` event, plus qualified and purchase
    events. Bulk SQL, not HTTP."""
    now = int(time.time())
    spread = 29 * 86400
    t = f"({now} - ((i * 7919) % {spread}) - 60)"
    touch = ("'{\"utm_source\":\"' || " + SOURCES + " || '\",\"utm_medium\":\"cpc\","
             "\"utm_campaign\":\"campaign-' || (i % 50) || '\",\"page_url\":"
             "\"https://shop.example.com/p/' || (i % 500) || '\"}'")
    db.execute(f"""
INSERT INTO connections (company_id, id, phone, created_at, updated_at)
VALUES ('bench', 'conn-0', '5511999990000', {now}, {now}),
       ('bench', 'conn-1', '5511999990001', {now}, {now});
INSERT INTO visits (company_id, visitor_id, code, expires_at, utm_source, utm_medium, utm_campaign,
    last_touch, first_touch, pageviews, clicks, clicked_at, click_phone, lead_id, created_at,
    updated_at)
SELECT 'bench', 'rv' || i, 'R' || i, {now + 30 * 86400}, {SOURCES}, 'cpc', 'campaign-' || (i % 50),
    {touch}, {touch}, 1, CASE WHEN i % 5 = 0 THEN 1 ELSE 0 END,
    CASE WHEN i % 5 = 0 THEN {t} END, CASE WHEN i % 5 = 0 THEN '551199999000' || (i % 2) END,
    CASE WHEN i % 10 = 0 AND i / 10 <= {leads} THEN i / 10 END, {t}, {t}
FROM {numbers(db, visits)};
INSERT INTO tracking_events (company_id, visit_id, event, page_url, referrer, utm_source,
    utm_medium, utm_campaign, whatsapp_phone, created_at)
SELECT 'bench', i, CASE WHEN i % 5 = 0 THEN 'whatsapp_click' ELSE 'pageview' END,
    'https://shop.example.com/p/' || (i % 500), 'https://www.google.com/', {SOURCES}, 'cpc',
    'campaign-' || (i % 50), NULL, {t}
FROM {numbers(db, visits)};
INSERT INTO leads (company_id, connection_id, contact_id, phone, name, first_message, message_id,
    code, match_method, confidence, visit_id, utm_source, utm_medium, utm_campaign, attribution,
    created_at)
SELECT 'bench', 'conn-' || (i % 2), i, '5511' || (900000000 + i), 'Lead ' || i, 'Oi', 'M' || i,
    CASE WHEN {METHODS} = 'code' THEN 'R' || (i * 10) END, {METHODS},
    CASE WHEN {METHODS} = 'none' THEN 0.0 ELSE 1.0 END, i * 10, {SOURCES.replace('i % 8', '(i * 10) % 8')},
    'cpc', 'campaign-' || ((i * 10) % 50), '{{}}', {t}
FROM {numbers(db, leads)};
INSERT INTO lead_events (company_id, lead_id, name, value, currency, occurred_at, event_id, source,
    created_at)
SELECT 'bench', i, 'lead', NULL, NULL, {t}, 'lead-' || i, 'whatsapp', {t} FROM {numbers(db, leads)};
INSERT INTO lead_events (company_id, lead_id, name, value, currency, occurred_at, event_id, source,
    created_at)
SELECT 'bench', i, CASE WHEN i % 20 = 0 THEN 'purchase' ELSE 'qualified' END,
    CASE WHEN i % 20 = 0 THEN 100.0 + (i % 7) END, 'BRL', {t} + 3600, 'ev-' || i, 'api', {t}
FROM {numbers(db, leads)} WHERE i % 5 = 0;
""")
    # The report's 15-minute counters, recounted from the visits just inserted by hand (the
    # server keeps them itself for the visits it writes).
    fill, = whatstracking.Storage.from_url(db.url).migration_statements(whatstracking.ROLLUP_FILL)
    db.execute(f"DELETE FROM visit_rollup; {fill}")
    if db.pg:  # autovacuum would do this shortly after a real bulk load
        db.execute("ANALYZE")


def pg_admin(url: str, sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def pg_url_for(admin_url: str, database: str) -> str:
    import urllib.parse
    parts = urllib.parse.urlsplit(admin_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

TRACKING_SCENARIOS = ["tracking pageview", "tracking click"]
SCENARIOS = TRACKING_SCENARIOS + ["webhook code match", "webhook unmatched"]
ROW_COUNTS = {
    "tracking pageview": "SELECT COUNT(*) FROM tracking_events",
    "tracking click": "SELECT COUNT(*) FROM tracking_events",
    "webhook code match": "SELECT COUNT(*) FROM leads WHERE match_method = 'code'",
    "webhook unmatched": "SELECT COUNT(*) FROM leads WHERE match_method = 'none'",
}


class Target:
    """One server under load: the bare handler (storing or not), or WhatsTracking on one
    database; `scenarios` are the ones it runs."""

    def __init__(self, label: str, server: Server, secret: str, codes: list[str],
                 db: "Db | None", workdir: Path, scenarios: list[str] = SCENARIOS) -> None:
        self.label, self.server, self.secret, self.db = label, server, secret, db
        self.scenarios = scenarios
        self.workdir, self.pageview_run = workdir, 0
        self.codes, self.used = codes, 0  # each run takes fresh codes from here
        self.rss_start = server.rss

    def take_codes(self, run: int, count: int) -> Path:
        """A file of `count` codes no earlier run has sent (the bare handler's repeat)."""
        codes = self.codes[self.used:self.used + count]
        if self.db is not None:
            self.used += count
            if self.used > len(self.codes):
                raise SystemExit(f"{self.label}: not enough seeded codes; raise --codes")
        else:
            codes = (self.codes * (count // len(self.codes) + 1))[:count]
        path = self.workdir / f"codes-{run}.txt"
        path.write_text("\n".join(codes) + "\n")
        return path

    def load(self, name: str, run: int, seconds: float, rate: int) -> str:
        if name == "tracking pageview":
            return lua_tracking(run, "pageview")
        if name == "tracking click":
            return lua_tracking(run, "whatsapp_click", self.pageview_run, 1000)
        if name == "webhook code match":
            # at most `rate` requests a second can be sent: so many codes, none used before
            return lua_webhook(run, self.secret, self.take_codes(run, int(seconds * rate) + 100))
        return lua_webhook(run, self.secret, None)

    def count(self, name: str) -> int | None:
        return self.db.scalar(ROW_COUNTS[name]) if self.db else None


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.wrk = Wrk(args, workdir)
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.runs = 0
        self.targets: list[Target] = []

    def next_run(self) -> int:
        self.runs += 1
        return self.runs

    def start_bare(self) -> None:
        port = free_port()
        server = Server("bare", [sys.executable, str(BARE), str(port), self.args.loop], {}, port,
                        self.workdir)
        codes = [whatstracking.new_code() for _ in range(1000)]
        self.targets.append(Target("bare handler", server, "x", codes, None, self.workdir))

    def start_bare_store(self, label: str, database_url: str) -> None:
        """The bare handler that also group-commits a visit and an event per tracking request,
        on its own database made by WhatsTracking (the same tables and indexes)."""
        company_add(database_url, self.workdir, dict(self.args.server_env))
        port = free_port()
        server = Server(label, [sys.executable, str(BARE), str(port), self.args.loop,
                                database_url], {}, port, self.workdir)
        self.targets.append(Target(label, server, "x", [], Db(database_url), self.workdir,
                                   scenarios=TRACKING_SCENARIOS))

    def start_wt(self, label: str, database_url: str, shown_url: str) -> None:
        extra = dict(self.args.server_env)
        company = company_add(database_url, self.workdir, extra)
        db = Db(database_url)
        codes = seed_codes(db, int(self.args.repeat * (self.args.duration + self.args.warmup) *
                                   self.args.code_rate) + 1000)
        if db.pg:  # else autovacuum gets to the bulk-seeded rows during a measured run
            db.execute("VACUUM ANALYZE")
        port = free_port()
        server = Server(label, [sys.executable, str(WT)], wt_env(database_url, port, extra), port,
                        self.workdir, shown_env={"DATABASE_URL": shown_url, "HOST": "127.0.0.1",
                                                 "PORT": str(port), "LOG_LEVEL": "WARNING"})
        self.targets.append(Target(label, server, company["webhook_secret"], codes, db,
                                   self.workdir))

    def measure(self) -> None:
        """Each scenario against every target in turn (bare handler first), `--repeat` times:
        the targets are measured minutes apart at most, so a change of the machine's load
        (other processes) touches them alike. Each row is the median of its repeats."""
        for name in SCENARIOS:
            results: dict[str, list[dict]] = {t.label: [] for t in self.targets}
            checks: dict[str, list[str]] = {t.label: [] for t in self.targets}
            for _ in range(self.args.repeat):
                for target in self.targets:
                    if name not in target.scenarios:
                        continue
                    before = target.count(name)
                    if self.args.warmup:
                        self.wrk.run(target.server.port,
                                     target.load(name, self.next_run(), self.args.warmup,
                                                 self.args.code_rate),
                                     self.args.warmup, show=False)
                    if target.db is not None and target.db.pg:
                        # Fresh tables: what autovacuum's ANALYZE does on a live server within
                        # a minute. Without statistics Postgres plans (and caches) an index
                        # scan of all the company's rows for every lookup. VACUUM too: else
                        # autovacuum works through the rows of the scenario before during the
                        # measured seconds of this one (on 2 CPUs its p99 rose to 30-55 ms).
                        target.db.execute("VACUUM ANALYZE")
                    run = self.next_run()
                    if name == "tracking pageview":
                        target.pageview_run = run
                    result = self.wrk.run(target.server.port,
                                          target.load(name, run, self.args.duration,
                                                      self.args.code_rate),
                                          self.args.duration)
                    log(f"  {target.label:<22} {name:<20} {result['rps']:8.0f} req/s  p50 "
                        f"{result['p50_us'] / 1000:6.1f} ms  p99 {result['p99_us'] / 1000:6.1f} "
                        f"ms  non2xx {result['non2xx']}")
                    results[target.label].append(result)
                    if target.db is not None:
                        stored = target.count(name) - before
                        # the rows include the warm-up's; every 2xx answer must have its row
                        checks[target.label].append(
                            "ok" if stored >= result["ok"]
                            else f"MISSING {result['ok'] - stored}")
                        if (name == "webhook code match" and
                                result["requests"] > self.args.duration * self.args.code_rate):
                            self.notes.append(f"{target.label}: webhook code match sent more "
                                              f"requests than codes: raise --code-rate")
            bare_rps = median([r["rps"] for r in results["bare handler"]])
            for target in self.targets:
                runs = results[target.label]
                if not runs:
                    continue
                row = {key: median([r[key] for r in runs])
                       for key in ("rps", "p50_us", "p99_us")}
                row["errors"] = sum(r["non2xx"] + r["connect"] + r["read"] + r["write"] +
                                    r["timeout"] for r in runs)
                bad = [c for c in checks[target.label] if c != "ok"]
                row["rows"] = (bad[0] if bad else "ok") if checks[target.label] else ""
                row["ratio"] = (row["rps"] / bare_rps
                                if target.label != "bare handler" else None)
                self.add_row(target.label, name, row)

    def stop(self) -> None:
        for target in self.targets:
            rss_end = target.server.rss
            if target.db is not None and target.rss_start and rss_end:
                self.notes.append(f"{target.label}: server RSS {target.rss_start:.1f} MB at "
                                  f"start, {rss_end:.1f} MB after the scenarios")
            target.server.stop()
            if target.db is not None:
                target.db.close()
        self.targets = []

    def add_row(self, target: str, name: str, row: dict) -> None:
        self.rows.append({"target": target, "scenario": name, "rps": row["rps"],
                          "p50": row["p50_us"] / 1000, "p99": row["p99_us"] / 1000,
                          "ratio": row.get("ratio"), "errors": row["errors"],
                          "rows": row.get("rows", "")})

    def run_report(self, label: str, database_url: str, shown_url: str) -> None:
        extra = dict(self.args.server_env)
        company = company_add(database_url, self.workdir, extra)
        db = Db(database_url)
        started = time.monotonic()
        seed_report(db, self.args.report_visits, self.args.report_leads)
        counts = {t: db.scalar(f"SELECT COUNT(*) FROM {t}")
                  for t in ("visits", "tracking_events", "leads", "lead_events")}
        db.close()
        self.notes.append(f"{label} report data set (seeded in {time.monotonic() - started:.0f} s "
                          "by bulk SQL): " + ", ".join(f"{v:,} {k}" for k, v in counts.items()))
        port = free_port()
        server = Server(label + "-report", [sys.executable, str(WT)],
                        wt_env(database_url, port, extra), port, self.workdir,
                        shown_env={"DATABASE_URL": shown_url, "HOST": "127.0.0.1",
                                   "PORT": str(port), "LOG_LEVEL": "WARNING"})
        try:
            for group_by in ("utm_source", "day"):
                # one request first: it must be a 200 with the whole data set in it
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/report?group_by={group_by}",
                    headers={"Authorization": f"Bearer {company['token']}"})
                t0 = time.perf_counter()
                with urllib.request.urlopen(req, timeout=60) as answer:
                    body = json.loads(answer.read())
                first = (time.perf_counter() - t0) * 1000
                totals = body["totals"]
                self.notes.append(f"{label} report group_by={group_by}: first request "
                                  f"{first:.0f} ms, totals visits={totals['visits']:,} "
                                  f"leads={totals['leads']:,}, {len(body['rows'])} rows")
                result = self.wrk.run(port, lua_report(company["token"], group_by),
                                      self.args.duration, connections=1)
                result["errors"] = (result["non2xx"] + result["connect"] + result["read"] +
                                    result["write"] + result["timeout"])
                self.add_row(label, f"report {group_by} c=1", result)
        finally:
            server.stop()

    # --------------------------------------------------------------------------------------------

    def table(self) -> str:
        head = (f"| {'target':<22} | {'scenario':<22} | {'req/s':>7} | {'p50 ms':>6} | "
                f"{'p99 ms':>6} | {'ratio':>5} | {'errors':>6} | rows |")
        lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
        for r in self.rows:
            ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
            errors = r["errors"]
            rps = f"{r['rps']:7.0f}" if r["rps"] >= 100 else f"{r['rps']:7.2f}"
            lines.append(f"| {r['target']:<22} | {r['scenario']:<22} | {rps} | "
                         f"{r['p50']:6.1f} | {r['p99']:6.1f} | {ratio:>5} | {errors:>6} | "
                         f"{r['rows'] or '-':<4} |")
        return "\n".join(lines)


def run_rss(args: argparse.Namespace, workdir: Path) -> None:
    """Send `args.rss` requests (pageviews and clicks, alternating runs) to one SQLite server and
    report its RSS after a warm-up and at the end."""
    url = f"sqlite:///{workdir / 'rss.db'}"
    company_add(url, workdir, dict(args.server_env))
    port = free_port()
    server = Server("sqlite-rss", [sys.executable, str(WT)],
                    wt_env(url, port, dict(args.server_env)), port, workdir,
                    shown_env={"DATABASE_URL": url, "HOST": "127.0.0.1", "PORT": str(port)})
    wrk = Wrk(args, workdir)
    try:
        warm = wrk.run(port, lua_tracking(10_000, "pageview"), 10)
        start = server.rss
        log(f"after warm-up ({warm['requests']} requests): RSS {start:.1f} MB")
        total, runs, samples = 0, 0, []
        deadline = time.monotonic() + args.rss_max_minutes * 60
        while total < args.rss and runs < 1000 and time.monotonic() < deadline:
            runs += 1
            lua = (lua_tracking(runs, "pageview") if runs % 2 else
                   lua_tracking(runs, "whatsapp_click", runs - 1, 5000))
            result = wrk.run(port, lua, 30, show=runs <= 2)
            total += result["requests"]
            samples.append((total, server.rss))
            log(f"  {total:>9,} requests  RSS {samples[-1][1]:.1f} MB  "
                f"({result['rps']:.0f} req/s, non2xx {result['non2xx']})")
        end = server.rss
        print(f"RSS growth over {total:,} requests after warm-up: {start:.1f} MB -> {end:.1f} MB "
              f"(+{end - start:.1f} MB); peak {max(s[1] for s in samples):.1f} MB")
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per scenario (10)")
    parser.add_argument("--warmup", type=float, default=2, help="warm-up seconds per scenario (2)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure each scenario on each target this many times; rows show "
                             "the medians (1)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--code-rate", type=int, default=8000,
                        help="live codes seeded for the code-match webhook scenario, per second "
                             "of load (8000: more than WhatsTracking answers)")
    parser.add_argument("--report-visits", type=int, default=1_000_000)
    parser.add_argument("--report-leads", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true",
                        help="3 s per scenario, 1 s warm-up, report over 100 k visits / 10 k leads")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--no-store", action="store_true",
                        help="leave out the bare handler that stores (bench/bare.py with a "
                             "database): the limit of a server that commits before answering")
    parser.add_argument("--pg-url", default=os.environ.get(
        "TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="a Postgres server to create the wt_bench database on (dropped at the end)")
    parser.add_argument("--pg-database", default="wt_bench")
    parser.add_argument("--loop", choices=("auto", "asyncio"), default="auto",
                        help="the bare handler's event loop: auto = uvloop when installed, like "
                             "WhatsTracking's server")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        type=lambda s: tuple(s.split("=", 1)),
                        help="extra environment for the WhatsTracking servers")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    parser.add_argument("--rss", type=int, default=0, metavar="N",
                        help="instead of the table: RSS growth of a SQLite server over N requests")
    parser.add_argument("--rss-max-minutes", type=float, default=30)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup = 3, 1
        args.report_visits, args.report_leads = 100_000, 10_000
    if not shutil.which(args.wrk):
        raise SystemExit("wrk is not installed: apt-get install wrk")
    workdir = Path(tempfile.mkdtemp(prefix="wt-bench-"))
    log(f"work directory {workdir}")
    try:
        if args.rss:
            run_rss(args, workdir)
            return 0
        bench = Bench(args, workdir)
        started = time.monotonic()
        load_start = os.getloadavg()
        pg_url = pg_url_for(args.pg_url, args.pg_database)
        pg_shown = pg_url
        store_url = pg_url_for(args.pg_url, args.pg_database + "_store")
        pg_databases = [args.pg_database] + ([] if args.no_store else
                                             [args.pg_database + "_store"])
        try:
            log("starting servers, seeding codes")
            bench.start_bare()
            if not args.no_sqlite:
                if not args.no_store:
                    bench.start_bare_store("bare + store sqlite",
                                           f"sqlite:///{workdir / 'bare-store.db'}")
                url = f"sqlite:///{workdir / 'bench.db'}"
                bench.start_wt("whatstracking sqlite", url, url)
            if not args.no_postgres:
                for database in pg_databases:
                    pg_admin(args.pg_url, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
                    pg_admin(args.pg_url, f"CREATE DATABASE {database}")
                if not args.no_store:
                    bench.start_bare_store("bare + store postgres", store_url)
                bench.start_wt("whatstracking postgres", pg_url, pg_shown)
            bench.measure()
        finally:
            bench.stop()
            if not args.no_postgres:
                for database in pg_databases:
                    pg_admin(args.pg_url, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        log("\n" + bench.table())  # the throughput rows, in case the report part fails
        if not args.no_report:
            if not args.no_sqlite:
                log("report, SQLite (seeding)")
                url = f"sqlite:///{workdir / 'report.db'}"
                bench.run_report("whatstracking sqlite", url, url)
            if not args.no_postgres:
                log("report, Postgres (seeding)")
                pg_admin(args.pg_url, f"DROP DATABASE IF EXISTS {args.pg_database} WITH (FORCE)")
                pg_admin(args.pg_url, f"CREATE DATABASE {args.pg_database}")
                try:
                    bench.run_report("whatstracking postgres", pg_url, pg_shown)
                finally:
                    pg_admin(args.pg_url,
                             f"DROP DATABASE IF EXISTS {args.pg_database} WITH (FORCE)")
        try:
            import uvloop  # noqa: F401
            loop = "uvloop" if args.loop == "auto" else "asyncio"
        except ImportError:
            loop = "asyncio"
        load_end = os.getloadavg()
        print(f"WhatsTracking bench: wrk -t1 -c{args.connections} -d{args.duration:g}s "
              f"(+{args.warmup:g}s warm-up) per scenario and target, median of {args.repeat}; "
              f"report with -c1; Python {sys.version.split()[0]}, {loop} loop in the bare handler "
              f"(and in WhatsTracking when installed), {os.cpu_count()} CPUs, load average "
              f"{load_start[0]:.1f} at start, {load_end[0]:.1f} at end; "
              f"{time.monotonic() - started:.0f} s in all")
        print()
        print(bench.table())
        print()
        for note in bench.notes:
            print("- " + note)
        print()
        print("Command lines:")
        for cmd in COMMANDS:
            print("  " + cmd)
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
