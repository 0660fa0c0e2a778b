"""Conversions out (SPEC §9), on SQLite and on Postgres: lead events, the destinations (Meta
Conversions API on both paths, GA4 Measurement Protocol, the signed CRM webhook), the durable
outbox with its retries, labels that record events, and the Google Ads offline-conversions CSV.

The platforms are the fakes of tests/fake_platforms.py: every test asserts on what they received
as well as on what our API answers. Nothing sleeps for a fixed time: tests poll with a deadline.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import hmac
import io
import json
import re
import time
import uuid
from datetime import datetime, timezone

import pytest

import whatstracking
from conftest import ADMIN_TOKEN, Api, create_company, eventually, fixture, upsert
from fake_platforms import FakeCrm, FakeGA4, FakeMeta, closed_port_url
from whatstracking import message_code

FAST = {"DELIVERY_POLL_SECONDS": "0.05", "DELIVERY_RETRY_SECONDS": "0.05",
        "DELIVERY_TIMEOUT": "0.5"}
DATASET = "1234567890123456"
META_TOKEN = "EAAB-meta-secret-token"
WABA = "102290129340398"
GA4_ID = "G-TEST123456"
GA4_SECRET = "ga4-secret-value"
CRM_SECRET = "crm-shared-secret"
UA = "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/126.0 Mobile"
FBCLID = "IwAR2xYzAbCdEf_fbclid-test"
FBP = "fb.1.1732400000000.987654321"
PAGE = f"https://loja.test/promo?utm_source=facebook&utm_campaign=primavera&fbclid={FBCLID}"
CTWA_PHONE = "5521976543210"  # the sender of messages-upsert-ctwa-ad.json
CTWA_CLID = fixture("messages-upsert-ctwa-ad")["data"]["contextInfo"]["externalAdReply"]["ctwaClid"]
LABEL_PHONE = "5511988887777"  # the chat of labels-association.json
DONE = ("delivered", "failed", "skipped")


# ---- fixtures -----------------------------------------------------------------------------------

@pytest.fixture
async def meta():
    fake = await FakeMeta().start()
    yield fake
    await fake.close()


@pytest.fixture
async def ga4():
    fake = await FakeGA4().start()
    yield fake
    await fake.close()


@pytest.fixture
async def crm():
    fake = await FakeCrm(CRM_SECRET).start()
    yield fake
    await fake.close()


@pytest.fixture
def config(make_config, meta, ga4):
    """A Config for the test's database with the platforms pointed at the fakes, delivery fast."""
    def make(**env: str) -> whatstracking.Config:
        return make_config(**{"META_GRAPH_URL": meta.url, "GA4_MP_URL": ga4.collect_url,
                              **FAST, **env})
    return make


@pytest.fixture
def start(config, aiohttp_client):
    """Start one more app (test client) on the test's database. `config` comes first so the
    database outlives the apps: fixtures are torn down in the reverse order of their setup."""
    async def start(**env: str):
        return await aiohttp_client(whatstracking.create_app(config(**env)))
    return start


@pytest.fixture
async def api(start) -> Api:
    client = await start()
    return Api(client, await create_company(client))


# ---- helpers ------------------------------------------------------------------------------------

_phones = iter(range(5511960000001, 5511969999999))


def new_phone() -> str:
    return str(next(_phones))


async def call(api: Api, method: str, path: str, expect: int, token: str | None = "",
               **kwargs) -> dict:
    token = api.token if token == "" else token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = await api.client.request(method, path, headers=headers, **kwargs)
    data = await resp.json()
    assert resp.status == expect, (resp.status, data)
    return data


async def configure(api: Api, **settings) -> dict:
    return await call(api, "PATCH", "/api/company", 200, json=settings)


def meta_settings(**extra) -> dict:
    return {"dataset_id": DATASET, "access_token": META_TOKEN, **extra}


def ga4_settings(**extra) -> dict:
    return {"measurement_id": GA4_ID, "api_secret": GA4_SECRET, **extra}


async def post_event(api: Api, lead_id: int, expect: int = 201, token: str | None = "",
                     **body) -> dict:
    return await call(api, "POST", f"/api/leads/{lead_id}/events", expect, token=token,
                      json=body)


async def lead_events(api: Api, lead_id: int) -> list[dict]:
    return (await call(api, "GET", f"/api/leads/{lead_id}/events", 200))["events"]


async def deliveries(api: Api, **params) -> list[dict]:
    params = {k: str(v) for k, v in params.items()}
    return (await call(api, "GET", "/api/deliveries", 200, params=params))["deliveries"]


async def delivery(api: Api, lead_id: int, destination: str, event: str,
                   status: tuple[str, ...] = DONE, timeout: float = 10.0, **match) -> dict:
    """The delivery of a lead's event to a destination, once its status is one of `status`."""
    async def probe():
        for d in await deliveries(api, lead_id=lead_id):
            if d["destination"] == destination and d["event"] == event:
                if d["status"] in status and all(d.get(k) == v for k, v in match.items()):
                    return d
        return None
    return await eventually(probe, f"{destination} delivery of {event} for lead {lead_id} "
                                   f"in {status} {match or ''}", timeout)


async def get_lead(api: Api, lead_id: int) -> dict:
    return next(lead for lead in await api.leads() if lead["id"] == lead_id)


async def direct_lead(api: Api, phone: str | None = None, name: str | None = None,
                      message_time: float | None = None) -> dict:
    """An organic lead (no visit, no ad): a first message without a code."""
    envelope = upsert("Oi, quero saber o preço", phone=phone or new_phone())
    envelope["data"]["messageTimestamp"] = int(message_time or time.time())
    if name:
        envelope["data"]["pushName"] = name
    result = await api.webhook(envelope)
    assert result["match"] == "none", result
    return await get_lead(api, result["lead_id"])


async def website_lead(api: Api, phone: str | None = None, page_url: str = PAGE,
                       user_agent: str = UA, message_time: float | None = None,
                       name: str | None = None, **tracking) -> dict:
    """A visitor lands on `page_url` (with this User-Agent), clicks the WhatsApp link and sends
    the prefilled message with the code: a lead matched by code."""
    visitor = uuid.uuid4().hex
    headers = {"User-Agent": user_agent}
    resp = await api.client.post("/tracking", headers=headers, json={
        "company_id": api.company_id, "visitor_id": visitor, "page_url": page_url, **tracking})
    landed = await resp.json()
    assert resp.status == 200, landed
    resp = await api.client.post("/tracking", headers=headers, json={
        "company_id": api.company_id, "visitor_id": visitor, "page_url": page_url,
        "event": "whatsapp_click", "code": landed["code"], "whatsapp_phone": "5511900001111",
        **tracking})
    assert resp.status == 200, await resp.text()
    envelope = upsert(f"Olá, vim pelo site {message_code(landed['code'])}",
                      phone=phone or new_phone())
    envelope["data"]["messageTimestamp"] = int(message_time or time.time())
    if name:
        envelope["data"]["pushName"] = name
    result = await api.webhook(envelope)
    assert result.get("match") == "code", result
    return await get_lead(api, result["lead_id"])


async def ctwa_lead(api: Api, message_time: float | None = None) -> dict:
    """A lead from a Click-to-WhatsApp ad (messages-upsert-ctwa-ad with a recent time)."""
    envelope = fixture("messages-upsert-ctwa-ad")
    envelope["data"]["messageTimestamp"] = int(message_time or time.time())
    result = await api.webhook(envelope)
    assert result.get("match") == "ctwa", result
    return await get_lead(api, result["lead_id"])


async def set_sql(api: Api, sql: str, *args) -> None:
    await api.db.transact(lambda tx: tx.execute(sql, *args))


def ts(iso_time: str) -> float:
    return datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp()


# ---- POST/GET /api/leads/{id}/events ------------------------------------------------------------

