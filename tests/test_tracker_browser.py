"""tracker.js in a real headless Chromium (SPEC §5).

A small "customer site" is served on its own port (another origin than the API) with the seed's
snippet. A visitor lands from an ad, moves to a second page and opens WhatsApp three ways; the
WhatsApp URL the browser would open is captured (no traffic leaves 127.0.0.1), its text is sent back
as the first WhatsApp message through the Evolution webhook, and the lead must carry the campaign.

Needs Debian's /usr/bin/chromium and the Python playwright package; without them the tests are
skipped, or fail when REQUIRE_BROWSER=1.
"""
import asyncio
import contextlib
import copy
import gzip
import json
import pathlib
import re
import time
import urllib.parse
import uuid

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from conftest import free_port, serve, served_tracker

ROOT = pathlib.Path(__file__).resolve().parent.parent  # conftest puts it on sys.path

ADMIN_TOKEN = "admin-secret"
COMPANY_ID = "empresa-123"
WHATSAPP_HOSTS = {"wa.me", "api.whatsapp.com", "web.whatsapp.com"}
LANDING_QUERY = "?utm_source=google&utm_campaign=black-friday&gclid=TeSt123"
UPSERT = json.loads((ROOT / "tests/fixtures/messages-upsert-conversation.json").read_text())

PLAIN_LINK = "https://wa.me/5511900001111?text=Quero%20saber%20o%20pre%C3%A7o"
ADDED_LINK = "https://web.whatsapp.com/send?phone=5511900001111&text=Vim%20pelo%20site"
WIDGET_URL = "https://api.whatsapp.com/send?phone=5511900001111&text=Oi"


# ---- The WhatsTracking server and the customer's site ------------------------------------------

class Api:
    def __init__(self, base: str, http: aiohttp.ClientSession, company: dict):
        self.base, self.http, self.company = base, http, company

    async def send_whatsapp_message(self, text: str, phone: str) -> dict:
        """Deliver `text` from `phone` as Evolution's messages.upsert for the company's number."""
        envelope = copy.deepcopy(UPSERT)
        envelope["data"]["message"]["conversation"] = text
        envelope["data"]["key"]["id"] = uuid.uuid4().hex.upper()
        envelope["data"]["key"]["remoteJid"] = f"{phone}@s.whatsapp.net"
        envelope["data"]["key"].pop("remoteJidAlt", None)
        envelope["data"]["messageTimestamp"] = int(time.time())
        async with self.http.post(f"{self.base}/webhook/{COMPANY_ID}", json=envelope,
                                  headers={"X-Webhook-Secret": self.company["webhook_secret"]}) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def lead_from(self, phone: str) -> dict:
        async with self.http.get(f"{self.base}/api/leads", headers={
                "Authorization": f"Bearer {self.company['token']}"}) as r:
            assert r.status == 200, await r.text()
            leads = [lead for lead in (await r.json())["leads"] if lead["phone"] == phone]
        assert len(leads) == 1, f"expected one lead from {phone}, got {leads}"
        return leads[0]


@contextlib.asynccontextmanager
async def running_api(tmp_path: pathlib.Path):
    """The WhatsTracking server on SQLite in tmp_path, with the company COMPANY_ID."""
    import whatstracking

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = whatstracking.load_config({
        "DATABASE_URL": f"sqlite:///{tmp_path}/wt.db", "ADMIN_TOKEN": ADMIN_TOKEN,
        "PUBLIC_URL": base, "LOG_LEVEL": "WARNING"})
    runner = await serve(whatstracking.create_app(config), port)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/api/companies",
                                 json={"company_id": COMPANY_ID, "name": "Empresa"},
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                assert r.status == 201, await r.text()
                company = await r.json()
            yield Api(base, http, company)
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def api(tmp_path):
    async with running_api(tmp_path) as api:
        yield api


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title><link rel="icon" href="data:,"></head>
<body>
{body}
<script>window.whatsappcompanieId='empresa-123'</script>
<script src="{api}/scripts/whatsapp-tracker.js"></script>
</body></html>"""

LANDING_BODY = '<h1>Black Friday</h1><a id="next" href="/produtos">Ver produtos</a>'

PRODUCTS_BODY = f"""<h1>Produtos</h1>
<a id="plain" href="{PLAIN_LINK}">Fale conosco</a>
<button id="widget" onclick="window.open('{WIDGET_URL}')">Chat</button>
<script>
  // A chat widget that adds its link after the page has loaded.
  addEventListener("load", () => setTimeout(() => {{
    const a = document.createElement("a");
    a.id = "added";
    a.href = "{ADDED_LINK}";
    a.textContent = "WhatsApp";
    document.body.appendChild(a);
  }}, 200));
