"""Operations and privacy (SPEC §10): metrics, rate limits, retention, erasing a person."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import whatstracking
from conftest import ADMIN_TOKEN, ROOT, Api, create_company, upsert


async def count(api: Api, table: str) -> int:
    row = await api.db.fetchone(f"SELECT COUNT(*) AS n FROM {table}")
    return row["n"]


async def code_lead(api: Api, phone: str, visitor: str, name: str = "João") -> dict:
    t = await api.track(visitor_id=visitor,
                        page_url="https://loja.test/?utm_source=google&utm_campaign=bf")
    envelope = upsert("Olá! " + whatstracking.message_code(t["code"]), phone=phone)
    envelope["data"]["pushName"] = name
    answer = await api.webhook(envelope)
    assert answer["match"] == "code"
    return {"code": t["code"], "lead_id": answer["lead_id"]}


# ---- GET /metrics ------------------------------------------------------------------------------

async def test_metrics_count_requests_tracking_leads_deliveries_and_webhook_time(api):
    await code_lead(api, "5511911110001", "m1")
    await api.webhook(upsert("oi", phone="5511911110002"))
    await api.client.get("/nowhere")
    resp = await api.client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    text = await resp.text()
    assert ('whatstracking_http_requests_total{route="/tracking",method="POST",status="200"} 1'
            in text)
    assert 'whatstracking_http_requests_total{route="unmatched",method="GET",status="404"} 1' in text
    assert ('whatstracking_http_requests_total{route="/webhook/{company_id}",method="POST",'
            'status="200"} 2') in text
    assert 'whatstracking_tracking_events_total{event="pageview"} 1' in text
    assert 'whatstracking_leads{match_method="code"} 1' in text
    assert 'whatstracking_leads{match_method="none"} 1' in text
    assert 'whatstracking_leads{match_method="ctwa"} 0' in text
    assert 'whatstracking_webhook_processing_seconds_bucket{le="+Inf"} 2' in text
    assert "whatstracking_webhook_processing_seconds_count 2" in text
    assert "# TYPE whatstracking_deliveries gauge" in text


async def test_metrics_need_the_metrics_or_admin_token_and_health_stays_open(
        aiohttp_client, make_config):
    client = await aiohttp_client(whatstracking.create_app(make_config(
        METRICS_TOKEN="metrics-test-token")))
    api = Api(client, await create_company(client))
    for headers in ({}, {"Authorization": f"Bearer {api.token}"},  # a company's token: no
                    {"Authorization": "Bearer metrics-test-token-"},
                    {"Authorization": "Basic metrics-test-token"}):
        resp = await client.get("/metrics", headers=headers)
        assert resp.status == 401, headers
        assert await resp.json() == {"error": "Unauthorized"}
    for token in ("metrics-test-token", ADMIN_TOKEN):
        resp = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 200
        assert "whatstracking_leads" in await resp.text()
    for path in ("/healthz", "/readyz"):
        assert (await client.get(path)).status == 200


async def test_metrics_without_any_operator_token_configured_answer_401(aiohttp_client,
                                                                         make_config):
    client = await aiohttp_client(whatstracking.create_app(make_config(ADMIN_TOKEN="")))
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer x"}):
        resp = await client.get("/metrics", headers=headers)
        assert resp.status == 401


# ---- rate limits -------------------------------------------------------------------------------

async def test_tracking_over_the_per_address_limit_is_429_with_retry_after(aiohttp_client,
                                                                            make_config):
    client = await aiohttp_client(whatstracking.create_app(make_config(RATE_LIMIT_TRACKING="5")))
    api = Api(client, await create_company(client))
    for _ in range(5):
        await api.track(visitor_id="burst")
    resp = await client.post("/tracking", json={"company_id": api.company_id})
    assert resp.status == 429
    assert await resp.json() == {"error": "Too many requests"}
    assert int(resp.headers["Retry-After"]) >= 1
    assert await count(api, "tracking_events") == 5  # the refused one stored nothing


async def test_rate_limit_follows_x_forwarded_for_only_with_trust_proxy(aiohttp_client,
                                                                        make_config):
    config = make_config(RATE_LIMIT_PUBLIC="2", TRUST_PROXY="true")
    client = await aiohttp_client(whatstracking.create_app(config))
    for address in ("203.0.113.1", "203.0.113.2"):
        for _ in range(2):
            resp = await client.get("/public/get-connection?connectionId=x",
                                    headers={"X-Forwarded-For": f"{address}, 10.0.0.1"})
            assert resp.status == 404
    resp = await client.get("/public/get-connection?connectionId=x",
                            headers={"X-Forwarded-For": "203.0.113.1"})
    assert resp.status == 429


async def test_without_trust_proxy_x_forwarded_for_is_ignored(aiohttp_client, make_config):
    client = await aiohttp_client(whatstracking.create_app(make_config(RATE_LIMIT_PUBLIC="2",
                                                                       TRUST_PROXY="false")))
    statuses = []
    for n in range(3):
        resp = await client.get("/public/get-connection?connectionId=x",
                                headers={"X-Forwarded-For": f"198.51.100.{n}"})
        statuses.append(resp.status)
    assert statuses == [404, 404, 429]


def test_rate_limiter_refills_over_time(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(whatstracking.time, "monotonic", lambda: clock[0])
    limiter = whatstracking.RateLimiter(60)  # one a second, a burst of 60
    assert all(limiter.retry_after("a") == 0 for _ in range(60))
    assert limiter.retry_after("a") == pytest.approx(1.0)
    clock[0] += 1.0
    assert limiter.retry_after("a") == 0
    assert limiter.retry_after("b") == 0  # another address has its own bucket
    assert whatstracking.RateLimiter(0).retry_after("a") == 0  # 0 turns it off


def test_rate_limiter_remembers_a_bounded_number_of_addresses():
    limiter = whatstracking.RateLimiter(60, max_keys=100)
    for n in range(1000):
        limiter.retry_after(f"10.0.{n // 256}.{n % 256}")
    assert len(limiter.buckets) == 100


# ---- retention ---------------------------------------------------------------------------------

async def test_purge_deletes_raw_data_older_than_retention_and_keeps_leads(api):
    await code_lead(api, "5511922220001", "r1")
    await api.webhook(b"{not json", expect=400)
    old = whatstracking.now() - 40 * 86400

    async def age(tx) -> None:
        for table, column in (("tracking_events", "created_at"),
                              ("webhook_deliveries", "received_at"), ("messages", "created_at")):
            await tx.execute(f"UPDATE {table} SET {column} = ?", old)

    await api.db.transact(age)
    await api.track(visitor_id="r2")  # a fresh event stays
    purged = await whatstracking.purge_expired(api.db, 30)
    assert purged == {"tracking_events": 1, "webhook_deliveries": 2, "messages": 1}
    assert await count(api, "tracking_events") == 1
    assert await count(api, "webhook_deliveries") == 0
    assert len(await api.leads()) == 1  # leads and visits are not raw data
    assert await whatstracking.purge_expired(api.db, 30) == {
        "tracking_events": 0, "webhook_deliveries": 0, "messages": 0}


async def test_purge_works_in_chunks(api, monkeypatch):
    monkeypatch.setattr(whatstracking, "RETENTION_CHUNK", 3)
    for n in range(10):
        await api.track(visitor_id=f"c{n}")

    async def age(tx) -> None:
        await tx.execute("UPDATE tracking_events SET created_at = ?", 1.0)

    await api.db.transact(age)
    assert (await whatstracking.purge_expired(api.db, 1))["tracking_events"] == 10
    assert await count(api, "tracking_events") == 0


def test_purge_command_needs_retention_days(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": f"sqlite:///{tmp_path}/p.db",
           "RETENTION_DAYS": "0"}
    out = subprocess.run([sys.executable, str(ROOT / "whatstracking.py"), "purge"], env=env,
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode != 0 and "RETENTION_DAYS" in out.stderr
    env["RETENTION_DAYS"] = "30"
    out = subprocess.run([sys.executable, str(ROOT / "whatstracking.py"), "purge"], env=env,
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"tracking_events": 0, "webhook_deliveries": 0,
                                      "messages": 0}


# ---- DELETE /api/contacts/{phone} --------------------------------------------------------------

async def test_erasing_a_person_removes_leads_events_messages_and_raw_bodies(api):
    person = await code_lead(api, "5511933330001", "e1", name="Maria")
    other = await code_lead(api, "5511933330002", "e2", name="Ana")
    await api.client.post(f"/api/leads/{person['lead_id']}/events", headers=api.auth,
                          json={"name": "purchase", "value": 10})
    resp = await api.client.delete("/api/contacts/+55 11 93333-0001", headers=api.auth)
    assert resp.status == 200
    answer = await resp.json()
    assert answer["phone"] == "5511933330001"
    assert answer["erased"] == {"leads": 1, "lead_events": 2, "deliveries": 0, "messages": 1,
                                "contacts": 1, "webhook_deliveries": 1}
    leads = await api.leads()
    assert [lead["id"] for lead in leads] == [other["lead_id"]]
    bodies = await api.db.fetchall("SELECT body FROM webhook_deliveries")
    assert all(b"5511933330001" not in bytes(row["body"]) for row in bodies)
    assert len(bodies) == 1
    # The person's code cannot attribute anybody any more.
    again = await api.webhook(upsert(whatstracking.message_code(person["code"]),
                                     phone="5511933330009"))
    assert again["match"] == "none"
    # Erasing again finds nothing and says so.
    resp = await api.client.delete("/api/contacts/5511933330001", headers=api.auth)
    assert (await resp.json())["erased"] == dict.fromkeys(answer["erased"], 0)


async def test_erasing_stays_within_the_company(api):
    await code_lead(api, "5511944440001", "x1")
    other = Api(api.client, await create_company(api.client, "outra"))
    resp = await api.client.delete("/api/contacts/5511944440001", headers=other.auth)
    assert resp.status == 200
    assert (await resp.json())["erased"]["leads"] == 0
    assert len(await api.leads()) == 1


async def test_erasing_needs_a_token_and_a_phone_number(api):
    resp = await api.client.delete("/api/contacts/5511944440001")
    assert resp.status == 401
    resp = await api.client.delete("/api/contacts/123", headers=api.auth)
    assert resp.status == 400
    assert "phone" in (await resp.json())["error"]


async def test_erasing_searches_raw_bodies_in_windows(api, monkeypatch):
    monkeypatch.setattr(whatstracking, "ERASE_WINDOW", 2)
    for n in range(5):
        await api.webhook(upsert("oi", phone=f"551195555000{n}"))
    await api.webhook(upsert("de novo", phone="5511955550003"))
    resp = await api.client.delete("/api/contacts/5511955550003", headers=api.auth)
    assert (await resp.json())["erased"]["webhook_deliveries"] == 2
    assert await count(api, "webhook_deliveries") == 4
