"""No server-side request forgery through URLs a company sets (issue 13 item 3, D3).

A local listener stands for what only this server can reach (an admin page, a database, a cloud's
metadata service): no company-set URL may ever connect to it, in any spelling of its address,
neither when set (400 naming the field) nor when a connection is made (DNS rebinding: a name that
resolved elsewhere when it was set). The operator may set such URLs, and ALLOW_PRIVATE_URLS=true
allows them for everyone. Failed deliveries keep no remote body, and every network failure reads
the same.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import pytest
from aiohttp import web

import whatstracking
from conftest import ADMIN_TOKEN, Api, create_company, eventually, upsert
from fake_evolution import FakeEvolution
from fake_platforms import FakeCrm, FakeMeta, closed_port_url

SECRET = "crm-shared-secret"
FAST = {"DELIVERY_POLL_SECONDS": "0.05", "DELIVERY_RETRY_SECONDS": "0.05",
        "DELIVERY_TIMEOUT": "0.5"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Listener:
    """A TCP port on 127.0.0.1 that counts every connection made to it (there must be none)."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> "Listener":
        async def accept(reader, writer):
            self.connections += 1
            await reader.readuntil(b"\r\n\r\n")
            body = b"INTERNAL-ONLY db_password=hunter2"
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            writer.close()
        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def internal():
    listener = await Listener().start()
    yield listener
    await listener.close()


@pytest.fixture
async def guarded(aiohttp_client, make_config):
    """The server with private URLs refused (the production default)."""
    return await aiohttp_client(whatstracking.create_app(make_config(
        ALLOW_PRIVATE_URLS="false", **FAST)))


@pytest.fixture
async def api(guarded) -> Api:
    return Api(guarded, await create_company(guarded))


def private_forms(port: int) -> list[str]:
    """The listener (and other non-public addresses) in the spellings an attacker would try."""
    return [f"http://127.0.0.1:{port}/", f"http://localhost:{port}/", f"http://LOCALHOST:{port}/",
            f"http://2130706433:{port}/", f"http://0x7f.1:{port}/", f"http://0x7f000001:{port}/",
            f"http://017700000001:{port}/", f"http://0177.0.0.1:{port}/", f"http://127.1:{port}/",
            f"http://[::1]:{port}/", f"http://[::ffff:127.0.0.1]:{port}/",
            f"http://[::ffff:7f00:1]:{port}/", f"http://[2002:7f00:1::]:{port}/",
            f"http://user@127.0.0.1:{port}/", f"http://0.0.0.0:{port}/", f"http://[::]:{port}/",
            "http://10.0.0.1/", "http://172.16.5.4/", "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data/", "http://100.64.0.1/",
            "http://224.0.0.1/", "http://[fe80::1]/", "http://[fc00::1]/", "http://[fd12::1]/",
            "http://[ff02::1]/", "http://240.0.0.1/", "https://192.0.2.10/"]


async def patch(client, body: dict, headers: dict) -> tuple[int, dict]:
    resp = await client.patch("/api/company", json=body, headers=headers)
    return resp.status, await resp.json()


async def stored_settings(api: Api) -> dict:
    row = await api.db.fetchone("SELECT settings, evolution_url FROM companies WHERE id = ?",
                                api.company_id)
    return {**json.loads(row["settings"]), "evolution_url": row["evolution_url"]}


async def set_row(api: Api, sql: str, *args) -> None:
    await api.db.transact(lambda tx: tx.execute(sql, *args))


async def crm_delivery(api: Api, status=("delivered", "failed")) -> dict:
    async def probe():
        resp = await api.client.get("/api/deliveries", headers=api.auth)
        rows = (await resp.json())["deliveries"]
        return next((d for d in rows if d["destination"] == "crm_webhook"
                     and d["status"] in status), None)
    return await eventually(probe, f"a crm_webhook delivery in {status}")


async def new_lead(api: Api, phone: str = "5511988887777") -> None:
    envelope = upsert("Oi, quero saber o preço", phone=phone)
    envelope["data"]["messageTimestamp"] = int(time.time())  # within Meta's 7 days
    await api.webhook(envelope)


# ---- set with a company token: refused ---------------------------------------------------------

