"""Tenancy of connections (issue 13 §1, security.md D1) and inbound secrets stored hashed (D9), on
SQLite and Postgres, against the fake Evolution API (tests/fake_evolution.py).

A connection a company created (`/api/create-instance`) or adopted (`POST /api/connections`) is
*verified* and can be managed. One known only from deliveries to the company's own webhook keeps
recording messages and leads for that company, but is *unverified*: no management, QR, link,
`/connect` or public page for it, it never blocks another company and is never shown to anyone
else.
"""

from __future__ import annotations

import json
import time
import urllib.parse

import pytest

import whatstracking
from conftest import ADMIN_TOKEN, Api, create_company, fixture, storage_at, upsert
from fake_evolution import FakeEvolution, closed_port_url, response
# The server with the fake Evolution as its default, and the helpers, of the connection tests.
from test_connections import (  # noqa: F401 - client, server_env: fixtures (evolution: conftest)
    EVENTS, OWNER, call, client, connections, create, link_query, make_link, sent_secret,
    server_env, signing_key, stored_connection)
from whatstracking import hash_token

ACME_CONN = "acme-conn"


async def company(client, company_id: str, name: str) -> Api:
    return Api(client, await create_company(client, company_id, name=name))


@pytest.fixture
async def acme(client) -> Api:
    return await company(client, "acme", "Acme")


@pytest.fixture
async def other(client) -> Api:
    return await company(client, "other", "Other Ltd")


async def adopt(api: Api, connection_id: str, expect: int = 201, **body) -> dict:
    return await call(api, "POST", "/api/connections", expect,
                      json={"type": "evolution", "connectionId": connection_id, "adopt": True,
                            **body})


async def use_server(api: Api, server: FakeEvolution) -> None:
    """The company's own Evolution server (not the shared default)."""
    await call(api, "PATCH", "/api/company", 200,
               json={"evolution_url": server.url, "evolution_key": server.global_key})


def state_envelope(instance: str, state: str = "open") -> dict:
    envelope = fixture(f"connection-update-{state}")
    envelope["instance"] = instance
    return envelope


def qr_envelope(instance: str) -> dict:
    envelope = fixture("qrcode-updated")
    envelope["instance"] = instance
    return envelope


MANAGEMENT = (("GET", "/api/instance-status"), ("DELETE", "/api/delete-instance"),
              ("DELETE", "/instance/delete"), ("POST", "/instance/restart"),
              ("POST", "/instance/logout"), ("POST", "/api/connection-link"))


async def assert_not_manageable(api: Api, evolution: FakeEvolution, connection_id: str) -> None:
    """Every management route, the QR and a link answer 404 for this company, and none of them
    reaches Evolution."""
    before = len(evolution.requests)
    for method, path in MANAGEMENT:
        kwargs = ({"params": {"connectionId": connection_id}} if method == "GET"
                  else {"json": {"connectionId": connection_id}})
        assert await call(api, method, path, 404, **kwargs) == {
            "error": "Connection not found"}, (method, path)
    for fmt in ("png", "svg", "json"):
        assert await call(api, "GET", "/qrcode/generate-qrcode", 404,
                          params={"instanceId": connection_id, "format": fmt}) == {
            "error": "Connection not found"}
    assert len(evolution.requests) == before


async def forged_link_query(api: Api, connection_id: str) -> dict:
    """A link for `connection_id` signed with the company's real key, as if the route had made
    one (the key exists once the company made a link for a connection of its own)."""
    exp = int(time.time()) + 3600
    sig = whatstracking.link_signature(await signing_key(api), api.company_id, connection_id, exp)
    return {"c": api.company_id, "exp": str(exp), "sig": sig}


# ------------------------------------------------------------------------------------------------
# security.md D1: the takeover and squat sequences
# ------------------------------------------------------------------------------------------------

