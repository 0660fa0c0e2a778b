"""Reports and lead exports (SPEC §8) on SQLite and on Postgres: GET /api/report, GET /api/leads
(filters, cursor pagination, CSV) and company isolation.

The data set is built through the public API (tracking, Evolution webhooks, lead events) and then
placed in time with direct SQL (visits' and leads' created_at). Every expected number below was
counted BY HAND from the table in the docstring of `seed`; nothing here re-implements the report.
"""

from __future__ import annotations

import csv
import io
import itertools
import uuid
from datetime import datetime

import pytest

import whatstracking
from conftest import Api, create_company, fixture, upsert

CENTRO = "5511900001111"  # loja-centro's number (the wuid of connection-update-open.json)
SUL = "5511900002222"  # loja-sul's number
SITE = "https://loja.test/oferta"
GOOGLE = "utm_source=google&utm_medium=cpc&utm_campaign=black-friday"
FACEBOOK = "utm_source=facebook&utm_medium=paid_social&utm_campaign=verao"
INSTAGRAM = "utm_source=instagram&utm_medium=social&utm_campaign=stories"
AD_1 = "120212345678900123"  # the sourceId of messages-upsert-ctwa-ad.json
AD_2 = "120299999999999999"
METHODS = ("code", "ctwa", "window", "none")
CSV_HEADER = ["id", "created_at", "phone", "name", "match_method", "confidence", "code",
              "connection_id", "utm_source", "utm_medium", "utm_campaign", "utm_term",
              "utm_content", "gclid", "fbclid", "ctwa_clid", "ad_id", "ad_title", "landing_page",
              "referrer", "clicked_at", "first_message", "source", "wa_id", "bsuid", "username"]

_phones = itertools.count(5511960000001)


def new_phone() -> str:
    return str(next(_phones))


def ts(when: str) -> float:
    return datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()


async def set_sql(api: Api, sql: str, *args) -> None:
    await api.db.transact(lambda tx: tx.execute(sql, *args))


async def get(api: Api, path: str, expect: int = 200, headers: dict | None = None, **params):
    resp = await api.client.get(path, params=params, headers={**api.auth, **(headers or {})})
    data = await resp.json()
    assert resp.status == expect, data
    return data


async def patch_company(api: Api, **settings) -> dict:
    resp = await api.client.patch("/api/company", json=settings, headers=api.auth)
    data = await resp.json()
    assert resp.status == 200, data
    return data


async def connect(api: Api, instance: str, phone: str, profile: str) -> None:
    """connection.update "open" for ``instance`` with the number ``phone``."""
    envelope = fixture("connection-update-open")
    envelope["instance"] = envelope["data"]["instance"] = instance
    envelope["data"]["wuid"] = f"{phone}@s.whatsapp.net"
    envelope["data"]["profileName"] = profile
    assert (await api.webhook(envelope))["state"] == "open"


async def visit(api: Api, utm: str | None, at: str, click: str | None = None,
                gclid: str | None = None) -> dict:
    """A visitor's pageview (and WhatsApp click to the number ``click``), created at ``at``."""
    query = "&".join(p for p in (utm, f"gclid={gclid}" if gclid else None) if p)
    page = SITE + (f"?{query}" if query else "")
    visitor = uuid.uuid4().hex
    answer = await api.track(visitor_id=visitor, page_url=page)
    if click:
        again = await api.track(visitor_id=visitor, page_url=page, event="whatsapp_click",
                                whatsapp_phone=click, code=answer["code"])
        assert again["session_id"] == answer["session_id"]
    await set_sql(api, "UPDATE visits SET created_at = ? WHERE id = ?", ts(at),
                  answer["session_id"])
    await whatstracking.rebuild_rollup(api.db)  # the report's counters follow the moved visit
    return answer


async def message(api: Api, text: str, name: str, at: str, instance: str = "loja-centro",
                  match: str = "code", phone: str | None = None,
                  envelope: dict | None = None) -> int:
    """A first WhatsApp message that makes a lead (of ``match``), placed at ``at``."""
    if envelope is None:
        envelope = upsert(text, phone=phone or new_phone(), instance=instance)
        envelope["data"].pop("messageTimestamp", None)
    envelope["data"]["pushName"] = name
    answer = await api.webhook(envelope)
    assert answer.get("match") == match, answer
    await set_sql(api, "UPDATE leads SET created_at = ? WHERE id = ?", ts(at), answer["lead_id"])
    return answer["lead_id"]


async def event(api: Api, lead_id: int, name: str, at: str | None = None,
                value: float | None = None) -> dict:
    body = {"name": name, **({"occurred_at": at} if at else {}),
            **({"value": value} if value is not None else {})}
    resp = await api.client.post(f"/api/leads/{lead_id}/events", json=body, headers=api.auth)
    data = await resp.json()
    assert resp.status == 201, data
    return data["event"]


def ctwa_envelope(phone: str, ad_id: str, clid: str, instance: str) -> dict:
    envelope = fixture("messages-upsert-ctwa-ad")
    key = envelope["data"]["key"]
    key["id"] = uuid.uuid4().hex.upper()
    key["remoteJid"] = f"{phone}@s.whatsapp.net"
    key.pop("remoteJidAlt", None)
    envelope["instance"] = instance
    ad = envelope["data"]["contextInfo"]["externalAdReply"]
    ad["sourceId"], ad["ctwaClid"], ad["title"] = ad_id, clid, "Anúncio de verão"
    return envelope


