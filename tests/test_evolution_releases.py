"""Evolution as its releases really behave (issue 17, "Evolution, hardened"), against the fake
Evolution (tests/fake_evolution.py) and the payload shapes of tests/fixtures (see its README), on
SQLite and Postgres:

- a create-instance left without answer (Evolution's fixed 5 s wait, a dropped connection) is
  reconciled with fetchInstances: registered with its webhook set by us, or reported clearly;
- Evolution 2.4's licence gate (503 LICENSE_REQUIRED) is a 502 saying the server must be activated,
  on every call that reaches Evolution, and in the doctor;
- ad clicks with only the opaque conversion fields (Baileys#2354) are classified by
  entryPointConversionSource, never with an invented click id;
- poll votes, reactions and protocol messages make no lead.
"""

from __future__ import annotations

import asyncio

import pytest

import whatstracking
from conftest import Api, create_company, eventually, fixture, upsert
from fake_evolution import QR, FakeEvolution

CONN = "loja-centro"
SECRET_HEADER = "x-webhook-secret"


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def server_env(evolution) -> dict:
    return {"EVOLUTION_API_URL": evolution.url, "EVOLUTION_API_KEY": evolution.global_key,
            "EVOLUTION_TIMEOUT": "1"}


@pytest.fixture
async def client(aiohttp_client, make_config, server_env):
    """The server, with the fake Evolution as its default server."""
    return await aiohttp_client(whatstracking.create_app(make_config(**server_env)))


@pytest.fixture
async def api(client) -> Api:
    return Api(client, await create_company(client))


async def call(api: Api, method: str, path: str, expect: int, **kwargs) -> dict:
    resp = await api.client.request(method, path, headers=api.auth, **kwargs)
    data = await resp.json()
    assert resp.status == expect, data
    return data


async def create(api: Api, expect: int = 201, connection_id: str = CONN) -> dict:
    return await call(api, "POST", "/api/create-instance", expect,
                      json={"connectionId": connection_id})


async def stored(api: Api, connection_id: str = CONN) -> dict | None:
    return await api.db.fetchone("SELECT * FROM connections WHERE company_id = ? AND id = ?",
                                 api.company_id, connection_id)


def sent_create(evolution):
    request, = evolution.calls("POST", "/instance/create")
    return request


async def create_while_stalled(api: Api, evolution, expect: int, meanwhile) -> dict:
    """Create while Evolution, having made the instance, stalls its answer; `meanwhile(instance)`
    changes the instance on the fake as soon as it exists. Nothing may be stored."""
    evolution.misbehave, evolution.delay = "stall-create", 30  # the fake's close ends the stall

    async def instance():
        return evolution.instances.get(CONN)

    async def change():
        meanwhile(await eventually(instance, f"instance {CONN} on Evolution"))

    task = asyncio.ensure_future(change())
    data = await create(api, expect=expect)
    await task
    assert await stored(api) is None
    assert not evolution.calls("POST", f"/webhook/set/{CONN}")
    return data


async def delivery(api: Api, secret: str) -> int:
    """The status our webhook answers a delivery from the instance with this secret header."""
    resp = await api.client.post(f"/webhook/{api.company_id}", json=upsert("Oi"),
                                 headers={"X-Webhook-Secret": secret})
    return resp.status


@pytest.fixture
def no_create_wait(monkeypatch):
    """The create call waits EVOLUTION_TIMEOUT alone (1 s here), not Evolution's 5 s on top."""
    monkeypatch.setattr(whatstracking, "EVOLUTION_CREATE_WAIT", 0)


