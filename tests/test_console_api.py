"""The API routes the console uses (issue 15), on SQLite and on Postgres: API tokens, the
agency's company list, onboarding progress, the lead search and a lead's page, the Google Ads
conversion names and the report's leads with and without a click."""

from __future__ import annotations

import json
import re
import time

import pytest
from aiohttp.test_utils import make_mocked_request

import whatstracking
from conftest import ADMIN_TOKEN, Api, create_company, fixture, upsert

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def call(client, method: str, path: str, expect: int, headers: dict | None = None,
               **kw) -> dict:
    resp = await client.request(method, path, headers=headers or {}, **kw)
    data = await resp.json()
    assert resp.status == expect, (method, path, resp.status, data)
    assert resp.headers["Content-Type"].startswith("application/json")
    return data


async def sql(api: Api, text: str, *args) -> None:
    await api.db.transact(lambda tx: tx.execute(text, *args))


@pytest.fixture
async def other(client) -> Api:
    return Api(client, await create_company(client, "outra", name="Outra Ltda"))


def state_envelope(instance: str, state: str) -> dict:
    envelope = fixture(f"connection-update-{state}")
    envelope["instance"] = instance
    envelope["data"]["instance"] = instance
    return envelope


# ------------------------------------------------------------------------------------------------
# API tokens
# ------------------------------------------------------------------------------------------------

async def test_tokens_list_create_and_revoke(api):
    listed = await call(api.client, "GET", "/api/tokens", 200, api.auth)
    assert [t["name"] for t in listed["tokens"]] == ["default"]
    first = listed["tokens"][0]
    assert set(first) == {"id", "name", "created_at", "last_used_at"}
    assert first["last_used_at"] is not None  # this very call used it
    assert api.token not in str(listed)

    made = await call(api.client, "POST", "/api/tokens", 201, api.auth, json={"name": " Zapier "})
    assert set(made) == {"id", "name", "created_at", "token"}
    assert made["name"] == "Zapier" and made["token"].startswith("wt_")
    assert made["created_at"].endswith("Z")
    me = await call(api.client, "GET", "/api/company", 200, bearer(made["token"]))
    assert me["company_id"] == api.company_id

    listed = await call(api.client, "GET", "/api/tokens", 200, api.auth)
    assert [(t["id"], t["name"]) for t in listed["tokens"]] == [
        (first["id"], "default"), (made["id"], "Zapier")]
    assert made["token"] not in str(listed)
    # Never the value, nor its hash, in the list.
    hashes = await api.db.fetchall("SELECT token_hash FROM api_tokens")
    assert not any(h["token_hash"] in str(listed) for h in hashes)

    gone = await call(api.client, "DELETE", f"/api/tokens/{made['id']}", 200, api.auth)
    assert gone == {"ok": True, "id": made["id"]}
    assert await call(api.client, "GET", "/api/company", 401, bearer(made["token"])) == {
        "error": "Unauthorized"}
    await call(api.client, "DELETE", f"/api/tokens/{made['id']}", 404, api.auth)
    listed = await call(api.client, "GET", "/api/tokens", 200, api.auth)
    assert [t["id"] for t in listed["tokens"]] == [first["id"]]


async def test_a_token_without_a_name_and_a_user_may_revoke_their_own(api):
    made = await call(api.client, "POST", "/api/tokens", 201, api.auth, json={})
    assert made["name"] is None
    made = await call(api.client, "POST", "/api/tokens", 201, api.auth, json={"name": "  "})
    assert made["name"] is None
    # The token the request uses may revoke itself.
    assert (await call(api.client, "DELETE", f"/api/tokens/{made['id']}", 200,
                       bearer(made["token"])))["ok"] is True
    await call(api.client, "GET", "/api/tokens", 401, bearer(made["token"]))


@pytest.mark.parametrize("body,words", [
    ({"name": 5}, "name must be text of at most 100 characters"),
    ({"name": "x" * 101}, "name must be text of at most 100 characters"),
    ({"name": ["a"]}, "name must be text"),
    ({"nome": "a"}, "Unknown field: nome"),
    ({"company_id": 7}, "company_id must be a string"),
])
async def test_create_token_bad_input_is_a_clear_400(api, body, words):
    data = await call(api.client, "POST", "/api/tokens", 400, api.auth, json=body)
    assert words in data["error"]


