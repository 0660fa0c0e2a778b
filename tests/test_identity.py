"""One person, one contact (SPEC §13): Brazil's 9th digit in every place numbers are compared,
the contact's identities through Evolution, and migration 9 on an existing database. The Cloud
API's BSUID cases are in test_cloud_source.py. Both backends."""

from __future__ import annotations

import pytest

import whatstracking
from conftest import fixture, storage_at, upsert

SITE = "https://loja.test/?utm_source=google&utm_campaign=nono-digito"


@pytest.mark.parametrize("given, forms", [
    ("553188776655", ("5531988776655", "553188776655")),  # an old BH mobile id
    ("5531988776655", ("5531988776655", "553188776655")),  # its dialable form
    ("+55 (11) 98765-4321", ("5511987654321", "551187654321")),
    ("551187654321", ("5511987654321", "551187654321")),
    ("556199998888", ("5561999998888", "556199998888")),  # first local digit 9
    ("556161234567", ("5561961234567", "556161234567")),  # first local digit 6
    ("553133334444", ("553133334444",)),  # a landline (first local digit 2-5) stays 12
    ("551125557777", ("551125557777",)),
    ("5511933334444", ("5511933334444",)),  # 9 then 3: never had an 8-digit form
    ("14155550100", ("14155550100",)),  # another country
    ("4915123456789", ("4915123456789",)),
    ("", ()),
    (None, ()),
])
def test_phone_forms(given, forms):
    assert whatstracking.phone_forms(given) == forms
    assert whatstracking.dialable_phone(given) == (forms[0] if forms else None)


async def test_an_old_mobile_id_from_evolution_becomes_the_dialable_phone(api):
    answer = await api.webhook(upsert("Oi", phone="553188776655"))
    [lead] = await api.leads()
    assert lead["id"] == answer["lead_id"]
    assert lead["phone"] == "5531988776655"
    assert lead["identities"]["wa_id"] == "553188776655"
    assert lead["source"] == "evolution"
    # The same person written with the 9th digit (another Evolution release, another device)
    later = await api.webhook(upsert("Oi de novo", phone="5531988776655"))
    assert later["ignored"] == "existing contact"
    assert later["contact_id"] == answer["contact_id"]


async def test_a_landline_stays_as_it_came(api):
    await api.webhook(upsert("Bom dia", phone="553133334444"))
    [lead] = await api.leads()
    assert lead["phone"] == lead["identities"]["wa_id"] == "553133334444"


async def _window(api, connection_wuid: str, clicked_phone: str) -> dict:
    resp = await api.client.patch("/api/company", json={"window_match": True,
                                                        "window_minutes": 30},
                                  headers=api.auth)
    assert resp.status == 200
    update = fixture("connection-update-open")
    update["data"]["wuid"] = f"{connection_wuid}@s.whatsapp.net"
    await api.webhook(update)
    clicked = await api.track(visitor_id="v-nono", page_url=SITE, event="whatsapp_click",
                              whatsapp_phone=clicked_phone)
    answer = await api.webhook(upsert("Oi, vi no site", phone="5521955550001"))
    return {"answer": answer, "clicked": clicked}


@pytest.mark.parametrize("connection_wuid, clicked_phone", [
    ("553188776655", "5531988776655"),  # the site links the dialable number
    ("5531988776655", "553188776655"),  # the site links the old 12-digit form
    ("5531988776655", "5531988776655"),
])
async def test_the_click_window_matches_either_form_of_the_number(api, connection_wuid,
                                                                   clicked_phone):
    got = await _window(api, connection_wuid, clicked_phone)
    assert got["answer"]["match"] == "window"
    [lead] = await api.leads()
    assert lead["session_id"] == got["clicked"]["session_id"]


async def test_the_click_window_still_tells_other_numbers_apart(api):
    got = await _window(api, "553188776655", "5531988776600")
    assert got["answer"]["match"] == "none"


@pytest.mark.parametrize("erase_as", ["553188776655", "5531988776655", "+55 31 98877-6655"])
async def test_erasure_by_either_form_erases_the_person(api, erase_as):
    await api.webhook(upsert("Oi", phone="553188776655"))
    await api.webhook(upsert("Oi, sou outra pessoa", phone="5521955550002"))
    resp = await api.client.delete(f"/api/contacts/{erase_as}", headers=api.auth)
    data = await resp.json()
    assert resp.status == 200, data
    assert data["erased"]["leads"] == 1 and data["erased"]["contacts"] == 1
    assert data["erased"]["webhook_deliveries"] == 1  # the body with "553188776655"
    assert [l["phone"] for l in await api.leads()] == ["5521955550002"]


async def test_lid_then_phone_with_lid_is_one_contact_with_both_on_every_lead(api):
    lid = "203948571029384"
    first = await api.webhook(upsert("Oi", phone=lid, remoteJid=f"{lid}@lid"))
    second = await api.webhook(upsert("Oi", phone="553188776655",
                                      remoteJidAlt=f"{lid}@lid"))
    assert second["contact_id"] == first["contact_id"]
    [lead] = await api.leads()
    assert lead["identities"] == {"phone": "5531988776655", "wa_id": "553188776655",
                                  "lid": lid, "bsuid": None, "username": None}


async def test_migration_9_makes_old_mobile_ids_dialable_and_folds_twins(database_url):
    """A database at schema 8 where one person became two contacts (their 12-digit id from one
    Evolution release, the 13-digit number from another) and a landline: after migrating, one
    contact with the dialable phone and the id beside it, both leads its own."""
    db = await storage_at(database_url, 8)
    try:
        async def seed(tx):
            for cid, phone in ((1, "553188776655"), (2, "5531988776655"), (3, "553133334444")):
                await tx.execute("INSERT INTO contacts (id, company_id, phone, created_at, "
                                 "updated_at) VALUES (?, 'c', ?, 0, 0)", cid, phone)
                await tx.execute(
                    "INSERT INTO leads (id, company_id, contact_id, phone, match_method, "
                    "confidence, attribution, created_at) VALUES (?, 'c', ?, ?, 'none', 0, "
                    "'{}', 0)", cid, cid, phone)
                await tx.execute("INSERT INTO messages (company_id, connection_id, message_id, "
                                 "contact_id, lead_id, created_at) VALUES ('c', 'x', ?, ?, ?, 0)",
                                 f"m{cid}", cid, cid)

        await db.transact(seed)
        assert await db.migrate() == [v for v, _ in whatstracking.MIGRATIONS if v > 8]
        contacts = await db.fetchall("SELECT id, phone, wa_id FROM contacts ORDER BY id")
        assert [dict(r) for r in contacts] == [
            {"id": 1, "phone": "5531988776655", "wa_id": "553188776655"},
            {"id": 3, "phone": "553133334444", "wa_id": "553133334444"}]
        leads = await db.fetchall("SELECT id, contact_id, phone, wa_id, source FROM leads "
                                  "ORDER BY id")
        assert [tuple(r.values()) for r in leads] == [
            (1, 1, "5531988776655", "553188776655", "evolution"),
            (2, 1, "5531988776655", "5531988776655", "evolution"),
            (3, 3, "553133334444", "553133334444", "evolution")]
        messages = await db.fetchall("SELECT contact_id FROM messages ORDER BY id")
        assert [r["contact_id"] for r in messages] == [1, 1, 3]
        connection_type = await db.fetchall("SELECT type FROM connections")
        assert connection_type == []
    finally:
        await db.close()