async def test_another_company_naming_an_instance_in_its_own_webhook_cannot_take_it_over(
        acme, other, evolution):
    await create(acme, ACME_CONN)
    evolution.open(ACME_CONN)
    await acme.webhook(state_envelope(ACME_CONN), secret=sent_secret(evolution))

    # `other` posts acme's instance name to its own webhook, with its own secret: accepted (its
    # secret proves the delivery is its own), recorded for `other` only.
    answer = await other.webhook({"event": "connection.update", "instance": ACME_CONN,
                                  "data": {"state": "close"}})
    assert answer["ok"] is True and answer["state"] == "close"
    listed = (await connections(other))[ACME_CONN]
    assert listed["verified"] is False and listed["companyId"] == "other"

    await assert_not_manageable(other, evolution, ACME_CONN)
    # Not even with a link signed by other's own key.
    await create(other, "other-conn")
    await make_link(other, "other-conn")
    query = await forged_link_query(other, ACME_CONN)
    resp = await other.client.get(f"/connect/{ACME_CONN}", params=query,
                                  headers={"Accept": "application/json"})
    assert (resp.status, await resp.json()) == (404, {"error": "Connection not found"})
    resp = await other.client.get(f"/connect/{ACME_CONN}", params=query,
                                  headers={"Accept": "text/html", "Accept-Language": "en"})
    assert resp.status == 404 and "Connection not found" in await resp.text()
    assert await call(other, "GET", "/qrcode/generate-qrcode", 404, headers={},
                      params={"instanceId": ACME_CONN, "format": "json", **query}) == {
        "error": "Connection not found"}
    # The admin token acting for `other` is no better.
    await call(other, "POST", "/instance/logout", 404,
               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
               json={"connectionId": ACME_CONN, "company_id": "other"})

    # Acme's instance is untouched on Evolution, and still acme's everywhere.
    assert evolution.instances[ACME_CONN]["state"] == "open"
    assert not [r for r in evolution.requests if r.method == "DELETE"]
    public = await call(acme, "GET", "/public/get-connection", 200, headers={},
                        params={"connectionId": ACME_CONN})
    assert public["company"] == "Acme" and public["state"] == "open"
    status = await call(acme, "GET", "/api/instance-status", 200,
                        params={"connectionId": ACME_CONN})
    assert status["companyId"] == "acme" and status["phone"] == OWNER
    assert (await connections(acme))[ACME_CONN]["verified"] is True


async def test_a_name_squatted_through_a_webhook_blocks_nobody_and_shows_nowhere(
        acme, other, evolution):
    squatted = "loja-acme-2"
    await other.webhook(state_envelope(squatted))
    await other.webhook(qr_envelope(squatted))
    assert (await connections(other))[squatted]["verified"] is False
    # Never shown to anyone: not even the squatter's own connection is public.
    await call(acme, "GET", "/public/get-connection", 404, headers={},
               params={"connectionId": squatted})

    # Acme's create-instance is not blocked.
    created = await create(acme, squatted)
    assert created["connection"]["companyId"] == "acme" and created["connection"]["verified"]
    public = await call(acme, "GET", "/public/get-connection", 200, headers={},
                        params={"connectionId": squatted})
    assert public["company"] == "Acme"
    assert "Other" not in json.dumps(public)

    # The squatter's row stays its own record, and it cannot drive acme's new instance.
    assert (await connections(other))[squatted]["verified"] is False
    await assert_not_manageable(other, evolution, squatted)
    assert squatted in evolution.instances
    # Nor adopt it: acme verified it on the same (shared) server.
    before = len(evolution.requests)
    token = evolution.instances[squatted]["token"]
    assert await adopt(other, squatted, 404, instance_token=token) == {
        "error": "Connection not found"}
    assert len(evolution.requests) == before
    # Acme manages it.
    link = await make_link(acme, squatted)
    assert link_query(link["url"])["c"] == "acme"
    resp = await acme.client.get(urllib.parse.urlsplit(link["url"]).path,
                                 params=link_query(link["url"]), headers={"Accept": "text/html"})
    assert resp.status == 200