async def test_a_company_cannot_point_its_crm_webhook_at_a_private_address(api, internal):
    for url in private_forms(internal.port):
        status, data = await patch(api.client, {"crm_webhook": {"url": url, "secret": SECRET}},
                                   api.auth)
        assert status == 400, (url, data)
        assert data["error"].startswith("crm_webhook.url must point to a public internet "
                                        "address"), (url, data)
    assert "crm_webhook" not in await stored_settings(api)
    assert internal.connections == 0


async def test_a_company_cannot_point_its_evolution_server_at_a_private_address(api, internal):
    for url in private_forms(internal.port):
        status, data = await patch(api.client, {"evolution_url": url, "evolution_key": "k"},
                                   api.auth)
        assert status == 400, (url, data)
        assert data["error"].startswith("evolution_url must point to a public"), (url, data)
    assert (await stored_settings(api))["evolution_url"] is None
    assert internal.connections == 0


async def test_public_addresses_are_accepted_and_unresolvable_names_refused(api):
    status, data = await patch(api.client, {"crm_webhook": {
        "url": "https://93.184.215.14/hooks/wt", "secret": SECRET}}, api.auth)
    assert status == 200 and data["crm_webhook"]["url"] == "https://93.184.215.14/hooks/wt"
    status, data = await patch(api.client, {"evolution_url": "http://[2606:4700::1111]:8080"},
                               api.auth)
    assert status == 200 and data["evolution_url"] == "http://[2606:4700::1111]:8080"
    status, data = await patch(api.client, {"evolution_url": "https://wt-nowhere.invalid"},
                               api.auth)
    assert status == 400 and data["error"] == "evolution_url: its host name does not resolve"
    assert "operator_urls" not in data  # the operator's record is never shown


# ---- set by the operator: allowed, and it keeps working ----------------------------------------

async def test_the_operator_may_set_a_private_crm_webhook_and_it_is_delivered_to(api):
    crm = await FakeCrm(SECRET).start()
    try:
        status, data = await patch(api.client, {"company_id": api.company_id, "crm_webhook": {
            "url": crm.hook_url, "secret": SECRET}}, ADMIN)
        assert status == 200, data
        assert "operator_urls" not in data
        stored = await stored_settings(api)
        assert stored["operator_urls"] == {"crm_webhook.url": crm.hook_url}
        await new_lead(api)
        assert (await crm_delivery(api))["status"] == "delivered"
        assert [b["company_id"] for b in crm.bodies] == [api.company_id]
        # The company may change other settings, and even re-send the operator's URL...
        status, data = await patch(api.client, {"currency": "USD", "crm_webhook": {
            "url": crm.hook_url}}, api.auth)
        assert status == 200, data
        # ...but not choose another private one, and "operator_urls" is not settable.
        status, data = await patch(api.client, {"crm_webhook": {
            "url": crm.hook_url + "/other"}}, api.auth)
        assert status == 400 and "crm_webhook.url" in data["error"]
        status, data = await patch(api.client, {"operator_urls": {
            "crm_webhook.url": "http://127.0.0.1:1/"}}, api.auth)
        assert status == 400 and data["error"] == "Unknown field: operator_urls"
    finally:
        await crm.close()


async def test_the_operator_may_set_a_private_evolution_server(api):
    evolution = await FakeEvolution().start()
    try:
        status, data = await patch(api.client, {
            "company_id": api.company_id, "evolution_url": evolution.url,
            "evolution_key": evolution.global_key}, ADMIN)
        assert status == 200, data
        resp = await api.client.post("/api/create-instance", json={"connectionId": "loja-1"},
                                     headers=api.auth)
        assert resp.status == 201, await resp.json()
        assert len(evolution.calls("POST", "/instance/create")) == 1
    finally:
        await evolution.close()


async def test_an_admin_created_company_and_the_cli_record_their_urls_as_the_operators(
        guarded, make_config):
    resp = await guarded.post("/api/companies", headers=ADMIN, json={
        "company_id": "lan", "evolution_url": "http://192.168.0.10:8080",
        "crm_webhook": {"url": "http://n8n.lan:5678/webhook/wt", "secret": SECRET}})
    assert resp.status == 201, await resp.json()
    assert "operator_urls" not in await resp.json()
    db = guarded.app[whatstracking.DB]
    company = await whatstracking.get_company(db, "lan")
    assert company.settings["operator_urls"] == {
        "evolution_url": "http://192.168.0.10:8080",
        "crm_webhook.url": "http://n8n.lan:5678/webhook/wt"}

    config = make_config(ALLOW_PRIVATE_URLS="false")
    await whatstracking.cli_company_add(config, argparse.Namespace(
        id="cli-lan", name=None, evolution_url="http://10.1.2.3:8080", evolution_key="k"))
    company = await whatstracking.get_company(db, "cli-lan")
    assert company.settings["operator_urls"] == {"evolution_url": "http://10.1.2.3:8080"}