async def seed(api: Api) -> dict[str, int]:
    """The reference data set of company empresa-123 (America/Sao_Paulo, UTC-3, no DST in 2024).

    Connections: loja-centro (CENTRO), loja-sul (SUL). Times are UTC; "SP day" is the local day.

    Visits  source/campaign          created (UTC)     SP day  click   lead
    V1      google/black-friday      11-20 15:00       11-20   centro  L1
    V2      google/black-friday      11-21 02:30       11-20   centro  L2
    V3      google/black-friday      11-21 12:00       11-21   centro  -
    V4      google/black-friday      11-21 13:00       11-21   -       -
    V5      facebook/verao           11-20 12:00       11-20   sul     L3
    V6      facebook/verao           11-22 02:00       11-21   sul     -
    V7      facebook/verao           11-22 15:00       11-22   -       -
    V8      instagram/stories        11-22 16:00       11-22   centro  L4
    V9      instagram/stories        11-22 17:00       11-22   -       -
    V10     (no utm)                 11-21 10:00       11-21   -       -
    V11     instagram/stories        11-23 14:00       11-23   centro  L9 (window)
    V12     google/black-friday      11-10 12:00       11-10   centro  L10
    V13     facebook/verao           12-05 12:00       12-05   sul     -

    Leads   method  connection  created (UTC)   SP day  attribution
    L1      code    centro      11-20 15:10     11-20   google/cpc/black-friday (gclid G-1)
    L2      code    centro      11-21 02:40     11-20   google/cpc/black-friday
    L3      code    sul         11-20 12:05     11-20   facebook/paid_social/verao
    L4      code    centro      11-22 16:10     11-22   instagram/social/stories
    L5      ctwa    centro      11-21 20:00     11-21   meta_ads/ctwa, ad AD_1
    L6      ctwa    sul         11-22 03:00     11-22   meta_ads/ctwa, ad AD_2 (local midnight)
    L7      none    sul         11-20 02:59     11-19   direct ("João")
    L8      none    centro      11-23 12:00     11-23   direct ("Ana 🌸", message "=2+3 ...")
    L9      window  centro      11-23 14:05     11-23   instagram/social/stories
    L10     code    centro      11-10 12:10     11-10   google/cpc/black-friday

    Events  lead  name       value   occurred (UTC)   SP day
    E1      L1    qualified          11-20 18:00      11-20
    E2      L1    purchase   500     11-21 13:00      11-21
    E3      L1    purchase   77      12-05 12:00      12-05
    E4      L2    purchase   300     11-22 12:00      11-22
    E5      L2    refund     300     11-23 12:00      11-23
    E6      L3    qualified          11-20 14:00      11-20
    E7      L3    purchase   150.50  11-21 14:00      11-21
    E8      L5    purchase   1000    11-22 10:00      11-22
    E9      L8    qualified          11-23 13:00      11-23
    E10     L10   purchase   999     11-10 13:00      11-10
    E11     L10   qualified          11-21 12:00      11-21  (lead outside the range)
    E12     L6    lost               11-22 12:00      11-22  (not a report event)
    E13     L5    refund     200     11-24 02:59      11-23  (last minute of the day)
    E14     L4    purchase   250     11-24 03:00      11-24  (first second after it)
    """
    await patch_company(api, timezone="America/Sao_Paulo")
    await connect(api, "loja-centro", CENTRO, "Loja Centro")
    await connect(api, "loja-sul", SUL, "Loja Sul")
    ids: dict[str, int] = {}

    # The window lead first, while V11 is the only recent unmatched click to loja-centro.
    await patch_company(api, window_match=True)
    await visit(api, INSTAGRAM, "2024-11-23T14:00:00Z", click=CENTRO)
    ids["L9"] = await message(api, "Oi, vi o story de vocês", "Gabriel Janela",
                              "2024-11-23T14:05:00Z", match="window")
    await patch_company(api, window_match=False)

    v1 = await visit(api, GOOGLE, "2024-11-20T15:00:00Z", click=CENTRO, gclid="G-1")
    v2 = await visit(api, GOOGLE, "2024-11-21T02:30:00Z", click=CENTRO)
    await visit(api, GOOGLE, "2024-11-21T12:00:00Z", click=CENTRO)
    await visit(api, GOOGLE, "2024-11-21T13:00:00Z")
    v5 = await visit(api, FACEBOOK, "2024-11-20T12:00:00Z", click=SUL)
    await visit(api, FACEBOOK, "2024-11-22T02:00:00Z", click=SUL)
    await visit(api, FACEBOOK, "2024-11-22T15:00:00Z")
    v8 = await visit(api, INSTAGRAM, "2024-11-22T16:00:00Z", click=CENTRO)
    await visit(api, INSTAGRAM, "2024-11-22T17:00:00Z")
    await visit(api, None, "2024-11-21T10:00:00Z")
    v12 = await visit(api, GOOGLE, "2024-11-10T12:00:00Z", click=CENTRO, gclid="G-10")
    await visit(api, FACEBOOK, "2024-12-05T12:00:00Z", click=SUL)

    code = whatstracking.message_code
    ids["L1"] = await message(api, f"Quero o combo {code(v1['code'])}", "Beatriz Google",
                              "2024-11-20T15:10:00Z")
    ids["L2"] = await message(api, f"Oi {code(v2['code'])}", "Caio Google", "2024-11-21T02:40:00Z")
    ids["L3"] = await message(api, f"Olá {code(v5['code'])}", "Diana Facebook",
                              "2024-11-20T12:05:00Z", instance="loja-sul")
    ids["L4"] = await message(api, f"{code(v8['code'])} tem tamanho P?", "Eduardo Instagram",
                              "2024-11-22T16:10:00Z")
    ids["L5"] = await message(api, "", "Rafael Lima", "2024-11-21T20:00:00Z", match="ctwa",
                              envelope=fixture("messages-upsert-ctwa-ad"))
    ids["L6"] = await message(api, "", "Fernanda Anúncio", "2024-11-22T03:00:00Z", match="ctwa",
                              envelope=ctwa_envelope(new_phone(), AD_2, "CLID-2", "loja-sul"))
    ids["L7"] = await message(api, "Olá, vocês entregam em Curitiba?", "João",
                              "2024-11-20T02:59:00Z", instance="loja-sul", match="none")
    ids["L8"] = await message(api, "=2+3 é o preço?", "Ana 🌸", "2024-11-23T12:00:00Z",
                              match="none")
    ids["L10"] = await message(api, f"Ainda vale? {code(v12['code'])}", "Helena Antiga",
                               "2024-11-10T12:10:00Z")

    await event(api, ids["L1"], "qualified", "2024-11-20T18:00:00Z")
    await event(api, ids["L1"], "purchase", "2024-11-21T13:00:00Z", 500)
    await event(api, ids["L1"], "purchase", "2024-12-05T12:00:00Z", 77)
    await event(api, ids["L2"], "purchase", "2024-11-22T12:00:00Z", 300)
    await event(api, ids["L2"], "refund", "2024-11-23T12:00:00Z", 300)
    await event(api, ids["L3"], "qualified", "2024-11-20T14:00:00Z")
    await event(api, ids["L3"], "purchase", "2024-11-21T14:00:00Z", 150.50)
    await event(api, ids["L5"], "purchase", "2024-11-22T10:00:00Z", 1000)
    await event(api, ids["L8"], "qualified", "2024-11-23T13:00:00Z")
    await event(api, ids["L10"], "purchase", "2024-11-10T13:00:00Z", 999)
    await event(api, ids["L10"], "qualified", "2024-11-21T12:00:00Z")
    await event(api, ids["L6"], "lost", "2024-11-22T12:00:00Z")
    await event(api, ids["L5"], "refund", "2024-11-24T02:59:00Z", 200)
    await event(api, ids["L4"], "purchase", "2024-11-24T03:00:00Z", 250)
    return ids


