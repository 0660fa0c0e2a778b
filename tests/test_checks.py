"""The doctor: `python whatstracking.py check` and GET /api/checks (SPEC §3), against the fake
Evolution API (its GET /webhook/find shows the webhook Evolution stores), on SQLite and Postgres.

A healthy set-up passes every check and exits 0; each broken piece (an instance's webhook pointing
elsewhere without our header or events, Evolution down or refusing the key, an instance gone from
Evolution, PUBLIC_URL unreachable, a destination half set up, a database not migrated) fails its
own line with the fix, and the command exits 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import whatstracking
from conftest import ADMIN_TOKEN, ROOT, Api, create_company, free_port
from fake_evolution import closed_port_url

CONN = "loja-centro"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def env(evolution) -> dict:
    """The server's settings: the fake as default Evolution server, PUBLIC_URL this server."""
    port = free_port()
    return {"PORT": str(port), "PUBLIC_URL": f"http://127.0.0.1:{port}",
            "EVOLUTION_API_URL": evolution.url, "EVOLUTION_API_KEY": evolution.global_key,
            "EVOLUTION_TIMEOUT": "2", "ALLOW_PRIVATE_URLS": "true"}


@pytest.fixture
async def client(aiohttp_client, make_config, env):
    config = make_config(**env)
    return await aiohttp_client(whatstracking.create_app(config),
                                server_kwargs={"port": config.port})


@pytest.fixture
async def healthy(client) -> Api:
    """A company with a connection made through WhatsTracking and Meta set up completely."""
    api = Api(client, await create_company(client, "loja"))
    resp = await client.post("/api/create-instance", json={"connectionId": CONN},
                             headers=api.auth)
    assert resp.status == 201, await resp.json()
    resp = await client.patch("/api/company", headers=api.auth, json={
        "meta": {"dataset_id": "1234567890", "access_token": "EAAB-token"}})
    assert resp.status == 200, await resp.json()
    return api


async def api_checks(api: Api, expect: int = 200, headers: dict | None = None,
                     **params) -> dict:
    resp = await api.client.get("/api/checks", headers=api.auth if headers is None else headers,
                                params=params)
    data = await resp.json()
    assert resp.status == expect, data
    return data


async def cli(make_config, env: dict, capsys, *argv: str) -> tuple[int, str]:
    """`whatstracking.py check ARGV` with these settings: (exit code, stdout)."""
    args = whatstracking.build_parser().parse_args(["check", *argv])
    code = await whatstracking.cli_check(make_config(**env), args)
    return code, capsys.readouterr().out


def by_name(checks: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in checks}


# ------------------------------------------------------------------------------------------------
# A healthy set-up
# ------------------------------------------------------------------------------------------------

async def test_healthy_setup_passes_every_check(healthy, make_config, env, capsys, evolution):
    data = await api_checks(healthy)
    assert data["ok"] is True, data
    checks = by_name(data["checks"])
    assert list(checks) == ["database", "PUBLIC_URL", "loja: Evolution server",
                            f"loja: webhook of {CONN}", "loja: destination meta"]
    assert all(c["ok"] and c["fix"] == "" for c in checks.values())
    assert checks[f"loja: webhook of {CONN}"]["detail"] == (
        f"posts to {env['PUBLIC_URL']}/webhook/loja with the x-webhook-secret header and the "
        "events needed")
    assert evolution.calls("GET", f"/webhook/find/{CONN}")[0].apikey == evolution.global_key

    code, out = await cli(make_config, env, capsys)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[-1] == "All 5 checks passed."
    assert all(line.startswith("OK    ") for line in lines[:-1]), out
    assert f"OK    loja: webhook of {CONN}: posts to {env['PUBLIC_URL']}/webhook/loja" in out


async def test_admin_checks_a_named_company_and_strangers_get_401(healthy):
    data = await api_checks(healthy, headers=ADMIN, company_id="loja")
    assert data["ok"] is True
    await api_checks(healthy, 401, headers={})
    await api_checks(healthy, 404, headers=ADMIN, company_id="nobody")


# ------------------------------------------------------------------------------------------------
# Broken set-ups: each failing line says what is wrong and how to fix it
# ------------------------------------------------------------------------------------------------

async def test_webhook_pointing_elsewhere_without_header_and_events_fails_with_the_fix(
        healthy, make_config, env, capsys, evolution):
    evolution.set_webhook(CONN, "https://elsewhere.example.com/hook", headers={},
                          events=["MESSAGES_UPSERT", "CONNECTION_UPDATE"])
    data = await api_checks(healthy)
    assert data["ok"] is False
    webhook = by_name(data["checks"])[f"loja: webhook of {CONN}"]
    assert webhook["ok"] is False
    assert webhook["detail"] == (
        f"it posts to https://elsewhere.example.com/hook, not {env['PUBLIC_URL']}/webhook/loja; "
        "it sends no x-webhook-secret header, so every delivery is refused (401); "
        "its events lack QRCODE_UPDATED, LABELS_EDIT, LABELS_ASSOCIATION")
    assert f'"connectionId": "{CONN}", "adopt": true' in webhook["fix"]
    assert f"points the webhook at {env['PUBLIC_URL']}/webhook/loja" in webhook["fix"]
    others = [c for c in data["checks"] if c is not webhook]
    assert all(c["ok"] for c in by_name(others).values()), others

    code, out = await cli(make_config, env, capsys)
    assert code == 1
    line = next(x for x in out.splitlines() if x.startswith("FAIL"))
    assert line.startswith(f"FAIL  loja: webhook of {CONN}: it posts to https://elsewhere")
    assert ". Fix: adopt it again: POST /api/connections" in line
    assert out.splitlines()[-1] == "1 of 5 checks failed."