async def test_create_instance_of_a_name_known_only_from_own_webhooks_makes_it_verified(
        acme, evolution):
    await acme.webhook(upsert("Oi", phone="5511933332222", instance=ACME_CONN))
    assert (await connections(acme))[ACME_CONN]["verified"] is False
    await assert_not_manageable(acme, evolution, ACME_CONN)
    created = await create(acme, ACME_CONN)
    assert created["connection"]["verified"] is True
    evolution.open(ACME_CONN)
    await call(acme, "GET", "/api/instance-status", 200, params={"connectionId": ACME_CONN})
    lead, = await acme.leads()
    assert lead["connection_id"] == ACME_CONN


async def test_a_verified_name_still_blocks_another_companys_create(acme, other, evolution):
    await create(acme, ACME_CONN)
    before = len(evolution.requests)
    data = await create(other, ACME_CONN, expect=409)
    assert ACME_CONN in data["error"]
    assert len(evolution.requests) == before


async def test_a_name_taken_by_another_company_meanwhile_is_409_not_500(acme, other, evolution,
                                                                      monkeypatch):
    """Two companies on different servers creating one name at the same moment: both pass the
    check before calling Evolution; the second to store gets 409 (one manager per name)."""
    own = await FakeEvolution(global_key="other-key").start()
    try:
        await use_server(other, own)
        await create(other, ACME_CONN)
        await acme.webhook(state_envelope(ACME_CONN))  # acme's own record of the name
        checked = []

        async def nobody(db, connection_id):  # as if checked just before `other` stored it
            checked.append(connection_id)
            return None

        monkeypatch.setattr(whatstracking, "verified_holder", nobody)
        data = await create(acme, ACME_CONN, expect=409)
        assert ACME_CONN in data["error"] and checked == [ACME_CONN]
        kept = await stored_connection(acme, ACME_CONN)  # untouched
        assert (kept["verified"], kept["state"], kept["phone"]) == (0, "open", OWNER)
        assert (await connections(other))[ACME_CONN]["verified"] is True
    finally:
        await own.close()


async def test_a_soft_deleted_connection_cannot_delete_the_instance_another_company_made_since(
        acme, other, evolution):
    await create(acme, ACME_CONN)
    await call(acme, "DELETE", "/api/delete-instance", 200, params={"connectionId": ACME_CONN})
    await create(other, ACME_CONN)  # the name is free again: other makes its own instance
    before = len(evolution.requests)
    for method, path in (("DELETE", "/api/delete-instance"), ("DELETE", "/instance/delete")):
        await call(acme, method, path, 404, params={"connectionId": ACME_CONN},
                   json={"connectionId": ACME_CONN})
    assert len(evolution.requests) == before
    assert ACME_CONN in evolution.instances


# ------------------------------------------------------------------------------------------------
# Existing set-ups: connections known only from webhooks keep recording
# ------------------------------------------------------------------------------------------------

async def test_a_webhook_only_connection_keeps_recording_state_messages_and_leads(acme, evolution):
    await acme.webhook(state_envelope(ACME_CONN))
    first = await acme.webhook(upsert("Oi, vim do anúncio", phone="5511911110000",
                                      instance=ACME_CONN))
    assert first["lead_id"] and first["match"] == "none"
    second = await acme.webhook(upsert("Oi", phone="5511922220000", instance=ACME_CONN))
    assert second["lead_id"]
    assert {lead["phone"] for lead in await acme.leads()} == {"5511911110000", "5511922220000"}
    listed = (await connections(acme))[ACME_CONN]
    assert (listed["state"], listed["phone"], listed["verified"]) == ("open", OWNER, False)
    assert evolution.requests == []


async def test_the_webhook_hot_path_reads_no_more_for_the_verified_flag(acme, monkeypatch):
    """A delivery for an instance heard from before costs the same statements as before the
    flag existed: the connection's row is read once, with the rest of its columns."""
    await acme.webhook(upsert("Oi", phone="5511944440000", instance=ACME_CONN))
    seen: list[str] = []
    for cls in (whatstracking.SqliteTx, whatstracking.PostgresTx):
        for name in ("fetchone", "fetchall", "execute"):
            original = getattr(cls, name)

            def spy(self, sql, *args, _original=original):
                seen.append(sql)
                return _original(self, sql, *args)

            monkeypatch.setattr(cls, name, spy)
    await acme.webhook(upsert("Tudo bem?", phone="5511944440000", instance=ACME_CONN))
    assert [s for s in seen if "verified" in s] == []
    assert len([s for s in seen if "FROM connections" in s]) == 1


