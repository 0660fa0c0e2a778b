"""Why no leads arrive (issue 13): each connection shows its last accepted delivery and its last
refused one with the reason, and refused deliveries are logged, at most once a minute per
reason and connection, with memory and log lines bounded whatever names a sender makes up.
On SQLite and on Postgres."""

from __future__ import annotations

import logging
import time
from datetime import datetime

from conftest import Api, create_company, fixture, upsert

import whatstracking

COMPANY = "empresa-123"
CONN = "loja-centro"  # the instance of upsert() and the fixtures


async def connection(api: Api, connection_id: str = CONN) -> dict | None:
    resp = await api.client.get("/api/connections", headers=api.auth)
    data = await resp.json()
    assert resp.status == 200, data
    found = [c for c in data["connections"] if c["connectionId"] == connection_id]
    return found[0] if found else None


def seconds(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def refusal_lines(caplog, reason: str | None = None) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if getattr(r, "fields", {}).get("event") == "webhook_rejected"
            and (reason is None or r.fields["reason"] == reason)]


async def post(api: Api, envelope: dict, company_id: str = COMPANY, **headers: str) -> int:
    resp = await api.client.post(f"/webhook/{company_id}", json=envelope, headers=headers)
    return resp.status


async def test_a_connection_shows_its_last_accepted_delivery_written_once_a_minute(api):
    before = time.time()
    await api.webhook(upsert("Oi"))
    shown = await connection(api)
    assert shown["lastRejectedAt"] is None and shown["lastRejection"] is None
    assert before - 1 <= seconds(shown["lastDeliveryAt"]) <= time.time() + 1

    # Later messages within the minute write nothing more to the connection (no statement per
    # message): an older time put there stays as it is.
    await api.db.transact(lambda tx: tx.execute(
        "UPDATE connections SET last_delivery_at = ? WHERE id = ?", 1_000_000_000.0, CONN))
    for text in ("Tudo bem?", "Quero um orçamento"):
        await api.webhook(upsert(text))
    assert (await connection(api))["lastDeliveryAt"] == whatstracking.iso(1_000_000_000.0)


async def test_a_delivery_that_is_only_ignored_still_counts_as_delivered(api):
    await api.webhook(fixture("connection-update-open"))
    await api.db.transact(lambda tx: tx.execute(
        "UPDATE connections SET last_delivery_at = NULL WHERE id = ?", CONN))
    api.client.app[whatstracking.WEBHOOK_NOTES]["delivered"].buckets.clear()  # a minute later
    answer = await api.webhook(upsert("Oi", fromMe=True))
    assert "ignored" in answer
    assert (await connection(api))["lastDeliveryAt"] is not None


async def test_refused_deliveries_are_noted_on_their_connection_and_logged_once_a_minute(
        api, caplog):
    caplog.set_level(logging.WARNING, logger="whatstracking")
    await api.webhook(upsert("Oi"))
    delivered = (await connection(api))["lastDeliveryAt"]

    for _ in range(3):
        assert await post(api, upsert("Oi"), **{"X-Webhook-Secret": "whs_not-the-secret"}) == 401
    shown = await connection(api)
    assert shown["lastRejection"] == "wrong secret"
    first = shown["lastRejectedAt"]
    assert first is not None and shown["lastDeliveryAt"] == delivered
    assert len(refusal_lines(caplog, "wrong secret")) == 1
    line = refusal_lines(caplog)[0]
    assert "401" in line and COMPANY in line and CONN in line
    assert "whs_not-the-secret" not in caplog.text  # the secret given is never logged

    for _ in range(2):
        assert await post(api, upsert("Oi")) == 401
    shown = await connection(api)
    assert shown["lastRejection"] == "missing secret"
    assert seconds(shown["lastRejectedAt"]) >= seconds(first)
    assert len(refusal_lines(caplog, "missing secret")) == 1
    assert len(refusal_lines(caplog)) == 2
    assert api.webhook_secret not in caplog.text


async def test_a_refused_delivery_never_makes_a_connection_nor_touches_another_companys(
        api, client, caplog):
    caplog.set_level(logging.WARNING, logger="whatstracking")
    other = Api(client, await create_company(client, "outra"))
    await other.webhook(upsert("Oi"))  # outra's own loja-centro
    assert await post(api, upsert("Oi", instance="ghost"), **{"X-Webhook-Secret": "x"}) == 401
    assert await post(api, upsert("Oi"), **{"X-Webhook-Secret": other.webhook_secret}) == 401
    assert await connection(api, "ghost") is None
    assert await connection(api) is None
    assert (await connection(other))["lastRejection"] is None
    assert len(refusal_lines(caplog)) == 2  # each named instance once, even with no connection


async def test_an_unknown_company_is_logged_once_a_minute(api, caplog):
    caplog.set_level(logging.WARNING, logger="whatstracking")
    for _ in range(3):
        assert await post(api, upsert("Oi"), "nao-existe",
                          **{"X-Webhook-Secret": api.webhook_secret}) == 404
    lines = refusal_lines(caplog, "unknown company")
    assert len(lines) == 1
    assert "404" in lines[0] and "nao-existe" in lines[0]
    assert api.webhook_secret not in caplog.text


async def test_made_up_names_cost_bounded_memory_and_log_lines(aiohttp_client, make_config,
                                                               caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="whatstracking")
    monkeypatch.setattr(whatstracking, "WEBHOOK_NOTE_KEYS", 20)
    client = await aiohttp_client(whatstracking.create_app(make_config()))
    api = Api(client, await create_company(client))
    started = time.monotonic()
    for n in range(60):
        assert await post(api, upsert("Oi", instance=f"made-up-{n}"),
                          **{"X-Webhook-Secret": "x"}) == 401
        assert await post(api, upsert("Oi"), f"no-company-{n}") == 404
    elapsed_minutes = (time.monotonic() - started) / 60
    notes = client.app[whatstracking.WEBHOOK_NOTES]
    assert len(notes["rejected"].buckets) <= 20
    # The budget of lines naming no connection, plus what it refills while the test runs.
    budget = whatstracking.REJECTION_LINES_PER_MINUTE
    assert budget <= len(refusal_lines(caplog)) <= budget * (1 + elapsed_minutes) + 1
    assert (await api.db.fetchone("SELECT COUNT(*) AS n FROM connections"))["n"] == 0