async def test_create_token_body_must_be_a_json_object(api):
    for raw in (b"[]", b"nope", b'"name"'):
        data = await call(api.client, "POST", "/api/tokens", 400,
                          {**api.auth, "Content-Type": "application/json"}, data=raw)
        assert "JSON" in data["error"]
    assert len((await call(api.client, "GET", "/api/tokens", 200, api.auth))["tokens"]) == 1


@pytest.mark.parametrize("token_id", ["abc", "0x1", "-1", "99999999999999999999", "1.0"])
async def test_revoke_with_a_bad_id_is_404(api, token_id):
    data = await call(api.client, "DELETE", f"/api/tokens/{token_id}", 404, api.auth)
    assert data == {"error": "Token not found"}


async def test_tokens_need_a_token(client):
    for method, path in (("GET", "/api/tokens"), ("POST", "/api/tokens"),
                         ("DELETE", "/api/tokens/1")):
        assert await call(client, method, path, 401, json={}) == {"error": "Unauthorized"}
        await call(client, method, path, 401, bearer("wt_made-up"), json={})


async def test_a_company_token_never_sees_nor_revokes_another_companys_tokens(api, other):
    theirs = await call(other.client, "GET", "/api/tokens", 200, other.auth)
    their_id = theirs["tokens"][0]["id"]
    mine = await call(api.client, "GET", "/api/tokens", 200, api.auth)
    assert their_id not in [t["id"] for t in mine["tokens"]]
    # Revoking theirs with my token: as if it did not exist.
    assert await call(api.client, "DELETE", f"/api/tokens/{their_id}", 404, api.auth) == {
        "error": "Token not found"}
    await call(other.client, "GET", "/api/company", 200, other.auth)  # still works
    # Naming their company: 404, nothing listed, nothing made.
    for method, path, kw in (("GET", "/api/tokens", {"params": {"company_id": "outra"}}),
                             ("POST", "/api/tokens", {"json": {"company_id": "outra"}}),
                             ("DELETE", f"/api/tokens/{their_id}",
                              {"params": {"company_id": "outra"}})):
        data = await call(api.client, method, path, 404, api.auth, **kw)
        assert data == {"error": "Company not found"}
    assert len((await call(other.client, "GET", "/api/tokens", 200, other.auth))["tokens"]) == 1


async def test_the_admin_acts_for_any_company_with_company_id(api, other):
    await call(api.client, "GET", "/api/tokens", 400, ADMIN)  # which company?
    listed = await call(api.client, "GET", "/api/tokens", 200, ADMIN,
                        params={"company_id": "outra"})
    assert [t["name"] for t in listed["tokens"]] == ["default"]
    made = await call(api.client, "POST", "/api/tokens", 201, ADMIN,
                      json={"company_id": "outra", "name": "pela agência"})
    me = await call(api.client, "GET", "/api/company", 200, bearer(made["token"]))
    assert me["company_id"] == "outra"
    # The admin's own calls are no token of theirs: nothing recorded as used.
    listed = await call(api.client, "GET", "/api/tokens", 200, ADMIN,
                        params={"company_id": "outra"})
    assert [t["name"] for t in listed["tokens"]] == ["default", "pela agência"]
    # A token of the other company is not revoked by naming the wrong company.
    await call(api.client, "DELETE", f"/api/tokens/{made['id']}", 404, ADMIN,
               params={"company_id": api.company_id})
    await call(api.client, "DELETE", f"/api/tokens/{made['id']}", 200, ADMIN,
               params={"company_id": "outra"})
    await call(api.client, "GET", "/api/company", 401, bearer(made["token"]))
    await call(api.client, "DELETE", "/api/tokens/1", 404, ADMIN,
               params={"company_id": "ghost"})


async def last_used(api: Api, token_id: int) -> float | None:
    row = await api.db.fetchone("SELECT last_used_at FROM api_tokens WHERE id = ?", token_id)
    return row["last_used_at"]