def R(key=None, visits=0, clicks=0, matched=0, code=0, ctwa=0, window=0, none=0, qualified=0,
      conversions=0, revenue=0.0, click_to_lead=None, match_rate=None) -> dict:
    """One report row as /api/report answers it, from hand-counted numbers. A lead matched by
    code or window came through a click on the site; ctwa and none did not. click_to_lead is
    leads with a click ÷ clicks (since issue 15: it counted every lead before)."""
    by_method = {"code": code, "ctwa": ctwa, "window": window, "none": none}
    return {"key": key, "visits": visits, "clicks": clicks, "matched_clicks": matched,
            "leads": sum(by_method.values()), "leads_by_method": by_method,
            "leads_with_click": code + window, "leads_without_click": ctwa + none,
            "qualified": qualified, "conversions": conversions, "revenue": revenue,
            "click_to_lead": click_to_lead, "match_rate": match_rate}


# Range 2024-11-19 .. 2024-11-23 in America/Sao_Paulo: [11-19 03:00Z, 11-24 03:00Z).
RANGE = {"from": "2024-11-19", "to": "2024-11-23"}
TOTALS = R(None, visits=11, clicks=7, matched=5, code=4, ctwa=2, window=1, none=2, qualified=4,
           conversions=4, revenue=1450.5, click_to_lead=0.7143, match_rate=0.7143)
GOOGLE_ROW = dict(visits=4, clicks=3, matched=2, code=2, qualified=2, conversions=2,
                  revenue=500.0, click_to_lead=0.6667, match_rate=0.6667)
FACEBOOK_ROW = dict(visits=3, clicks=2, matched=1, code=1, qualified=1, conversions=1,
                    revenue=150.5, click_to_lead=0.5, match_rate=0.5)
INSTAGRAM_ROW = dict(visits=3, clicks=2, matched=2, code=1, window=1, click_to_lead=1.0,
                     match_rate=1.0)
EXPECTED = {
    "utm_source": [
        R("google", **GOOGLE_ROW),
        R("facebook", **FACEBOOK_ROW),
        R("instagram", **INSTAGRAM_ROW),
        R("meta_ads", ctwa=2, conversions=1, revenue=800.0),
        R("direct", none=2, qualified=1),
        R(None, visits=1),
    ],
    "utm_campaign": [
        R("black-friday", **GOOGLE_ROW),
        R("verao", **FACEBOOK_ROW),
        R("stories", **INSTAGRAM_ROW),
        R(None, visits=1, ctwa=2, none=2, qualified=1, conversions=1, revenue=800.0),
    ],
    "utm_medium": [
        R("cpc", **GOOGLE_ROW),
        R("paid_social", **FACEBOOK_ROW),
        R("social", **INSTAGRAM_ROW),
        R("ctwa", ctwa=2, conversions=1, revenue=800.0),
        R(None, visits=1, none=2, qualified=1),
    ],
    "ad_id": [  # visits carry no ad id: they all count under no ad
        R(None, visits=11, clicks=7, matched=5, code=4, window=1, none=2, qualified=4,
          conversions=3, revenue=650.5, click_to_lead=0.7143, match_rate=0.7143),
        R(AD_1, ctwa=1, conversions=1, revenue=800.0),
        R(AD_2, ctwa=1),
    ],
    "connection": [  # a visit belongs to the connection whose number it clicked
        R("loja-centro", visits=5, clicks=5, matched=4, code=3, ctwa=1, window=1, none=1,
          qualified=3, conversions=3, revenue=1300.0, click_to_lead=0.8, match_rate=0.8),
        R("loja-sul", visits=2, clicks=2, matched=1, code=1, ctwa=1, none=1, qualified=1,
          conversions=1, revenue=150.5, click_to_lead=0.5, match_rate=0.5),
        R(None, visits=4),
    ],
    "day": [  # days in America/Sao_Paulo, in order
        R("2024-11-19", none=1),
        R("2024-11-20", visits=3, clicks=3, matched=3, code=3, qualified=2, click_to_lead=1.0,
          match_rate=1.0),
        R("2024-11-21", visits=4, clicks=2, matched=0, ctwa=1, qualified=1, conversions=2,
          revenue=650.5, click_to_lead=0.0, match_rate=0.0),
        R("2024-11-22", visits=3, clicks=1, matched=1, code=1, ctwa=1, conversions=2,
          revenue=1300.0, click_to_lead=1.0, match_rate=1.0),
        R("2024-11-23", visits=1, clicks=1, matched=1, window=1, none=1, qualified=1,
          revenue=-500.0, click_to_lead=1.0, match_rate=1.0),
    ],
}


