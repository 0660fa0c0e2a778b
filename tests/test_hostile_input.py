"""Hostile input (issue 13, items 4 and 5; security.md D4-D6): answered 4xx, never 500, on SQLite
and Postgres, and a refusal commits nothing.

- Strict JSON on every route that reads a body: NaN, Infinity and numbers past a float's range
  are refused at parse time; so are bodies nested deeper than JSON_DEPTH_MAX. Every answer and
  outgoing payload is written with allow_nan=False.
- NUL characters and unpaired surrogates: refused (400) in API input; in webhook content (the
  text of a WhatsApp message, a contact's name) they are cleaned, so the lead is not lost. `%00`
  in an address is refused for every route.
- Ids past 64 bits, dates past year 9999, event times out of range.
- A webhook delivery that fails is stored (status failed) and answered 202; `apikey` is redacted
  from stored bodies; a QR string is capped.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

import whatstracking
from conftest import ADMIN_TOKEN, create_company, fixture, upsert

INGEST_TOKEN = "ingest-shared-token-0123456789"
INGEST = {"X-Webhook-Token": INGEST_TOKEN}
TOKEN = "B6D711FC-DE4D-4FD5-9365-44120E713976"  # the fixtures' apikey
HUGE = "99999999999999999999"  # past 2**63


@pytest.fixture
async def client(make_config, aiohttp_client):  # config first: its database outlives the app
    """The server with /webhook-ingest on (overrides conftest's)."""
    return await aiohttp_client(whatstracking.create_app(make_config(
        WEBHOOK_SHARED_TOKEN=INGEST_TOKEN, ALLOW_PRIVATE_URLS="true")))


def strict_loads(text: str):
    """JSON as a browser's JSON.parse reads it: NaN or Infinity fail."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


async def post_raw(api, path: str, raw: bytes, headers: dict | None = None):
    resp = await api.client.post(path, data=raw, headers={"Content-Type": "application/json",
                                                          **(headers or {})})
    return resp.status, strict_loads(await resp.text())


async def count(api, table: str) -> int:
    return int((await api.db.fetchone(f"SELECT COUNT(*) AS n FROM {table}"))["n"])


async def counts(api) -> dict:
    return {t: await count(api, t) for t in ("visits", "tracking_events", "leads", "lead_events",
                                            "deliveries", "webhook_deliveries", "contacts")}


async def new_lead(api, text: str = "Oi", phone: str = "5511955550001") -> int:
    answer = await api.webhook(upsert(text, phone=phone))
    return answer["lead_id"]


def tracking(**fields) -> bytes:
    return json.dumps({"company_id": "empresa-123", "visitor_id": "v-hostile",
                       "page_url": "https://loja.test/", **fields}).encode()


def envelope_bytes(envelope: dict) -> bytes:
    return json.dumps(envelope).encode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ------------------------------------------------------------------------------------------------
# D4: strict JSON in, strict JSON out
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
async def test_non_finite_numbers_are_refused_on_every_route_that_reads_json(api, number):
    lead_id = await new_lead(api)
    before = await counts(api)
    cases = [
        ("/tracking", tracking(first_touch={"ts": 0}).replace(
            b'"ts": 0', f'"ts": {number}'.encode()), {}),
        (f"/webhook/{api.company_id}", envelope_bytes(upsert("Oi", phone="5511955550002")).replace(
            b'"messageTimestamp": 1761057639', f'"messageTimestamp": {number}'.encode()),
         {"X-Webhook-Secret": api.webhook_secret}),
        (f"/webhook-ingest?company_id={api.company_id}", f'{{"x": {number}}}'.encode(), INGEST),
        (f"/api/leads/{lead_id}/events", f'{{"name": "purchase", "value": {number}}}'.encode(),
         api.auth),
        ("/api/company", f'{{"window_minutes": {number}}}'.encode(), api.auth),
    ]
    for path, raw, headers in cases:
        assert number.encode() in raw, path
        method = "PATCH" if path == "/api/company" else "POST"
        resp = await api.client.request(method, path, data=raw, headers={
            "Content-Type": "application/json", **headers})
        body = strict_loads(await resp.text())
        assert resp.status == 400, (path, body)
        assert body["error"].startswith("Body is not valid JSON"), body
    after = await counts(api)
    # the webhook's body is kept for a look (as any body that is not JSON); nothing else is stored
    assert after == {**before, "webhook_deliveries": before["webhook_deliveries"] + 1}


async def test_a_nan_from_an_anonymous_visitor_never_reaches_the_leads_listing(api):
    """security.md D4: `first_touch.ts: NaN` from /tracking made GET /api/leads invalid JSON."""
    raw = tracking(first_touch={"ts": 1, "utm_source": "x"}).replace(b'"ts": 1', b'"ts": NaN')
    status, body = await post_raw(api, "/tracking", raw)
    assert status == 400, body
    assert await count(api, "visits") == 0
    code = (await api.track(visitor_id="v-ok", page_url="https://loja.test/?utm_source=x",
                            first_touch={"ts": 1.5e12, "utm_source": "x"}))["code"]
    await api.webhook(upsert(f"oi [ref {code}]", phone="5511955550003"))
    resp = await api.client.get("/api/leads", headers=api.auth)
    leads = strict_loads(await resp.text())["leads"]  # strict: a NaN would fail here
    assert [lead["first_touch"]["ts"] for lead in leads] == [1.5e12]


async def test_a_nan_stored_before_the_fix_reads_back_as_null(api):
    """Stored JSON text with NaN (written by an older version) reads as null, and the answer
    stays valid JSON (the encoder refuses non-finite numbers)."""
    lead_id = await new_lead(api)
    await api.db.transact(lambda tx: tx.execute(
        'UPDATE leads SET first_touch = ? WHERE id = ?', '{"utm_source":"x","ts":NaN}', lead_id))
    resp = await api.client.get("/api/leads", headers=api.auth)
    assert resp.status == 200
    assert strict_loads(await resp.text())["leads"][0]["first_touch"] == {"utm_source": "x",
                                                                          "ts": None}
    with pytest.raises(ValueError):
        whatstracking.json_dumps({"value": float("nan")})


def test_every_json_answer_goes_through_the_strict_encoder():
    """aiohttp's web.json_response writes NaN; the module's json_response uses json_dumps
    (allow_nan=False). A route added with the former would slip past the rule."""
    source = Path(whatstracking.__file__).read_text("utf-8")
    assert "web.json_response(" not in source


async def test_outgoing_crm_payloads_are_strict_json(api):
    lead = await api.db.fetchone("SELECT * FROM leads WHERE id = ?", await new_lead(api))
    event = await api.db.fetchone("SELECT * FROM lead_events WHERE lead_id = ?", lead["id"])
    company = await whatstracking.get_company(api.db, api.company_id)
    body = whatstracking.json_dumps(whatstracking.crm_payload(company, lead, event))
    assert strict_loads(body)["type"] == "lead.lead"
    with pytest.raises(ValueError):
        whatstracking.json_dumps(whatstracking.crm_payload(company, lead,
                                                           {**event, "value": float("inf")}))


async def test_bytes_that_are_not_utf8_are_400_and_a_byte_order_mark_is_ignored(api):
    for bad in (b"loj\xe1", b"\xed\xa0\x80"):  # Latin-1; a surrogate encoded as UTF-8 would be
        raw = tracking().replace(b"loja", bad)
        status, body = await post_raw(api, "/tracking", raw)
        assert status == 400 and body["error"] == "Body is not valid JSON: it is not UTF-8", body
    assert await count(api, "visits") == 0
    status, body = await post_raw(api, "/tracking", b"\xef\xbb\xbf" + tracking())
    assert status == 200, body


# ------------------------------------------------------------------------------------------------
# D5: deep nesting
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [65, 5000, 30_000])
async def test_json_nested_too_deep_is_400_on_every_route(api, depth):
    lead_id = await new_lead(api)
    before = await counts(api)
    deep = nested(depth)
    cases = [("POST", "/tracking", f'{{"company_id": "empresa-123", "x": {deep}}}', {}),
             ("POST", f"/webhook/{api.company_id}", f'{{"event": "x", "data": {deep}}}',
              {"X-Webhook-Secret": api.webhook_secret}),
             ("POST", f"/webhook-ingest?company_id={api.company_id}", deep, INGEST),
             ("POST", f"/api/leads/{lead_id}/events", f'{{"name": "lost", "x": {deep}}}',
              api.auth),
             ("PATCH", "/api/company", f'{{"name": {deep}}}', api.auth),
             ("POST", "/api/companies", f'{{"company_id": "x", "name": {deep}}}',
              {"Authorization": f"Bearer {ADMIN_TOKEN}"})]
    for method, path, text, headers in cases:
        resp = await api.client.request(method, path, data=text.encode(), headers={
            "Content-Type": "application/json", **headers})
        body = strict_loads(await resp.text())
        assert resp.status == 400, (path, body)
        assert "nested more than 64 levels deep" in body["error"], body
    assert await counts(api) == {**before, "webhook_deliveries": before["webhook_deliveries"] + 1}


async def test_json_nested_up_to_the_limit_is_accepted(api):
    resp = await api.client.post(f"/webhook-ingest?company_id={api.company_id}",
                                 data=nested(64).encode(), headers=INGEST)
    assert resp.status == 202, await resp.text()
    # wide is not deep: many brackets side by side
    wide = "[" + ",".join(["[[{}]]"] * 5000) + "]"
    resp = await api.client.post(f"/webhook-ingest?company_id={api.company_id}",
                                 data=wide.encode(), headers=INGEST)
    assert resp.status == 202, await resp.text()
    # brackets inside strings are text, not nesting
    text = json.dumps({"event": "x", "data": {"text": "[" * 5000 + "{" * 5000}})
    resp = await api.client.post(f"/webhook-ingest?company_id={api.company_id}",
                                 data=text.encode(), headers=INGEST)
    assert resp.status == 202, await resp.text()


# ------------------------------------------------------------------------------------------------
# D5: lone surrogates and NUL characters
# ------------------------------------------------------------------------------------------------

BAD_TEXTS = {"surrogate": "\\ud800", "low surrogate": "x\\udfffy", "nul": "a\\u0000b"}


@pytest.mark.parametrize("kind", BAD_TEXTS)
@pytest.mark.parametrize("field", ["company_id", "utm_source", "referrer", "page_url",
                                   "visitor_id", "code", "whatsapp_phone"])
async def test_tracking_refuses_nul_and_unpaired_surrogates_and_stores_nothing(api, kind, field):
    raw = tracking(**{field: "PLACEHOLDER"}).replace(b"PLACEHOLDER", BAD_TEXTS[kind].encode())
    status, body = await post_raw(api, "/tracking", raw)
    assert status == 400, body
    assert "NUL character or an unpaired surrogate" in body["error"]
    assert await count(api, "visits") == 0 and await count(api, "tracking_events") == 0


async def test_tracking_accepts_emoji_written_as_a_surrogate_pair(api):
    raw = tracking(utm_campaign="PLACEHOLDER").replace(b"PLACEHOLDER", b"promo\\ud83d\\ude00")
    status, body = await post_raw(api, "/tracking", raw)
    assert status == 200, body
    row = await api.db.fetchone("SELECT utm_campaign FROM visits")
    assert row["utm_campaign"] == "promo\U0001F600"


@pytest.mark.parametrize("kind", BAD_TEXTS)
async def test_api_bodies_refuse_nul_and_unpaired_surrogates(api, kind):
    lead_id = await new_lead(api)
    bad = BAD_TEXTS[kind]
    cases = [("PATCH", "/api/company", f'{{"name": "{bad}"}}'),
             ("POST", f"/api/leads/{lead_id}/events", f'{{"name": "lost", "event_id": "{bad}"}}'),
             ("POST", "/api/connection-link", f'{{"connectionId": "{bad}"}}'),
             ("POST", "/api/create-instance", f'{{"connectionId": "x", "{bad}": 1}}')]
    before = await counts(api)
    for method, path, text in cases:
        resp = await api.client.request(method, path, data=text.encode(), headers=api.auth)
        body = strict_loads(await resp.text())
        assert resp.status == 400, (path, body)
    assert await counts(api) == before
    assert (await api.db.fetchone("SELECT name FROM companies"))["name"] == "Empresa Teste"


@pytest.mark.parametrize("kind", BAD_TEXTS)
async def test_webhook_text_with_nul_or_surrogates_is_cleaned_and_the_lead_kept(api, kind):
    """What a user expects from a WhatsApp message with odd text: the lead, not a lost delivery.
    NUL characters are dropped and each unpaired surrogate becomes U+FFFD."""
    code = (await api.track(visitor_id="v-odd", page_url="https://loja.test/?utm_source=ads")
            )["code"]
    envelope = upsert(f"oi [ref {code}] TEXT", phone="5511955550004", message_id="MSGID")
    envelope["data"]["pushName"] = "NAME"
    envelope["instance"] = "loja-INST"
    raw = envelope_bytes(envelope)
    bad = BAD_TEXTS[kind].encode()
    for placeholder in (b"TEXT", b"NAME", b"MSGID", b"INST"):
        raw = raw.replace(placeholder, placeholder + bad)
    status, body = await post_raw(api, f"/webhook/{api.company_id}", raw,
                                  {"X-Webhook-Secret": api.webhook_secret})
    assert status == 200, body
    assert body["match"] == "code"
    clean = {"surrogate": "\ufffd", "low surrogate": "x\ufffdy", "nul": "ab"}[kind]
    (lead,) = await api.leads()
    assert lead["name"] == "NAME" + clean
    assert lead["first_message"] == f"oi [ref {code}] TEXT" + clean
    assert lead["message_id"] == "MSGID" + clean
    assert lead["connection_id"] == "loja-INST" + clean
    assert lead["attribution"]["utm_source"] == "ads"
    stored = await api.db.fetchone("SELECT body, status FROM webhook_deliveries")
    assert stored["status"] == "processed" and bad in bytes(stored["body"])  # the raw body, as sent


@pytest.mark.parametrize("kind", BAD_TEXTS)
async def test_webhook_ingest_cleans_nul_and_surrogates(api, kind):
    bad = BAD_TEXTS[kind]
    envelope = envelope_bytes(upsert("oi TEXT", phone="5511955550005")).replace(
        b"TEXT", bad.encode())
    resp = await api.client.post(f"/webhook-ingest?company_id={api.company_id}", data=envelope,
                                 headers=INGEST)
    body = strict_loads(await resp.text())
    assert resp.status == 202 and body["match"] == "none", body
    other = f'{{"anything": "{bad}", "{bad}": [1]}}'.encode()
    resp = await api.client.post("/webhook-ingest", data=other, headers={
        **INGEST, "X-Webhook-Source": "n8n"})
    assert resp.status == 202, await resp.text()


@pytest.mark.parametrize("path", [
    "/webhook/empresa-123%00", "/webhook-ingest?source=%00", "/webhook-ingest?company_id=a%00",
    "/tracking?x=%00"])
async def test_nul_in_the_address_of_a_post_is_400(api, path):
    headers = {**INGEST, "X-Webhook-Secret": api.webhook_secret}
    status, body = await post_raw(api, path, envelope_bytes(upsert("oi")), headers)
    assert status == 400, body
    assert "NUL" in body["error"]
    assert await count(api, "webhook_deliveries") == 0 and await count(api, "visits") == 0


@pytest.mark.parametrize("path", [
    "/public/get-connection?connectionId=%00",
    "/public/get-connection?connectionId=loja%00centro",
    "/qrcode/generate-qrcode?instanceId=loja-centro&c=%00&exp=9999999999&sig=x",
    "/qrcode/generate-qrcode?instanceId=%00",
    "/connect/x?c=%00&exp=9999999999&sig=x",
    "/connect/x%00y?c=empresa-123&exp=9999999999&sig=x",
    "/api/leads?company_id=%00", "/api/leads?utm_source=%00", "/api/report?from=%00",
    "/api/connections?company_id=x%00"])
async def test_nul_in_the_address_of_a_get_is_400_even_unauthenticated(api, path):
    for headers in ({}, api.auth, {"Accept": "text/html"}):
        resp = await api.client.get(path, headers=headers)
        body = strict_loads(await resp.text())
        assert resp.status == 400, (path, body)
        assert "NUL" in body["error"]


async def raw_http(api, request: bytes) -> tuple[int, bytes]:
    """One request written byte for byte (headers that are not UTF-8 cannot be sent otherwise)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", api.client.server.port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_headers_that_are_not_utf8_are_no_500(api):
    body = tracking()
    status, _ = await raw_http(api, b"POST /tracking HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                               b"User-Agent: Mozilla \xff\xfe\r\nContent-Type: text/plain\r\n"
                               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert status == 200
    assert (await api.db.fetchone("SELECT user_agent FROM visits"))["user_agent"] == \
        "Mozilla \ufffd\ufffd"
    for header in (b"Authorization: Bearer \xff\xfe", b"Authorization: Bearer wt_\xed\xa0\x80"):
        status, answer = await raw_http(api, b"GET /api/leads HTTP/1.1\r\nHost: x\r\n"
                                        b"Connection: close\r\n" + header + b"\r\n\r\n")
        assert status == 401, answer
    raw = envelope_bytes(upsert("oi", phone="5511955550006"))
    status, answer = await raw_http(
        api, f"POST /webhook/{api.company_id} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
             f"X-Webhook-Secret: {api.webhook_secret}\r\nContent-Type: application/json\r\n"
             f"Content-Length: {len(raw)}\r\n".encode() + b"User-Agent: evo \xff\r\n"
        b"X-Instance-Name: \xed\xa0\x80\r\n\r\n" + raw)
    assert status == 200, answer
    stored = await api.db.fetchone("SELECT headers FROM webhook_deliveries")
    assert json.loads(stored["headers"])["User-Agent"] == "evo \ufffd"
    status, answer = await raw_http(api, b"POST /webhook/nobody HTTP/1.1\r\nHost: x\r\n"
                                    b"Connection: close\r\nX-Webhook-Secret: \xff\r\n"
                                    b"Content-Length: 2\r\n\r\n{}")
    assert status == 404, answer


# ------------------------------------------------------------------------------------------------
# D5: integers past 64 bits, dates past year 9999
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,status", [
    ("GET", f"/api/leads/{HUGE}/events", 404),
    ("POST", f"/api/leads/{HUGE}/events", 404),
    ("GET", f"/api/deliveries?lead_id={HUGE}", 400),
    ("POST", f"/api/deliveries/{HUGE}/retry", 404),
    ("GET", f"/api/leads?cursor={HUGE}", 400),
    ("GET", "/api/leads/9223372036854775808/events", 404),  # 2**63
    ("GET", "/api/leads/%C2%B2/events", 404),  # "²": a digit to str.isdigit, not to int()
    ("GET", "/api/deliveries?lead_id=%C2%B2", 400),
    ("GET", "/api/deliveries?lead_id=", 400),
    ("GET", "/api/leads?cursor=-1", 400),
])
async def test_ids_past_64_bits_or_not_plain_digits_are_4xx(api, method, path, status):
    resp = await api.client.request(method, path, headers=api.auth,
                                    json={"name": "lost"} if method == "POST" else None)
    body = strict_loads(await resp.text())
    assert resp.status == status, body