# ------------------------------------------------------------------------------------------------
# Adoption: POST /api/connections {"type": "evolution", "connectionId", "adopt": true}
# ------------------------------------------------------------------------------------------------

async def test_adopting_an_instance_on_the_companys_own_server_sets_its_webhook(
        acme, evolution):
    own = await FakeEvolution(global_key="acme-own-key").start()
    try:
        await use_server(acme, own)
        made = own.add_instance(ACME_CONN)
        own.open(ACME_CONN)
        # Delivered before adoption with the company secret: an unverified connection.
        await acme.webhook(upsert("Oi", phone="5511955550000", instance=ACME_CONN))

        data = await adopt(acme, ACME_CONN)
        connection = data["connection"]
        assert data["ok"] is True
        assert connection["verified"] is True and connection["companyId"] == "acme"
        assert (connection["state"], connection["phone"], connection["profileName"]) == (
            "open", OWNER, "Loja Centro")
        assert connection["instanceId"] == made["id"]

        fetch, webhook_set = own.requests
        assert (fetch.method, fetch.path, fetch.query, fetch.apikey) == (
            "GET", "/instance/fetchInstances", {"instanceName": ACME_CONN}, "acme-own-key")
        assert (webhook_set.method, webhook_set.path, webhook_set.apikey) == (
            "POST", f"/webhook/set/{ACME_CONN}", "acme-own-key")
        secret = webhook_set.json["webhook"]["headers"]["x-webhook-secret"]
        assert webhook_set.json == {"webhook": {
            "enabled": True, "url": "http://wt.test/webhook/acme", "byEvents": False,
            "base64": False, "headers": {"x-webhook-secret": secret}, "events": EVENTS}}
        assert secret.startswith("whc_") and secret != acme.webhook_secret
        row = own.instances[ACME_CONN]["webhook"]  # what Evolution now delivers with
        assert (row["url"], row["headers"], row["enabled"], row["events"]) == (
            "http://wt.test/webhook/acme", {"x-webhook-secret": secret}, True, EVENTS)
        assert evolution.requests == []  # the shared server was not asked

        stored = await stored_connection(acme, ACME_CONN)
        assert stored["webhook_secret"] == hash_token(secret)
        assert stored["instance_token"] == made["token"]
        # Evolution's deliveries carry the header: accepted, with the history kept.
        answer = await acme.webhook(upsert("De novo", phone="5511966660000",
                                           instance=ACME_CONN), secret=secret)
        assert answer["lead_id"]
        assert len(await acme.leads()) == 2
        # Envelope apikey = the instance token (from fetchInstances) authenticates too.
        envelope = upsert("Olá", phone="5511977770000", instance=ACME_CONN)
        envelope["apikey"] = made["token"]
        assert (await acme.webhook(envelope, secret=None))["lead_id"]
        # Now it is managed.
        status = await call(acme, "GET", "/api/instance-status", 200,
                            params={"connectionId": ACME_CONN})
        assert status["state"] == "open"
        await make_link(acme, ACME_CONN)
    finally:
        await own.close()


