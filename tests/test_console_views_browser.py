"""The console's data views (reports, leads, a lead's page, settings) in a real headless Chromium,
in pt-BR and en, against the real server.

The server runs on 127.0.0.1 (aiohttp AppRunner + TCPSite, SQLite in tmp_path) with a fake Meta
Conversions API (tests/fake_platforms.py, META_GRAPH_URL) and data seeded through the public API,
placed in time with direct SQL. What the pages show is compared with what the API answers for the
same period and filters. Screenshots of every view at 1366×900 and 390×844 in both languages go to
tests/artifacts/console-<view>-<lang>-<desktop|phone>.png.

Needs Debian's /usr/bin/chromium and the Python playwright package; without them the tests are
skipped, or fail when REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import pathlib
import re
import time
import urllib.parse
import uuid

import aiohttp
import pytest
import pytest_asyncio
from conftest import free_port, require_browser, serve
from fake_evolution import GLOBAL_KEY, FakeEvolution
from fake_platforms import FakeMeta, new_service_account

import whatstracking

TESTS = pathlib.Path(__file__).resolve().parent
ARTIFACTS = TESTS / "artifacts"
FIXTURES = TESTS / "fixtures"
ADMIN_TOKEN = "admin-views-token"
CENTRO = "5511900001111"
DAY = 86400
WAIT_MS = 15_000
UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36"
DATASET = "1234567890123456"
META_TOKEN = "EAAB-meta-secret-token-views"
LANGS = ("pt-BR", "en")
DESKTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}

GOOGLE = "utm_source=google&utm_medium=cpc&utm_campaign=black-friday"
FACEBOOK = "utm_source=facebook&utm_medium=paid_social&utm_campaign=verao"
INSTAGRAM = "utm_source=instagram&utm_medium=social&utm_campaign=stories"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text("utf-8"))


# ---- the server and its data ---------------------------------------------------------------------

class Company:
    """One company of the running server, seeded through its HTTP API."""

    def __init__(self, server: "Server", created: dict) -> None:
        self.server, self.id, self.token = server, created["company_id"], created["token"]
        self.secret = created["webhook_secret"]
        self.auth = {"Authorization": f"Bearer {self.token}"}
        self._phones = iter(range(10_000, 99_999))

    async def call(self, method: str, path: str, expect: int = 200, **kwargs):
        kwargs.setdefault("headers", self.auth)
        async with self.server.http.request(method, self.server.base + path, **kwargs) as resp:
            data = await (resp.json() if "json" in resp.content_type else resp.text())
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

    async def visit(self, utm: str | None, days_ago: float, click: str | None = None,
                    extra: str = "") -> dict:
        page = "https://loja.test/promo" + (f"?{utm}{extra}" if utm else "")
        visitor = uuid.uuid4().hex
        headers = {"User-Agent": UA}
        answer = await self.call("POST", "/tracking", headers=headers, json={
            "company_id": self.id, "visitor_id": visitor, "page_url": page,
            "referrer": "https://www.google.com/"})
        if click:
            await self.call("POST", "/tracking", headers=headers, json={
                "company_id": self.id, "visitor_id": visitor, "page_url": page,
                "event": "whatsapp_click", "whatsapp_phone": click, "code": answer["code"]})
        created = time.time() - days_ago * DAY
        await self.sql("UPDATE visits SET created_at = ?, clicked_at = CASE WHEN clicked_at IS "
                       "NULL THEN NULL ELSE ? END WHERE id = ?", created, created + 60,
                       answer["session_id"])
        return answer

    async def lead(self, name: str, days_ago: float, text: str = "Olá!", match: str = "code",
                   envelope: dict | None = None, phone: str | None = None) -> int:
        if envelope is None:
            envelope = fixture("messages-upsert-conversation")
            key = envelope["data"]["key"]
            key["id"] = uuid.uuid4().hex.upper()
            number = phone or "55319%04d1234" % (next(self._phones) % 10000)
            key["remoteJid"] = f"{number}@s.whatsapp.net"
            key.pop("remoteJidAlt", None)
            envelope["instance"] = "loja-centro"
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


class Server:
    def __init__(self, base: str, app, http: aiohttp.ClientSession, meta: FakeMeta) -> None:
        self.base, self.app, self.http, self.meta = base, app, http, meta
        self.leads: dict[str, int] = {}

    async def company(self, company_id: str, name: str) -> Company:
        async with self.http.post(f"{self.base}/api/companies",
                                  json={"company_id": company_id, "name": name},
                                  headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
            data = await resp.json()
            assert resp.status == 201, data
        return Company(self, data)


async def seed(server: Server, organic: int = 0) -> Company:
    """empresa-123 (America/Sao_Paulo). Last 7 days: 4 visits, 3 clicks that became leads, a
    Click-to-WhatsApp lead, a purchase of 350. 9–20 days ago: 12 visits, 9 clicks of which one
    became a lead, an organic lead, a purchase of 200. ``organic`` more organic leads 5–6 days
    ago (to have more than one page of leads)."""
    a = await server.company("empresa-123", "Loja Centro Modas")
    await a.connect("loja-centro", CENTRO, "Loja Centro")
    code = whatstracking.message_code
    leads = server.leads
    for n in range(3):
        await a.visit(FACEBOOK, 18 + n)
    leads["João Orgânico"] = await a.lead("João Orgânico", 15, "Vocês abrem sábado?",
                                          match="none")
    for n in range(8):
        await a.visit(GOOGLE, 9 + n, click=CENTRO)
    v = await a.visit(GOOGLE, 12, click=CENTRO)
    leads["Bruno Antigo"] = await a.lead("Bruno Antigo", 11.99, f"Ainda vale? {code(v['code'])}")
    await a.event(leads["Bruno Antigo"], "purchase", 10, 200)
    for n in range(organic):
        leads[f"Cliente {n:02d}"] = await a.lead(f"Cliente {n:02d}", 6 - n / 100, "Oi",
                                                 match="none")
    v = await a.visit(INSTAGRAM, 4, click=CENTRO)
    leads["Ana Instagram"] = await a.lead("Ana Instagram", 3.99, f"{code(v['code'])} tem P?",
                                          phone="5511987654321")
    v = await a.visit(FACEBOOK, 3, click=CENTRO, extra="&fbclid=IwAR2xYzAbCdEf_fbclid-test")
    leads["Pedro Facebook"] = await a.lead(
        "Pedro Facebook", 2.99, f"Oi, queria saber do 30% OFF por favor {code(v['code'])}")
    v = await a.visit(GOOGLE, 2, click=CENTRO, extra="&gclid=EAIaIQobChMI-gclid-views")
    leads["Mariana Google"] = await a.lead("Mariana Google", 1.99, f"Quero {code(v['code'])}")
    await a.visit(GOOGLE, 1)
    leads["Rafael Lima"] = await a.lead("Rafael Lima", 1, match="ctwa",
                                        envelope=fixture("messages-upsert-ctwa-ad"))
    await a.event(leads["Pedro Facebook"], "purchase", 1, 350)
    await whatstracking.rebuild_rollup(server.app[whatstracking.DB])
    return a


@contextlib.asynccontextmanager
async def running_server(tmp_path, **settings):
    """The server with a fake Meta; ``settings`` are more of its environment settings."""
    meta = await FakeMeta().start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = whatstracking.load_config({
        "DATABASE_URL": f"sqlite:///{tmp_path / 'wt.db'}", "ADMIN_TOKEN": ADMIN_TOKEN,
        "PUBLIC_URL": base, "LOG_LEVEL": "WARNING", "META_GRAPH_URL": meta.url,
        "DELIVERY_POLL_SECONDS": "0.05", "DELIVERY_RETRY_SECONDS": "0.05",
        "DELIVERY_TIMEOUT": "2", **settings})
    app = whatstracking.create_app(config)
    runner = await serve(app, port)
    try:
        async with aiohttp.ClientSession() as http:
            yield Server(base, app, http, meta)
    finally:
        await runner.cleanup()
        await meta.close()


@pytest_asyncio.fixture
async def server(tmp_path):
    async with running_server(tmp_path) as running:
        yield running


# ---- the browser ---------------------------------------------------------------------------------

async def open_console(browser, server: Server, company: Company, lang: str, view: str,
                       viewport: dict = DESKTOP, downloads: bool = False):
    """A page signed in as the company, in ``lang``, on ``view`` (a hash like overview?range=7d).
    Requests to any host but the server's are refused and recorded."""
    phone = viewport["width"] < 500
    context = await browser.new_context(
        locale="pt-BR" if lang == "pt-BR" else "en-US", timezone_id="America/Sao_Paulo",
        viewport=viewport, is_mobile=phone, has_touch=phone, accept_downloads=downloads)
    foreign: list[str] = []

    async def local_only(route):
        host = urllib.parse.urlsplit(route.request.url).hostname
        if host == "127.0.0.1" or route.request.url.startswith(("data:", "blob:")):
            await route.continue_()
        else:
            foreign.append(route.request.url)
            await route.abort()

    await context.route("**/*", local_only)
    await context.add_init_script(
        f"localStorage.setItem('wt.token', {json.dumps(company.token)});"
        f"localStorage.setItem('wt.lang', {json.dumps(lang)});")
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(f"{server.base}/dashboard#/{view}")
    page.foreign, page.errors = foreign, errors
    return context, page