async def test_last_used_at_is_written_at_most_once_a_minute_per_process(api, monkeypatch):
    made = await call(api.client, "POST", "/api/tokens", 201, api.auth, json={"name": "cron"})
    assert await last_used(api, made["id"]) is None
    writes = []
    original = whatstracking.note_token_use

    async def counted(db, token_id):
        writes.append(token_id)
        await original(db, token_id)

    monkeypatch.setattr(whatstracking, "note_token_use", counted)
    for _ in range(5):
        await call(api.client, "GET", "/api/company", 200, bearer(made["token"]))
    assert writes == [made["id"]]
    first = await last_used(api, made["id"])
    assert first is not None and abs(first - time.time()) < 60
    listed = await call(api.client, "GET", "/api/tokens", 200, api.auth)
    shown = {t["id"]: t["last_used_at"] for t in listed["tokens"]}
    assert shown[made["id"]] == whatstracking.iso(first)

    # A minute later (as this process remembers it), the next use is written again.
    uses = api.client.app[whatstracking.TOKEN_USES]
    uses.written[made["id"]] -= whatstracking.TOKEN_USE_INTERVAL + 1
    await call(api.client, "GET", "/api/company", 200, bearer(made["token"]))
    assert writes == [made["id"], made["id"]]
    assert await last_used(api, made["id"]) >= first

    # The UPDATE only moves it forward: a later time another process wrote stays.
    later = time.time() + 3600
    await sql(api, "UPDATE api_tokens SET last_used_at = ? WHERE id = ?", later, made["id"])
    uses.written.clear()
    await call(api.client, "GET", "/api/company", 200, bearer(made["token"]))
    assert await last_used(api, made["id"]) == later


async def test_a_revoked_token_is_refused_at_once_by_every_process(make_config, aiohttp_client):
    """Two app instances on one database (two processes behind a balancer)."""
    one = await aiohttp_client(whatstracking.create_app(make_config()))
    two = await aiohttp_client(whatstracking.create_app(make_config()))
    company = await create_company(one, "acme")
    made = await call(one, "POST", "/api/tokens", 201, bearer(company["token"]),
                      json={"name": "x"})
    for client in (one, two):  # both have used (and remembered) it
        await call(client, "GET", "/api/company", 200, bearer(made["token"]))
    await call(one, "DELETE", f"/api/tokens/{made['id']}", 200, bearer(company["token"]))
    for client in (two, one):
        assert await call(client, "GET", "/api/company", 401, bearer(made["token"])) == {
            "error": "Unauthorized"}
    # A token made through one works at once on the other.
    fresh = await call(one, "POST", "/api/tokens", 201, bearer(company["token"]), json={})
    await call(two, "GET", "/api/leads", 200, bearer(fresh["token"]))


# ------------------------------------------------------------------------------------------------
# GET /api/companies (admin): the agency's list
# ------------------------------------------------------------------------------------------------

async def click_and_message(api: Api, visitor: str, phone: str) -> dict:
    """A visit that clicks WhatsApp and the message bringing its code: a lead matched by code."""
    visit = await api.track(visitor_id=visitor, event="whatsapp_click",
                            page_url="https://loja.test/?utm_source=google")
    result = await api.webhook(upsert(f"Oi [ref {visit['code']}]", phone=phone))
    assert result.get("match") == "code" or result.get("results"), result
    return visit


