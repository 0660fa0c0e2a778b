"""tracker.js against the ways real chat widgets open WhatsApp (issue 14), in a real Chromium.

Each page in tests/widgets/ rebuilds one widget's markup and the exact way its script opens
WhatsApp (read from the widget's public source; the page says which version and what it does).
A visitor opens the chat on a desktop and on a phone (a phone viewport, touch and an Android user
agent). The URL the browser would open is captured: http(s) by a route that answers for WhatsApp
(nothing leaves 127.0.0.1), whatsapp:// and intent:// by an init script that sees what the page
asked for. Each must keep the site's own text, add the visible and invisible code the server
answered, and send a `whatsapp_click` with the number.

Needs Debian's /usr/bin/chromium and the playwright package (see conftest.require_browser); the QR
code test also needs zxing-cpp (tests/requirements.txt).
"""
import asyncio
import json
import pathlib
import urllib.parse
import uuid
from dataclasses import dataclass

import pytest
import pytest_asyncio
from aiohttp import web
from conftest import free_port, launched_browser, serve
from test_tracker_browser import running_api

from whatstracking import message_code

# One server, site and browser for the module (each visitor is a fresh browser context, each test
# its own campaign), so the many cases stay quick.
pytestmark = pytest.mark.asyncio(loop_scope="module")
module_fixture = pytest_asyncio.fixture(scope="module", loop_scope="module")

WIDGETS = pathlib.Path(__file__).resolve().parent / "widgets"
PHONE = "5511987654321"
WHATSAPP_HOSTS = {"wa.me", "api.whatsapp.com", "web.whatsapp.com", "wa.link", "chat.whatsapp.com"}
DEVICES = {
    "desktop": {"viewport": {"width": 1366, "height": 800}},
    "phone": {"viewport": {"width": 412, "height": 915}, "device_scale_factor": 2.625,
              "is_mobile": True, "has_touch": True,
              "user_agent": "Mozilla/5.0 (Linux; Android 14; Pixel 7) AppleWebKit/537.36 "
                            "(KHTML, like Gecko) Chrome/156.0.0.0 Mobile Safari/537.36"},
}
# What the page asked the browser to open where no route sees it: whatsapp:// and intent:// (what
# window.open was given, after the tracker that wraps it later, and the link clicked), and the
# link a middle click opens in a background tab (headless Chromium makes no page of it).
RECORD_APP_LINKS = """
window.__app_links = [];
const app = (url, any) => { url = String(url); if (any || !/^https?:/i.test(url)) __app_links.push(url); };
const open = window.open;
window.open = function (url) { app(url); return open.apply(this, arguments); };
const link = e => {
  const a = e.target.closest && e.target.closest("a");
  if (a && !e.defaultPrevented && e.button != 2) app(a.href.baseVal != null ? a.href.baseVal : a.href, e.button);
};
addEventListener("click", link);
addEventListener("auxclick", link);
"""


# ---- The WhatsTracking server and the customer's site: the widget pages -------------------------

@module_fixture
async def api(tmp_path_factory):
    async with running_api(tmp_path_factory.mktemp("widgets")) as api:
        yield api


@module_fixture
async def site(api):
    """Serves tests/widgets/<name>.html with the API's address filled in, and /qr?text= (the QR
    modules of a text, which the pages' stand-in for a QR library paints)."""
    import segno

    async def widget(request):
        html = (WIDGETS / (request.match_info["name"] + ".html")).read_text("utf-8")
        return web.Response(text=html.replace("{api}", api.base), content_type="text/html")

    async def qr(request):
        matrix = segno.make_qr(request.query["text"], error="m").matrix
        return web.json_response(["".join(str(bit & 1) for bit in row) for row in matrix])

    app = web.Application()
    app.router.add_get("/w/{name}", widget)
    app.router.add_get("/qr", qr)
    port = free_port()
    runner = await serve(app, port)
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


# ---- The visitor --------------------------------------------------------------------------------

