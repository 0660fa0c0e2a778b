"""Auth, errors, the company API, tokens and the leads listing (SPEC §4, §8), on both backends."""

from __future__ import annotations

import pytest

import whatstracking
from conftest import ADMIN_TOKEN, Api, create_company, upsert

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def get_company(api, **params) -> dict:
    resp = await api.client.get("/api/company", headers=api.auth, params=params)
    data = await resp.json()
    assert resp.status == 200, data
    return data


async def patch(api, body: dict, headers: dict | None = None):
    resp = await api.client.patch("/api/company", json=body, headers=headers or api.auth)
    return resp, await resp.json()


# ------------------------------------------------------------------------------------------------
# POST /api/companies
# ------------------------------------------------------------------------------------------------

async def test_create_company_needs_the_admin_token(client):
    body = {"company_id": "acme", "name": "Acme"}
    resp = await client.post("/api/companies", json=body)
    assert resp.status == 401
    assert await resp.json() == {"error": "Unauthorized"}
    resp = await client.post("/api/companies", json=body, headers=bearer("wrong-admin-token"))
    assert resp.status == 401
    assert await resp.json() == {"error": "Unauthorized"}


async def test_create_company_with_a_company_token_is_401(api):
    resp = await api.client.post("/api/companies", json={"company_id": "acme"}, headers=api.auth)
    assert resp.status == 401
    assert await resp.json() == {"error": "Unauthorized"}
    resp = await api.client.get("/api/company", params={"company_id": "acme"}, headers=ADMIN)
    assert resp.status == 404


async def test_create_company_answers_201_with_token_and_webhook_secret(client):
    resp = await client.post("/api/companies", headers=ADMIN, json={
        "company_id": "loja_01.sp", "name": "Loja Um", "code_mode": "visible",
        "currency": "usd", "evolution_url": "https://evo.test/", "evolution_key": "k-123"})
    data = await resp.json()
    assert resp.status == 201, data
    assert data["company_id"] == "loja_01.sp"
    assert data["name"] == "Loja Um"
    assert data["token"] and data["webhook_secret"] and data["token"] != data["webhook_secret"]
    assert data["code_mode"] == "visible"
    assert data["currency"] == "USD"
    assert data["evolution_url"] == "https://evo.test"
    assert data["evolution_key_set"] is True
    assert "k-123" not in await resp.text()
    # The token works for that company at once.
    resp = await client.get("/api/company", headers=bearer(data["token"]))
    assert resp.status == 200
    assert (await resp.json())["company_id"] == "loja_01.sp"


async def test_create_company_twice_is_409(client):
    first = await create_company(client, "acme")
    resp = await client.post("/api/companies", json={"company_id": "acme", "name": "Other"},
                             headers=ADMIN)
    assert resp.status == 409
    assert "acme" in (await resp.json())["error"]
    # The first company is untouched: its token and name still hold.
    resp = await client.get("/api/company", headers=bearer(first["token"]))
    assert (await resp.json())["name"] == "Empresa Teste"


@pytest.mark.parametrize("body,field", [
    ({"company_id": "bad id!"}, "company_id"),
    ({"company_id": ""}, "company_id"),
    ({"company_id": "-starts-with-dash"}, "company_id"),
    ({"company_id": "x" * 65}, "company_id"),
    ({"company_id": 12}, "company_id"),
    ({"name": "no id"}, "company_id"),
    ({"company_id": "acme", "name": ["a"]}, "name"),
    ({"company_id": "acme", "colour": "red"}, "colour"),
    ({"company_id": "acme", "code_mode": "loud"}, "code_mode"),
    ({"company_id": "acme", "attribution_window_days": 0}, "attribution_window_days"),
    ({"company_id": "acme", "timezone": "Mars/Olympus"}, "timezone"),
    ({"company_id": "acme", "evolution_url": "ftp://evo"}, "evolution_url"),
])
async def test_create_company_bad_input_is_400_naming_the_field(client, body, field):
    resp = await client.post("/api/companies", json=body, headers=ADMIN)
    data = await resp.json()
    assert resp.status == 400, data
    assert field in data["error"], data
    row = await client.app[whatstracking.DB].fetchone("SELECT COUNT(*) AS n FROM companies")
    assert row["n"] == 0