# ------------------------------------------------------------------------------------------------
# create-instance left without answer
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("misbehave", ["stall-create", "drop-create"])
async def test_a_create_without_answer_that_made_the_instance_registers_it(
        api, evolution, no_create_wait, misbehave):
    evolution.misbehave, evolution.delay = misbehave, 30  # the fake's close ends the stall
    data = await create(api)

    request = sent_create(evolution)
    token, secret = request.json["token"], request.json["webhook"]["headers"][SECRET_HEADER]
    # Reconciled: the instance looked up by name, its webhook set again with our header.
    fetched, = evolution.calls("GET", "/instance/fetchInstances")
    assert fetched.query == {"instanceName": CONN}
    webhook_set, = evolution.calls("POST", f"/webhook/set/{CONN}")
    assert webhook_set.json["webhook"]["enabled"] is True
    assert webhook_set.json["webhook"]["headers"] == {SECRET_HEADER: secret}
    assert webhook_set.json["webhook"]["url"].endswith(f"/webhook/{api.company_id}")
    assert evolution.instances[CONN]["webhook"]["headers"] == {SECRET_HEADER: secret}
    # Answered as a create, the QR from `connect` (the create's answer, with its QR, was lost).
    assert data["ok"] is True and data["connection"]["connectionId"] == CONN
    assert data["qrcode"]["code"] == QR["code"]
    assert data["qrcode"]["base64"].startswith("data:image/png;base64,")
    assert evolution.calls("GET", f"/instance/connect/{CONN}")
    row = await stored(api)
    assert row["verified"] == 1 and row["instance_token"] == token
    assert row["instance_id"] == evolution.instances[CONN]["id"]
    assert row["webhook_secret"] == whatstracking.hash_token(secret)
    # Its deliveries are ours now (before, every one got 401 and was lost).
    assert await delivery(api, secret) == 200
    # Managed like any connection: deleting it reaches Evolution.
    await call(api, "DELETE", "/api/delete-instance", 200, params={"connectionId": CONN})
    assert CONN not in evolution.instances


async def test_a_company_s_own_server_that_dropped_the_create_is_reconciled_too(api):
    # A server the company chose answers its failures with one sentence (no port scanner);
    # the create it made all the same is still found and registered.
    own = await FakeEvolution().start()
    try:
        await call(api, "PATCH", "/api/company", 200,
                   json={"evolution_url": own.url, "evolution_key": own.global_key})
        own.misbehave = "drop-create"
        data = await create(api)
        assert data["qrcode"]["code"] == QR["code"]
        assert own.calls("POST", f"/webhook/set/{CONN}")
        assert (await stored(api))["instance_token"] == sent_create(own).json["token"]
        own.misbehave = "html"  # (it is the company's own server: one sentence for failures)
        data = await create(api, 502, "loja-2")
        assert data["error"].endswith("or what answers there is not Evolution API: check "
                                      "evolution_url")
    finally:
        await own.close()


async def test_a_create_that_timed_out_and_made_nothing_is_504_and_stores_nothing(
        api, evolution, no_create_wait):
    # Evolution removes a half-made instance when its start-up fails (instance.controller.ts,
    # the catch of createInstance).
    data = await create_while_stalled(
        api, evolution, 504, lambda instance: evolution.instances.pop(instance["name"]))
    assert data["error"].startswith(f"Connection {CONN} was not created: the create call got no "
                                    "answer (Evolution API did not answer within 1 seconds")
    assert "does not list the instance; try again" in data["error"]


async def test_a_create_whose_name_another_token_took_meanwhile_is_409(
        api, evolution, no_create_wait):
    data = await create_while_stalled(
        api, evolution, 409,
        lambda instance: instance.update(token="0C1D2E3F-SOMEBODY-ELSES-TOKEN"))
    assert "exists on the Evolution server but is not the one this request created" in (
        data["error"])
    assert "POST /api/connections" in data["error"]


async def test_a_create_without_answer_that_cannot_be_checked_is_504(
        api, evolution, no_create_wait):
    evolution.misbehave, evolution.delay = "stall-create", 30
    evolution.override("GET", "/instance/fetchInstances", 500, {
        "status": 500, "error": "Internal Server Error",
        "response": {"message": "Can't reach database server at `postgres:5432`"}})
    data = await create(api, expect=504)
    assert f"whether the Evolution server made connection {CONN} could not be checked" in (
        data["error"])
    assert "Can't reach database server" in data["error"]
    assert await stored(api) is None


async def test_a_dropped_create_that_made_nothing_is_502(api, evolution):
    evolution.misbehave = "drop-create"
    # The drop comes after the instance exists; Evolution's clean-up removed it again.
    evolution.override("GET", "/instance/fetchInstances", 404, {
        "status": 404, "error": "Not Found", "response": {"message": [f'Instance "{CONN}" not found']}})
    data = await create(api, expect=502)
    assert data["error"].startswith(f"Connection {CONN} was not created")
    assert "Evolution API is unreachable" in data["error"]
    assert await stored(api) is None


async def test_the_create_call_waits_evolution_s_5_seconds_beyond_evolution_timeout(
        api, evolution):
    # EVOLUTION_TIMEOUT is 1 s here; Evolution answers create after 2 s (its fixed wait): that is
    # no timeout, so no reconciliation either.
    evolution.misbehave, evolution.delay = "stall-create", 2
    data = await create(api)
    assert data["qrcode"]["code"] == QR["code"]
    assert not evolution.calls("GET", "/instance/fetchInstances")
    assert not evolution.calls("GET", f"/instance/connect/{CONN}")
    assert (await stored(api))["instance_token"] == sent_create(evolution).json["token"]


def test_the_default_evolution_timeout_covers_the_create_wait():
    config = whatstracking.Config()
    assert config.evolution_timeout >= 10  # socket start-up and a slow database, with margin
    assert whatstracking.EVOLUTION_CREATE_WAIT == 5


# ------------------------------------------------------------------------------------------------
# Evolution 2.4's licence gate
# ------------------------------------------------------------------------------------------------

ACTIVATE = "must be activated: Evolution 2.4 refuses every API call (HTTP 503 LICENSE_REQUIRED)"


@pytest.mark.parametrize("method,path,kwargs", [
    ("GET", "/api/instance-status", {"params": {"connectionId": CONN}}),
    ("GET", "/qrcode/generate-qrcode", {"params": {"instanceId": CONN, "format": "json"}}),
    ("POST", "/instance/restart", {"json": {"connectionId": CONN}}),
    ("POST", "/instance/logout", {"json": {"connectionId": CONN}}),
    ("DELETE", "/api/delete-instance", {"params": {"connectionId": CONN}}),
    ("DELETE", "/instance/delete", {"json": {"connectionId": CONN}}),
    ("POST", "/api/create-instance", {"json": {"connectionId": "loja-nova"}}),
    ("POST", "/api/connections", {"json": {"type": "evolution", "adopt": True,
                                           "connectionId": "loja-antiga",
                                           "instance_token": "TOKEN-DA-LOJA-ANTIGA"}}),
])
async def test_the_licence_gate_is_a_502_saying_the_server_must_be_activated(
        api, evolution, method, path, kwargs):
    await create(api)
    evolution.open(CONN)
    evolution.add_instance("loja-antiga", token="TOKEN-DA-LOJA-ANTIGA")
    async def age(tx):  # the QR route asks Evolution, not its stored copy
        await tx.execute("UPDATE connections SET qr_at = 0")
    await api.db.transact(age)
    before = await stored(api)
    evolution.misbehave = "unlicensed"

    data = await call(api, method, path, 502, **kwargs)
    assert data["error"] == (f"The Evolution server at {evolution.url} {ACTIVATE} until it is "
                             f"activated in its manager ({evolution.url}/manager) or given a "
                             "licensing key")
    assert evolution.requests[-1].path.startswith(("/instance/", "/webhook/"))
    assert await stored(api) == before  # nothing changed here
    assert await stored(api, "loja-nova") is None and await stored(api, "loja-antiga") is None


async def test_the_doctor_says_to_activate_a_gated_evolution_server(api, evolution):
    await create(api)
    evolution.misbehave = "unlicensed"
    data = await call(api, "GET", "/api/checks", 200)
    checks = {c["name"]: c for c in data["checks"]}
    server = checks[f"{api.company_id}: Evolution server"]
    assert server["ok"] is False
    assert ACTIVATE in server["detail"]
    assert server["fix"].startswith(f"activate the Evolution server: open {evolution.url}/manager")