async def test_companies_lists_every_company_with_its_summary(api, other):
    await click_and_message(api, "v1", "5511900000001")
    await click_and_message(api, "v2", "5511900000002")
    await api.track(visitor_id="v3", event="whatsapp_click", page_url="https://loja.test/")
    await api.track(visitor_id="v4", page_url="https://loja.test/")  # no click
    await api.webhook(upsert("Oi sem código", phone="5511900000003"))  # a lead, no click
    await api.webhook(state_envelope("loja-centro", "open"))
    await api.webhook(state_envelope("loja-sul", "close"))
    await other.webhook(state_envelope("outra-conn", "open"), secret=other.webhook_secret)

    data = await call(api.client, "GET", "/api/companies", 200, ADMIN)
    assert set(data) == {"companies", "from", "to", "timezone"}
    assert data["timezone"] == "America/Sao_Paulo"
    span = (whatstracking.parse_time(data["to"], "to") - whatstracking.parse_time(
        data["from"], "from"))
    assert span == 30 * 86400
    by_id = {c["company_id"]: c for c in data["companies"]}
    assert list(by_id) == ["empresa-123", "outra"]  # by name: Empresa Teste, Outra Ltda
    mine = by_id["empresa-123"]
    assert mine["name"] == "Empresa Teste"
    assert (mine["leads"], mine["clicks"], mine["matched_clicks"]) == (3, 3, 2)
    assert mine["match_rate"] == 0.6667
    assert mine["last_lead_at"] is not None and mine["created_at"].endswith("Z")
    assert mine["connections"] == {"total": 2, "open": 1, "connecting": 0, "close": 1,
                                   "other": 0}
    theirs = by_id["outra"]
    assert (theirs["leads"], theirs["clicks"], theirs["matched_clicks"]) == (0, 0, 0)
    assert theirs["match_rate"] is None and theirs["last_lead_at"] is None
    assert theirs["connections"]["total"] == theirs["connections"]["open"] == 1


async def test_companies_counts_only_the_period_but_the_last_lead_ever(api):
    await click_and_message(api, "v1", "5511900000001")
    old = 1_700_000_000.0  # 2023-11-14
    await sql(api, "UPDATE leads SET created_at = ?", old)
    await sql(api, "UPDATE visits SET created_at = ?", old)
    await api.client.app[whatstracking.DB].transact(
        lambda tx: tx.execute("DELETE FROM visit_rollup"))
    await whatstracking.rebuild_rollup(api.db)
    data = await call(api.client, "GET", "/api/companies", 200, ADMIN)
    mine = data["companies"][0]
    assert (mine["leads"], mine["clicks"], mine["matched_clicks"]) == (0, 0, 0)
    assert mine["last_lead_at"] == whatstracking.iso(old)
    data = await call(api.client, "GET", "/api/companies", 200, ADMIN,
                      params={"from": "2023-11-14", "to": "2023-11-14", "timezone": "UTC"})
    assert data["from"] == "2023-11-14T00:00:00.000Z"
    assert data["to"] == "2023-11-15T00:00:00.000Z"
    mine = data["companies"][0]
    assert (mine["leads"], mine["clicks"], mine["matched_clicks"]) == (1, 1, 1)
    assert mine["match_rate"] == 1.0
    # The partial 15 minutes at either end come from the visits themselves.
    data = await call(api.client, "GET", "/api/companies", 200, ADMIN,
                      params={"from": str(int(old) - 60), "to": str(int(old) + 60)})
    assert (data["companies"][0]["clicks"], data["companies"][0]["leads"]) == (1, 1)


async def test_companies_is_admin_only_and_validates_its_query(api):
    assert await call(api.client, "GET", "/api/companies", 401) == {"error": "Unauthorized"}
    assert await call(api.client, "GET", "/api/companies", 401, api.auth) == {
        "error": "Unauthorized"}
    for params, words in (({"from": "ontem"}, "from"), ({"to": "2024-13-40"}, "to"),
                          ({"timezone": "Mars/Base"}, "timezone")):
        data = await call(api.client, "GET", "/api/companies", 400, ADMIN, params=params)
        assert words in data["error"]


async def test_companies_reads_in_a_few_statements_whatever_the_number_of_companies(
        client, monkeypatch):
    for n in range(6):
        await create_company(client, f"c{n}")
    db = client.app[whatstracking.DB]
    statements = []
    for name in ("fetchall", "fetchone"):
        original = getattr(db, name)

        async def counted(sql_text, *args, original=original):
            statements.append(sql_text)
            return await original(sql_text, *args)

        monkeypatch.setattr(db, name, counted)
    await call(client, "GET", "/api/companies", 200, ADMIN)
    assert len(statements) <= 5, statements


# ------------------------------------------------------------------------------------------------
# GET /api/onboarding
# ------------------------------------------------------------------------------------------------

