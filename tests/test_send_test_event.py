"""POST /api/destinations/{name}/test (SPEC §9), on SQLite and on Postgres: a test event the
platform keeps apart from real conversions, and the platform's own answer in ours. Meta and
TikTok take a test event code, GA4 its validation server, Data Manager validateOnly, the CRM a
signed ping. Nothing is recorded: no lead, no event, no delivery."""

from __future__ import annotations

import json

import pytest

import whatstracking
from conftest import ADMIN_TOKEN, Api, create_company
from fake_platforms import (FakeCrm, FakeGA4, FakeGoogle, FakeMeta, FakeTiktok, closed_port_url,
                            new_service_account)
from test_conversions import (CRM_SECRET, FAST, GA4_ID, GA4_SECRET, META_TOKEN, call, configure,
                              deliveries, ga4_settings, meta_settings)

PIXEL = "C4TESTPIXEL000"
TIKTOK_TOKEN = "tiktok-token"


@pytest.fixture
async def fakes():
    key = new_service_account()
    platforms = {"meta": FakeMeta(), "ga4": FakeGA4(), "tiktok": FakeTiktok(PIXEL, TIKTOK_TOKEN),
                 "google": FakeGoogle(key), "crm": FakeCrm(CRM_SECRET)}
    for fake in platforms.values():
        await fake.start()
    platforms["key"] = key
    yield platforms
    for name, fake in platforms.items():
        if name != "key":
            await fake.close()


@pytest.fixture
async def api(make_config, aiohttp_client, fakes) -> Api:
    client = await aiohttp_client(whatstracking.create_app(make_config(
        META_GRAPH_URL=fakes["meta"].url, GA4_MP_URL=fakes["ga4"].collect_url,
        TIKTOK_EVENTS_URL=fakes["tiktok"].track_url, GOOGLE_TOKEN_URL=fakes["google"].token_url,
        DATA_MANAGER_URL=fakes["google"].api_url, **FAST)))
    return Api(client, await create_company(client))


async def test_meta_test_event_carries_the_test_code_and_returns_metas_answer(api, fakes):
    await configure(api, meta=meta_settings())
    data = await call(api, "POST", "/api/destinations/meta/test", 409, json={})
    assert data["error"].startswith("meta.test_event_code is needed for a test event")
    assert fakes["meta"].requests == []

    data = await call(api, "POST", "/api/destinations/meta/test", 200,
                      json={"test_event_code": "TEST11223"})
    assert data["ok"] is True and data["status"] == "delivered" and data["http_status"] == 200
    assert data["response"]["events_received"] == 1 and data["response"]["fbtrace_id"]
    sent, = fakes["meta"].events
    assert sent["_test_event_code"] == "TEST11223" and sent["_access_token"] == META_TOKEN
    assert sent["event_id"].startswith("test-")
    assert await deliveries(api) == []


async def test_meta_refusing_the_test_event_is_ok_false_with_metas_words(api, fakes):
    await configure(api, meta=meta_settings(test_event_code="TEST11223"))
    fakes["meta"].fail("received0")
    data = await call(api, "POST", "/api/destinations/meta/test", 200)
    assert data["ok"] is False and data["status"] == "failed"
    assert data["error"].startswith("Meta received 0 of 1 events")
    assert data["response"]["events_received"] == 0


async def test_ga4_test_goes_to_the_validation_server_and_returns_its_messages(api, fakes):
    await configure(api, ga4=ga4_settings())
    data = await call(api, "POST", "/api/destinations/ga4/test", 200)
    assert data == {"ok": True, "destination": "ga4", "status": "delivered", "http_status": 200,
                    "error": None, "response": {"validationMessages": []}}
    assert fakes["ga4"].payloads == []  # nothing reached the real collect endpoint
    checked, = fakes["ga4"].validated
    assert checked["validation_behavior"] == "ENFORCE_RECOMMENDATIONS"
    assert fakes["ga4"].requests[0].query == {"measurement_id": GA4_ID, "api_secret": GA4_SECRET}

    fakes["ga4"].findings = lambda query, body: [  # the validation server finds something
        ("events[0].params.currency", "currency must be ISO 4217", "VALUE_INVALID")]
    data = await call(api, "POST", "/api/destinations/ga4/test", 200)
    assert data["ok"] is False and data["status"] == "failed"
    assert data["error"] == "events[0].params.currency: currency must be ISO 4217 (VALUE_INVALID)"
    assert data["response"] == {"validationMessages": [{
        "fieldPath": "events[0].params.currency", "description": "currency must be ISO 4217",
        "validationCode": "VALUE_INVALID"}]}


