"""The WhatsApp Cloud API source (SPEC §13): cloud connections, Meta's verification handshake,
signed deliveries, and the lead rules over Meta's documented payloads (tests/fixtures/cloud,
sent by the fake Meta sender in tests/fake_meta_webhook.py). Every test runs on SQLite and
Postgres."""

from __future__ import annotations

import json

import pytest

import whatstracking
from conftest import ADMIN_TOKEN, create_company, upsert
from fake_meta_webhook import cloud_fixture, fresh_ids, messages, send, sign, verify

APP_SECRET = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
PHONE_NUMBER_ID = "106540352242922"
WABA_ID = "102290129340398"
SITE_URL = "https://loja.test/oferta"


async def add_cloud(api, connection_id="loja-cloud", expect=201, **fields) -> dict:
    body = {"type": "cloud", "connectionId": connection_id, "phone_number_id": PHONE_NUMBER_ID,
            "waba_id": WABA_ID, "app_secret": APP_SECRET, **fields}
    body = {k: v for k, v in body.items() if v is not None}
    resp = await api.client.post("/api/connections", json=body, headers=api.auth)
    data = await resp.json()
    assert resp.status == expect, data
    return data


def hook(api) -> str:
    return f"/webhook/cloud/{api.company_id}"


async def deliver(api, name_or_body, expect=200, secret=APP_SECRET, **kwargs) -> dict:
    body = (cloud_fixture(name_or_body, phone_number_id=PHONE_NUMBER_ID, waba_id=WABA_ID)
            if isinstance(name_or_body, str) else name_or_body)
    delivery = await send(api.client, hook(api), body, secret, **kwargs)
    assert delivery.status == expect, delivery.text
    return json.loads(delivery.text)


async def lead(api, lead_id: int) -> dict:
    resp = await api.client.get(f"/api/leads/{lead_id}", headers=api.auth)
    data = await resp.json()
    assert resp.status == 200, data
    return data["lead"]


@pytest.fixture
async def cloud(api):
    data = await add_cloud(api)
    api.verify_token = data["verify_token"]
    return api


# ---- the connection ------------------------------------------------------------------------

async def test_a_cloud_number_is_added_listed_and_its_secrets_never_shown(api):
    data = await add_cloud(api, access_token="EAAG-test-token")
    assert data["webhook_url"].endswith(f"/webhook/cloud/{api.company_id}")
    assert data["verify_token"].startswith("wvt_") and len(data["verify_token"]) > 30
    connection = data["connection"]
    assert connection["type"] == "cloud" and connection["connectionId"] == "loja-cloud"
    assert (connection["phone_number_id"], connection["waba_id"]) == (PHONE_NUMBER_ID, WABA_ID)
    assert connection["app_secret_set"] is True and connection["access_token_set"] is True
    resp = await api.client.get("/api/connections", headers=api.auth)
    listed = (await resp.json())["connections"]
    assert [c["type"] for c in listed] == ["cloud"]
    assert listed[0]["webhook_url"] == data["webhook_url"]
    text = json.dumps(listed) + json.dumps(data["connection"])
    assert APP_SECRET not in text and "EAAG-test-token" not in text
    assert data["verify_token"] not in text
    row = await api.db.fetchone("SELECT verify_token FROM connections WHERE id = 'loja-cloud'")
    assert row["verify_token"] == whatstracking.hash_token(data["verify_token"])


@pytest.mark.parametrize("field, value, words", [
    ("phone_number_id", "abc", "phone_number_id"),
    ("phone_number_id", None, "phone_number_id"),
    ("waba_id", "12", "waba_id"),
    ("app_secret", "short", "app_secret"),
    ("app_secret", 12345, "app_secret"),
    ("access_token", "", "access_token"),
    ("connectionId", "no spaces allowed", "connectionId"),
])
async def test_a_bad_cloud_field_is_a_400_naming_it(api, field, value, words):
    body = {"type": "cloud", "connectionId": "loja-cloud", "phone_number_id": PHONE_NUMBER_ID,
            "waba_id": WABA_ID, "app_secret": APP_SECRET, field: value}
    body = {k: v for k, v in body.items() if v is not None}
    resp = await api.client.post("/api/connections", json=body, headers=api.auth)
    data = await resp.json()
    assert resp.status == 400 and words in data["error"], data
    assert await api.db.fetchone("SELECT id FROM connections") is None


