"""/dashboard, the console (SPEC §12): what the page itself must hold to, whatever its views.

- One self-contained page: everything from this server, nothing from a CDN.
- A company's console never shows another company's data, and data is shown as text (a lead
  whose name is HTML does not run).
- The reports' funnel is /api/report's totals for the period the page asked for.

The onboarding walk, the languages, the phone layout and the views are in
tests/test_console_browser.py (the shell) and tests/test_console_views_browser.py (the views).
"""

from __future__ import annotations

import pathlib
import re
import urllib.parse

from conftest import require_browser
from test_console_browser import (ADMIN_TOKEN, WAIT_MS, Stack, browser, open_console,  # noqa: F401
                                  session, stack, view)

import whatstracking

ROOT = pathlib.Path(__file__).resolve().parent.parent
XSS_NAME = '<img src="/x.png" onerror="window.pwned = 1">'
# Words of the other company that must never appear on loja-centro's console.
BETA_SECRETS = ("Segredo Beta", "Outro Beta", "beta-secreta", "beta-source", "beta-conn",
                "Empresa Beta", "5511977776666", "97777-6666")


async def seed(stack: Stack) -> tuple[dict, dict]:
    """loja-centro: a number, 3 visits with clicks of which 2 became leads, an organic lead whose
    name is HTML, a purchase. empresa-b: its own number, campaign, leads and purchase."""
    a = await stack.ready_company("loja-centro", "Loja Centro", "loja-centro")
    v = await stack.visit("loja-centro", "utm_source=facebook&utm_campaign=verao")
    await stack.message("loja-centro", f"Quero {whatstracking.message_code(v['code'])}",
                        phone="5511966665555", name="Pedro Facebook")
    await stack.visit("loja-centro", "utm_source=google&utm_campaign=black-friday")
    await stack.message("loja-centro", "<script>window.pwned = 1</script>",
                        phone="5511944443333", name=XSS_NAME)
    _, leads = await stack.call("GET", "/api/leads", token=a["token"])
    pedro = next(l for l in leads["leads"] if l["name"] == "Pedro Facebook")
    await stack.call("POST", f"/api/leads/{pedro['id']}/events", token=a["token"], expect=201,
                     json={"name": "purchase", "value": 350})

    b = await stack.company("empresa-b", "Empresa Beta")
    await stack.call("POST", "/api/create-instance", expect=201,
                     json={"company_id": "empresa-b", "connectionId": "beta-conn"})
    await stack.connected("beta-conn", "5511977776666", "Loja Beta")
    v = await stack.visit("empresa-b", "utm_source=beta-source&utm_campaign=beta-secreta",
                          click="5511977776666")
    await stack.message("beta-conn", f"Oi {whatstracking.message_code(v['code'])}",
                        phone="5511922221111", name="Segredo Beta")
    await stack.message("beta-conn", "Oi", phone="5511922220000", name="Outro Beta")
    return a, b


# ==================================================================================================