async def t(page, key: str, **values) -> str:
    return await page.evaluate("([k, v]) => WT.t(k, v)", [key, values])


async def fmt(page, kind: str, *args) -> str:
    return await page.evaluate("([k, a]) => WT.fmt[k](...a)", [kind, list(args)])


async def loaded(page) -> str:
    """The from..to the overview shows, once its numbers are in."""
    await page.wait_for_function(
        "() => document.querySelector('.view-overview') && "
        "document.querySelector('.view-overview').dataset.loaded", timeout=WAIT_MS)
    return await page.evaluate("document.querySelector('.view-overview').dataset.loaded")


async def overview_matches(page, company: Company) -> dict:
    """The funnel, chart and method counts equal /api/report's for the period shown."""
    _, expect = require_browser()
    start, end = (await loaded(page)).split("..")
    report = await company.call("GET", f"/api/report?group_by=day&from={start}&to={end}")
    totals = report["totals"]
    await expect(page.locator("#report-visits")).to_have_text(await fmt(page, "number",
                                                                         totals["visits"]))
    await expect(page.locator("#report-clicks")).to_have_text(await fmt(page, "number",
                                                                         totals["clicks"]))
    await expect(page.locator("#report-leads")).to_have_text(await fmt(page, "number",
                                                                        totals["leads"]))
    await expect(page.locator("#report-sales")).to_have_text(await fmt(page, "number",
                                                                        totals["conversions"]))
    await expect(page.locator("#report-revenue")).to_have_text(
        await fmt(page, "money", totals["revenue"], "BRL"))
    if totals["match_rate"] is not None:
        await expect(page.locator("#report-match-rate")).to_have_text(
            await fmt(page, "percent", totals["match_rate"]))
    await expect(page.locator("#report-without-click")).to_contain_text(
        await fmt(page, "number", totals["leads_without_click"]))
    await page.wait_for_function(
        """n => { const bars = [...document.querySelectorAll('#report-chart rect.v-bar')];
                 return bars.length > 0 &&
                        bars.reduce((s, b) => s + Number(b.dataset.count), 0) === n }""",
        arg=totals["leads"], timeout=WAIT_MS)
    for method, count in totals["leads_by_method"].items():
        await expect(page.locator(f"#report-methods li[data-method={method}] .num")).to_contain_text(
            await fmt(page, "number", count))
    return report


async def no_rate_above_100(page) -> None:
    text = await page.inner_text("#wt-main")
    for value in re.findall(r"(\d+(?:[.,]\d+)?)\s?%", text):
        assert float(value.replace(",", ".")) <= 100, (value, text)


NO_MID_WORD_BREAK = """() => {
  const bad = [];
  const walker = document.createTreeWalker(document.querySelector('#wt-main'),
                                           NodeFilter.SHOW_TEXT);
  let node;
  while ((node = walker.nextNode())) {
    const el = node.parentElement;
    if (!el || el.closest('.v-token, pre, svg, select, option')) continue;
    if (!el.getClientRects().length) continue;
    const words = /[\\p{L}\\p{N}]{2,}/gu;
    let m;
    while ((m = words.exec(node.data))) {
      const range = document.createRange();
      range.setStart(node, m.index);
      range.setEnd(node, m.index + m[0].length);
      const tops = new Set([...range.getClientRects()].filter(r => r.width > 0)
                             .map(r => Math.round(r.top)));
      if (tops.size > 1) bad.push(m[0]);
    }
  }
  return bad;
}"""


async def phone_fits(page) -> None:
    width = await page.evaluate("document.scrollingElement.scrollWidth")
    assert width <= 390, width
    broken = await page.evaluate(NO_MID_WORD_BREAK)
    assert broken == [], broken


RAW_KEY = re.compile(r"\b(app|common|nav|error|range|leads|lead|reports|method|settings|deliveries|"
                     r"events)\.[a-z0-9_]+\b")
# English of these views that must never show in pt-BR.
ENGLISH = ("Reports", "Leads per day", "Match rate", "Source", "Campaign", "Settings", "Save",
           "Purchase", "Qualified", "Refund", "Lost", "delivered", "Send again", "organic",
           "site code", "time window", "Load more", "Download CSV", "Attribution", "Breakdown",
           "Visits", "Sales", "Revenue", "without a click", "Sign out", "Loading", "Failed",
           "Where this lead came from", "First message", "Phone", "Search")


async def clean_text(page, lang: str) -> None:
    """No dictionary key left raw; no English in pt-BR."""
    text = await page.inner_text("#wt-main")
    for name in whatstracking.DEFAULT_GOOGLE_ADS_CONVERSIONS.values():  # names Google Ads uses
        text = text.replace(name, "")
    assert not RAW_KEY.search(text), RAW_KEY.search(text).group(0)
    if lang == "pt-BR":
        for word in ENGLISH:
            assert not re.search(rf"\b{word}\b", text), (word, text[:3000])