async def test_allow_private_urls_lets_every_company_set_them(aiohttp_client, make_config,
                                                              internal):
    client = await aiohttp_client(whatstracking.create_app(make_config(
        ALLOW_PRIVATE_URLS="true")))
    api = Api(client, await create_company(client))
    status, data = await patch(client, {"crm_webhook": {
        "url": f"http://127.0.0.1:{internal.port}/hook", "secret": SECRET}}, api.auth)
    assert status == 200, data


# ---- at connection time (DNS rebinding) ---------------------------------------------------------

@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "0x7f.1", "[::ffff:127.0.0.1]",
                                  "2130706433"])
async def test_a_crm_url_that_now_resolves_privately_is_refused_when_connecting(
        api, internal, host):
    # Stored as if it had resolved to a public address when it was set.
    url = f"http://{host}:{internal.port}/hook"
    await set_row(api, "UPDATE companies SET settings = ? WHERE id = ?",
                  json.dumps({"crm_webhook": {"url": url, "secret": SECRET}}), api.company_id)
    await new_lead(api)
    failed = await crm_delivery(api)
    assert failed["status"] == "failed" and failed["attempts"] == 1  # not retried
    assert failed["last_error"].startswith(("crm_webhook.url must point to a public",
                                            "crm_webhook.url is not a usable"))  # 2130706433
    assert failed["last_status"] is None
    assert internal.connections == 0


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "2130706433"])
async def test_an_evolution_url_that_now_resolves_privately_is_refused_when_connecting(
        api, internal, host):
    await set_row(api, "UPDATE companies SET evolution_url = ?, evolution_key = 'k' WHERE id = ?",
                  f"http://{host}:{internal.port}", api.company_id)
    resp = await api.client.post("/api/create-instance", json={"connectionId": "loja-1"},
                                 headers=api.auth)
    data = await resp.json()
    assert resp.status == 400, data
    assert data["error"].startswith(("evolution_url must point to a public",
                                     "evolution_url is not a usable"))  # 2130706433
    assert internal.connections == 0


async def test_the_operators_own_urls_are_never_restricted(aiohttp_client, make_config):
    evolution = await FakeEvolution().start()
    meta = await FakeMeta().start()
    try:
        client = await aiohttp_client(whatstracking.create_app(make_config(
            ALLOW_PRIVATE_URLS="false", EVOLUTION_API_URL=evolution.url,
            EVOLUTION_API_KEY=evolution.global_key, META_GRAPH_URL=meta.url, **FAST)))
        api = Api(client, await create_company(client))
        resp = await client.post("/api/create-instance", json={"connectionId": "loja-1"},
                                 headers=api.auth)
        assert resp.status == 201, await resp.json()
        status, data = await patch(client, {"meta": {"dataset_id": "123",
                                                     "access_token": "EAAB"}}, api.auth)
        assert status == 200, data
        await new_lead(api)
        for _ in range(500):
            if meta.requests:
                break
            await asyncio.sleep(0.02)
        assert meta.requests  # reached on 127.0.0.1
    finally:
        await evolution.close()
        await meta.close()


# ---- what failures tell ------------------------------------------------------------------------

@pytest.fixture
async def open_client(aiohttp_client, make_config):
    """Private URLs allowed (a LAN), so the failures themselves can be looked at."""
    return await aiohttp_client(whatstracking.create_app(make_config(
        ALLOW_PRIVATE_URLS="true", **FAST)))


async def test_a_crm_failure_records_its_status_and_never_the_body(open_client, internal):
    api = Api(open_client, await create_company(open_client, crm_webhook={
        "url": f"http://127.0.0.1:{internal.port}/internal/admin", "secret": SECRET}))
    await new_lead(api)
    failed = await crm_delivery(api, ("failed",))
    assert (failed["last_status"], failed["last_error"]) == (403, "HTTP 403")
    row = await api.db.fetchone("SELECT response FROM deliveries WHERE id = ?", failed["id"])
    assert row["response"] is None
    assert "hunter2" not in json.dumps(failed)