class Visitor:
    """One person on one device: what WhatsApp URLs the browser opened, what reached /tracking."""

    def __init__(self, context, device: str):
        self.context, self.device = context, device
        self.web_urls: list[str] = []  # http(s) WhatsApp URLs the browser loaded, any tab
        self.tracking: list[dict] = []  # the bodies sent to /tracking
        self.page_errors = []
        self.page = None
        self.source = "ad-" + uuid.uuid4().hex[:8]

    async def route(self, route):
        """Every request but 127.0.0.1's (left to the browser, so a keepalive request outlives
        its page as it would in the wild)."""
        url = route.request.url
        if urllib.parse.urlsplit(url).hostname in WHATSAPP_HOSTS:
            self.web_urls.append(url)
            await route.fulfill(status=200, content_type="text/html", body="<title>WhatsApp</title>")
        else:
            await route.abort()

    def on_request(self, request):
        if request.url.endswith("/tracking") and request.method == "POST":
            self.tracking.append(json.loads(request.post_data))

    async def open(self, url: str):
        """Land on the page from an ad (a campaign of this visitor's own) and wait until the
        tracker's pageview is sent."""
        self.page = await self.context.new_page()
        await self.page.goto(f"{url}{'&' if '?' in url else '?'}utm_source={self.source}&utm_campaign=teste")
        await self.wait_for(lambda: self.events("pageview"))
        return self.page

    async def press(self, selector: str, button: str = "left"):
        """A tap on the phone, a click on the desktop (middle/right: the mouse, on both)."""
        if self.device == "phone" and button == "left":
            await self.page.tap(selector)
        else:
            await self.page.click(selector, button=button)

    async def wait_for(self, found, seconds: float = 10):
        for _ in range(int(seconds / 0.05)):
            result = found()
            if result:
                return result
            await asyncio.sleep(0.05)
        return found()

    async def opened_url(self) -> str:
        """The one WhatsApp URL the browser opened (or was asked to open)."""
        async def app_links():
            try:
                return await self.page.evaluate("window.__app_links || []")
            except Exception:  # noqa: BLE001 - the page navigated away: it was not an app link
                return []
        for _ in range(200):
            urls = self.web_urls + await app_links()
            if urls:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # a second one would be a bug; give it the chance to show
        urls = self.web_urls + await app_links()
        assert len(urls) == 1, urls
        return urls[0]

    def events(self, event: str) -> list[dict]:
        return [body for body in self.tracking if body["event"] == event]

    async def clicks(self) -> list[dict]:
        """The whatsapp_click bodies sent, once the first has been."""
        await self.wait_for(lambda: self.events("whatsapp_click"))
        await asyncio.sleep(0.2)  # and a second one the chance to show
        return self.events("whatsapp_click")

    def code(self) -> str:
        """The visitor's code, as the tracker sent it (and the server kept it)."""
        codes = {body["code"] for body in self.tracking}
        assert len(codes) == 1, codes
        return codes.pop()


async def clicked_visits(api, utm_source: str) -> int:
    """Visits from utm_source with a click, as the company's report counts them."""
    for _ in range(100):
        async with api.http.get(f"{api.base}/api/report", params={"group_by": "utm_source"},
                                headers={"Authorization": f"Bearer {api.company['token']}"}) as r:
            assert r.status == 200, await r.text()
            report = await r.json()
        clicks = [row["clicks"] for row in report["rows"] if row["key"] == utm_source]
        if clicks and clicks[0]:
            return clicks[0]
        await asyncio.sleep(0.05)
    return 0


@module_fixture
async def browser():
    async with launched_browser() as browser:
        yield browser


@pytest_asyncio.fixture(loop_scope="module")
async def new_visitor(browser):
    contexts = []

    async def make(device: str) -> Visitor:
        context = await browser.new_context(**DEVICES[device])
        contexts.append(context)
        visitor = Visitor(context, device)
        await context.route(lambda url: not url.startswith("http://127.0.0.1"), visitor.route)
        await context.add_init_script(RECORD_APP_LINKS)
        context.on("request", visitor.on_request)
        context.on("weberror", lambda error: visitor.page_errors.append(error.error))
        return visitor

    yield make
    for context in contexts:
        await context.close()


