"""The console (SPEC §12) in a real headless Chromium, against the real server.

The server runs on 127.0.0.1 (aiohttp AppRunner + TCPSite, SQLite in tmp_path) with ADMIN_TOKEN,
Evolution at the fake of tests/fake_evolution.py and Meta's Graph API at the fake of
tests/fake_platforms.py. What Evolution would send (connection.update, messages.upsert) is posted
to the webhook URL and secret header the server gave the fake instance, as Evolution would.

The walk: the admin signs in, creates a company (its token shown once), opens it; the onboarding
checklist ticks itself as the snippet's visit, the connected number and the first lead arrive;
the lead is marked as a purchase and its delivery to Meta shows Meta's answer. Then the same pages
in English, tokens revoked from the console, the WhatsApp numbers view and the phone layout.

Screenshots of every view go to tests/artifacts/console-<view>-<lang>-<desktop|phone>.png
(git-ignored; the pt-BR ones are copied to docs/).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import re
import urllib.parse
import uuid

import aiohttp
import pytest_asyncio
from conftest import fixture, free_port, require_browser, serve, upsert
from fake_evolution import FakeEvolution
from fake_platforms import FakeMeta

import whatstracking

TESTS = pathlib.Path(__file__).resolve().parent
ARTIFACTS = TESTS / "artifacts"
ADMIN_TOKEN = "admin-console-token"
OWNER = "5511900001111"  # the number the fake Evolution reports once connected
WAIT_MS = 15_000
DESKTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}
FAST = {"DELIVERY_POLL_SECONDS": "0.05", "DELIVERY_RETRY_SECONDS": "0.05",
        "DELIVERY_TIMEOUT": "2"}
DATASET = "1234567890123456"
# A dictionary key shown as such (a string missing from a locale file).
RAW_KEY = re.compile(r"\b(app|common|nav|signin|companies|onboarding|connections|tokens|error|"
                     r"range|leads|lead|reports|method|settings|deliveries|events)\.[a-z0-9_]+\b")
# English that must never show in pt-BR (words of the shell's own views).
ENGLISH = ("Sign out", "Loading", "Connected", "Copy", "Waiting", "Companies", "Access token",
           "Getting started", "Revoke", "Delete", "Cancel")


class Stack:
    """The server and the fakes it talks to, with the calls the tests repeat."""

    def __init__(self, base: str, app, http: aiohttp.ClientSession, evolution: FakeEvolution,
                 meta: FakeMeta) -> None:
        self.base, self.app, self.http, self.evolution, self.meta = base, app, http, evolution, meta

    async def call(self, method: str, path: str, token: str = ADMIN_TOKEN, expect: int | None = 200,
                   **kwargs) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, self.base + path, headers=headers, **kwargs) as resp:
            data = await resp.json()
            if expect is not None:
                assert resp.status == expect, (resp.status, data)
            return resp.status, data

    async def company(self, company_id: str, name: str) -> dict:
        return (await self.call("POST", "/api/companies", expect=201,
                                json={"company_id": company_id, "name": name}))[1]

    async def evolution_sends(self, instance: str, envelope: dict) -> dict:
        """POST an envelope as Evolution does: to the instance's webhook, with its headers."""
        hook = self.evolution.instances[instance]["webhook"]
        async with self.http.post(hook["url"].replace("http://wt.test", self.base), json=envelope,
                                  headers=hook["headers"] or {}) as resp:
            data = await resp.json()
            assert resp.status == 200, data
            return data

    async def connected(self, instance: str, phone: str = OWNER, profile: str = "Loja Centro"
                        ) -> None:
        """The number scanned the QR: Evolution's state and its connection.update webhook."""
        self.evolution.open(instance, phone, profile)
        envelope = fixture("connection-update-open")
        envelope["instance"] = envelope["data"]["instance"] = instance
        envelope["data"]["wuid"] = f"{phone}@s.whatsapp.net"
        envelope["data"]["profileName"] = profile
        await self.evolution_sends(instance, envelope)

    async def visit(self, company_id: str, utm: str = "utm_source=google&utm_campaign=verao",
                    click: str | None = OWNER) -> dict:
        """A pageview and a WhatsApp click, as tracker.js sends them."""
        page = f"https://loja.test/?{utm}"
        visitor = uuid.uuid4().hex
        _, answer = await self.call("POST", "/tracking", token="", json={
            "company_id": company_id, "visitor_id": visitor, "page_url": page})
        if click:
            await self.call("POST", "/tracking", token="", json={
                "company_id": company_id, "visitor_id": visitor, "page_url": page,
                "event": "whatsapp_click", "whatsapp_phone": click, "code": answer["code"]})
        return answer

    async def message(self, instance: str, text: str, phone: str = "5511988887777",
                      name: str = "Maria Cliente") -> dict:
        envelope = upsert(text, phone, instance=instance)
        envelope["data"]["pushName"] = name
        return await self.evolution_sends(instance, envelope)

    async def ready_company(self, company_id: str = "loja-centro", name: str = "Loja Centro",
                            instance: str = "loja-centro") -> dict:
        """A company with a connected number, a visit and a lead (through the API)."""
        created = await self.company(company_id, name)
        await self.call("POST", "/api/create-instance", expect=201,
                        json={"company_id": company_id, "connectionId": instance})
        await self.connected(instance)
        v = await self.visit(company_id)
        await self.message(instance, f"Oi! {whatstracking.message_code(v['code'])}")
        return created


