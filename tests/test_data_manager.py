"""Google's Data Manager API destination (SPEC §9), on SQLite and on Postgres: a service
account's signed JWT exchanged for a token, events:ingest with the Google click id and the
hashed phone, the requestId kept on the delivery and requestStatus:retrieve asked until Google
says SUCCESS (delivered) or FAILED. The platform is tests/fake_platforms.FakeGoogle, which
checks the JWT's RS256 signature with the service account's public key."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

import pytest

import whatstracking
from conftest import Api, create_company
from fake_platforms import FakeGoogle, new_service_account
from test_conversions import (FAST, call, configure, delivery, direct_lead, post_event,
                              website_lead)

CUSTOMER = "123-456-7890"
ACTIONS = {"lead": "6543210001", "purchase": "6543210002"}


@pytest.fixture(scope="module")
def key() -> dict:
    return new_service_account()


@pytest.fixture
async def google(key):
    fake = await FakeGoogle(key).start()
    yield fake
    await fake.close()


@pytest.fixture
async def api(make_config, aiohttp_client, google, key) -> Api:
    client = await aiohttp_client(whatstracking.create_app(make_config(
        GOOGLE_TOKEN_URL=google.token_url, DATA_MANAGER_URL=google.api_url, **FAST)))
    api = Api(client, await create_company(client))
    await configure(api, data_manager={"service_account_key": key,
                                       "customer_id": CUSTOMER, "conversion_actions": ACTIONS})
    return api


async def test_a_gclid_purchase_is_ingested_then_delivered_once_google_has_processed_it(
        api, google, key):
    lead = await website_lead(api, phone="551187654321",
                              page_url="https://loja.test/?gclid=Cj0KCQ-dm-1&utm_source=google")
    await post_event(api, lead["id"], name="purchase", value=1200, event_id="pedido-dm-1")
    done = await delivery(api, lead["id"], "data_manager", "purchase", ("delivered",))
    first = await delivery(api, lead["id"], "data_manager", "lead", ("delivered",))

    body = next(b for b in google.ingested if b["events"][0]["transactionId"] == "pedido-dm-1")
    assert body["destinations"] == [{
        "operatingAccount": {"accountType": "GOOGLE_ADS", "accountId": "1234567890"},
        "productDestinationId": "6543210002"}]
    assert body["encoding"] == "HEX" and "validateOnly" not in body
    event = body["events"][0]
    assert event["adIdentifiers"] == {"gclid": "Cj0KCQ-dm-1"}
    assert event["conversionValue"] == 1200 and event["currency"] == "BRL"
    assert event["eventSource"] == "OTHER"  # the sale happened in the chat
    datetime.fromisoformat(event["eventTimestamp"])
    assert event["userData"] == {"userIdentifiers": [
        {"phoneNumber": hashlib.sha256(b"+5511987654321").hexdigest()},
        {"phoneNumber": hashlib.sha256(b"+551187654321").hexdigest()}]}
    lead_body = next(b for b in google.ingested if b["_requestId"] == first["response"]["requestId"])
    assert lead_body["events"][0]["eventSource"] == "WEB"  # the click to WhatsApp, on the site

    # Google reported PROCESSING once, then SUCCESS: two checks of that request, its answer kept.
    assert done["response"] == {"requestId": body["_requestId"], "requestStatus": "SUCCESS",
                                "recordCount": "1"}
    assert google.checks.count(body["_requestId"]) == 2
    assert done["attempts"] == 3 and done["delivered_at"]
    assert len([b for b in google.ingested if b["events"][0]["transactionId"] == "pedido-dm-1"]) == 1
    assert {g["iss"] for g in google.grants} == {key["client_email"]}


async def test_while_google_processes_the_delivery_waits_pending_with_its_request_id(api, google):
    google.script = ["PROCESSING"]  # Google has not finished yet
    lead = await website_lead(api, page_url="https://loja.test/?wbraid=WB-dm")
    waiting = await delivery(api, lead["id"], "data_manager", "lead", ("pending",),
                             attempts=2)
    assert waiting["response"]["requestStatus"] == "PROCESSING"
    request_id = waiting["response"]["requestId"]
    assert google.ingested[0]["events"][0]["adIdentifiers"] == {"wbraid": "WB-dm"}
    google.statuses[request_id] = ["SUCCESS"]
    done = await delivery(api, lead["id"], "data_manager", "lead", ("delivered",))
    assert done["response"]["requestStatus"] == "SUCCESS"
    assert len(google.ingested) == 1  # asked about, never sent twice


async def test_a_request_google_failed_is_failed_with_its_reasons(api, google):
    google.script = ["PROCESSING", "FAILED"]
    lead = await website_lead(api, page_url="https://loja.test/?gclid=Cj0-bad")
    failed = await delivery(api, lead["id"], "data_manager", "lead")
    assert failed["status"] == "failed"
    assert failed["last_error"] == "Data Manager: FAILED (INVALID_GCLID)"
    assert failed["response"]["errorInfo"] == [{"recordCount": "1", "reason": "INVALID_GCLID"}]


async def test_a_key_google_does_not_know_is_refused_at_the_token_endpoint(api, google):
    await configure(api, data_manager={"service_account_key": new_service_account(
        "someone-else@other.iam.gserviceaccount.com")})
    lead = await website_lead(api, page_url="https://loja.test/?gclid=Cj0-key")
    failed = await delivery(api, lead["id"], "data_manager", "lead")
    assert failed["status"] == "failed" and failed["last_status"] == 400
    assert failed["last_error"] == ("Google token endpoint: HTTP 400: invalid_grant: "
                                    "Invalid JWT Signature.")
    assert google.ingested == []


async def test_leads_without_a_click_id_or_phone_or_action_are_skipped(api, google):
    lead = await direct_lead(api)  # a phone: enhanced conversions for leads match on it
    await post_event(api, lead["id"], name="qualified")  # no conversion action for it
    skipped = await delivery(api, lead["id"], "data_manager", "qualified")
    assert skipped["status"] == "skipped" and "conversion_actions" in skipped["last_error"]
    sent = await delivery(api, lead["id"], "data_manager", "lead", ("delivered",))
    body = google.ingested[0]
    assert "adIdentifiers" not in body["events"][0] and body["events"][0]["userData"]
    assert sent["response"]["requestStatus"] == "SUCCESS"


@pytest.mark.parametrize("patch, words", [
    ({"customer_id": "12345"}, "data_manager.customer_id"),
    ({"service_account_key": "{\"client_email\": \"x@y\"}"}, "data_manager.service_account_key"),
    ({"service_account_key": "not json"}, "data_manager.service_account_key"),
    ({"service_account_key": {"client_email": "x@y", "private_key": 42}},
     "data_manager.service_account_key"),
    ({"conversion_actions": {"purchase": "AW-123/abc"}}, "data_manager.conversion_actions"),
    ({"conversion_actions": {"sale": "123"}}, "data_manager.conversion_actions"),
])
async def test_bad_data_manager_settings_are_400_naming_the_field(api, patch, words):
    before = await call(api, "GET", "/api/company", 200)
    data = await call(api, "PATCH", "/api/company", 400, json={"data_manager": patch})
    assert words in data["error"]
    assert await call(api, "GET", "/api/company", 200) == before


async def test_the_key_is_write_only_and_the_customer_id_kept_as_digits(api, key):
    company = await call(api, "GET", "/api/company", 200)
    assert company["data_manager"] == {"customer_id": "1234567890",
                                       "conversion_actions": ACTIONS,
                                       "service_account_key_set": True}
    assert key["private_key"][40:80] not in json.dumps(company)


async def test_a_failed_check_keeps_the_request_id_and_sends_nothing_twice(api, google):
    google.script = ["PROCESSING"]
    lead = await website_lead(api, page_url="https://loja.test/?gclid=Cj0-keep")
    waiting = await delivery(api, lead["id"], "data_manager", "lead", ("pending",), attempts=2)
    request_id = waiting["response"]["requestId"]
    google.fail("500")  # the next call, the token for the next check, fails
    broken = await delivery(api, lead["id"], "data_manager", "lead", ("pending",),
                            last_status=500)
    assert broken["last_error"].startswith("Google token endpoint: HTTP 500")
    assert broken["response"]["requestId"] == request_id
    google.statuses[request_id] = ["SUCCESS"]
    done = await delivery(api, lead["id"], "data_manager", "lead", ("delivered",))
    assert done["response"]["requestId"] == request_id
    assert len(google.ingested) == 1