TRACKER_URL = "http://wt.test/scripts/whatsapp-tracker.js"


async def test_onboarding_gives_the_snippets_and_the_progress(api, other):
    data = await call(api.client, "GET", "/api/onboarding", 200, api.auth)
    assert data == {
        "public_url": "http://wt.test",
        "snippets": {
            "attribute": f'<script src="{TRACKER_URL}" data-company="empresa-123" async>'
                         "</script>",
            "global": "<script>window.whatsappcompanieId = 'empresa-123';</script>\n"
                      f'<script src="{TRACKER_URL}"></script>'},
        "first_visit_at": None, "last_visit_at": None, "visits": 0,
        "connections": {"total": 0, "open": 0}, "first_lead_at": None, "leads": 0}

    await api.track(visitor_id="v1", page_url="https://loja.test/")
    await click_and_message(api, "v2", "5511900000002")
    await api.webhook(state_envelope("loja-centro", "open"))
    await api.webhook(state_envelope("loja-sul", "close"))
    data = await call(api.client, "GET", "/api/onboarding", 200, api.auth)
    assert data["visits"] == 2
    assert data["first_visit_at"] <= data["last_visit_at"]
    assert data["connections"] == {"total": 2, "open": 1}
    assert data["leads"] == 1 and data["first_lead_at"] is not None

    # Tenancy: the other company sees its own (nothing), the admin names one.
    theirs = await call(other.client, "GET", "/api/onboarding", 200, other.auth)
    assert (theirs["visits"], theirs["leads"], theirs["connections"]["total"]) == (0, 0, 0)
    assert "data-company=\"outra\"" in theirs["snippets"]["attribute"]
    await call(api.client, "GET", "/api/onboarding", 404, api.auth,
               params={"company_id": "outra"})
    await call(api.client, "GET", "/api/onboarding", 401)
    await call(api.client, "GET", "/api/onboarding", 400, ADMIN)
    admin = await call(api.client, "GET", "/api/onboarding", 200, ADMIN,
                       params={"company_id": "empresa-123"})
    assert admin["leads"] == 1


async def test_onboarding_without_public_url_uses_the_requests_own_host(make_config,
                                                                         aiohttp_client):
    client = await aiohttp_client(whatstracking.create_app(make_config(PUBLIC_URL="")))
    company = await create_company(client, "acme")
    data = await call(client, "GET", "/api/onboarding", 200, bearer(company["token"]))
    base = f"http://{client.host}:{client.port}"
    assert data["public_url"] == base
    assert f'src="{base}/scripts/whatsapp-tracker.js"' in data["snippets"]["attribute"]
    assert f'src="{base}/scripts/whatsapp-tracker.js"' in data["snippets"]["global"]


# ------------------------------------------------------------------------------------------------
# GET /api/leads?q= (search) and GET /api/leads/{lead_id}
# ------------------------------------------------------------------------------------------------

async def lead_named(api: Api, name: str, phone: str) -> int:
    envelope = upsert("Olá", phone=phone)
    envelope["data"]["pushName"] = name
    result = await api.webhook(envelope)
    return result["lead_id"]


@pytest.fixture
async def people(api) -> dict[str, int]:
    found = {}
    for name, phone in (("João Silva", "5511988887777"), ("JOANA 100% Real", "5521977776666"),
                        ("maria_clara", "5531966665555"), ("Ana", "5511955554444")):
        found[name] = await lead_named(api, name, phone)
    return found


async def search(api: Api, q: str, **params) -> list[str]:
    return [lead["name"] for lead in await api.leads(q=q, **params)]


async def test_search_by_name_any_case_and_beyond_ascii(api, people):
    assert sorted(await search(api, "jo")) == ["JOANA 100% Real", "João Silva"]
    assert await search(api, "JOÃO") == ["João Silva"]
    assert await search(api, "joão s") == ["João Silva"]
    assert await search(api, "  Silva  ") == ["João Silva"]  # trimmed
    assert await search(api, "nobody") == []
    assert len(await search(api, "")) == 4  # empty: no search


