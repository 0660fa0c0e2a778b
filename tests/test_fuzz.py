"""Fuzz: schemathesis over openapi.json against the real server, on SQLite and on Postgres.

Every operation the served openapi.json lists is fuzzed (nothing here names a route): the
examples, coverage (boundary and negative values), fuzzing and stateful phases of
`schemathesis run --checks all`, with a fixed seed and derandomised generation, so a run asks
the same questions every time. It passes with 0 failures of any check: no 5xx, every answer in
the schema (status, content type, body), every schema-valid request accepted and every invalid
one refused.

The server under test is `python whatstracking.py` on 127.0.0.1 (its own process) with rate
limits off, a seeded company (a connection made through the fake Evolution, a lead with its
purchase and delivery, a signed link, a spare API token for DELETE /api/tokens/{token_id}) and the fake Evolution of tests/fake_evolution.py behind it.
Each operation is authenticated by the scheme openapi.json declares for it: the company's token
for `bearerAuth`, ADMIN_TOKEN for `adminToken` (creating companies), the webhook secret and the
shared token for the webhooks, the seeded link's signature for `signedLink`; the public routes
go without.

Outbound URLs the fuzzer writes (`evolution_url`, `crm_webhook.url`) are pinned to the fakes and
`evolution_key` to the fake's key, so no request leaves 127.0.0.1 and Evolution answers as
documented instead of 502 for a made-up host.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.parse

import aiohttp
import pytest

from conftest import ADMIN_TOKEN, ROOT, free_port, upsert
from fake_evolution import GLOBAL_KEY, FakeEvolution

schemathesis = pytest.importorskip("schemathesis")

FUZZ_SEED = 1
MAX_EXAMPLES = 6  # per operation in the fuzzing phase; with the rest, about a minute for both
SHARED_TOKEN = "shared-fuzz-token"
CONNECTION = "loja-centro"


def fuzz_env(database_url: str, port: int, fake_url: str) -> dict[str, str]:
    return {"HOST": "127.0.0.1", "PORT": str(port), "PUBLIC_URL": f"http://127.0.0.1:{port}",
            "DATABASE_URL": database_url, "ADMIN_TOKEN": ADMIN_TOKEN,
            "LOG_LEVEL": "CRITICAL", "EVOLUTION_API_URL": fake_url,
            "EVOLUTION_API_KEY": GLOBAL_KEY, "EVOLUTION_TIMEOUT": "5",
            "META_GRAPH_URL": fake_url, "GA4_MP_URL": fake_url,
            "WEBHOOK_SHARED_TOKEN": SHARED_TOKEN, "ALLOW_PRIVATE_URLS": "true",
            "RATE_LIMIT_TRACKING": "0", "RATE_LIMIT_PUBLIC": "0",
            "DELIVERY_RETRY_SECONDS": "3600"}


async def start_server(env: dict[str, str], log_path) -> asyncio.subprocess.Process:
    """`python whatstracking.py` on 127.0.0.1, answering /healthz. In its own process so it has
    a core of its own while schemathesis generates in this one (a 2-core CI runner)."""
    with open(log_path, "wb") as log:
        server = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "whatstracking.py"), env={**os.environ, **env},
            cwd=log_path.parent, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{env['PORT']}/healthz"
    async with aiohttp.ClientSession() as http:
        for _ in range(300):  # up to 30 s on a busy machine
            if server.returncode is not None:
                break
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return server
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    server.kill()
    pytest.fail("the server did not start:\n" + log_path.read_text(errors="replace")[-3000:])


async def seed(base: str, fake: FakeEvolution) -> dict:
    """A company with a connection, a visit, a lead, a purchase (so a delivery) and a link."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(base) as http:
        async def call(method: str, path: str, expect: int, headers: dict, **kw) -> dict:
            async with http.request(method, path, headers=headers, **kw) as resp:
                data = await resp.json()
                assert resp.status == expect, (method, path, data)
                return data

        company = await call("POST", "/api/companies", 201, admin, json={
            "company_id": "acme", "name": "Acme",
            "crm_webhook": {"url": fake.url + "/crm", "secret": "crm-secret"}})
        auth = {"Authorization": f"Bearer {company['token']}"}
        await call("POST", "/api/create-instance", 201, auth, json={"connectionId": CONNECTION})
        fake.open(CONNECTION)
        visit = await call("POST", "/tracking", 200, {}, json={
            "company_id": "acme", "event": "whatsapp_click", "visitor_id": "v1",
            "page_url": "https://acme.example/?utm_source=google&gclid=abc"})
        envelope = upsert(f"Oi [ref {visit['code']}]", instance=CONNECTION)
        await call("POST", "/webhook/acme", 200, {"X-Webhook-Secret": company["webhook_secret"]},
                   json=envelope)
        leads = (await call("GET", "/api/leads", 200, auth))["leads"]
        await call("POST", f"/api/leads/{leads[0]['id']}/events", 201, auth,
                   json={"name": "purchase", "value": 99.9, "currency": "BRL"})
        link = await call("POST", "/api/connection-link", 201, auth,
                          json={"connectionId": CONNECTION})
        # A token only DELETE /api/tokens/{token_id} revokes: a made-up id could be the one the
        # fuzzer authenticates with, and every later answer would be 401.
        spare = await call("POST", "/api/tokens", 201, auth, json={"name": "spare"})
        return {**company, "spare_token_id": spare["id"], "link": dict(urllib.parse.parse_qsl(
            urllib.parse.urlsplit(link["url"]).query))}