async def test_adopting_on_the_shared_server_needs_the_instances_own_token(acme, other,
                                                                           evolution):
    made = evolution.add_instance(ACME_CONN, state="open")
    await acme.webhook(state_envelope(ACME_CONN))
    await other.webhook(state_envelope(ACME_CONN))  # a squatter's row blocks nothing

    data = await adopt(acme, ACME_CONN, 403)
    assert "instance_token" in data["error"]
    assert evolution.requests == []

    data = await adopt(acme, ACME_CONN, 403, instance_token="00000000-WRONG")
    assert "instance_token" in data["error"]
    assert [r.path for r in evolution.requests] == ["/instance/fetchInstances"]
    assert evolution.instances[ACME_CONN]["webhook"] is None
    assert (await connections(acme))[ACME_CONN]["verified"] is False

    data = await adopt(acme, ACME_CONN, instance_token=made["token"])
    assert data["connection"]["verified"] is True
    webhook_set = evolution.requests[-1]
    assert (webhook_set.path, webhook_set.apikey) == (f"/webhook/set/{ACME_CONN}",
                                                      evolution.global_key)
    assert evolution.instances[ACME_CONN]["webhook"]["url"] == "http://wt.test/webhook/acme"
    public = await call(acme, "GET", "/public/get-connection", 200, headers={},
                        params={"connectionId": ACME_CONN})
    assert public["company"] == "Acme"
    assert (await connections(other))[ACME_CONN]["verified"] is False
    await assert_not_manageable(other, evolution, ACME_CONN)


async def test_an_instance_another_company_verified_on_the_same_server_is_never_adopted(
        acme, other, evolution):
    await create(acme, ACME_CONN)
    token = evolution.instances[ACME_CONN]["token"]
    before = len(evolution.requests)
    for body in ({"instance_token": token}, {"instance_token": "x"}):
        assert await adopt(other, ACME_CONN, 404, **body) == {"error": "Connection not found"}
    # Same answer as an instance that does not exist at all.
    assert await adopt(other, "nao-existe", 404, instance_token="x") == {
        "error": "Connection not found"}
    assert len(evolution.requests) == before + 1  # only the lookup of the missing one
    assert evolution.instances[ACME_CONN]["webhook"]["url"] == "http://wt.test/webhook/acme"

    # The same with both companies on one server of their own.
    own = await FakeEvolution(global_key="agency-key").start()
    try:
        await use_server(acme, own)
        await use_server(other, own)
        await create(acme, "loja-agencia")
        assert await adopt(other, "loja-agencia", 404) == {"error": "Connection not found"}
        assert [r.path for r in own.requests] == ["/instance/create"]
        # A server of its own that has an instance of that name: the name is taken here.
        third = await FakeEvolution(global_key="third-key").start()
        try:
            await use_server(other, third)
            third.add_instance("loja-agencia")
            data = await adopt(other, "loja-agencia", 409)
            assert "loja-agencia" in data["error"]
            assert third.requests == []
        finally:
            await third.close()
    finally:
        await own.close()


async def test_adoption_when_evolution_has_no_such_instance_refuses_the_key_or_is_down(
        acme, evolution):
    data = await adopt(acme, "nao-existe", 404, instance_token="x")
    assert data == {"error": "Connection not found"}
    request, = evolution.requests
    assert request.query == {"instanceName": "nao-existe"}

    await call(acme, "PATCH", "/api/company", 200,
               json={"evolution_url": evolution.url, "evolution_key": "wrong-key"})
    evolution.add_instance(ACME_CONN)
    data = await adopt(acme, ACME_CONN, 502, instance_token="x")
    assert "key" in data["error"] and "401" in data["error"]

    await call(acme, "PATCH", "/api/company", 200,
               json={"evolution_url": closed_port_url(), "evolution_key": "k"})
    data = await adopt(acme, ACME_CONN, 502)
    assert "unreachable" in data["error"]

    own = await FakeEvolution(global_key="k").start()
    try:
        await use_server(acme, own)
        own.add_instance(ACME_CONN)
        own.misbehave = "html"
        # A company's own server: an HTML answer reads like a closed port (no port-scan oracle).
        assert "unreachable" in (await adopt(acme, ACME_CONN, 502))["error"]
        own.misbehave = None
        # The lookup works, setting the webhook fails: nothing is registered.
        own.override("POST", f"/webhook/set/{ACME_CONN}", 400,
                     response("webhook-set-validation-error"))
        data = await adopt(acme, ACME_CONN, 502)
        assert "webhook" in data["error"]
        assert await connections(acme) == {}
        await acme.webhook(state_envelope(ACME_CONN))
        own.override("POST", f"/webhook/set/{ACME_CONN}", 500, {
            "status": 500, "error": "Internal Server Error", "response": {"message": "boom"}})
        await adopt(acme, ACME_CONN, 502)
        assert (await connections(acme))[ACME_CONN]["verified"] is False
    finally:
        await own.close()