@pytest_asyncio.fixture
async def stack(tmp_path):
    evolution = await FakeEvolution().start()
    meta = await FakeMeta().start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = whatstracking.load_config({
        "DATABASE_URL": f"sqlite:///{tmp_path / 'wt.db'}", "ADMIN_TOKEN": ADMIN_TOKEN,
        "PUBLIC_URL": base, "LOG_LEVEL": "WARNING", "EVOLUTION_API_URL": evolution.url,
        "EVOLUTION_API_KEY": evolution.global_key, "META_GRAPH_URL": meta.url, **FAST})
    app = whatstracking.create_app(config)
    runner = await serve(app, port)
    try:
        async with aiohttp.ClientSession() as http:
            yield Stack(base, app, http, evolution, meta)
    finally:
        await runner.cleanup()
        await meta.close()
        await evolution.close()


@pytest_asyncio.fixture
async def browser():
    async_playwright, _ = require_browser()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        await browser.close()


class Session:
    """One browser context: its page, every URL it asked for (other hosts are aborted) and the
    page's errors."""

    def __init__(self, context, page, base: str) -> None:
        self.context, self.page, self.base = context, page, base
        self.urls: list[str] = []
        self.errors: list[str] = []

    def asked(self, path: str) -> int:
        return sum(1 for u in self.urls if urllib.parse.urlsplit(u).path == path)

    def foreign(self) -> list[str]:
        origin = urllib.parse.urlsplit(self.base)[:2]
        return [u for u in self.urls if not u.startswith(("data:", "blob:"))
                and urllib.parse.urlsplit(u)[:2] != origin]


@contextlib.asynccontextmanager
async def session(browser, stack: Stack, lang: str = "pt-BR", viewport: dict = DESKTOP,
                  token: str | None = None):
    phone = viewport["width"] < 500
    context = await browser.new_context(
        locale=lang, timezone_id="America/Sao_Paulo", viewport=viewport, is_mobile=phone,
        has_touch=phone)
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=stack.base)
    if token is not None:
        await context.add_init_script(
            f"window.localStorage.setItem('wt.token', {json.dumps(token)});")
    page = await context.new_page()
    s = Session(context, page, stack.base)
    context.on("request", lambda r: s.urls.append(r.url))
    page.on("pageerror", lambda e: s.errors.append(str(e)))
    # The page's Content-Security-Policy refusing something (an inline script, a foreign URL).
    page.on("console", lambda m: s.errors.append(m.text)
            if "Content Security Policy" in m.text else None)

    async def local_only(route):
        host = urllib.parse.urlsplit(route.request.url).hostname
        await (route.continue_() if host == "127.0.0.1" else route.abort())

    await context.route("**/*", local_only)
    try:
        yield s
        assert s.errors == [], s.errors
        assert s.foreign() == []
    finally:
        await context.close()


async def open_console(s: Session, path: str = "") -> None:
    await s.page.goto(s.base + "/dashboard" + path)
    await s.page.wait_for_selector("body.ready", timeout=WAIT_MS)


async def view(s: Session, name: str) -> None:
    await s.page.wait_for_selector(f"body[data-view={name}]", timeout=WAIT_MS)


async def clipboard(s: Session) -> str:
    return await s.page.evaluate("navigator.clipboard.readText()")


async def shot(s: Session, name: str, lang: str) -> None:
    """A full-page screenshot (the screen when a dialog is open), scrolled to the top (the sticky header stays where it belongs);
    on a phone also the check that nothing is wider than the screen."""
    kind = "phone" if s.page.viewport_size["width"] < 500 else "desktop"
    await s.page.evaluate("window.scrollTo(0, 0)")
    await s.page.wait_for_timeout(150)
    if kind == "phone":
        width = await s.page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= 390, (name, width)
    # An open dialog fits its box (nothing to scroll sideways), and every field has a label.
    wide = await s.page.evaluate("""() => [...document.querySelectorAll('dialog[open]')]
        .filter(d => d.scrollWidth > d.clientWidth + 1).map(d => d.scrollWidth)""")
    assert wide == [], (name, wide)
    assert await unlabelled(s) == [], name
    ARTIFACTS.mkdir(exist_ok=True)
    # With a dialog open, the screen as the user sees it (the backdrop covers only the screen).
    dialog = await s.page.locator("dialog[open]").count()
    await s.page.screenshot(path=str(ARTIFACTS / f"console-{name}-{lang}-{kind}.png"),
                            full_page=not dialog)


async def unlabelled(s: Session) -> list[str]:
    """The visible form fields with no label (neither <label for>, nor aria-label(ledby))."""
    return await s.page.evaluate("""() => [...document.querySelectorAll(
        'input:not([type=hidden]), select, textarea')]
        .filter(e => e.getClientRects().length && !e.labels.length &&
                     !e.getAttribute('aria-label') && !e.getAttribute('aria-labelledby'))
        .map(e => e.outerHTML.slice(0, 120))""")


async def clean_text(s: Session, lang: str) -> str:
    """The page's visible text, checked: no dictionary key left raw, no English in pt-BR."""
    text = await s.page.inner_text("body")
    assert not RAW_KEY.search(text), RAW_KEY.search(text).group(0)
    if lang == "pt-BR":
        for word in ENGLISH:
            assert not re.search(rf"\b{word}\b", text), (word, text[:2000])
    return text