async def test_create_company_non_object_body_is_400(client):
    resp = await client.post("/api/companies", json=["acme"], headers=ADMIN)
    assert resp.status == 400
    resp = await client.post("/api/companies", data=b"{oops", headers={
        **ADMIN, "Content-Type": "application/json"})
    assert resp.status == 400
    assert "JSON" in (await resp.json())["error"]


# ------------------------------------------------------------------------------------------------
# GET / PATCH /api/company
# ------------------------------------------------------------------------------------------------

async def test_get_company_shows_settings_without_secrets(api):
    data = await get_company(api)
    assert data["company_id"] == "empresa-123"
    assert data["name"] == "Empresa Teste"
    assert data["code_mode"] == "both"
    assert data["attribution_window_days"] == 30
    assert data["evolution_key_set"] is False
    assert "evolution_key" not in data
    assert "webhook_secret" not in data
    assert "token" not in data


async def test_evolution_key_is_write_only(api):
    resp, data = await patch(api, {"evolution_url": "https://evo.test", "evolution_key": "s3cr3t"})
    assert resp.status == 200, data
    assert data["evolution_key_set"] is True
    assert "s3cr3t" not in await resp.text()
    resp = await api.client.get("/api/company", headers=api.auth)
    text = await resp.text()
    assert "s3cr3t" not in text
    data = await resp.json()
    assert data["evolution_key_set"] is True
    assert data["evolution_url"] == "https://evo.test"
    resp, data = await patch(api, {"evolution_key": None})
    assert data["evolution_key_set"] is False


async def test_patch_updates_and_normalises_settings(api):
    resp, data = await patch(api, {
        "name": "  Nova Loja ", "code_mode": "invisible", "code_template": "#{code}",
        "attribution_window_days": 7, "timezone": "Europe/Lisbon", "currency": "eur",
        "store_first_message": False, "window_match": True, "window_minutes": 15,
        "webhook_auth_required": True,
        "allowed_origins": ["https://loja.test/", "http://localhost:3000"]})
    assert resp.status == 200, data
    again = await get_company(api)
    for view in (data, again):
        assert view["name"] == "Nova Loja"
        assert view["code_mode"] == "invisible"
        assert view["code_template"] == "#{code}"
        assert view["attribution_window_days"] == 7
        assert view["timezone"] == "Europe/Lisbon"
        assert view["currency"] == "EUR"
        assert view["store_first_message"] is False
        assert view["window_match"] is True
        assert view["window_minutes"] == 15
        assert view["allowed_origins"] == ["https://loja.test", "http://localhost:3000"]
    # Tracking hands the browser the company's message settings.
    track = await api.track(page_url="https://seusite.com/")
    assert track["message"] == {"mode": "invisible", "template": "#{code}"}


async def test_allowed_origins_accepts_a_comma_separated_string(api):
    resp, data = await patch(api, {"allowed_origins": "https://a.test, https://b.test"})
    assert resp.status == 200, data
    assert data["allowed_origins"] == ["https://a.test", "https://b.test"]


BAD_FIELDS = [
    ("code_mode", "loud"),
    ("code_mode", None),
    ("code_template", "no placeholder"),
    ("code_template", "{code}" + "x" * 64),
    ("code_template", 7),
    ("attribution_window_days", 0),
    ("attribution_window_days", 366),
    ("attribution_window_days", "30"),
    ("attribution_window_days", 1.5),
    ("attribution_window_days", True),
    ("window_minutes", 0),
    ("timezone", "Mars/Olympus"),
    ("timezone", "../../etc/passwd"),
    ("timezone", 3),
    ("currency", "REAL"),
    ("currency", "R$"),
    ("currency", 986),
    ("store_first_message", "yes"),
    ("window_match", 1),
    ("webhook_auth_required", "false"),
    ("allowed_origins", "ftp://loja.test"),
    ("allowed_origins", ["https://loja.test/path"]),
    ("allowed_origins", [1]),
    ("allowed_origins", {"a": "https://loja.test"}),
    ("name", ""),
    ("name", 5),
    ("evolution_url", "not a url"),
    ("evolution_key", 42),
    ("rotate_webhook_secret", "yes"),
    ("unknown_setting", 1),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS,
                         ids=[f"{f}={v!r}"[:40] for f, v in BAD_FIELDS])