async def shot(page, view: str, lang: str, where: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.evaluate("window.scrollTo(0, 0)")  # the sticky header where it belongs
    await page.wait_for_timeout(250)  # toasts and bars settle
    await page.screenshot(path=str(ARTIFACTS / f"console-{view}-{lang}-{where}.png"),
                          full_page=True)


# ==================================================================================================
# Reports
# ==================================================================================================

@pytest.mark.parametrize("lang", LANGS)
async def test_overview_numbers_equal_the_report_for_preset_and_custom_ranges(server, browser,
                                                                              lang):
    _, expect = require_browser()
    a = await seed(server)
    context, page = await open_console(browser, server, a, lang, "overview")
    await expect(page.locator("html")).to_have_attribute("lang", lang)

    # The last 30 days (the default): 16 visits, 12 clicks, 6 leads, 2 sales, 550 of revenue.
    month = (await overview_matches(page, a))["totals"]
    assert (month["visits"], month["clicks"], month["leads"], month["conversions"]) == (
        16, 12, 6, 2)
    assert month["leads_without_click"] == 2 and month["leads_with_click"] == 4
    # 4 of 12 coded clicks became leads: the warning is shown.
    await expect(page.locator("#report-match-rate-note")).to_have_class("warn")
    await expect(page.locator("#report-match-rate-note")).to_have_text(
        await t(page, "reports.funnel.match_low"))
    # Match methods and (none)/direct in plain words, the explanation of the two rates.
    words = {"pt-BR": ("código do site", "anúncio Click-to-WhatsApp", "janela de tempo",
                       "orgânico"),
             "en": ("site code", "Click-to-WhatsApp ad", "time window", "organic")}[lang]
    for method, word in zip(("code", "ctwa", "window", "none"), words):
        await expect(page.locator(f"#report-methods li[data-method={method}]")).to_contain_text(
            word)
    await expect(page.locator("#report-explain")).to_contain_text(
        await t(page, "reports.explain.match_title"))
    await expect(page.locator("#report-explain")).to_contain_text(
        await t(page, "reports.explain.click_title"))
    rows = page.locator("#report-groups tbody tr")
    await expect(rows).to_have_count(5, timeout=WAIT_MS)
    names = await page.eval_on_selector_all("#report-groups tbody td:first-child",
                                            "tds => tds.map(td => td.textContent)")
    assert await t(page, "reports.source.direct") in names
    assert await t(page, "reports.source.meta_ads") in names
    assert "direct" not in names and "meta_ads" not in names and "(none)" not in names
    # By campaign: the leads with no campaign are named, and no rate goes above 100%.
    await page.select_option("#report-group", "utm_campaign")
    await expect(page.locator("#report-groups tbody tr",
                              has_text=await t(page, "reports.none.utm_campaign"))).to_have_count(1)
    by_campaign = (await a.call("GET", "/api/report?group_by=utm_campaign&" +
                                urllib.parse.urlencode(dict(zip(("from", "to"), (
                                    await loaded(page)).split(".."))))))["rows"]
    await expect(rows).to_have_count(len(by_campaign))
    await no_rate_above_100(page)
    # The chart has a y-axis: counts from 0 up to at least the busiest day.
    ticks = await page.eval_on_selector_all("#report-chart text.v-ytick",
                                            "ts => ts.map(t => t.textContent)")
    assert ticks[0] == "0" and len(ticks) >= 2, ticks

    # The last 7 days, then a custom range: 9 to 20 days ago.
    await page.select_option(".range-picker select", "7d")
    await expect(page.locator("#report-leads")).to_have_text("4", timeout=WAIT_MS)
    week = (await overview_matches(page, a))["totals"]
    assert (week["visits"], week["clicks"], week["leads"]) == (4, 3, 4)
    await expect(page.locator("#report-match-rate-note")).not_to_have_class("warn")

    today = await page.evaluate("new Date().toLocaleDateString('en-CA')")
    day = lambda n: (await_day(today, n))  # noqa: E731
    await page.select_option(".range-picker select", "custom")
    await page.fill(".range-picker input[name=from]", day(-20))
    await page.fill(".range-picker input[name=to]", day(-9))
    await page.locator(".range-picker input[name=to]").dispatch_event("change")
    await page.wait_for_function(
        "want => document.querySelector('.view-overview').dataset.loaded === want",
        arg=f"{day(-20)}..{day(-9)}", timeout=WAIT_MS)
    custom = (await overview_matches(page, a))["totals"]
    assert (custom["visits"], custom["leads"], custom["conversions"]) == (12, 2, 1)
    # The range is in the address: a reload shows the same period.
    assert "range=custom" in page.url and f"from={day(-20)}" in page.url
    await page.reload()
    assert await loaded(page) == f"{day(-20)}..{day(-9)}"
    assert page.errors == [] and page.foreign == []
    await context.close()


def await_day(today: str, offset: int) -> str:
    import datetime
    return (datetime.date.fromisoformat(today) + datetime.timedelta(days=offset)).isoformat()


# ==================================================================================================
# Leads
# ==================================================================================================

async def test_leads_filters_search_pagination_and_csv(server, browser):
    _, expect = require_browser()
    a = await seed(server, organic=52)
    context, page = await open_console(browser, server, a, "pt-BR", "leads", downloads=True)
    rows = page.locator("#leads-table tbody tr")
    # 58 leads in 30 days: a page of 50, then "carregar mais".
    await expect(rows).to_have_count(50, timeout=WAIT_MS)
    await expect(page.locator("#leads-more")).to_be_visible()
    await expect(page.locator("#leads-more")).to_have_text(await t(page, "common.more"))
    await page.click("#leads-more")
    await expect(rows).to_have_count(58, timeout=WAIT_MS)
    await expect(page.locator("#leads-more")).to_be_hidden()
    names = await page.eval_on_selector_all("#leads-table tbody tr td:first-child",
                                            "tds => tds.map(td => td.textContent)")
    assert names[0] == "Rafael Lima" and len(set(names)) == 58  # newest first, none twice
    # Phones formatted for people, methods in plain words.
    await expect(page.locator("#leads-table tr", has_text="Ana Instagram")).to_contain_text(
        "+55 11 98765-4321")
    await expect(page.locator("#leads-table tr", has_text="Rafael Lima")).to_contain_text(
        "anúncio Click-to-WhatsApp")

    # Filters offer the values of the period: sources, campaigns, numbers, methods.
    sources = await page.eval_on_selector_all("#leads-filter-utm_source option",
                                              "os => os.map(o => o.value)")
    assert set(sources) >= {"", "google", "facebook", "instagram", "direct", "meta_ads"}
    connections = await page.eval_on_selector_all("#leads-filter-connection option",
                                                  "os => os.map(o => o.value)")
    assert "loja-centro" in connections
    await page.select_option("#leads-filter-utm_source", "google")
    await expect(rows).to_have_count(2, timeout=WAIT_MS)
    shown = await page.eval_on_selector_all("#leads-table tbody tr td:first-child",
                                            "tds => tds.map(td => td.textContent)")
    api = await a.call("GET", "/api/leads?utm_source=google")  # all seeded leads are recent
    assert shown == [lead["name"] for lead in api["leads"]] == ["Mariana Google", "Bruno Antigo"]
    await page.select_option("#leads-filter-utm_source", "")
    await page.select_option("#leads-filter-match_method", "code")
    await expect(rows).to_have_count(4, timeout=WAIT_MS)
    await page.select_option("#leads-filter-utm_campaign", "verao")
    await expect(rows).to_have_count(1, timeout=WAIT_MS)
    await expect(rows.first).to_contain_text("Pedro Facebook")
    # The filters are in the address (a reload keeps them).
    assert "match_method=code" in page.url and "utm_campaign=verao" in page.url
    await page.reload()
    await expect(rows).to_have_count(1, timeout=WAIT_MS)
    await expect(page.locator("#leads-filter-utm_campaign")).to_have_value("verao")
    await page.click("#leads-clear")
    await expect(rows).to_have_count(50, timeout=WAIT_MS)

    # Search by name (any case) and by phone digits.
    await page.fill("#leads-q", "mariana")
    await expect(rows).to_have_count(1, timeout=WAIT_MS)
    await expect(rows.first).to_contain_text("Mariana Google")
    await page.fill("#leads-q", "98765")
    await expect(rows).to_have_count(1, timeout=WAIT_MS)
    await expect(rows.first).to_contain_text("Ana Instagram")
    await page.fill("#leads-q", "ninguém-com-esse-nome")
    await expect(page.locator("#leads-list .empty")).to_contain_text(
        await t(page, "leads.empty_filtered"))
    await page.fill("#leads-q", "cliente")
    await expect(rows).to_have_count(50, timeout=WAIT_MS)
    await page.click("#leads-more")
    await expect(rows).to_have_count(52, timeout=WAIT_MS)

    # The CSV has the same filters: the 52 "Cliente" leads.
    async with page.expect_download() as info:
        await page.click("#leads-csv")
    download = await info.value
    content = pathlib.Path(await download.path()).read_text("utf-8-sig")
    table = list(csv.DictReader(io.StringIO(content)))
    assert len(table) == 52 and all(r["name"].startswith("Cliente") for r in table)
    assert download.suggested_filename.endswith(".csv")

    # A row opens the lead's own page, scrolled to the top.
    await page.fill("#leads-q", "")
    await page.press("#leads-q", "Enter")
    await expect(rows).to_have_count(50, timeout=WAIT_MS)
    await page.locator("#leads-table tr", has_text="Pedro Facebook").locator("td").first.click()
    await expect(page.locator("#lead-name")).to_have_text("Pedro Facebook", timeout=WAIT_MS)
    assert f"#/lead?id={server.leads['Pedro Facebook']}" in page.url
    assert await page.evaluate("window.scrollY") == 0
    await page.click("#lead-back")
    await expect(rows).to_have_count(50, timeout=WAIT_MS)
    assert page.errors == [] and page.foreign == []
    await context.close()


# ==================================================================================================
# A lead's page: attribution, a purchase by clicking that reaches Meta, a failed delivery retried
# ==================================================================================================

@pytest.mark.parametrize("lang", LANGS)
async def test_lead_page_purchase_reaches_meta_and_a_failed_delivery_is_retried(server, browser,
                                                                               lang):
    _, expect = require_browser()
    a = await seed(server)
    await a.call("PATCH", "/api/company", json={"meta": {"dataset_id": DATASET,
                                                         "access_token": META_TOKEN}})
    lead = server.leads["Mariana Google"]
    context, page = await open_console(browser, server, a, lang, f"lead?id={lead}")
    await expect(page.locator("#lead-name")).to_have_text("Mariana Google", timeout=WAIT_MS)
    attribution = page.locator("#lead-attribution")
    for text in ("google", "cpc", "black-friday", "EAIaIQobChMI-gclid-views", "loja.test"):
        await expect(attribution).to_contain_text(text)
    await expect(attribution).to_contain_text(await t(page, "lead.field.gclid"))
    await expect(page.locator("dd[data-field=match_method]")).to_have_text(
        await t(page, "method.code"))
    await expect(page.locator("dd[data-field=confidence]")).to_have_text(
        await t(page, "method.confidence.sure"))
    await expect(page.locator("#lead-message")).to_contain_text("Quero [ref ")
    # No field names of the API on the page.
    text = await page.evaluate("""() => {
        const copy = document.querySelector('#wt-main').cloneNode(true);
        copy.querySelectorAll('.v-url, .v-token, pre').forEach(e => e.remove());
        return copy.textContent }""")
    for raw in ("utm_source", "utm_medium", "match_method", "confidence", "landing_page"):
        assert raw not in text, raw

    # A purchase by clicking: value and currency (the company's by default).
    await page.click("#lead-actions [data-action=purchase]")
    dialog = page.locator("dialog.wt-dialog")
    await expect(dialog).to_be_visible()
    await expect(dialog.locator("input[name=currency]")).to_have_value("BRL")
    await dialog.locator("input[name=value]").fill("349.90")
    await dialog.locator(".dialog-actions .btn.primary").click()
    await expect(dialog).to_have_count(0)
    await expect(page.locator("#lead-events li[data-event=purchase]")).to_contain_text(
        await fmt(page, "money", 349.9, "BRL"), timeout=WAIT_MS)
    delivered = page.locator("[data-destination=meta][data-status=delivered]")
    await expect(delivered).to_have_count(1, timeout=WAIT_MS)
    await expect(delivered).to_contain_text(await t(page, "deliveries.status.delivered"))
    purchases = [e for e in server.meta.events if e["event_name"] == "Purchase"]
    assert len(purchases) == 1 and purchases[0]["custom_data"]["value"] == 349.9
    assert purchases[0]["custom_data"]["currency"] == "BRL"
    # The platform's answer, collapsed, readable when opened.
    await delivered.locator("details summary").click()
    await expect(delivered.locator("pre.v-json")).to_contain_text('"events_received": 1')

    # Meta refuses the next one: the delivery fails with Meta's words; "send again" works.
    server.meta.fail("400")
    await page.click("#lead-actions [data-action=qualified]")
    failed = page.locator("[data-destination=meta][data-status=failed]")
    await expect(failed).to_have_count(1, timeout=WAIT_MS)
    await expect(failed).to_contain_text("400")
    await failed.locator("details summary").click()
    await expect(failed.locator("pre.v-json")).to_contain_text("OAuthException")
    await failed.locator("[data-retry]").click()
    await expect(page.locator("[data-destination=meta][data-status=delivered]")).to_have_count(
        2, timeout=WAIT_MS)
    assert [e["event_name"] for e in server.meta.events] == ["Purchase", "QualifiedLead"]

    # "Lost" asks first; cancelling records nothing, confirming records it.
    await page.click("#lead-actions [data-action=lost]")
    await expect(dialog).to_be_visible()
    await page.keyboard.press("Escape")
    await expect(dialog).to_have_count(0)
    await expect(page.locator("#lead-events li[data-event=lost]")).to_have_count(0)
    await page.click("#lead-actions [data-action=lost]")
    await dialog.locator(".dialog-actions .btn.danger").click()
    await expect(page.locator("#lead-events li[data-event=lost]")).to_have_count(
        1, timeout=WAIT_MS)
    events = (await a.call("GET", f"/api/leads/{lead}/events"))["events"]
    assert [e["name"] for e in events] == ["lead", "purchase", "qualified", "lost"]
    assert page.errors == [] and page.foreign == []
    await context.close()


# ==================================================================================================
# A lead's page: erasing the person (LGPD)
# ==================================================================================================

@pytest.mark.parametrize("lang", LANGS)
async def test_lead_erasure_removes_the_person_and_says_what_was_erased(server, browser, lang):
    _, expect = require_browser()
    a = await seed(server)
    await a.call("PATCH", "/api/company", json={"meta": {"dataset_id": DATASET,
                                                         "access_token": META_TOKEN}})
    lead = server.leads["Ana Instagram"]
    await a.call("POST", f"/api/leads/{lead}/events", 201, json={"name": "qualified"})
    await eventually_delivered(a, (await a.call(
        "GET", f"/api/deliveries?lead_id={lead}"))["deliveries"][0]["id"])
    before = await a.call("GET", f"/api/leads/{lead}")
    context, page = await open_console(browser, server, a, lang, "leads")
    # The list opens a lead by keyboard: Tab to its name, Enter.
    link = page.locator(f"#leads-table tr[data-lead-id='{lead}'] a")
    await link.focus()
    await page.keyboard.press("Enter")
    await expect(page.locator("#lead-name")).to_have_text("Ana Instagram", timeout=WAIT_MS)
    assert f"#/lead?id={lead}" in page.url

    # Asked first, with a danger button; Escape keeps everything.
    button = page.locator("#lead-erase-button")
    await expect(button).to_have_text(await t(page, "lead.erase"))
    await button.click()
    dialog = page.locator("dialog.wt-dialog")
    await expect(dialog).to_contain_text("+55 11 98765-4321")
    await expect(dialog.locator(".dialog-actions .btn.danger")).to_have_text(
        await t(page, "lead.erase_confirm"))
    await shot(page, "lead-erase-confirm", lang, "desktop")
    await page.keyboard.press("Escape")
    await expect(dialog).to_have_count(0)
    await a.call("GET", f"/api/leads/{lead}")

    # Confirmed: back on the list, what was erased in numbers, the lead gone for the API too.
    await button.click()
    await dialog.locator(".dialog-actions .btn.danger").click()
    erased = page.locator("#lead-erased")
    await expect(erased).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("dialog.wt-dialog h2")).to_have_text(
        await t(page, "lead.erased_title"))
    counts = {"leads": 1, "lead_events": len(before["events"]),
              "deliveries": len(before["deliveries"]), "contacts": 1}
    assert counts["lead_events"] == 2 and counts["deliveries"] == 1  # lead, qualified; its Meta send
    for key, count in counts.items():
        await expect(erased.locator(f"dd[data-erased={key}]")).to_have_text(
            await fmt(page, "number", count))
    assert int(await erased.locator("dd[data-erased=messages]").inner_text()) >= 1
    assert "#/leads" in page.url
    await shot(page, "lead-erased", lang, "desktop")
    await dialog.locator(".dialog-actions button").click()
    await expect(dialog).to_have_count(0)
    rows = page.locator("#leads-table tbody tr")
    await expect(rows).to_have_count(5, timeout=WAIT_MS)
    await expect(page.locator("#leads-table")).not_to_contain_text("Ana Instagram")
    await a.call("GET", f"/api/leads/{lead}", 404)
    left = (await a.call("GET", "/api/leads?q=98765"))["leads"]
    assert left == []
    assert page.errors == [] and page.foreign == []
    await context.close()