async def test_events_are_recorded_and_listed_with_the_automatic_lead_event(api):
    lead = await direct_lead(api, message_time=ts("2025-10-21T11:40:39Z"))
    bodies = [
        {"name": "qualified", "event_id": "q-1"},
        {"name": "purchase", "value": 1499.9, "currency": "brl",
         "occurred_at": "2025-10-22T15:00:00Z", "event_id": "order-1001"},
        {"name": "refund", "value": 200, "currency": "USD",
         "occurred_at": ts("2025-10-23T09:30:00Z"), "event_id": "refund-1001"},
        {"name": "lost"},
    ]
    created = []
    for body in bodies:
        answer = await post_event(api, lead["id"], **body)
        assert answer["ok"] is True and answer["duplicate"] is False
        created.append(answer["event"])
    assert created[1]["value"] == 1499.9 and created[1]["currency"] == "BRL"
    assert created[1]["occurred_at"] == "2025-10-22T15:00:00.000Z"
    assert created[1]["event_id"] == "order-1001" and created[1]["lead_id"] == lead["id"]
    assert created[2]["occurred_at"] == "2025-10-23T09:30:00.000Z"
    assert created[2]["value"] == 200 and created[2]["currency"] == "USD"
    assert created[0]["currency"] == "BRL"  # the company's default currency
    assert created[3]["event_id"]  # one is made up when none is given

    listed = await lead_events(api, lead["id"])
    by_name = {e["name"]: e for e in listed}
    assert sorted(by_name) == ["lead", "lost", "purchase", "qualified", "refund"]
    assert len(listed) == 5
    assert by_name["lead"]["occurred_at"] == "2025-10-21T11:40:39.000Z"  # the message's time
    assert by_name["lead"]["source"] == "whatsapp"
    assert by_name["purchase"] == created[1]
    assert all(e["source"] == "api" for e in listed if e["name"] != "lead")
    assert len({e["event_id"] for e in listed}) == 5


async def test_same_event_id_is_a_duplicate_with_no_second_delivery(api, crm):
    await configure(api, crm_webhook={"url": crm.hook_url, "secret": CRM_SECRET})
    lead = await direct_lead(api)
    first = await post_event(api, lead["id"], name="purchase", value=99.5, event_id="order-77")
    again = await post_event(api, lead["id"], 200, name="purchase", value=99.5,
                             event_id="order-77")
    assert again["duplicate"] is True and again["event"] == first["event"]
    await delivery(api, lead["id"], "crm_webhook", "purchase", ("delivered",))
    await delivery(api, lead["id"], "crm_webhook", "lead", ("delivered",))
    purchases = [d for d in await deliveries(api, lead_id=lead["id"]) if d["event"] == "purchase"]
    assert len(purchases) == 1
    assert crm.event_ids().count("order-77") == 1
    assert [e["event_id"] for e in await lead_events(api, lead["id"])].count("order-77") == 1


async def test_event_id_of_another_leads_event_is_a_conflict(api):
    one, two = await direct_lead(api), await direct_lead(api)
    await post_event(api, one["id"], name="qualified", event_id="shared-id")
    data = await post_event(api, two["id"], 409, name="qualified", event_id="shared-id")
    assert "event_id" in data["error"]
    assert [e["name"] for e in await lead_events(api, two["id"])] == ["lead"]


@pytest.mark.parametrize("body, field", [
    ({"name": "sale"}, "name"),
    ({}, "name"),
    ({"name": "lead"}, "name"),  # recorded by WhatsTracking itself, not through the API
    ({"name": "purchase", "value": "100"}, "value"),
    ({"name": "purchase", "value": -1}, "value"),
    ({"name": "purchase", "value": True}, "value"),
    ({"name": "purchase", "value": 10, "currency": "REAIS"}, "currency"),
    ({"name": "purchase", "value": 10, "currency": 986}, "currency"),
    ({"name": "qualified", "occurred_at": "yesterday"}, "occurred_at"),
    ({"name": "qualified", "occurred_at": "1969-12-31T23:59:59Z"}, "occurred_at"),
    ({"name": "qualified", "event_id": ""}, "event_id"),
    ({"name": "qualified", "event_id": "x" * 129}, "event_id"),
    ({"name": "qualified", "event_id": 42}, "event_id"),
])
async def test_bad_event_is_400_naming_the_field(api, body, field):
    lead = await direct_lead(api)
    data = await post_event(api, lead["id"], 400, **body)
    assert field in data["error"]
    assert [e["name"] for e in await lead_events(api, lead["id"])] == ["lead"]


async def test_event_time_ahead_of_our_clock_is_recorded_as_now(api):
    # openapi.json cannot say "not in the future", so the fuzz test's valid 2099 is taken, as
    # Meta takes an event_time ahead of its clock.
    lead = await direct_lead(api)
    await post_event(api, lead["id"], 201, name="qualified", occurred_at="2099-01-01T00:00:00Z")
    await post_event(api, lead["id"], 201, name="lost", occurred_at=4102444800)  # 2100
    times = {e["name"]: datetime.fromisoformat(e["occurred_at"].replace("Z", "+00:00"))
             for e in await lead_events(api, lead["id"])}
    assert times["qualified"] <= datetime.now(timezone.utc)
    assert times["lost"] <= datetime.now(timezone.utc)


async def test_event_body_must_be_a_json_object(api):
    lead = await direct_lead(api)
    resp = await api.client.post(f"/api/leads/{lead['id']}/events", data=b"[1, 2]",
                                 headers=api.auth)
    assert resp.status == 400 and "error" in await resp.json()
    resp = await api.client.post(f"/api/leads/{lead['id']}/events", data=b"{nope",
                                 headers=api.auth)
    assert resp.status == 400 and "error" in await resp.json()


async def test_events_need_a_token_and_stay_within_the_company(api):
    lead = await direct_lead(api)
    other = Api(api.client, await create_company(api.client, "outra-empresa"))
    assert (await post_event(other, lead["id"], 404, name="qualified"))["error"]
    assert (await call(other, "GET", f"/api/leads/{lead['id']}/events", 404))["error"]
    assert (await post_event(api, lead["id"], 401, token=None, name="qualified"))["error"] \
        == "Unauthorized"
    assert (await post_event(api, lead["id"], 401, token="wt_not-a-token",
                             name="qualified"))["error"] == "Unauthorized"
    assert (await call(api, "GET", f"/api/leads/{lead['id']}/events", 401, token=None))
    assert (await post_event(api, 999999, 404, name="qualified"))["error"]
    assert (await post_event(api, "abc", 404, name="qualified"))["error"]
    # The admin token names the company.
    admin = Api(api.client, {**api.company, "token": ADMIN_TOKEN})
    await post_event(admin, lead["id"], 201, name="qualified", company_id=api.company_id)
    await post_event(admin, lead["id"], 404, name="lost", company_id="outra-empresa")
    assert [e["name"] for e in await lead_events(api, lead["id"])] == ["lead", "qualified"]


# ---- Meta Conversions API: website / chat leads -------------------------------------------------