async def test_adoption_validates_its_body(acme, evolution):
    good = {"type": "evolution", "connectionId": ACME_CONN, "adopt": True, "instance_token": "t"}
    for field, value in (("type", None), ("type", "telegram"), ("adopt", None), ("adopt", False),
                         ("adopt", "true"), ("connectionId", None), ("connectionId", "a b"),
                         ("connectionId", "a" * 65), ("instance_token", 5),
                         ("instance_token", ""), ("instance_token", "x" * 257)):
        body = {**good, field: value} if value is not None else {
            k: v for k, v in good.items() if k != field}
        data = await call(acme, "POST", "/api/connections", 400, json=body)
        assert field in data["error"], (field, value, data)
    await call(acme, "POST", "/api/connections", 400, json=[good])
    await call(acme, "POST", "/api/connections", 401, headers={}, json=good)
    assert evolution.requests == []


async def test_the_admin_token_adopts_for_the_company_it_names(acme, evolution):
    made = evolution.add_instance(ACME_CONN)
    data = await call(acme, "POST", "/api/connections", 201,
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                      json={"type": "evolution", "connectionId": ACME_CONN, "adopt": True,
                            "instance_token": made["token"], "company_id": "acme"})
    assert data["connection"]["companyId"] == "acme" and data["connection"]["verified"]


async def test_adopting_a_connection_again_gives_it_a_new_secret(acme, evolution):
    await create(acme, ACME_CONN)
    old = sent_secret(evolution)
    await adopt(acme, ACME_CONN, instance_token=evolution.instances[ACME_CONN]["token"])
    new = evolution.requests[-1].json["webhook"]["headers"]["x-webhook-secret"]
    assert new != old
    await acme.webhook(state_envelope(ACME_CONN), secret=old, expect=401)
    await acme.webhook(state_envelope(ACME_CONN), secret=new)


# ------------------------------------------------------------------------------------------------
# Inbound secrets are stored hashed and shown once (D9)
# ------------------------------------------------------------------------------------------------

async def test_the_company_webhook_secret_is_stored_as_its_hash_and_shown_only_when_made(acme):
    secret = acme.webhook_secret
    row = await acme.db.fetchone("SELECT webhook_secret FROM companies WHERE id = 'acme'")
    assert row["webhook_secret"] == hash_token(secret) != secret
    shown = await call(acme, "GET", "/api/company", 200)
    assert secret not in json.dumps(shown) and hash_token(secret) not in json.dumps(shown)

    rotated = (await call(acme, "PATCH", "/api/company", 200,
                          json={"rotate_webhook_secret": True}))["webhook_secret"]
    row = await acme.db.fetchone("SELECT webhook_secret FROM companies WHERE id = 'acme'")
    assert row["webhook_secret"] == hash_token(rotated)
    await acme.webhook(upsert("Oi"), secret=rotated)
    await acme.webhook(upsert("Oi"), secret=hash_token(rotated), expect=401)  # not the hash
    # Other changes keep it.
    await call(acme, "PATCH", "/api/company", 200, json={"name": "Acme SA"})
    await acme.webhook(upsert("Oi de novo"), secret=rotated)


async def test_a_connection_secret_is_stored_as_its_hash(acme, evolution):
    await create(acme, ACME_CONN)
    secret = sent_secret(evolution)
    stored = await stored_connection(acme, ACME_CONN)
    assert stored["webhook_secret"] == hash_token(secret)
    await acme.webhook(state_envelope(ACME_CONN), secret=stored["webhook_secret"], expect=401)
    await acme.webhook(state_envelope(ACME_CONN), secret=secret)
    # The secret of acme's connection is acme's only, per (company, connection).
    other = await company(acme.client, "other", "Other Ltd")
    await other.webhook(state_envelope(ACME_CONN), secret=secret, expect=401)