async def step_done(s: Session, n: int) -> None:
    _, expect = require_browser()
    await expect(s.page.locator(f".step[data-step='{n}']")).to_have_attribute(
        "data-done", "true", timeout=WAIT_MS)


# ==================================================================================================

async def test_the_whole_onboarding_from_an_empty_company_in_portuguese(stack, browser):
    _, expect = require_browser()
    async with session(browser, stack) as s:
        page = s.page
        await open_console(s)
        await view(s, "signin")
        assert await page.get_attribute("html", "lang") == "pt-BR"
        await expect(page.locator("h1")).to_have_text("Entrar")

        # A wrong token: said plainly, in Portuguese.
        await page.fill("input[name=token]", "wt_nao-existe")
        await page.click("form button[type=submit]")
        await expect(page.locator("#signin-error")).to_contain_text("Este token não foi aceito",
                                                                     timeout=WAIT_MS)
        await shot(s, "signin", "pt-BR")

        # The admin: the agency view, empty.
        await page.fill("input[name=token]", ADMIN_TOKEN)
        await page.click("form button[type=submit]")
        await view(s, "companies")
        await expect(page.locator(".empty")).to_contain_text("Nenhuma empresa ainda")
        assert await page.evaluate("localStorage.getItem('wt.token')") == ADMIN_TOKEN

        # A new company: the id follows the name; its token is shown once, and works.
        await page.click("text=Nova empresa >> nth=0")
        await page.fill("dialog input[name=name]", "Loja Centro Ótica")
        await expect(page.locator("dialog input[name=company_id]")).to_have_value(
            "loja-centro-otica")
        await page.click("dialog >> text=Criar")
        token_box = page.locator("dialog pre[data-secret=token]")
        await expect(token_box).to_be_visible(timeout=WAIT_MS)
        await expect(page.locator("dialog")).to_contain_text("aparece só agora")
        token = (await token_box.inner_text()).strip()
        _, company = await stack.call("GET", "/api/company", token=token)
        assert company["company_id"] == "loja-centro-otica"
        await page.click("dialog >> text=Copiar token")
        await expect(page.locator("dialog .btn.copy")).to_have_text("Copiado ✓")
        assert await clipboard(s) == token
        await shot(s, "company-created", "pt-BR")

        # Open its console: the onboarding, nothing done yet, and who is being viewed.
        await page.click("dialog >> text=Abrir o painel dela")
        await view(s, "onboarding")
        await expect(page.locator("#wt-banner")).to_contain_text(
            "Vendo a empresa Loja Centro Ótica")
        for n in (1, 2, 3):
            await expect(page.locator(f".step[data-step='{n}']")).to_have_attribute(
                "data-done", "false")
        await expect(page.locator(".visit-status")).to_contain_text(
            "Aguardando a primeira visita…", timeout=WAIT_MS)
        await shot(s, "onboarding", "pt-BR")

        # (a) The snippet, copied as the API gives it.
        _, onboarding = await stack.call("GET", "/api/onboarding?company_id=loja-centro-otica")
        snippet = onboarding["snippets"]["attribute"]
        assert 'data-company="loja-centro-otica"' in snippet and stack.base in snippet
        await expect(page.locator("pre[data-snippet=attribute]")).to_have_text(snippet)
        await page.click(".snippets .btn.copy >> nth=0")
        assert await clipboard(s) == snippet
        # A tracked visit (what the snippet sends): received ✓.
        v = await stack.visit("loja-centro-otica", click=None)
        await step_done(s, 1)
        await expect(page.locator(".visit-status")).to_contain_text("Primeira visita recebida ✓")

        # (b) A number: created on the fake Evolution, its QR shown and refreshed.
        await page.fill("form.create-connection input[name=connectionId]", "Loja Centro")
        await page.click("form.create-connection button[type=submit]")
        qr = page.locator(".qr-panel img.qr")
        await expect(qr).to_be_visible(timeout=WAIT_MS)
        assert (await qr.get_attribute("src")).startswith("data:image/png;base64,")
        assert "loja-centro" in stack.evolution.instances  # the name as a connection id
        await expect(page.locator(".qr-panel")).to_contain_text("Aparelhos conectados")
        await expect(page.locator(".qr-panel")).to_contain_text("Conectar um aparelho")
        await page.wait_for_function(
            "() => performance.getEntriesByType('resource').filter("
            "e => e.name.includes('/qrcode/generate-qrcode')).length >= 2", timeout=WAIT_MS)
        await shot(s, "onboarding-qr", "pt-BR")
        # The client link, with its validity.
        await page.click(".connect-area >> text=Link para o cliente")
        await page.select_option("dialog select[name=ttl]", str(86400))
        await page.click("dialog >> text=Criar link")
        link = page.locator("dialog pre[data-link=client]")
        await expect(link).to_contain_text("/connect/loja-centro?", timeout=WAIT_MS)
        await page.click("dialog >> text=Copiar link")
        assert await clipboard(s) == (await link.inner_text()).strip()
        await page.keyboard.press("Escape")
        await expect(page.locator("dialog")).to_have_count(0)
        # Evolution says it is connected: the QR gives way, the checklist ticks.
        await stack.connected("loja-centro")
        await step_done(s, 2)
        await expect(page.locator(".connection-status")).to_contain_text("Número conectado ✓")

        # (c) The visitor clicks and writes with the code: the first lead.
        await stack.call("POST", "/tracking", token="", json={
            "company_id": "loja-centro-otica", "visitor_id": "v-1",
            "page_url": "https://loja.test/?utm_source=instagram&utm_campaign=verao"})
        v = await stack.visit("loja-centro-otica", utm="utm_source=instagram&utm_campaign=verao")
        answer = await stack.message("loja-centro",
                                     f"Oi, quero saber o preço {whatstracking.message_code(v['code'])}")
        assert answer["match"] == "code", answer
        await step_done(s, 3)
        await expect(page.locator(".lead-status")).to_contain_text("Primeiro lead recebido ✓")
        await shot(s, "onboarding-done", "pt-BR")
        await clean_text(s, "pt-BR")

        # The lead in the leads view, then its page: a purchase, delivered to Meta.
        await stack.call("PATCH", "/api/company", json={
            "company_id": "loja-centro-otica",
            "meta": {"dataset_id": DATASET, "access_token": "EAAB-meta-token"}})
        await page.click(".lead-status >> text=Ver os leads")
        await view(s, "leads")
        await expect(page.locator("main")).to_contain_text("Maria Cliente", timeout=WAIT_MS)
        await purchase_on_the_lead_page(s, stack, answer["lead_id"])

        # Back to all companies: the company is listed with its lead and its number.
        await page.click("#wt-banner >> text=Voltar para todas as empresas")
        await view(s, "companies")
        row = page.locator("tr[data-company=loja-centro-otica]")
        await expect(row).to_contain_text("1 de 1 conectados", timeout=WAIT_MS)
        await shot(s, "companies", "pt-BR")
        await clean_text(s, "pt-BR")