async def test_the_largest_64_bit_id_is_a_plain_not_found(api):
    resp = await api.client.get("/api/leads/9223372036854775807/events", headers=api.auth)
    assert resp.status == 404
    resp = await api.client.get("/api/deliveries?lead_id=9223372036854775807", headers=api.auth)
    assert resp.status == 200 and (await resp.json())["deliveries"] == []


async def test_a_report_from_year_1_to_9999_is_everything(api):
    await new_lead(api)
    for query in ("from=0001-01-01&to=9999-12-31", "from=0001-01-01&to=9999-12-31&group_by=day"):
        resp = await api.client.get(f"/api/report?{query}", headers=api.auth)
        body = strict_loads(await resp.text())
        assert resp.status == 200, body
        assert body["totals"]["leads"] == 1
    resp = await api.client.get("/api/leads?from=0001-01-01&to=9999-12-31", headers=api.auth)
    assert resp.status == 200 and len((await resp.json())["leads"]) == 1
    resp = await api.client.get("/api/exports/google-ads.csv?from=0001-01-01&to=9999-12-31",
                                headers=api.auth)
    assert resp.status == 200


async def test_a_company_east_of_utc_can_ask_from_year_1(api):
    resp = await api.client.patch("/api/company", json={"timezone": "Asia/Tokyo"},
                                  headers=api.auth)
    assert resp.status == 200
    resp = await api.client.get("/api/report?from=0001-01-01&to=9999-12-31", headers=api.auth)
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("query", ["from=10000-01-01", "from=0000-12-31", "to=9999-13-01"])
async def test_times_no_answer_could_show_are_400(api, query):
    for path in ("/api/report", "/api/leads", "/api/exports/google-ads.csv"):
        resp = await api.client.get(f"{path}?{query}", headers=api.auth)
        body = strict_loads(await resp.text())
        assert resp.status == 400, (path, query, body)