def by_key(rows: list[dict]) -> dict:
    return {row["key"]: row for row in rows}


async def report(api: Api, expect: int = 200, **params) -> dict:
    return await get(api, "/api/report", expect, **params)


# ==================================================================================================
# GET /api/report
# ==================================================================================================

@pytest.mark.parametrize("group_by", list(EXPECTED))
async def test_report_rows_and_totals_match_the_hand_counted_numbers(api, group_by):
    await seed(api)
    data = await report(api, group_by=group_by, **RANGE)
    assert data["group_by"] == group_by
    assert data["timezone"] == "America/Sao_Paulo"
    assert data["currency"] == "BRL"
    assert data["from"] == "2024-11-19T03:00:00.000Z"
    assert data["to"] == "2024-11-24T03:00:00.000Z"
    assert by_key(data["rows"]) == by_key(EXPECTED[group_by])
    assert len(data["rows"]) == len(EXPECTED[group_by])
    assert data["totals"] == TOTALS
    if group_by == "day":
        assert data["rows"] == EXPECTED["day"]


async def test_report_days_follow_the_company_timezone(api):
    """The same rows counted in UTC, then in Sao Paulo again after a PATCH of the timezone."""
    await seed(api)
    company = await patch_company(api, timezone="UTC")
    assert company["timezone"] == "UTC"
    data = await report(api, group_by="day", **RANGE)  # [11-19 00:00Z, 11-24 00:00Z)
    assert data["from"] == "2024-11-19T00:00:00.000Z"
    assert data["to"] == "2024-11-24T00:00:00.000Z"
    assert data["timezone"] == "UTC"
    assert data["rows"] == [
        R("2024-11-20", visits=2, clicks=2, matched=2, code=2, none=1, qualified=2,
          click_to_lead=1.0, match_rate=1.0),
        R("2024-11-21", visits=4, clicks=2, matched=1, code=1, ctwa=1, qualified=1,
          conversions=2, revenue=650.5, click_to_lead=0.5, match_rate=0.5),
        R("2024-11-22", visits=4, clicks=2, matched=1, code=1, ctwa=1, conversions=2,
          revenue=1300.0, click_to_lead=0.5, match_rate=0.5),
        R("2024-11-23", visits=1, clicks=1, matched=1, window=1, none=1, qualified=1,
          revenue=-300.0, click_to_lead=1.0, match_rate=1.0),
    ]
    assert data["totals"] == R(None, visits=11, clicks=7, matched=5, code=4, ctwa=2, window=1,
                               none=2, qualified=4, conversions=4, revenue=1650.5,
                               click_to_lead=0.7143, match_rate=0.7143)

    await patch_company(api, timezone="America/Sao_Paulo")
    data = await report(api, group_by="day", **RANGE)
    assert data["rows"] == EXPECTED["day"]
    assert data["totals"] == TOTALS


async def test_report_days_across_a_daylight_saving_change(api):
    """America/New_York falls back on 2024-11-03: that local day is 25 hours long."""
    await patch_company(api, timezone="America/New_York")
    for phone, at in (("5511960099901", "2024-11-03T03:59:00Z"),   # 11-02 23:59 EDT
                      ("5511960099902", "2024-11-03T04:00:00Z"),   # 11-03 00:00 EDT
                      ("5511960099903", "2024-11-04T04:30:00Z"),   # 11-03 23:30 EST
                      ("5511960099904", "2024-11-04T05:00:00Z")):  # 11-04 00:00 EST
        await message(api, "Oi", "Cliente", at, match="none", phone=phone)
    data = await report(api, group_by="day", **{"from": "2024-11-03", "to": "2024-11-03"})
    assert (data["from"], data["to"]) == ("2024-11-03T04:00:00.000Z", "2024-11-04T05:00:00.000Z")
    assert data["rows"] == [R("2024-11-03", none=2)]
    data = await report(api, group_by="day", **{"from": "2024-11-02", "to": "2024-11-04"})
    assert data["rows"] == [R("2024-11-02", none=1), R("2024-11-03", none=2),
                            R("2024-11-04", none=1)]
    listed = await api.leads(**{"from": "2024-11-03", "to": "2024-11-03"})
    phones = {lead["phone"] for lead in listed}
    assert phones == {"5511960099902", "5511960099903"}