# ==================================================================================================
# Settings
# ==================================================================================================

@pytest.mark.parametrize("lang", LANGS)
async def test_settings_saved_read_back_secrets_write_only_errors_in_the_language(server, browser,
                                                                                 lang):
    _, expect = require_browser()
    a = await seed(server)
    context, page = await open_console(browser, server, a, lang, "settings", downloads=True)
    form = page.locator("#settings-attribution")
    await expect(form.locator("input[name=attribution_window_days]")).to_have_value("30",
                                                                                    timeout=WAIT_MS)
    # A bad value: the API's 400 shown next to the form, in the user's language.
    await form.locator("input[name=attribution_window_days]").fill("999")
    await form.locator("button[type=submit]").click()
    await expect(page.locator("#settings-attribution-error")).to_have_text(
        await t(page, "settings.error.attribution_window_days"), timeout=WAIT_MS)
    assert (await a.call("GET", "/api/company"))["attribution_window_days"] == 30
    # A good one is saved and read back (after a reload too).
    await form.locator("input[name=attribution_window_days]").fill("14")
    await form.locator("input[name=window_match]").check()
    await form.locator("button[type=submit]").click()
    await expect(page.locator("#settings-attribution-saved")).to_have_text(
        await t(page, "common.saved"), timeout=WAIT_MS)
    company = await a.call("GET", "/api/company")
    assert company["attribution_window_days"] == 14 and company["window_match"] is True

    region = page.locator("#settings-region")
    await region.locator("textarea[name=allowed_origins]").fill("https://loja.com.br/path")
    await region.locator("button[type=submit]").click()
    await expect(page.locator("#settings-region-error")).to_contain_text(
        "https://loja.com.br/path", timeout=WAIT_MS)
    await region.locator("textarea[name=allowed_origins]").fill(
        "https://loja.com.br\nhttps://www.loja.com.br")
    await region.locator("input[name=timezone]").fill("America/Manaus")
    await region.locator("select[name=currency]").select_option("USD")
    await region.locator("button[type=submit]").click()
    await expect(page.locator("#settings-region-saved")).to_have_text(
        await t(page, "common.saved"), timeout=WAIT_MS)
    company = await a.call("GET", "/api/company")
    assert company["allowed_origins"] == ["https://loja.com.br", "https://www.loja.com.br"]
    assert (company["timezone"], company["currency"]) == ("America/Manaus", "USD")

    # Labels → events.
    labels = page.locator("#settings-labels")
    await page.click("#settings-label-add")
    await labels.locator("input[name=label]").last.fill("Comprou")
    await labels.locator("select[name=event]").last.select_option("purchase")
    await page.click("#settings-label-add")
    await labels.locator("input[name=label]").last.fill("Perdido")
    await labels.locator("select[name=event]").last.select_option("lost")
    await labels.locator("button[type=submit]").click()
    await expect(page.locator("#settings-labels-saved")).to_have_text(
        await t(page, "common.saved"), timeout=WAIT_MS)
    assert (await a.call("GET", "/api/company"))["label_events"] == {"Comprou": "purchase",
                                                                     "Perdido": "lost"}

    # Meta: the token is write-only — "set" is shown, never the value; it can be replaced.
    meta = page.locator("#settings-meta")
    await meta.locator("input[name='meta.dataset_id']").fill(DATASET)
    await meta.locator("input[name='meta.access_token']").fill(META_TOKEN)
    await meta.locator("button[type=submit]").click()
    await expect(page.locator("#settings-meta [data-secret=access_token]")).to_have_text(
        await t(page, "settings.secret_set"), timeout=WAIT_MS)
    company = await a.call("GET", "/api/company")
    assert company["meta"]["dataset_id"] == DATASET and company["meta"]["access_token_set"]
    set_text = await t(page, "settings.secret_set")
    await page.reload()
    await expect(page.locator("#settings-meta [data-secret=access_token]")).to_have_text(
        set_text, timeout=WAIT_MS)
    assert META_TOKEN not in await page.content()
    values = await page.eval_on_selector_all("input", "is => is.map(i => i.value)")
    assert META_TOKEN not in values
    # Saving again without touching the secret keeps it.
    await meta.locator("input[name='meta.test_event_code']").fill("TEST123")
    await meta.locator("button[type=submit]").click()
    await expect(page.locator("#settings-meta-saved")).to_have_text(
        await t(page, "common.saved"), timeout=WAIT_MS)
    stored = await whatstracking.get_company(server.app[whatstracking.DB], a.id)
    assert stored.settings["meta"]["access_token"] == META_TOKEN
    assert stored.settings["meta"]["test_event_code"] == "TEST123"
    # "Send a test event": Meta's own answer, shown as it came; the event carried the test code.
    await meta.locator("[data-test-destination=meta]").click()
    result = page.locator("#settings-meta-test")
    await expect(result).to_have_attribute("data-ok", "true", timeout=WAIT_MS)
    await expect(result).to_contain_text(await t(page, "settings.test_ok"))
    await expect(result.locator("pre")).to_contain_text('"events_received": 1')
    assert server.meta.events[-1]["_test_event_code"] == "TEST123"
    assert server.meta.events[-1]["event_id"].startswith("test-")
    # A bad CRM address: its error in the user's language.
    crm = page.locator("#settings-crm-webhook")
    await crm.locator("input[name='crm_webhook.url']").fill("ftp://crm.example")
    await crm.locator("input[name='crm_webhook.secret']").fill("s3cret")
    await crm.locator("button[type=submit]").click()
    await expect(page.locator("#settings-crm-webhook-error")).to_have_text(
        await t(page, "settings.error.crm_webhook.url"), timeout=WAIT_MS)

    # Failed deliveries, retried from here.
    server.meta.fail("400")
    await a.call("POST", f"/api/leads/{server.leads['Ana Instagram']}/events", 201,
                 json={"name": "qualified"})
    failed = await eventually_failed(a)
    await page.click("#settings-failed .spread button")
    row = page.locator(f"#settings-failed-table tr[data-delivery='{failed}']")
    await expect(row).to_be_visible(timeout=WAIT_MS)
    await expect(row).to_contain_text(await t(page, "deliveries.destination.meta"))
    await row.locator("[data-retry]").click()
    await expect(page.locator("#settings-failed .empty")).to_be_visible(timeout=WAIT_MS)
    await eventually_delivered(a, failed)

    # The Google Ads CSV: the conversion names to pick from, the file with the chosen one.
    names = await page.eval_on_selector_all("#settings-gads-name option",
                                            "os => os.map(o => o.value)")
    assert names == ["", *company["google_ads_conversion_names"]]
    await a.call("POST", f"/api/leads/{server.leads['Mariana Google']}/events", 201,
                 json={"name": "purchase", "value": 120})
    await page.select_option("#settings-gads-name", "WhatsApp Purchase")
    async with page.expect_download() as info:
        await page.click("#settings-gads-download")
    download = await info.value
    content = pathlib.Path(await download.path()).read_text("utf-8")
    lines = content.strip().splitlines()
    assert lines[0] == "Parameters:TimeZone=America/Manaus"
    assert lines[1].startswith("Google Click ID,GBRAID,WBRAID,Conversion Name")
    rows = [line.split(",") for line in lines[2:]]
    assert [(r[0], r[3], r[5], r[6]) for r in rows] == [
        ("EAIaIQobChMI-gclid-views", "WhatsApp Purchase", "120", "USD")]

    # A secret can be cleared: "set" goes, the API says it is not set any more.
    await meta.locator("[data-clear=access_token]").click()
    await expect(meta.locator("[data-secret=access_token]")).to_have_text(
        await t(page, "settings.secret_will_clear"))
    await meta.locator("button[type=submit]").click()
    await expect(page.locator("#settings-meta [data-secret=access_token]")).to_have_count(
        0, timeout=WAIT_MS)
    await expect(page.locator("#settings-meta input[name='meta.access_token']")).to_be_visible()
    assert (await a.call("GET", "/api/company"))["meta"]["access_token_set"] is False

    # Google Ads through the Data Manager API: the ids, the key (write-only), one conversion
    # action per event. Set up last and removed at once: no event of this walk goes to Google.
    dm = page.locator("#settings-data-manager")
    await dm.locator("input[name='data_manager.customer_id']").fill("123-456-7890")
    await dm.locator("input[name='data_manager.service_account_key']").fill(
        json.dumps(new_service_account()))
    await dm.locator("input[name='data_manager.conversion_actions.purchase']").fill("987654321")
    await dm.locator("button[type=submit]").click()
    await expect(page.locator("#settings-data-manager-saved")).to_have_text(
        await t(page, "common.saved"), timeout=WAIT_MS)
    assert (await a.call("GET", "/api/company"))["data_manager"] == {
        "customer_id": "1234567890", "conversion_actions": {"purchase": "987654321"},
        "enabled": True, "service_account_key_set": True}
    await a.call("PATCH", "/api/company", json={"data_manager": None})
    assert page.errors == [] and page.foreign == []
    await context.close()