@pytest.mark.parametrize("query", ["from=0001-01-01T00:00:00%2B01:00",
                                   "to=9999-12-31T23:59:59-01:00"])
async def test_a_valid_time_past_either_end_is_that_end(api, query):
    # openapi.json's date-time allows them (the fuzz test sends them): a bound, so the end.
    for path in ("/api/report", "/api/leads", "/api/exports/google-ads.csv"):
        resp = await api.client.get(f"{path}?{query}", headers=api.auth)
        assert resp.status == 200, (path, query, await resp.text())


# ------------------------------------------------------------------------------------------------
# D6: timestamps out of range
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stamp", ["1e308", "-1e18", "-1", "100000000000000000000000000000",
                                   "9" * 400, "4102444800"])  # ..., the year 2100
async def test_a_message_timestamp_out_of_range_makes_a_lead_at_the_receipt_time(api, stamp):
    raw = envelope_bytes(upsert("oi", phone="5511955550007")).replace(
        b'"messageTimestamp": 1761057639', f'"messageTimestamp": {stamp}'.encode())
    assert stamp.encode() in raw
    before = time.time()
    status, body = await post_raw(api, f"/webhook/{api.company_id}", raw,
                                  {"X-Webhook-Secret": api.webhook_secret})
    assert status == 200 and body["match"] == "none", body
    resp = await api.client.get(f"/api/leads/{body['lead_id']}/events", headers=api.auth)
    (event,) = strict_loads(await resp.text())["events"]
    occurred = whatstracking.datetime.fromisoformat(event["occurred_at"].replace("Z", "+00:00"))
    assert before - 1 <= occurred.timestamp() <= time.time() + 1
    stored = await api.db.fetchone("SELECT body FROM webhook_deliveries")
    assert f'"messageTimestamp": {stamp}'.encode() in bytes(stored["body"])  # the value sent