async def test_meta_website_lead_sends_hashed_phone_fbc_fbp_and_user_agent(api, meta):
    await configure(api, meta=meta_settings(test_event_code="TEST4242"))
    phone = "5511987654321"
    lead = await website_lead(api, phone=phone, fbp=FBP)
    bought = await post_event(api, lead["id"], name="purchase", value=349.9, currency="BRL",
                              event_id="order-9001")
    await delivery(api, lead["id"], "meta", "lead", ("delivered",))
    await delivery(api, lead["id"], "meta", "purchase", ("delivered",))
    lead_event = next(e for e in await lead_events(api, lead["id"]) if e["name"] == "lead")

    assert len(meta.events) == 2 and len(meta.requests) == 2
    assert all(r.path == f"/v25.0/{DATASET}/events" for r in meta.requests)
    first, purchase = meta.accepted(lead_event["event_id"])[0], meta.accepted("order-9001")[0]
    # The click to WhatsApp happened on the website; the purchase in the chat.
    assert first["action_source"] == "website" and first["event_source_url"] == PAGE
    assert first["user_data"]["client_user_agent"] == UA
    assert purchase["action_source"] == "chat" and "event_source_url" not in purchase
    for sent in (first, purchase):
        assert sent["_access_token"] == META_TOKEN
        assert sent["_test_event_code"] == "TEST4242"
        user = sent["user_data"]
        # A Brazilian mobile in both forms: with its 9th digit and as older WhatsApp ids have it.
        assert user["ph"] == [hashlib.sha256(phone.encode()).hexdigest(),
                              hashlib.sha256(b"551187654321").hexdigest()]
        assert user["fbp"] == FBP
        # No _fbc cookie: built from the fbclid as fb.1.<click time in ms>.<fbclid>.
        clicked_ms = int(ts(lead["clicked_at"]) * 1000)
        match = re.fullmatch(r"fb\.1\.(\d{13})\.(.+)", user["fbc"])
        assert match and match.group(2) == FBCLID
        assert abs(int(match.group(1)) - clicked_ms) <= 1
    assert first["event_name"] == "Lead"
    assert first["event_time"] == int(ts(lead_event["occurred_at"]))
    assert "custom_data" not in first
    assert purchase["event_name"] == "Purchase"
    assert purchase["event_id"] == bought["event"]["event_id"] == "order-9001"
    assert purchase["custom_data"] == {"value": 349.9, "currency": "BRL"}
    assert purchase["event_time"] == int(ts(bought["event"]["occurred_at"]))


async def test_meta_uses_the_fbc_cookie_when_the_visit_had_one(api, meta):
    await configure(api, meta=meta_settings())
    fbc = f"fb.1.1732000000000.{FBCLID}"
    lead = await website_lead(api, fbc=fbc)
    await delivery(api, lead["id"], "meta", "lead", ("delivered",))
    assert meta.events[0]["user_data"]["fbc"] == fbc
    assert "_test_event_code" in meta.events[0] and meta.events[0]["_test_event_code"] is None


async def test_meta_organic_lead_is_a_chat_event_with_the_hashed_phone(api, meta):
    await configure(api, meta=meta_settings())
    lead = await direct_lead(api, phone="5531991234567")
    await post_event(api, lead["id"], name="qualified", event_id="q-organic")
    await delivery(api, lead["id"], "meta", "qualified", ("delivered",))
    sent = meta.accepted("q-organic")[0]
    assert sent["action_source"] == "chat" and sent["event_name"] == "QualifiedLead"
    assert sent["user_data"] == {"ph": [hashlib.sha256(b"5531991234567").hexdigest(),
                                        hashlib.sha256(b"553191234567").hexdigest()]}


async def test_meta_event_names_are_mapped_per_path(api, meta):
    await configure(api, meta=meta_settings(waba_id=WABA, event_names={
        "website": {"qualified": "Contact", "lost": "LostLead"},
        "messaging": {"lead": "ViewContent", "qualified": "InitiateCheckout"}}))
    site = await website_lead(api)
    chat = await ctwa_lead(api)
    await post_event(api, site["id"], name="qualified", event_id="site-q")
    await post_event(api, site["id"], name="lost", event_id="site-lost")
    await post_event(api, chat["id"], name="qualified", event_id="chat-q")
    await post_event(api, chat["id"], name="purchase", value=10, event_id="chat-buy")
    for lead, name in ((site, "qualified"), (site, "lost"), (site, "lead"), (chat, "qualified"),
                       (chat, "lead"), (chat, "purchase")):
        await delivery(api, lead["id"], "meta", name, ("delivered",))
    assert meta.accepted("site-q")[0]["event_name"] == "Contact"
    assert meta.accepted("site-lost")[0]["event_name"] == "LostLead"
    assert meta.accepted(f"lead-{site['id']}")[0]["event_name"] == "Lead"  # default kept
    assert meta.accepted("chat-q")[0]["event_name"] == "InitiateCheckout"
    assert meta.accepted(f"lead-{chat['id']}")[0]["event_name"] == "ViewContent"
    assert meta.accepted("chat-buy")[0]["event_name"] == "Purchase"  # default kept


async def test_meta_event_without_a_mapped_name_is_skipped(api, meta):
    await configure(api, meta=meta_settings())
    lead = await website_lead(api)
    await post_event(api, lead["id"], name="lost")  # no standard Meta event for a lost lead
    skipped = await delivery(api, lead["id"], "meta", "lost")
    assert skipped["status"] == "skipped" and "lost" in skipped["last_error"]
    await delivery(api, lead["id"], "meta", "lead", ("delivered",))
    assert [e["event_name"] for e in meta.events] == ["Lead"]


# ---- Meta Conversions API: Click-to-WhatsApp leads ----------------------------------------------

async def test_meta_ctwa_lead_is_a_business_messaging_event(api, meta):
    await configure(api, meta=meta_settings(waba_id=WABA))
    lead = await ctwa_lead(api)
    assert lead["match_method"] == "ctwa"
    await post_event(api, lead["id"], name="purchase", value=120, currency="BRL",
                     event_id="ctwa-order")
    await delivery(api, lead["id"], "meta", "lead", ("delivered",))
    await delivery(api, lead["id"], "meta", "purchase", ("delivered",))
    first = meta.accepted(f"lead-{lead['id']}")[0]
    assert first["event_name"] == "LeadSubmitted"
    for sent in (first, meta.accepted("ctwa-order")[0]):
        assert sent["action_source"] == "business_messaging"
        assert sent["messaging_channel"] == "whatsapp"
        assert sent["user_data"]["ctwa_clid"] == CTWA_CLID
        assert sent["user_data"]["whatsapp_business_account_id"] == WABA
        assert "event_source_url" not in sent
    assert meta.accepted("ctwa-order")[0]["custom_data"] == {"value": 120, "currency": "BRL"}


async def test_meta_ctwa_qualified_is_not_sent_by_default_and_a_refused_name_fails(api, meta):
    # Only LeadSubmitted and Purchase are names every source agrees Meta takes on the
    # business-messaging path: a qualified CTWA lead is sent only when the company maps it, and
    # a name Meta refuses there fails at once with Meta's words.
    await configure(api, meta=meta_settings(waba_id=WABA))
    lead = await ctwa_lead(api)
    await post_event(api, lead["id"], name="qualified", event_id="ctwa-q")
    skipped = await delivery(api, lead["id"], "meta", "qualified")
    assert skipped["status"] == "skipped" and "messaging" in skipped["last_error"]

    await configure(api, meta={"event_names": {"messaging": {"qualified": "QualifiedLead"}}})
    await post_event(api, lead["id"], name="qualified", event_id="ctwa-q2")
    failed = await delivery(api, lead["id"], "meta", "qualified", event_id="ctwa-q2")
    assert failed["status"] == "failed" and failed["attempts"] == 1
    assert "QualifiedLead is not supported for business_messaging" in failed["last_error"]
    assert failed["response"]["error"]["error_subcode"] == 2804066
    assert failed["response"]["error"]["fbtrace_id"]
    assert meta.accepted("ctwa-q2") == []


async def test_meta_ctwa_lead_goes_to_its_own_dataset_with_its_token_and_page_id(api, meta):
    # A WABA's dataset is often not the website pixel's; a number on the WhatsApp Business app
    # has a Page and no WABA.
    await configure(api, meta=meta_settings(messaging_dataset_id="777000111",
                                            messaging_access_token="EAAB-waba-token",
                                            page_id="1122334455"))
    site = await website_lead(api)
    chat = await ctwa_lead(api)
    await delivery(api, site["id"], "meta", "lead", ("delivered",))
    await delivery(api, chat["id"], "meta", "lead", ("delivered",))
    web = meta.accepted(f"lead-{site['id']}")[0]
    ctwa = meta.accepted(f"lead-{chat['id']}")[0]
    assert (web["_dataset"], web["_access_token"]) == (DATASET, META_TOKEN)
    assert (ctwa["_dataset"], ctwa["_access_token"]) == ("777000111", "EAAB-waba-token")
    assert ctwa["user_data"] == {"page_id": "1122334455", "ctwa_clid": CTWA_CLID}
    company = await call(api, "GET", "/api/company", 200)
    assert company["meta"]["messaging_access_token_set"] is True
    assert "EAAB-waba-token" not in json.dumps(company)


