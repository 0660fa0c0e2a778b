"""The dashboard (SPEC §8) in a real headless Chromium, against the real server.

The server runs on 127.0.0.1 (aiohttp AppRunner + TCPSite, SQLite in tmp_path) with data seeded
through its public API and placed in time with direct SQL: recent data (the last 7 days) and
older data (9 to 20 days ago), for company empresa-123 and for a second company whose data must
never show. The funnel is compared with /api/report fetched by the test for the very period the
page asked for. Screenshots go to tests/artifacts/ (git-ignored); copies are in docs/.

Needs Debian's /usr/bin/chromium and the Python playwright package; without them the tests are
skipped, or fail when REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import time
import urllib.parse
import uuid

import aiohttp
import pytest_asyncio
from aiohttp import web
from conftest import free_port, require_browser, serve

import whatstracking

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent

ARTIFACTS = TESTS / "artifacts"
FIXTURES = TESTS / "fixtures"
ADMIN_TOKEN = "admin-dashboard-token"
CENTRO = "5511900001111"  # the wuid of connection-update-open.json
BETA_PHONE = "5511977776666"
DAY = 86400
WAIT_MS = 15_000
# Words of the other company that must never appear on empresa-123's dashboard.
BETA_SECRETS = ("Segredo Beta", "Outro Beta", "beta-secreta", "beta-source", "beta-conn",
                "Loja Beta", "Empresa Beta", BETA_PHONE)


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text("utf-8"))


class Company:
    """One company of the running server, seeded through its HTTP API."""

    def __init__(self, server: Server, created: dict) -> None:
        self.server, self.id, self.token = server, created["company_id"], created["token"]
        self.secret = created["webhook_secret"]
        self.auth = {"Authorization": f"Bearer {self.token}"}
        self._phones = iter(range(10_000, 99_999))

    async def call(self, method: str, path: str, expect: int = 200, **kwargs) -> dict:
        kwargs.setdefault("headers", self.auth)
        async with self.server.http.request(method, self.server.base + path, **kwargs) as resp:
            data = await resp.json()
            assert resp.status == expect, data
            return data

    async def sql(self, statement: str, *args) -> None:
        await self.server.app[whatstracking.DB].transact(lambda tx: tx.execute(statement, *args))

    async def connect(self, instance: str, phone: str, profile: str) -> None:
        envelope = fixture("connection-update-open")
        envelope["instance"] = envelope["data"]["instance"] = instance
        envelope["data"]["wuid"] = f"{phone}@s.whatsapp.net"
        envelope["data"]["profileName"] = profile
        await self.webhook(envelope)

    async def webhook(self, envelope: dict) -> dict:
        return await self.call("POST", f"/webhook/{self.id}", json=envelope,
                               headers={"X-Webhook-Secret": self.secret})

    async def visit(self, utm: str | None, days_ago: float, click: str | None = None) -> dict:
        """A pageview (and a WhatsApp click to ``click``) created ``days_ago`` days ago."""
        page = "https://loja.test/" + (f"?{utm}" if utm else "")
        visitor = uuid.uuid4().hex
        answer = await self.call("POST", "/tracking", json={
            "company_id": self.id, "visitor_id": visitor, "page_url": page})
        if click:
            await self.call("POST", "/tracking", json={
                "company_id": self.id, "visitor_id": visitor, "page_url": page,
                "event": "whatsapp_click", "whatsapp_phone": click, "code": answer["code"]})
        created = time.time() - days_ago * DAY
        await self.sql("UPDATE visits SET created_at = ?, clicked_at = CASE WHEN clicked_at IS "
                       "NULL THEN NULL ELSE ? END WHERE id = ?", created, created + 60,
                       answer["session_id"])
        await whatstracking.rebuild_rollup(self.server.app[whatstracking.DB])
        return answer

    async def lead(self, name: str, days_ago: float, text: str = "Olá!", match: str = "code",
                   envelope: dict | None = None, instance: str = "loja-centro") -> int:
        if envelope is None:
            envelope = fixture("messages-upsert-conversation")
            key = envelope["data"]["key"]
            key["id"] = uuid.uuid4().hex.upper()
            key["remoteJid"] = f"55319{next(self._phones)}1234@s.whatsapp.net"
            key.pop("remoteJidAlt", None)
            envelope["instance"] = instance
            envelope["data"]["message"]["conversation"] = text
        envelope["data"]["pushName"] = name
        answer = await self.webhook(envelope)
        assert answer.get("match") == match, answer
        await self.sql("UPDATE leads SET created_at = ?, clicked_at = (SELECT v.clicked_at FROM "
                       "visits v WHERE v.id = leads.visit_id) WHERE id = ?",
                       time.time() - days_ago * DAY, answer["lead_id"])
        return answer["lead_id"]

    async def event(self, lead_id: int, name: str, days_ago: float, value: float) -> None:
        when = whatstracking.iso(time.time() - days_ago * DAY)
        await self.call("POST", f"/api/leads/{lead_id}/events", 201,
                        json={"name": name, "value": value, "occurred_at": when})

    async def report(self, query: str) -> dict:
        return await self.call("GET", f"/api/report?{query}")


class Server:
    def __init__(self, base: str, app: web.Application, http: aiohttp.ClientSession) -> None:
        self.base, self.app, self.http = base, app, http
        self.leads: dict[str, int] = {}

    async def company(self, company_id: str, name: str) -> Company:
        async with self.http.post(f"{self.base}/api/companies",
                                  json={"company_id": company_id, "name": name},
                                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
            data = await resp.json()
            assert resp.status == 201, data
        return Company(self, data)


XSS_NAME = '<img src="/x.png" onerror="window.pwned = 1">'
GOOGLE = "utm_source=google&utm_medium=cpc&utm_campaign=black-friday"
FACEBOOK = "utm_source=facebook&utm_medium=paid_social&utm_campaign=verao"
INSTAGRAM = "utm_source=instagram&utm_medium=social&utm_campaign=stories"


async def seed(server: Server) -> tuple[Company, Company]:
    """empresa-123 (America/Sao_Paulo):
    last 7 days: 4 visits, 3 clicks that all became leads, a CTWA lead, a purchase of 350;
    9-20 days ago: 12 visits, 9 clicks of which 1 became a lead, an organic lead, a purchase of 200
    (so the 30-day match rate is 4/12, low, and the 7-day one is 3/3).
    empresa-b: its own connection, campaign and leads, all recent."""
    a = await server.company("empresa-123", "Empresa Teste")
    await a.connect("loja-centro", CENTRO, "Loja Centro")
    code = whatstracking.message_code
    leads = server.leads

    # Created oldest first, as real leads are (the list of latest leads is newest first).
    for n in range(3):
        await a.visit(FACEBOOK, 18 + n)
    leads["João Orgânico"] = await a.lead("João Orgânico", 15, "Vocês abrem sábado?",
                                          match="none")
    for n in range(8):
        await a.visit(GOOGLE, 9 + n, click=CENTRO)
    v = await a.visit(GOOGLE, 12, click=CENTRO)
    leads["Bruno Antigo"] = await a.lead("Bruno Antigo", 11.99, f"Ainda vale? {code(v['code'])}")
    await a.event(leads["Bruno Antigo"], "purchase", 10, 200)

    v = await a.visit(INSTAGRAM, 4, click=CENTRO)
    leads["Ana Instagram"] = await a.lead("Ana Instagram", 3.99, f"{code(v['code'])} tem P?")
    v = await a.visit(FACEBOOK, 3, click=CENTRO)
    leads["Pedro Facebook"] = await a.lead("Pedro Facebook", 2.99, f"Oi {code(v['code'])}")
    v = await a.visit(GOOGLE, 2, click=CENTRO)
    leads["Mariana Google"] = await a.lead("Mariana Google", 1.99, f"Quero {code(v['code'])}")
    await a.visit(GOOGLE, 1)
    leads["Rafael Lima"] = await a.lead("Rafael Lima", 1, match="ctwa",
                                        envelope=fixture("messages-upsert-ctwa-ad"))
    await a.event(leads["Pedro Facebook"], "purchase", 1, 350)

    b = await server.company("empresa-b", "Empresa Beta")
    await b.connect("beta-conn", BETA_PHONE, "Loja Beta")
    v = await b.visit("utm_source=beta-source&utm_campaign=beta-secreta", 2, click=BETA_PHONE)
    beta = await b.lead("Segredo Beta", 2, f"Oi {code(v['code'])}", instance="beta-conn")
    await b.lead("Outro Beta", 3, "Oi", match="none", instance="beta-conn")
    await b.event(beta, "purchase", 1, 9999)
    return a, b


@pytest_asyncio.fixture
async def server(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = whatstracking.load_config({
        "DATABASE_URL": f"sqlite:///{tmp_path / 'wt.db'}", "ADMIN_TOKEN": ADMIN_TOKEN,
        "PUBLIC_URL": base, "LOG_LEVEL": "WARNING"})
    app = whatstracking.create_app(config)
    runner = await serve(app, port)
    try:
        async with aiohttp.ClientSession() as http:
            yield Server(base, app, http)
    finally:
        await runner.cleanup()


class Recorder:
    """Every request a browser context makes; requests to other hosts are recorded and aborted."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.changed = asyncio.Event()

    def _record(self, request) -> None:
        self.urls.append(request.url)
        self.changed.set()

    async def attach(self, context) -> None:
        context.on("request", self._record)

        async def local_only(route):
            host = urllib.parse.urlsplit(route.request.url).hostname
            await (route.continue_() if host == "127.0.0.1" else route.abort())

        await context.route("**/*", local_only)

    def foreign(self, base: str) -> list[str]:
        origin = urllib.parse.urlsplit(base)
        return [u for u in self.urls if not u.startswith(("data:", "blob:"))
                and urllib.parse.urlsplit(u)[:2] != origin[:2]]

    async def period(self, since: int = 0) -> str:
        """The from/to query of the funnel's report asked for after request number ``since``:
        the page asks for two periods (group_by=day), this one and the one before; the funnel's
        is the one with the latest `to`."""
        def asked() -> list[tuple[str, str]]:
            out = []
            for url in self.urls[since:]:
                parts = urllib.parse.urlsplit(url)
                query = dict(urllib.parse.parse_qsl(parts.query))
                if parts.path == "/api/report" and query.get("group_by") == "day":
                    out.append((query["to"], query["from"]))
            return out

        while len(asked()) < 2:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), WAIT_MS / 1000)
        to, start = max(asked())
        return urllib.parse.urlencode({"from": start, "to": to})