async def test_a_type_other_than_evolution_or_cloud_is_refused(api):
    resp = await api.client.post("/api/connections", json={"type": "telegram",
                                                            "connectionId": "x"}, headers=api.auth)
    assert resp.status == 400
    assert (await resp.json())["error"] == 'type must be "evolution" or "cloud"'


async def test_a_taken_name_or_number_is_a_409(cloud):
    await add_cloud(cloud, expect=409)  # the same name
    data = await add_cloud(cloud, "loja-2", expect=409)  # the same phone_number_id
    assert PHONE_NUMBER_ID in data["error"]
    other = await create_company(cloud.client, "outra-empresa")
    resp = await cloud.client.post("/api/connections", json={
        "type": "cloud", "connectionId": "loja-cloud", "phone_number_id": "1234567",
        "waba_id": WABA_ID, "app_secret": APP_SECRET},
        headers={"Authorization": f"Bearer {other['token']}"})
    assert resp.status == 409  # connection names are one company's


async def test_evolution_routes_refuse_a_cloud_number_clearly(cloud):
    for method, path, kwargs in (
            ("GET", "/api/instance-status?connectionId=loja-cloud", {}),
            ("POST", "/instance/restart", {"json": {"connectionId": "loja-cloud"}}),
            ("POST", "/instance/logout", {"json": {"connectionId": "loja-cloud"}}),
            ("GET", "/qrcode/generate-qrcode?instanceId=loja-cloud&format=json", {}),
            ("POST", "/api/connection-link", {"json": {"connectionId": "loja-cloud"}})):
        resp = await cloud.client.request(method, path, headers=cloud.auth, **kwargs)
        data = await resp.json()
        assert resp.status == 409, (path, data)
        assert "WhatsApp Cloud API number" in data["error"], (path, data)


async def test_deleting_a_cloud_number_drops_its_secrets_and_its_deliveries(cloud):
    resp = await cloud.client.delete("/api/delete-instance?connectionId=loja-cloud",
                                     headers=cloud.auth)
    assert resp.status == 200, await resp.text()
    row = await cloud.db.fetchone("SELECT * FROM connections WHERE id = 'loja-cloud'")
    assert row["deleted_at"] is not None
    assert (row["app_secret"], row["access_token"], row["verify_token"]) == (None, None, None)
    await deliver(cloud, "text", expect=401)
    status, _ = await verify(cloud.client, hook(cloud), cloud.verify_token)
    assert status == 403
    await add_cloud(cloud)  # the name and the number can be added again
    resp = await cloud.client.request("DELETE", "/instance/delete",
                                      json={"connectionId": "loja-cloud"}, headers=cloud.auth)
    assert resp.status == 200 and await cloud.db.fetchone("SELECT id FROM connections") is None


# ---- Meta's verification and signatures ----------------------------------------------------

async def test_meta_verification_answers_the_challenge_only_for_the_verify_token(cloud):
    status, text = await verify(cloud.client, hook(cloud), cloud.verify_token, "1158201444")
    assert (status, text) == (200, "1158201444")
    resp = await cloud.client.get(hook(cloud), params={
        "hub.mode": "subscribe", "hub.challenge": "42", "hub.verify_token": cloud.verify_token})
    assert resp.content_type == "text/plain"
    assert (await verify(cloud.client, hook(cloud), "wvt_wrong"))[0] == 403
    assert (await verify(cloud.client, hook(cloud), cloud.verify_token, mode="unsubscribe"))[0] == 403
    other = await create_company(cloud.client, "outra-empresa")
    assert (await verify(cloud.client, f"/webhook/cloud/{other['company_id']}",
                         cloud.verify_token))[0] == 403
    assert (await verify(cloud.client, "/webhook/cloud/nobody", cloud.verify_token))[0] == 403


async def test_a_delivery_is_refused_unless_signed_with_the_app_secret(cloud):
    body = cloud_fixture("text", phone_number_id=PHONE_NUMBER_ID, waba_id=WABA_ID)
    await deliver(cloud, body, expect=401, secret="another-app-secret-0123456789")
    await deliver(cloud, body, expect=401, signature="sha256=" + "0" * 64)
    await deliver(cloud, body, expect=401, headers={"X-Hub-Signature-256": ""})
    # A signature of the same JSON serialised otherwise is no signature of these bytes.
    other_bytes = json.dumps(body, ensure_ascii=False).encode()
    await deliver(cloud, body, expect=401, signature=sign(other_bytes, APP_SECRET))
    assert await cloud.db.fetchone("SELECT id FROM webhook_deliveries") is None
    assert await cloud.db.fetchone("SELECT id FROM leads") is None