</script>"""


@pytest_asyncio.fixture
async def site(api):
    """The customer's website, on another origin than the API. Yields its base URL."""
    port = free_port()

    def page(title: str, body: str):
        async def handler(request):
            return web.Response(text=PAGE.format(title=title, body=body, api=api.base),
                                content_type="text/html")
        return handler

    app = web.Application()
    app.router.add_get("/", page("Landing", LANDING_BODY))
    app.router.add_get("/produtos", page("Produtos", PRODUCTS_BODY))
    runner = await serve(app, port)
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


# ---- The browser --------------------------------------------------------------------------------

class Visitor:
    """One person (a fresh browser context): records the WhatsApp URLs the browser opened and the
    requests it made. Only 127.0.0.1 is reachable; WhatsApp answers with a blank page."""

    def __init__(self, context):
        self.context = context
        self.whatsapp_urls: list[str] = []
        self.requests = []  # playwright Request objects, in order
        self.page_errors = []  # uncaught errors in the site's pages

    async def route(self, route):
        url = route.request.url
        host = urllib.parse.urlsplit(url).hostname
        if host == "127.0.0.1":
            await route.continue_()
        elif host in WHATSAPP_HOSTS:
            self.whatsapp_urls.append(url)
            await route.fulfill(status=200, content_type="text/html", body="<title>WhatsApp</title>")
        else:
            await route.abort()

    def tracking_bodies(self) -> list[dict]:
        return [json.loads(r.post_data) for r in self.requests
                if r.method == "POST" and r.url.endswith("/tracking")]

    async def whatsapp_text(self) -> str:
        """The prefilled message of the single WhatsApp chat this visitor opened."""
        for _ in range(100):
            if self.whatsapp_urls:
                break
            await asyncio.sleep(0.05)
        assert len(self.whatsapp_urls) == 1, self.whatsapp_urls
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.whatsapp_urls[0]).query)
        return query["text"][0]


@pytest_asyncio.fixture
async def new_visitor(browser):
    contexts = []

    async def make(init_script: str | None = None) -> Visitor:
        context = await browser.new_context()
        contexts.append(context)
        visitor = Visitor(context)
        await context.route("**/*", visitor.route)
        context.on("request", lambda request: visitor.requests.append(request))
        context.on("weberror", lambda error: visitor.page_errors.append(error.error))
        if init_script:  # runs in every document; some (about:blank) deny localStorage
            await context.add_init_script(f"try {{ {init_script} }} catch (e) {{}}")
        return visitor

    yield make
    for context in contexts:
        await context.close()


def is_tracking(response) -> bool:
    return response.url.endswith("/tracking") and response.request.method == "POST"


async def land_then_open_products(visitor: Visitor, site: str, query: str = LANDING_QUERY):
    """The ad click lands on the landing page; the visitor then follows a link to /produtos.
    Each page waits for its pageview to be answered, as a reading visitor would."""
    page = await visitor.context.new_page()
    async with page.expect_response(is_tracking) as landing_pageview:
        await page.goto(site + "/" + query)
    assert (await landing_pageview.value).ok
    async with page.expect_response(is_tracking) as products_pageview:
        await page.click("#next")
    assert (await products_pageview.value).ok
    assert page.url == site + "/produtos"
    return page


# ---- Tests --------------------------------------------------------------------------------------

async def open_plain_link(visitor, page):
    href = await page.get_attribute("#plain", "href")  # what the status bar shows on hover
    assert href.startswith(PLAIN_LINK) and len(href) > len(PLAIN_LINK)
    await page.click("#plain")


async def open_link_added_after_load(visitor, page):
    await page.wait_for_function(
        f"(a => a && a.href.startsWith('{ADDED_LINK}%20'))(document.querySelector('#added'))")
    await page.click("#added")


async def open_widget_window(visitor, page):
    async with visitor.context.expect_page() as popup:
        await page.click("#widget")
    await (await popup.value).wait_for_load_state()