async def test_a_message_timestamp_in_range_is_kept(api):
    envelope = upsert("oi", phone="5511955550008")
    envelope["data"]["messageTimestamp"] = int(time.time()) - 3600
    lead_id = (await api.webhook(envelope))["lead_id"]
    resp = await api.client.get(f"/api/leads/{lead_id}/events", headers=api.auth)
    occurred = (await resp.json())["events"][0]["occurred_at"]
    assert occurred == whatstracking.iso(float(envelope["data"]["messageTimestamp"]))


@pytest.mark.parametrize("occurred_at", [-1e18, 1e308, -1, "0001-01-01T00:00:00Z",
                                         253402300800, 10 ** 400])  # (the second after 9999)
async def test_a_refused_event_stores_nothing(api, occurred_at):
    """security.md D6: `occurred_at: -1e18` answered 500 and stored the event and its delivery."""
    resp = await api.client.patch("/api/company", headers=api.auth, json={
        "crm_webhook": {"url": "http://127.0.0.1:9/crm", "secret": "s", "enabled": False}})
    assert resp.status == 200, await resp.text()
    lead_id = await new_lead(api)
    resp = await api.client.patch("/api/company", headers=api.auth,
                                  json={"crm_webhook": {"enabled": True}})
    assert resp.status == 200
    before = await counts(api)
    raw = json.dumps({"name": "qualified", "occurred_at": 0}).replace(
        "0}", f"{json.dumps(occurred_at)}}}").encode()
    status, body = await post_raw(api, f"/api/leads/{lead_id}/events", raw, api.auth)
    assert status == 400, body
    assert "occurred_at" in body["error"]
    assert await counts(api) == before
    # the same event at a sensible time is recorded, with its delivery
    status, body = await post_raw(api, f"/api/leads/{lead_id}/events",
                                  b'{"name": "qualified", "occurred_at": 1700000000}', api.auth)
    assert status == 201, body
    after = await counts(api)
    assert (after["lead_events"], after["deliveries"]) == (before["lead_events"] + 1,
                                                         before["deliveries"] + 1)


