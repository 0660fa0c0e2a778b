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


# ---- pt-BR and en --------------------------------------------------------------------------------

VIEWPORTS = {"desktop": {"width": 1366, "height": 900}, "phone": {"width": 390, "height": 844}}
WORDS = {  # what the client reads, per language (locales/*.json, connect.*)
    "pt-BR": {"title": "Conectar WhatsApp", "scan": "Escaneie este QR code",
              "pairing": "Conectar com número de telefone", "help": "Aparelhos conectados",
              "connected": "Conectado: +", "expired": "Este link expirou",
              "invalid": "Este link não é válido", "ask": "Peça um novo link"},
    "en": {"title": "Connect WhatsApp", "scan": "Scan this QR code",
           "pairing": "Link with phone number instead", "help": "Linked devices",
           "connected": "Connected: +", "expired": "This link has expired",
           "invalid": "This link is not valid", "ask": "Ask whoever sent you this link"},
}
ENGLISH_ONLY = ("Scan this", "Connected", "Loading", "Waiting", "Settings", "Linked devices",
                "Ask whoever", "expired", "not valid")


async def local_page(browser, locale: str, viewport: dict):
    context = await browser.new_context(viewport=viewport, locale=locale)

    async def local_only(route):  # nothing leaves 127.0.0.1
        host = urllib.parse.urlsplit(route.request.url).hostname
        await (route.continue_() if host == "127.0.0.1" else route.abort())

    await context.route("**/*", local_only)
    page = await context.new_page()
    page.csp_refusals = []
    page.on("console", lambda msg: "Content Security Policy" in msg.text
            and page.csp_refusals.append(msg.text))
    return context, page


async def no_horizontal_overflow(page) -> None:
    assert await page.evaluate(
        "document.documentElement.scrollWidth <= document.documentElement.clientWidth"), \
        "the page scrolls sideways"


async def test_connect_page_speaks_the_browsers_language_on_desktop_and_phone(server, browser):
    _, expect = require_browser()
    await server.post("/api/create-instance", {"connectionId": CONN, "number": OWNER}, 201)
    link = await server.post("/api/connection-link", {"connectionId": CONN, "ttl": 600}, 201)
    ARTIFACTS.mkdir(exist_ok=True)
    for lang, locale in (("pt-BR", "pt-BR"), ("en", "en-US")):
        words = WORDS[lang]
        for device, viewport in VIEWPORTS.items():
            context, page = await local_page(browser, locale, viewport)
            try:
                response = await page.goto(link["url"])
                assert response.status == 200
                assert response.headers["content-language"] == lang
                assert await page.get_attribute("html", "lang") == lang
                assert await page.title() == words["title"]
                await expect(page.locator("h1")).to_have_text(words["title"])
                await expect(page.locator("#qr")).to_be_visible(timeout=POLL_TIMEOUT_MS)
                await page.wait_for_function(
                    "() => { const i = document.getElementById('qr');"
                    " return i.complete && i.naturalWidth > 0 }", timeout=POLL_TIMEOUT_MS)
                await expect(page.locator("#status")).to_contain_text(words["scan"])
                await expect(page.locator("#pairing")).to_contain_text(words["pairing"])
                await expect(page.locator("#pairing")).to_contain_text("7XKQ2M9R")
                await expect(page.locator("small")).to_contain_text(words["help"])
                if lang == "pt-BR":
                    text = await page.inner_text("body")
                    assert not [w for w in ENGLISH_ONLY if w in text], text
                    assert await page.get_attribute("#qr", "alt") == (
                        "QR code para escanear com o WhatsApp")
                await no_horizontal_overflow(page)
                assert page.csp_refusals == []
                await page.screenshot(
                    path=str(ARTIFACTS / f"console-connect-{lang}-{device}.png"), full_page=True)
            finally:
                await context.close()

    # Connected, in each language.
    secret = server.evolution.calls("POST", "/instance/create")[0].json["webhook"]["headers"][
        "x-webhook-secret"]
    await server.post(f"/webhook/{COMPANY_ID}", CONNECTION_OPEN, 200,
                      headers={"x-webhook-secret": secret})
    server.evolution.open(CONN)
    for lang, locale in (("pt-BR", "pt-BR"), ("en", "en-GB")):
        context, page = await local_page(browser, locale, VIEWPORTS["phone"])
        try:
            await page.goto(link["url"])
            status = page.locator("#status")
            await expect(status).to_have_text(
                re.compile("^" + re.escape(WORDS[lang]["connected"]) + OWNER),
                timeout=POLL_TIMEOUT_MS)
            await expect(status).to_contain_text("Loja Centro")
            assert page.csp_refusals == []
        finally:
            await context.close()