@pytest.mark.parametrize("open_whatsapp, site_text, phone", [
    (open_plain_link, "Quero saber o preço", "5511988880001"),
    (open_link_added_after_load, "Vim pelo site", "5511988880002"),
    (open_widget_window, "Oi", "5511988880003"),
], ids=["plain-link", "link-added-after-load", "window-open-widget"])
async def test_whatsapp_message_from_second_page_becomes_lead_attributed_to_landing_campaign(
        api, site, new_visitor, open_whatsapp, site_text, phone):
    visitor = await new_visitor()
    page = await land_then_open_products(visitor, site)

    await open_whatsapp(visitor, page)

    text = await visitor.whatsapp_text()
    assert text.startswith(site_text + " [ref "), text  # the site's own message is kept
    answer = await api.send_whatsapp_message(text, phone)
    assert answer["match"] == "code", answer
    lead = await api.lead_from(phone)
    assert lead["match_method"] == "code"
    assert lead["code"] and lead["code"] in text
    attribution = lead["attribution"]
    assert attribution["utm_source"] == "google"
    assert attribution["utm_campaign"] == "black-friday"
    assert attribution["gclid"] == "TeSt123"
    landing_pages = {attribution.get("landing_page"), (lead["first_touch"] or {}).get("landing_page")}
    assert site + "/" + LANDING_QUERY in landing_pages, lead
    assert sum(b["event"] == "whatsapp_click" for b in visitor.tracking_bodies()) == 1
    assert not visitor.page_errors


async def test_message_edited_to_only_the_visible_code_still_matches(api, site, new_visitor):
    visitor = await new_visitor()
    page = await land_then_open_products(visitor, site)
    await open_plain_link(visitor, page)
    text = await visitor.whatsapp_text()

    visible_only = "".join(c for c in text if c not in "\u200b\u200c\u200d")
    answer = await api.send_whatsapp_message("oi, " + visible_only.split("[", 1)[1].lower(),
                                             "5511988880004")

    assert answer["match"] == "code", answer


async def test_meta_and_google_cookies_and_fbclid_reach_the_lead(api, site, new_visitor):
    visitor = await new_visitor()
    await visitor.context.add_cookies([
        {"name": "_fbp", "value": "fb.1.1700000000000.1234567890", "url": site},
        {"name": "_ga", "value": "GA1.1.111111111.1700000000", "url": site},
        # GA4's session cookie, in the format gtag.js writes since 2025 (GS2: s<session id>$…)
        {"name": "_ga_ABC123XYZ", "value": "GS2.1.s1700000555$o3$g1$t1700000600$j0$l0$h0",
         "url": site},
    ])
    page = await land_then_open_products(visitor, site, "?utm_source=facebook&fbclid=FbClick1")
    await open_plain_link(visitor, page)

    await api.send_whatsapp_message(await visitor.whatsapp_text(), "5511988880005")

    attribution = (await api.lead_from("5511988880005"))["attribution"]
    assert attribution["utm_source"] == "facebook"
    assert attribution["fbclid"] == "FbClick1"
    assert attribution["fbp"] == "fb.1.1700000000000.1234567890"
    assert attribution["fbc"].startswith("fb.1.") and attribution["fbc"].endswith(".FbClick1")
    assert attribution["ga_client_id"] == "111111111.1700000000"
    assert attribution["ga_session_id"] == "1700000555"  # GA4 attributes the events to it


async def test_code_held_by_another_visitor_is_replaced_by_the_servers_code(api, site, new_visitor):
    first = await new_visitor()
    await land_then_open_products(first, site)
    taken = first.tracking_bodies()[0]["code"]
    # A second person whose browser holds the same code (say, a copied localStorage).
    second = await new_visitor(init_script=(
        "if (!localStorage.whatstracking_visitor)"
        f" localStorage.whatstracking_code = JSON.stringify('{taken}')"))
    page = await land_then_open_products(second, site, "?utm_source=bing&utm_campaign=natal")
    await open_plain_link(second, page)

    text = await second.whatsapp_text()
    assert taken not in text
    await api.send_whatsapp_message(text, "5511988880006")

    lead = await api.lead_from("5511988880006")
    assert lead["code"] != taken
    assert (lead["attribution"]["utm_source"], lead["attribution"]["utm_campaign"]) == ("bing", "natal")


async def test_company_message_format_replaces_the_default_on_links(api, site, new_visitor):
    async with api.http.patch(f"{api.base}/api/company", headers={
            "Authorization": f"Bearer {api.company['token']}"},
            json={"code_mode": "visible", "code_template": "(pedido {code})"}) as r:
        assert r.status == 200, await r.text()
    visitor = await new_visitor()
    page = await land_then_open_products(visitor, site)
    await open_plain_link(visitor, page)

    text = await visitor.whatsapp_text()
    code = visitor.tracking_bodies()[-1]["code"]
    assert text == f"Quero saber o preço (pedido {code})"
    answer = await api.send_whatsapp_message(text, "5511988880007")
    assert answer["match"] == "code", answer