async def test_search_wildcards_in_the_input_match_only_themselves(api, people):
    assert await search(api, "%") == ["JOANA 100% Real"]
    assert await search(api, "_") == ["maria_clara"]
    assert await search(api, "a_c") == ["maria_clara"]
    assert await search(api, "0%") == ["JOANA 100% Real"]
    assert await search(api, "\\") == []
    assert await search(api, "'; DROP TABLE leads; --") == []
    assert len(await api.leads()) == 4


async def test_search_by_phone_digits_contained(api, people):
    assert await search(api, "98888") == ["João Silva"]
    assert await search(api, "+55 (21) 97777-6666") == ["JOANA 100% Real"]
    assert sorted(await search(api, "5511")) == ["Ana", "João Silva"]
    # "100" is in Joana's name; no phone holds it.
    assert await search(api, "100") == ["JOANA 100% Real"]


async def test_search_combines_with_the_filters_and_the_csv(api, people):
    assert sorted(await search(api, "jo", match_method="none")) == [
        "JOANA 100% Real", "João Silva"]
    assert await search(api, "jo", match_method="code") == []
    page = await api.leads(q="jo", limit=1)
    assert len(page) == 1
    resp = await api.client.get("/api/leads", params={"q": "joão", "format": "csv"},
                                headers=api.auth)
    assert resp.status == 200
    text = (await resp.read()).decode("utf-8-sig")
    lines = text.strip().splitlines()
    assert len(lines) == 2 and "João Silva" in lines[1]


async def test_search_bad_input_is_a_clear_400(api):
    data = await call(api.client, "GET", "/api/leads", 400, api.auth, params={"q": "x" * 101})
    assert data == {"error": "q must be at most 100 characters"}
    data = await call(api.client, "GET", "/api/leads", 400, api.auth,
                      params={"q": "x", "format": "csv", "match_method": "bogus"})
    assert "match_method" in data["error"]


async def test_search_never_finds_another_companys_leads(api, other, people):
    envelope = upsert("Oi", phone="5511988880000")
    envelope["data"]["pushName"] = "João da Outra"
    await other.webhook(envelope)
    assert sorted(await search(api, "joão")) == ["João Silva"]
    assert await search(other, "joão") == ["João da Outra"]
    assert await search(other, "98888") == ["João da Outra"]
    resp = await api.client.get("/api/leads", params={"q": "joão", "company_id": "outra"},
                                headers=api.auth)
    assert resp.status == 404


async def add_delivery(api: Api, lead_id: int, event_row_id: int, destination: str,
                       status: str, response: str | None) -> None:
    t = time.time()
    await sql(api, "INSERT INTO deliveries (company_id, event_row_id, lead_id, destination, "
              "status, attempts, next_attempt_at, last_status, last_error, response, "
              "created_at, updated_at) VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)",
              api.company_id, event_row_id, lead_id, destination, status, t,
              400 if status == "failed" else 200, "HTTP 400" if status == "failed" else None,
              response, t, t)


async def test_a_leads_page_has_its_events_and_deliveries_with_the_platforms_answer(api, people):
    lead_id = people["João Silva"]
    made = await call(api.client, "POST", f"/api/leads/{lead_id}/events", 201, api.auth,
                      json={"name": "purchase", "value": 120.5})
    events = (await call(api.client, "GET", f"/api/leads/{lead_id}/events", 200,
                         api.auth))["events"]
    lead_event = next(e for e in events if e["name"] == "lead")
    await add_delivery(api, lead_id, lead_event["id"], "meta", "delivered",
                       '{"events_received": 1, "fbtrace_id": "AbC"}')
    await add_delivery(api, lead_id, made["event"]["id"], "crm_webhook", "failed",
                       "not json at all")
    await add_delivery(api, lead_id, made["event"]["id"], "ga4", "pending", None)

    data = await call(api.client, "GET", f"/api/leads/{lead_id}", 200, api.auth)
    assert set(data) == {"lead", "events", "deliveries"}
    assert data["lead"]["id"] == lead_id and data["lead"]["name"] == "João Silva"
    assert data["lead"] == (await api.leads(q="joão"))[0]
    assert [e["name"] for e in data["events"]] == ["lead", "purchase"]
    assert data["events"] == events
    answers = [(d["destination"], d["status"], d["response"]) for d in data["deliveries"]]
    assert answers == [("meta", "delivered", {"events_received": 1, "fbtrace_id": "AbC"}),
                       ("crm_webhook", "failed", "not json at all"), ("ga4", "pending", None)]
    assert data["deliveries"][0]["event"] == "lead"
    # The deliveries list carries the answer too.
    listed = await call(api.client, "GET", "/api/deliveries", 200, api.auth)
    assert {d["destination"]: d["response"] for d in listed["deliveries"]}["meta"] == {
        "events_received": 1, "fbtrace_id": "AbC"}

    # Another lead's page has none of them.
    other_lead = await call(api.client, "GET", f"/api/leads/{people['Ana']}", 200, api.auth)
    assert [e["name"] for e in other_lead["events"]] == ["lead"]
    assert other_lead["deliveries"] == []