@pytest.mark.parametrize("lang", LANGS)
async def test_settings_name_whatsapp_server_event_names_and_google_ads_conversions(tmp_path,
                                                                                   browser, lang):
    """The company's name, its own Evolution server (the key write-only, the server's state as
    GET /api/checks sees it), webhook_auth_required, event names per destination and the Google
    Ads conversion names: saved, read back through the API and after a reload."""
    _, expect = require_browser()
    default, own = await FakeEvolution().start(), await FakeEvolution("own-evo-key-123").start()
    try:
        async with running_server(tmp_path, EVOLUTION_API_URL=default.url,
                                  EVOLUTION_API_KEY=GLOBAL_KEY,
                                  ALLOW_PRIVATE_URLS="true") as server:
            await settings_walk(server, browser, lang, expect, own)
    finally:
        await default.close()
        await own.close()


async def settings_walk(server: Server, browser, lang: str, expect, own: FakeEvolution) -> None:
    a = await server.company("empresa-123", "Loja Centro")
    context, page = await open_console(browser, server, a, lang, "settings")
    state = page.locator("#settings-evolution-state")
    # No server of its own: the operator's default, which answers.
    await expect(state).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
    await expect(state).to_have_text(await t(page, "settings.evolution_state.default_ok"))

    # The name: empty is refused next to the form; a new one is saved and read back.
    name = page.locator("#settings-company input[name=name]")
    await expect(name).to_have_value("Loja Centro")
    await name.fill("  ")
    await page.click("#settings-company button[type=submit]")
    await expect(page.locator("#settings-company-error")).to_have_text(
        await t(page, "settings.error.name"))
    await name.fill("Loja Centro Modas & Acessórios")
    await page.click("#settings-company button[type=submit]")
    await expect(page.locator("#settings-company-saved")).to_have_text(
        await t(page, "common.saved"), timeout=WAIT_MS)
    assert (await a.call("GET", "/api/company"))["name"] == "Loja Centro Modas & Acessórios"

    # Its own Evolution server: a bad address is the API's 400, in the user's language.
    evo = page.locator("#settings-evolution")
    await evo.locator("input[name=evolution_url]").fill("ftp://evolution.loja")
    await evo.locator("button[type=submit]").click()
    await expect(page.locator("#settings-evolution-error")).to_have_text(
        await t(page, "settings.error.evolution_url"), timeout=WAIT_MS)
    assert (await a.call("GET", "/api/company"))["evolution_url"] is None
    auth = evo.locator("input[name=webhook_auth_required]")
    await expect(auth).to_be_checked()
    await evo.locator("input[name=evolution_url]").fill(own.url)
    await evo.locator("input[name=evolution_key]").fill("own-evo-key-123")
    await auth.uncheck()
    await evo.locator("button[type=submit]").click()
    await expect(page.locator("#settings-evolution-saved")).to_have_text(
        await t(page, "common.saved"), timeout=WAIT_MS)
    company = await a.call("GET", "/api/company")
    assert company["evolution_url"] == own.url and company["evolution_key_set"] is True
    assert company["webhook_auth_required"] is False
    stored = await whatstracking.get_company(server.app[whatstracking.DB], a.id)
    assert stored.evolution_key == "own-evo-key-123"
    await expect(state).to_have_text(await t(page, "settings.evolution_state.own_ok"),
                                     timeout=WAIT_MS)
    # The key is write-only: "set ✓", never the value (after a reload too).
    set_text = await t(page, "settings.secret_set")
    await page.reload()
    await expect(page.locator("#settings-evolution [data-secret=evolution_key]")).to_have_text(
        set_text, timeout=WAIT_MS)
    await expect(evo.locator("input[name=evolution_url]")).to_have_value(own.url)
    await expect(evo.locator("input[name=webhook_auth_required]")).not_to_be_checked()
    assert "own-evo-key-123" not in await page.content()
    assert "own-evo-key-123" not in await page.eval_on_selector_all(
        "input", "is => is.map(i => i.value)")
    # A wrong key: the server refuses it, and the page says so.
    await evo.locator("[data-replace=evolution_key]").click()
    await evo.locator("input[name=evolution_key]").fill("not-the-key")
    await evo.locator("button[type=submit]").click()
    await expect(state).to_have_text(await t(page, "settings.evolution_state.own_down"),
                                     timeout=WAIT_MS)
    # Empty address and cleared key: back to the default server.
    await evo.locator("input[name=evolution_url]").fill("")
    await evo.locator("[data-clear=evolution_key]").click()
    await evo.locator("input[name=webhook_auth_required]").check()
    await evo.locator("button[type=submit]").click()
    await expect(state).to_have_text(await t(page, "settings.evolution_state.default_ok"),
                                     timeout=WAIT_MS)
    company = await a.call("GET", "/api/company")
    assert company["evolution_url"] is None and company["evolution_key_set"] is False
    assert company["webhook_auth_required"] is True

    # Meta's event names per path: a new name, one not sent; a box ticked with no name and no
    # default is refused next to the form.
    meta = page.locator("#settings-meta")
    await meta.locator("input[name='meta.dataset_id']").fill(DATASET)
    await meta.locator("input[name='meta.access_token']").fill(META_TOKEN)
    await meta.locator("#settings-meta-names-box summary").click()
    await expect(meta.locator("input[name='name.website.qualified']")).to_have_attribute(
        "placeholder", "QualifiedLead")
    await meta.locator("input[name='name.website.qualified']").fill("Contact")
    # Click-to-WhatsApp: only LeadSubmitted and Purchase go by default; qualified is opt-in.
    await expect(meta.locator("input[name='send.messaging.qualified']")).not_to_be_checked()
    await meta.locator("input[name='send.messaging.purchase']").uncheck()
    await expect(meta.locator("input[name='name.messaging.purchase']")).to_be_disabled()
    await meta.locator("input[name='send.website.refund']").check()
    await meta.locator("button[type=submit]").click()
    await expect(page.locator("#settings-meta-error")).to_contain_text(
        await t(page, "events.name.refund"))
    await meta.locator("input[name='send.website.refund']").uncheck()
    await meta.locator("button[type=submit]").click()
    await expect(page.locator("#settings-meta-saved")).to_have_text(
        await t(page, "common.saved"), timeout=WAIT_MS)
    company = await a.call("GET", "/api/company")
    assert company["meta"]["event_names"] == {"website": {"qualified": "Contact"},
                                              "messaging": {"purchase": None}}
    assert company["meta"]["access_token_set"] and "access_token" not in company["meta"]

    # GA4: a purchase under another name, "lost" not sent.
    ga4 = page.locator("#settings-ga4")
    await ga4.locator("input[name='ga4.measurement_id']").fill("G-VIEWS123")
    await ga4.locator("input[name='ga4.api_secret']").fill("ga4-secret-views")
    await ga4.locator("#settings-ga4-names-box summary").click()
    await ga4.locator("input[name='name.purchase']").fill("compra_whatsapp")
    await ga4.locator("input[name='send.lost']").uncheck()
    await ga4.locator("button[type=submit]").click()
    await expect(page.locator("#settings-ga4-saved")).to_have_text(
        await t(page, "common.saved"), timeout=WAIT_MS)
    assert (await a.call("GET", "/api/company"))["ga4"]["event_names"] == {
        "purchase": "compra_whatsapp", "lost": None}

    # Google Ads: the purchase renamed, leads not exported; the export's list follows.
    gads = page.locator("#settings-gads-names")
    await gads.locator("input[name='name.purchase']").fill("Compra WhatsApp")
    await gads.locator("input[name='send.lead']").uncheck()
    await gads.locator("button[type=submit]").click()
    await expect(page.locator("#settings-gads-names-saved")).to_have_text(
        await t(page, "common.saved"), timeout=WAIT_MS)
    company = await a.call("GET", "/api/company")
    assert company["google_ads_conversions"] == {"purchase": "Compra WhatsApp", "lead": ""}
    assert company["google_ads_conversion_names"] == ["WhatsApp Qualified Lead",
                                                      "Compra WhatsApp"]
    options = await page.eval_on_selector_all("#settings-gads-name option",
                                              "os => os.map(o => o.value)")
    assert options == ["", "WhatsApp Qualified Lead", "Compra WhatsApp"]

    # All of it read back after a reload; no secret on the page.
    await page.reload()
    await expect(page.locator("#settings-company input[name=name]")).to_have_value(
        "Loja Centro Modas & Acessórios", timeout=WAIT_MS)
    await expect(meta.locator("input[name='name.website.qualified']")).to_have_value("Contact")
    await expect(meta.locator("input[name='send.messaging.qualified']")).not_to_be_checked()
    await expect(ga4.locator("input[name='name.purchase']")).to_have_value("compra_whatsapp")
    await expect(ga4.locator("input[name='send.lost']")).not_to_be_checked()
    await expect(gads.locator("input[name='send.lead']")).not_to_be_checked()
    await expect(gads.locator("input[name='name.purchase']")).to_have_value("Compra WhatsApp")
    content = await page.content()
    for secret in (META_TOKEN, "ga4-secret-views"):
        assert secret not in content
    await clean_text(page, lang)
    assert page.errors == [] and page.foreign == []
    await context.close()


