"""POST /tracking and GET /scripts/whatsapp-tracker.js (SPEC §5), on SQLite and on Postgres."""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid

import aiohttp
import pytest

import whatstracking
from conftest import served_tracker, upsert

SEED_BODY = {"companie_id": "empresa-123", "page_url": "https://seusite.com/produto",
             "utm_source": "google", "utm_campaign": "black-friday"}


def visitor() -> str:
    return "v-" + uuid.uuid4().hex


def assert_code(code) -> None:
    assert isinstance(code, str) and len(code) == 7
    assert whatstracking.normalize_code(code) == code


def broken_check(code: str) -> str:
    """The same code with a wrong check character: well-shaped, but not a valid code."""
    wrong = next(c for c in whatstracking.CROCKFORD if c != code[-1])
    return code[:-1] + wrong


async def counts(api) -> tuple[int, int]:
    events = await api.db.fetchone("SELECT COUNT(*) AS n FROM tracking_events")
    visits = await api.db.fetchone("SELECT COUNT(*) AS n FROM visits")
    return int(events["n"]), int(visits["n"])


async def lead_for(api, code: str, phone: str) -> dict:
    """Send a WhatsApp message carrying ``code`` and return the lead it produced."""
    result = await api.webhook(upsert(f"Olá! Quero saber mais {whatstracking.message_code(code)}",
                                      phone=phone))
    assert result["match"] == "code", result
    leads = [lead for lead in await api.leads() if lead["id"] == result["lead_id"]]
    assert len(leads) == 1
    assert leads[0]["code"] == code
    return leads[0]


# ------------------------------------------------------------------------------------------------
# The seed's minimal body
# ------------------------------------------------------------------------------------------------

async def test_seed_minimal_body_as_json_answers_ok_with_session_and_code(api):
    resp = await api.client.post("/tracking", json=SEED_BODY)
    data = await resp.json()
    assert resp.status == 200, data
    assert data["ok"] is True
    assert data["session_id"]
    assert_code(data["code"])


async def test_seed_minimal_body_as_text_plain_answers_ok_with_session_and_code(api):
    resp = await api.client.post("/tracking", data=json.dumps(SEED_BODY),
                                 headers={"Content-Type": "text/plain"})
    data = await resp.json()
    assert resp.status == 200, data
    assert data["ok"] is True
    assert data["session_id"]
    assert_code(data["code"])
    events, visits = await counts(api)
    assert (events, visits) == (1, 1)


async def test_company_id_spelling_is_accepted(api):
    body = {k: v for k, v in SEED_BODY.items() if k != "companie_id"}
    resp = await api.client.post("/tracking", json={"company_id": "empresa-123", **body})
    data = await resp.json()
    assert resp.status == 200, data
    assert_code(data["code"])


async def test_seed_body_attribution_reaches_the_lead(api):
    data = await api.track(**{k: v for k, v in SEED_BODY.items() if k != "companie_id"})
    lead = await lead_for(api, data["code"], "5511911110001")
    assert lead["match_method"] == "code"
    assert lead["attribution"]["utm_source"] == "google"
    assert lead["attribution"]["utm_campaign"] == "black-friday"
    assert lead["attribution"]["page_url"] == "https://seusite.com/produto"
    assert lead["session_id"] == data["session_id"]


# ------------------------------------------------------------------------------------------------
# Codes
# ------------------------------------------------------------------------------------------------

async def test_well_formed_unowned_code_from_the_browser_is_adopted(api):
    code = whatstracking.new_code()
    data = await api.track(visitor_id=visitor(), code=code, page_url="https://seusite.com/")
    assert data["code"] == code


async def test_lowercase_code_from_the_browser_is_adopted_in_canonical_form(api):
    code = whatstracking.new_code()
    data = await api.track(visitor_id=visitor(), code=code.lower())
    assert data["code"] == code


async def test_code_owned_by_another_visitor_is_not_adopted(api):
    first = await api.track(visitor_id=visitor(), page_url="https://seusite.com/")
    second = await api.track(visitor_id=visitor(), code=first["code"],
                             page_url="https://seusite.com/")
    assert second["code"] != first["code"]
    assert second["session_id"] != first["session_id"]
    assert_code(second["code"])
    # The owner still has it.
    again = await api.track(visitor_id=first["visitor_id"], code=first["code"])
    assert again["code"] == first["code"]