async def test_a_leads_page_is_404_for_another_company_or_a_bad_id(api, other, people):
    lead_id = people["Ana"]
    assert await call(other.client, "GET", f"/api/leads/{lead_id}", 404, other.auth) == {
        "error": "Lead not found"}
    for bad in ("abc", "-1", "1.5", "99999999999999999999", "999999"):
        assert await call(api.client, "GET", f"/api/leads/{bad}", 404, api.auth) == {
            "error": "Lead not found"}
    await call(api.client, "GET", f"/api/leads/{lead_id}", 401)
    await call(api.client, "GET", f"/api/leads/{lead_id}", 404, api.auth,
               params={"company_id": "outra"})
    admin = await call(api.client, "GET", f"/api/leads/{lead_id}", 200, ADMIN,
                       params={"company_id": api.company_id})
    assert admin["lead"]["id"] == lead_id
    await call(api.client, "GET", f"/api/leads/{lead_id}", 404, ADMIN,
               params={"company_id": "outra"})


# ------------------------------------------------------------------------------------------------
# Google Ads conversion names
# ------------------------------------------------------------------------------------------------

DEFAULT_NAMES = ["WhatsApp Lead", "WhatsApp Qualified Lead", "WhatsApp Purchase"]


async def test_the_company_lists_its_google_ads_conversion_names(api):
    company = await call(api.client, "GET", "/api/company", 200, api.auth)
    assert company["google_ads_conversion_names"] == DEFAULT_NAMES
    patched = await call(api.client, "PATCH", "/api/company", 200, api.auth, json={
        "google_ads_conversions": {"purchase": "Venda WhatsApp", "refund": "Estorno"}})
    assert patched["google_ads_conversion_names"] == [
        "WhatsApp Lead", "WhatsApp Qualified Lead", "Venda WhatsApp", "Estorno"]
    # Read-only: it is no setting.
    data = await call(api.client, "PATCH", "/api/company", 400, api.auth,
                      json={"google_ads_conversion_names": ["x"]})
    assert "google_ads_conversion_names" in data["error"]


async def test_the_google_ads_export_refuses_an_unknown_conversion_name(api):
    resp = await api.client.get("/api/exports/google-ads.csv",
                                params={"conversion_name": "WhatsApp Purchase"},
                                headers=api.auth)
    assert resp.status == 200 and resp.content_type == "text/csv"
    data = await call(api.client, "GET", "/api/exports/google-ads.csv", 400, api.auth,
                      params={"conversion_name": "Compra"})
    assert data == {"error": "conversion_name must be one of: WhatsApp Lead, "
                             "WhatsApp Qualified Lead, WhatsApp Purchase"}
    await call(api.client, "PATCH", "/api/company", 200, api.auth,
               json={"google_ads_conversions": {"purchase": "Compra"}})
    resp = await api.client.get("/api/exports/google-ads.csv",
                                params={"conversion_name": "Compra"}, headers=api.auth)
    assert resp.status == 200
    data = await call(api.client, "GET", "/api/exports/google-ads.csv", 400, api.auth,
                      params={"conversion_name": "WhatsApp Purchase"})
    assert "Compra" in data["error"] and "WhatsApp Purchase" not in data["error"]


