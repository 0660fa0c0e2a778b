"""TikTok Events API (SPEC §9), on SQLite and on Postgres: website leads with a ttclid go out as
TikTok web events (the click id, the hashed phone, the browser, the page, value and currency),
and a delivery counts as delivered only when TikTok answers `code: 0` (it answers refusals with
HTTP 200). The platform is tests/fake_platforms.FakeTiktok."""

from __future__ import annotations

import hashlib

import pytest

import whatstracking
from conftest import Api, create_company
from fake_platforms import FakeTiktok
from test_conversions import (FAST, UA, call, configure, deliveries, delivery, direct_lead,
                              post_event, website_lead)

PIXEL = "C4ABCDEF0123456789"
TOKEN = "tiktok-events-access-token"
TTCLID = "E.C.P.tiktok-click-0001"
PAGE = f"https://loja.test/oferta?utm_source=tiktok&ttclid={TTCLID}"


@pytest.fixture
async def tiktok():
    fake = await FakeTiktok(PIXEL, TOKEN).start()
    yield fake
    await fake.close()


@pytest.fixture
async def api(make_config, aiohttp_client, tiktok) -> Api:
    client = await aiohttp_client(whatstracking.create_app(make_config(
        TIKTOK_EVENTS_URL=tiktok.track_url, **FAST)))
    api = Api(client, await create_company(client))
    await configure(api, tiktok={"pixel_code": PIXEL, "access_token": TOKEN})
    return api


async def test_a_ttclid_lead_and_its_purchase_reach_tiktok_as_documented(api, tiktok):
    lead = await website_lead(api, phone="551187654321", page_url=PAGE)
    await post_event(api, lead["id"], name="purchase", value=249.9, event_id="pedido-77")
    first = await delivery(api, lead["id"], "tiktok", "lead", ("delivered",))
    await delivery(api, lead["id"], "tiktok", "purchase", ("delivered",))

    assert [r.headers["access-token"] for r in tiktok.requests] == [TOKEN, TOKEN]
    body = tiktok.requests[0].json
    assert body["event_source"] == "web" and body["event_source_id"] == PIXEL
    assert "test_event_code" not in body
    # The worker sends the two at once: TikTok may get either first.
    by_name = {e["event"]: e for e in tiktok.events}
    assert sorted(by_name) == ["CompletePayment", "Contact"]
    contact, payment = by_name["Contact"], by_name["CompletePayment"]
    assert payment["event_id"] == "pedido-77"
    assert isinstance(payment["event_time"], int)
    # E.164 with + before hashing; a Brazilian mobile in both forms, the dialable one first.
    assert contact["user"] == {
        "ttclid": TTCLID, "user_agent": UA,
        "phone": [hashlib.sha256(b"+5511987654321").hexdigest(),
                  hashlib.sha256(b"+551187654321").hexdigest()]}
    assert contact["page"] == {"url": PAGE}
    assert "properties" not in contact
    assert payment["properties"] == {"value": 249.9, "currency": "BRL"}
    assert first["response"]["code"] == 0 and first["response"]["request_id"]


async def test_tiktoks_200_with_an_error_code_is_failed_with_its_message(api, tiktok):
    lead = await website_lead(api, page_url=PAGE)
    tiktok.fail("code")
    failed = await delivery(api, lead["id"], "tiktok", "lead")
    assert failed["status"] == "failed" and failed["last_status"] == 200
    assert failed["last_error"] == "TikTok code 40002: Invalid value for event_source_id"
    assert failed["response"]["code"] == 40002 and failed["delivered_at"] is None
    assert tiktok.events == []


async def test_tiktoks_rate_limit_code_is_retried(api, tiktok):
    lead = await website_lead(api, page_url=PAGE)
    tiktok.fail("ratelimit")
    done = await delivery(api, lead["id"], "tiktok", "lead")
    assert done["status"] == "delivered" and done["attempts"] == 2
    assert len(tiktok.events) == 1


async def test_a_wrong_access_token_is_failed_not_delivered(api, tiktok):
    await configure(api, tiktok={"access_token": "revoked-token"})
    lead = await website_lead(api, page_url=PAGE)
    failed = await delivery(api, lead["id"], "tiktok", "lead")
    assert failed["status"] == "failed" and "40105" in failed["last_error"]


async def test_leads_without_a_ttclid_are_skipped_and_not_sent(api, tiktok):
    organic = await direct_lead(api)
    site = await website_lead(api)  # a Facebook click
    for lead in (organic, site):
        skipped = await delivery(api, lead["id"], "tiktok", "lead")
        assert skipped["status"] == "skipped" and "ttclid" in skipped["last_error"]
    lead = await website_lead(api, page_url=PAGE)
    await post_event(api, lead["id"], name="qualified")  # no TikTok event unless mapped
    skipped = await delivery(api, lead["id"], "tiktok", "qualified")
    assert skipped["status"] == "skipped"
    assert tiktok.requests == [r for r in tiktok.requests if r.json["data"][0]["event"] == "Contact"]


async def test_event_names_and_the_test_code_come_from_the_settings(api, tiktok):
    await configure(api, tiktok={"test_event_code": "TEST98765",
                                 "event_names": {"qualified": "SubmitForm"}})
    lead = await website_lead(api, page_url=PAGE)
    await post_event(api, lead["id"], name="qualified", event_id="q-tt")
    await delivery(api, lead["id"], "tiktok", "qualified", ("delivered",))
    sent = next(e for e in tiktok.events if e["event_id"] == "q-tt")
    assert sent["event"] == "SubmitForm" and sent["_test_event_code"] == "TEST98765"
    company = await call(api, "GET", "/api/company", 200)
    assert company["tiktok"] == {"pixel_code": PIXEL, "test_event_code": "TEST98765",
                                 "event_names": {"qualified": "SubmitForm"},
                                 "access_token_set": True}
    assert len(await deliveries(api, lead_id=lead["id"])) == 2
