"""The fake Meta webhook sender and the Cloud API fixtures, tested on their own.

A tiny receiver on 127.0.0.1 (not whatstracking) records what arrives, checks the signature with its
own HMAC and answers Meta's verification handshake, so the fake's requests are seen from outside.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re

import pytest
from aiohttp import ClientSession, web

from fake_meta_webhook import (
    FIXTURES,
    SIGNATURE_HEADER,
    USER_AGENT,
    cloud_fixture,
    fixture_names,
    fresh_ids,
    messages,
    meta_bytes,
    send,
    sign,
    verify,
)

APP_SECRET = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
VERIFY_TOKEN = "wt-verify-7Q2xLk"
SEEN = web.AppKey("seen", list)
ANSWERS = web.AppKey("answers", list)
MESSAGE_TYPES = {"text", "interactive", "button", "image", "video", "document", "reaction", "system",
                 "unsupported"}
REQUIRED_FIXTURES = {
    "text", "text-referral-image-ad", "text-referral-status-ad", "interactive-button-reply",
    "interactive-list-reply", "button", "image-caption", "video-caption", "document-caption",
    "reaction", "status-sent", "status-delivered-bsuid", "status-read-bsuid-only",
    "system-user-changed-number", "system-user-changed-user-id", "bsuid-only", "wa-id-and-user-id",
    "brazil-12-digit", "two-contacts", "two-entries", "smb-message-echoes", "unsupported",
}


def raw_fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text("utf-8"))


def values(body: dict) -> list[dict]:
    return [change["value"] for entry in body["entry"] for change in entry["changes"]]


# ---- signing and bytes ---------------------------------------------------------------------------

def test_signature_matches_the_rfc_4231_hmac_sha256_vector():
    # RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?"
    assert sign(b"what do ya want for nothing?", "Jefe") == (
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")


def test_signature_is_of_the_exact_bytes_and_a_reserialised_body_signs_differently():
    body = raw_fixture("text-referral-image-ad")
    wire = meta_bytes(body)
    expected = hmac.new(APP_SECRET.encode(), wire, hashlib.sha256).hexdigest()
    assert sign(wire, APP_SECRET) == "sha256=" + expected
    # what a receiver gets if it parses and dumps again before hashing
    reserialised = json.dumps(json.loads(wire), ensure_ascii=False).encode("utf-8")
    assert json.loads(reserialised) == json.loads(wire)
    assert reserialised != wire
    assert sign(reserialised, APP_SECRET) != sign(wire, APP_SECRET)
    assert sign(wire, APP_SECRET + "x") != sign(wire, APP_SECRET)


def test_meta_bytes_escape_unicode_in_lowercase_hex_and_slashes_and_parse_back():
    body = raw_fixture("text-referral-image-ad")
    wire = meta_bytes(body)
    assert max(wire) < 128
    assert b"Ol\\u00e1! Vi o an\\u00fancio \\ud83d\\ude0a" in wire
    assert b"https:\\/\\/fb.me\\/4aBcDeFgH" in wire
    assert b'": ' not in wire and b'", "' not in wire  # compact separators, as Meta sends
    assert json.loads(wire) == body
    assert meta_bytes(b'{"raw": true}') == b'{"raw": true}'


# ---- the fixtures --------------------------------------------------------------------------------

def test_every_required_fixture_exists():
    assert REQUIRED_FIXTURES <= set(fixture_names())


@pytest.mark.parametrize("name", fixture_names())
def test_fixture_has_metas_envelope(name):
    body = raw_fixture(name)
    assert body["object"] == "whatsapp_business_account"
    assert body["entry"]
    for entry in body["entry"]:
        assert re.fullmatch(r"\d{15}", entry["id"])
        assert entry["changes"]
        for change in entry["changes"]:
            assert change["field"] in ("messages", "smb_message_echoes")
            value = change["value"]
            assert value["messaging_product"] == "whatsapp"
            assert set(value["metadata"]) == {"display_phone_number", "phone_number_id"}
            assert re.fullmatch(r"\d{15}", value["metadata"]["phone_number_id"])
            assert {"messages", "statuses", "message_echoes"} & set(value)
            for item in [*value.get("messages", []), *value.get("statuses", []),
                         *value.get("message_echoes", [])]:
                assert item["id"].startswith("wamid.")
                assert re.fullmatch(r"\d{10}", item["timestamp"])


@pytest.mark.parametrize("name", fixture_names())
def test_fixture_messages_name_their_sender_and_carry_their_type(name):
    for message in messages(raw_fixture(name)):
        assert message["type"] in MESSAGE_TYPES
        assert message["type"] in message
        assert message.get("from") or message.get("from_user_id")


def test_fixture_message_ids_are_unique_across_files():
    ids = [item["id"] for name in fixture_names() for value in values(raw_fixture(name))
           for key in ("messages", "statuses", "message_echoes") for item in value.get(key, [])]
    assert len(ids) == len(set(ids))


def test_readme_lists_every_fixture_with_a_meta_documentation_url():
    readme = (FIXTURES / "README.md").read_text("utf-8")
    for name in fixture_names():
        line = next((ln for ln in readme.splitlines() if f"`{name}.json`" in ln), None)
        assert line is not None, name
        assert "https://developers.facebook.com/" in line, name


def test_bsuid_only_user_has_no_phone_anywhere():
    value = values(raw_fixture("bsuid-only"))[0]
    (contact,) = value["contacts"]
    (message,) = value["messages"]
    assert "wa_id" not in contact and "from" not in message
    assert re.fullmatch(r"BR\.\d+", contact["user_id"])
    assert message["from_user_id"] == contact["user_id"]
    assert contact["profile"]["username"].startswith("@")
    assert not re.search(r"\b55\d{10,11}\b", json.dumps(value))


def test_user_with_phone_and_bsuid_names_both_on_contact_and_message():
    value = values(raw_fixture("wa-id-and-user-id"))[0]
    (contact,) = value["contacts"]
    (message,) = value["messages"]
    assert message["from"] == contact["wa_id"] and len(contact["wa_id"]) == 13
    assert message["from_user_id"] == contact["user_id"]


def test_brazilian_12_digit_id_is_an_old_mobile():
    value = values(raw_fixture("brazil-12-digit"))[0]
    wa_id = value["contacts"][0]["wa_id"]
    assert value["messages"][0]["from"] == wa_id
    assert re.fullmatch(r"55\d\d[6-9]\d{7}", wa_id)


def test_referrals_with_and_without_click_id():
    image_ad = messages(raw_fixture("text-referral-image-ad"))[0]["referral"]
    status_ad = messages(raw_fixture("text-referral-status-ad"))[0]["referral"]
    assert image_ad["ctwa_clid"] and image_ad["source_type"] == "ad" and image_ad["media_type"] == "image"
    assert "ctwa_clid" not in status_ad and status_ad["source_type"] == "ad" and status_ad["source_id"]
    assert "Olá! Vi o anúncio 😊" in messages(raw_fixture("text-referral-image-ad"))[0]["text"]["body"]


def test_system_messages_have_no_contacts_and_say_what_changed():
    number = values(raw_fixture("system-user-changed-number"))[0]
    user_id = values(raw_fixture("system-user-changed-user-id"))[0]
    assert "contacts" not in number and "contacts" not in user_id
    assert number["messages"][0]["system"]["type"] == "user_changed_number"
    assert number["messages"][0]["system"]["wa_id"] != number["messages"][0]["from"]
    changed = user_id["messages"][0]
    assert changed["system"]["type"] == "user_changed_user_id" and "from" not in changed
    assert changed["system"]["previous_user_id"] == changed["from_user_id"] != changed["system"]["user_id"]


def test_statuses_cover_sent_delivered_read_with_and_without_bsuid():
    seen = {}
    for name in ("status-sent", "status-delivered-bsuid", "status-read-bsuid-only"):
        (status,) = values(raw_fixture(name))[0]["statuses"]
        seen[status["status"]] = status
        assert "messages" not in values(raw_fixture(name))[0]
    assert set(seen) == {"sent", "delivered", "read"}
    assert "recipient_user_id" not in seen["sent"]
    assert seen["delivered"]["recipient_user_id"] and seen["delivered"]["recipient_id"]
    assert seen["read"]["recipient_user_id"] and "recipient_id" not in seen["read"]


def test_echoes_are_the_business_writing_to_a_customer():
    body = raw_fixture("smb-message-echoes")
    (change,) = body["entry"][0]["changes"]
    assert change["field"] == "smb_message_echoes"
    (echo,) = change["value"]["message_echoes"]
    assert echo["from"] == change["value"]["metadata"]["display_phone_number"] != echo["to"]
    assert "messages" not in change["value"] and "contacts" not in change["value"]


def test_batched_bodies_hold_two_contacts_and_two_businesses():
    two = values(raw_fixture("two-contacts"))[0]
    assert [c["wa_id"] for c in two["contacts"]] == [m["from"] for m in two["messages"]]
    entries = raw_fixture("two-entries")["entry"]
    assert len(entries) == 2 and entries[0]["id"] != entries[1]["id"]
    pnids = [e["changes"][0]["value"]["metadata"]["phone_number_id"] for e in entries]
    assert pnids[0] != pnids[1]


def test_unsupported_message_carries_metas_error():
    (message,) = messages(raw_fixture("unsupported"))
    assert message["type"] == "unsupported"
    assert message["errors"][0]["code"] == 131051


# ---- helpers -------------------------------------------------------------------------------------

def test_cloud_fixture_puts_the_business_ids_in_and_leaves_the_file_alone():
    body = cloud_fixture("two-contacts", phone_number_id="900000000000001", waba_id="800000000000001",
                         display_phone_number="5531930000000", text="WT-7K3P quero saber mais")
    value = values(body)[0]
    assert body["entry"][0]["id"] == "800000000000001"
    assert value["metadata"] == {"display_phone_number": "5531930000000",
                                 "phone_number_id": "900000000000001"}
    assert value["messages"][0]["text"]["body"] == "WT-7K3P quero saber mais"
    assert value["messages"][1]["text"]["body"] == raw_fixture("two-contacts")["entry"][0]["changes"][0][
        "value"]["messages"][1]["text"]["body"]
    assert values(raw_fixture("two-contacts"))[0]["metadata"]["phone_number_id"] == "106540352242922"

    both = cloud_fixture("two-entries", phone_number_id=["900000000000001", "900000000000002"])
    assert [v["metadata"]["phone_number_id"] for v in values(both)] == ["900000000000001",
                                                                         "900000000000002"]


def test_fresh_ids_change_only_the_ids():
    body = cloud_fixture("two-contacts")
    again = fresh_ids(body)
    old = [m["id"] for m in messages(body)]
    new = [m["id"] for m in messages(again)]
    assert len(set(new)) == 2 and not set(old) & set(new)
    assert all(i.startswith("wamid.") for i in new)
    for message in [*messages(body), *messages(again)]:
        message.pop("id")
    assert body == again


# ---- against a receiver on 127.0.0.1 -------------------------------------------------------------

def receiver_app(answers: list[int] | None = None) -> web.Application:
    """Records each POST; answers 401 on a bad signature, else the next of `answers` (default 200)."""
    app = web.Application()
    app[SEEN] = []
    app[ANSWERS] = list(answers or [])

    async def receive(request: web.Request) -> web.Response:
        raw = await request.read()
        app[SEEN].append((dict(request.headers), raw))
        given = request.headers.get(SIGNATURE_HEADER, "")
        mine = "sha256=" + hmac.new(APP_SECRET.encode(), raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(given, mine):
            return web.json_response({"error": "bad signature"}, status=401)
        status = app[ANSWERS].pop(0) if app[ANSWERS] else 200
        return web.json_response({"ok": status == 200}, status=status)

    async def handshake(request: web.Request) -> web.Response:
        app[SEEN].append((dict(request.query), b""))
        query = request.query
        if query.get("hub.mode") == "subscribe" and query.get("hub.verify_token") == VERIFY_TOKEN:
            return web.Response(text=query["hub.challenge"])
        return web.Response(status=403, text="forbidden")

    app.router.add_post("/hook", receive)
    app.router.add_get("/hook", handshake)
    return app


async def test_send_posts_the_exact_signed_bytes_with_metas_headers(aiohttp_client):
    client = await aiohttp_client(receiver_app())
    body = cloud_fixture("bsuid-only")
    delivery = await send(client, "/hook", body, APP_SECRET)
    assert (delivery.status, json.loads(delivery.text)) == (200, {"ok": True})
    ((headers, raw),) = client.server.app[SEEN]
    assert raw == meta_bytes(body) == delivery.body
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == USER_AGENT
    assert headers[SIGNATURE_HEADER] == sign(raw, APP_SECRET) == delivery.signature
    assert json.loads(raw)["entry"][0]["changes"][0]["value"]["messages"][0]["text"]["body"] == (
        "Olá! Quanto custa a cesta de café da manhã? ☕")


async def test_forged_wrong_key_and_missing_signatures_are_refused(aiohttp_client):
    client = await aiohttp_client(receiver_app())
    body = cloud_fixture("text")
    assert (await send(client, "/hook", body, APP_SECRET, signature="sha256=" + "0" * 64)).status == 401
    assert (await send(client, "/hook", body, "not-the-app-secret")).status == 401
    assert (await send(client, "/hook", body, APP_SECRET, headers={SIGNATURE_HEADER: ""})).status == 401
    assert SIGNATURE_HEADER not in client.server.app[SEEN][-1][0]


async def test_retries_resend_the_identical_request(aiohttp_client):
    client = await aiohttp_client(receiver_app(answers=[500, 503]))
    delivery = await send(client, "/hook", cloud_fixture("text-referral-image-ad"), APP_SECRET, retries=2)
    assert [status for status, _ in delivery.attempts] == [500, 503, 200]
    assert delivery.status == 200
    seen = client.server.app[SEEN]
    assert len(seen) == 3 and len({raw for _, raw in seen}) == 1
    assert len({headers[SIGNATURE_HEADER] for headers, _ in seen}) == 1


async def test_send_works_with_a_plain_client_session_and_full_url(aiohttp_server):
    server = await aiohttp_server(receiver_app())
    assert server.host == "127.0.0.1"
    async with ClientSession() as session:
        delivery = await send(session, str(server.make_url("/hook")), cloud_fixture("reaction"), APP_SECRET)
    assert delivery.status == 200
    assert server.app[SEEN][0][0]["User-Agent"] == USER_AGENT


async def test_verify_sends_metas_handshake(aiohttp_client):
    client = await aiohttp_client(receiver_app())
    status, text = await verify(client, "/hook", VERIFY_TOKEN)
    query = client.server.app[SEEN][0][0]
    assert status == 200 and text == query["hub.challenge"] and text.isdigit()
    assert query["hub.mode"] == "subscribe" and query["hub.verify_token"] == VERIFY_TOKEN
    assert await verify(client, "/hook", "wrong-token", "1158201444") == (403, "forbidden")
    assert (await verify(client, "/hook", VERIFY_TOKEN, "42", mode="unsubscribe"))[0] == 403