async def new_page(browser, recorder: Recorder, token: str | None = None, **options):
    context = await browser.new_context(locale="en-US", timezone_id="America/Sao_Paulo",
                                        **options)
    await recorder.attach(context)
    if token is not None:
        await context.add_init_script(
            f"window.localStorage.setItem('whatstracking_token', {json.dumps(token)});")
    return context, await context.new_page()


async def expect_funnel(page, company: Company, query: str) -> dict:
    """The funnel shows /api/report's totals for ``query`` (the same period as the page)."""
    _, expect = require_browser()
    totals = (await company.report(f"group_by=day&{query}"))["totals"]
    await expect(page.locator("#funnel-visits")).to_have_text(str(totals["visits"]),
                                                              timeout=WAIT_MS)
    await expect(page.locator("#funnel-clicks")).to_have_text(str(totals["clicks"]))
    await expect(page.locator("#funnel-leads")).to_have_text(str(totals["leads"]))
    await expect(page.locator("#funnel-sales")).to_have_text(str(totals["conversions"]))
    await expect(page.locator("#revenue")).to_contain_text(f"{totals['revenue']:,.2f}")
    await expect(page.locator("#match-rate")).to_have_text(
        f"{totals['match_rate'] * 100:.1f}%")
    # Leads per day: the bars add up to the period's leads.
    await page.wait_for_function(
        """n => { const t = [...document.querySelectorAll('#chart svg rect title')];
                 const sum = t.reduce((s, x) => s + parseInt(x.textContent.split(': ')[1]), 0);
                 return t.length > 0 && sum === n }""",
        arg=totals["leads"], timeout=WAIT_MS)
    return totals