async def test_dashboard_page_is_self_contained(stack):
    async with stack.http.get(stack.base + "/dashboard") as resp:
        html = await resp.text()
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/html")
        policy = resp.headers["Content-Security-Policy"]
    directives = {d.split()[0]: d.split()[1:] for d in policy.split(";") if d.strip()}
    assert directives["default-src"] == ["'self'"]
    assert directives["script-src"] == ["'self'"]  # no 'unsafe-inline': no script but its files
    assert html.lstrip().lower().startswith("<!doctype html>")
    # Nothing inline the policy would refuse: every <script> has a src, no on* attribute.
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html, re.IGNORECASE)
    assert not re.search(r"<[^>]+\son[a-z]+\s*=", html, re.IGNORECASE)
    assert "javascript:" not in html.lower()
    scripts = re.findall(r'<script src="([^"]+)"', html)
    assert scripts[0] == "/console/core.js" and len(scripts) >= 8, scripts
    texts = [html]
    for src in scripts:
        async with stack.http.get(stack.base + src) as resp:
            assert resp.status == 200, src
            texts.append(await resp.text())
    for text in texts[:2]:  # the page and the core: no absolute URL but the SVG namespace name
        urls = set(re.findall(r"https?://[^\s\"'<>)]+", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, urls
    for text in texts:  # views may show example URLs (placeholders), never load one
        assert not re.search(r"""(fetch|import)\s*\(\s*["'`](https?:)?//""", text)
        assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", text,
                             re.IGNORECASE)
        assert not re.search(r"@import|url\(\s*[\"']?(https?:)?//", text, re.IGNORECASE)
        assert ".innerHTML" not in text  # data goes in as text (WT.h), never parsed as HTML


async def test_console_shows_nothing_of_another_company(stack, browser):  # noqa: F811
    _, expect = require_browser()
    a, b = await seed(stack)
    async with session(browser, stack, token=a["token"]) as s:
        page = s.page

        async def assert_clean(where: str) -> None:
            text = await page.inner_text("body")
            html = await page.content()
            for secret in BETA_SECRETS:
                assert secret not in text and secret not in html, (where, secret)

        # The reports: the funnel is /api/report's for the period the page shows.
        await open_console(s)
        await view(s, "overview")
        loaded = page.locator(".view-overview[data-loaded]")
        await expect(loaded).to_have_count(1, timeout=WAIT_MS)
        start, end = (await loaded.get_attribute("data-loaded")).split("..")
        _, report = await stack.call("GET", "/api/report?" + urllib.parse.urlencode(
            {"from": start, "to": end, "group_by": "day"}), token=a["token"])
        totals = report["totals"]
        assert (totals["visits"], totals["clicks"], totals["leads"], totals["conversions"]) == \
            (3, 3, 3, 1)
        for key, element in (("visits", "#report-visits"), ("clicks", "#report-clicks"),
                             ("leads", "#report-leads"), ("conversions", "#report-sales")):
            await expect(page.locator(element)).to_have_text(str(totals[key]))
        await expect(page.locator("#report-revenue")).to_contain_text("350,00")
        await assert_clean("overview")

        # Every view in the menu, and every lead's page.
        names = await page.evaluate(
            "[...document.querySelectorAll('#wt-nav a')].map(a => a.dataset.view)")
        assert "companies" not in names
        for name in names:
            await page.goto(f"{stack.base}/dashboard#/{name}")
            await view(s, name)
            await page.wait_for_timeout(600)
            await assert_clean(name)
        _, leads = await stack.call("GET", "/api/leads", token=a["token"])
        assert len(leads["leads"]) == 3
        for lead in leads["leads"]:
            await page.goto(f"{stack.base}/dashboard#/lead?id={lead['id']}")
            await view(s, "lead")
            await expect(page.locator("main")).to_contain_text(lead["name"], timeout=WAIT_MS)
            await assert_clean(f"lead {lead['id']}")
        # The lead whose name and message are HTML: shown as text, never run.
        xss = next(l for l in leads["leads"] if l["name"] == XSS_NAME)
        await page.goto(f"{stack.base}/dashboard#/lead?id={xss['id']}")
        await view(s, "lead")
        await expect(page.locator("main h1")).to_have_text(XSS_NAME, timeout=WAIT_MS)
        await expect(page.locator("main")).to_contain_text("<script>window.pwned = 1</script>")
        assert await page.evaluate("window.pwned") is None
        assert not any(urllib.parse.urlsplit(u).path == "/x.png" for u in s.urls)
        # Another company's lead by its id: not found, nothing of it shown.
        _, theirs = await stack.call("GET", "/api/leads", token=b["token"])
        await page.goto(f"{stack.base}/dashboard#/lead?id={theirs['leads'][0]['id']}")
        await view(s, "lead")
        await page.wait_for_timeout(800)
        await assert_clean("another company's lead")

    # The other company's own token does show its data (the check above is not vacuous).
    async with session(browser, stack, token=b["token"]) as s:
        await open_console(s, "#/leads")
        await view(s, "leads")
        await expect(s.page.locator("main")).to_contain_text("Segredo Beta", timeout=WAIT_MS)
        await expect(s.page.locator("main")).not_to_contain_text("Pedro Facebook")
        await open_console(s, "#/connections")
        await view(s, "connections")
        await expect(s.page.locator("main")).to_contain_text("+55 11 97777-6666",
                                                             timeout=WAIT_MS)