async def test_patch_rejects_a_bad_field_naming_it(api, field, value):
    before = await get_company(api)
    resp, data = await patch(api, {field: value})
    assert resp.status == 400, data
    assert field in data["error"], data
    assert await get_company(api) == before


async def test_patch_with_one_bad_field_changes_nothing(api):
    before = await get_company(api)
    old_secret = api.webhook_secret
    resp, data = await patch(api, {"name": "Outra", "code_mode": "visible", "currency": "usd",
                                   "evolution_key": "k", "rotate_webhook_secret": True,
                                   "timezone": "Nowhere/Land"})
    assert resp.status == 400, data
    assert "timezone" in data["error"]
    assert await get_company(api) == before
    # The webhook secret was not rotated either.
    await api.webhook(upsert("Oi", phone="5511900000001"), secret=old_secret)


async def test_rotate_webhook_secret_replaces_the_old_one(api):
    old = api.webhook_secret
    await api.webhook(upsert("primeira", phone="5511900000002"), secret=old)
    resp, data = await patch(api, {"rotate_webhook_secret": True})
    assert resp.status == 200, data
    new = data["webhook_secret"]
    assert new and new != old
    rejected = await api.webhook(upsert("velho", phone="5511900000003"), secret=old, expect=401)
    assert rejected == {"error": "Unauthorized"}
    accepted = await api.webhook(upsert("novo", phone="5511900000004"), secret=new)
    assert accepted["ok"] is True and accepted["lead_id"]
    # The secret is shown only when rotated.
    assert "webhook_secret" not in await get_company(api)


# ------------------------------------------------------------------------------------------------
# Tokens and scope
# ------------------------------------------------------------------------------------------------

async def test_admin_token_acts_on_any_company_by_company_id(api):
    other = await create_company(api.client, "outra-loja")
    resp = await api.client.get("/api/company", params={"company_id": "outra-loja"}, headers=ADMIN)
    assert resp.status == 200
    assert (await resp.json())["company_id"] == "outra-loja"
    resp = await api.client.patch("/api/company", json={"company_id": "outra-loja",
                                                        "currency": "USD"}, headers=ADMIN)
    assert resp.status == 200, await resp.text()
    resp = await api.client.get("/api/company", headers=bearer(other["token"]))
    assert (await resp.json())["currency"] == "USD"
    assert (await get_company(api))["currency"] == "BRL"
    resp = await api.client.get("/api/leads", params={"company_id": "outra-loja"}, headers=ADMIN)
    assert resp.status == 200
    assert (await resp.json())["leads"] == []


async def test_admin_token_without_company_id_is_400_and_unknown_company_404(client):
    resp = await client.get("/api/company", headers=ADMIN)
    assert resp.status == 400
    assert "company_id" in (await resp.json())["error"]
    resp = await client.get("/api/company", params={"company_id": "ghost"}, headers=ADMIN)
    assert resp.status == 404
    assert await resp.json() == {"error": "Company not found"}