async def test_report_range_of_one_local_day_excludes_everything_around_it(api):
    await seed(api)
    # 2024-11-20 in Sao Paulo is [11-20 03:00Z, 11-21 03:00Z): V2/L2 (after midnight UTC) are
    # in it, L7 (02:59Z, still 11-19 there) is not.
    data = await report(api, group_by="utm_source", **{"from": "2024-11-20", "to": "2024-11-20"})
    assert data["from"] == "2024-11-20T03:00:00.000Z"
    assert data["to"] == "2024-11-21T03:00:00.000Z"
    assert by_key(data["rows"]) == by_key([
        R("google", visits=2, clicks=2, matched=2, code=2, qualified=1, click_to_lead=1.0,
          match_rate=1.0),
        R("facebook", visits=1, clicks=1, matched=1, code=1, qualified=1, click_to_lead=1.0,
          match_rate=1.0),
    ])
    assert data["totals"] == R(None, visits=3, clicks=3, matched=3, code=3, qualified=2,
                               click_to_lead=1.0, match_rate=1.0)


async def test_report_range_with_iso_times_is_half_open(api):
    await seed(api)
    # V2 was created at 02:30:00Z and L2 at 02:40:00Z: `from` is included, `to` is not.
    data = await report(api, group_by="utm_campaign", **{"from": "2024-11-21T02:30:00Z",
                                                        "to": "2024-11-21T02:40:00Z"})
    assert data["rows"] == [R("black-friday", visits=1, clicks=1, matched=1, click_to_lead=0.0,
                              match_rate=1.0)]
    # The same instant written with an offset, one second later: L2 is in.
    data = await report(api, group_by="utm_campaign", **{"from": "2024-11-20T23:30:00-03:00",
                                                        "to": "2024-11-20T23:40:01-03:00"})
    assert data["rows"] == [R("black-friday", visits=1, clicks=1, matched=1, code=1,
                              click_to_lead=1.0, match_rate=1.0)]
    # Just before V2: nothing.
    data = await report(api, group_by="utm_campaign", **{"from": "2024-11-21T02:29:00Z",
                                                        "to": "2024-11-21T02:30:00Z"})
    assert data["rows"] == []
    assert data["totals"] == R(None)


async def test_report_range_in_unix_seconds_equals_the_iso_one(api):
    await seed(api)
    iso = await report(api, group_by="utm_campaign", **{"from": "2024-11-21T02:30:00Z",
                                                       "to": "2024-11-21T02:40:01Z"})
    unix = await report(api, group_by="utm_campaign", **{"from": "1732156200",
                                                        "to": "1732156801"})
    assert unix["rows"] == iso["rows"] and unix["totals"] == iso["totals"]


async def test_leads_range_with_from_after_to_is_empty(api):
    # Not a 400: openapi.json cannot relate two parameters, so the fuzz test sends such ranges.
    await seed(api)
    resp = await api.client.get("/api/leads", headers=api.auth,
                                params={"from": "2024-11-21", "to": "2024-11-20"})
    assert resp.status == 200
    assert (await resp.json())["leads"] == []


async def test_report_wide_range_and_default_range(api):
    await seed(api)
    data = await report(api, group_by="utm_source", **{"from": "2024-11-01", "to": "2024-12-31"})
    # Adds V12, V13, L10, E3 (77), E10 (999), E14 (250) to the reference range.
    assert data["totals"] == R(None, visits=13, clicks=9, matched=6, code=5, ctwa=2, window=1,
                               none=2, qualified=4, conversions=7, revenue=2776.5,
                               click_to_lead=0.6667, match_rate=0.6667)
    assert by_key(data["rows"])["google"] == R(
        "google", visits=5, clicks=4, matched=3, code=3, qualified=2, conversions=4,
        revenue=1576.0, click_to_lead=0.75, match_rate=0.75)
    # Without from/to the report covers the last 30 days: none of the 2024 data.
    data = await report(api, group_by="utm_source")
    assert data["rows"] == []
    assert data["totals"] == R(None)


async def test_report_rejects_bad_parameters(api):
    await seed(api)
    for bad in ("campaign", "source", "utm_term", "week"):
        data = await report(api, 400, group_by=bad)
        assert "group_by" in data["error"]
    # A range ending before it starts is empty (openapi.json cannot relate two parameters).
    for start, end in (("2024-11-21", "2024-11-20"),
                       ("2024-11-20T10:00:00Z", "2024-11-20T09:00:00Z"),
                       ("2024-11-20T10:00:00Z", "2024-11-20T10:00:00Z")):
        data = await report(api, group_by="day", **{"from": start, "to": end})
        assert data["rows"] == [] and data["totals"]["leads"] == 0, data
    data = await report(api, 400, **{"from": "yesterday"})
    assert "from" in data["error"]
    data = await report(api, 400, **{"to": "2024-02-30"})
    assert "to" in data["error"]
    resp = await api.client.get("/api/report", params={"group_by": "day"})
    assert resp.status == 401
    assert (await resp.json()) == {"error": "Unauthorized"}
    resp = await api.client.get("/api/report", headers={"Authorization": "Bearer wt_nope"})
    assert resp.status == 401


# ==================================================================================================
# GET /api/leads: filters, pagination, CSV
# ==================================================================================================

async def lead_labels(api: Api, ids: dict[str, int], **params) -> list[str]:
    """The labels (L1..L10) of the leads listed, in the order listed."""
    names = {v: k for k, v in ids.items()}
    return [names[lead["id"]] for lead in await api.leads(**params)]