async def purchase_on_the_lead_page(s: Session, stack: Stack, lead_id: int) -> None:
    """Open the lead, mark a purchase of R$ 350 and see Meta's answer (the lead page is helper
    "views"'s: this drives it through its visible labels)."""
    _, expect = require_browser()
    page = s.page
    await page.click(f"main >> text=Maria Cliente")
    await view(s, "lead")
    await page.click("button[data-action=purchase]")
    await expect(page.locator("dialog")).to_contain_text("Registrar compra")
    await page.fill("dialog input[name=value]", "350")
    await page.click("dialog >> text=Registrar compra")
    # The worker delivers it; the fake Meta accepted it and the page shows its answer.
    for _ in range(100):
        if stack.meta.accepted():
            break
        await asyncio.sleep(0.1)
    events = stack.meta.accepted()
    assert [e["event_name"] for e in events] == ["Purchase"], events
    assert events[0]["custom_data"]["value"] == 350
    delivery = page.locator(".v-delivery[data-destination=meta]")
    await expect(delivery).to_have_attribute("data-status", "delivered", timeout=WAIT_MS)
    await delivery.locator("details.v-answer summary").click()
    await expect(delivery.locator("pre")).to_contain_text('"events_received": 1')
    await shot(s, "lead-purchase", "pt-BR")


async def tour(s: Session, stack: Stack, lang: str, words: dict) -> None:
    """Every view of the shell for a company with a number, a visit and a lead: shown in
    ``lang`` (``words``: a text each view must show), screenshot, nothing wider than a phone."""
    _, expect = require_browser()
    page = s.page
    for name in ("onboarding", "connections", "tokens"):
        await page.goto(f"{s.base}/dashboard#/{name}")
        await view(s, name)
        await expect(page.locator("main")).to_contain_text(words[name], timeout=WAIT_MS)
        if name == "connections":
            await expect(page.locator(".connection .phone").first).to_have_text("+55 11 90000-1111")
        await shot(s, name, lang)
        await clean_text(s, lang)


WORDS = {
    "pt-BR": {"companies": "Taxa de identificação", "onboarding": "Primeiro lead recebido ✓",
              "connections": "Conectado", "tokens": "Último uso", "signin": "Entrar"},
    "en": {"companies": "Match rate", "onboarding": "First lead received ✓",
           "connections": "Connected", "tokens": "Last used", "signin": "Sign in"},
}


async def test_every_view_in_both_languages_on_desktop_and_phone(stack, browser):
    """The shell's views in en and pt-BR (from the browser's language, then switched and
    remembered), at 1366×900 and 390×844; the admin's views too."""
    _, expect = require_browser()
    created = await stack.ready_company()
    for viewport in (DESKTOP, PHONE):
        phone = viewport is PHONE
        async with session(browser, stack, lang="en-US", viewport=viewport) as s:
            page = s.page
            await open_console(s)
            await view(s, "signin")
            assert await page.get_attribute("html", "lang") == "en"
            await expect(page.locator("h1")).to_have_text("Sign in")
            await shot(s, "signin", "en")
            # The admin, in English: the agency view.
            await page.fill("input[name=token]", ADMIN_TOKEN)
            await page.keyboard.press("Enter")
            await view(s, "companies")
            await expect(page.locator("tr[data-company=loja-centro]")).to_contain_text(
                "1 of 1 connected", timeout=WAIT_MS)
            await expect(page.locator("main")).to_contain_text(WORDS["en"]["companies"])
            await shot(s, "companies", "en")
            await page.click("tr[data-company=loja-centro] >> text=Open")
            await view(s, "overview")  # the home of a company with leads: its reports
            await expect(page.locator("#wt-banner")).to_contain_text("Viewing company Loja Centro")
            await tour(s, stack, "en", WORDS["en"])

            # Switch to Portuguese (in the menu on a phone): <html lang> follows, remembered.
            if phone:
                await page.click("#wt-menu")
                await page.select_option("#wt-nav .nav-extra select", "pt-BR")
            else:
                await page.select_option("#wt-lang select", "pt-BR")
            await page.wait_for_function("() => document.documentElement.lang === 'pt-BR'")
            await expect(page.locator("main h1")).to_have_text("Tokens de acesso")
            await page.reload()
            await page.wait_for_selector("body.ready")
            assert await page.get_attribute("html", "lang") == "pt-BR"
            assert await page.evaluate("localStorage.getItem('wt.lang')") == "pt-BR"
            await tour(s, stack, "pt-BR", WORDS["pt-BR"])
            await page.click("#wt-banner >> text=Voltar para todas as empresas")
            await view(s, "companies")
            await expect(page.locator("main")).to_contain_text(WORDS["pt-BR"]["companies"])
            await shot(s, "companies", "pt-BR")
            await clean_text(s, "pt-BR")

        # The company's own token, on the same screen: no agency, no banner.
        async with session(browser, stack, lang="pt-BR", viewport=viewport,
                           token=created["token"]) as s:
            await open_console(s)
            await view(s, "overview")
            await expect(s.page.locator("#wt-banner")).to_be_hidden()
            assert await s.page.locator("#wt-nav a[data-view=companies]").count() == 0
            await open_console(s, "#/companies")  # not an admin: not offered, not shown
            assert await s.page.evaluate("document.body.dataset.view") != "companies"