async def test_token_of_company_a_never_reads_company_b(api):
    b = Api(api.client, await create_company(api.client, "empresa-b"))
    lead_a = await api.webhook(upsert("Oi da A", phone="5511900000010"))
    lead_b = await b.webhook(upsert("Oi da B", phone="5511900000020"))

    resp = await api.client.get("/api/company", params={"company_id": "empresa-b"},
                                headers=api.auth)
    assert resp.status == 404
    assert await resp.json() == {"error": "Company not found"}
    resp = await api.client.get("/api/leads", params={"company_id": "empresa-b"},
                                headers=api.auth)
    assert resp.status == 404
    assert "Oi da B" not in await resp.text()

    leads_a = await api.leads()
    assert [lead["id"] for lead in leads_a] == [lead_a["lead_id"]]
    assert all(lead["company_id"] == "empresa-123" for lead in leads_a)
    leads_b = await b.leads()
    assert [lead["id"] for lead in leads_b] == [lead_b["lead_id"]]

    # Nor changes it.
    resp = await api.client.patch("/api/company", json={"company_id": "empresa-b",
                                                        "name": "Hijacked"}, headers=api.auth)
    assert resp.status == 404
    resp = await api.client.get("/api/company", headers=b.auth)
    assert (await resp.json())["name"] == "Empresa Teste"


async def test_a_second_token_acts_for_the_same_company(api):
    token = await whatstracking.add_token(api.db, api.company_id, "zapier")
    assert token != api.token
    resp = await api.client.get("/api/company", headers=bearer(token))
    assert resp.status == 200
    assert (await resp.json())["company_id"] == api.company_id


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wt_not-a-real-token"},
    {"Authorization": "Bearer "},
    {"Authorization": "Basic YWRtaW46YWRtaW4="},
    {"Authorization": "wt_token-without-scheme"},
], ids=["none", "wrong", "empty", "basic", "no-scheme"])
async def test_missing_or_wrong_token_is_401(api, headers):
    for path in ("/api/company", "/api/leads"):
        resp = await api.client.get(path, headers=headers)
        assert resp.status == 401
        assert await resp.json() == {"error": "Unauthorized"}
        assert resp.headers["Content-Type"].startswith("application/json")


async def test_token_of_another_company_hash_prefix_does_not_authenticate(api):
    resp = await api.client.get("/api/company", headers=bearer(api.token[:-1]))
    assert resp.status == 401
    resp = await api.client.get("/api/company", headers=bearer(api.token + "x"))
    assert resp.status == 401


# ------------------------------------------------------------------------------------------------
# Common errors, request ids, health
# ------------------------------------------------------------------------------------------------

async def test_unknown_route_is_404_json(client):
    resp = await client.get("/no/such/route")
    assert resp.status == 404
    assert resp.headers["Content-Type"].startswith("application/json")
    assert await resp.json() == {"error": "Not found"}


@pytest.mark.parametrize("method,path", [("GET", "/tracking"), ("DELETE", "/api/company"),
                                         ("PUT", "/api/companies"), ("POST", "/healthz")])
async def test_wrong_method_is_405_json(client, method, path):
    resp = await client.request(method, path)
    assert resp.status == 405
    assert resp.headers["Content-Type"].startswith("application/json")
    assert await resp.json() == {"error": "Method not allowed"}
    assert resp.headers.get("Allow")


@pytest.mark.parametrize("method,path", [("GET", "/healthz"), ("GET", "/nowhere"),
                                         ("GET", "/api/company"), ("GET", "/tracking"),
                                         ("POST", "/tracking"),
                                         ("GET", "/scripts/whatsapp-tracker.js")])
async def test_every_response_has_a_request_id(client, method, path):
    resp = await client.request(method, path)
    first = resp.headers.get("X-Request-Id")
    assert first
    again = await client.request(method, path)
    assert again.headers["X-Request-Id"] != first
    resp = await client.request(method, path, headers={"X-Request-Id": "req-abc.123_XYZ"})
    assert resp.headers["X-Request-Id"] == "req-abc.123_XYZ"


async def test_unsafe_request_id_is_replaced(client):
    resp = await client.get("/healthz", headers={"X-Request-Id": "bad id\twith spaces" + "x" * 80})
    assert resp.status == 200
    assert resp.headers["X-Request-Id"]
    assert " " not in resp.headers["X-Request-Id"]


async def test_healthz_is_200(client):
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert (await resp.json())["ok"] is True