async def test_lang_in_the_link_wins_over_the_browsers_languages(server, browser):
    _, expect = require_browser()
    await server.post("/api/create-instance", {"connectionId": CONN}, 201)
    link = await server.post("/api/connection-link", {"connectionId": CONN, "ttl": 600}, 201)
    for locale, lang, expected in (("en-US", "pt-BR", "pt-BR"), ("pt-BR", "en", "en"),
                                   ("fr-FR", "", "pt-BR"), ("pt-PT", "", "pt-BR"),
                                   ("de-DE", "xx", "pt-BR")):
        context, page = await local_page(browser, locale, VIEWPORTS["phone"])
        try:
            url = link["url"] + (f"&lang={lang}" if lang else "")
            response = await page.goto(url)
            assert response.status == 200
            assert response.headers["content-language"] == expected, (locale, lang)
            assert await page.get_attribute("html", "lang") == expected
            await expect(page.locator("h1")).to_have_text(WORDS[expected]["title"])
            await expect(page.locator("#qr")).to_be_visible(timeout=POLL_TIMEOUT_MS)
            await expect(page.locator("#status")).to_contain_text(WORDS[expected]["scan"])
            assert page.csp_refusals == []
        finally:
            await context.close()


async def test_the_error_pages_speak_the_browsers_language(server, browser):
    _, expect = require_browser()
    await server.post("/api/create-instance", {"connectionId": CONN}, 201)
    link = await server.post("/api/connection-link", {"connectionId": CONN, "ttl": 600}, 201)
    exp = int(time.time()) - 60
    sig = whatstracking.link_signature(await server.signing_key(), COMPANY_ID, CONN, exp)
    expired = f"{server.base}/connect/{CONN}?" + urllib.parse.urlencode(
        {"c": COMPANY_ID, "exp": exp, "sig": sig})
    parts = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(link["url"]).query))
    parts["sig"] = ("A" if parts["sig"][0] != "A" else "B") + parts["sig"][1:]
    tampered = f"{server.base}/connect/{CONN}?{urllib.parse.urlencode(parts)}"
    for lang, locale in (("pt-BR", "pt-BR"), ("en", "en-US")):
        context, page = await local_page(browser, locale, VIEWPORTS["phone"])
        try:
            for url, status, key in ((expired, 410, "expired"), (tampered, 401, "invalid")):
                response = await page.goto(url)
                assert response.status == status
                assert response.headers["content-language"] == lang
                assert await page.get_attribute("html", "lang") == lang
                await expect(page.locator("h1")).to_have_text(WORDS[lang][key])
                await expect(page.locator("p")).to_contain_text(WORDS[lang]["ask"])
                await no_horizontal_overflow(page)
            assert page.csp_refusals == []
            await page.goto(expired)
            await page.screenshot(
                path=str(ARTIFACTS / f"console-connect-expired-{lang}-phone.png"), full_page=True)
        finally:
            await context.close()


async def test_the_page_says_when_its_link_expires_while_open(server, browser):
    """The QR route answers 410 once the link has expired: the script says so, in the page's
    language, and stops."""
    _, expect = require_browser()
    await server.post("/api/create-instance", {"connectionId": CONN}, 201)
    await server.post("/api/connection-link", {"connectionId": CONN, "ttl": 600}, 201)  # the key
    exp = int(time.time()) + 4
    sig = whatstracking.link_signature(await server.signing_key(), COMPANY_ID, CONN, exp)
    url = f"{server.base}/connect/{CONN}?" + urllib.parse.urlencode(
        {"c": COMPANY_ID, "exp": exp, "sig": sig})
    context, page = await local_page(browser, "pt-BR", VIEWPORTS["phone"])
    try:
        await page.goto(url)
        await expect(page.locator("#qr")).to_be_visible(timeout=POLL_TIMEOUT_MS)
        status = page.locator("#status")
        await expect(status).to_have_text(WORDS["pt-BR"]["expired"], timeout=POLL_TIMEOUT_MS)
        await expect(page.locator("#qr")).to_be_hidden()
        assert await status.get_attribute("class") == "err"
        assert page.csp_refusals == []
    finally:
        await context.close()