def whatsapp_text(url: str) -> str | None:
    """The prefilled text as WhatsApp reads it (the first `text`, "+" as a space)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url.split("#")[0]).query)
    return query["text"][0] if "text" in query else None


def whatsapp_phone(url: str) -> str:
    parts = urllib.parse.urlsplit(url.split("#")[0])
    query = urllib.parse.parse_qs(parts.query)
    return query["phone"][0] if "phone" in query else parts.path.strip("/")


# ---- Every way a widget opens WhatsApp ------------------------------------------------------------

@dataclass
class Widget:
    page: str  # tests/widgets/<page>.html, with its query
    steps: tuple  # (kind, selector[, text]): "press", "type", "middle", "menu"
    text: str | None  # the site's own text as WhatsApp reads it; None: a link with no room for one
    opens: dict  # device -> how the opened URL starts
    original: str | None = None  # a link that cannot carry a text opens as it was


WEB = "https://web.whatsapp.com/send?"
WA_ME = f"https://wa.me/{PHONE}?"
API = "https://api.whatsapp.com/send?"
BOTH = lambda start: {"desktop": start, "phone": start}  # noqa: E731

WIDGETS_TRIED = {
    "joinchat-chatbox": Widget(
        "joinchat", (("press", ".joinchat__button"), ("press", ".joinchat__open")),
        "Olá! Quero saber o preço", BOTH(WA_ME)),
    "joinchat-button": Widget(
        "joinchat", (("press", ".joinchat_app"),), "Quero o produto 42", BOTH(WA_ME)),
    "chaty-link": Widget(
        "chaty", (("press", "#chaty-link"),), "Olá! Quero saber o preço", BOTH(WA_ME)),
    "chaty-welcome-form": Widget(
        "chaty", (("press", "#chaty-popup"), ("type", ".chaty-whatsapp-msg", "Olá! Quero saber o preço"),
                  ("press", ".chaty-whatsapp-submit")),
        "Olá! Quero saber o preço", {"desktop": WEB, "phone": WA_ME}),
    "ninjateam-10%": Widget(
        "ninjateam", (("press", "#njt-open"), ("press", "#njt-account")),
        "Quero o cupom de 10% OFF", BOTH(API)),
    "ninjateam-10%-middle-click": Widget(
        "ninjateam", (("press", "#njt-open"), ("middle", "#njt-account")),
        "Quero o cupom de 10% OFF", {"desktop": API}),
    "ninjateam-protocol": Widget(
        "ninjateam", (("press", "#njt-open"), ("press", "#njt-protocol")),
        "", {"phone": "whatsapp://send?"}),
    "whatsapp-widget-typed-10%": Widget(
        "whatsapp-widget", (("type", "#ww-input", "Quero 10% de desconto"), ("press", "#ww-send")),
        "Loja Exemplo: Quero 10% de desconto\n", BOTH(WA_ME)),
    "react-floating-whatsapp-typed-10%": Widget(
        "react-floating-whatsapp", (("type", "#rfw-input", "Quero 10% de desconto"),
                                    ("press", "#rfw-send")),
        "Quero 10% de desconto", BOTH("https://api.whatsapp.com/send/?")),
    "click-to-chat": Widget(
        "click-to-chat", (("press", "#ctc"),), "Olá! Vim pelo site", {"desktop": WEB, "phone": WA_ME}),
    "click-to-chat-whatsapp-colon": Widget(
        "click-to-chat", (("press", "#ctc-colon"),), "Olá! Vim pelo site",
        {"phone": "whatsapp://send?"}),
    "elementor-button": Widget("links", (("press", "#elementor"),), "Quero um orçamento", BOTH(WA_ME)),
    "elementor-button-middle-click": Widget(
        "links", (("middle", "#elementor"),), "Quero um orçamento", {"desktop": WA_ME}),
    "elementor-button-open-in-new-tab-menu": Widget(
        "links", (("menu", "#elementor"),), "Quero um orçamento", BOTH(WA_ME)),
    "api-send-new-tab": Widget(
        "links", (("press", "#api-send"),), "Quero um orçamento",
        BOTH("https://api.whatsapp.com/send/?")),
    "android-intent": Widget(
        "links", (("press", "#intent"),), "Quero um orçamento", BOTH("intent://send?")),
    "business-short-link": Widget(
        "links", (("press", "#business"),), None, BOTH("https://wa.me/message/"),
        original="https://wa.me/message/ABCDEFGHIJKL1"),
    "wa.link-shortener": Widget(
        "links", (("press", "#shortener"),), None, BOTH("https://wa.link/"),
        original="https://wa.link/ab12cd"),
    "svg-href": Widget("links", (("press", "#svg-href"),), "Quero um orçamento", BOTH(WA_ME)),
    "svg-xlink-href": Widget("links", (("press", "#svg-xlink"),), "Quero um orçamento", BOTH(WA_ME)),
    "location.href": Widget("links", (("press", "#location-href"),), "Quero um orçamento", BOTH(WA_ME)),
    "location.assign": Widget("links", (("press", "#location-assign"),), "Quero um orçamento", BOTH(API)),
    "location.replace": Widget(
        "links", (("press", "#location-replace"),), "Quero um orçamento", BOTH(WA_ME)),
    "link-added-after-load": Widget("links", (("press", "#late"),), "Quero um orçamento", BOTH(WA_ME)),
}
CASES = [pytest.param(name, device, id=f"{name}-{device}")
         for name, widget in WIDGETS_TRIED.items() for device in widget.opens]


async def act(visitor: Visitor, steps: tuple) -> str | None:
    """Do what the visitor does; for "menu" (the context menu's "open in new tab", a long press on
    a phone, which headless Chromium cannot choose) the link's href is what that tab would open."""
    page, menu_href = visitor.page, None
    for kind, selector, *text in steps:
        await page.wait_for_selector(selector)
        if kind == "type":
            await page.fill(selector, text[0])
        elif kind == "menu":
            await visitor.press(selector, button="right")
            menu_href = await page.get_attribute(selector, "href")
        else:
            await visitor.press(selector, button="middle" if kind == "middle" else "left")
    return menu_href