async def test_turning_webhook_auth_off_never_opens_the_cloud_webhook(cloud):
    resp = await cloud.client.patch("/api/company", json={"webhook_auth_required": False},
                                    headers=cloud.auth)
    assert resp.status == 200, await resp.text()
    await deliver(cloud, "text", expect=401, secret="not-the-app-secret-at-all")


async def test_an_unknown_company_is_a_404(client):
    body = cloud_fixture("text")
    delivery = await send(client, "/webhook/cloud/nobody", body, APP_SECRET)
    assert delivery.status == 404


# ---- messages and leads --------------------------------------------------------------------

async def test_a_text_from_a_new_customer_is_a_lead_with_the_raw_body_stored(cloud):
    answer = await deliver(cloud, "text")
    assert answer["match"] == "none" and answer["event"] == "messages"
    got = await lead(cloud, answer["lead_id"])
    body = cloud_fixture("text")
    message, contact = messages(body)[0], body["entry"][0]["changes"][0]["value"]["contacts"][0]
    assert got["source"] == "cloud" and got["connection_id"] == "loja-cloud"
    assert got["phone"] == message["from"] and got["name"] == contact["profile"]["name"]
    assert got["first_message"] == message["text"]["body"]
    assert got["message_id"] == message["id"]
    stored = await cloud.db.fetchone("SELECT source, instance, event, body, status "
                                     "FROM webhook_deliveries")
    assert (stored["source"], stored["instance"], stored["event"], stored["status"]) == (
        "cloud", PHONE_NUMBER_ID, "messages", "processed")
    assert json.loads(bytes(stored["body"])) == body


async def test_meta_retries_make_one_lead(cloud):
    body = cloud_fixture("text", phone_number_id=PHONE_NUMBER_ID)
    delivery = await send(cloud.client, hook(cloud), body, APP_SECRET, retries=2)
    answers = [json.loads(text) for _, text in delivery.attempts]
    assert [status for status, _ in delivery.attempts] == [200, 200, 200]
    assert answers[0]["match"] == "none"
    assert [a["ignored"] for a in answers[1:]] == ["duplicate", "duplicate"]
    assert len(await cloud.leads()) == 1
    stored = await cloud.db.fetchall("SELECT id FROM webhook_deliveries")
    assert len(stored) == 3  # every delivery kept, one effect


async def test_a_click_to_whatsapp_ad_is_a_ctwa_lead_with_the_ad(cloud):
    body = cloud_fixture("text-referral-image-ad", phone_number_id=PHONE_NUMBER_ID)
    referral = messages(body)[0]["referral"]
    answer = await deliver(cloud, body)
    assert answer["match"] == "ctwa"
    got = await lead(cloud, answer["lead_id"])
    assert got["match_method"] == "ctwa" and got["confidence"] == 1.0
    a = got["attribution"]
    assert (a["utm_source"], a["utm_medium"]) == ("meta_ads", "ctwa")
    assert a["ctwa_clid"] == referral["ctwa_clid"] and a["ad_id"] == referral["source_id"]
    assert a["ad_title"] == referral["headline"] and a["landing_page"] == referral["source_url"]
    assert got["context_info"]["referral"] == referral
    assert "note" not in got["context_info"]
    assert "Olá! Vi o anúncio 😊" in got["first_message"]
    again = await deliver(cloud, fresh_ids(body))  # the same click id, another message
    assert again["ignored"] == "ad click already matched"


async def test_a_status_ad_without_click_id_is_still_the_ads_lead(cloud):
    body = cloud_fixture("text-referral-status-ad", phone_number_id=PHONE_NUMBER_ID)
    referral = messages(body)[0]["referral"]
    assert "ctwa_clid" not in referral
    answer = await deliver(cloud, body)
    got = await lead(cloud, answer["lead_id"])
    assert got["match_method"] == "ctwa" and got["attribution"]["ctwa_clid"] is None
    assert got["attribution"]["ad_id"] == referral["source_id"]
    assert "no click id" in got["context_info"]["note"]


async def test_a_code_in_a_cloud_message_attributes_the_visit(cloud):
    tracked = await cloud.track(visitor_id="v-cloud",
                                page_url=f"{SITE_URL}?utm_source=google&utm_campaign=natal")
    body = cloud_fixture("text", phone_number_id=PHONE_NUMBER_ID)
    messages(body)[0]["text"]["body"] = "Olá! " + whatstracking.message_code(tracked["code"])
    answer = await deliver(cloud, body)
    assert answer["match"] == "code"
    got = await lead(cloud, answer["lead_id"])
    assert got["session_id"] == tracked["session_id"]
    assert got["attribution"]["utm_campaign"] == "natal" and got["source"] == "cloud"