async def eventually_failed(a: Company) -> int:
    for _ in range(200):
        rows = (await a.call("GET", "/api/deliveries?status=failed"))["deliveries"]
        if rows:
            return rows[0]["id"]
        await asyncio.sleep(0.05)
    raise AssertionError("no delivery failed")


async def eventually_delivered(a: Company, delivery_id: int) -> None:
    for _ in range(200):
        rows = (await a.call("GET", "/api/deliveries?status=delivered"))["deliveries"]
        if any(r["id"] == delivery_id for r in rows):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"delivery {delivery_id} was not delivered")


# ==================================================================================================
# Phone layout and the screenshots of every view
# ==================================================================================================

@pytest.mark.parametrize("lang", LANGS)
async def test_every_view_fits_a_phone_and_is_photographed(server, browser, lang):
    _, expect = require_browser()
    a = await seed(server)
    await a.call("PATCH", "/api/company", json={
        "meta": {"dataset_id": DATASET, "access_token": META_TOKEN},
        "label_events": {"Comprou": "purchase"}})
    lead = server.leads["Pedro Facebook"]
    await a.call("POST", f"/api/leads/{lead}/events", 201,
                 json={"name": "purchase", "value": 349.9})
    await eventually_delivered(a, (await a.call(
        "GET", f"/api/deliveries?lead_id={lead}"))["deliveries"][0]["id"])
    views = {"overview": "#report-groups tbody tr", "leads": "#leads-table tbody tr",
             f"lead?id={lead}": "[data-status=delivered]", "settings": "#settings-failed .empty"}
    for viewport, where in ((PHONE, "phone"), (DESKTOP, "desktop")):
        context, page = await open_console(browser, server, a, lang, "overview", viewport)
        for view, ready in views.items():
            await page.goto(f"{server.base}/dashboard#/{view}")
            await expect(page.locator(ready).first).to_be_visible(timeout=WAIT_MS)
            name = view.split("?")[0]
            await clean_text(page, lang)
            if where == "phone":
                await phone_fits(page)
                if name == "lead":  # opened as its own page, at the top
                    assert await page.evaluate("window.scrollY") == 0
                    await page.locator("details.v-answer summary").first.click()
                    await phone_fits(page)
            if name == "settings":  # the event-name tables (folded into cards on a phone)
                for summary in await page.locator("details.v-names-box summary").all():
                    await summary.click()
                if where == "phone":
                    await phone_fits(page)
            await shot(page, name, lang, where)
        if where == "phone":
            # A lead opened from the list on a phone: its page, at the top, not a panel below.
            await page.goto(f"{server.base}/dashboard#/leads")
            await expect(page.locator("#leads-table tbody tr").first).to_be_visible(
                timeout=WAIT_MS)
            await page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
            await page.locator("#leads-table tr", has_text="João Orgânico").locator(
                "a").click()
            await expect(page.locator("#lead-name")).to_have_text("João Orgânico",
                                                                  timeout=WAIT_MS)
            assert await page.evaluate("window.scrollY") == 0
            box = await page.locator("#lead-name").bounding_box()
            assert box["y"] < 844, box
        assert page.errors == [] and page.foreign == []
        await context.close()


