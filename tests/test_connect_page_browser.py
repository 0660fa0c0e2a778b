"""The onboarding page /connect/{connectionId} (SPEC §7) in a real headless Chromium.

An agency creates a connection on the fake Evolution (tests/fake_evolution.py) and a signed link;
its client opens the link, sees the QR, scans it (Evolution posts connection.update "open" and
its connect route starts answering "already open"), and the page turns to "Connected" with the
number. An expired link shows the "expired" page. SQLite only: the storage is not under test here.

Needs Debian's /usr/bin/chromium and the Python playwright package; without them the tests are
skipped, or fail when REQUIRE_BROWSER=1. Screenshots go to tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import json
import pathlib
import re
import time
import urllib.parse

import aiohttp
import pytest_asyncio
from aiohttp import web
from conftest import free_port, require_browser, serve
from fake_evolution import FakeEvolution

import whatstracking

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent

ARTIFACTS = TESTS / "artifacts"
ADMIN_TOKEN = "admin-browser-token"
COMPANY_ID = "empresa-123"
CONN = "loja-centro"
OWNER = "5511900001111"
CONNECTION_OPEN = json.loads((TESTS / "fixtures/connection-update-open.json").read_text("utf-8"))
POLL_TIMEOUT_MS = 20_000  # the page polls every 3 s


class Server:
    """The real WhatsTracking server on 127.0.0.1, with one company, talking to the fake."""

    def __init__(self, base: str, app: web.Application, http: aiohttp.ClientSession,
                 company: dict, evolution: FakeEvolution) -> None:
        self.base, self.app, self.http = base, app, http
        self.company, self.evolution = company, evolution
        self.auth = {"Authorization": f"Bearer {company['token']}"}

    async def post(self, path: str, body: dict, expect: int, headers: dict | None = None) -> dict:
        async with self.http.post(self.base + path, json=body,
                                  headers=self.auth if headers is None else headers) as resp:
            data = await resp.json()
            assert resp.status == expect, data
            return data

    async def signing_key(self) -> str:
        row = await self.app[whatstracking.DB].fetchone(
            "SELECT signing_key FROM companies WHERE id = ?", COMPANY_ID)
        return row["signing_key"]


@pytest_asyncio.fixture
async def server(tmp_path):
    evolution = await FakeEvolution().start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = whatstracking.load_config({
        "DATABASE_URL": f"sqlite:///{tmp_path / 'wt.db'}", "ADMIN_TOKEN": ADMIN_TOKEN,
        "PUBLIC_URL": base, "LOG_LEVEL": "WARNING", "EVOLUTION_API_URL": evolution.url,
        "EVOLUTION_API_KEY": evolution.global_key, "EVOLUTION_TIMEOUT": "5"})
    app = whatstracking.create_app(config)
    runner = await serve(app, port)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/api/companies",
                                 json={"company_id": COMPANY_ID, "name": "Empresa Teste"},
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
                company = await resp.json()
                assert resp.status == 201, company
            yield Server(base, app, http, company, evolution)
    finally:
        await runner.cleanup()
        await evolution.close()


@pytest_asyncio.fixture
async def page(browser):
    context = await browser.new_context(viewport={"width": 480, "height": 760})

    async def local_only(route):  # nothing leaves 127.0.0.1
        host = urllib.parse.urlsplit(route.request.url).hostname
        await (route.continue_() if host == "127.0.0.1" else route.abort())

    await context.route("**/*", local_only)
    page = await context.new_page()
    page.csp_refusals = []  # what the Content-Security-Policy blocked, as Chromium reports it
    page.on("console", lambda msg: "Content Security Policy" in msg.text
            and page.csp_refusals.append(msg.text))
    yield page
    await context.close()


async def test_connect_page_shows_the_qr_then_connected_with_the_number(server, page):
    _, expect = require_browser()
    await server.post("/api/create-instance", {"connectionId": CONN}, 201)
    link = await server.post("/api/connection-link", {"connectionId": CONN, "ttl": 600}, 201)
    assert link["url"].startswith(f"{server.base}/connect/{CONN}?")

    response = await page.goto(link["url"])
    assert response.status == 200
    qr = page.locator("#qr")
    await expect(qr).to_be_visible(timeout=POLL_TIMEOUT_MS)
    src = await qr.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    await page.wait_for_function(
        "() => { const i = document.getElementById('qr');"
        " return i.complete && i.naturalWidth > 0 }",
        timeout=POLL_TIMEOUT_MS)
    await expect(page.locator("#status")).to_contain_text("Scan this QR code")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "connect-page-qr.png"), full_page=True)

    # The client scans: Evolution reports the connection and its connect route says "open".
    secret = server.evolution.calls("POST", "/instance/create")[0].json["webhook"]["headers"][
        "x-webhook-secret"]
    result = await server.post(f"/webhook/{COMPANY_ID}", CONNECTION_OPEN, 200,
                               headers={"x-webhook-secret": secret})
    assert result["ok"] is True
    server.evolution.open(CONN)

    status = page.locator("#status")
    await expect(status).to_have_text(re.compile(r"^Connected: \+" + OWNER),
                                      timeout=POLL_TIMEOUT_MS)
    await expect(status).to_contain_text("Loja Centro")
    await expect(qr).to_be_hidden()
    await expect(page.locator("body")).to_have_attribute("data-state", "connected")
    assert server.evolution.calls("GET", f"/instance/connect/{CONN}")
    await page.screenshot(path=str(ARTIFACTS / "connect-page.png"), full_page=True)
    # The page's own script and style ran under its CSP; nothing was refused.
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
    assert await page.evaluate("getComputedStyle(document.body).textAlign") == "center"
    assert page.csp_refusals == []


async def test_connect_page_of_an_expired_link_shows_the_expired_page(server, page):
    _, expect = require_browser()
    await server.post("/api/create-instance", {"connectionId": CONN}, 201)
    link = await server.post("/api/connection-link", {"connectionId": CONN, "ttl": 600}, 201)

    exp = int(time.time()) - 60
    sig = whatstracking.link_signature(await server.signing_key(), COMPANY_ID, CONN, exp)
    query = urllib.parse.urlencode({"c": COMPANY_ID, "exp": exp, "sig": sig})
    response = await page.goto(f"{server.base}/connect/{CONN}?{query}")
    assert response.status == 410
    await expect(page.locator("h1")).to_contain_text("expired")
    await expect(page.locator("#qr")).to_have_count(0)
    assert await page.evaluate("getComputedStyle(document.body).color") == "rgb(179, 38, 30)"
    assert page.csp_refusals == []
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "connect-page-expired.png"), full_page=True)

    # A tampered link is refused the same way, as a page that says so.
    parts = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(link["url"]).query))
    parts["sig"] = ("A" if parts["sig"][0] != "A" else "B") + parts["sig"][1:]
    response = await page.goto(f"{server.base}/connect/{CONN}?{urllib.parse.urlencode(parts)}")
    assert response.status == 401
    await expect(page.locator("h1")).to_contain_text("not valid")
