"""The outbox under a slow tenant (issue 13 item 6, D7): deliveries go out concurrently with a
per-company share, so one company's slow or tarpitting endpoint does not delay another's
conversions; claiming is fair across companies and counts what every process has in flight."""

from __future__ import annotations

import time

import pytest

import whatstracking
from conftest import Api, create_company, eventually, upsert
from fake_platforms import FakeCrm

SECRET = "crm-shared-secret"


@pytest.fixture
async def crms():
    fakes = [await FakeCrm(SECRET).start() for _ in range(2)]
    yield fakes
    for fake in fakes:
        await fake.close()


async def new_lead(api: Api, phone: str) -> None:
    """A lead (and its `lead` event, with one delivery per destination)."""
    await api.webhook(upsert("Oi, quero saber o preço", phone=phone))


async def test_a_tarpitting_endpoint_does_not_delay_another_companys_conversions(
        aiohttp_client, make_config, crms):
    slow, fast = crms
    # Deliveries may take long (the tarpit answers only when the test lets it): none times out.
    client = await aiohttp_client(whatstracking.create_app(make_config(
        DELIVERY_TIMEOUT="60", DELIVERY_POLL_SECONDS="0.05")))
    tarpit = Api(client, await create_company(client, "tarpit", crm_webhook={
        "url": slow.hook_url, "secret": SECRET}))
    victim = Api(client, await create_company(client, "victim", crm_webhook={
        "url": fast.hook_url, "secret": SECRET}))
    per_company = 4  # DELIVERY_PER_COMPANY's default
    slow.fail("hold", times=None)  # every request waits until the test releases it
    for n in range(per_company + 6):
        await new_lead(tarpit, f"55119700000{n:02d}")

    async def tarpit_full():
        return len(slow.requests) >= per_company
    await eventually(tarpit_full, "the tarpit's share in flight")

    await new_lead(victim, "5511980000001")

    async def victim_arrived():
        return fast.bodies
    bodies = await eventually(victim_arrived, "the other company's conversion")
    assert [b["company_id"] for b in bodies] == ["victim"]
    # ...while every one of the tarpit's is still stuck, and it holds no more than its share.
    assert len(slow.requests) == per_company and slow.bodies == []

    slow.recover()
    slow.release()

    async def tarpit_done():
        return len(slow.bodies) == per_company + 6
    await eventually(tarpit_done, "the tarpit's conversions once it answers")
    assert len(set(slow.event_ids())) == per_company + 6


async def insert_due(db, company_id: str, count: int) -> list[int]:
    """`count` due outbox rows for a company (without events: only claiming is tested)."""
    ids = []
    for n in range(count):
        ts = time.time() - 100

        async def run(tx, n=n, ts=ts):
            row = await tx.fetchone(
                "INSERT INTO deliveries (company_id, event_row_id, lead_id, destination, status, "
                "attempts, next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, "
                "?, ?) RETURNING id", company_id, hash((company_id, n)) % 10**9, 1,
                "crm_webhook", "pending", 0, ts, ts, ts)
            return row["id"]
        ids.append(await db.transact(run))
    return ids


async def test_claiming_takes_every_companys_first_row_before_anyones_second(db):
    a = await insert_due(db, "a", 10)
    b = await insert_due(db, "b", 2)
    c = await insert_due(db, "c", 1)
    # a's rows are the oldest, but every company's first comes before a's second.
    claimed = await whatstracking.claim_deliveries(db, 60, limit=4, per_company=2)
    assert sorted(r["id"] for r in claimed) == [a[0], a[1], b[0], c[0]]
    assert {r["status"] for r in claimed} == {"sending"}
    claimed = await whatstracking.claim_deliveries(db, 60, limit=5, per_company=2)
    assert [r["id"] for r in claimed] == [b[1]]
    # Each company now has its share in flight (c had only one row): nothing more for anyone.
    assert await whatstracking.claim_deliveries(db, 60, limit=5, per_company=2) == []
    # A row delivered frees its company's share for the next one.
    await db.transact(lambda tx: tx.execute(
        "UPDATE deliveries SET status = 'delivered', locked_until = NULL WHERE id = ?", a[0]))
    claimed = await whatstracking.claim_deliveries(db, 60, limit=5, per_company=2)
    assert [r["id"] for r in claimed] == [a[2]]


async def test_a_row_left_sending_by_a_killed_worker_is_claimed_again_after_its_lock(db):
    """At least once: the killed worker may have sent it; it goes out again (event_id lets the
    receiver de-duplicate)."""
    row, = await insert_due(db, "a", 1)
    first, = await whatstracking.claim_deliveries(db, 60)
    assert first["id"] == row and first["attempts"] == 1
    assert await whatstracking.claim_deliveries(db, 60) == []  # locked: still in flight
    await db.transact(lambda tx: tx.execute(
        "UPDATE deliveries SET locked_until = ? WHERE id = ?", time.time() - 1, row))
    again, = await whatstracking.claim_deliveries(db, 60)
    assert again["id"] == row and again["attempts"] == 2