async def test_times_stored_out_of_range_by_an_older_version_read_as_null(api):
    lead_id = await new_lead(api)
    await api.db.transact(lambda tx: tx.execute(
        "UPDATE lead_events SET occurred_at = ? WHERE lead_id = ?", -1e18, lead_id))
    resp = await api.client.get(f"/api/leads/{lead_id}/events", headers=api.auth)
    assert resp.status == 200
    assert (await resp.json())["events"][0]["occurred_at"] is None


# ------------------------------------------------------------------------------------------------
# A delivery that fails is stored; a refusal stores nothing
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def broken_lead_insert(monkeypatch):
    """Processing succeeds, then the deferred INSERT of the new lead fails (at the end of the
    transaction, outside process_envelope: security.md D5's lost deliveries)."""
    monkeypatch.setattr(whatstracking, "LEAD_INSERT",
                        whatstracking.LEAD_INSERT.replace("INTO leads", "INTO no_such_table"))


async def test_a_delivery_failing_after_processing_is_stored_as_failed_and_answered_202(
        api, broken_lead_insert):
    envelope = upsert("oi", phone="5511955550009")
    resp = await api.client.post(f"/webhook/{api.company_id}", json=envelope,
                                 headers={"X-Webhook-Secret": api.webhook_secret})
    body = strict_loads(await resp.text())
    assert resp.status == 202, body
    assert body["ok"] is False and body["status"] == "failed"
    assert body["request_id"] == resp.headers["X-Request-Id"]
    row = await api.db.fetchone("SELECT * FROM webhook_deliveries WHERE id = ?",
                                body["delivery_id"])
    assert row["status"] == "failed" and "no_such_table" in row["error"]
    assert row["company_id"] == api.company_id and row["instance"] == "loja-centro"
    assert json.loads(bytes(row["body"]))["data"] == envelope["data"]
    assert await count(api, "leads") == 0 and await count(api, "contacts") == 0


