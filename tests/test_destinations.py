"""The destination registry (whatstracking.DESTINATIONS): every destination is one class, and a
class registered there is all a new destination needs in the module. Its settings are accepted
and their secrets masked, lead events are queued for it and sent by the worker, and the doctor
checks it, with nothing else naming it. On SQLite and on Postgres."""

from __future__ import annotations

import json
import time

import pytest

import whatstracking
from conftest import Api, create_company, eventually, upsert
from fake_platforms import FakeCrm

FAST = {"DELIVERY_POLL_SECONDS": "0.05", "DELIVERY_RETRY_SECONDS": "0.05",
        "DELIVERY_TIMEOUT": "0.5"}
TOKEN = "example-write-only-token"


class Example(whatstracking.Destination):
    """A made-up platform posting signed JSON (the CRM fake checks the signature and keeps the
    body). A real destination reads its URL from its own setting in Config."""

    name = "example"
    fields = {"account": False, "token": True, "enabled": False}
    required = ("account", "token")

    def __init__(self, url: str) -> None:
        self.url = url

    def event(self, company, lead, event, facts):
        if event["name"] not in ("lead", "purchase"):
            return whatstracking.Outcome("skipped", error=f"no example event for {event['name']}")
        return {"type": f"lead.{event['name']}", "lead_id": lead["id"],
                "event": whatstracking.event_json(event)}

    def request(self, config, settings, payload):
        raw = whatstracking.json_dumps({**payload, "account": settings["account"]}).encode()
        return self.url, raw, {
            "X-WhatsTracking-Signature": whatstracking.crm_signature(settings["token"], raw),
            "X-WhatsTracking-Timestamp": str(int(time.time()))}


def test_each_registered_destination_declares_what_the_loops_need():
    assert list(whatstracking.DESTINATIONS) == ["meta", "ga4", "tiktok", "data_manager",
                                                "crm_webhook"]
    for name, destination in whatstracking.DESTINATIONS.items():
        assert isinstance(destination, whatstracking.Destination)
        assert destination.name == name
        assert set(destination.required) <= set(destination.fields)
        assert "enabled" in destination.fields
        assert whatstracking.DESTINATION_FIELDS[name] == dict(destination.fields)
        assert destination.company_url is None or destination.company_url in destination.fields


@pytest.fixture
async def example(monkeypatch):
    fake = await FakeCrm(TOKEN).start()
    monkeypatch.setitem(whatstracking.DESTINATIONS, "example", Example(fake.hook_url))
    monkeypatch.setitem(whatstracking.DESTINATION_FIELDS, "example", dict(Example.fields))
    yield fake
    await fake.close()


async def test_a_registered_destination_is_set_up_masked_queued_sent_and_checked(
        example, make_config, aiohttp_client):
    client = await aiohttp_client(whatstracking.create_app(make_config(**FAST)))
    api = Api(client, await create_company(client))
    resp = await client.patch("/api/company", headers=api.auth,
                              json={"example": {"account": "acc-1", "nope": "x"}})
    assert resp.status == 400
    assert (await resp.json())["error"] == "Unknown field: example.nope"

    resp = await client.patch("/api/company", headers=api.auth,
                              json={"example": {"account": "acc-1", "token": TOKEN}})
    shown = await resp.json()
    assert resp.status == 200, shown
    assert shown["example"] == {"account": "acc-1", "token_set": True}
    assert TOKEN not in json.dumps(shown)

    lead_id = (await api.webhook(upsert("Oi, quero saber o preço", phone="5511960000042")))[
        "lead_id"]

    async def delivered():
        resp = await client.get("/api/deliveries", headers=api.auth,
                                params={"lead_id": str(lead_id)})
        rows = (await resp.json())["deliveries"]
        return [d for d in rows if d["destination"] == "example" and d["status"] == "delivered"]

    await eventually(delivered, "the example delivery")
    body, = example.bodies
    assert body["type"] == "lead.lead" and body["lead_id"] == lead_id
    assert body["account"] == "acc-1"

    resp = await client.get("/api/checks", headers=api.auth)
    checks = json.dumps(await resp.json())
    assert "destination example" in checks