async def table(page, selector: str) -> list[list[str]]:
    return await page.eval_on_selector_all(
        f"{selector} tbody tr",
        "rows => rows.map(r => [...r.cells].map(c => c.textContent.trim()))")


async def wait_logged_in(page) -> None:
    _, expect = require_browser()
    await expect(page.locator("#app")).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#login")).to_be_hidden()
    await expect(page.locator("#connections tbody tr")).not_to_have_count(0, timeout=WAIT_MS)


# ==================================================================================================

async def test_dashboard_page_is_one_self_contained_html_page(server):
    async with server.http.get(server.base + "/dashboard") as resp:
        html = await resp.text()
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    assert html.lstrip().lower().startswith("<!doctype html>")
    for element in ("token", "login-error", "period", "funnel-visits", "funnel-clicks",
                    "funnel-leads", "funnel-sales", "match-rate", "match-note", "chart", "group",
                    "groups", "leads", "detail", "detail-list", "connections", "qr"):
        assert f'id="{element}"' in html, element
    # No resource from another host: the only absolute URL is the SVG namespace name, which is
    # an identifier that browsers never fetch.
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", html))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    assert not re.search(r"@import|url\(\s*[\"']?(https?:)?//", html, re.IGNORECASE)


async def test_dashboard_login_funnel_period_table_leads_and_connections(server, browser):
    _, expect = require_browser()
    a, _b = await seed(server)
    recorder = Recorder()
    context, page = await new_page(browser, recorder, viewport={"width": 1200, "height": 900})
    await page.goto(server.base + "/dashboard")
    await expect(page.locator("#token")).to_be_visible()
    await expect(page.locator("#app")).to_be_hidden()

    # A wrong token: a clear message, no dashboard.
    await page.fill("#token", "wt_not-a-real-token")
    await page.click("#login button[type=submit]")
    await expect(page.locator("#login-error")).to_have_text(
        "That token was not accepted. Check it and try again.", timeout=WAIT_MS)
    await expect(page.locator("#app")).to_be_hidden()

    # The right token: the funnel of the last 30 days equals /api/report's totals.
    since = len(recorder.urls)
    await page.fill("#token", a.token)
    await page.click("#login button[type=submit]")
    await wait_logged_in(page)
    assert await page.evaluate("localStorage.getItem('whatstracking_token')") == a.token
    await expect(page.locator("#title")).to_have_text("WhatsTracking · Empresa Teste")
    await expect(page.locator("#period")).to_have_value("30")
    month = await expect_funnel(page, a, await recorder.period(since))
    assert (month["visits"], month["clicks"], month["leads"],
            month["conversions"]) == (16, 12, 6, 2)
    assert month["revenue"] == 550.0
    # 4 of 12 coded clicks became leads: the warning is shown.
    assert month["match_rate"] == 0.3333
    await expect(page.locator("#match-note")).to_have_class("warn")
    # The 30 days before had no clicks: nothing to compare with.
    await expect(page.locator("#match-note")).to_have_text(
        "⚠ low: check that the tracker is on every page and the webhook is delivering")
    # ...in the warning colour (#b45309), not the grey of the other notes.
    await expect(page.locator("#match-note")).to_have_css("color", "rgb(180, 83, 9)")
    await expect(page.locator("#rate-clicks")).not_to_have_css("color", "rgb(180, 83, 9)")

    # The table by source, sortable by its headers.
    rows = page.locator("#groups tbody tr")
    await expect(rows).to_have_count(5, timeout=WAIT_MS)
    by_name = {r[0]: r for r in await table(page, "#groups")}
    assert set(by_name) == {"google", "facebook", "instagram", "meta_ads", "direct"}
    assert by_name["google"][1:4] == ["11", "10", "2"]  # visits, clicks, leads
    assert by_name["facebook"][1:5] == ["4", "1", "1", "1"]
    assert by_name["direct"][1:4] == ["0", "0", "1"]
    await page.click("#groups th[data-sort=visits]")
    await expect(rows.first.locator("td").first).to_have_text("google")
    visits = [int(r[1]) for r in await table(page, "#groups")]
    assert visits == sorted(visits, reverse=True) and visits[0] == 11, visits
    await page.click("#groups th[data-sort=visits]")  # again: ascending
    await expect(rows.last.locator("td").first).to_have_text("google")
    visits = [int(r[1]) for r in await table(page, "#groups")]
    assert visits == sorted(visits), visits
    await page.click("#groups th[data-sort=key]")
    await expect(rows.first.locator("td").first).to_have_text("meta_ads")  # descending first
    names = [r[0] for r in await table(page, "#groups")]
    assert names == sorted(names, reverse=True), names

    # The latest leads; a click opens one lead with its attribution.
    leads = page.locator("#leads tbody tr.lead")
    await expect(leads).to_have_count(6, timeout=WAIT_MS)
    names = [r[1] for r in await table(page, "#leads")]
    assert names == ["Rafael Lima", "Mariana Google", "Pedro Facebook", "Ana Instagram",
                     "Bruno Antigo", "João Orgânico"]  # newest first
    row = page.locator("#leads tr.lead", has_text="Pedro Facebook")
    assert await row.get_attribute("data-lead-id") == str(server.leads["Pedro Facebook"])
    await expect(page.locator("#detail")).to_be_hidden()
    await row.click()
    await expect(page.locator("#detail")).to_be_visible()
    await expect(page.locator("#detail-id")).to_have_text(f"#{server.leads['Pedro Facebook']}")
    pairs = await page.eval_on_selector_all(
        "#detail-list dt",
        "dts => dts.map(dt => [dt.textContent, dt.nextElementSibling.textContent])")
    detail = dict(pairs)
    assert detail["Name"] == "Pedro Facebook"
    assert detail["utm_source"] == "facebook"
    assert detail["utm_campaign"] == "verao"
    assert detail["utm_medium"] == "paid_social"
    assert detail["Match"] == "code (1)"
    assert detail["Connection"] == "loja-centro"

    # Connections, with their state.
    connections = await table(page, "#connections")
    assert [c[:4] for c in connections] == [["loja-centro", "open", f"+{CENTRO}", "Loja Centro"]]

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    # The last 7 days: other numbers, and a good match rate (3 of 3) without the warning.
    since = len(recorder.urls)
    await page.select_option("#period", "7")
    week = await expect_funnel(page, a, await recorder.period(since))
    assert (week["visits"], week["clicks"], week["leads"], week["conversions"]) == (4, 3, 4, 1)
    assert week["revenue"] == 350.0 and week["match_rate"] == 1.0
    await expect(page.locator("#match-note")).not_to_have_class("warn")
    await expect(page.locator("#match-note")).not_to_have_css("color", "rgb(180, 83, 9)")
    await expect(leads).to_have_count(4, timeout=WAIT_MS)
    await expect(page.locator("#leads tr.lead", has_text="Bruno Antigo")).to_have_count(0)
    await expect(page.locator("#groups tbody tr")).to_have_count(4, timeout=WAIT_MS)

    assert recorder.foreign(server.base) == []
    await context.close()


async def test_dashboard_on_a_phone_with_a_remembered_token(server, browser):
    _, expect = require_browser()
    a, _b = await seed(server)
    recorder = Recorder()
    context, page = await new_page(browser, recorder, token=a.token,
                                   viewport={"width": 390, "height": 844}, is_mobile=True,
                                   has_touch=True)
    await page.goto(server.base + "/dashboard")
    await wait_logged_in(page)  # no login form: the token in localStorage was used
    await expect_funnel(page, a, await recorder.period())
    await expect(page.locator("#leads tbody tr.lead")).to_have_count(6, timeout=WAIT_MS)
    await expect(page.locator("#groups tbody tr")).to_have_count(5, timeout=WAIT_MS)
    # Nothing wider than the screen but the tables, which scroll inside their own section.
    overflow = await page.evaluate("document.documentElement.scrollWidth")
    assert overflow <= 390, overflow
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"))
    assert recorder.foreign(server.base) == []
    await context.close()


async def test_dashboard_shows_nothing_of_another_company(server, browser):
    _, expect = require_browser()
    a, b = await seed(server)
    # And a lead whose name and message are HTML: shown as text, never run.
    await a.lead(XSS_NAME, 16, "<script>window.pwned = 1</script>", match="none")
    recorder = Recorder()
    context, page = await new_page(browser, recorder, token=a.token,
                                   viewport={"width": 1200, "height": 900})
    await page.goto(server.base + "/dashboard")
    await wait_logged_in(page)
    await expect_funnel(page, a, await recorder.period())
    await expect(page.locator("#leads tbody tr.lead")).to_have_count(7, timeout=WAIT_MS)
    await expect(page.locator("#leads tr.lead", has_text=XSS_NAME)).to_have_count(1)

    async def assert_clean() -> None:
        text = await page.inner_text("body")
        html = await page.content()
        for secret in BETA_SECRETS:
            assert secret not in text and secret not in html, secret

    await assert_clean()
    for group, expected in (("utm_campaign", "black-friday"), ("utm_medium", "cpc"),
                            ("ad_id", "120212345678900123"), ("connection", "loja-centro"),
                            ("utm_source", "google")):
        await page.select_option("#group", group)
        await expect(page.locator("#groups tbody td", has_text=expected).first).to_be_visible(
            timeout=WAIT_MS)
        await assert_clean()
    for n in range(await page.locator("#leads tbody tr.lead").count()):
        await page.locator("#leads tbody tr.lead").nth(n).click()
        await expect(page.locator("#detail")).to_be_visible()
        await assert_clean()
    await page.locator("#leads tr.lead", has_text=XSS_NAME).click()
    await expect(page.locator("#detail-list")).to_contain_text("<script>window.pwned = 1</script>")
    assert await page.evaluate("window.pwned") is None
    assert not any(urllib.parse.urlsplit(u).path == "/x.png" for u in recorder.urls)
    assert recorder.foreign(server.base) == []
    await context.close()

    # The other company's own token does show its data (the check above is not vacuous).
    context, page = await new_page(browser, Recorder(), token=b.token,
                                   viewport={"width": 1200, "height": 900})
    await page.goto(server.base + "/dashboard")
    await wait_logged_in(page)
    await expect(page.locator("#leads tbody tr.lead", has_text="Segredo Beta")).to_have_count(
        1, timeout=WAIT_MS)
    await expect(page.locator("#connections tbody")).to_contain_text("beta-conn")
    await expect(page.locator("#leads tbody")).not_to_contain_text("Pedro Facebook")
    await context.close()


async def test_dashboard_warns_when_the_match_rate_drops(server, browser):
    """7 days: 3 of 5 coded clicks became leads (60%, not low) after 2 of 2 the week before:
    a drop of more than 15 points is a warning too. Over 30 days (5 of 7, nothing before) it is
    not."""
    _, expect = require_browser()
    a = await server.company("empresa-123", "Empresa Teste")
    await a.connect("loja-centro", CENTRO, "Loja Centro")
    code = whatstracking.message_code
    for days_ago, converts in ((12, True), (10, True), (6, True), (5, True), (4, True),
                               (3, False), (2, False)):
        v = await a.visit(GOOGLE, days_ago, click=CENTRO)
        if converts:
            await a.lead(f"Cliente {days_ago}", days_ago - 0.01, f"Oi {code(v['code'])}")
    recorder = Recorder()
    context, page = await new_page(browser, recorder, token=a.token,
                                   viewport={"width": 1200, "height": 900})
    await page.goto(server.base + "/dashboard")
    await wait_logged_in(page)
    month = await expect_funnel(page, a, await recorder.period())
    assert month["match_rate"] == 0.7143
    await expect(page.locator("#match-note")).to_have_text("coded clicks that became leads")
    await expect(page.locator("#match-note")).not_to_have_class("warn")

    since = len(recorder.urls)
    await page.select_option("#period", "7")
    week = await expect_funnel(page, a, await recorder.period(since))
    assert week["match_rate"] == 0.6
    await expect(page.locator("#match-note")).to_have_class("warn")
    await expect(page.locator("#match-note")).to_have_text(
        "⚠ low or dropping (was 100.0%): check that the tracker is on every page and the "
        "webhook is delivering")
    assert recorder.foreign(server.base) == []
    await context.close()