async def test_malformed_code_is_replaced_by_a_new_one(api):
    bad = broken_check(whatstracking.new_code())
    assert whatstracking.normalize_code(bad) is None
    data = await api.track(visitor_id=visitor(), code=bad)
    assert data["code"] != bad
    assert_code(data["code"])
    for junk in ("x", "ABC", "not a code at all"):
        data = await api.track(visitor_id=visitor(), code=junk)
        assert_code(data["code"])


async def test_same_visitor_twice_keeps_its_code_and_session(api):
    vid = visitor()
    first = await api.track(visitor_id=vid, page_url="https://seusite.com/?utm_source=google")
    second = await api.track(visitor_id=vid, code=first["code"],
                             page_url="https://seusite.com/contato")
    assert second["code"] == first["code"]
    assert second["session_id"] == first["session_id"]
    # Even when the browser lost the code (cleared storage), the visitor id finds the visit.
    third = await api.track(visitor_id=vid, page_url="https://seusite.com/sobre")
    assert (third["code"], third["session_id"]) == (first["code"], first["session_id"])
    row = await api.db.fetchone("SELECT pageviews FROM visits WHERE id = ?", first["session_id"])
    assert row["pageviews"] == 3


# ------------------------------------------------------------------------------------------------
# Attribution
# ------------------------------------------------------------------------------------------------

async def test_utms_and_click_ids_missing_from_body_are_read_from_page_url(api):
    page = ("https://seusite.com/produto?utm_source=google&utm_medium=cpc&utm_campaign=verao"
            "&utm_term=tenis&utm_content=banner-a&gclid=Cj0KCQ-gclid&fbclid=IwAR-fbclid")
    data = await api.track(visitor_id=visitor(), page_url=page)
    lead = await lead_for(api, data["code"], "5511911110002")
    attribution = lead["attribution"]
    assert attribution["utm_source"] == "google"
    assert attribution["utm_medium"] == "cpc"
    assert attribution["utm_campaign"] == "verao"
    assert attribution["utm_term"] == "tenis"
    assert attribution["utm_content"] == "banner-a"
    assert attribution["gclid"] == "Cj0KCQ-gclid"
    assert attribution["fbclid"] == "IwAR-fbclid"
    assert attribution["page_url"] == page


async def test_body_values_win_over_the_page_url_query(api):
    page = "https://seusite.com/?utm_source=google&utm_campaign=from-query&gclid=query-gclid"
    data = await api.track(visitor_id=visitor(), page_url=page, utm_source="facebook",
                           gclid="body-gclid")
    lead = await lead_for(api, data["code"], "5511911110003")
    assert lead["attribution"]["utm_source"] == "facebook"
    assert lead["attribution"]["gclid"] == "body-gclid"
    # What the body does not say still comes from the query.
    assert lead["attribution"]["utm_campaign"] == "from-query"


async def test_second_page_without_utms_keeps_the_visits_last_touch(api):
    vid = visitor()
    landing = "https://seusite.com/promo?utm_source=google&utm_medium=cpc&utm_campaign=natal"
    first = await api.track(visitor_id=vid, page_url=landing)
    second = await api.track(visitor_id=vid, code=first["code"],
                             page_url="https://seusite.com/contato",
                             referrer="https://seusite.com/promo")
    assert second["code"] == first["code"]
    lead = await lead_for(api, first["code"], "5511911110004")
    attribution = lead["attribution"]
    assert attribution["utm_source"] == "google"
    assert attribution["utm_medium"] == "cpc"
    assert attribution["utm_campaign"] == "natal"
    assert attribution["landing_page"] == landing


async def test_new_campaign_replaces_last_touch_and_keeps_first_touch(api):
    vid = visitor()
    first = await api.track(visitor_id=vid,
                            page_url="https://seusite.com/?utm_source=google&utm_campaign=natal")
    second = await api.track(visitor_id=vid, code=first["code"],
                             page_url="https://seusite.com/?utm_source=facebook"
                                      "&utm_campaign=carnaval&fbclid=fb-123")
    assert second["code"] == first["code"]
    lead = await lead_for(api, second["code"], "5511911110005")
    assert lead["attribution"]["utm_source"] == "facebook"
    assert lead["attribution"]["utm_campaign"] == "carnaval"
    assert lead["attribution"]["fbclid"] == "fb-123"
    assert lead["first_touch"]["utm_source"] == "google"
    assert lead["first_touch"]["utm_campaign"] == "natal"