async def test_meta_ctwa_lead_without_waba_id_is_skipped_with_a_reason(api, meta):
    await configure(api, meta=meta_settings())
    lead = await ctwa_lead(api)
    skipped = await delivery(api, lead["id"], "meta", "lead")
    assert skipped["status"] == "skipped"
    assert "waba_id" in skipped["last_error"]
    assert skipped["next_attempt_at"] is None
    assert meta.requests == []


async def test_meta_events_older_than_7_days_are_marked_skipped_and_not_sent(api, meta):
    await configure(api, meta=meta_settings(waba_id=WABA))
    old = time.time() - 8 * 86400
    site = await website_lead(api, message_time=old)
    chat = await ctwa_lead(api, message_time=old)
    await post_event(api, site["id"], name="purchase", value=50,
                     occurred_at=datetime.fromtimestamp(old, timezone.utc).isoformat())
    marked = [await delivery(api, site["id"], "meta", "lead"),
              await delivery(api, site["id"], "meta", "purchase"),
              await delivery(api, chat["id"], "meta", "lead")]
    for d in marked:
        assert d["status"] == "skipped", d
        assert "7-day" in d["last_error"], d
        assert d["delivered_at"] is None
    skipped = await deliveries(api, status="skipped")
    assert {d["id"] for d in marked} <= {d["id"] for d in skipped}
    assert meta.requests == []
    # A recent event of the same lead still goes out.
    await post_event(api, site["id"], name="qualified", event_id="fresh")
    await delivery(api, site["id"], "meta", "qualified", ("delivered",))
    assert [e["event_id"] for e in meta.events] == ["fresh"]


# ---- GA4 Measurement Protocol -------------------------------------------------------------------

async def test_ga4_sends_generate_lead_and_purchase_with_the_ga_client_id(api, ga4):
    await configure(api, ga4=ga4_settings())
    lead = await website_lead(api, ga_client_id="1234567890.1732400000")
    await post_event(api, lead["id"], name="purchase", value=89.9, currency="BRL",
                     event_id="T-1001")
    await delivery(api, lead["id"], "ga4", "lead", ("delivered",))
    await delivery(api, lead["id"], "ga4", "purchase", ("delivered",))
    assert ga4.problems == []
    assert all(p["_query"] == {"measurement_id": GA4_ID, "api_secret": GA4_SECRET}
               for p in ga4.payloads)
    events = {e["name"]: e for e in ga4.events()}
    assert sorted(events) == ["generate_lead", "purchase"]
    assert {e["client_id"] for e in events.values()} == {"1234567890.1732400000"}
    purchase = events["purchase"]["params"]
    assert purchase["transaction_id"] == "T-1001"
    assert purchase["value"] == 89.9 and purchase["currency"] == "BRL"
    assert events["generate_lead"]["params"]["lead_source"] == "facebook"


async def test_ga4_events_carry_the_visits_session_id_and_engagement_time(api, ga4):
    await configure(api, ga4=ga4_settings())
    lead = await website_lead(api, ga_client_id="1234567890.1732400000",
                              ga_session_id="1732400123")
    other = await website_lead(api, ga_client_id="5555.1732400000")  # no _ga_<id> cookie seen
    await delivery(api, lead["id"], "ga4", "lead", ("delivered",))
    await delivery(api, other["id"], "ga4", "lead", ("delivered",))
    assert ga4.problems == []
    by_client = {e["client_id"]: e["params"] for e in ga4.events()}
    assert by_client["1234567890.1732400000"]["session_id"] == "1732400123"
    assert by_client["1234567890.1732400000"]["engagement_time_msec"] == 1
    assert "session_id" not in by_client["5555.1732400000"]
    assert by_client["5555.1732400000"]["engagement_time_msec"] == 1


async def test_every_destination_payload_carries_the_event_id(api, meta, ga4, crm):
    """Delivery is at least once: receivers de-duplicate by our event_id."""
    await configure(api, meta=meta_settings(), ga4=ga4_settings(),
                    crm_webhook={"url": crm.hook_url, "secret": CRM_SECRET})
    lead = await website_lead(api, ga_client_id="1234567890.1732400000", fbp=FBP)
    await post_event(api, lead["id"], name="qualified", event_id="dedup-1")
    for destination in ("meta", "ga4", "crm_webhook"):
        await delivery(api, lead["id"], destination, "qualified", ("delivered",))
    assert [e["event_id"] for e in meta.accepted("dedup-1")] == ["dedup-1"]
    assert [e["params"]["event_id"] for e in ga4.events()
            if e["name"] == "qualify_lead"] == ["dedup-1"]
    assert [b["event"]["event_id"] for b in crm.bodies
            if b["type"] == "lead.qualified"] == ["dedup-1"]


async def test_ga4_refund_carries_the_transaction_id_of_the_purchase_it_reverses(api, ga4):
    await configure(api, ga4=ga4_settings())
    lead = await website_lead(api, ga_client_id="1234567890.1732400000")
    await post_event(api, lead["id"], name="purchase", value=89.9, event_id="T-2002")
    await post_event(api, lead["id"], name="refund", value=89.9, event_id="estorno-1")
    refund = await delivery(api, lead["id"], "ga4", "refund", ("delivered",))
    assert refund["event_id"] == "estorno-1"  # our dedup id, as in the events API
    sent = next(e for e in ga4.events() if e["name"] == "refund")
    assert sent["params"]["transaction_id"] == "T-2002"
    assert ga4.problems == []


async def test_ga4_lead_without_a_ga_client_id_is_skipped(api, ga4):
    await configure(api, ga4=ga4_settings())
    lead = await website_lead(api)
    await post_event(api, lead["id"], name="purchase", value=10)
    for name in ("lead", "purchase"):
        skipped = await delivery(api, lead["id"], "ga4", name)
        assert skipped["status"] == "skipped" and "client id" in skipped["last_error"]
    assert ga4.requests == []


# ---- the signed CRM webhook ---------------------------------------------------------------------

async def test_crm_webhook_body_is_signed_and_carries_lead_and_event(api, crm):
    await configure(api, crm_webhook={"url": crm.hook_url, "secret": CRM_SECRET})
    lead = await website_lead(api, phone="5511955554444", name="João da Silva")
    await post_event(api, lead["id"], name="purchase", value=1500, event_id="pedido-1")
    await delivery(api, lead["id"], "crm_webhook", "lead", ("delivered",))
    await delivery(api, lead["id"], "crm_webhook", "purchase", ("delivered",))
    assert crm.rejected == 0 and len(crm.bodies) == 2
    request = next(r for r in crm.requests if b"pedido-1" in r.raw)
    expected = "sha256=" + hmac.new(CRM_SECRET.encode(), request.raw,
                                    hashlib.sha256).hexdigest()
    assert request.headers["x-whatstracking-signature"] == expected
    assert request.headers["x-whatstracking-event"] == "lead.purchase"
    assert request.headers["content-type"].startswith("application/json")
    assert abs(int(request.headers["x-whatstracking-timestamp"]) - time.time()) < 300
    body = json.loads(request.raw)
    assert body["type"] == "lead.purchase" and body["company_id"] == api.company_id
    assert body["event"]["event_id"] == "pedido-1" and body["event"]["value"] == 1500
    assert body["event"]["currency"] == "BRL"
    assert body["lead"]["id"] == lead["id"]
    assert body["lead"]["name"] == "João da Silva"
    assert "João".encode() in request.raw or "Jo\\u00e3o".encode() in request.raw
    assert body["lead"]["phone"] == "5511955554444"
    assert body["lead"]["attribution"]["utm_source"] == "facebook"
    assert body["lead"]["attribution"]["utm_campaign"] == "primavera"
    assert body["lead"]["attribution"]["fbclid"] == FBCLID
    assert body["lead"]["match_method"] == "code"


