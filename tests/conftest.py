"""Shared fixtures: every storage test runs on SQLite and on a real Postgres.

Postgres comes from TEST_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test); each
test gets a schema of its own, dropped afterwards. Without a reachable Postgres the Postgres cases
skip, unless REQUIRE_POSTGRES=1 (CI), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import socket
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import whatstracking  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ADMIN_TOKEN = "admin-test-token"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def fixture(name: str) -> dict:
    """A copy of an Evolution fixture from tests/fixtures (name without .json)."""
    return copy.deepcopy(json.loads((FIXTURES / f"{name}.json").read_text("utf-8")))


def served_tracker() -> bytes:
    """tracker.js as the server serves it: minified with rjsmin (comments and indentation gone)."""
    import rjsmin

    return rjsmin.jsmin(whatstracking.TRACKER_PATH.read_text("utf-8")).encode()


def _require(env: str) -> bool:
    return os.environ.get(env, "").strip() not in ("", "0", "false")


async def postgres_schema_url() -> tuple[str, callable]:
    """A Postgres URL whose search_path is a fresh schema, and a coroutine function dropping it."""
    import asyncpg

    base = os.environ.get("TEST_DATABASE_URL") or DEFAULT_PG_URL
    try:
        conn = await asyncpg.connect(base, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        message = f"Postgres not reachable at {base} ({exc.__class__.__name__}: {exc})"
        if _require("REQUIRE_POSTGRES"):
            pytest.fail(message + " and REQUIRE_POSTGRES=1")
        pytest.skip(message + "; set TEST_DATABASE_URL to run the Postgres cases")
    schema = "wt_test_" + uuid.uuid4().hex[:12]
    await conn.execute(f"CREATE SCHEMA {schema}")
    await conn.close()
    sep = "&" if "?" in base else "?"

    async def drop() -> None:
        conn = await asyncpg.connect(base, timeout=5)
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()

    return f"{base}{sep}search_path={schema}", drop


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'wt.db'}"
        return
    url, drop = await postgres_schema_url()
    yield url
    await drop()


@pytest.fixture
async def db(database_url):
    """A migrated Storage on the test database, without the app."""
    storage = whatstracking.Storage.from_url(database_url)
    await storage.connect()
    await storage.migrate()
    yield storage
    await storage.close()


async def storage_at(database_url: str, version: int) -> whatstracking.Storage:
    """A connected Storage on the test database migrated only up to schema `version`: the
    database an older release left, for a test of the migrations after it."""
    storage = whatstracking.Storage.from_url(database_url)
    await storage.connect()
    newest = whatstracking.MIGRATIONS
    whatstracking.MIGRATIONS = [m for m in newest if m[0] <= version]
    try:
        await storage.migrate()
    finally:
        whatstracking.MIGRATIONS = newest
    return storage


@pytest.fixture
def make_config(database_url):
    def make(**env: str) -> whatstracking.Config:
        # ALLOW_PRIVATE_URLS: the tests' fakes of a company's CRM and Evolution server listen on
        # 127.0.0.1 (tests/test_ssrf.py turns it off).
        return whatstracking.load_config({"DATABASE_URL": database_url, "ADMIN_TOKEN": ADMIN_TOKEN,
                                          "PUBLIC_URL": "http://wt.test", "LOG_LEVEL": "WARNING",
                                          "ALLOW_PRIVATE_URLS": "true", **env})
    return make


@pytest.fixture
async def evolution():
    """A fake Evolution API server on 127.0.0.1 (tests/fake_evolution.py)."""
    from fake_evolution import FakeEvolution

    fake = await FakeEvolution().start()
    yield fake
    await fake.close()


@pytest.fixture
async def client(make_config, aiohttp_client):  # config first: its database outlives the app
    return await aiohttp_client(whatstracking.create_app(make_config()))


class Api:
    """A test client acting for one company, with the calls the tests repeat."""

    def __init__(self, client, company: dict) -> None:
        self.client = client
        self.company = company
        self.company_id = company["company_id"]
        self.token = company["token"]
        self.webhook_secret = company["webhook_secret"]
        self.auth = {"Authorization": f"Bearer {self.token}"}

    @property
    def db(self) -> whatstracking.Storage:
        return self.client.app[whatstracking.DB]

    async def track(self, expect: int = 200, **body) -> dict:
        body.setdefault("company_id", self.company_id)
        resp = await self.client.post("/tracking", json=body)
        data = await resp.json()
        assert resp.status == expect, data
        return data

    async def webhook(self, envelope: dict | bytes, expect: int = 200, secret: str | None = "",
                      suffix: str = "") -> dict:
        headers = {}
        secret = self.webhook_secret if secret == "" else secret
        if secret:
            headers["X-Webhook-Secret"] = secret
        path = f"/webhook/{self.company_id}" + (f"/{suffix}" if suffix else "")
        if isinstance(envelope, bytes):
            resp = await self.client.post(path, data=envelope, headers={
                **headers, "Content-Type": "application/json"})
        else:
            resp = await self.client.post(path, json=envelope, headers=headers)
        data = await resp.json()
        assert resp.status == expect, data
        return data

    async def leads(self, **params) -> list[dict]:
        resp = await self.client.get("/api/leads", params=params, headers=self.auth)
        data = await resp.json()
        assert resp.status == 200, data
        return data["leads"]


async def eventually(probe, what: str, timeout: float = 10.0):
    """Poll the coroutine function `probe` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last probe: {result!r}")
        await asyncio.sleep(0.02)


async def create_company(client, company_id: str = "empresa-123", **settings) -> dict:
    resp = await client.post("/api/companies", json={"company_id": company_id,
                                                     "name": "Empresa Teste", **settings},
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    data = await resp.json()
    assert resp.status == 201, data
    return data


@pytest.fixture
async def api(client) -> Api:
    return Api(client, await create_company(client))


def upsert(text: str, phone: str = "5511988887777", message_id: str | None = None,
           instance: str = "loja-centro", **key_fields) -> dict:
    """A messages.upsert envelope (from the conversation fixture) with this text and sender."""
    envelope = fixture("messages-upsert-conversation")
    key = envelope["data"]["key"]
    key["id"] = message_id or uuid.uuid4().hex.upper()
    key["remoteJid"] = f"{phone}@s.whatsapp.net"
    key.pop("remoteJidAlt", None)
    key.update(key_fields)
    envelope["instance"] = instance
    envelope["data"]["message"]["conversation"] = text
    return envelope


# ---- Browser tests (Debian's Chromium driven by playwright) -------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def require_browser():
    """playwright's (async_playwright, expect), or skip with the reason (fail when
    REQUIRE_BROWSER=1, as in CI)."""
    reason = None
    try:
        from playwright.async_api import async_playwright, expect
    except ImportError:
        reason = "the playwright Python package is not installed (pip install playwright)"
    if reason is None and not os.access(CHROMIUM, os.X_OK):
        reason = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    if reason is None:
        return async_playwright, expect
    if _require("REQUIRE_BROWSER"):
        pytest.fail(f"REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def launched_browser():
    """A headless Chromium (skipped, or failed with REQUIRE_BROWSER=1, without it)."""
    async_playwright, _ = require_browser()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture
async def browser():
    """A headless Chromium for the test."""
    async with launched_browser() as browser:
        yield browser


async def serve(app, port: int):
    """Run an aiohttp app on 127.0.0.1:port; returns its runner (``await runner.cleanup()``)."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner
