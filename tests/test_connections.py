"""Connections: Evolution instance management, QR codes, onboarding links, the public status and
the generic webhook ingest (SPEC §7), against a fake Evolution API v2.3.6 (tests/fake_evolution.py),
on SQLite and Postgres.

Every test checks both sides: what WhatsTracking answered and what Evolution received (method,
path, `apikey` header, body).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import time
import urllib.parse
import xml.etree.ElementTree as ET
from datetime import datetime

import pytest
import segno

import whatstracking
from conftest import ADMIN_TOKEN, Api, create_company, fixture, upsert
from fake_evolution import QR, FakeEvolution, closed_port_url, response

INGEST_TOKEN = "ingest-shared-token-0123456789"
CONN = "loja-centro"
EVENTS = ["MESSAGES_UPSERT", "CONNECTION_UPDATE", "QRCODE_UPDATED", "LABELS_EDIT",
          "LABELS_ASSOCIATION"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OWNER = "5511900001111"
NEW_CODE = ("2@Zm9yLXRoaXMtdGVzdC1vbmx5LW5vdC1hLXJlYWwtc2Vzc2lvbg,"
            "Y29ubmVjdC1hbnN3ZXItbm9pc2Uta2V5,aWRlbnRpdHkta2V5LWZha2U=,YWR2LXNlY3JldC1mYWtl")
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# ------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def server_env(evolution) -> dict:
    return {"EVOLUTION_API_URL": evolution.url, "EVOLUTION_API_KEY": evolution.global_key,
            "EVOLUTION_TIMEOUT": "1", "WEBHOOK_SHARED_TOKEN": INGEST_TOKEN}


@pytest.fixture
async def client(aiohttp_client, make_config, server_env):
    """The server (overrides conftest's), with the fake Evolution as its default server."""
    return await aiohttp_client(whatstracking.create_app(make_config(**server_env)))


async def call(api: Api, method: str, path: str, expect: int, headers: dict | None = None,
               **kwargs) -> dict:
    resp = await api.client.request(method, path, headers=api.auth if headers is None else headers,
                                    **kwargs)
    data = await resp.json()
    assert resp.status == expect, data
    assert resp.content_type == "application/json"
    return data


async def create(api: Api, connection_id: str = CONN, expect: int = 201, **body) -> dict:
    return await call(api, "POST", "/api/create-instance", expect,
                      json={"connectionId": connection_id, **body})


async def connections(api: Api) -> dict[str, dict]:
    data = await call(api, "GET", "/api/connections", 200)
    return {c["connectionId"]: c for c in data["connections"]}


async def stored_connection(api: Api, connection_id: str = CONN) -> dict | None:
    return await api.db.fetchone("SELECT * FROM connections WHERE company_id = ? AND id = ?",
                                 api.company_id, connection_id)


async def count_connections(api: Api) -> int:
    row = await api.db.fetchone("SELECT COUNT(*) AS n FROM connections")
    return int(row["n"])


def sent_secret(evolution: FakeEvolution, index: int = -1) -> str:
    """The webhook secret header WhatsTracking gave Evolution on /instance/create."""
    return evolution.calls("POST", "/instance/create")[index].json["webhook"]["headers"][
        "x-webhook-secret"]


def sent_token(evolution: FakeEvolution, index: int = -1) -> str:
    return evolution.calls("POST", "/instance/create")[index].json["token"]


async def age_stored_qr(api: Api, connection_id: str = CONN, seconds: float = 3600) -> None:
    """Make the stored QR old, so the next QR request asks Evolution."""
    async def run(tx):
        await tx.execute("UPDATE connections SET qr_at = ? WHERE company_id = ? AND id = ?",
                         time.time() - seconds, api.company_id, connection_id)
    await api.db.transact(run)


async def signing_key(api: Api) -> str:
    row = await api.db.fetchone("SELECT signing_key FROM companies WHERE id = ?", api.company_id)
    assert row["signing_key"], "no onboarding link was made yet"
    return row["signing_key"]


async def make_link(api: Api, connection_id: str = CONN, ttl: int = 3600) -> dict:
    return await call(api, "POST", "/api/connection-link", 201,
                      json={"connectionId": connection_id, "ttl": ttl})


def link_query(url: str) -> dict:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


def tampered(sig: str) -> str:
    return ("A" if sig[0] != "A" else "B") + sig[1:]


def segno_render(code: str, kind: str) -> bytes:
    buffer = io.BytesIO()
    segno.make_qr(code).save(buffer, kind=kind, scale=8, border=4)
    return buffer.getvalue()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def webhook_headers(secret: str) -> dict:
    return {"X-Webhook-Secret": secret}


# ------------------------------------------------------------------------------------------------
# The fake follows Evolution's contract (so the tests below mean something)
# ------------------------------------------------------------------------------------------------

async def test_fake_evolution_answers_with_evolutions_own_shapes_and_guard_order(aiohttp_client):
    fake = FakeEvolution()
    http = await aiohttp_client(fake.app)
    key = {"apikey": fake.global_key}
    webhook = {"url": "http://wt.test/webhook/x", "events": EVENTS}

    resp = await http.post("/instance/create", json={"instanceName": "a",
                                                     "integration": "WHATSAPP-BAILEYS",
                                                     "webhook": {"url": "http://wt.test/w"}},
                           headers=key)
    assert resp.status == 400
    assert await resp.json() == {"status": 400, "error": "Bad Request", "response": {
        "message": ["Cannot read properties of undefined (reading 'length')"]}}
    resp = await http.post("/instance/create", json={"instanceName": "a", "integration": "X"},
                           headers=key)
    assert (resp.status, (await resp.json())["response"]["message"]) == (
        400, ["Invalid integration"])

    resp = await http.post("/instance/create", json={
        "instanceName": "a", "integration": "WHATSAPP-BAILEYS", "token": "TOK-A", "qrcode": True,
        "webhook": webhook}, headers=key)
    created = await resp.json()
    assert resp.status == 201, created
    assert created["hash"] == "TOK-A" and created["instance"]["status"] == "connecting"
    assert created["qrcode"]["code"] == QR["code"]

    # The instance token: its own routes only, never /instance/create.
    resp = await http.post("/instance/create", json={"instanceName": "b",
                                                     "integration": "WHATSAPP-BAILEYS",
                                                     "webhook": webhook},
                           headers={"apikey": "TOK-A"})
    assert resp.status == 401
    assert await resp.json() == {"status": 401, "error": "Unauthorized",
                                 "response": {"message": "Unauthorized"}}
    resp = await http.get("/instance/connectionState/a", headers={"apikey": "TOK-A"})
    assert await resp.json() == {"instance": {"instanceName": "a", "state": "connecting"}}
    resp = await http.get("/instance/connectionState/a", headers={"apikey": "wrong"})
    assert resp.status == 401

    # Name in use: 403 before authentication; missing instance: 404 before authentication.
    resp = await http.post("/instance/create", json={"instanceName": "a"})
    assert resp.status == 403
    assert (await resp.json())["response"]["message"] == ['This name "a" is already in use.']
    resp = await http.get("/instance/connect/nope")
    assert resp.status == 404
    assert await resp.json() == {"status": 404, "error": "Not Found", "response": {
        "message": ['The "nope" instance does not exist']}}

    # Restart is POST in v2; PUT is an unknown route.
    resp = await http.put("/instance/restart/a", headers=key)
    assert resp.status == 404
    assert (await resp.json())["response"]["message"] == ["Cannot PUT /instance/restart/a"]
    fake.instances["a"]["state"] = "close"
    resp = await http.post("/instance/restart/a", headers=key)
    assert (resp.status, await resp.json()) == (200, {"error": True, "message": "[object Object]"})
    resp = await http.delete("/instance/logout/a", headers=key)
    assert resp.status == 400
    fake.open("a")
    resp = await http.get("/instance/connect/a", headers=key)
    assert await resp.json() == {"instance": {"instanceName": "a", "state": "open"}}
    resp = await http.get("/instance/fetchInstances", params={"instanceName": "a"}, headers=key)
    rows = await resp.json()
    assert rows[0]["name"] == "a" and rows[0]["ownerJid"] == f"{OWNER}@s.whatsapp.net"
    resp = await http.delete("/instance/delete/a", headers=key)
    assert (resp.status, (await resp.json())["response"]["message"]) == (200, "Instance deleted")
    assert [(r.method, r.path) for r in fake.requests][-1] == ("DELETE", "/instance/delete/a")


# ------------------------------------------------------------------------------------------------
# POST /api/create-instance
# ------------------------------------------------------------------------------------------------

async def test_create_instance_sends_evolution_the_global_key_baileys_qrcode_token_and_webhook(
        api, evolution):
    data = await create(api)

    sent = evolution.calls("POST", "/instance/create")
    assert len(sent) == 1 and len(evolution.requests) == 1
    request = sent[0]
    assert request.apikey == evolution.global_key
    body = request.json
    assert body["instanceName"] == CONN
    assert body["integration"] == "WHATSAPP-BAILEYS"
    assert body["qrcode"] is True
    assert isinstance(body["token"], str) and len(body["token"]) >= 16
    assert "number" not in body
    secret = body["webhook"]["headers"]["x-webhook-secret"]
    assert isinstance(secret, str) and len(secret) >= 20
    assert secret != api.webhook_secret  # a per-connection secret
    assert body["webhook"] == {"url": "http://wt.test/webhook/empresa-123", "byEvents": False,
                               "base64": False, "headers": {"x-webhook-secret": secret},
                               "events": EVENTS}

    connection = data["connection"]
    assert connection["connectionId"] == CONN
    assert connection["companyId"] == "empresa-123"
    assert connection["state"] == "connecting"
    assert connection["instanceId"] == evolution.instances[CONN]["id"]
    assert connection["deletedAt"] is None
    qr = data["qrcode"]
    assert qr["code"] == QR["code"]
    assert qr["pairingCode"] is None
    assert qr["base64"].startswith("data:image/png;base64,")
    png = base64.b64decode(qr["base64"].split(",", 1)[1])
    assert png.startswith(PNG_SIGNATURE)
    assert qr["base64"] != QR["base64"]  # our own segno rendering, not Evolution's placeholder

    # What was stored is what Evolution was given; the inbound secret only as its SHA-256.
    row = await stored_connection(api)
    assert row["instance_token"] == body["token"]
    assert row["webhook_secret"] == whatstracking.hash_token(secret)
    assert connection["verified"] is True
    assert row["qr_code"] == QR["code"]
    assert CONN in await connections(api)


async def test_create_instance_passes_the_number_through_and_returns_the_pairing_code(
        api, evolution):
    data = await create(api, number="+55 (11) 90000-1111")
    assert evolution.calls("POST", "/instance/create")[0].json["number"] == OWNER
    assert data["qrcode"]["pairingCode"] == "7XKQ2M9R"

    requests_before = len(evolution.requests)
    for number in ("12", "abc", 5511900001111, "5" * 16):
        await create(api, "loja-2", 400, number=number)
    assert len(evolution.requests) == requests_before


async def test_company_evolution_server_wins_over_the_default(api, evolution):
    own = await FakeEvolution(global_key="company-own-key").start()
    try:
        await call(api, "PATCH", "/api/company", 200,
                   json={"evolution_url": own.url, "evolution_key": "company-own-key"})
        await create(api)
        own.open(CONN)
        status = await call(api, "GET", "/api/instance-status", 200,
                            params={"connectionId": CONN})
        assert status["state"] == "open"
        assert [(r.method, r.path, r.apikey) for r in own.requests[:2]] == [
            ("POST", "/instance/create", "company-own-key"),
            ("GET", f"/instance/connectionState/{CONN}", "company-own-key")]
        assert evolution.requests == []
    finally:
        await own.close()


async def test_the_default_evolution_key_is_never_sent_to_a_companys_own_server(api, evolution):
    own = await FakeEvolution(global_key="company-own-key").start()
    try:
        await call(api, "PATCH", "/api/company", 200, json={"evolution_url": own.url})
        assert await create(api, expect=400) == {"error": "No server configured"}
        assert own.requests == [] and evolution.requests == []
        # The default server's own URL without a key of its own still uses the default key.
        await call(api, "PATCH", "/api/company", 200, json={"evolution_url": evolution.url})
        await create(api)
        assert evolution.requests[0].apikey == evolution.global_key
    finally:
        await own.close()


async def test_without_any_evolution_server_connections_are_400_no_server_configured(
        aiohttp_client, make_config):
    client = await aiohttp_client(whatstracking.create_app(make_config()))
    api = Api(client, await create_company(client))
    assert await create(api, expect=400) == {"error": "No server configured"}
    assert await count_connections(api) == 0
    # A connection known only from its webhooks is not managed (issue 13: it is unverified,
    # 404), and adopting it has no server to ask either.
    await api.webhook(fixture("connection-update-open"))
    assert await call(api, "GET", "/api/instance-status", 404,
                      params={"connectionId": CONN}) == {"error": "Connection not found"}
    assert await call(api, "POST", "/api/connections", 400, json={
        "type": "evolution", "connectionId": CONN, "adopt": True}) == {
        "error": "No server configured"}


async def test_create_instance_with_a_name_in_use_on_evolution_is_409_and_stores_nothing(
        api, evolution):
    evolution.add_instance(CONN, state="open")
    data = await create(api, expect=409)
    assert CONN in data["error"] and "already" in data["error"]
    request, = evolution.calls("POST", "/instance/create")
    assert request.apikey == evolution.global_key
    assert await connections(api) == {}
    assert await count_connections(api) == 0


async def test_create_instance_with_a_name_used_locally_is_409_without_calling_evolution(
        api, evolution):
    await create(api)
    before = len(evolution.requests)
    data = await create(api, expect=409)
    assert CONN in data["error"]
    assert len(evolution.requests) == before


async def test_create_instance_when_evolution_is_down_is_502_and_stores_nothing(api, evolution):
    await call(api, "PATCH", "/api/company", 200,
               json={"evolution_url": closed_port_url(), "evolution_key": "k"})
    data = await create(api, expect=502)
    assert "unreachable" in data["error"] and "Evolution" in data["error"]
    assert "Traceback" not in data["error"]
    assert await count_connections(api) == 0


async def test_create_instance_when_evolution_answers_nothing_at_all_is_504(
        api, evolution, monkeypatch):
    # The create call waits EVOLUTION_TIMEOUT (1 s) plus Evolution's fixed wait, 0 s here. Then
    # fetchInstances, asked whether the instance was made, does not answer either.
    monkeypatch.setattr(whatstracking, "EVOLUTION_CREATE_WAIT", 0)
    evolution.misbehave, evolution.delay = "slow", 30
    data = await create(api, expect=504)
    assert data["error"].startswith("The create call got no answer (Evolution API did not answer "
                                    "within 1 seconds (POST /instance/create))")
    assert "could not be checked (Evolution API did not answer within 1 seconds" in data["error"]
    assert len(evolution.calls("POST", "/instance/create")) == 1
    assert len(evolution.calls("GET", "/instance/fetchInstances")) == 1
    assert await count_connections(api) == 0


async def test_create_instance_when_evolution_answers_html_is_502(api, evolution):
    evolution.misbehave = "html"
    data = await create(api, expect=502)
    assert "not JSON" in data["error"] and "502" in data["error"]
    assert "<html" not in json.dumps(data)
    assert await count_connections(api) == 0


async def test_create_instance_with_a_wrong_evolution_key_is_502_mentioning_the_key(
        api, evolution):
    await call(api, "PATCH", "/api/company", 200,
               json={"evolution_url": evolution.url, "evolution_key": "wrong-key"})
    data = await create(api, expect=502)
    assert "key" in data["error"] and "401" in data["error"]
    request, = evolution.calls("POST", "/instance/create")
    assert request.apikey == "wrong-key"
    assert evolution.instances == {}
    assert await count_connections(api) == 0


async def test_create_instance_rejects_a_bad_connection_id_with_400(api, evolution):
    for connection_id in ("", "has space", "a" * 65, "../etc", "-dash-first", 123, None,
                          ["loja"]):
        data = await call(api, "POST", "/api/create-instance", 400,
                          json={"connectionId": connection_id})
        assert "connectionId" in data["error"]
    data = await call(api, "POST", "/api/create-instance", 400, json={})
    assert "connectionId" in data["error"]
    await call(api, "POST", "/api/create-instance", 400, data=b"{not json")
    await call(api, "POST", "/api/create-instance", 400, json=["loja-centro"])
    assert evolution.requests == []


async def test_connection_routes_need_a_token(api, evolution):
    for token_headers in ({}, {"Authorization": "Bearer wt_not-a-token"}, {"Authorization": "x"}):
        assert await call(api, "POST", "/api/create-instance", 401, headers=token_headers,
                          json={"connectionId": CONN}) == {"error": "Unauthorized"}
        for method, path in (("GET", "/api/connections"), ("GET", "/api/instance-status"),
                             ("DELETE", "/api/delete-instance"), ("POST", "/instance/restart"),
                             ("POST", "/instance/logout"), ("DELETE", "/instance/delete"),
                             ("GET", "/qrcode/generate-qrcode"),
                             ("POST", "/api/connection-link")):
            kwargs = ({"params": {"connectionId": CONN, "instanceId": CONN}} if method == "GET"
                      else {"json": {"connectionId": CONN}})
            assert await call(api, method, path, 401, headers=token_headers, **kwargs) == {
                "error": "Unauthorized"}, (method, path)
    assert evolution.requests == []


async def test_another_companys_token_cannot_see_or_act_on_the_connection(api, client, evolution):
    await create(api)
    other = Api(client, await create_company(client, "empresa-456"))
    before = len(evolution.requests)
    assert await connections(other) == {}
    for method, path in (("GET", "/api/instance-status"), ("DELETE", "/api/delete-instance"),
                         ("POST", "/instance/restart"), ("POST", "/instance/logout"),
                         ("DELETE", "/instance/delete"), ("POST", "/api/connection-link")):
        kwargs = ({"params": {"connectionId": CONN}} if method == "GET"
                  else {"json": {"connectionId": CONN}})
        assert await call(other, method, path, 404, **kwargs) == {
            "error": "Connection not found"}, (method, path)
    for fmt in ("png", "json"):
        assert await call(other, "GET", "/qrcode/generate-qrcode", 404,
                          params={"instanceId": CONN, "format": fmt}) == {
            "error": "Connection not found"}
    # Naming the other company explicitly is no better.
    await call(other, "GET", "/api/instance-status", 404,
               params={"connectionId": CONN, "company_id": "empresa-123"})
    assert len(evolution.requests) == before
    assert (await stored_connection(api))["deleted_at"] is None
    assert CONN in evolution.instances


async def test_admin_token_acts_on_the_company_it_names(api, evolution):
    data = await call(api, "POST", "/api/create-instance", 201, headers=ADMIN,
                      json={"connectionId": CONN, "company_id": "empresa-123"})
    assert data["connection"]["companyId"] == "empresa-123"
    evolution.open(CONN)
    status = await call(api, "GET", "/api/instance-status", 200, headers=ADMIN,
                        params={"connectionId": CONN, "company_id": "empresa-123"})
    assert status["state"] == "open"
    assert (await call(api, "GET", "/api/instance-status", 400, headers=ADMIN,
                       params={"connectionId": CONN}))["error"].startswith("company_id")


async def test_evolution_errors_in_its_own_shapes_become_502_with_its_message(api, evolution):
    evolution.override("POST", "/instance/create", 400, {
        "status": 400, "error": "Bad Request", "response": {"message": ["Invalid integration"]}})
    data = await create(api, expect=502)
    assert "Invalid integration" in data["error"] and "400" in data["error"]
    evolution.override("POST", "/instance/create", 500, {
        "status": 500, "error": "Internal Server Error",
        "response": {"message": "Cannot read properties of null (reading 'id')"}})
    data = await create(api, expect=502)
    assert "Cannot read properties of null" in data["error"]
    evolution.override("POST", "/instance/create", 200, {"error": True, "message": "boom"})
    assert "boom" in (await create(api, expect=502))["error"]
    assert await count_connections(api) == 0

    await create(api)
    await age_stored_qr(api)
    # connect swallows its errors into HTTP 200 {"error": true}.
    evolution.override("GET", f"/instance/connect/{CONN}", 200, {"error": True, "message": "[object Object]"})
    data = await call(api, "GET", "/qrcode/generate-qrcode", 502,
                      params={"instanceId": CONN, "format": "json"})
    assert data["error"].startswith("Evolution API could not produce a QR code")
    # A QR not generated yet: {"count": 0} only.
    evolution.override("GET", f"/instance/connect/{CONN}", 200, {"count": 0})
    data = await call(api, "GET", "/qrcode/generate-qrcode", 503,
                      params={"instanceId": CONN, "format": "png"})
    assert "no QR code yet" in data["error"]
    # An instance token error on a management route is a key problem too.
    evolution.override("GET", f"/instance/connectionState/{CONN}", 401, response("unauthorized"))
    data = await call(api, "GET", "/api/instance-status", 502, params={"connectionId": CONN})
    assert "key" in data["error"]


async def test_webhook_url_without_public_url_comes_from_the_request(
        aiohttp_client, make_config, server_env, evolution):
    client = await aiohttp_client(whatstracking.create_app(make_config(
        **server_env, PUBLIC_URL="", TRUST_PROXY="true")))
    api = Api(client, await create_company(client))
    await call(api, "POST", "/api/create-instance", 201, json={"connectionId": CONN},
               headers={**api.auth, "X-Forwarded-Proto": "https", "Host": "wt.example.com"})
    url = evolution.calls("POST", "/instance/create")[0].json["webhook"]["url"]
    assert url == "https://wt.example.com/webhook/empresa-123"
    link = await call(api, "POST", "/api/connection-link", 201, json={"connectionId": CONN},
                      headers={**api.auth, "X-Forwarded-Proto": "https",
                               "Host": "wt.example.com"})
    assert link["url"].startswith("https://wt.example.com/connect/loja-centro?")


async def test_management_routes_validate_their_body(api, evolution):
    await create(api)
    before = len(evolution.requests)
    for method, path in (("POST", "/instance/restart"), ("POST", "/instance/logout"),
                         ("DELETE", "/instance/delete"), ("DELETE", "/api/delete-instance")):
        await call(api, method, path, 400, json=["loja-centro"])
        await call(api, method, path, 400, data=b"{")
        assert "connectionId" in (await call(api, method, path, 400, json={}))["error"]
        assert "connectionId" in (await call(api, method, path, 400,
                                             json={"connectionId": "a b"}))["error"]
        assert "company_id" in (await call(api, method, path, 400,
                                           json={"connectionId": CONN, "company_id": 5}))["error"]
    await call(api, "POST", "/api/connection-link", 400, json=[])
    assert len(evolution.requests) == before


# ------------------------------------------------------------------------------------------------
# The webhook secret and instance token given to Evolution authenticate its deliveries
# ------------------------------------------------------------------------------------------------

async def test_webhook_secret_sent_to_evolution_authenticates_messages_upsert(api, evolution):
    await create(api)
    secret = sent_secret(evolution)
    envelope = upsert("Oi, quero um orçamento", phone="5511988887777", instance=CONN)
    envelope["apikey"] = None  # Evolution without EXPOSE_IN_FETCH_INSTANCES

    data = await api.webhook(envelope, expect=401, secret="whc_not-the-secret")
    assert data == {"error": "Unauthorized"}
    assert await api.leads() == []

    resp = await api.client.post("/webhook/empresa-123", json=envelope,
                                 headers=webhook_headers(secret))
    data = await resp.json()
    assert resp.status == 200, data
    assert data["ok"] is True and data["lead_id"]
    lead, = await api.leads()
    assert lead["id"] == data["lead_id"]
    assert lead["phone"] == "5511988887777"
    assert lead["connection_id"] == CONN

    # The secret of one company's connection is worthless for another company.
    await create_company(api.client, "empresa-456")
    resp = await api.client.post("/webhook/empresa-456", json=envelope,
                                 headers=webhook_headers(secret))
    assert resp.status == 401


async def test_envelope_apikey_equal_to_the_instance_token_authenticates(api, evolution):
    await create(api)
    token = sent_token(evolution)
    envelope = upsert("Bom dia", phone="5511977776666", instance=CONN)
    envelope["apikey"] = "B6D711FC-0000-0000-0000-000000000000"
    await api.webhook(envelope, expect=401, secret=None)
    envelope["apikey"] = token
    data = await api.webhook(envelope, expect=200, secret=None)
    assert data["lead_id"]
    assert [lead["phone"] for lead in await api.leads()] == ["5511977776666"]
    # The token of this instance does not vouch for another instance name.
    other = upsert("Oi", phone="5511966665555", instance="loja-outra")
    other["apikey"] = token
    await api.webhook(other, expect=401, secret=None)


# ------------------------------------------------------------------------------------------------
# GET /api/instance-status
# ------------------------------------------------------------------------------------------------

async def test_instance_status_refreshes_the_stored_state_and_profile(api, evolution):
    await create(api)
    evolution.open(CONN)
    status = await call(api, "GET", "/api/instance-status", 200, params={"connectionId": CONN})
    assert status["connectionId"] == CONN
    assert status["state"] == "open"
    assert status["phone"] == OWNER
    assert status["profileName"] == "Loja Centro"
    assert status["pictureUrl"].startswith("https://pps.whatsapp.net/")
    state_call, fetch_call = evolution.requests[1:]
    assert (state_call.method, state_call.path) == ("GET", f"/instance/connectionState/{CONN}")
    assert (fetch_call.method, fetch_call.path) == ("GET", "/instance/fetchInstances")
    assert fetch_call.query == {"instanceName": CONN}
    assert state_call.apikey == fetch_call.apikey == evolution.global_key
    listed = (await connections(api))[CONN]
    assert (listed["state"], listed["phone"], listed["profileName"]) == (
        "open", OWNER, "Loja Centro")

    evolution.instances[CONN]["state"] = "close"
    before = len(evolution.requests)
    status = await call(api, "GET", "/api/instance-status", 200, params={"connectionId": CONN})
    assert status["state"] == "close"
    assert status["phone"] == OWNER  # the last known number is kept
    assert [r.path for r in evolution.requests[before:]] == [f"/instance/connectionState/{CONN}"]
    assert (await connections(api))[CONN]["state"] == "close"


async def test_instance_status_of_an_unknown_connection_is_404_without_asking_evolution(
        api, evolution):
    assert await call(api, "GET", "/api/instance-status", 404,
                      params={"connectionId": "loja-nenhuma"}) == {"error": "Connection not found"}
    assert (await call(api, "GET", "/api/instance-status", 400))["error"].startswith(
        "connectionId")
    assert evolution.requests == []


async def test_instance_status_when_evolution_no_longer_has_the_instance_is_404(api, evolution):
    await create(api)
    del evolution.instances[CONN]
    assert await call(api, "GET", "/api/instance-status", 404,
                      params={"connectionId": CONN}) == {"error": "Connection not found"}
    assert evolution.requests[-1].path == f"/instance/connectionState/{CONN}"


async def test_instance_status_when_evolution_is_down_or_slow_is_502(api, evolution):
    await create(api)
    evolution.misbehave, evolution.delay = "slow", 5
    data = await call(api, "GET", "/api/instance-status", 502, params={"connectionId": CONN})
    assert "did not answer" in data["error"]
    evolution.misbehave = "html"
    data = await call(api, "GET", "/api/instance-status", 502, params={"connectionId": CONN})
    assert "not JSON" in data["error"]
    assert (await stored_connection(api))["state"] == "connecting"


# ------------------------------------------------------------------------------------------------
# DELETE /api/delete-instance (history kept)
# ------------------------------------------------------------------------------------------------

async def test_delete_instance_deletes_it_on_evolution_and_marks_the_connection_deleted(
        api, evolution):
    await create(api)
    data = await call(api, "DELETE", "/api/delete-instance", 200, params={"connectionId": CONN})
    assert data["ok"] is True and data["connectionId"] == CONN
    request = evolution.requests[-1]
    assert (request.method, request.path, request.apikey) == (
        "DELETE", f"/instance/delete/{CONN}", evolution.global_key)
    assert CONN not in evolution.instances

    listed = (await connections(api))[CONN]
    assert listed["deletedAt"] is not None
    datetime.fromisoformat(listed["deletedAt"].replace("Z", "+00:00"))
    row = await stored_connection(api)
    assert row is not None and row["qr_code"] is None
    # Deleted connections are no longer acted on.
    await call(api, "GET", "/api/instance-status", 404, params={"connectionId": CONN})

    # Again: Evolution answers 404 now, which counts as done.
    data = await call(api, "DELETE", "/api/delete-instance", 200, params={"connectionId": CONN})
    assert data["ok"] is True
    assert data["existedOnEvolution"] is False
    assert [(r.method, r.path) for r in evolution.requests[-2:]] == [
        ("DELETE", f"/instance/delete/{CONN}")] * 2

    # The name can be used again: the connection comes back with new secrets.
    old_secret = sent_secret(evolution)
    again = await create(api)
    assert again["connection"]["deletedAt"] is None
    assert sent_secret(evolution) != old_secret


async def test_delete_instance_of_an_unknown_connection_is_404(api, evolution):
    assert await call(api, "DELETE", "/api/delete-instance", 404,
                      params={"connectionId": CONN}) == {"error": "Connection not found"}
    assert evolution.requests == []


# ------------------------------------------------------------------------------------------------
# POST /instance/restart and /instance/logout
# ------------------------------------------------------------------------------------------------

async def test_restart_posts_to_evolution(api, evolution):
    await create(api)
    evolution.open(CONN)
    data = await call(api, "POST", "/instance/restart", 200, json={"connectionId": CONN})
    assert data == {"ok": True, "connectionId": CONN, "state": "open"}
    request = evolution.requests[-1]
    assert (request.method, request.path, request.apikey) == (
        "POST", f"/instance/restart/{CONN}", evolution.global_key)
    assert evolution.calls("PUT") == []


async def test_restart_of_a_closed_instance_is_409_not_connected(api, evolution):
    await create(api)
    evolution.instances[CONN]["state"] = "close"
    data = await call(api, "POST", "/instance/restart", 409, json={"connectionId": CONN})
    assert "not connected" in data["error"] and CONN in data["error"]
    assert "[object Object]" not in data["error"]
    assert [(r.method, r.path) for r in evolution.requests[1:]] == [
        ("POST", f"/instance/restart/{CONN}")]


async def test_restart_on_an_evolution_v1_server_falls_back_to_put(api, evolution):
    evolution.version = 1
    created = await create(api)
    assert created["connection"]["state"] == "connecting"  # v1 says "created"
    # v1 answers create with hash = {"apikey": ...}: the token is still the one stored.
    assert (await stored_connection(api))["instance_token"] == sent_token(evolution)
    evolution.open(CONN)
    data = await call(api, "POST", "/instance/restart", 200, json={"connectionId": CONN})
    assert data["state"] == "open"
    assert [(r.method, r.path, r.apikey) for r in evolution.requests[1:]] == [
        ("POST", f"/instance/restart/{CONN}", evolution.global_key),
        ("PUT", f"/instance/restart/{CONN}", evolution.global_key)]


async def test_restart_of_an_instance_evolution_lost_is_404(api, evolution):
    await create(api)
    del evolution.instances[CONN]
    assert await call(api, "POST", "/instance/restart", 404, json={"connectionId": CONN}) == {
        "error": "Connection not found"}


async def test_logout_deletes_the_evolution_session_and_stores_close(api, evolution):
    await create(api)
    evolution.open(CONN)
    await api.webhook(fixture("connection-update-open"), secret=sent_secret(evolution))
    data = await call(api, "POST", "/instance/logout", 200, json={"connectionId": CONN})
    assert data == {"ok": True, "connectionId": CONN, "state": "close"}
    request = evolution.requests[-1]
    assert (request.method, request.path, request.apikey) == (
        "DELETE", f"/instance/logout/{CONN}", evolution.global_key)
    assert evolution.instances[CONN]["state"] == "close"
    assert (await connections(api))[CONN]["state"] == "close"


async def test_logout_of_an_instance_that_is_not_connected_is_409(api, evolution):
    await create(api)
    evolution.instances[CONN]["state"] = "close"
    data = await call(api, "POST", "/instance/logout", 409, json={"connectionId": CONN})
    assert "not connected" in data["error"] and CONN in data["error"]
    assert evolution.requests[-1].path == f"/instance/logout/{CONN}"


# ------------------------------------------------------------------------------------------------
# DELETE /instance/delete (the complete delete)
# ------------------------------------------------------------------------------------------------

async def test_complete_delete_removes_the_connection_and_its_secrets_but_keeps_leads(
        api, evolution):
    await create(api)
    secret, token = sent_secret(evolution), sent_token(evolution)
    await api.webhook(upsert("Olá", phone="5511988887777", instance=CONN), secret=secret)
    await api.webhook(fixture("qrcode-updated"), secret=secret)

    data = await call(api, "DELETE", "/instance/delete", 200, json={"connectionId": CONN})
    assert data["ok"] is True and data["connectionId"] == CONN
    request = evolution.requests[-1]
    assert (request.method, request.path, request.apikey) == (
        "DELETE", f"/instance/delete/{CONN}", evolution.global_key)

    assert await stored_connection(api) is None
    assert await count_connections(api) == 0
    assert await connections(api) == {}
    rows = await api.db.fetchall("SELECT * FROM connections")
    assert not any(token in json.dumps(r, default=str) or secret in json.dumps(r, default=str)
                   for r in rows)
    lead, = await api.leads()
    assert lead["connection_id"] == CONN and lead["phone"] == "5511988887777"
    await call(api, "GET", "/public/get-connection", 404, headers={},
               params={"connectionId": CONN})
    # The connection's secret died with it.
    await api.webhook(upsert("De novo", phone="5511911112222", instance=CONN), expect=401,
                      secret=secret)
    # Deleting it again: nothing left to delete.
    await call(api, "DELETE", "/instance/delete", 404, json={"connectionId": CONN})


async def test_complete_delete_when_evolution_already_lost_the_instance_still_deletes(
        api, evolution):
    await create(api)
    del evolution.instances[CONN]
    data = await call(api, "DELETE", "/instance/delete", 200, json={"connectionId": CONN})
    assert data["existedOnEvolution"] is False
    assert await stored_connection(api) is None


async def test_complete_delete_when_evolution_is_down_keeps_the_connection(api, evolution):
    await create(api)
    evolution.misbehave = "html"
    await call(api, "DELETE", "/instance/delete", 502, json={"connectionId": CONN})
    assert await stored_connection(api) is not None


# ------------------------------------------------------------------------------------------------
# GET /qrcode/generate-qrcode
# ------------------------------------------------------------------------------------------------

async def test_qrcode_png_svg_and_json_encode_the_current_code(api, evolution):
    await create(api)
    code = QR["code"]
    qr = segno.make_qr(code)
    assert qr.is_micro is False
    assert isinstance(qr.version, int) and 1 <= qr.version <= 40
    assert qr.error in ("L", "M", "Q", "H")

    resp = await api.client.get("/qrcode/generate-qrcode", headers=api.auth,
                                params={"instanceId": CONN, "format": "png"})
    assert resp.status == 200
    assert resp.content_type == "image/png"
    png = await resp.read()
    assert png.startswith(PNG_SIGNATURE)
    assert png == segno_render(code, "png")
    assert png_size(png) == qr.symbol_size(scale=8, border=4)

    resp = await api.client.get("/qrcode/generate-qrcode", headers=api.auth,
                                params={"instanceId": CONN, "format": "svg"})
    assert resp.status == 200
    assert resp.content_type == "image/svg+xml"
    svg = await resp.read()
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    assert svg == segno_render(code, "svg")

    resp = await api.client.get("/qrcode/generate-qrcode", headers=api.auth,
                                params={"instanceId": CONN})  # png is the default
    assert resp.content_type == "image/png" and await resp.read() == png

    data = await call(api, "GET", "/qrcode/generate-qrcode", 200,
                      params={"instanceId": CONN, "format": "json"})
    assert set(data) >= {"code", "pairingCode", "base64", "state"}
    assert data["code"] == code
    assert data["pairingCode"] is None
    assert data["state"] == "connecting"
    assert data["base64"].startswith("data:image/png;base64,")
    embedded = base64.b64decode(data["base64"].split(",", 1)[1])
    assert embedded.startswith(PNG_SIGNATURE)
    assert data["base64"] == qr.png_data_uri(scale=6, border=4)

    assert (await call(api, "GET", "/qrcode/generate-qrcode", 400,
                       params={"instanceId": CONN, "format": "gif"}))["error"].startswith("format")
    assert (await call(api, "GET", "/qrcode/generate-qrcode", 400))["error"].startswith(
        "instanceId")
    # The QR of create-instance is fresh: Evolution was not asked again.
    assert evolution.calls("GET", "/instance/connect/") == []


async def test_qrcode_from_a_fresh_qrcode_updated_webhook_is_served_without_calling_evolution(
        api, evolution):
    await create(api)
    await age_stored_qr(api)
    envelope = fixture("qrcode-updated")
    envelope["data"]["qrcode"]["code"] = NEW_CODE
    result = await api.webhook(envelope)  # the company secret
    assert result["ok"] is True

    data = await call(api, "GET", "/qrcode/generate-qrcode", 200,
                      params={"instanceId": CONN, "format": "json"})
    assert data["code"] == NEW_CODE
    resp = await api.client.get("/qrcode/generate-qrcode", headers=api.auth,
                                params={"instanceId": CONN, "format": "png"})
    assert await resp.read() == segno_render(NEW_CODE, "png")
    assert evolution.calls("GET", "/instance/connect/") == []


async def test_qrcode_without_a_fresh_one_asks_evolution_connect(api, evolution):
    await create(api)
    await age_stored_qr(api)
    evolution.instances[CONN]["code"] = NEW_CODE
    data = await call(api, "GET", "/qrcode/generate-qrcode", 200,
                      params={"instanceId": CONN, "format": "json"})
    assert data["code"] == NEW_CODE and data["state"] == "connecting"
    request, = evolution.calls("GET", "/instance/connect/")
    assert request.path == f"/instance/connect/{CONN}"
    assert request.apikey == evolution.global_key
    # What Evolution gave is now the fresh QR: the next request does not ask again.
    resp = await api.client.get("/qrcode/generate-qrcode", headers=api.auth,
                                params={"instanceId": CONN, "format": "svg"})
    assert await resp.read() == segno_render(NEW_CODE, "svg")
    assert len(evolution.calls("GET", "/instance/connect/")) == 1


async def test_qrcode_of_a_connected_number_is_409_with_the_state(api, evolution):
    await create(api)
    evolution.open(CONN)
    await api.webhook(fixture("connection-update-open"), secret=sent_secret(evolution))
    for fmt in ("png", "svg", "json"):
        data = await call(api, "GET", "/qrcode/generate-qrcode", 409,
                          params={"instanceId": CONN, "format": fmt})
        assert data["state"] == "open"
        assert "already connected" in data["error"]
        assert data["phone"] == OWNER
    assert evolution.calls("GET", "/instance/connect/")[-1].path == f"/instance/connect/{CONN}"


async def test_qrcode_when_evolution_is_unreachable_is_502(api, evolution):
    await create(api)
    await age_stored_qr(api)
    evolution.misbehave, evolution.delay = "slow", 5
    data = await call(api, "GET", "/qrcode/generate-qrcode", 502,
                      params={"instanceId": CONN, "format": "png"})
    assert "did not answer" in data["error"]


async def test_qrcode_with_a_signed_link_needs_no_token(api, evolution):
    await create(api)
    link = await make_link(api)
    query = link_query(link["url"])
    assert set(query) == {"c", "exp", "sig"}
    params = {"instanceId": CONN, "format": "json", **query}

    data = await call(api, "GET", "/qrcode/generate-qrcode", 200, headers={}, params=params)
    assert data["code"] == QR["code"]
    resp = await api.client.get("/qrcode/generate-qrcode", params={**params, "format": "png"})
    assert resp.status == 200 and (await resp.read()).startswith(PNG_SIGNATURE)

    bad = [{**params, "sig": tampered(query["sig"])}, {**params, "sig": ""},
           {**params, "exp": str(int(query["exp"]) + 1000)}, {**params, "c": "empresa-456"},
           {**params, "exp": "soon"}]
    for attempt in bad:
        assert await call(api, "GET", "/qrcode/generate-qrcode", 401, headers={},
                          params=attempt) == {"error": "This link is not valid"}, attempt

    # Odd expiry values are a bad link, not a crash.
    for exp in ("\u00b2", "\u0661\u0662", "9" * 5000, "-5", " 5"):
        assert await call(api, "GET", "/qrcode/generate-qrcode", 401, headers={},
                          params={**params, "exp": exp}) == {"error": "This link is not valid"}
        resp = await api.client.get(f"/connect/{CONN}", params={**query, "exp": exp},
                                    headers={"Accept": "text/html"})
        assert resp.status == 401, exp

    # A link made for one connection does not open another of the same company.
    await create(api, "loja-2")
    await call(api, "GET", "/qrcode/generate-qrcode", 401, headers={},
               params={**params, "instanceId": "loja-2"})

    # An expired link, signed with the company's real key.
    exp = int(time.time()) - 5
    sig = whatstracking.link_signature(await signing_key(api), api.company_id, CONN, exp)
    data = await call(api, "GET", "/qrcode/generate-qrcode", 410, headers={},
                      params={**params, "exp": str(exp), "sig": sig})
    assert "expired" in data["error"]


# ------------------------------------------------------------------------------------------------
# POST /api/connection-link and GET /connect/{connectionId}
# ------------------------------------------------------------------------------------------------

async def test_connection_link_is_a_signed_expiring_url(api, evolution):
    await create(api)
    started = time.time()
    link = await make_link(api, ttl=3600)
    assert link["connectionId"] == CONN
    url = urllib.parse.urlsplit(link["url"])
    assert f"{url.scheme}://{url.netloc}" == "http://wt.test"
    assert url.path == f"/connect/{CONN}"
    query = link_query(link["url"])
    assert query["c"] == "empresa-123"
    expires = datetime.fromisoformat(link["expires_at"].replace("Z", "+00:00")).timestamp()
    assert int(query["exp"]) == int(expires)
    assert started + 3600 - 5 <= expires <= time.time() + 3600 + 5
    # Secrets are not in the link.
    row = await stored_connection(api)
    for secret in (api.token, api.webhook_secret, row["instance_token"], sent_secret(evolution),
                   await signing_key(api)):
        assert secret not in link["url"]

    for ttl in (59, 30 * 86400 + 1, 0, -60, "3600", True, 1.5, None):
        data = await call(api, "POST", "/api/connection-link", 400,
                          json={"connectionId": CONN, "ttl": ttl})
        assert "ttl" in data["error"], ttl
    assert (await call(api, "POST", "/api/connection-link", 201,
                       json={"connectionId": CONN, "ttl": 30 * 86400}))["url"]
    await call(api, "POST", "/api/connection-link", 404,
               json={"connectionId": "loja-nenhuma", "ttl": 3600})
    await call(api, "POST", "/api/connection-link", 400, json={"ttl": 3600})


async def test_connect_page_of_a_link_is_html_with_its_qr_url(api, evolution):
    await create(api)
    link = await make_link(api)
    url = urllib.parse.urlsplit(link["url"])
    resp = await api.client.get(f"{url.path}?{url.query}", headers={"Accept": "text/html"})
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert resp.headers["X-Frame-Options"] == "DENY"
    policy = dict(part.strip().split(" ", 1) for part in
                  resp.headers["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["frame-ancestors"] == "'none'"
    assert policy["connect-src"] == "'self'" and policy["img-src"] == "data:"
    page = await resp.text()
    # Only the page's own script runs: its hash is the only script source, and it is its script.
    script = re.search(r"<script>(.*)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert policy["script-src"] == f"'sha256-{digest}'"
    assert "<!doctype html>" in page.lower()
    assert "/qrcode/generate-qrcode?" in page
    assert "instanceId=loja-centro" in page and "format=json" in page
    assert api.token not in page and api.webhook_secret not in page


async def test_connect_page_of_a_tampered_or_expired_link_says_so(api, evolution):
    await create(api)
    link = await make_link(api)
    query = link_query(link["url"])
    path = f"/connect/{CONN}"
    # (In English: a browser without Accept-Language gets the page in pt-BR.)
    html_accept = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
                   "Accept-Language": "en-US,en;q=0.9"}

    bad_query = {**query, "sig": tampered(query["sig"])}
    resp = await api.client.get(path, params=bad_query, headers=html_accept)
    assert resp.status == 401
    assert resp.content_type == "text/html"
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert "script-src" not in resp.headers["Content-Security-Policy"]  # none: default-src 'none'
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert "This link is not valid" in await resp.text()
    resp = await api.client.get(path, params=bad_query, headers={"Accept": "application/json"})
    assert resp.status == 401
    assert await resp.json() == {"error": "This link is not valid"}
    resp = await api.client.get(path, headers=html_accept)  # no signature at all
    assert resp.status == 401

    exp = int(time.time()) - 60
    sig = whatstracking.link_signature(await signing_key(api), api.company_id, CONN, exp)
    expired = {**query, "exp": str(exp), "sig": sig}
    resp = await api.client.get(path, params=expired, headers=html_accept)
    assert resp.status == 410
    assert resp.content_type == "text/html"
    text = await resp.text()
    assert "expired" in text and "<h1>" in text
    resp = await api.client.get(path, params=expired, headers={"Accept": "application/json"})
    assert resp.status == 410
    data = await resp.json()
    assert "expired" in data["error"]


async def test_connect_page_of_a_deleted_connection_is_404(api, evolution):
    await create(api)
    link = await make_link(api)
    await call(api, "DELETE", "/instance/delete", 200, json={"connectionId": CONN})
    url = urllib.parse.urlsplit(link["url"])
    resp = await api.client.get(f"{url.path}?{url.query}", headers={"Accept": "application/json"})
    assert resp.status == 404
    assert await resp.json() == {"error": "Connection not found"}


# ------------------------------------------------------------------------------------------------
# GET /public/get-connection
# ------------------------------------------------------------------------------------------------

async def test_public_connection_shows_a_masked_phone_and_no_secrets(api, evolution):
    await create(api)
    row = await stored_connection(api)
    secrets = [row["instance_token"], sent_secret(evolution), row["qr_code"], api.token,
               api.webhook_secret]

    resp = await api.client.get("/public/get-connection", params={"connectionId": CONN})
    text = await resp.text()
    assert resp.status == 200, text
    data = json.loads(text)
    assert data["connectionId"] == CONN
    assert data["company"] == "Empresa Teste"
    assert data["state"] == "connecting"
    assert data["phone"] is None
    for secret in secrets:
        assert secret not in text

    await api.webhook(fixture("connection-update-open"), secret=sent_secret(evolution))
    resp = await api.client.get("/public/get-connection", params={"connectionId": CONN})
    text = await resp.text()
    assert resp.status == 200, text
    data = json.loads(text)
    assert data["state"] == "open"
    assert data["profileName"] == "Loja Centro"
    assert OWNER not in text
    assert data["phone"] != OWNER and data["phone"].endswith("1111") and "*" in data["phone"]
    assert data["phone"].startswith("55")
    for secret in secrets:
        assert secret not in text

    resp = await api.client.get("/public/get-connection", params={"connectionId": "nenhuma"})
    assert resp.status == 404
    assert await resp.json() == {"error": "Connection not found"}
    resp = await api.client.get("/public/get-connection")
    assert resp.status == 400


# ------------------------------------------------------------------------------------------------
# connection.update keeps the connection current
# ------------------------------------------------------------------------------------------------

async def test_connection_update_webhooks_keep_state_number_and_profile_current(api, evolution):
    await create(api)
    secret = sent_secret(evolution)
    result = await api.webhook(fixture("connection-update-open"), secret=secret)
    assert result["ok"] is True
    listed = (await connections(api))[CONN]
    assert listed["state"] == "open"
    assert listed["phone"] == OWNER
    assert listed["profileName"] == "Loja Centro"
    assert listed["pictureUrl"] == fixture("connection-update-open")["data"]["profilePictureUrl"]
    assert (await stored_connection(api))["qr_code"] is None  # a QR is useless once connected

    await api.webhook(fixture("connection-update-close"), secret=secret)
    listed = (await connections(api))[CONN]
    assert listed["state"] == "close"
    assert listed["phone"] == OWNER and listed["profileName"] == "Loja Centro"
    assert evolution.requests[1:] == []  # webhooks alone, no Evolution call


# ------------------------------------------------------------------------------------------------
# POST /webhook-ingest
# ------------------------------------------------------------------------------------------------

async def deliveries(api: Api) -> list[dict]:
    return await api.db.fetchall("SELECT * FROM webhook_deliveries ORDER BY id")


async def test_webhook_ingest_needs_the_shared_token(api):
    payload = {"event": "lead.created", "data": {"x": 1}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Webhook-Token": "wrong"},
                    {"Authorization": f"Bearer {api.token}"},
                    {"X-Webhook-Token": api.webhook_secret}):
        resp = await api.client.post("/webhook-ingest", json=payload, headers=headers)
        assert resp.status == 401, headers
        assert await resp.json() == {"error": "Unauthorized"}
    assert await deliveries(api) == []


async def test_webhook_ingest_is_closed_when_no_shared_token_is_configured(
        aiohttp_client, make_config):
    client = await aiohttp_client(whatstracking.create_app(make_config()))
    for headers in ({}, {"Authorization": "Bearer "}, {"X-Webhook-Token": ""},
                    {"X-Webhook-Token": "anything"}):
        resp = await client.post("/webhook-ingest", json={"a": 1}, headers=headers)
        assert resp.status == 401, headers


async def test_webhook_ingest_stores_the_payload_and_logs_one_line(api, caplog):
    caplog.set_level(logging.INFO, logger="whatstracking")
    raw = json.dumps({"event": "deal.won", "data": {"value": 100, "text": "ção"}},
                     ensure_ascii=False).encode()

    resp = await api.client.post("/webhook-ingest", data=raw, headers={
        "Authorization": f"Bearer {INGEST_TOKEN}", "Content-Type": "application/json"})
    data = await resp.json()
    assert resp.status == 202, data
    assert data["ok"] is True and isinstance(data["id"], int)
    first_id = data["id"]

    resp = await api.client.post("/webhook-ingest", params={"source": "n8n"}, json=[1, 2, 3],
                                 headers={"X-Webhook-Token": INGEST_TOKEN})
    data = await resp.json()
    assert resp.status == 202, data
    second_id = data["id"]
    assert second_id != first_id

    first, second = await deliveries(api)
    assert first["id"] == first_id and second["id"] == second_id
    assert bytes(first["body"]) == raw
    assert json.loads(bytes(second["body"])) == [1, 2, 3]
    assert first["source"] == "ingest" and second["source"] == "n8n"
    assert first["company_id"] is None
    assert first["event"] == "deal.won"
    assert json.loads(first["headers"])["Content-Type"] == "application/json"
    assert INGEST_TOKEN not in first["headers"]

    lines = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "webhook_ingest"]
    assert len(lines) == 2
    assert [r.fields["delivery_id"] for r in lines] == [first_id, second_id]
    assert lines[0].fields["source"] == "ingest" and lines[1].fields["source"] == "n8n"
    formatted = json.loads(whatstracking.JsonLogFormatter().format(lines[0]))
    assert formatted["event"] == "webhook_ingest" and formatted["delivery_id"] == first_id
    assert INGEST_TOKEN not in json.dumps(formatted)


async def test_webhook_ingest_processes_an_evolution_envelope_for_a_company(api):
    envelope = upsert("Oi, vim pelo Instagram", phone="5511955554444", instance=CONN)
    resp = await api.client.post("/webhook-ingest", params={"company_id": "empresa-123"},
                                 json=envelope, headers={"X-Webhook-Token": INGEST_TOKEN})
    data = await resp.json()
    assert resp.status == 202, data
    lead, = await api.leads()
    assert lead["phone"] == "5511955554444"
    assert lead["connection_id"] == CONN
    delivery, = await deliveries(api)
    assert delivery["id"] == data["id"]
    assert delivery["company_id"] == "empresa-123"
    assert delivery["status"] == "processed"
    # The same delivery again has no second effect.
    resp = await api.client.post("/webhook-ingest", params={"company_id": "empresa-123"},
                                 json=envelope, headers={"X-Webhook-Token": INGEST_TOKEN})
    assert resp.status == 202
    assert len(await api.leads()) == 1


async def test_webhook_ingest_rejects_an_unknown_company_and_invalid_json(api):
    token = {"Authorization": f"Bearer {INGEST_TOKEN}"}
    resp = await api.client.post("/webhook-ingest", params={"company_id": "nenhuma"},
                                 json=upsert("Oi"), headers=token)
    assert resp.status == 404
    assert await resp.json() == {"error": "Company not found"}
    resp = await api.client.post("/webhook-ingest", data=b"{not json", headers={
        **token, "Content-Type": "application/json"})
    assert resp.status == 400
    assert "JSON" in (await resp.json())["error"]
    assert await deliveries(api) == []
    assert await api.leads() == []