async def registered(s: Session) -> list[str]:
    return await s.page.evaluate(
        "[...document.querySelectorAll('#wt-nav a')].map(a => a.dataset.view)")


async def test_phone_layout_menu_reaches_every_view(stack, browser):
    _, expect = require_browser()
    created = await stack.ready_company()
    async with session(browser, stack, viewport=PHONE, token=created["token"]) as s:
        page = s.page
        await open_console(s, "#/onboarding")
        await view(s, "onboarding")
        nav = page.locator("#wt-nav")
        await expect(nav).to_be_hidden()
        await expect(page.locator("#wt-menu")).to_be_visible()
        names = await registered(s)
        assert {"onboarding", "connections", "tokens"} <= set(names), names
        for name in names:
            await page.click("#wt-menu")
            await expect(nav).to_be_visible()
            await expect(page.locator("#wt-menu")).to_have_attribute("aria-expanded", "true")
            await page.click(f"#wt-nav a[data-view={name}]")
            await view(s, name)
            await expect(nav).to_be_hidden()  # the menu folds away once a view is chosen
            await page.wait_for_timeout(300)
            width = await page.evaluate("document.scrollingElement.scrollWidth")
            assert width <= 390, (name, width)
        # Esc closes the menu; sign-out is in it.
        await page.click("#wt-menu")
        await page.keyboard.press("Escape")
        await expect(nav).to_be_hidden()
        await page.click("#wt-menu")
        await page.click("#wt-nav .nav-extra >> text=Sair")
        await view(s, "signin")
        assert await page.evaluate("localStorage.getItem('wt.token')") is None


async def test_tokens_created_and_revoked_from_the_console(stack, browser):
    _, expect = require_browser()
    created = await stack.company("loja-centro", "Loja Centro")
    async with session(browser, stack, token=created["token"]) as s:
        page = s.page
        await open_console(s, "#/tokens")
        await view(s, "tokens")
        rows = page.locator("tr[data-token]")
        await expect(rows).to_have_count(1, timeout=WAIT_MS)
        # A new token: shown once, with a copy button; it works at once.
        await page.click("main >> text=Novo token")
        await page.fill("dialog input[name=name]", "Maria (marketing)")
        await page.click("dialog >> text=Criar")
        secret = page.locator("dialog pre[data-secret=token]")
        await expect(secret).to_be_visible(timeout=WAIT_MS)
        await expect(page.locator("dialog")).to_contain_text("única vez")
        maria = (await secret.inner_text()).strip()
        await page.click("dialog >> text=Copiar token")
        assert await clipboard(s) == maria
        await stack.call("GET", "/api/company", token=maria)
        await page.click("dialog >> text=Já guardei")
        await expect(rows).to_have_count(2, timeout=WAIT_MS)
        listed = await page.inner_text("main")
        assert maria not in listed and created["token"] not in listed  # never the value
        await expect(page.locator("tr[data-token]", has_text="Maria (marketing)")).to_contain_text(
            "nunca")

        # Revoke: asked first (cancel keeps it), then refused by the API at once.
        row = page.locator("tr[data-token]", has_text="Maria (marketing)")
        await row.locator("text=Revogar").click()
        await expect(page.locator("dialog")).to_contain_text("perde o acesso")
        await page.keyboard.press("Escape")
        await expect(page.locator("dialog")).to_have_count(0)
        await stack.call("GET", "/api/company", token=maria)
        await row.locator("text=Revogar").click()
        await page.click("dialog .btn.danger")
        await expect(rows).to_have_count(1, timeout=WAIT_MS)
        await stack.call("GET", "/api/company", token=maria, expect=401)
        await stack.call("GET", "/api/company", token=created["token"])

        # Revoking the token this console signed in with signs it out, saying why.
        await rows.first.locator("text=Revogar").click()
        await page.click("dialog .btn.danger")
        await view(s, "signin")
        await expect(page.locator(".toast.error")).to_contain_text("Seu acesso terminou")
        await stack.call("GET", "/api/company", token=created["token"], expect=401)