async def test_failing_deliveries_in_a_batch_are_all_stored(api, broken_lead_insert):
    async def post(n: int):
        resp = await api.client.post(f"/webhook/{api.company_id}",
                                     json=upsert(f"oi {n}", phone=f"55119666{n:05d}"),
                                     headers={"X-Webhook-Secret": api.webhook_secret})
        return resp.status

    statuses = await asyncio.gather(*(post(n) for n in range(12)))
    assert statuses == [202] * 12
    rows = await api.db.fetchall("SELECT status FROM webhook_deliveries")
    assert [r["status"] for r in rows] == ["failed"] * 12


async def test_an_unauthenticated_failing_delivery_is_still_refused(api, broken_lead_insert):
    resp = await api.client.post(f"/webhook/{api.company_id}", json=upsert("oi"),
                                 headers={"X-Webhook-Secret": "wrong"})
    assert resp.status == 401
    assert await count(api, "webhook_deliveries") == 0


async def test_an_ingested_delivery_failing_after_processing_is_stored(api, broken_lead_insert):
    resp = await api.client.post(f"/webhook-ingest?company_id={api.company_id}&source=relay",
                                 json=upsert("oi", phone="5511955550010"), headers=INGEST)
    body = strict_loads(await resp.text())
    assert resp.status == 202 and body["status"] == "failed", body
    row = await api.db.fetchone("SELECT status, source FROM webhook_deliveries")
    assert (row["status"], row["source"]) == ("failed", "relay")