# ------------------------------------------------------------------------------------------------
# Ad clicks that carry only the opaque conversion fields
# ------------------------------------------------------------------------------------------------

async def only_lead(api: Api) -> dict:
    leads = await api.leads()
    assert len(leads) == 1, leads
    return leads[0]


async def test_an_opaque_ad_click_is_a_ctwa_lead_without_a_click_id(api):
    envelope = fixture("messages-upsert-ctwa-opaque")
    answer = await api.webhook(envelope)
    assert answer["match"] == "ctwa"
    lead = await only_lead(api)
    assert lead["match_method"] == "ctwa" and lead["confidence"] == 1.0
    assert lead["phone"] == "5531988776655" and lead["name"] == "Juliana Rocha"
    assert lead["first_message"] == "Olá! Quero saber mais sobre o plano anual 🙌"
    attribution = lead["attribution"]
    assert attribution["utm_source"] == "meta_ads" and attribution["utm_medium"] == "ctwa"
    # Nothing is read out of the opaque bytes: no ad id, no click id, no title.
    assert attribution["ctwa_clid"] is None and attribution["ad_id"] is None
    assert attribution["ad_title"] is None and attribution["landing_page"] is None
    # The raw fields are kept whole, for when their meaning is known.
    assert lead["context_info"] == envelope["data"]["contextInfo"]
    assert lead["context_info"]["ctwaPayload"]["0"] == envelope["data"]["contextInfo"][
        "ctwaPayload"]["0"]


async def test_a_known_contact_s_later_opaque_ad_click_makes_no_new_lead(api):
    phone = "5531988776655"  # the opaque fixture's sender
    assert (await api.webhook(upsert("Oi", phone=phone)))["match"] == "none"
    answer = await api.webhook(fixture("messages-upsert-ctwa-opaque"))
    assert answer["ignored"] == "existing contact"
    assert [lead["match_method"] for lead in await api.leads()] == ["none"]


@pytest.mark.parametrize("entry_point", ["click_to_chat_link", "message_short_link",
                                         "global_search_new_chat", "biz_profile", "ctwa"])
async def test_a_chat_begun_elsewhere_than_at_an_ad_is_no_ad_lead(api, entry_point):
    envelope = fixture("messages-upsert-click-to-chat-link")
    envelope["data"]["contextInfo"]["entryPointConversionSource"] = entry_point
    answer = await api.webhook(envelope)
    assert answer["match"] == "none"
    lead = await only_lead(api)
    assert lead["attribution"]["utm_source"] == "direct"
    assert lead["attribution"]["ctwa_clid"] is None
    # Where the chat began is kept on the lead, raw, as it came.
    assert lead["context_info"] == envelope["data"]["contextInfo"]


async def test_the_entry_point_decides_over_the_other_opaque_fields(api):
    envelope = fixture("messages-upsert-ctwa-opaque")
    envelope["data"]["contextInfo"]["entryPointConversionSource"] = "click_to_chat_link"
    assert (await api.webhook(envelope))["match"] == "none"


@pytest.mark.parametrize("fields,is_ad", [
    ({"ctwaPayload": {"0": 18, "1": 52}}, True),
    ({"conversionSource": "FB_Ads", "conversionData": {"0": 34}}, True),
    ({"entryPointConversionSource": "CTWA_AD"}, True),
    ({"entryPointConversionSource": "ig_ads"}, True),
    ({"conversionData": {"0": 34, "1": 66}}, False),
    ({"conversionSource": "status"}, False),
    ({"entryPointConversionSource": "", "ctwaPayload": "EjRWeA=="}, True),
])
async def test_opaque_fields_without_an_entry_point(api, fields, is_ad):
    envelope = fixture("messages-upsert-ctwa-opaque")
    envelope["data"]["contextInfo"] = fields
    answer = await api.webhook(envelope)
    assert answer["match"] == ("ctwa" if is_ad else "none")
    lead = await only_lead(api)
    assert lead["attribution"]["ctwa_clid"] is None
    assert lead["context_info"] == fields  # kept raw, ad or not