# ------------------------------------------------------------------------------------------------
# The /connect page's language (the page itself runs in tests/test_connect_page_browser.py)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("query,accept,expected", [
    ("", None, "pt-BR"),
    ("", "", "pt-BR"),
    ("", "en-US,en;q=0.9", "en"),
    ("", "pt-BR,pt;q=0.9,en;q=0.8", "pt-BR"),
    ("", "pt-PT", "pt-BR"),
    ("", "PT", "pt-BR"),
    ("", "fr-FR,fr;q=0.9,en;q=0.5,pt;q=0.4", "en"),
    ("", "en;q=0.5,pt-BR;q=0.9", "pt-BR"),
    ("", "de-DE,es;q=0.9", "pt-BR"),
    ("", "en;q=0,pt;q=0.1", "pt-BR"),
    ("", "*", "pt-BR"),
    ("", "en_GB", "en"),
    ("", "en;q=abc", "pt-BR"),
    ("?lang=en", "pt-BR", "en"),
    ("?lang=pt-BR", "en-US", "pt-BR"),
    ("?lang=pt", "en", "pt-BR"),
    ("?lang=EN-us", "pt-BR", "en"),
    ("?lang=fr", "en", "en"),
    ("?lang=", "en", "en"),
])
def test_connect_language(query, accept, expected):
    headers = {} if accept is None else {"Accept-Language": accept}
    request = make_mocked_request("GET", "/connect/x" + query, headers=headers)
    assert whatstracking.connect_language(request) == expected


@pytest.mark.parametrize("language", whatstracking.CONNECT_LANGUAGES)
def test_connect_page_of_each_language_runs_under_the_one_policy(language):
    page = whatstracking.connect_page_template(language)
    assert f'<html lang="{language}">' in page
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert scripts == [whatstracking.CONNECT_SCRIPT]
    policy = whatstracking.CONNECT_HEADERS["Content-Security-Policy"]
    assert f"script-src {whatstracking.csp_hash(scripts[0])};" in policy
    data = re.search(r'<script type="application/json" id="texts">(.*?)</script>', page, re.S)
    texts = json.loads(data.group(1))
    assert "<" not in data.group(1)
    assert set(texts) == {"scan", "pairing", "connected", "waiting", "lost", "invalid",
                          "expired", "not_found"}
    assert all(texts.values()) and "{code}" in texts["pairing"]
    assert "__" not in page.replace("__QR_URL__", "")


def test_both_dictionaries_have_every_connect_key_sorted():
    keys = {}
    for language in whatstracking.CONNECT_LANGUAGES:
        path = whatstracking.LOCALES_DIR / f"{language}.json"
        text = path.read_text("utf-8")
        data = json.loads(text)
        assert text == json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
        keys[language] = {k for k in data if k.startswith("connect.")}
        assert all(data[k].strip() for k in keys[language])
    assert keys["pt-BR"] == keys["en"]


async def test_connect_error_page_in_each_language(api):
    policies = set()
    for accept, language, words in (("pt-BR,pt;q=0.9", "pt-BR", "Este link não é válido"),
                                    ("en-US", "en", "This link is not valid"),
                                    (None, "pt-BR", "Este link não é válido")):
        headers = {"Accept": "text/html"}
        if accept:
            headers["Accept-Language"] = accept
        resp = await api.client.get("/connect/loja-centro", headers=headers,
                                    params={"c": api.company_id, "exp": "1", "sig": "x"})
        assert resp.status == 401
        assert resp.headers["Content-Language"] == language
        assert "Accept-Language" in resp.headers["Vary"]
        text = await resp.text()
        assert f'<html lang="{language}">' in text and f"<h1>{words}</h1>" in text
        policies.add(resp.headers["Content-Security-Policy"])
    assert len(policies) == 1
    # An API client (not asking for HTML) still gets the JSON error, in English.
    resp = await api.client.get("/connect/loja-centro", headers={
        "Accept": "application/json", "Accept-Language": "pt-BR"},
        params={"c": api.company_id, "exp": "1", "sig": "x"})
    assert resp.status == 401 and await resp.json() == {"error": "This link is not valid"}