async def test_first_touch_sent_by_the_browser_is_kept_on_the_lead(api):
    data = await api.track(
        visitor_id=visitor(), page_url="https://seusite.com/?utm_source=tiktok",
        first_touch={"utm_source": "google", "utm_campaign": "primeira",
                     "landing_page": "https://seusite.com/lp", "ts": 1700000000000})
    lead = await lead_for(api, data["code"], "5511911110006")
    assert lead["attribution"]["utm_source"] == "tiktok"
    assert lead["first_touch"]["utm_source"] == "google"
    assert lead["first_touch"]["utm_campaign"] == "primeira"
    assert lead["first_touch"]["landing_page"] == "https://seusite.com/lp"


async def test_after_a_lead_a_new_campaign_gives_the_visitor_a_new_code(api):
    vid = visitor()
    phone = "5511911110007"
    first = await api.track(visitor_id=vid,
                            page_url="https://seusite.com/?utm_source=google&utm_campaign=natal")
    first_lead = await lead_for(api, first["code"], phone)
    # Same campaign, same code: nothing new to attribute.
    same = await api.track(visitor_id=vid, code=first["code"], page_url="https://seusite.com/b")
    assert same["code"] == first["code"]
    # A new ad click: a new code, so the next message makes a new lead with the new campaign.
    second = await api.track(visitor_id=vid, code=first["code"],
                             page_url="https://seusite.com/?utm_source=facebook"
                                      "&utm_campaign=carnaval")
    assert second["code"] != first["code"]
    assert second["session_id"] != first["session_id"]
    assert_code(second["code"])
    second_lead = await lead_for(api, second["code"], phone)
    assert second_lead["id"] != first_lead["id"]
    assert second_lead["attribution"]["utm_campaign"] == "carnaval"
    assert second_lead["first_touch"]["utm_campaign"] == "natal"
    assert first_lead["attribution"]["utm_campaign"] == "natal"


async def test_portuguese_and_emoji_campaign_round_trips_to_the_lead(api):
    campaign = "promoção-verão ☀️"
    resp = await api.client.post("/tracking", data=json.dumps(
        {"company_id": api.company_id, "visitor_id": visitor(), "utm_source": "instagram",
         "utm_campaign": campaign, "page_url": "https://seusite.com/ofertas"},
        ensure_ascii=False).encode("utf-8"), headers={"Content-Type": "text/plain;charset=UTF-8"})
    data = await resp.json()
    assert resp.status == 200, data
    lead = await lead_for(api, data["code"], "5511911110008")
    assert lead["attribution"]["utm_campaign"] == campaign


async def test_percent_encoded_campaign_in_page_url_is_decoded(api):
    page = "https://seusite.com/?utm_campaign=promo%C3%A7%C3%A3o%20ver%C3%A3o"
    data = await api.track(visitor_id=visitor(), page_url=page)
    lead = await lead_for(api, data["code"], "5511911110009")
    assert lead["attribution"]["utm_campaign"] == "promoção verão"


async def test_whatsapp_click_records_a_click_on_the_visit(api):
    vid = visitor()
    view = await api.track(visitor_id=vid, page_url="https://seusite.com/?utm_source=google")
    row = await api.db.fetchone("SELECT clicks, clicked_at FROM visits WHERE id = ?",
                                view["session_id"])
    assert row["clicks"] == 0 and row["clicked_at"] is None
    click = await api.track(visitor_id=vid, code=view["code"], event="whatsapp_click",
                            whatsapp_phone="+55 (11) 98888-7777")
    assert click["code"] == view["code"]
    row = await api.db.fetchone(
        "SELECT clicks, clicked_at, click_phone, pageviews FROM visits WHERE id = ?",
        view["session_id"])
    assert row["clicks"] == 1
    assert row["clicked_at"] is not None
    assert row["click_phone"] == "5511988887777"
    assert row["pageviews"] == 1
    event = await api.db.fetchone(
        "SELECT event, whatsapp_phone FROM tracking_events WHERE visit_id = ? "
        "AND event = 'whatsapp_click'", view["session_id"])
    assert event["whatsapp_phone"] == "5511988887777"
    lead = await lead_for(api, view["code"], "5511911110010")
    assert lead["clicked_at"] is not None and lead["clicked_at"].endswith("Z")


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