async def test_connections_view_states_qr_client_link_and_destructive_actions(stack, browser):
    _, expect = require_browser()
    created = await stack.company("loja-centro", "Loja Centro")
    cid = {"company_id": "loja-centro"}
    await stack.call("POST", "/api/create-instance", expect=201,
                     json={**cid, "connectionId": "vendas"})
    await stack.call("POST", "/api/create-instance", expect=201,
                     json={**cid, "connectionId": "suporte", "number": "5511977776666"})
    await stack.connected("suporte", "5511977776666", "Suporte Loja")
    async with session(browser, stack, token=created["token"]) as s:
        page = s.page
        await open_console(s, "#/connections")
        await view(s, "connections")
        vendas = page.locator(".connection[data-connection=vendas]")
        suporte = page.locator(".connection[data-connection=suporte]")
        await expect(suporte.locator("[data-state]")).to_have_text("Conectado", timeout=WAIT_MS)
        await expect(suporte.locator(".phone")).to_have_text("+55 11 97777-6666")
        await expect(suporte).to_contain_text("Suporte Loja")
        await expect(vendas.locator("[data-state]")).to_have_text("Aguardando leitura do QR")
        await expect(vendas.locator(".phone")).to_have_text("ainda não conectado")

        # A message arrives (last message received), and a delivery with a wrong secret is
        # refused: both shown, the refusal in plain words.
        await stack.message("suporte", "Oi")
        envelope = upsert("Oi de novo", instance="suporte")
        async with stack.http.post(f"{stack.base}/webhook/loja-centro", json=envelope,
                                   headers={"x-webhook-secret": "errado"}) as resp:
            assert resp.status == 401
        await expect(suporte.locator(".rejection")).to_contain_text("segredo errado",
                                                                    timeout=WAIT_MS)
        await expect(suporte).not_to_contain_text("nenhuma ainda")
        await shot(s, "connections", "pt-BR")

        # The QR dialog keeps refreshing while open, and stops when closed; then the number
        # connects and the dialog says so.
        await vendas.locator("text=Mostrar QR code").click()
        await expect(page.locator("dialog img.qr")).to_be_visible(timeout=WAIT_MS)
        before = s.asked("/qrcode/generate-qrcode")
        await page.wait_for_timeout(6500)
        assert s.asked("/qrcode/generate-qrcode") >= before + 2
        await shot(s, "connections-qr", "pt-BR")
        await page.keyboard.press("Escape")
        await expect(page.locator("dialog")).to_have_count(0)
        after = s.asked("/qrcode/generate-qrcode")
        await page.wait_for_timeout(4000)
        assert s.asked("/qrcode/generate-qrcode") == after
        await vendas.locator("text=Mostrar QR code").click()
        await expect(page.locator("dialog img.qr")).to_be_visible(timeout=WAIT_MS)
        await stack.connected("vendas", "5511955554444", "Vendas")
        await expect(page.locator("dialog .qr-panel")).to_contain_text(
            "Conectado ✓ +55 11 95555-4444", timeout=WAIT_MS)
        await page.keyboard.press("Escape")
        await expect(vendas.locator("[data-state]")).to_have_text("Conectado", timeout=WAIT_MS)

        # The client link.
        await vendas.locator("text=Link para o cliente").click()
        await page.click("dialog >> text=Criar link")
        await expect(page.locator("dialog pre[data-link=client]")).to_contain_text(
            f"{stack.base}/connect/vendas?", timeout=WAIT_MS)
        await page.keyboard.press("Escape")

        # Destructive actions go through a confirmation: cancelled, nothing is sent.
        deletes = s.asked("/api/delete-instance")
        await vendas.locator("text=Excluir >> nth=0").click()
        await expect(page.locator("dialog")).to_contain_text("Excluir vendas?")
        await page.click("dialog >> text=Cancelar")
        await page.wait_for_timeout(300)
        assert s.asked("/api/delete-instance") == deletes
        assert "vendas" in stack.evolution.instances
        # Log out, confirmed.
        await vendas.locator("text=Desconectar").click()
        await page.click("dialog .btn.danger")
        await expect(vendas.locator("[data-state]")).to_have_text("Desconectado", timeout=WAIT_MS)
        # Delete (history kept): listed under the deleted ones.
        await vendas.locator("text=Excluir >> nth=0").click()
        await page.click("dialog .btn.danger")
        await expect(page.locator("details.deleted-connections")).to_contain_text(
            "Números excluídos (1)", timeout=WAIT_MS)
        assert "vendas" not in stack.evolution.instances
        # Complete delete, confirmed: gone.
        await page.click("details.deleted-connections summary")
        await page.locator(".connection[data-connection=vendas] >> text=Excluir tudo").click()
        await expect(page.locator("dialog")).to_contain_text("Não dá para desfazer")
        await page.click("dialog .btn.danger")
        await expect(page.locator(".connection[data-connection=vendas]")).to_have_count(
            0, timeout=WAIT_MS)
        _, listed = await stack.call("GET", "/api/connections", token=created["token"])
        assert [c["connectionId"] for c in listed["connections"]] == ["suporte"]


