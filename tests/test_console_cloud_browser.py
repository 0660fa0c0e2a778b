"""The console's WhatsApp Cloud API parts (issue 17) in a real headless Chromium, pt-BR and en,
against the real server: a number connected through the Cloud API form, the webhook URL and
verify token it shows working in Meta's handshake (tests/fake_meta_webhook.py), Meta's documented
bodies (tests/fixtures/cloud) sent signed with the app secret typed into the form, and the leads
they make shown with their identities (@username without a phone, BSUID, the WhatsApp id beside
Brazil's dialable 13-digit phone).

Screenshots go to tests/artifacts/console-cloud-<what>-<lang>-<desktop|phone>.png. Needs Debian's
/usr/bin/chromium and playwright; skipped without them, failed when REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import re

import pytest
from conftest import require_browser
from fake_meta_webhook import cloud_fixture, send, verify
from test_console_views_browser import (
    ARTIFACTS,
    LANGS,
    PHONE,
    WAIT_MS,
    open_console,
    phone_fits,
    running_server,
    t,
)

APP_SECRET = "6f1d8a2c9b7e4f3a0d5c8b1e2f4a6d9c"
PHONE_NUMBER_ID = "106540352242922"
WABA_ID = "102290129340398"
ACCESS_TOKEN = "EAAG-cloud-access-token-test"
RAW_KEY = r"\b(connections|leads|lead|common)\.[a-z0-9_.]+\b"


@pytest.fixture
async def server(tmp_path):
    async with running_server(tmp_path) as running:
        yield running


async def shot(page, what: str, lang: str, where: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.evaluate("window.scrollTo(0, 0)")
    await page.wait_for_timeout(250)
    await page.screenshot(path=str(ARTIFACTS / f"console-cloud-{what}-{lang}-{where}.png"),
                          full_page=True)


async def no_raw_keys(page, selector: str = "body") -> None:
    text = await page.inner_text(selector)
    assert not re.search(RAW_KEY, text), re.search(RAW_KEY, text).group(0)


async def connect_cloud(page, name: str) -> tuple[str, str]:
    """Fill the Cloud API form like a user; returns (webhook URL, verify token) as shown."""
    _, expect = require_browser()
    await page.click("#connections-add-cloud")
    form = page.locator("form.cloud-connection")
    await expect(form).to_be_visible()
    for field in ("app_secret", "access_token"):
        assert await form.locator(f"input[name={field}]").get_attribute("type") == "password"
    # A Phone number ID that is not digits is refused before anything is sent.
    await form.locator("input[name=connectionId]").fill(name)
    await form.locator("input[name=phone_number_id]").fill("meu-numero")
    await form.locator("button[type=submit]").click()
    await expect(form.locator(".error")).to_have_text(
        await t(page, "connections.cloud_invalid.phone_number_id"))
    await form.locator("input[name=phone_number_id]").fill(PHONE_NUMBER_ID)
    await form.locator("input[name=waba_id]").fill(WABA_ID)
    await form.locator("button[type=submit]").click()
    await expect(form.locator(".error")).to_have_text(
        await t(page, "connections.cloud_missing.app_secret"))
    await form.locator("input[name=app_secret]").fill(APP_SECRET)
    await form.locator("input[name=access_token]").fill(ACCESS_TOKEN)
    await form.locator("button[type=submit]").click()
    panel = page.locator(".cloud-webhook")
    await expect(panel).to_be_visible(timeout=WAIT_MS)
    await expect(panel.locator("ol.cloud-steps li")).to_have_count(5)
    await expect(panel).to_contain_text("smb_message_echoes")
    url = (await panel.locator("pre[data-cloud=callback_url]").inner_text()).strip()
    token = (await panel.locator("pre[data-cloud=verify_token]").inner_text()).strip()
    return url, token


@pytest.mark.parametrize("lang", LANGS)
async def test_cloud_number_connected_from_the_console_receives_metas_webhooks(server, browser,
                                                                                lang):
    _, expect = require_browser()
    company = await server.company("empresa-nuvem", "Doces da Lu")
    context, page = await open_console(browser, server, company, lang, "connections")
    await expect(page.locator("#connections-add-cloud")).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#connections-add-cloud")).to_have_text(
        await t(page, "connections.add_cloud"))

    url, token = await connect_cloud(page, "Loja Nuvem")
    await shot(page, "created", lang, "desktop")
    assert url == f"{server.base}/webhook/cloud/{company.id}"
    listed = (await company.call("GET", "/api/connections"))["connections"]
    (row,) = [c for c in listed if c["connectionId"] == "loja-nuvem"]
    assert row["type"] == "cloud" and row["webhook_url"] == url
    assert row["phone_number_id"] == PHONE_NUMBER_ID and row["waba_id"] == WABA_ID
    assert APP_SECRET not in str(listed) and ACCESS_TOKEN not in str(listed) and token not in str(listed)

    # What the panel shows is what Meta's handshake needs, and nothing else passes it.
    status, challenge = await verify(server.http, url, token, "1158201444")
    assert (status, challenge) == (200, "1158201444")
    assert (await verify(server.http, url, token + "x"))[0] == 403
    await page.keyboard.press("Escape")

    # The card: the type, Meta's ids, no QR, restart or log out.
    card = page.locator("article.connection[data-connection=loja-nuvem]")
    await expect(card).to_have_attribute("data-type", "cloud")
    await expect(card.locator("[data-type=cloud]")).to_have_text(await t(page, "connections.type.cloud"))
    await expect(card.locator("dd[data-field=phone_number_id]")).to_have_text(PHONE_NUMBER_ID)
    await expect(card.locator("dd[data-field=waba_id]")).to_have_text(WABA_ID)
    for key in ("connections.show_qr", "connections.restart", "connections.logout",
                "connections.client_link", "connections.delete_all"):
        await expect(card.get_by_role("button", name=await t(page, key), exact=True)).to_have_count(0)
    await card.get_by_role("button", name=await t(page, "connections.cloud_show_webhook")).click()
    dialog = page.locator(".cloud-webhook").last
    await expect(dialog.locator("pre[data-cloud=callback_url]")).to_have_text(url)
    await expect(dialog.locator("pre[data-cloud=verify_token]")).to_have_count(0)
    await page.keyboard.press("Escape")
    await no_raw_keys(page)

    # Meta's bodies, signed with the app secret typed in: an ad lead, a username user without a
    # phone, an older Brazilian mobile (12-digit WhatsApp id), a user with phone and BSUID.
    for name in ("text-referral-image-ad", "bsuid-only", "brazil-12-digit", "wa-id-and-user-id"):
        delivery = await send(server.http, url, cloud_fixture(name, phone_number_id=PHONE_NUMBER_ID,
                                                              waba_id=WABA_ID), APP_SECRET)
        assert delivery.status == 200, (name, delivery.text)
    leads = {(l["identities"]["bsuid"] or l["identities"]["wa_id"]): l
             for l in (await company.call("GET", "/api/leads"))["leads"]}
    lu, nina = leads["BR.1377452218890614"], leads["553188776655"]
    assert lu["phone"] is None and lu["identities"]["username"].lstrip("@") == "lu.artesanato"
    assert nina["phone"] == "5531988776655" and lu["source"] == "cloud"

    await page.goto(f"{server.base}/dashboard#/leads")
    row_lu = page.locator(f"#leads-table tr[data-lead-id='{lu['id']}']")
    await expect(row_lu.locator("td[data-identity=username]")).to_have_text("@lu.artesanato",
                                                                           timeout=WAIT_MS)
    await expect(page.locator(f"#leads-table tr[data-lead-id='{nina['id']}'] td[data-identity=phone]")
                 ).to_have_text("+55 31 98877-6655")
    await shot(page, "leads", lang, "desktop")

    await page.goto(f"{server.base}/dashboard#/lead?id={lu['id']}")
    ids = page.locator("#lead-identities")
    await expect(ids.locator("dd[data-field=identity-bsuid]")).to_have_text("BR.1377452218890614",
                                                                           timeout=WAIT_MS)
    await expect(ids.locator("dd[data-field=identity-username]")).to_have_text("@lu.artesanato")
    await expect(page.locator("dd[data-field=phone]")).to_have_count(0)
    await expect(page.locator("dd[data-field=source]")).to_have_text(
        await t(page, "lead.source_name.cloud"))
    await shot(page, "lead-bsuid", lang, "desktop")

    await page.goto(f"{server.base}/dashboard#/lead?id={nina['id']}")
    await expect(page.locator("dd[data-field=phone]")).to_have_text("+55 31 98877-6655",
                                                                    timeout=WAIT_MS)
    await expect(page.locator("dd[data-field=identity-wa_id]")).to_have_text("553188776655")
    await no_raw_keys(page)

    ad = [l for l in leads.values() if l["match_method"] == "ctwa"]
    assert ad and ad[0]["attribution"]["ctwa_clid"]

    # The card now says messages are arriving, and when the last one came.
    await page.goto(f"{server.base}/dashboard#/connections")
    card = page.locator("article.connection[data-connection=loja-nuvem]")
    await expect(card.locator("[data-state]")).to_have_text(
        await t(page, "connections.cloud_state.receiving"), timeout=WAIT_MS)
    await expect(card).not_to_contain_text(await t(page, "connections.no_message_yet"))

    # Deleted here (the history stays, Meta's webhooks are refused), then completely: the name
    # connects again with a new verify token — what the console tells a user who lost theirs.
    await card.get_by_role("button", name=await t(page, "connections.delete"), exact=True).click()
    await expect(page.locator("dialog")).to_contain_text(await t(page, "connections.cloud_delete_body"))
    await page.click("dialog .btn.danger")
    await expect(page.locator("details.deleted-connections")).to_be_visible(timeout=WAIT_MS)
    later = cloud_fixture("text", phone_number_id=PHONE_NUMBER_ID, waba_id=WABA_ID)
    assert (await send(server.http, url, later, APP_SECRET)).status == 401
    await page.click("details.deleted-connections summary")
    await card.get_by_role("button", name=await t(page, "connections.delete_all")).click()
    await page.click("dialog .btn.danger")
    await expect(card).to_have_count(0, timeout=WAIT_MS)
    again_url, again_token = await connect_cloud(page, "loja-nuvem")
    assert again_url == url and again_token != token
    assert (await verify(server.http, url, again_token, "7"))[0:2] == (200, "7")
    assert (await verify(server.http, url, token, "7"))[0] == 403
    assert (await send(server.http, url, later, APP_SECRET)).status == 200
    await page.keyboard.press("Escape")
    await no_raw_keys(page)
    assert page.errors == [] and page.foreign == []
    await context.close()

    # The phone layout of the connections page and of a lead with every identity.
    both = leads["BR.1410018717833190"]
    for view, what in (("connections", "connections"), (f"lead?id={both['id']}", "lead-ids")):
        context, page = await open_console(browser, server, company, lang, view, viewport=PHONE)
        await page.wait_for_selector("article.connection, #lead-identities", timeout=WAIT_MS)
        await phone_fits(page)
        await shot(page, what, lang, "phone")
        await context.close()