async def test_a_secret_header_our_webhook_would_refuse_fails_and_the_right_one_passes(
        healthy, evolution):
    """Evolution shows the header in clear; we keep only hashes: the value is hashed and compared
    with the company's and the connection's secrets, as POST /webhook does."""
    row = evolution.instances[CONN]["webhook"]
    sent = row["headers"]["x-webhook-secret"]
    evolution.set_webhook(CONN, row["url"], headers={"x-webhook-secret": sent + "x"},
                          events=row["events"])
    webhook = by_name((await api_checks(healthy))["checks"])[f"loja: webhook of {CONN}"]
    assert webhook["ok"] is False
    assert webhook["detail"] == ("its x-webhook-secret header holds a secret WhatsTracking does "
                                 "not accept, so every delivery is refused (401)")
    evolution.set_webhook(CONN, row["url"], headers={"X-Webhook-Secret": healthy.webhook_secret},
                          events=row["events"])  # the company's own secret is accepted too
    webhook = by_name((await api_checks(healthy))["checks"])[f"loja: webhook of {CONN}"]
    assert webhook["ok"] is True, webhook


async def test_turned_off_webhook_and_instance_gone_from_evolution(healthy, evolution):
    sent = evolution.instances[CONN]["webhook"]["headers"]  # the secret that works
    evolution.set_webhook(CONN, f"{healthy.client.server.make_url('/webhook/loja')}",
                          headers=sent, enabled=False)
    webhook = by_name((await api_checks(healthy))["checks"])[f"loja: webhook of {CONN}"]
    assert webhook["detail"] == "its webhook is turned off"

    del evolution.instances[CONN]
    webhook = by_name((await api_checks(healthy))["checks"])[f"loja: webhook of {CONN}"]
    assert webhook["ok"] is False
    assert webhook["detail"] == f"instance {CONN} does not exist on {evolution.url}"
    assert "POST /api/create-instance" in webhook["fix"]


async def test_evolution_down_or_refusing_the_key_fails_without_asking_for_webhooks(
        healthy, client, evolution):
    other = Api(client, await create_company(client, "outra", evolution_url=closed_port_url(),
                                             evolution_key="k"))
    data = await api_checks(other)
    server = by_name(data["checks"])["outra: Evolution server"]
    assert server["ok"] is False and data["ok"] is False
    assert "Evolution API is unreachable at http://127.0.0.1:" in server["detail"]
    assert server["fix"].startswith("check that Evolution API runs")

    resp = await client.patch("/api/company", headers=healthy.auth, json={
        "evolution_url": evolution.url, "evolution_key": "wrong-key"})
    assert resp.status == 200
    data = await api_checks(healthy)
    checks = by_name(data["checks"])
    assert checks["loja: Evolution server"]["detail"].endswith(
        "Evolution API refused the API key (401): check the company's Evolution key")
    assert "EVOLUTION_API_KEY" in checks["loja: Evolution server"]["fix"]
    assert f"loja: webhook of {CONN}" not in checks  # one failing line, not one per instance
    assert not evolution.calls("GET", "/webhook/find/")


async def test_slow_evolution_fails_within_the_check_timeout(healthy, evolution, monkeypatch):
    monkeypatch.setattr(whatstracking, "CHECK_TIMEOUT", 0.3)
    evolution.misbehave, evolution.delay = "slow", 30
    server = by_name((await api_checks(healthy))["checks"])["loja: Evolution server"]
    assert server["ok"] is False
    assert server["detail"].endswith("did not answer within 0.3 seconds "
                                     "(GET /instance/fetchInstances)")


async def test_public_url_unreachable_or_unset(healthy, make_config, env, capsys):
    code, out = await cli(make_config, {**env, "PUBLIC_URL": closed_port_url()}, capsys)
    assert code == 1
    line = next(x for x in out.splitlines() if x.startswith("FAIL  PUBLIC_URL"))
    assert "/healthz cannot be reached from this machine" in line
    assert "Fix: check the name's DNS, the reverse proxy in front" in line

    code, out = await cli(make_config, {**env, "PUBLIC_URL": ""}, capsys)
    assert code == 1
    assert ("FAIL  PUBLIC_URL: not set, so Evolution is given no address to post messages to. "
            "Fix: set PUBLIC_URL") in out