async def test_opaque_fields_inside_an_image_message_are_found(api):
    envelope = fixture("messages-upsert-ctwa-opaque")
    info = envelope["data"].pop("contextInfo")
    envelope["data"]["message"] = {"imageMessage": {"mimetype": "image/jpeg",
                                                    "caption": "Esse aqui 😍", "contextInfo": info}}
    envelope["data"]["messageType"] = "imageMessage"
    assert (await api.webhook(envelope))["match"] == "ctwa"
    assert (await only_lead(api))["context_info"] == info


def test_ad_attribution_reads_no_click_id_from_opaque_fields():
    info = fixture("messages-upsert-ctwa-opaque")["data"]["contextInfo"]
    assert whatstracking.ad_attribution(info) == {
        "utm_source": "meta_ads", "utm_medium": "ctwa", "ad_id": None, "ctwa_clid": None,
        "ad_title": None, "landing_page": None, "page_url": None}
    link = fixture("messages-upsert-click-to-chat-link")["data"]["contextInfo"]
    assert whatstracking.ad_attribution(link) is None
    # externalAdReply, where it is, still gives everything (and wins over the entry point).
    full = fixture("messages-upsert-ctwa-ad")["data"]["contextInfo"]
    full["entryPointConversionSource"] = "click_to_chat_link"
    assert whatstracking.ad_attribution(full)["ctwa_clid"] == full["externalAdReply"]["ctwaClid"]


# ------------------------------------------------------------------------------------------------
# Poll votes, reactions and protocol messages
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,reason", [("messages-upsert-poll-vote", "poll vote"),
                                         ("messages-upsert-reaction", "reaction"),
                                         ("messages-upsert-protocol", "protocol message")])
async def test_no_content_messages_from_a_new_contact_make_no_lead(api, name, reason):
    answer = await api.webhook(fixture(name))
    assert answer["ok"] is True and answer["ignored"] == reason
    assert await api.leads() == []
    row = await api.db.fetchone("SELECT COUNT(*) AS n FROM contacts")
    assert row["n"] == 0
    # The person's first real message is then their lead.
    envelope = fixture(name)
    sender = envelope["data"]["key"]["remoteJid"].split("@")[0]
    assert (await api.webhook(upsert("Oi, tudo bem?", phone=sender)))["match"] == "none"
    assert [lead["phone"] for lead in await api.leads()] == [sender]


@pytest.mark.parametrize("message,reason", [
    ({"encReactionMessage": {"targetMessageKey": {"id": "3EB0AA"}, "encPayload": "AAEC",
                             "encIv": "AwQF"}}, "reaction"),
    ({"pinInChatMessage": {"key": {"id": "3EB0AA"}, "type": 1}}, "protocol message"),
    ({"keepInChatMessage": {"key": {"id": "3EB0AA"}, "keepType": 1}}, "protocol message"),
    ({"reactionMessage": {"key": {"id": "3EB0AA"}, "text": ""},
      "senderKeyDistributionMessage": {"groupId": "x"}}, "reaction"),
])
async def test_other_no_content_stubs_make_no_lead(api, message, reason):
    envelope = upsert("")
    envelope["data"]["message"] = message
    assert (await api.webhook(envelope))["ignored"] == reason
    assert await api.leads() == []


@pytest.mark.parametrize("message", [
    {"audioMessage": {"mimetype": "audio/ogg; codecs=opus", "seconds": 7, "ptt": True}},
    {"imageMessage": {"mimetype": "image/jpeg"}},
    {"reactionMessage": {"key": {"id": "3EB0AA"}, "text": "👍"}, "conversation": "Oi!"},
])
async def test_content_without_text_still_makes_a_lead(api, message):
    envelope = upsert("")
    envelope["data"]["message"] = message
    assert (await api.webhook(envelope))["match"] == "none"