async def test_migration_6_hashes_clear_secrets_and_verifies_created_connections(database_url):
    """A database of version 5 with secrets in clear: after migration 6 the same secrets still
    authenticate, nothing is stored in clear, and only connections create-instance made (the
    ones with an instance token) are verified, the earlier one where two companies made one."""
    before = [m for m in whatstracking.MIGRATIONS if m[0] <= 5]
    storage = whatstracking.Storage.from_url(database_url)
    await storage.connect()
    try:
        original = whatstracking.MIGRATIONS
        whatstracking.MIGRATIONS = before
        try:
            await storage.migrate()
        finally:
            whatstracking.MIGRATIONS = original

        async def seed(tx):
            for n, cid in enumerate(("acme", "other")):
                await tx.execute("INSERT INTO companies (id, name, webhook_secret, created_at, "
                                 "updated_at) VALUES (?, ?, ?, ?, ?)", cid, cid,
                                 f"whs_clear-{cid}", float(n), float(n))
            rows = [("acme", "made", "tok-1", "whc_made", 1.0, None),
                    ("acme", "heard", None, None, 2.0, None),
                    ("other", "heard", None, None, 3.0, None),
                    ("acme", "twice", "tok-2", "whc_twice-acme", 4.0, None),
                    ("other", "twice", "tok-3", "whc_twice-other", 5.0, None),
                    ("other", "gone", "tok-4", "whc_gone", 6.0, 7.0)]
            for company_id, cid, token, secret, ts, deleted in rows:
                await tx.execute(
                    "INSERT INTO connections (company_id, id, instance_token, webhook_secret, "
                    "created_at, updated_at, deleted_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    company_id, cid, token, secret, ts, ts, deleted)
        await storage.transact(seed)

        assert 6 in await storage.migrate()
        companies = {r["id"]: r["webhook_secret"]
                     for r in await storage.fetchall("SELECT * FROM companies")}
        assert companies == {"acme": hash_token("whs_clear-acme"),
                             "other": hash_token("whs_clear-other")}
        rows = {(r["company_id"], r["id"]): r for r in await storage.fetchall(
            "SELECT * FROM connections")}
        assert {k: r["verified"] for k, r in rows.items()} == {
            ("acme", "made"): 1, ("acme", "heard"): 0, ("other", "heard"): 0,
            ("acme", "twice"): 1, ("other", "twice"): 0, ("other", "gone"): 1}
        assert rows[("acme", "made")]["webhook_secret"] == hash_token("whc_made")
        assert rows[("acme", "made")]["instance_token"] == "tok-1"  # needed in clear
        assert rows[("acme", "heard")]["webhook_secret"] is None
        dump = json.dumps([dict(r) for r in rows.values()], default=str)
        assert "whc_" not in dump
    finally:
        await storage.close()


async def test_after_migration_6_old_secrets_still_authenticate(make_config, aiohttp_client,
                                                                database_url):
    storage = await storage_at(database_url, 5)

    async def seed(tx):
        await tx.execute("INSERT INTO companies (id, name, webhook_secret, created_at, "
                         "updated_at) VALUES ('acme', 'Acme', 'whs_old-clear', 0, 0)")
        await tx.execute("INSERT INTO connections (company_id, id, instance_token, "
                         "webhook_secret, created_at, updated_at) VALUES "
                         "('acme', 'loja-centro', 'tok', 'whc_old-conn', 0, 0)")
    await storage.transact(seed)
    await storage.close()

    client = await aiohttp_client(whatstracking.create_app(make_config()))
    api = Api(client, {"company_id": "acme", "token": "none", "webhook_secret": "whs_old-clear"})
    assert (await api.webhook(upsert("Oi", phone="5511900000010")))["lead_id"]
    assert (await api.webhook(upsert("Oi", phone="5511900000011"), secret="whc_old-conn"))[
        "lead_id"]
    await api.webhook(upsert("Oi", phone="5511900000012"), secret="whs_wrong", expect=401)