async def test_leads_filters(api):
    ids = await seed(api)
    everything = await api.leads()
    assert sorted(lead["id"] for lead in everything) == sorted(ids.values())
    assert [lead["id"] for lead in everything] == sorted(ids.values(), reverse=True)

    async def labels(**params) -> set[str]:
        listed = await lead_labels(api, ids, **params)
        assert len(listed) == len(set(listed))
        return set(listed)

    assert await labels(**RANGE) == {"L1", "L2", "L3", "L4", "L5", "L6", "L7", "L8", "L9"}
    assert await labels(**{"from": "2024-11-20", "to": "2024-11-20"}) == {"L1", "L2", "L3"}
    assert await labels(**{"from": "2024-11-19", "to": "2024-11-19"}) == {"L7"}
    assert await labels(**{"from": "2024-11-22T03:00:00Z", "to": "2024-11-22T16:10:00Z"}) == {"L6"}
    assert await labels(**{"from": "2024-11-22T03:00:01Z"}) == {"L4", "L8", "L9"}
    assert await labels(to="2024-11-19") == {"L7", "L10"}
    assert await labels(utm_source="google") == {"L1", "L2", "L10"}
    assert await labels(utm_source="google", **RANGE) == {"L1", "L2"}
    assert await labels(utm_campaign="verao") == {"L3"}
    assert await labels(utm_campaign="stories") == {"L4", "L9"}
    assert await labels(utm_source="meta_ads") == {"L5", "L6"}
    assert await labels(utm_source="direct") == {"L7", "L8"}
    assert await labels(match_method="code") == {"L1", "L2", "L3", "L4", "L10"}
    assert await labels(match_method="ctwa") == {"L5", "L6"}
    assert await labels(match_method="window") == {"L9"}
    assert await labels(match_method="none") == {"L7", "L8"}
    assert await labels(connection="loja-sul") == {"L3", "L6", "L7"}
    assert await labels(connection="loja-centro", utm_source="direct") == {"L8"}
    assert await labels(connection="loja-norte") == set()
    assert await labels(utm_source="google", utm_campaign="verao") == set()

    lead = (await api.leads(utm_source="meta_ads", connection="loja-centro"))[0]
    assert lead["id"] == ids["L5"]
    assert lead["attribution"]["ad_id"] == AD_1
    assert lead["created_at"] == "2024-11-21T20:00:00.000Z"
    lead = (await api.leads(utm_source="google", **{"from": "2024-11-20", "to": "2024-11-20",
                                                    "limit": "1"}))[0]
    assert lead["attribution"]["utm_campaign"] == "black-friday"

    for bad in ("CODE", "organic", "code,ctwa"):
        data = await get(api, "/api/leads", 400, match_method=bad)
        assert "match_method" in data["error"]
    for field, value in (("limit", "0"), ("limit", "1001"), ("limit", "ten"), ("cursor", "abc"),
                         ("from", "2024-13-45")):
        data = await get(api, "/api/leads", 400, **{field: value})
        assert field in data["error"]


async def test_leads_cursor_pagination_is_stable_while_new_leads_arrive(api):
    expected = []
    for i in range(23):
        instance = "loja-sul" if i % 3 == 0 else "loja-centro"
        answer = await api.webhook(upsert(f"Olá {i}", phone=new_phone(), instance=instance))
        if instance == "loja-centro":
            expected.append(answer["lead_id"])
    expected.sort(reverse=True)  # newest first
    assert len(expected) == 15

    seen, cursor, pages, arrived = [], None, 0, []
    while True:
        params = {"connection": "loja-centro", "match_method": "none", "limit": "4"}
        if cursor:
            params["cursor"] = cursor
        data = await get(api, "/api/leads", **params)
        pages += 1
        assert all(lead["connection_id"] == "loja-centro" for lead in data["leads"])
        seen += [lead["id"] for lead in data["leads"]]
        cursor = data["next_cursor"]
        if cursor is None:
            break
        # New leads arrive between pages, on both connections.
        for instance in ("loja-centro", "loja-sul"):
            answer = await api.webhook(upsert("chegando agora", phone=new_phone(),
                                              instance=instance))
            arrived.append(answer["lead_id"])
        assert pages < 10
    assert pages == 4  # 4 + 4 + 4 + 3
    assert seen == expected  # no duplicates, no gaps, newest first
    assert len(arrived) == 6

    # A new first page starts with the leads that arrived meanwhile.
    data = await get(api, "/api/leads", connection="loja-centro", limit="3")
    assert [lead["id"] for lead in data["leads"]] == sorted(arrived[::2], reverse=True)
    # The last page of a listing that fits exactly has no next cursor.
    data = await get(api, "/api/leads", connection="loja-centro", limit="18")
    assert len(data["leads"]) == 18 and data["next_cursor"] is None
    data = await get(api, "/api/leads", connection="loja-centro", limit="17")
    assert len(data["leads"]) == 17 and data["next_cursor"] == str(data["leads"][-1]["id"])


def read_csv(body: bytes) -> list[dict]:
    text = body.decode("utf-8")
    assert text.startswith("\ufeff")
    rows = list(csv.reader(io.StringIO(text[1:])))
    assert rows[0] == CSV_HEADER
    return [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]


async def csv_export(api: Api, headers: dict | None = None, **params) -> list[dict]:
    resp = await api.client.get("/api/leads", params=params, headers={**api.auth,
                                                                       **(headers or {})})
    body = await resp.read()
    assert resp.status == 200, body[:300]
    assert resp.headers["Content-Type"].startswith("text/csv")
    assert "charset=utf-8" in resp.headers["Content-Type"].lower()
    assert "attachment" in resp.headers.get("Content-Disposition", "")
    return read_csv(body)