async def test_crm_rejecting_the_signature_fails_without_retry(api, crm):
    await configure(api, crm_webhook={"url": crm.hook_url, "secret": "not-the-crm-secret"})
    lead = await direct_lead(api)
    failed = await delivery(api, lead["id"], "crm_webhook", "lead")
    assert failed["status"] == "failed" and failed["last_status"] == 401
    assert failed["attempts"] == 1
    assert crm.rejected == 1 and crm.bodies == []


# ---- Evolution labels record events -------------------------------------------------------------

def label_edit(label_id: str, name: str) -> dict:
    envelope = fixture("labels-edit")
    envelope["data"].update(id=label_id, name=name)
    return envelope


def label_association(label_id: str = "3", kind: str = "add",
                      chat: str = f"{LABEL_PHONE}@s.whatsapp.net") -> dict:
    envelope = fixture("labels-association")
    envelope["data"].update(labelId=label_id, type=kind, chatId=chat)
    return envelope


async def test_mapped_label_added_to_a_leads_chat_records_and_delivers_the_event(api, crm):
    await configure(api, label_events={"Lead Instagram": "qualified"},
                    crm_webhook={"url": crm.hook_url, "secret": CRM_SECRET})
    lead = await direct_lead(api, phone=LABEL_PHONE)
    await api.webhook(fixture("labels-edit"))
    result = await api.webhook(fixture("labels-association"))
    assert result["lead_id"] == lead["id"]
    events = await lead_events(api, lead["id"])
    assert [e["name"] for e in events] == ["lead", "qualified"]
    assert events[1]["source"] == "label"
    await delivery(api, lead["id"], "crm_webhook", "qualified", ("delivered",))
    sent = next(b for b in crm.bodies if b["type"] == "lead.qualified")
    assert sent["event"]["event_id"] == events[1]["event_id"]
    assert sent["lead"]["id"] == lead["id"]


async def test_label_events_only_for_mapped_added_labels_and_only_once(api, crm):
    await configure(api, label_events={"Lead Instagram": "qualified", "Vendido": "purchase"},
                    crm_webhook={"url": crm.hook_url, "secret": CRM_SECRET})
    lead = await direct_lead(api, phone=LABEL_PHONE)
    await api.webhook(label_edit("3", "Lead Instagram"))
    await api.webhook(label_edit("4", "Cliente VIP"))  # not mapped
    await api.webhook(label_edit("5", "Vendido"))

    assert "ignored" in await api.webhook(label_association("4"))
    assert "ignored" in await api.webhook(label_association("5", kind="remove"))
    assert "ignored" in await api.webhook(label_association("9"))  # never seen by labels.edit
    assert "ignored" in await api.webhook(label_association(
        "3", chat="5511900009999@s.whatsapp.net"))  # a chat with no lead
    assert [e["name"] for e in await lead_events(api, lead["id"])] == ["lead"]

    first = await api.webhook(label_association("3"))
    again = await api.webhook(label_association("3"))
    assert first["lead_id"] == again["lead_id"] == lead["id"]
    assert again.get("duplicate") is True
    assert [e["name"] for e in await lead_events(api, lead["id"])] == ["lead", "qualified"]
    await delivery(api, lead["id"], "crm_webhook", "qualified", ("delivered",))
    assert [b["type"] for b in crm.bodies].count("lead.qualified") == 1
    qualified = [d for d in await deliveries(api, lead_id=lead["id"])
                 if d["event"] == "qualified"]
    assert len(qualified) == 1


# ---- the outbox: retries, failures, manual retry ------------------------------------------------

async def meta_lead(api: Api) -> dict:
    """A lead made before Meta is set up (so its `lead` event has no Meta delivery), then Meta."""
    lead = await direct_lead(api)
    await configure(api, meta=meta_settings())
    return lead


async def test_a_500_is_retried_and_then_delivered(api, meta):
    lead = await meta_lead(api)
    meta.fail("500")
    await post_event(api, lead["id"], name="qualified", event_id="q-500")
    done = await delivery(api, lead["id"], "meta", "qualified")
    assert done["status"] == "delivered" and done["attempts"] == 2
    assert done["last_status"] == 200 and done["delivered_at"]
    assert [r.status for r in meta.requests] == [500, 200]
    assert len(meta.accepted("q-500")) == 1


async def test_a_429_waits_at_least_retry_after(api, meta):
    lead = await meta_lead(api)
    meta.fail("429", retry_after=1)
    await post_event(api, lead["id"], name="qualified", event_id="q-429")
    waiting = await delivery(api, lead["id"], "meta", "qualified", ("pending",), attempts=1,
                             last_status=429)
    gap = ts(waiting["next_attempt_at"]) - ts(waiting["updated_at"])
    assert 0.99 <= gap <= 2, waiting  # Retry-After: 1 beats the 0.05 s backoff
    assert "429" in waiting["last_error"]
    done = await delivery(api, lead["id"], "meta", "qualified")
    assert done["status"] == "delivered" and done["attempts"] == 2
    assert len(meta.accepted("q-429")) == 1


async def test_a_400_fails_at_once_and_shows_in_failed_deliveries(api, meta):
    lead = await meta_lead(api)
    meta.fail("400")
    await post_event(api, lead["id"], name="qualified", event_id="q-400")
    failed = await delivery(api, lead["id"], "meta", "qualified")
    assert failed["status"] == "failed" and failed["attempts"] == 1
    assert failed["last_status"] == 400 and "Invalid parameter" in failed["last_error"]
    assert failed["next_attempt_at"] is None
    listed = await deliveries(api, status="failed")
    assert [d["id"] for d in listed] == [failed["id"]]
    assert listed[0]["last_status"] == 400
    assert await deliveries(api, status="pending") == []
    assert len(meta.requests) == 1 and meta.events == []
    assert (await call(api, "GET", "/api/deliveries", 400, params={"status": "lost"}))["error"]


async def test_meta_answering_200_with_events_received_0_is_not_delivered(api, meta):
    lead = await meta_lead(api)
    meta.fail("received0")
    await post_event(api, lead["id"], name="qualified", event_id="q-zero")
    failed = await delivery(api, lead["id"], "meta", "qualified")
    assert failed["status"] == "failed" and failed["last_status"] == 200
    assert failed["last_error"].startswith("Meta received 0 of 1 events: Events were discarded")
    assert failed["response"]["events_received"] == 0
    assert failed["response"]["messages"] == [
        "Events were discarded: the dataset is not connected to this business"]
    assert failed["response"]["fbtrace_id"] and failed["delivered_at"] is None


async def test_meta_transient_error_as_http_400_is_retried_then_delivered(api, meta):
    lead = await meta_lead(api)
    meta.fail("transient", times=2)  # code 4, is_transient: Meta says wait and retry
    await post_event(api, lead["id"], name="qualified", event_id="q-busy")
    done = await delivery(api, lead["id"], "meta", "qualified")
    assert done["status"] == "delivered" and done["attempts"] == 3, done
    assert [r.status for r in meta.requests] == [400, 400, 200]
    assert done["response"]["events_received"] == 1 and done["response"]["fbtrace_id"]
    assert len(meta.accepted("q-busy")) == 1