# ==================================================================================================
# The agency: the admin token acting for a company; an empty company
# ==================================================================================================

async def test_admin_sees_a_company_s_reports_and_leads_and_an_empty_one_says_so(server, browser):
    _, expect = require_browser()
    a = await seed(server)
    await server.company("empresa-vazia", "Empresa Vazia")
    admin = Company(server, {"company_id": "empresa-123", "token": ADMIN_TOKEN,
                             "webhook_secret": ""})
    context, page = await open_console(browser, server, admin, "pt-BR", "overview",
                                       downloads=True)
    await context.add_init_script("localStorage.setItem('wt.companyId', 'empresa-123');")
    await page.evaluate("localStorage.setItem('wt.companyId', 'empresa-123')")
    await page.reload()
    # The admin's calls name the company (company_id): the same numbers as the company's token.
    await overview_matches(page, a)
    await page.goto(f"{server.base}/dashboard#/leads")
    await expect(page.locator("#leads-table tbody tr")).to_have_count(6, timeout=WAIT_MS)
    async with page.expect_download() as info:
        await page.click("#leads-csv")
    rows = list(csv.DictReader(io.StringIO(
        pathlib.Path(await (await info.value).path()).read_text("utf-8-sig"))))
    assert len(rows) == 6
    await page.click(f"#leads-table tr[data-lead-id='{server.leads['Ana Instagram']}'] a")
    await expect(page.locator("#lead-name")).to_have_text("Ana Instagram", timeout=WAIT_MS)

    # A company with nothing yet: words, not bare zeros and empty tables.
    await page.evaluate("() => WT.openCompany('empresa-vazia', true).then(() => WT.go('overview'))")
    await expect(page.locator("#report-table .empty")).to_have_text(
        await t(page, "reports.table_empty"), timeout=WAIT_MS)
    await expect(page.locator("#report-match-rate-note")).to_have_text(
        await t(page, "reports.funnel.match_no_clicks"))
    await page.goto(f"{server.base}/dashboard#/leads")
    await expect(page.locator("#leads-list .empty")).to_have_text(await t(page, "leads.empty"),
                                                                  timeout=WAIT_MS)
    await page.goto(f"{server.base}/dashboard#/settings")
    await expect(page.locator("#settings-meta [data-destination-state=meta]")).to_have_text(
        await t(page, "settings.dest_none"), timeout=WAIT_MS)
    assert page.errors == [] and page.foreign == []
    await context.close()