async def test_leads_csv_export(api):
    ids = await seed(api)
    rows = await csv_export(api, format="csv")
    by_accept = await csv_export(api, headers={"Accept": "text/csv"})
    assert by_accept == rows
    assert len(rows) == 10
    assert [int(row["id"]) for row in rows] == sorted(ids.values(), reverse=True)
    row = {int(r["id"]): r for r in rows}

    l1 = row[ids["L1"]]
    assert l1["created_at"] == "2024-11-20T15:10:00.000Z"
    assert l1["name"] == "Beatriz Google"
    assert (l1["match_method"], l1["connection_id"]) == ("code", "loja-centro")
    assert float(l1["confidence"]) == 1.0
    assert len(l1["code"]) == 7
    assert (l1["utm_source"], l1["utm_medium"], l1["utm_campaign"]) == (
        "google", "cpc", "black-friday")
    assert l1["gclid"] == "G-1"
    assert l1["landing_page"] == f"{SITE}?{GOOGLE}&gclid=G-1"
    assert l1["clicked_at"].endswith("Z")
    assert l1["first_message"].startswith("Quero o combo [ref ")
    assert "\u200b" not in l1["first_message"] and "\u2060" not in l1["first_message"]

    l5 = row[ids["L5"]]
    assert (l5["match_method"], l5["utm_source"], l5["utm_medium"]) == ("ctwa", "meta_ads", "ctwa")
    assert l5["ad_id"] == AD_1
    assert l5["ad_title"] == "Promoção de Primavera: 30% OFF"
    assert l5["ctwa_clid"].startswith("ARAmQ2x7pLk9")
    assert l5["landing_page"] == "https://fb.me/4aBcDeFgH"
    assert (l5["phone"], l5["name"]) == ("5521976543210", "Rafael Lima")
    assert l5["utm_campaign"] == l5["code"] == l5["gclid"] == l5["clicked_at"] == ""

    l7 = row[ids["L7"]]
    assert l7["name"] == "João"
    assert (l7["utm_source"], l7["match_method"], l7["connection_id"]) == (
        "direct", "none", "loja-sul")
    assert l7["first_message"] == "Olá, vocês entregam em Curitiba?"
    assert row[ids["L6"]]["name"] == "Fernanda Anúncio"
    l8 = row[ids["L8"]]
    assert l8["name"] == "Ana 🌸"
    assert l8["first_message"] == "'=2+3 é o preço?"  # neutralised: no formula in a spreadsheet

    # Filters apply to the CSV too.
    google = await csv_export(api, format="csv", utm_source="google", **RANGE)
    assert sorted(int(r["id"]) for r in google) == sorted([ids["L1"], ids["L2"]])
    assert await csv_export(api, format="csv", match_method="window") == [row[ids["L9"]]]
    assert await csv_export(api, format="csv", connection="loja-norte") == []
    # format=json wins over an Accept header asking for CSV.
    data = await get(api, "/api/leads", headers={"Accept": "text/csv"}, format="json")
    assert len(data["leads"]) == 10


async def test_leads_csv_exports_more_than_a_thousand_leads_completely(api):
    total = 2345
    names = {}

    async def insert(tx) -> None:
        for i in range(total):
            name = f"Cliente {i} ção 🚀" if i % 2 else f"Cliente {i}"
            row = await tx.fetchone(
                "INSERT INTO leads (company_id, connection_id, phone, name, first_message, "
                "match_method, confidence, utm_source, utm_campaign, attribution, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                "empresa-123", "loja-centro", f"55119{i:08d}", name, "=cmd|' /C calc'!A0",
                "code", 1.0, "google", "bulk",
                '{"utm_source": "google", "utm_campaign": "bulk"}',
                ts("2024-11-20T12:00:00Z") + i)
            names[row["id"]] = name

    await api.db.transact(insert)
    rows = await csv_export(api, format="csv")
    assert len(rows) == total
    assert [int(r["id"]) for r in rows] == sorted(names, reverse=True)
    assert {int(r["id"]): r["name"] for r in rows} == names
    assert all(r["first_message"] == "'=cmd|' /C calc'!A0" for r in rows)
    assert all(r["utm_campaign"] == "bulk" for r in rows)
    rows = await csv_export(api, headers={"Accept": "text/csv"}, **{"from": "2024-11-20"})
    assert len(rows) == total

    # The JSON listing pages through the same leads.
    first = await get(api, "/api/leads", limit="1000")
    second = await get(api, "/api/leads", limit="1000", cursor=first["next_cursor"])
    third = await get(api, "/api/leads", limit="1000", cursor=second["next_cursor"])
    assert third["next_cursor"] is None
    listed = [lead["id"] for page in (first, second, third) for lead in page["leads"]]
    assert listed == sorted(names, reverse=True)


# ==================================================================================================
# Isolation between companies
# ==================================================================================================