async def test_readyz_is_200_with_the_database_name(client, database_url):
    resp = await client.get("/readyz")
    assert resp.status == 200
    data = await resp.json()
    assert data["ok"] is True
    assert data["database"] == ("sqlite" if database_url.startswith("sqlite") else "postgres")


async def test_unhandled_exception_is_500_json_with_request_id(api, monkeypatch):
    async def exploding_batch(tx, items):
        raise RuntimeError("secret detail that must stay in the log")

    monkeypatch.setattr(whatstracking, "track_batch", exploding_batch)
    resp = await api.client.post("/tracking", json={"company_id": api.company_id},
                                 headers={"X-Request-Id": "trace-500"})
    assert resp.status == 500
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.headers["X-Request-Id"] == "trace-500"
    text = await resp.text()
    assert "Traceback" not in text
    assert "secret detail" not in text
    assert "RuntimeError" not in text
    data = await resp.json()
    assert data["error"] == "Internal server error"
    assert data.get("request_id") == "trace-500"


async def test_unhandled_exception_without_given_id_returns_the_generated_one(api, monkeypatch):
    async def explode(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(whatstracking, "get_company", explode)
    resp = await api.client.get("/api/company", headers=api.auth)
    assert resp.status == 500
    data = await resp.json()
    assert data["error"] == "Internal server error"
    assert data["request_id"] == resp.headers["X-Request-Id"]


# ------------------------------------------------------------------------------------------------
# GET /api/leads
# ------------------------------------------------------------------------------------------------

async def test_leads_pagination_with_limit_and_cursor(api):
    phones = [f"55119000001{n:02d}" for n in range(5)]
    created = []
    for phone in phones:
        result = await api.webhook(upsert(f"Olá, sou {phone}", phone=phone))
        assert result["match"] == "none"
        created.append(result["lead_id"])

    pages, cursor = [], None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        resp = await api.client.get("/api/leads", params=params, headers=api.auth)
        data = await resp.json()
        assert resp.status == 200, data
        pages.append(data["leads"])
        cursor = data["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 10
    assert [len(p) for p in pages] == [2, 2, 1]
    ids = [lead["id"] for page in pages for lead in page]
    assert len(set(ids)) == 5
    assert ids == list(reversed(created))  # newest first
    assert [lead["phone"] for page in pages for lead in page] == list(reversed(phones))
    lead = pages[-1][0]
    assert lead["match_method"] == "none"
    assert lead["confidence"] == 0
    assert lead["attribution"]["utm_source"] == "direct"
    assert lead["created_at"].endswith("Z")

    resp = await api.client.get("/api/leads", headers=api.auth)
    data = await resp.json()
    assert [lead["id"] for lead in data["leads"]] == ids
    assert data["next_cursor"] is None


@pytest.mark.parametrize("params,field", [
    ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"), ({"limit": "abc"}, "limit"),
    ({"limit": "-5"}, "limit"), ({"limit": "2.5"}, "limit"),
    ({"cursor": "abc"}, "cursor"), ({"cursor": "1; DROP TABLE leads"}, "cursor"),
])
async def test_leads_bad_limit_or_cursor_is_400(api, params, field):
    resp = await api.client.get("/api/leads", params=params, headers=api.auth)
    data = await resp.json()
    assert resp.status == 400, data
    assert field in data["error"]


def test_the_domain_refuses_with_its_own_error_not_an_http_answer():
    """Called outside a request (the CLI, the worker, a test), domain code raises Refused with a
    status and a sentence; the error middleware turns it into the JSON answer."""
    with pytest.raises(whatstracking.Refused) as refused:
        whatstracking.validate_settings({"currency": "euro"})
    assert (refused.value.status, refused.value.message) == (
        400, "currency must be a three-letter ISO 4217 code")
    with pytest.raises(whatstracking.Refused) as refused:
        whatstracking.parse_tracking({"company_id": "acme", "event": "purchase"})
    assert refused.value.status == 400 and "event must be" in refused.value.message