async def test_unknown_company_is_404(api):
    resp = await api.client.post("/tracking", json={**SEED_BODY, "companie_id": "nobody-here"})
    assert resp.status == 404
    assert await resp.json() == {"error": "Company not found"}
    assert await counts(api) == (0, 0)


BAD_BODIES = [
    pytest.param(b"[1, 2, 3]", "body", id="non-object"),
    pytest.param(b'"just a string"', "body", id="string"),
    pytest.param(b'{"company_id": "empresa-123", ', "json", id="invalid-json"),
    pytest.param(b"\xff\xfe not utf-8", "json", id="not-utf8"),
    pytest.param(json.dumps({"page_url": "https://seusite.com/"}).encode(), "company_id",
                 id="missing-company"),
    pytest.param(json.dumps({"company_id": 123}).encode(), "company_id", id="company-number"),
    pytest.param(json.dumps({"company_id": "empresa-123", "utm_source": {"a": 1}}).encode(),
                 "utm_source", id="utm-object"),
    pytest.param(json.dumps({"company_id": "empresa-123", "utm_campaign": ["a"]}).encode(),
                 "utm_campaign", id="utm-list"),
    pytest.param(json.dumps({"company_id": "empresa-123", "event": "purchase"}).encode(),
                 "event", id="bad-event"),
    pytest.param(json.dumps({"company_id": "empresa-123", "first_touch": "google"}).encode(),
                 "first_touch", id="first-touch-string"),
    pytest.param(json.dumps({"company_id": "empresa-123",
                             "first_touch": {"utm_source": {"x": 1}}}).encode(),
                 "first_touch.utm_source", id="first-touch-inner"),
    pytest.param(json.dumps({"company_id": "empresa-123", "utm_campaign": "x" * 2049}).encode(),
                 "utm_campaign", id="too-long"),
    pytest.param(json.dumps({"company_id": "empresa-123",
                             "page_url": "https://seusite.com/" + "p" * 4096}).encode(),
                 "page_url", id="url-too-long"),
    pytest.param(json.dumps({"company_id": "empresa-123", "visitor_id": "a b<c>"}).encode(),
                 "visitor_id", id="bad-visitor"),
]


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
@pytest.mark.parametrize("raw,field", BAD_BODIES)
async def test_bad_body_is_400_naming_the_field_and_writes_nothing(api, raw, field, content_type):
    resp = await api.client.post("/tracking", data=raw, headers={"Content-Type": content_type})
    data = await resp.json()
    assert resp.status == 400, data
    assert isinstance(data["error"], str)
    assert field.lower() in data["error"].lower(), data
    assert await counts(api) == (0, 0)


async def test_value_at_the_limit_is_accepted(api):
    data = await api.track(visitor_id=visitor(), utm_campaign="x" * whatstracking.FIELD_MAX)
    lead = await lead_for(api, data["code"], "5511911110011")
    assert lead["attribution"]["utm_campaign"] == "x" * whatstracking.FIELD_MAX


async def test_body_over_64_kib_is_413_and_writes_nothing(api):
    body = json.dumps({"company_id": api.company_id, "visitor_id": visitor(),
                       "padding": "x" * (64 * 1024)}).encode()
    assert len(body) > 64 * 1024
    resp = await api.client.post("/tracking", data=body, headers={"Content-Type": "text/plain"})
    assert resp.status == 413
    data = await resp.json()
    assert "error" in data
    assert await counts(api) == (0, 0)