async def silent_server(mode: str):
    """A port that accepts and then closes at once ("close") or never answers ("hang")."""
    async def accept(reader, writer):
        if mode == "close":
            writer.close()
        else:
            await asyncio.sleep(30)
    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_every_network_failure_of_a_delivery_reads_the_same(open_client):
    closing, closing_url = await silent_server("close")
    hanging, hanging_url = await silent_server("hang")
    try:
        errors = []
        for n, base in enumerate((closed_port_url(), closing_url, hanging_url)):
            api = Api(open_client, await create_company(open_client, f"c{n}", crm_webhook={
                "url": base + "/hook", "secret": SECRET}))
            await new_lead(api, phone=f"551198888000{n}")
            waiting = await crm_delivery(api, ("pending",))
            for _ in range(500):
                if waiting["last_error"]:
                    break
                waiting = await crm_delivery(api, ("pending",))
            errors.append((waiting["last_status"], waiting["last_error"]))
        assert errors == [(None, "unreachable")] * 3
    finally:
        closing.close()
        hanging.close()


async def test_a_company_chosen_evolution_server_fails_alike_whatever_is_behind_it(
        open_client):
    """A closed port, a server that hangs up and a web page that is not Evolution API."""
    async def internal_page(request):
        return web.Response(status=403, text="<html>INTERNAL-ONLY db_password=hunter2</html>",
                            content_type="text/html")
    page = web.Application()
    page.router.add_route("*", "/{tail:.*}", internal_page)
    runner = web.AppRunner(page)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    page_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    closing, closing_url = await silent_server("close")
    try:
        api = Api(open_client, await create_company(open_client))
        answers = []
        for url in (closed_port_url(), closing_url, page_url):
            status, data = await patch(open_client, {"evolution_url": url,
                                                     "evolution_key": "k"}, api.auth)
            assert status == 200, data
            resp = await open_client.post("/api/create-instance",
                                          json={"connectionId": "loja-1"}, headers=api.auth)
            answers.append((resp.status, (await resp.json())["error"].replace(url, "URL")))
        assert answers == [(502, "Evolution API is unreachable at URL, or what answers there "
                                 "is not Evolution API: check evolution_url")] * 3
    finally:
        closing.close()
        await runner.cleanup()


async def test_meta_failures_keep_only_metas_documented_error_fields(aiohttp_client,
                                                                     make_config):
    async def graph(request):
        return web.json_response({"error": {
            "message": "Invalid OAuth access token.", "type": "OAuthException", "code": 190,
            "error_subcode": 463, "fbtrace_id": "AbCdEf", "is_transient": False,
            "error_user_msg": "x" * 5000}, "__debug__": "internal"}, status=400)
    app = web.Application()
    app.router.add_post("/{version}/{dataset}/events", graph)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        client = await aiohttp_client(whatstracking.create_app(make_config(
            META_GRAPH_URL=f"http://127.0.0.1:{runner.addresses[0][1]}", **FAST)))
        api = Api(client, await create_company(client, meta={"dataset_id": "1",
                                                             "access_token": "EAAB"}))
        await new_lead(api)

        async def failed():
            resp = await client.get("/api/deliveries", headers=api.auth, params={
                "status": "failed"})
            return (await resp.json())["deliveries"]
        row, = await eventually(failed, "the failed Meta delivery")
        assert row["last_error"] == ("HTTP 400: Invalid OAuth access token. (type OAuthException, "
                                     "code 190, error_subcode 463, fbtrace_id AbCdEf)")
        stored = await api.db.fetchone("SELECT response FROM deliveries WHERE id = ?", row["id"])
        # Meta's documented error fields only (is_transient decides a retry), texts cut.
        assert json.loads(stored["response"]) == {"error": {
            "message": "Invalid OAuth access token.", "type": "OAuthException", "code": 190,
            "error_subcode": 463, "is_transient": False, "error_user_msg": "x" * 500,
            "fbtrace_id": "AbCdEf"}}
    finally:
        await runner.cleanup()