async def test_public_url_answering_something_else(healthy, make_config, env, capsys,
                                                   evolution):
    code, out = await cli(make_config, {**env, "PUBLIC_URL": evolution.url}, capsys)
    assert code == 1
    assert (f"FAIL  PUBLIC_URL: {evolution.url}/healthz answered HTTP 404, not WhatsTracking's "
            "health answer") in out


async def test_incomplete_destination_names_the_missing_settings(healthy):
    resp = await healthy.client.patch("/api/company", headers=healthy.auth, json={
        "ga4": {"measurement_id": "G-TEST"}, "crm_webhook": {"url": "https://crm.example.com/h",
                                                             "enabled": False}})
    assert resp.status == 200
    checks = by_name((await api_checks(healthy))["checks"])
    ga4 = checks["loja: destination ga4"]
    assert ga4["ok"] is False
    assert ga4["detail"] == "api_secret not set, so no conversion is sent there"
    assert ga4["fix"] == 'PATCH /api/company {"ga4": {"api_secret": "…"}}'
    assert "loja: destination crm_webhook" not in checks  # turned off: nothing to check


async def test_connection_known_only_from_deliveries_is_not_looked_up(healthy, evolution):
    """An instance named only in deliveries to the company's own webhook may be another
    company's on a shared server: the doctor does not ask Evolution about it."""
    await healthy.webhook({"event": "connection.update", "instance": "someone-else",
                           "data": {"state": "open"}})
    checks = by_name((await api_checks(healthy))["checks"])
    assert "loja: webhook of someone-else" not in checks
    assert not evolution.calls("GET", "/webhook/find/someone-else")


async def test_no_company_and_no_evolution_server(client, make_config, env, capsys):
    code, out = await cli(make_config, {**env, "EVOLUTION_API_URL": ""}, capsys)
    assert code == 1
    assert "FAIL  companies: none yet. Fix: create one: `.venv/bin/python whatstracking.py " \
           "company add my-company" in out
    await create_company(client, "loja")
    code, out = await cli(make_config, {**env, "EVOLUTION_API_URL": ""}, capsys, "--json")
    assert code == 1
    checks = by_name(json.loads(out)["checks"])
    assert checks["loja: Evolution server"]["detail"].startswith("none configured")
    assert "EVOLUTION_API_URL and EVOLUTION_API_KEY" in checks["loja: Evolution server"]["fix"]


async def test_database_not_migrated(database_url, make_config, capsys):
    code, out = await cli(make_config, {"PUBLIC_URL": ""}, capsys)
    assert code == 1
    first = out.splitlines()[0]
    if database_url.startswith("sqlite"):  # no file yet (and the check makes none)
        assert first.startswith("FAIL  database: the SQLite file ")
        assert first.endswith("`.venv/bin/python whatstracking.py migrate` creates a new database")
    else:  # an empty schema
        assert first == (f"FAIL  database: postgres, {len(whatstracking.MIGRATIONS)} migration(s) "
                         f"not applied (this version needs schema "
                         f"{whatstracking.MIGRATIONS[-1][0]}). Fix: run `.venv/bin/python "
                         "whatstracking.py migrate` (the server also migrates when it starts)")


# ------------------------------------------------------------------------------------------------
# The command line itself
# ------------------------------------------------------------------------------------------------

def test_check_command_exits_1_and_names_the_missing_database_file(tmp_path):
    env = {"PATH": os.environ.get("PATH", ""), "DATABASE_URL": f"sqlite:///{tmp_path / 'wt.db'}",
           "PUBLIC_URL": "", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "whatstracking.py"), "check"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines()[0] == (
        f"FAIL  database: the SQLite file {tmp_path.resolve() / 'wt.db'} does not exist. Fix: run "
        "the command where the server runs (its .env and database are there), or set "
        "DATABASE_URL; `.venv/bin/python whatstracking.py migrate` creates a new database")
    assert not (tmp_path / "wt.db").exists()  # the check made no empty database
    assert "Traceback" not in done.stderr


def test_webhook_problems_reads_evolutions_row_as_evolution_means_it():
    config = whatstracking.load_config({"PUBLIC_URL": "https://t.example.com"})
    company = whatstracking.Company("loja", "Loja", dict(whatstracking.DEFAULT_SETTINGS), None,
                                    None, "whs_x")
    row = {"enabled": True, "url": "https://t.example.com/webhook/loja/",
           "headers": {"X-Webhook-Secret": "whc_1"}, "events": []}  # [] means every event
    connection = {"webhook_secret": whatstracking.hash_token("whc_1")}  # stored as its hash
    assert whatstracking.webhook_problems(config, company, connection, row) == []
    assert whatstracking.webhook_problems(config, company, {}, None) == [
        "no webhook is set for it on Evolution"]
    open_company = dataclasses_replace(company, webhook_auth_required=False)
    assert whatstracking.webhook_problems(config, open_company, {}, {**row, "headers": None}) == []


def dataclasses_replace(company, **settings):
    import dataclasses

    return dataclasses.replace(company, settings={**company.settings, **settings})