async def test_meta_transient_error_keeps_metas_answer_while_waiting(api, meta):
    lead = await meta_lead(api)
    meta.fail("transient", times=None)
    await post_event(api, lead["id"], name="qualified", event_id="q-wait")
    waiting = await delivery(api, lead["id"], "meta", "qualified", ("pending",), attempts=1,
                             last_status=400)
    assert "Application request limit reached" in waiting["last_error"]
    assert waiting["response"]["error"]["code"] == 4
    assert waiting["response"]["error"]["is_transient"] is True
    meta.recover()
    assert (await delivery(api, lead["id"], "meta", "qualified"))["status"] == "delivered"


async def test_a_timeout_is_retried(api, meta):
    lead = await meta_lead(api)
    meta.fail("hang")  # past DELIVERY_TIMEOUT (0.5 s)
    await post_event(api, lead["id"], name="qualified", event_id="q-hang")
    done = await delivery(api, lead["id"], "meta", "qualified")
    assert done["status"] == "delivered" and done["attempts"] == 2
    assert len(meta.requests) == 2 and len(meta.accepted("q-hang")) == 1


async def test_a_refused_connection_is_retried_until_the_platform_is_back(api, meta):
    lead = await meta_lead(api)
    await meta.go_down()
    await post_event(api, lead["id"], name="qualified", event_id="q-down")
    waiting = await delivery(api, lead["id"], "meta", "qualified", ("pending",),
                             last_status=None, attempts=2)
    assert "unreachable" in waiting["last_error"]
    await meta.come_back()
    done = await delivery(api, lead["id"], "meta", "qualified")
    assert done["status"] == "delivered" and done["attempts"] >= 3
    assert len(meta.accepted("q-down")) == 1


async def test_after_max_attempts_failed_then_manual_retry_delivers(start, meta):
    client = await start(DELIVERY_RETRY_SECONDS="0.01")
    api = Api(client, await create_company(client))
    lead = await meta_lead(api)
    meta.fail("500", times=None)
    await post_event(api, lead["id"], name="qualified", event_id="q-max")
    failed = await delivery(api, lead["id"], "meta", "qualified", timeout=20)
    assert failed["status"] == "failed"
    assert failed["attempts"] == whatstracking.DELIVERY_MAX_ATTEMPTS
    assert failed["last_status"] == 500
    assert len(meta.requests) == whatstracking.DELIVERY_MAX_ATTEMPTS

    other = Api(client, await create_company(client, "outra-empresa"))
    assert (await call(other, "POST", f"/api/deliveries/{failed['id']}/retry", 404))["error"]
    assert await deliveries(other) == []
    assert (await call(api, "POST", "/api/deliveries/999999/retry", 404))["error"]
    assert (await call(api, "POST", f"/api/deliveries/{failed['id']}/retry", 401, token=None))

    meta.recover()
    retried = await call(api, "POST", f"/api/deliveries/{failed['id']}/retry", 200)
    assert retried["delivery"]["id"] == failed["id"]
    assert retried["delivery"]["status"] == "pending"
    done = await delivery(api, lead["id"], "meta", "qualified", ("delivered",))
    assert done["attempts"] == 1 and done["last_status"] == 200
    assert len(meta.accepted("q-max")) == 1
    again = await call(api, "POST", f"/api/deliveries/{failed['id']}/retry", 409)
    assert "delivered" in again["error"]
    assert len(meta.accepted("q-max")) == 1


async def test_a_destination_turned_off_meanwhile_is_skipped(api, meta):
    lead = await meta_lead(api)
    await meta.go_down()
    await post_event(api, lead["id"], name="qualified")
    await delivery(api, lead["id"], "meta", "qualified", ("pending",), attempts=1)
    await configure(api, meta={"enabled": False})
    skipped = await delivery(api, lead["id"], "meta", "qualified")
    assert skipped["status"] == "skipped" and "meta" in skipped["last_error"]
    await post_event(api, lead["id"], name="purchase", value=1)
    assert [d["event"] for d in await deliveries(api, lead_id=lead["id"])] == ["qualified"]


# ---- durability ---------------------------------------------------------------------------------

async def park_deliveries(api: Api, count: int) -> None:
    """Wait until `count` deliveries are pending after one failed attempt."""
    async def probe():
        rows = await deliveries(api, status="pending")
        parked = [d for d in rows if d["attempts"] >= 1 and d["last_error"]]
        return len(parked) == count and len(rows) == count
    await eventually(probe, f"{count} parked deliveries")


async def test_a_restart_loses_no_delivery_and_sends_each_once(start, crm):
    # First app: the CRM is down, and a failed attempt waits an hour before the next one.
    first = await start(DELIVERY_RETRY_SECONDS="3600")
    api = Api(first, await create_company(first, crm_webhook={
        "url": closed_port_url() + "/hook", "secret": CRM_SECRET}))
    expected = []
    for n in range(3):
        lead = await direct_lead(api)
        expected.append(f"lead-{lead['id']}")
        await post_event(api, lead["id"], name="purchase", value=10 + n, event_id=f"buy-{n}")
        expected.append(f"buy-{n}")
    await park_deliveries(api, 6)
    await configure(api, crm_webhook={"url": crm.hook_url})  # the CRM is reachable again
    await first.close()
    assert crm.requests == []

    second = await start()
    api = Api(second, api.company)
    assert len(await deliveries(api, status="pending")) == 6  # the outbox survived the restart
    await set_sql(api, "UPDATE deliveries SET next_attempt_at = ?", time.time())

    async def all_delivered():
        return len(await deliveries(api, status="delivered")) == 6
    await eventually(all_delivered, "6 deliveries after the restart")
    assert collections.Counter(crm.event_ids()) == collections.Counter(expected)
    assert crm.rejected == 0


async def test_stopping_during_hanging_deliveries_waits_for_them_and_loses_none(start, meta, db):
    first = await start()
    api = Api(first, await create_company(first))
    lead = await meta_lead(api)
    meta.fail("hang", times=None)  # every answer takes longer than DELIVERY_TIMEOUT
    for n in range(3):
        await post_event(api, lead["id"], name="qualified" if n == 0 else "purchase", value=n,
                         event_id=f"e-{n}")

    # The three go out at once (DELIVERY_PER_COMPANY is 4) and hang: stop meanwhile.
    async def all_in_flight():
        return len(meta.requests) >= 3
    await eventually(all_in_flight, "three deliveries in flight")
    await first.close()  # the worker claims nothing more and lets the three time out
    rows = await db.fetchall("SELECT status, attempts FROM deliveries")
    assert sorted((r["status"], r["attempts"]) for r in rows) == [("pending", 1)] * 3
    meta.recover()

    second = await start()
    api = Api(second, api.company)

    async def all_delivered():
        rows = await deliveries(api)
        return len(rows) == 3 and all(d["status"] == "delivered" for d in rows) and rows
    rows = await eventually(all_delivered, "3 deliveries after the restart")
    counts = collections.Counter(e["event_id"] for e in meta.events)
    assert counts == {"e-0": 1, "e-1": 1, "e-2": 1}
    assert all(d["attempts"] == 2 for d in rows)  # timed out once before the stop


async def test_two_workers_on_one_postgres_deliver_each_event_once(start, crm, database_url):
    if not database_url.startswith("postgres"):
        pytest.skip("several processes share one Postgres (FOR UPDATE SKIP LOCKED)")
    one = await start(DELIVERY_RETRY_SECONDS="3600")
    two = await start(DELIVERY_RETRY_SECONDS="3600")
    api = Api(one, await create_company(one, crm_webhook={
        "url": closed_port_url() + "/hook", "secret": CRM_SECRET}))
    api_two = Api(two, api.company)
    leads = [await direct_lead(api if n % 2 else api_two) for n in range(4)]
    expected = [f"lead-{lead['id']}" for lead in leads]
    for n in range(36):
        target = api if n % 2 else api_two
        await post_event(target, leads[n % 4]["id"], name="purchase", value=n,
                         event_id=f"buy-{n}")
        expected.append(f"buy-{n}")
    await park_deliveries(api, 40)
    await configure(api, crm_webhook={"url": crm.hook_url})
    crm.delay = 0.005
    # Both workers find all 40 due at once.
    await set_sql(api, "UPDATE deliveries SET next_attempt_at = ?", time.time())

    async def all_delivered():
        return len(await deliveries(api_two, status="delivered")) == 40
    await eventually(all_delivered, "40 deliveries by two workers")
    assert collections.Counter(crm.event_ids()) == collections.Counter(expected)
    assert all(d["attempts"] == 2 for d in await deliveries(api))