async def test_second_page_and_spa_pageviews_carry_the_landing_campaign(site, new_visitor):
    visitor = await new_visitor()
    page = await land_then_open_products(visitor, site)

    async with page.expect_response(is_tracking):
        await page.evaluate("history.pushState({}, '', '/produtos/precos')")
    await page.evaluate("history.replaceState({}, '', '/produtos/precos')")  # same URL: no pageview
    await page.wait_for_timeout(300)

    landing, products, spa = visitor.tracking_bodies()
    assert [b["event"] for b in (landing, products, spa)] == ["pageview"] * 3
    assert products["page_url"] == site + "/produtos"
    assert spa["page_url"] == site + "/produtos/precos"
    for body in (products, spa):
        assert (body["utm_source"], body["utm_campaign"], body["gclid"]) == (
            "google", "black-friday", "TeSt123")
        assert body["landing_page"] == body["first_touch"]["landing_page"] == landing["page_url"]
        assert body["visitor_id"] == landing["visitor_id"] and body["code"] == products["code"]
        assert body["company_id"] == COMPANY_ID
    assert not visitor.page_errors


async def test_opted_out_visitor_sends_nothing_and_links_stay_untouched(site, new_visitor):
    visitor = await new_visitor(init_script="localStorage.whatstracking_ignore = 'true'")
    page = await visitor.context.new_page()
    await page.goto(site + "/" + LANDING_QUERY)
    await page.click("#next")
    await page.wait_for_selector("#added", state="attached")
    await page.wait_for_load_state("networkidle")

    assert await page.get_attribute("#plain", "href") == PLAIN_LINK
    assert await page.get_attribute("#added", "href") == ADDED_LINK
    async with visitor.context.expect_page() as popup:
        await page.click("#widget")
    await (await popup.value).wait_for_load_state()
    await page.click("#plain")
    await page.wait_for_timeout(300)

    assert visitor.whatsapp_urls == [WIDGET_URL, PLAIN_LINK]
    assert any(r.url.endswith("/scripts/whatsapp-tracker.js") for r in visitor.requests)
    assert not [r.url for r in visitor.requests if "/tracking" in r.url]
    assert not visitor.page_errors


async def test_tracker_is_served_gzipped_within_3_kb(api):
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        async with http.get(f"{api.base}/scripts/whatsapp-tracker.js",
                            headers={"Accept-Encoding": "gzip"}) as r:
            assert r.status == 200
            assert r.headers["Content-Encoding"] == "gzip"
            assert r.content_type == "application/javascript"
            body = await r.read()
    assert gzip.decompress(body) == served_tracker()
    assert len(body) <= 3072, f"tracker.js is {len(body)} bytes gzipped; the budget is 3072"


def test_tracker_uses_no_syntax_newer_than_es2017():
    """Older phones' browsers (Safari before 11.1, Android WebViews of 2018) stop at syntax
    they do not know, and the whole snippet with it: no optional catch binding (ES2019), no
    object spread or rest (ES2018), no optional chaining or nullish coalescing (ES2020)."""
    source = (ROOT / "tracker.js").read_text()
    # Strings, templates, comments and regular expressions blanked (the snippet's regular
    # expressions follow `=` or `(`, and hold no quote).
    code = re.sub(r'"(?:[^"\\\n]|\\.)*"|`(?:[^`\\]|\\.)*`|//[^\n]*|(?<=[=(,] )/(?:[^/\\\n]|\\.)+/',
                  '""', source)
    for name, pattern in (("optional catch binding", r"catch\s*\{"),
                          ("optional chaining", r"\?\.(?!\d)"), ("nullish coalescing", r"\?\?")):
        found = re.search(pattern, code)
        assert found is None, f"{name} in tracker.js: {code[found.start() - 40:found.end() + 40]}"
    brackets = []
    for n, char in enumerate(code):
        if char in "([{":
            brackets.append(char)
        elif char in ")]}":
            brackets.pop()
        elif code.startswith("...", n) and brackets[-1:] == ["{"]:
            raise AssertionError(f"object spread in tracker.js: {code[n - 40:n + 40]}")
    assert not brackets