async def test_a_company_token_sees_nothing_of_another_company(api):
    a = api
    b = Api(a.client, await create_company(a.client, "empresa-b", name="Empresa Beta"))
    # B: the same connection name as A, a secret campaign, a gclid lead with a purchase, and a CRM
    # destination so that it has deliveries.
    resp = await b.client.patch("/api/company", headers=b.auth, json={
        "crm_webhook": {"url": "http://127.0.0.1:9/crm", "secret": "s3cret"}})
    assert resp.status == 200, await resp.json()
    await connect(b, "loja-centro", "5511977776666", "Loja Beta")
    await connect(b, "beta-conn", "5511977775555", "Beta Conn")
    bv = await b.track(visitor_id="visitante-beta", page_url=(
        "https://beta.test/?utm_source=beta-source&utm_medium=beta-medium"
        "&utm_campaign=beta-secreta&gclid=GCLID-BETA"))
    await b.track(visitor_id="visitante-beta", event="whatsapp_click",
                  whatsapp_phone="5511977776666", code=bv["code"])
    await b.track(visitor_id="outro-beta", page_url="https://beta.test/?utm_source=beta-source")
    envelope = upsert(f"Oi {whatstracking.message_code(bv['code'])}", phone="5531999990000")
    envelope["data"]["pushName"] = "Segredo Beta"
    b_lead = (await b.webhook(envelope))["lead_id"]
    ctwa = ctwa_envelope("5531999990001", "AD-BETA", "CLID-BETA", "beta-conn")
    ctwa["data"]["pushName"] = "Anúncio Beta"
    b_ctwa = await b.webhook(ctwa)
    assert b_ctwa["match"] == "ctwa"
    await event(b, b_lead, "purchase", value=4321)

    # A: one google lead with a purchase.
    await connect(a, "loja-centro", CENTRO, "Loja Centro")
    av = await a.track(visitor_id="visitante-alfa", page_url=f"{SITE}?{GOOGLE}&gclid=GCLID-ALFA")
    await a.track(visitor_id="visitante-alfa", event="whatsapp_click", whatsapp_phone=CENTRO,
                  code=av["code"])
    envelope = upsert(f"Oi {whatstracking.message_code(av['code'])}", phone="5531999990000")
    envelope["data"]["pushName"] = "Cliente Alfa"
    a_lead = (await a.webhook(envelope))["lead_id"]
    await event(a, a_lead, "purchase", value=100)
    assert a_lead != b_lead

    secrets = ("Segredo Beta", "Anúncio Beta", "beta-secreta", "beta-source", "beta-medium",
               "GCLID-BETA", "AD-BETA", "CLID-BETA", "beta-conn", "empresa-b", "Empresa Beta",
               "5511977776666", "Loja Beta")

    def assert_clean(text: str) -> None:
        for secret in secrets:
            assert secret not in text, secret

    # B sees its own data (so the checks below are not vacuous).
    assert {lead["name"] for lead in await b.leads()} == {"Segredo Beta", "Anúncio Beta"}
    b_report = await report(b, group_by="utm_campaign")
    assert b_report["totals"]["visits"] == 2 and b_report["totals"]["revenue"] == 4321.0

    # /api/leads, JSON and CSV, with and without filters that name B's values.
    leads = await a.leads()
    assert [lead["name"] for lead in leads] == ["Cliente Alfa"]
    assert_clean(str(leads))
    for params in ({"utm_campaign": "beta-secreta"}, {"utm_source": "beta-source"},
                   {"connection": "beta-conn"}, {"match_method": "ctwa"}):
        assert await a.leads(**params) == []
    rows = await csv_export(a, format="csv")
    assert [r["name"] for r in rows] == ["Cliente Alfa"]
    resp = await a.client.get("/api/leads", headers={**a.auth, "Accept": "text/csv"})
    assert_clean((await resp.read()).decode("utf-8"))

    # /api/report, every grouping: A's own numbers only.
    for group_by in whatstracking.REPORT_GROUPS:
        data = await report(a, group_by=group_by)
        assert_clean(str(data))
        totals = data["totals"]
        assert (totals["visits"], totals["clicks"], totals["matched_clicks"], totals["leads"],
                totals["conversions"], totals["revenue"]) == (1, 1, 1, 1, 1, 100.0), group_by
        assert totals["leads_by_method"] == {"code": 1, "ctwa": 0, "window": 0, "none": 0}
    data = await report(a, group_by="connection")
    assert data["rows"] == [R("loja-centro", visits=1, clicks=1, matched=1, code=1,
                              conversions=1, revenue=100.0, click_to_lead=1.0, match_rate=1.0)]

    # The Google Ads export.
    resp = await a.client.get("/api/exports/google-ads.csv", headers=a.auth)
    text = await resp.text()
    assert resp.status == 200
    assert "GCLID-ALFA" in text
    assert_clean(text)
    resp = await b.client.get("/api/exports/google-ads.csv", headers=b.auth)
    assert "GCLID-BETA" in await resp.text()

    # Deliveries: B has some, A sees none of them and cannot retry them.
    b_deliveries = (await get(b, "/api/deliveries"))["deliveries"]
    assert b_deliveries and {d["lead_id"] for d in b_deliveries} == {b_lead, b_ctwa["lead_id"]}
    assert (await get(a, "/api/deliveries"))["deliveries"] == []
    assert (await get(a, "/api/deliveries", lead_id=str(b_lead)))["deliveries"] == []
    resp = await a.client.post(f"/api/deliveries/{b_deliveries[0]['id']}/retry", headers=a.auth)
    assert resp.status == 404

    # Connections and the company.
    connections = (await get(a, "/api/connections"))["connections"]
    assert [(c["connectionId"], c["phone"]) for c in connections] == [("loja-centro", CENTRO)]
    assert_clean(str(connections))
    company = await get(a, "/api/company")
    assert (company["company_id"], company["name"]) == ("empresa-123", "Empresa Teste")
    assert_clean(str(company))
    data = await get(a, "/api/company", 404, company_id="empresa-b")
    assert data == {"error": "Company not found"}

    # B's lead is "not found" for A: its events can neither be read nor added.
    data = await get(a, f"/api/leads/{b_lead}/events", 404)
    assert "not found" in data["error"].lower()
    resp = await a.client.post(f"/api/leads/{b_lead}/events", headers=a.auth,
                               json={"name": "refund", "value": 4321})
    assert resp.status == 404
    events = (await get(b, f"/api/leads/{b_lead}/events"))["events"]
    assert [e["name"] for e in events] == ["lead", "purchase"]
    assert (await get(a, f"/api/leads/{a_lead}/events"))["events"][-1]["value"] == 100.0