@pytest.mark.parametrize("name, where", [
    ("button", ("button", "text")),
    ("interactive-button-reply", ("interactive", "button_reply", "title")),
    ("interactive-list-reply", ("interactive", "list_reply", "title")),
    ("image-caption", ("image", "caption")),
    ("video-caption", ("video", "caption")),
    ("document-caption", ("document", "caption")),
])
async def test_replies_and_captions_carry_the_text_a_code_is_found_in(cloud, name, where):
    tracked = await cloud.track(visitor_id=f"v-{name}", page_url=f"{SITE_URL}?utm_source=fb")
    body = cloud_fixture(name, phone_number_id=PHONE_NUMBER_ID)
    node = messages(body)[0]
    for key in where[:-1]:
        node = node[key]
    original = node[where[-1]]
    node[where[-1]] = f"{original} {whatstracking.message_code(tracked['code'])}"
    answer = await deliver(cloud, body)
    assert answer["match"] == "code", answer
    got = await lead(cloud, answer["lead_id"])
    assert got["first_message"].startswith(original)


@pytest.mark.parametrize("name, reason", [
    ("reaction", "reaction message"),
    ("unsupported", "unsupported message"),
    ("status-sent", "status updates"),
    ("status-delivered-bsuid", "status updates"),
    ("status-read-bsuid-only", "status updates"),
])
async def test_reactions_statuses_and_unsupported_messages_make_no_lead(cloud, name, reason):
    answer = await deliver(cloud, name)
    assert answer["ignored"] == reason, answer
    assert await cloud.db.fetchone("SELECT id FROM leads") is None
    assert await cloud.db.fetchone("SELECT id FROM contacts") is None


async def test_a_bsuid_only_customer_is_a_lead_known_by_bsuid_and_username(cloud):
    body = cloud_fixture("bsuid-only", phone_number_id=PHONE_NUMBER_ID)
    contact = body["entry"][0]["changes"][0]["value"]["contacts"][0]
    answer = await deliver(cloud, body)
    assert answer["match"] == "none"
    got = await lead(cloud, answer["lead_id"])
    assert got["phone"] is None
    assert got["identities"] == {"phone": None, "wa_id": None, "lid": None,
                                 "bsuid": contact["user_id"],
                                 "username": contact["profile"]["username"].lstrip("@")}
    # Their next message (same BSUID) is the same contact: no second lead.
    later = await deliver(cloud, fresh_ids(body))
    assert later["ignored"] == "existing contact"
    assert later["contact_id"] == answer["contact_id"]


async def test_a_brazilian_12_digit_id_becomes_the_dialable_phone(cloud):
    body = cloud_fixture("brazil-12-digit", phone_number_id=PHONE_NUMBER_ID)
    wa_id = messages(body)[0]["from"]
    assert len(wa_id) == 12
    answer = await deliver(cloud, body)
    got = await lead(cloud, answer["lead_id"])
    assert got["phone"] == wa_id[:4] + "9" + wa_id[4:]
    assert got["identities"]["wa_id"] == wa_id
    # The same person through Evolution with the 13-digit form: the same contact.
    envelope = upsert("oi de novo", phone=got["phone"])
    again = await cloud.webhook(envelope)
    assert again["ignored"] == "existing contact" and again["contact_id"] == answer["contact_id"]


async def test_a_body_with_two_customers_answers_each(cloud):
    answer = await deliver(cloud, "two-contacts")
    results = answer["results"]
    assert [r["match"] for r in results] == ["none", "none"]
    leads = await cloud.leads()
    assert len({l["phone"] for l in leads}) == 2


async def test_a_body_for_two_numbers_is_routed_by_phone_number_id(cloud):
    body = cloud_fixture("two-entries")
    numbers = [e["changes"][0]["value"]["metadata"]["phone_number_id"] for e in body["entry"]]
    assert len(set(numbers)) == 2
    await add_cloud(cloud, "loja-2", phone_number_id=numbers[1])
    body = cloud_fixture("two-entries", phone_number_id=[PHONE_NUMBER_ID, numbers[1]])
    answer = await deliver(cloud, body)
    assert [r.get("match") for r in answer["results"]] == ["none", "none"]
    leads = await cloud.leads()
    assert sorted(l["connection_id"] for l in leads) == ["loja-2", "loja-cloud"]
    # A number of no cloud connection of the company: ignored, the rest still processed.
    body = fresh_ids(cloud_fixture("two-entries", phone_number_id=[PHONE_NUMBER_ID,
                                                                   "999999999999"]))
    answer = await deliver(cloud, body)
    assert answer["results"][1]["ignored"] == "no connection for number 999999999999"