# ==================================================================================================
# Chat rules: the editor, trying a message, and the events they make on the lead page
# ==================================================================================================

@pytest.mark.parametrize("lang", LANGS)
async def test_chat_rule_edited_tried_saved_and_its_event_shown_on_the_lead(server, browser, lang):
    _, expect = require_browser()
    a = await server.company("empresa-regras", "Loja Regras")
    phone = "5511987650001"
    lead = await a.lead("Camila Souza", 0, "Oi! Quanto custa o vestido azul?", match="none",
                        phone=phone)
    context, page = await open_console(browser, server, a, lang, "settings")
    card = page.locator("#settings-chat-rules")
    await expect(page.locator("#settings-chat-rule-add")).to_be_visible(timeout=WAIT_MS)
    await expect(card.locator("h2")).to_have_text(await t(page, "settings.chat_rules_title"))
    await page.locator("#settings-chat-rule-add").click()
    rule = card.locator(".v-rule").first
    await rule.locator("input[name=keywords]").fill("pedido confirmado, venda fechada")
    await expect(rule.locator("select[name=event]")).to_have_value("purchase")
    await expect(rule.locator("input[name=value]")).to_be_checked()

    # Trying a message uses the rule as edited, before it is saved, and stores nothing.
    await page.locator("#settings-chat-try-text").fill("✅ PEDIDO CONFIRMADO! Total R$ 1.250,00")
    await page.locator("#settings-chat-try").click()
    result = page.locator("#settings-chat-try-result")
    await expect(result.locator("li[data-event=purchase]")).to_contain_text(
        await fmt(page, "money", 1250, "BRL"), timeout=WAIT_MS)
    await expect(result.locator("li[data-event=purchase]")).to_contain_text(
        await t(page, "settings.chat_try_rule", n=1, keyword="pedido confirmado"))
    await card.locator("select[name=chat_try_from]").select_option("customer")
    await page.locator("#settings-chat-try").click()
    await expect(result).to_contain_text(await t(page, "settings.chat_try_nothing"),
                                         timeout=WAIT_MS)
    assert (await a.call("GET", "/api/company"))["chat_rules"] == []
    await shot(page, "settings-chat-rules", lang, "desktop")
    await card.screenshot(path=str(ARTIFACTS / f"console-chat-rules-card-{lang}.png"))

    # A keyword that is only an emoji: the API's 400, in the user's language, nothing saved.
    await rule.locator("input[name=keywords]").fill("✅")
    await card.locator("button[type=submit]").click()
    await expect(page.locator("#settings-chat-rules-error")).to_have_text(
        await t(page, "settings.error.chat_rules.keywords", n=1), timeout=WAIT_MS)
    assert (await a.call("GET", "/api/company"))["chat_rules"] == []
    await rule.locator("input[name=keywords]").fill("pedido confirmado, venda fechada")
    await card.locator("button[type=submit]").click()
    await expect(page.locator("#settings-chat-rules-saved")).to_have_text(
        await t(page, "common.saved"), timeout=WAIT_MS)
    saved = {"from": "business", "keywords": ["pedido confirmado", "venda fechada"],
             "event": "purchase", "value": "from_text"}
    assert (await a.call("GET", "/api/company"))["chat_rules"] == [saved]
    await clean_text(page, lang)

    # The attendant confirms the sale in WhatsApp: the lead page shows the rule's purchase.
    sale = fixture("messages-upsert-from-me")
    sale["data"]["key"].update(id=uuid.uuid4().hex.upper(), remoteJid=f"{phone}@s.whatsapp.net")
    sale["data"]["message"]["conversation"] = "Venda fechada! Total R$ 349,90. Obrigada, Camila 😊"
    answer = await a.webhook(sale)
    assert answer["chat_rules"][0]["value"] == 349.9
    await page.goto(f"{server.base}/dashboard#/lead?id={lead}")
    item = page.locator("#lead-events li[data-event=purchase]")
    await expect(item).to_contain_text(await fmt(page, "money", 349.9, "BRL"), timeout=WAIT_MS)
    await expect(item).to_contain_text(await t(page, "events.source.chat_rule"))
    await expect(item).to_contain_text("“pedido confirmado”, “venda fechada”")
    await expect(item).to_contain_text(await t(page, "settings.chat_rule_from.business"))
    await clean_text(page, lang)
    await shot(page, "lead-chat-rule", lang, "desktop")
    assert page.errors == [] and page.foreign == []
    await context.close()