async def test_a_delivery_in_flight_keeps_its_row_for_its_whole_timeout(start, crm, monkeypatch):
    """A claimed row is sent at once and stays its worker's for as long as sending it can take
    (the timeout and a margin for the database): another worker looking for due deliveries
    meanwhile finds none, so none is sent twice."""
    client = await start(DELIVERY_TIMEOUT="10")  # the default
    api = Api(client, await create_company(client, crm_webhook={
        "url": crm.hook_url, "secret": CRM_SECRET}))
    lead = await direct_lead(api)
    await delivery(api, lead["id"], "crm_webhook", "lead", ("delivered",))
    crm.fail("hold")
    await post_event(api, lead["id"], name="qualified", event_id="e-0")

    async def held():
        return len(crm.requests) >= 2
    await eventually(held, "e-0 held")
    assert len(await deliveries(api, status="sending")) == 1

    # The last moment the worker may still be sending it and recording the answer:
    timeout = client.app[whatstracking.CONFIG].delivery_timeout
    skew = timeout + whatstracking.DELIVERY_LOCK_MARGIN - 1
    monkeypatch.setattr(whatstracking, "now", lambda: time.time() + skew)
    stolen = await whatstracking.claim_deliveries(api.db, timeout + 30)
    monkeypatch.undo()
    assert stolen == []

    crm.release()
    await delivery(api, lead["id"], "crm_webhook", "qualified", ("delivered",))
    assert collections.Counter(crm.event_ids()) == {f"lead-{lead['id']}": 1, "e-0": 1}


# ---- Google Ads offline conversions CSV ---------------------------------------------------------

def read_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


async def google_csv(api: Api, **params) -> list[list[str]]:
    resp = await api.client.get("/api/exports/google-ads.csv", params=params, headers=api.auth)
    text = await resp.text()
    assert resp.status == 200, text
    assert resp.content_type == "text/csv"
    return read_csv(text)


HEADER = ["Google Click ID", "GBRAID", "WBRAID", "Conversion Name", "Conversion Time",
          "Conversion Value", "Conversion Currency", "Phone Number"]


def google_phone(lead: dict) -> str:
    """Enhanced conversions for leads: SHA-256 of the number in E.164 with its +."""
    return hashlib.sha256(f"+{lead['phone']}".encode()).hexdigest()


async def test_google_ads_csv_lists_gclid_conversions_in_the_company_timezone(api):
    await configure(api, timezone="America/New_York")
    gclid = "Cj0KCQiA-test-gclid_1"
    lead = await website_lead(api, page_url=f"https://loja.test/?gclid={gclid}&utm_source=google",
                              message_time=ts("2025-01-15T12:00:00Z"))
    await post_event(api, lead["id"], name="qualified", occurred_at="2025-03-01T03:15:00Z")
    await post_event(api, lead["id"], name="purchase", value=199.9,
                     occurred_at="2025-07-04T18:30:00Z")
    await post_event(api, lead["id"], name="refund", value=199.9,
                     occurred_at="2025-07-05T18:30:00Z")  # no conversion action for refunds
    other = await website_lead(api, message_time=ts("2025-01-16T12:00:00Z"))  # fbclid, no gclid
    await post_event(api, other["id"], name="purchase", value=50,
                     occurred_at="2025-07-04T19:00:00Z")

    rows = await google_csv(api)
    assert rows[0] == ["Parameters:TimeZone=America/New_York"]
    assert rows[1] == HEADER
    # Hand-computed New York local times: EST (UTC-5) in winter, EDT (UTC-4) in July.
    phone = google_phone(lead)
    assert rows[2:] == [
        [gclid, "", "", "WhatsApp Lead", "2025-01-15 07:00:00", "", "BRL", phone],
        [gclid, "", "", "WhatsApp Qualified Lead", "2025-02-28 22:15:00", "", "BRL", phone],
        [gclid, "", "", "WhatsApp Purchase", "2025-07-04 14:30:00", "199.9", "BRL", phone],
    ]
    for row in rows[2:]:
        datetime.strptime(row[4], "%Y-%m-%d %H:%M:%S")

    assert (await google_csv(api, conversion_name="WhatsApp Purchase"))[2:] == [
        [gclid, "", "", "WhatsApp Purchase", "2025-07-04 14:30:00", "199.9", "BRL", phone]]
    in_range = await google_csv(api, **{"from": "2025-02-01T00:00:00Z",
                                        "to": "2025-06-30T00:00:00Z"})
    assert [r[3] for r in in_range[2:]] == ["WhatsApp Qualified Lead"]
    from_purchase = await google_csv(api, **{"from": "2025-07-04T18:30:00Z"})
    assert [r[3] for r in from_purchase[2:]] == ["WhatsApp Purchase"]

    outsider = Api(api.client, await create_company(api.client, "outra-empresa"))
    assert await google_csv(outsider) == [["Parameters:TimeZone=America/Sao_Paulo"], HEADER]
    resp = await api.client.get("/api/exports/google-ads.csv")
    assert resp.status == 401


async def test_google_ads_csv_date_range_is_in_the_company_timezone(api):
    await configure(api, timezone="America/New_York")
    lead = await website_lead(api, page_url="https://loja.test/?gclid=GCLID-TZ",
                              message_time=ts("2025-02-27T12:00:00Z"))
    # 03:15 UTC on 1 March is 22:15 on 28 February in New York.
    await post_event(api, lead["id"], name="qualified", occurred_at="2025-03-01T03:15:00Z")

    def names(rows: list[list[str]]) -> list[str]:
        return [r[3] for r in rows[2:]]

    assert names(await google_csv(api, to="2025-02-28")) == ["WhatsApp Lead",
                                                              "WhatsApp Qualified Lead"]
    assert names(await google_csv(api, **{"from": "2025-02-28", "to": "2025-02-28"})) == [
        "WhatsApp Qualified Lead"]
    assert names(await google_csv(api, **{"from": "2025-03-01"})) == []
    resp = await api.client.get("/api/exports/google-ads.csv", params={"from": "ontem"},
                                headers=api.auth)
    assert resp.status == 400 and "from" in (await resp.json())["error"]


async def test_google_ads_csv_lists_ios_gbraid_and_wbraid_leads_one_click_id_a_row(api):
    # Brazilian 12-digit WhatsApp id: Google gets the dialable E.164 form (+55 11 9…).
    web = await website_lead(api, phone="551187654321", page_url="https://loja.test/?wbraid=WB-1",
                             message_time=ts("2025-05-10T15:00:00Z"))
    app = await website_lead(api, page_url="https://loja.test/?gbraid=GB-1&wbraid=WB-2",
                             message_time=ts("2025-05-10T16:00:00Z"))
    both = await website_lead(api, page_url="https://loja.test/?gclid=GC-1&gbraid=GB-3",
                              message_time=ts("2025-05-10T17:00:00Z"))
    await website_lead(api, message_time=ts("2025-05-10T18:00:00Z"))  # no Google click: left out
    rows = await google_csv(api)
    assert rows[1] == HEADER
    assert rows[2:] == [
        ["", "", "WB-1", "WhatsApp Lead", "2025-05-10 12:00:00", "", "BRL",
         hashlib.sha256(b"+5511987654321").hexdigest()],
        ["", "GB-1", "", "WhatsApp Lead", "2025-05-10 13:00:00", "", "BRL", google_phone(app)],
        ["GC-1", "", "", "WhatsApp Lead", "2025-05-10 14:00:00", "", "BRL", google_phone(both)],
    ]
    assert (web["phone"], web["identities"]["wa_id"]) == ("5511987654321", "551187654321")