# ------------------------------------------------------------------------------------------------
# `apikey` redacted from stored bodies
# ------------------------------------------------------------------------------------------------

async def test_the_apikey_authenticates_then_is_redacted_from_the_stored_body(api):
    await api.db.transact(lambda tx: tx.execute(
        "INSERT INTO connections (company_id, id, instance_token, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?)", api.company_id, "loja-centro", TOKEN, 1.0, 1.0))
    envelope = fixture("messages-upsert-conversation")
    assert envelope["apikey"] == TOKEN
    raw = json.dumps(envelope, indent=2).encode()
    answer = await api.webhook(raw, secret=None)  # authenticated by the apikey alone
    assert "lead_id" in answer
    wrong = json.dumps({**envelope, "apikey": "0" * 36}).encode()
    await api.webhook(wrong, expect=401, secret=None)
    stored = bytes((await api.db.fetchone("SELECT body FROM webhook_deliveries"))["body"])
    assert TOKEN.encode() not in stored
    assert json.loads(stored) == {**envelope, "apikey": "[redacted]"}  # valid JSON, all else kept
    assert stored == raw.replace(TOKEN.encode(), b"[redacted]")  # and its layout


async def test_the_apikey_is_redacted_from_ingested_and_refused_bodies(api):
    envelope = fixture("messages-upsert-conversation")
    envelope["apikey"] = 'tok"en\\with escapes'
    resp = await api.client.post(f"/webhook-ingest?company_id={api.company_id}",
                                 json=envelope, headers=INGEST)
    assert resp.status == 202
    not_json = b'{"event": "messages.upsert", "apikey" : "' + TOKEN.encode() + b'", NaN'
    await api.webhook(not_json, expect=400)
    bodies = [bytes(r["body"]) for r in await api.db.fetchall(
        "SELECT body FROM webhook_deliveries ORDER BY id")]
    assert json.loads(bodies[0])["apikey"] == "[redacted]"
    assert bodies[1] == b'{"event": "messages.upsert", "apikey" : "[redacted]", NaN'
    assert not any(TOKEN.encode() in b or b"with escapes" in b for b in bodies)