def schemathesis_config(base: str, company: dict):
    """`schemathesis run --checks all` as a config: every operation authenticated by the scheme
    openapi.json declares for it; the webhooks, /connect and the signed QR name the seeded
    company, connection and link (made-up ones are only ever 404 or 401)."""
    link = company["link"]
    return schemathesis.Config.from_dict({
        "base-url": base,
        "seed": FUZZ_SEED,
        "workers": 1,
        "continue-on-failure": True,
        "cache": {"enabled": False},  # no state kept between runs (nor files in the checkout)
        # NUL characters are refused with 400 everywhere (Postgres cannot store them; see
        # test_hostile_input), which no JSON Schema of a string says: they are not generated.
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True,
                       "database": "none", "allow-x00": False, "no-shrink": True},
        "checks": {
            "enabled": True,
            # A body over the size limit is refused with 413: a refusal like 400.
            "negative_data_rejection": {"expected-statuses": [
                "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428",
                "429", "5xx"]},
        },
        "auth": {"openapi": {
            "bearerAuth": {"bearer": company["token"]},
            "adminToken": {"bearer": ADMIN_TOKEN},
            "webhookSecret": {"api_key": company["webhook_secret"]},
            "webhookBearer": {"bearer": company["webhook_secret"]},
            "webhookToken": {"api_key": SHARED_TOKEN},
            "signedLink": {"api_key": link["sig"]},
        }},
        # conversion_name: one the seeded company's export knows (which names those are is
        # company data, beyond a schema; another is 400).
        "parameters": {"path.company_id": company["company_id"],
                       "path.connection_id": CONNECTION, "query.c": link["c"],
                       "query.exp": link["exp"], "path.token_id": company["spare_token_id"],
                       "query.conversion_name": "WhatsApp Purchase"},
    })


def describe(recorder, case_id: str, info) -> str:
    """One failure: the operation, the check, our answer and a curl line to replay it."""
    interaction = recorder.interactions.get(case_id)
    response = interaction.response if interaction is not None else None
    answer = (f"{response.status_code} {response.content[:300]!r}" if response is not None
              else "no response")
    return (f"{info.failure.operation}: {info.failure.title} -> {answer}\n"
            f"{info.failure.message}\n{info.code_sample[:800]}")


def pin_outbound(fake_url: str):
    """A before_call hook keeping the Evolution server and the CRM URL the fuzzer writes on the
    fakes: a string there becomes the fake's (schemathesis revalidates the case after the hook,
    so a request stays positive or negative by what is really sent)."""
    pins = {"evolution_url": fake_url, "evolution_key": GLOBAL_KEY}

    def before_call(context, case, kwargs):
        body = case.body
        if not isinstance(body, dict):
            return
        for key, value in pins.items():
            if isinstance(body.get(key), str) and body[key]:
                body[key] = value
        crm = body.get("crm_webhook")
        if isinstance(crm, dict) and isinstance(crm.get("url"), str):
            crm["url"] = fake_url + "/crm"

    return before_call


def run_schemathesis(spec_url: str, config) -> tuple[list[str], dict]:
    """Run every phase over the spec; (failure descriptions, counts and seconds per phase).
    Blocking: run in a thread."""
    from schemathesis.engine import Status, events, from_schema

    schema = schemathesis.openapi.from_url(spec_url, config=config)
    failures: list[str] = []
    counts: dict = {"cases": 0}
    started = 0.0
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            counts["cases"] += len(event.recorder.cases)
            for case_id, nodes in event.recorder.checks.items():
                for node in nodes:
                    if node.status == Status.FAILURE and node.failure_info is not None:
                        failures.append(describe(event.recorder, case_id, node.failure_info))
        elif isinstance(event, events.PhaseStarted):
            started = event.timestamp
        elif isinstance(event, events.PhaseFinished):
            counts[event.phase.name.value] = round(event.timestamp - started, 1)
        elif isinstance(event, events.NonFatalError):
            failures.append(f"{event.label}: error {event.value!r}")
        elif isinstance(event, events.FatalError):
            raise event.exception
    return failures, counts


async def test_fuzz_openapi(database_url, tmp_path):
    fake = await FakeEvolution().start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = await start_server(fuzz_env(database_url, port, fake.url), tmp_path / "server.log")
    hook = schemathesis.hook(pin_outbound(fake.url))
    try:
        company = await seed(base, fake)
        failures, counts = await asyncio.to_thread(
            run_schemathesis, base + "/openapi.json", schemathesis_config(base, company))
    finally:
        from schemathesis.hooks import GLOBAL_HOOK_DISPATCHER
        GLOBAL_HOOK_DISPATCHER.unregister(hook)
        server.terminate()
        await server.wait()
        await fake.close()
    print(json.dumps(counts))  # with -s: what ran, and how long each phase took
    assert counts["cases"] > 1000, counts
    assert not failures, f"{len(failures)} failures:\n\n" + "\n\n".join(failures)