@pytest.mark.parametrize("name, device", CASES)
async def test_widget_opens_whatsapp_with_its_text_the_code_and_a_recorded_click(
        api, site, new_visitor, name, device):
    widget = WIDGETS_TRIED[name]
    visitor = await new_visitor(device)
    await visitor.open(f"{site}/w/{widget.page}")

    url = await act(visitor, widget.steps) or await visitor.opened_url()

    clicks = await visitor.clicks()
    assert len(clicks) == 1, clicks
    assert url.startswith(widget.opens[device]), url
    if widget.original:  # no room for a text: untouched, the click recorded without a number
        assert url == widget.original
        assert "whatsapp_phone" not in clicks[0]
    else:
        code = visitor.code()
        site_text = widget.text + " " if widget.text else ""
        assert whatsapp_text(url) == site_text + message_code(code), url
        assert whatsapp_phone(url) == PHONE
        assert clicks[0]["whatsapp_phone"] == PHONE
    assert clicks[0]["utm_source"] == visitor.source and clicks[0]["utm_campaign"] == "teste"
    assert await clicked_visits(api, visitor.source) == 1  # the server has it
    for kind, selector, *typed in widget.steps:  # a page still there shows what was typed
        if kind == "type" and device == "desktop":
            assert await visitor.page.input_value(selector) == typed[0]
    assert not visitor.page_errors


@pytest.mark.parametrize("device", DEVICES)
async def test_links_that_are_not_chats_with_the_business_are_left_alone(site, new_visitor, device):
    visitor = await new_visitor(device)
    page = await visitor.open(f"{site}/w/links")
    links = {"#group": "https://chat.whatsapp.com/AbCdEfGhIjK123",
             "#share": "https://wa.me/?text=Olha%20esta%20loja",
             "#share-api": "https://api.whatsapp.com/send?text=Olha%20esta%20loja",
             "#intent-sms": "intent://send?phone=5511987654321&text=Oi#Intent;scheme=sms;end"}

    for selector in links:
        await visitor.press(selector, button="middle" if device == "desktop" else "right")
    await page.wait_for_timeout(300)

    for selector, href in links.items():
        assert await page.get_attribute(selector, "href") == href
    assert [body["event"] for body in visitor.tracking] == ["pageview"]
    assert not visitor.page_errors


# ---- Joinchat's QR code ---------------------------------------------------------------------------

READ_CANVAS = """canvas => {
  const {width, height} = canvas, rgba = canvas.getContext("2d").getImageData(0, 0, width, height).data;
  let gray = "";  // one character a pixel: quick to hand over
  for (let i = 0; i < rgba.length; i += 4) gray += String.fromCharCode(rgba[i]);
  return {width, height, gray};
}"""


async def decode_qr(page, selector: str) -> str:
    """What a phone's camera reads from the QR code drawn on the canvas."""
    zxingcpp = pytest.importorskip("zxingcpp", reason="pip install zxing-cpp")
    image = await page.eval_on_selector(selector, READ_CANVAS)
    pixels = memoryview(image["gray"].encode("latin-1")).cast("B", (image["height"], image["width"]))
    found = zxingcpp.read_barcodes(pixels)
    assert len(found) == 1, found
    return found[0].text


@pytest.mark.parametrize("when", ["", "?late"], ids=["tracker-first", "tracker-after-joinchat"])
async def test_joinchat_desktop_qr_codes_carry_the_code(site, new_visitor, when):
    visitor = await new_visitor("desktop")
    page = await visitor.open(f"{site}/w/joinchat{when}")
    code = visitor.code()

    chatbox = await decode_qr(page, ".joinchat__qr canvas")
    button = await decode_qr(page, ".joinchat-button__qr canvas")

    assert chatbox.startswith(WA_ME) and button.startswith(WA_ME)
    assert whatsapp_text(chatbox) == "Olá! Quero saber o preço " + message_code(code)
    assert whatsapp_text(button) == "Quero o produto 42 " + message_code(code)
    # The README's one line for a widget or QR code of the site's own
    own = await page.evaluate(f"whatstracking.link('{WA_ME}text=Oi%2C%2010%25%20OFF')")
    assert own.startswith(WA_ME) and whatsapp_text(own) == "Oi, 10% OFF " + message_code(code)
    assert not visitor.page_errors