async def test_a_changed_number_moves_the_contact(cloud):
    change = cloud_fixture("system-user-changed-number", phone_number_id=PHONE_NUMBER_ID)
    message = messages(change)[0]
    old, new = message["from"], message["system"]["wa_id"]
    first = upsert("Olá", phone=old)
    made = await cloud.webhook(first)
    answer = await deliver(cloud, change)
    assert answer == {"ok": True, "delivery_id": answer["delivery_id"], "event": "system",
                      "contact_id": made["contact_id"], "changed": "user_changed_number"}
    contact = await cloud.db.fetchone("SELECT * FROM contacts")
    assert (contact["phone"], contact["bsuid"]) == (new, message["system"]["user_id"])
    # Writing from the new number is the same person: no new lead; the lead keeps its number.
    later = await cloud.webhook(upsert("sou eu, número novo", phone=new))
    assert later["ignored"] == "existing contact"
    assert [l["phone"] for l in await cloud.leads()] == [old]


async def test_a_changed_bsuid_moves_the_contact(cloud):
    first = cloud_fixture("bsuid-only", phone_number_id=PHONE_NUMBER_ID)
    change = cloud_fixture("system-user-changed-user-id", phone_number_id=PHONE_NUMBER_ID)
    system = messages(change)[0]["system"]
    for m in messages(first):
        m["from_user_id"] = system["previous_user_id"]
    first["entry"][0]["changes"][0]["value"]["contacts"][0]["user_id"] = system["previous_user_id"]
    made = await deliver(cloud, first)
    answer = await deliver(cloud, change)
    assert answer["changed"] == "user_changed_user_id"
    contact = await cloud.db.fetchone("SELECT bsuid FROM contacts WHERE id = ?",
                                      made["contact_id"])
    assert contact["bsuid"] == system["user_id"]
    unknown = await deliver(cloud, fresh_ids(change))  # nobody had that id any more
    assert unknown["ignored"] == "unknown contact"


async def test_business_echoes_never_make_leads(cloud):
    answer = await deliver(cloud, "smb-message-echoes")
    assert answer["event"] == "smb_message_echoes" and answer["ignored"] == "from me"
    assert await cloud.db.fetchone("SELECT id FROM leads") is None
    assert await cloud.db.fetchone("SELECT id FROM contacts") is None


async def test_a_business_echo_feeds_the_business_chat_rules_once(cloud):
    resp = await cloud.client.patch("/api/company", json={"chat_rules": [
        {"from": "business", "keywords": ["pedido confirmado"], "event": "purchase",
         "value": "from_text"}]}, headers=cloud.auth)
    assert resp.status == 200, await resp.text()
    echo = cloud_fixture("smb-message-echoes", phone_number_id=PHONE_NUMBER_ID)
    value = echo["entry"][0]["changes"][0]["value"]
    value["message_echoes"][0]["text"]["body"] = "Pedido confirmado ✅ total R$ 1.250,90 😊"
    stranger = await deliver(cloud, echo)  # nobody wrote from that number yet
    assert stranger["ignored"] == "business message to a chat with no lead"
    ad = await deliver(cloud, "text-referral-image-ad")  # the customer the echo answers
    assert messages(cloud_fixture("text-referral-image-ad"))[0]["from"] == \
        value["message_echoes"][0]["to"]
    echo = fresh_ids(echo)
    delivery = await send(cloud.client, hook(cloud), echo, APP_SECRET, retries=1)  # Meta retries
    first, retry = (json.loads(text) for _, text in delivery.attempts)
    assert first["lead_id"] == ad["lead_id"] and len(first["chat_rules"]) == 1
    assert retry["ignored"] == "duplicate"
    got = await cloud.client.get(f"/api/leads/{ad['lead_id']}", headers=cloud.auth)
    events = [e for e in (await got.json())["events"] if e["name"] == "purchase"]
    assert [(e["value"], e["source"]) for e in events] == [(1250.9, "chat_rule")]
    assert (await cloud.db.fetchone("SELECT COUNT(*) AS n FROM leads"))["n"] == 1