async def test_google_ads_csv_uses_the_companys_conversion_names(api):
    await configure(api, google_ads_conversions={"purchase": "Compra WhatsApp", "lead": ""})
    lead = await website_lead(api, page_url="https://loja.test/?gclid=GCLID-2",
                              message_time=ts("2025-05-10T15:00:00Z"))
    await post_event(api, lead["id"], name="purchase", value=10, currency="USD",
                     occurred_at="2025-05-11T15:00:00Z")
    rows = await google_csv(api)
    assert rows[0] == ["Parameters:TimeZone=America/Sao_Paulo"]
    assert rows[2:] == [["GCLID-2", "", "", "Compra WhatsApp", "2025-05-11 12:00:00", "10", "USD",
                         google_phone(lead)]]
    assert (await google_csv(api, conversion_name="Compra WhatsApp"))[2:] == rows[2:]
    # A name the company no longer uses is refused, naming the ones it does ("lead": "" drops
    # the lead conversion).
    data = await call(api, "GET", "/api/exports/google-ads.csv", 400,
                      params={"conversion_name": "WhatsApp Purchase"})
    assert data == {"error": "conversion_name must be one of: WhatsApp Qualified Lead, "
                             "Compra WhatsApp"}


# ---- destination settings -----------------------------------------------------------------------

async def test_destination_secrets_are_write_only(api, crm):
    answer = await configure(
        api, meta=meta_settings(waba_id=WABA), ga4=ga4_settings(),
        crm_webhook={"url": crm.hook_url, "secret": CRM_SECRET})
    shown = await call(api, "GET", "/api/company", 200)
    for data in (answer, shown):
        text = json.dumps(data)
        for secret in (META_TOKEN, GA4_SECRET, CRM_SECRET):
            assert secret not in text
        assert data["meta"]["access_token_set"] is True and "access_token" not in data["meta"]
        assert data["meta"]["dataset_id"] == DATASET and data["meta"]["waba_id"] == WABA
        assert data["ga4"]["api_secret_set"] is True and "api_secret" not in data["ga4"]
        assert data["ga4"]["measurement_id"] == GA4_ID
        assert data["crm_webhook"]["secret_set"] is True and "secret" not in data["crm_webhook"]
        assert data["crm_webhook"]["url"] == crm.hook_url


async def test_patching_meta_without_the_token_keeps_it(api, meta):
    await configure(api, meta=meta_settings())
    patched = await configure(api, meta={"test_event_code": "TEST777"})
    assert patched["meta"]["access_token_set"] is True
    assert patched["meta"]["dataset_id"] == DATASET
    lead = await direct_lead(api)
    await delivery(api, lead["id"], "meta", "lead", ("delivered",))
    assert meta.events[0]["_access_token"] == META_TOKEN
    assert meta.events[0]["_test_event_code"] == "TEST777"


async def test_meta_null_removes_the_destination(api, meta):
    await configure(api, meta=meta_settings())
    removed = await configure(api, meta=None)
    assert not removed.get("meta")
    assert not (await call(api, "GET", "/api/company", 200)).get("meta")
    lead = await direct_lead(api)
    await post_event(api, lead["id"], name="qualified")
    assert await deliveries(api, lead_id=lead["id"]) == []
    assert meta.requests == []


async def test_disabled_destination_gets_no_deliveries(api, meta):
    await configure(api, meta=meta_settings(enabled=False))
    lead = await direct_lead(api)
    assert await deliveries(api, lead_id=lead["id"]) == []
    await configure(api, meta={"enabled": True})
    lead = await direct_lead(api)
    await delivery(api, lead["id"], "meta", "lead", ("delivered",))


@pytest.mark.parametrize("patch, words", [
    ({"meta": {"pixel_id": "1"}}, "meta.pixel_id"),
    ({"tiktok": {"pixel": "1"}}, "tiktok"),
    ({"ga4": {"measurement_id": "G-1", "debug": True}}, "ga4.debug"),
    ({"meta": {"enabled": "yes"}}, "meta.enabled"),
    ({"meta": "on"}, "meta"),
    ({"meta": {"access_token": ""}}, "meta.access_token"),
    ({"meta": {"event_names": ["Lead"]}}, "meta.event_names"),
    ({"crm_webhook": {"url": "ftp://crm.test/hook"}}, "crm_webhook.url"),
    ({"label_events": {"Vendido": "sold"}}, "label_events"),
    ({"google_ads_conversions": ["WhatsApp Lead"]}, "google_ads_conversions"),
])
async def test_bad_destination_settings_are_400_and_change_nothing(api, patch, words):
    await configure(api, meta=meta_settings())
    before = await call(api, "GET", "/api/company", 200)
    data = await call(api, "PATCH", "/api/company", 400, json=patch)
    assert words in data["error"]
    assert await call(api, "GET", "/api/company", 200) == before


# ---- the fakes refuse what the platforms refuse -------------------------------------------------

async def test_fake_meta_refuses_what_meta_refuses(meta):
    import aiohttp

    url = f"{meta.url}/v23.0/{DATASET}/events"
    good = {"event_name": "Lead", "event_time": int(time.time()), "action_source": "chat",
            "user_data": {"ph": [hashlib.sha256(b"5511988887777").hexdigest()]}}
    bad = [
        {**good, "user_data": {"ph": ["5511988887777"]}},  # a raw phone number
        {**good, "event_time": int(time.time()) - 8 * 86400},
        {**good, "event_time": int(time.time()) + 3600},
        {**good, "action_source": "whatsapp"},
        {**good, "action_source": "website"},  # no event_source_url, no client_user_agent
        {**good, "action_source": "business_messaging", "messaging_channel": "whatsapp",
         "user_data": {"ctwa_clid": "x", "whatsapp_business_account_id": WABA}},  # Lead
        {**good, "event_name": "Purchase"},  # no value and currency
    ]
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json={"data": [good]}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "OAuthException"
        for event in bad:
            async with session.post(url, json={"data": [event], "access_token": "t"}) as resp:
                error = (await resp.json())["error"]
                assert resp.status == 400 and error["code"] == 100, event
                assert error["fbtrace_id"]
        async with session.post(url, json={"data": [good], "access_token": "t"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["events_received"] == 1
    assert len(meta.events) == 1


async def test_fake_ga4_and_crm_check_what_the_tests_rely_on(ga4, crm):
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.post(ga4.collect_url + "?measurement_id=G-1&api_secret=s", json={
                "events": [{"name": "purchase", "params": {"value": 1}},
                           {"name": "1bad-name", "params": {}}]}) as resp:
            assert resp.status == 204
        raw = b'{"event": {"event_id": "x"}}'
        headers = {"X-WhatsTracking-Signature": crm.signature(raw + b" "),
                   "X-WhatsTracking-Timestamp": str(int(time.time())),
                   "Content-Type": "application/json"}
        async with session.post(crm.hook_url, data=raw, headers=headers) as resp:
            assert resp.status == 401
        headers["X-WhatsTracking-Signature"] = crm.signature(raw)
        async with session.post(crm.hook_url, data=raw, headers=headers) as resp:
            assert resp.status == 200
    assert len(ga4.problems) == 4, ga4.problems  # client_id, transaction_id, currency, name
    assert crm.rejected == 1 and crm.event_ids() == ["x"]


async def test_a_cleared_secret_shows_as_not_set(api):
    await configure(api, meta=meta_settings())
    company = await configure(api, meta={"access_token": None})
    assert company["meta"]["access_token_set"] is False
    assert "access_token" not in company["meta"]