async def test_pairing_code_and_adopting_an_existing_instance_in_the_onboarding(stack, browser):
    _, expect = require_browser()
    created = await stack.company("loja-centro", "Loja Centro")
    existing = stack.evolution.add_instance("ja-no-evolution", state="open", token="TOKEN-DA-INSTANCIA")
    async with session(browser, stack, token=created["token"], viewport=PHONE) as s:
        page = s.page
        await open_console(s)
        await view(s, "onboarding")  # home while the company has no lead
        # The pairing code: created with the number, shown with WhatsApp's own words.
        await page.fill("form.create-connection input[name=connectionId]", "celular-loja")
        await page.select_option("form.create-connection select[name=how]", "pair")
        await page.fill("form.create-connection input[name=number]", "+55 (11) 98888-7777")
        await page.click("form.create-connection button[type=submit]")
        pairing = page.locator(".qr-panel .pairing")
        await expect(pairing).to_be_visible(timeout=WAIT_MS)
        assert stack.evolution.instances["celular-loja"]["number"] == "5511988887777"
        code = await pairing.get_attribute("data-pairing")
        assert code and (await pairing.inner_text()).replace("-", "") == code.replace("-", "")
        box = page.locator(".qr-panel .pairing-box")
        await expect(box).to_contain_text("Conectar com número de telefone")
        await expect(box).to_contain_text("Aparelhos conectados")
        await shot(s, "onboarding-pairing", "pt-BR")

        # Another way: adopt the instance that already exists (its token required).
        await page.click("text=Conectar de outro jeito")
        await page.click("details.adopt summary")
        form = page.locator("form.adopt-connection")
        await form.locator("input[name=connectionId]").fill("ja-no-evolution")
        await form.locator("button[type=submit]").click()
        await expect(form.locator(".error")).to_contain_text("informe o token", timeout=WAIT_MS)
        await form.locator("input[name=instance_token]").fill("TOKEN-DA-INSTANCIA")
        await form.locator("button[type=submit]").click()
        await step_done(s, 2)  # the adopted instance is connected already
        assert existing["webhook"]["url"] == f"{stack.base}/webhook/loja-centro"
        _, listed = await stack.call("GET", "/api/connections", token=created["token"])
        assert {c["connectionId"] for c in listed["connections"]} == {"celular-loja",
                                                                      "ja-no-evolution"}


async def test_a_third_language_is_picked_from_the_browser_and_offered(stack, browser, tmp_path,
                                                                       monkeypatch):
    """A dictionary dropped in locales/ is listed by GET /locales, chosen for a browser that asks
    for it (es-ES → es, by its primary subtag) and offered in the switcher; what it lacks falls
    back to English."""
    _, expect = require_browser()
    locales = tmp_path / "locales"
    locales.mkdir()
    for name in ("en.json", "pt-BR.json"):
        (locales / name).write_text((whatstracking.LOCALES_DIR / name).read_text("utf-8"), "utf-8")
    spanish = {"app.language": "Idioma", "language.locale": "es", "language.name": "Español",
               "signin.submit": "Entrar", "signin.title": "Iniciar sesión",
               "signin.token": "Token de acceso"}
    (locales / "es.json").write_text(json.dumps(spanish, indent=2, ensure_ascii=False,
                                                sort_keys=True) + "\n", "utf-8")
    monkeypatch.setattr(whatstracking, "LOCALES_DIR", locales)
    _, listed = await stack.call("GET", "/locales", token="")
    assert {"code": "es", "name": "Español"} in listed["languages"]
    english = json.loads((locales / "en.json").read_text("utf-8"))
    async with session(browser, stack, lang="es-ES") as s:
        page = s.page
        await open_console(s)
        await view(s, "signin")
        assert await page.get_attribute("html", "lang") == "es"
        await expect(page.locator("main h1")).to_have_text("Iniciar sesión")
        await expect(page.locator("label[for^=f-token]")).to_have_text("Token de acceso")
        await expect(page.locator("form button[type=submit]")).to_have_text("Entrar")
        await expect(page.locator("main")).to_contain_text(english["signin.intro"])  # fallback
        select = page.locator("#wt-lang select")
        await expect(select).to_have_value("es")
        offered = await select.locator("option").evaluate_all(
            "options => options.map(o => [o.value, o.textContent])")
        assert ["es", "Español"] in offered and ["pt-BR", "Português (Brasil)"] in offered
        assert await page.get_attribute("#wt-lang label", "class") == "sr-only"
        await expect(page.locator("#wt-lang label")).to_have_text("Idioma")
        # Switching away and back is remembered like any language.
        await select.select_option("pt-BR")
        await expect(page.locator("main h1")).to_have_text("Entrar")
        await page.locator("#wt-lang select").select_option("es")
        await expect(page.locator("main h1")).to_have_text("Iniciar sesión")
        assert await page.evaluate("localStorage.getItem('wt.lang')") == "es"
    # A browser asking for a language nobody shipped gets Portuguese (Brazil).
    async with session(browser, stack, lang="de-DE") as s:
        await open_console(s)
        assert await s.page.get_attribute("html", "lang") == "pt-BR"


def words(lang: str) -> dict:
    return json.loads((whatstracking.LOCALES_DIR / f"{lang}.json").read_text("utf-8"))