async def test_tiktok_test_event_needs_a_test_code_and_returns_tiktoks_code(api, fakes):
    await configure(api, tiktok={"pixel_code": PIXEL, "access_token": TIKTOK_TOKEN})
    await call(api, "POST", "/api/destinations/tiktok/test", 409)
    data = await call(api, "POST", "/api/destinations/tiktok/test", 200,
                      json={"test_event_code": "TEST55"})
    assert data["ok"] is True and data["response"]["code"] == 0
    assert fakes["tiktok"].events[0]["_test_event_code"] == "TEST55"
    fakes["tiktok"].fail("code")
    data = await call(api, "POST", "/api/destinations/tiktok/test", 200,
                      json={"test_event_code": "TEST55"})
    assert data["ok"] is False and data["response"]["code"] == 40002


async def test_data_manager_test_is_validate_only(api, fakes):
    await configure(api, data_manager={"service_account_key": fakes["key"],
                                       "customer_id": "1234567890",
                                       "conversion_actions": {"purchase": "987654"}})
    data = await call(api, "POST", "/api/destinations/data_manager/test", 200)
    assert data["ok"] is True and data["response"] == {"validateOnly": True}
    body, = fakes["google"].ingested
    assert body["validateOnly"] is True
    assert body["destinations"][0]["productDestinationId"] == "987654"
    assert fakes["google"].statuses == {}  # nothing to process


async def test_crm_test_is_a_signed_ping_and_an_unreachable_one_is_502(api, fakes):
    crm = fakes["crm"]
    await configure(api, crm_webhook={"url": crm.hook_url, "secret": CRM_SECRET})
    data = await call(api, "POST", "/api/destinations/crm_webhook/test", 200)
    assert data["ok"] is True and data["http_status"] == 200 and data["response"] is None
    ping, = crm.bodies
    assert ping["type"] == "ping" and ping["company_id"] == api.company_id
    assert crm.requests[0].headers["x-whatstracking-event"] == "ping"

    await configure(api, crm_webhook={"secret": "wrong"})
    data = await call(api, "POST", "/api/destinations/crm_webhook/test", 200)
    assert data["ok"] is False and data["http_status"] == 401

    await configure(api, crm_webhook={"url": closed_port_url() + "/hook"})
    data = await call(api, "POST", "/api/destinations/crm_webhook/test", 502)
    assert data["error"] == "crm_webhook is unreachable"


async def test_unknown_unset_and_foreign_destinations(api):
    assert (await call(api, "POST", "/api/destinations/linkedin/test", 404))["error"] == \
        "Not found"
    data = await call(api, "POST", "/api/destinations/ga4/test", 409)
    assert data["error"] == "ga4 is not set up"
    await configure(api, ga4={"measurement_id": GA4_ID})
    data = await call(api, "POST", "/api/destinations/ga4/test", 409)
    assert data["error"] == "ga4 is not set up: ga4.api_secret"
    await configure(api, ga4={"api_secret": GA4_SECRET, "enabled": False})
    data = await call(api, "POST", "/api/destinations/ga4/test", 409)
    assert data["error"] == "ga4 is switched off (ga4.enabled)"
    await call(api, "POST", "/api/destinations/ga4/test", 401, token=None)
    await call(api, "POST", "/api/destinations/ga4/test", 400, json=[])
    await call(api, "POST", "/api/destinations/meta/test", 400, json={"test_event_code": 7})
    # The admin names the company; a company's token never tests another's destinations.
    await configure(api, ga4={"enabled": True})
    other = await create_company(api.client, "outra-empresa")
    data = await call(api, "POST", "/api/destinations/ga4/test", 409, token=other["token"])
    assert "not set up" in data["error"]
    data = await call(api, "POST", "/api/destinations/ga4/test", 200, token=ADMIN_TOKEN,
                      json={"company_id": api.company_id})
    assert data["ok"] is True