async def test_body_of_64_kib_with_unknown_fields_is_accepted(api):
    body = {"company_id": api.company_id, "visitor_id": visitor(), "padding": ""}
    size = len(json.dumps(body).encode())
    body["padding"] = "x" * (64 * 1024 - size)
    raw = json.dumps(body).encode()
    assert len(raw) == 64 * 1024
    resp = await api.client.post("/tracking", data=raw, headers={"Content-Type": "text/plain"})
    assert resp.status == 200, await resp.text()


# ------------------------------------------------------------------------------------------------
# CORS
# ------------------------------------------------------------------------------------------------

async def test_preflight_is_204_with_cors_headers(api):
    resp = await api.client.options("/tracking", headers={
        "Origin": "https://loja.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] in ("https://loja.test", "*")
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert "content-type" in resp.headers["Access-Control-Allow-Headers"].lower()


async def test_post_with_an_origin_gets_it_echoed(api):
    resp = await api.client.post("/tracking", json=SEED_BODY,
                                 headers={"Origin": "https://seusite.com"})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "https://seusite.com"


async def test_allowed_origins_restricts_tracking(api):
    resp = await api.client.patch("/api/company", json={"allowed_origins": ["https://loja.test"]},
                                  headers=api.auth)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["allowed_origins"] == ["https://loja.test"]

    resp = await api.client.post("/tracking", json=SEED_BODY,
                                 headers={"Origin": "https://intruso.test"})
    assert resp.status == 403
    assert "error" in await resp.json()
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert await counts(api) == (0, 0)

    resp = await api.client.post("/tracking", json=SEED_BODY,
                                 headers={"Origin": "https://loja.test"})
    data = await resp.json()
    assert resp.status == 200, data
    assert resp.headers["Access-Control-Allow-Origin"] == "https://loja.test"
    assert_code(data["code"])
    assert await counts(api) == (1, 1)


# ------------------------------------------------------------------------------------------------
# The tracker script
# ------------------------------------------------------------------------------------------------

async def test_tracker_script_is_served_with_caching_headers(client):
    async with aiohttp.ClientSession(auto_decompress=False,
                                     skip_auto_headers=["Accept-Encoding"]) as session:
        async with session.get(client.make_url("/scripts/whatsapp-tracker.js")) as resp:
            body = await resp.read()
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("application/javascript")
            assert resp.headers.get("ETag")
            assert "max-age" in resp.headers["Cache-Control"]
            assert "Content-Encoding" not in resp.headers
    assert body == served_tracker()


async def test_tracker_script_is_gzipped_when_accepted(client):
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(client.make_url("/scripts/whatsapp-tracker.js"),
                               headers={"Accept-Encoding": "gzip"}) as resp:
            body = await resp.read()
            assert resp.status == 200
            assert resp.headers["Content-Encoding"] == "gzip"
            assert resp.headers["Content-Type"].startswith("application/javascript")
            assert "Accept-Encoding" in resp.headers.get("Vary", "")
    assert gzip.decompress(body) == served_tracker()
    assert len(body) < len(whatstracking.TRACKER_PATH.read_bytes())


async def test_tracker_script_answers_304_to_a_matching_etag(client):
    resp = await client.get("/scripts/whatsapp-tracker.js")
    etag = resp.headers["ETag"]
    again = await client.get("/scripts/whatsapp-tracker.js", headers={"If-None-Match": etag})
    assert again.status == 304
    assert again.headers["ETag"] == etag
    assert await again.read() == b""
    other = await client.get("/scripts/whatsapp-tracker.js",
                             headers={"If-None-Match": '"something-else"'})
    assert other.status == 200


async def test_concurrent_requests_of_one_visitor_with_a_new_code_share_one_visit(api):
    # The tracker sends its first pageview and a click at once with the code it made itself;
    # on Postgres both transactions run side by side and must still end in one visit.
    code = whatstracking.new_code()
    for round_ in range(5):
        visitor = f"racer-{round_}"
        code = whatstracking.new_code()
        answers = await asyncio.gather(*[
            api.track(visitor_id=visitor, code=code, page_url="https://loja.test/?utm_source=x")
            for _ in range(6)])
        assert {a["code"] for a in answers} == {code}
        assert len({a["session_id"] for a in answers}) == 1
        row = await api.db.fetchone("SELECT COUNT(*) AS n FROM visits WHERE visitor_id = ?",
                                    visitor)
        assert row["n"] == 1