def test_a_key_named_apikey_inside_a_string_is_text():
    raw = json.dumps({"data": {"text": 'my "apikey": "x"'}, "apikey": "tok"}).encode()
    assert json.loads(whatstracking.redact_apikey(raw)) == {
        "data": {"text": 'my "apikey": "x"'}, "apikey": "[redacted]"}


# ------------------------------------------------------------------------------------------------
# The stored QR string is capped
# ------------------------------------------------------------------------------------------------

async def test_a_qr_longer_than_the_cap_from_a_webhook_is_not_kept(api):
    envelope = fixture("qrcode-updated")
    real = envelope["data"]["qrcode"]["code"]
    answer = await api.webhook(envelope)
    assert answer["qrcode"] is True
    row = await api.db.fetchone("SELECT qr_code FROM connections")
    assert row["qr_code"] == real
    envelope["data"]["qrcode"]["code"] = "2@" + "A" * 4094
    answer = await api.webhook(envelope)
    assert answer["ignored"] == "qr code longer than 1024 characters"
    assert (await api.db.fetchone("SELECT qr_code FROM connections"))["qr_code"] is None
    envelope["data"]["qrcode"]["code"] = real[:1] + "A" * (whatstracking.QR_CODE_MAX - 1)
    assert (await api.webhook(envelope))["qrcode"] is True


async def test_a_qr_longer_than_the_cap_from_evolution_is_502_and_not_kept(
        make_config, evolution, aiohttp_client):
    client = await aiohttp_client(whatstracking.create_app(make_config(
        EVOLUTION_API_URL=evolution.url, EVOLUTION_API_KEY=evolution.global_key,
        ALLOW_PRIVATE_URLS="true")))
    company = await create_company(client)
    auth = {"Authorization": f"Bearer {company['token']}"}
    long_code = "2@" + "B" * 2000
    evolution.override("POST", "/instance/create", 201, {
        "instance": {"instanceName": "loja", "instanceId": "i-1", "status": "connecting"},
        "hash": "TOKEN-1", "qrcode": {"code": long_code, "pairingCode": None}})
    resp = await client.post("/api/create-instance", json={"connectionId": "loja"}, headers=auth)
    body = strict_loads(await resp.text())
    assert resp.status == 201, body
    assert body["qrcode"] is None
    db = client.app[whatstracking.DB]
    assert (await db.fetchone("SELECT qr_code FROM connections"))["qr_code"] is None
    evolution.add_instance("loja", code=long_code)
    resp = await client.get("/qrcode/generate-qrcode?instanceId=loja&format=png", headers=auth)
    body = strict_loads(await resp.text())
    assert resp.status == 502 and "longer than 1024" in body["error"], body
    assert (await db.fetchone("SELECT qr_code FROM connections"))["qr_code"] is None