async def test_dialogs_and_panels_in_both_languages_on_desktop_and_phone(stack, browser):
    """Screenshots of what the tour does not reach, in both languages at both sizes: sign-in,
    the new company's token, the onboarding's QR and pairing code, the numbers' QR dialog and a
    new access token (nothing wider than a phone, every field labelled: see shot())."""
    _, expect = require_browser()
    combos = [(lang, viewport) for lang in ("pt-BR", "en") for viewport in (DESKTOP, PHONE)]
    for n, (lang, viewport) in enumerate(combos, 1):
        t = words(lang)
        async with session(browser, stack, lang="en-US" if lang == "en" else lang,
                           viewport=viewport) as s:
            page = s.page
            await open_console(s)
            await view(s, "signin")
            assert await page.get_attribute("html", "lang") == lang
            await shot(s, "signin", lang)
            await page.fill("input[name=token]", ADMIN_TOKEN)
            await page.keyboard.press("Enter")
            await view(s, "companies")

            await page.click(f"main >> text={t['companies.new']} >> nth=0")
            await page.fill("dialog input[name=name]", f"Ótica Bela Vista {n}")
            await page.click(f"dialog >> text={t['common.create']}")
            await expect(page.locator("dialog pre[data-secret=token]")).to_be_visible(
                timeout=WAIT_MS)
            await shot(s, "company-created", lang)
            await page.click(f"dialog >> text={t['companies.open_new']}")
            await view(s, "onboarding")

            form = page.locator("form.create-connection")
            await form.locator("input[name=connectionId]").fill(f"vitrine-{n}")
            await form.locator("button[type=submit]").click()
            await expect(page.locator(".qr-panel img.qr")).to_be_visible(timeout=WAIT_MS)
            await shot(s, "onboarding-qr", lang)
            await page.click(f"text={t['onboarding.other_number']}")
            await form.locator("input[name=connectionId]").fill(f"celular-{n}")
            await form.locator("select[name=how]").select_option("pair")
            await form.locator("input[name=number]").fill("11988887777")
            await form.locator("button[type=submit]").click()
            await expect(page.locator(".qr-panel .pairing")).to_be_visible(timeout=WAIT_MS)
            await shot(s, "onboarding-pairing", lang)

            await page.goto(f"{s.base}/dashboard#/connections")
            await view(s, "connections")
            vitrine = page.locator(f".connection[data-connection=vitrine-{n}]")
            await vitrine.locator(f"text={t['connections.show_qr']}").click()
            await expect(page.locator("dialog img.qr")).to_be_visible(timeout=WAIT_MS)
            await shot(s, "connections-qr", lang)
            await page.keyboard.press("Escape")
            await expect(page.locator("dialog")).to_have_count(0)

            await page.goto(f"{s.base}/dashboard#/tokens")
            await view(s, "tokens")
            await page.click(f"main >> text={t['tokens.new']}")
            await page.fill("dialog input[name=name]", "Equipe de marketing")
            await page.keyboard.press("Enter")  # Enter in the field creates it
            await expect(page.locator("dialog pre[data-secret=token]")).to_be_visible(
                timeout=WAIT_MS)
            await shot(s, "tokens-new", lang)
            await clean_text(s, lang)


async def focused(s: Session) -> dict:
    return await s.page.evaluate("""() => { const a = document.activeElement;
        return {inDialog: !!(a && a.closest('dialog[open]')), tag: a && a.tagName,
                name: a && a.getAttribute('name'), text: a && a.textContent.trim()}; }""")


async def test_a_dialog_by_keyboard_alone(stack, browser):
    """Open with Enter, focus inside, Tab and Shift+Tab go round inside, Enter submits, Esc
    closes, and the focus comes back to the button that opened it."""
    _, expect = require_browser()
    created = await stack.company("loja-centro", "Loja Centro")
    async with session(browser, stack, token=created["token"]) as s:
        page = s.page
        await open_console(s, "#/tokens")
        await view(s, "tokens")
        await expect(page.locator("tr[data-token]")).to_have_count(1, timeout=WAIT_MS)
        opener = page.locator("main .spread button.primary")
        await expect(opener).to_have_text("Novo token")
        # Reach the button with Tab from the top of the page.
        await page.locator("main h1").focus()
        for _ in range(5):
            await page.keyboard.press("Tab")
            if await opener.evaluate("b => b === document.activeElement"):
                break
        assert await opener.evaluate("b => b === document.activeElement")
        await page.keyboard.press("Enter")
        await expect(page.locator("dialog[open]")).to_have_count(1)
        assert (await focused(s))["name"] == "name"  # the dialog's field has the focus
        # The dialog has a labelled field, a close button and two actions: Tab goes round them.
        seen = []
        for _ in range(9):
            await page.keyboard.press("Tab")
            where = await focused(s)
            assert where["inDialog"], where
            seen.append(where["name"] or where["text"])
        assert {"name", "Criar", "Cancelar", "✕"} <= set(seen), seen
        for _ in range(5):
            await page.keyboard.press("Shift+Tab")
            assert (await focused(s))["inDialog"]
        # Esc: closed, nothing created, the focus back on the opener.
        await page.keyboard.press("Escape")
        await expect(page.locator("dialog")).to_have_count(0)
        assert await opener.evaluate("b => b === document.activeElement")
        await expect(page.locator("tr[data-token]")).to_have_count(1)
        # Again, typing a name and Enter: created, the token shown once; Esc back to the opener.
        await page.keyboard.press("Enter")
        await page.keyboard.type("Caixa da loja")
        await page.keyboard.press("Enter")
        await expect(page.locator("dialog pre[data-secret=token]")).to_be_visible(timeout=WAIT_MS)
        assert (await focused(s))["text"] == "Já guardei"
        await page.keyboard.press("Escape")
        await expect(page.locator("dialog")).to_have_count(0)
        await expect(page.locator("tr[data-token]")).to_have_count(2, timeout=WAIT_MS)
        assert await opener.evaluate("b => b === document.activeElement")