async def test_one_person_across_lid_phone_and_bsuid_is_one_contact(cloud):
    """Evolution knows them by LID, Meta by BSUID, then by phone with the BSUID, then Evolution
    by phone with the LID: the three contacts become one, the oldest, with every identity, and
    both leads are that contact's."""
    phone, lid, bsuid = "5521987651234", "118212345678901", "BR.1377452218890614"
    by_lid = await cloud.webhook(upsert("oi", phone=lid, remoteJid=f"{lid}@lid"))
    body = cloud_fixture("bsuid-only", phone_number_id=PHONE_NUMBER_ID)
    by_bsuid = await deliver(cloud, body)
    assert by_lid["contact_id"] != by_bsuid["contact_id"]
    both = cloud_fixture("wa-id-and-user-id", phone_number_id=PHONE_NUMBER_ID)
    value = both["entry"][0]["changes"][0]["value"]
    value["contacts"][0].update(wa_id=phone, user_id=bsuid)
    value["messages"][0].update({"from": phone, "from_user_id": bsuid})
    with_phone = await deliver(cloud, both)
    assert with_phone["contact_id"] == by_bsuid["contact_id"]
    evolution = upsert("de novo", phone=phone, remoteJidAlt=f"{lid}@lid")
    merged = await cloud.webhook(evolution)
    assert merged["contact_id"] == by_lid["contact_id"]  # the oldest stays
    contacts = await cloud.db.fetchall("SELECT * FROM contacts")
    assert len(contacts) == 1
    assert (contacts[0]["phone"], contacts[0]["lid"], contacts[0]["bsuid"]) == (phone, lid, bsuid)
    leads = await cloud.leads()
    assert len(leads) == 2
    for got in leads:
        assert got["identities"]["phone"] == phone and got["identities"]["lid"] == lid
        assert got["identities"]["bsuid"] == bsuid
    rows = await cloud.db.fetchall("SELECT DISTINCT contact_id FROM leads")
    assert [r["contact_id"] for r in rows] == [by_lid["contact_id"]]


async def test_the_admin_adds_a_cloud_number_for_a_company(api):
    resp = await api.client.post("/api/connections", json={
        "type": "cloud", "connectionId": "admin-cloud", "phone_number_id": PHONE_NUMBER_ID,
        "waba_id": WABA_ID, "app_secret": APP_SECRET, "company_id": api.company_id},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert resp.status == 201, await resp.text()


async def test_a_username_customer_is_found_by_search_and_exported(cloud):
    await deliver(cloud, "bsuid-only")
    for q in ("lu.artes", "@LU.ARTESANATO"):
        found = await cloud.leads(q=q)
        assert [l["identities"]["username"] for l in found] == ["lu.artesanato"], q
    resp = await cloud.client.get("/api/leads", params={"format": "csv"}, headers=cloud.auth)
    text = (await resp.read()).decode("utf-8-sig").splitlines()
    header, row = text[0].split(","), text[1].split(",")
    assert dict(zip(header, row))["username"] == "lu.artesanato"
    assert dict(zip(header, row))["bsuid"].startswith("BR.")
    assert dict(zip(header, row))["source"] == "cloud"


async def test_the_connection_shows_when_meta_last_delivered(cloud):
    resp = await cloud.client.get("/api/connections", headers=cloud.auth)
    assert (await resp.json())["connections"][0]["lastDeliveryAt"] is None
    await deliver(cloud, "status-sent")
    resp = await cloud.client.get("/api/connections", headers=cloud.auth)
    assert (await resp.json())["connections"][0]["lastDeliveryAt"] is not None


async def test_a_bsuid_only_customer_is_erased_by_bsuid(cloud):
    body = cloud_fixture("bsuid-only", phone_number_id=PHONE_NUMBER_ID)
    bsuid = body["entry"][0]["changes"][0]["value"]["contacts"][0]["user_id"]
    await deliver(cloud, body)
    await deliver(cloud, "text")  # somebody else, kept
    resp = await cloud.client.delete(f"/api/contacts/{bsuid}", headers=cloud.auth)
    data = await resp.json()
    assert resp.status == 200, data
    assert data["bsuid"] == bsuid and "phone" not in data
    assert data["erased"]["leads"] == 1 and data["erased"]["contacts"] == 1
    assert data["erased"]["webhook_deliveries"] == 1  # the raw body naming the BSUID
    assert [l["identities"]["bsuid"] for l in await cloud.leads()] == [None]
    resp = await cloud.client.delete("/api/contacts/BR.", headers=cloud.auth)
    assert resp.status == 400 and "BSUID" in (await resp.json())["error"]
