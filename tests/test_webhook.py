"""The Evolution webhook (SPEC §6) and the lead rules, on SQLite and on Postgres.

Assertions are on what a user observes: the HTTP answers and GET /api/leads; the stored
connection state and raw deliveries are read from the database where no route shows them yet.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid

import pytest

from conftest import create_company, fixture, upsert
from whatstracking import WEBHOOK_BODY_MAX, hash_token, invisible_code, message_code

COMPANY = "empresa-123"
SITE = "https://loja.test/?utm_source=google&utm_campaign=x"
CONNECTION_PHONE = "5511900001111"  # the wuid of connection-update-open.json
PN = "5531991234567@s.whatsapp.net"
LID = "214365870912345@lid"

_phones = itertools.count(5511970000001)


def new_phone() -> str:
    return str(next(_phones))


def message_id() -> str:
    return uuid.uuid4().hex.upper()


async def visit(api, visitor_id: str, page_url: str = SITE, **body) -> dict:
    """A pageview (or click) of a visitor; returns the tracking answer with its code."""
    return await api.track(visitor_id=visitor_id, page_url=page_url, **body)


async def only_lead(api, **match) -> dict:
    leads = [lead for lead in await api.leads()
             if all(lead.get(k) == v for k, v in match.items())]
    assert len(leads) == 1, leads
    return leads[0]


async def patch_company(api, **settings) -> dict:
    resp = await api.client.patch("/api/company", json=settings, headers=api.auth)
    data = await resp.json()
    assert resp.status == 200, data
    return data


async def set_sql(api, sql: str, *args) -> None:
    await api.db.transact(lambda tx: tx.execute(sql, *args))


async def connection_row(api, connection_id: str = "loja-centro") -> dict | None:
    return await api.db.fetchone("SELECT * FROM connections WHERE company_id = ? AND id = ?",
                                 COMPANY, connection_id)


async def deliveries(api) -> list[dict]:
    return await api.db.fetchall("SELECT * FROM webhook_deliveries ORDER BY id")


def with_key(key: dict, text: str = "Boa tarde, ainda tem o tênis 42?") -> dict:
    """The LID fixture with another key layout (fromMe and id added) and text."""
    envelope = fixture("messages-upsert-lid")
    envelope["data"]["key"] = {"fromMe": False, "id": message_id(), **key}
    envelope["data"]["message"]["conversation"] = text
    return envelope


def with_message(message: dict, phone: str, message_type: str) -> dict:
    """An upsert from ``phone`` whose data.message is ``message`` (Evolution's shape)."""
    envelope = upsert("", phone=phone)
    envelope["data"]["message"] = {
        "messageContextInfo": fixture("messages-upsert-conversation")["data"]["message"][
            "messageContextInfo"],
        **message}
    envelope["data"]["messageType"] = message_type
    return envelope


# ==================================================================================================
# Every Evolution fixture
# ==================================================================================================

async def test_conversation_fixture_creates_an_organic_lead(api):
    answer = await api.webhook(fixture("messages-upsert-conversation"))
    assert answer["ok"] is True
    assert answer["event"] == "messages.upsert"
    assert answer["match"] == "none"
    lead = await only_lead(api)
    assert answer["lead_id"] == lead["id"]
    assert lead["company_id"] == COMPANY
    assert lead["connection_id"] == "loja-centro"
    assert lead["name"] == "Carla Mendes"
    assert lead["phone"] == "5511988887777"
    assert lead["lid"] == "187362540912345"
    assert lead["first_message"] == "Oi! Vocês abrem no sábado?"
    assert lead["message_id"] == "AC5E3B9D0F7A2C4E6B8D1F3A5C7E9B20"
    assert lead["match_method"] == "none"
    assert lead["confidence"] == 0
    assert lead["code"] is None
    assert lead["session_id"] is None
    assert lead["attribution"]["utm_source"] == "direct"
    assert lead["first_touch"] is None
    assert lead["created_at"].endswith("Z")


async def test_extended_text_fixture_reads_the_text_from_conversation(api):
    answer = await api.webhook(fixture("messages-upsert-extended-text"))
    assert answer["match"] == "none"
    lead = await only_lead(api)
    assert lead["first_message"] == "Perfeito, passo aí amanhã às 10h 👍"
    assert lead["phone"] == "5511988887777"
    assert lead["lid"] is None
    assert lead["name"] == "Carla Mendes"


async def test_ctwa_fixture_creates_a_ctwa_lead_with_the_ad_data(api):
    envelope = fixture("messages-upsert-ctwa-ad")
    answer = await api.webhook(envelope)
    assert answer["match"] == "ctwa"
    lead = await only_lead(api)
    ad = envelope["data"]["contextInfo"]["externalAdReply"]
    assert lead["match_method"] == "ctwa"
    assert lead["confidence"] == 1.0
    assert lead["phone"] == "5521976543210"
    assert lead["name"] == "Rafael Lima"
    assert lead["first_message"] == "Olá! Tenho interesse e queria mais informações, por favor."
    attribution = lead["attribution"]
    assert attribution["utm_source"] == "meta_ads"
    assert attribution["ad_id"] == ad["sourceId"] == "120212345678900123"
    assert attribution["ctwa_clid"] == ad["ctwaClid"]
    assert attribution["ad_title"] == "Promoção de Primavera: 30% OFF"
    assert lead["code"] is None
    # The raw contextInfo is kept whole: fields come and go across WhatsApp versions.
    assert lead["context_info"] == envelope["data"]["contextInfo"]


async def test_ctwa_data_inside_an_image_message_gives_a_ctwa_lead(api):
    envelope = fixture("messages-upsert-ctwa-ad")
    info = envelope["data"].pop("contextInfo")
    envelope["data"]["message"] = {"imageMessage": {"mimetype": "image/jpeg",
                                                    "caption": "Quero esse!",
                                                    "contextInfo": info}}
    envelope["data"]["messageType"] = "imageMessage"
    answer = await api.webhook(envelope)
    assert answer["match"] == "ctwa"
    lead = await only_lead(api)
    assert lead["attribution"]["ctwa_clid"] == info["externalAdReply"]["ctwaClid"]
    assert lead["first_message"] == "Quero esse!"
    assert lead["context_info"] == info


async def test_from_me_fixture_is_ignored(api):
    answer = await api.webhook(fixture("messages-upsert-from-me"))
    assert answer["ok"] is True
    assert answer["ignored"] == "from me"
    assert "lead_id" not in answer
    assert await api.leads() == []


async def test_lid_fixture_takes_the_phone_from_remote_jid_alt(api):
    answer = await api.webhook(fixture("messages-upsert-lid"))
    assert answer["match"] == "none"
    lead = await only_lead(api)
    assert lead["phone"] == "5531991234567"
    assert lead["lid"] == "214365870912345"
    assert lead["name"] == "João Pedro"
    assert lead["first_message"] == "Boa tarde, ainda tem o tênis 42 em estoque?"


async def test_connection_update_open_stores_the_connection(api):
    answer = await api.webhook(fixture("connection-update-open"))
    assert answer == {"ok": True, "delivery_id": answer["delivery_id"],
                      "event": "connection.update", "state": "open"}
    row = await connection_row(api)
    assert row["state"] == "open"
    assert row["phone"] == CONNECTION_PHONE
    assert row["profile_name"] == "Loja Centro"
    assert row["picture_url"] == fixture("connection-update-open")["data"]["profilePictureUrl"]
    # A message that arrives afterwards is recorded on that connection.
    await api.webhook(upsert("Oi"))
    lead = await only_lead(api)
    assert lead["connection_id"] == "loja-centro"


async def test_connection_update_close_stores_the_state_and_keeps_the_phone(api):
    await api.webhook(fixture("connection-update-open"))
    answer = await api.webhook(fixture("connection-update-close"))
    assert answer["state"] == "close"
    row = await connection_row(api)
    assert row["state"] == "close"
    assert row["phone"] == CONNECTION_PHONE
    assert row["profile_name"] == "Loja Centro"
    await api.webhook(upsert("Oi, ainda estão atendendo?"))
    assert (await only_lead(api))["connection_id"] == "loja-centro"


async def test_connection_update_for_a_new_instance_creates_its_connection(api):
    envelope = fixture("connection-update-close")
    envelope["instance"] = envelope["data"]["instance"] = "loja-norte"
    await api.webhook(envelope)
    assert (await connection_row(api, "loja-norte"))["state"] == "close"
    assert await connection_row(api, "loja-centro") is None
    await api.webhook(upsert("Oi", instance="loja-norte"))
    assert (await only_lead(api))["connection_id"] == "loja-norte"


async def test_qrcode_updated_stores_the_latest_code_until_connected(api):
    envelope = fixture("qrcode-updated")
    answer = await api.webhook(envelope)
    assert answer["event"] == "qrcode.updated"
    row = await connection_row(api)
    assert row["qr_code"] == envelope["data"]["qrcode"]["code"]
    assert row["qr_pairing_code"] is None
    assert row["qr_at"] is not None
    newer = fixture("qrcode-updated")
    newer["data"]["qrcode"]["code"] = "2@another-qr-string"
    newer["data"]["qrcode"]["pairingCode"] = "WZYEH1YY"
    await api.webhook(newer)
    row = await connection_row(api)
    assert (row["qr_code"], row["qr_pairing_code"]) == ("2@another-qr-string", "WZYEH1YY")
    await api.webhook(fixture("connection-update-open"))
    row = await connection_row(api)
    assert row["qr_code"] is None and row["state"] == "open"


async def test_qrcode_limit_reached_clears_the_code(api):
    await api.webhook(fixture("qrcode-updated"))
    envelope = fixture("qrcode-updated")
    envelope["data"] = {"message": "QR code limit reached, please login again",
                        "statusCode": 500}
    answer = await api.webhook(envelope)
    assert answer["ok"] is True
    assert (await connection_row(api))["qr_code"] is None


@pytest.mark.parametrize("name", ["labels-edit", "labels-association"])
async def test_label_events_are_accepted_and_make_no_lead(api, name):
    # SPEC §9 maps labels to conversion events; here only: answered 200, no lead, stored.
    answer = await api.webhook(fixture(name))
    assert answer["ok"] is True
    assert answer["event"] == name.replace("-", ".")
    assert "lead_id" not in answer
    assert await api.leads() == []
    assert [d["status"] for d in await deliveries(api)] == ["processed"]


@pytest.mark.parametrize("event,data", [
    ("messages.update", {"keyId": "ABC", "remoteJid": "5511988887777@s.whatsapp.net",
                         "fromMe": False, "status": "READ"}),
    ("presence.update", {"id": "5511988887777@s.whatsapp.net", "presences": {}}),
    ("remove.instance", None),
    ("send.message", {"key": {"remoteJid": "5511988887777@s.whatsapp.net", "fromMe": True,
                              "id": "3EB0AAAA"}}),
])
async def test_other_events_are_answered_200_and_ignored(api, event, data):
    envelope = fixture("labels-edit")
    envelope["event"], envelope["data"] = event, data
    answer = await api.webhook(envelope)
    assert answer["ok"] is True and "ignored" in answer
    assert await api.leads() == []


@pytest.mark.parametrize("data", [None, {}, {"key": None}, {"key": {"remoteJid": "x"}},
                                  {"key": {"id": "A1", "remoteJid": 5}}, "text", [1, 2]])
async def test_upserts_without_a_usable_message_are_ignored(api, data):
    envelope = upsert("Oi")
    envelope["data"] = data
    answer = await api.webhook(envelope)
    assert answer["ok"] is True and "ignored" in answer
    assert await api.leads() == []


@pytest.mark.parametrize("envelope", [[], "messages.upsert", 42, {"event": "messages.upsert"},
                                      {"event": "messages.upsert", "instance": ""}])
async def test_json_that_is_not_an_envelope_is_ignored(api, envelope):
    answer = await api.webhook(envelope)
    assert answer["ok"] is True and "ignored" in answer
    assert await api.leads() == []


# ==================================================================================================
# Chats that never make leads
# ==================================================================================================

async def test_group_messages_are_ignored(api):
    envelope = upsert("Oi grupo [ref ABCDEFG]", remoteJid="120363025246125888@g.us",
                      participant="5511977776666@s.whatsapp.net",
                      participantAlt="99887766554433@lid", addressingMode="pn")
    answer = await api.webhook(envelope)
    assert answer["ignored"] == "group"
    assert await api.leads() == []


async def test_status_broadcast_is_ignored(api):
    envelope = upsert("Novidade!", remoteJid="status@broadcast",
                      participant="5511977776666@s.whatsapp.net")
    answer = await api.webhook(envelope)
    assert answer["ignored"] == "broadcast"
    assert await api.leads() == []


async def test_newsletter_messages_are_ignored(api):
    envelope = upsert("Edição de hoje", remoteJid="120363166666666666@newsletter")
    answer = await api.webhook(envelope)
    assert answer["ignored"] == "newsletter"
    assert await api.leads() == []


async def test_from_me_messages_with_a_code_are_ignored(api):
    code = (await visit(api, "v-fromme"))["code"]
    envelope = upsert(message_code(code), fromMe=True)
    answer = await api.webhook(envelope)
    assert answer["ignored"] == "from me"
    assert await api.leads() == []
    # The code is still free for the visitor's own message.
    await api.webhook(upsert(message_code(code)))
    assert (await only_lead(api))["code"] == code


# ==================================================================================================
# Where the text is (CONTRACT §5.2)
# ==================================================================================================

MEDIA = {
    "image_caption": ("imageMessage", lambda text: {"imageMessage": {
        "url": "https://mmg.whatsapp.net/o1/v/t62.7118-24/f1/m231/abc.enc",
        "mimetype": "image/jpeg", "caption": text, "height": 1280, "width": 960,
        "mediaKey": {"0": 1, "1": 2}, "fileLength": {"low": 123456, "high": 0, "unsigned": True},
        "jpegThumbnail": {"0": 255, "1": 216}}}),
    "video_caption": ("videoMessage", lambda text: {"videoMessage": {
        "url": "https://mmg.whatsapp.net/v/t62.7161-24/abc.enc", "mimetype": "video/mp4",
        "caption": text, "seconds": 12, "fileLength": {"low": 2345678, "high": 0,
                                                       "unsigned": True}}}),
    "document_caption": ("documentMessage", lambda text: {"documentMessage": {
        "url": "https://mmg.whatsapp.net/v/t62.7119-24/abc.enc", "mimetype": "application/pdf",
        "title": "orcamento.pdf", "fileName": "orcamento.pdf", "caption": text}}),
    "ephemeral_wrapper": ("ephemeralMessage", lambda text: {"ephemeralMessage": {"message": {
        "extendedTextMessage": {"text": text, "contextInfo": {"expiration": 604800}}}}}),
    "ephemeral_wrapper_conversation": ("ephemeralMessage", lambda text: {"ephemeralMessage": {
        "message": {"conversation": text}}}),
    "view_once_wrapper": ("viewOnceMessage", lambda text: {"viewOnceMessage": {"message": {
        "imageMessage": {"mimetype": "image/jpeg", "caption": text, "viewOnce": True}}}}),
    "view_once_v2_wrapper": ("viewOnceMessageV2", lambda text: {"viewOnceMessageV2": {"message": {
        "videoMessage": {"mimetype": "video/mp4", "caption": text, "viewOnce": True}}}}),
    "extended_text_v1": ("extendedTextMessage", lambda text: {"extendedTextMessage": {
        "text": text, "matchedText": "https://loja.test", "title": "Loja"}}),
}


@pytest.mark.parametrize("kind", list(MEDIA), ids=list(MEDIA))
async def test_code_is_found_in_captions_and_wrapped_messages(api, kind):
    message_type, build = MEDIA[kind]
    answer_visit = await visit(api, f"v-{kind}")
    code = answer_visit["code"]
    text = f"Quero esse aqui {message_code(code)}"
    phone = new_phone()
    answer = await api.webhook(with_message(build(text), phone, message_type))
    assert answer["match"] == "code", answer
    lead = await only_lead(api)
    assert lead["phone"] == phone
    assert lead["code"] == code
    assert lead["session_id"] == answer_visit["session_id"]
    assert lead["attribution"]["utm_source"] == "google"
    # The stored text is the caption as the person reads it (without the invisible copy).
    assert lead["first_message"] == f"Quero esse aqui [ref {code}]"


REPLIES = {
    "buttons_reply": ("buttonsResponseMessage", "Quero comprar", lambda: {
        "buttonsResponseMessage": {"selectedButtonId": "btn-comprar",
                                   "selectedDisplayText": "Quero comprar",
                                   "contextInfo": {"stanzaId": "3EB0C0FFEE"}, "type": 1}}),
    "list_reply": ("listResponseMessage", "Horários de sábado", lambda: {
        "listResponseMessage": {"title": "Horários de sábado", "listType": 1,
                                "singleSelectReply": {"selectedRowId": "row-sabado"},
                                "description": "Das 9h às 14h",
                                "contextInfo": {"stanzaId": "3EB0C0FFEE"}}}),
    "template_reply": ("templateButtonReplyMessage", "Falar com vendedor", lambda: {
        "templateButtonReplyMessage": {"selectedId": "vendedor",
                                       "selectedDisplayText": "Falar com vendedor",
                                       "selectedIndex": 1,
                                       "contextInfo": {"stanzaId": "3EB0C0FFEE"}}}),
    "interactive_reply": ("interactiveResponseMessage", "Ver catálogo", lambda: {
        "interactiveResponseMessage": {
            "body": {"text": "Ver catálogo", "format": 1},
            "nativeFlowResponseMessage": {"name": "menu_options",
                                          "paramsJson": "{\"id\":\"catalogo\"}",
                                          "version": 3},
            "contextInfo": {"stanzaId": "3EB0C0FFEE"}}}),
    "buttons_reply_in_ephemeral": ("ephemeralMessage", "Quero comprar", lambda: {
        "ephemeralMessage": {"message": {"buttonsResponseMessage": {
            "selectedButtonId": "btn-comprar", "selectedDisplayText": "Quero comprar"}}}}),
}


@pytest.mark.parametrize("kind", list(REPLIES), ids=list(REPLIES))
async def test_button_list_template_and_interactive_replies_give_their_text(api, kind):
    message_type, text, build = REPLIES[kind]
    phone = new_phone()
    answer = await api.webhook(with_message(build(), phone, message_type))
    assert answer["match"] == "none"
    lead = await only_lead(api)
    assert lead["phone"] == phone
    assert lead["first_message"] == text


async def test_a_media_message_without_caption_starts_a_lead_without_text(api):
    phone = new_phone()
    envelope = with_message({"audioMessage": {"mimetype": "audio/ogg; codecs=opus",
                                              "seconds": 7, "ptt": True}}, phone, "audioMessage")
    answer = await api.webhook(envelope)
    assert answer["match"] == "none"
    lead = await only_lead(api)
    assert lead["phone"] == phone
    assert lead["first_message"] is None


# ==================================================================================================
# Sender resolution across Evolution versions (CONTRACT §5.1)
# ==================================================================================================

LID_VARIANTS = {
    "evolution_2.2_lid_only": ({"remoteJid": LID}, None, "214365870912345"),
    "evolution_2.3.0_sender_pn": ({"remoteJid": LID, "senderPn": PN}, "5531991234567",
                                  "214365870912345"),
    "evolution_2.3.0_sender_pn_and_lid": ({"remoteJid": LID, "senderPn": PN, "senderLid": LID,
                                           "participant": None}, "5531991234567",
                                          "214365870912345"),
    "evolution_2.3.1_previous_remote_jid": ({"remoteJid": PN, "senderPn": PN,
                                             "previousRemoteJid": LID},
                                            "5531991234567", "214365870912345"),
    "evolution_2.3.3_remote_jid_alt_equals_pn": ({"remoteJid": PN, "remoteJidAlt": PN,
                                                  "addressingMode": "lid"},
                                                 "5531991234567", None),
    "evolution_2.3.6_lid_with_pn_alt": ({"remoteJid": LID, "remoteJidAlt": PN,
                                         "addressingMode": "lid"},
                                        "5531991234567", "214365870912345"),
    "evolution_2.3.7_both_pn": ({"remoteJid": PN, "remoteJidAlt": PN, "addressingMode": "lid"},
                                "5531991234567", None),
    "evolution_2.4.0_pn_with_lid_alt": ({"remoteJid": PN, "remoteJidAlt": LID,
                                         "addressingMode": "pn"},
                                        "5531991234567", "214365870912345"),
    "device_suffix_in_jid": ({"remoteJid": "5531991234567:12@s.whatsapp.net",
                              "remoteJidAlt": "214365870912345:3@lid", "addressingMode": "pn"},
                             "5531991234567", "214365870912345"),
}


@pytest.mark.parametrize("variant", list(LID_VARIANTS), ids=list(LID_VARIANTS))
async def test_sender_is_resolved_for_every_evolution_key_layout(api, variant):
    key, phone, lid = LID_VARIANTS[variant]
    answer = await api.webhook(with_key(key))
    assert answer["match"] == "none", answer
    lead = await only_lead(api)
    assert (lead["phone"], lead["lid"]) == (phone, lid)
    assert lead["name"] == "João Pedro"


MERGING = [v for v, (_key, phone, lid) in LID_VARIANTS.items() if phone and lid]


@pytest.mark.parametrize("variant", MERGING, ids=MERGING)
async def test_a_lid_only_contact_is_merged_when_its_phone_appears(api, variant):
    first = await api.webhook(with_key({"remoteJid": LID}, "Oi"))
    lead = await only_lead(api)
    assert (lead["phone"], lead["lid"]) == (None, "214365870912345")
    key = LID_VARIANTS[variant][0]
    second = await api.webhook(with_key(key, "Ainda tem?"))
    assert second["ignored"] == "existing contact"
    assert second["contact_id"] == first["contact_id"]
    lead = await only_lead(api)
    assert (lead["phone"], lead["lid"]) == ("5531991234567", "214365870912345")
    assert lead["first_message"] == "Oi"
    # Known by phone now: a PN-only layout (2.3.7) recognises the same contact.
    third = await api.webhook(with_key({"remoteJid": PN, "remoteJidAlt": PN}, "Olá de novo"))
    assert third["ignored"] == "existing contact"
    assert len(await api.leads()) == 1


async def test_contacts_known_apart_by_phone_and_by_lid_are_merged(api):
    by_phone = await api.webhook(with_key({"remoteJid": PN, "remoteJidAlt": PN}, "Oi"))
    by_lid = await api.webhook(with_key({"remoteJid": LID}, "Oi de novo"))
    assert by_phone["contact_id"] != by_lid["contact_id"]  # nothing linked them yet
    both = await api.webhook(with_key({"remoteJid": LID, "remoteJidAlt": PN,
                                       "addressingMode": "lid"}, "Alô"))
    assert both["ignored"] == "existing contact"
    leads = await api.leads()
    assert len(leads) == 2
    assert all(lead["phone"] == "5531991234567" for lead in leads)
    assert all(lead["lid"] == "214365870912345" for lead in leads)
    # From now on both forms resolve to one contact.
    again_lid = await api.webhook(with_key({"remoteJid": LID}, "?"))
    again_phone = await api.webhook(with_key({"remoteJid": PN}, "?"))
    assert again_lid["contact_id"] == again_phone["contact_id"] == both["contact_id"]
    assert len(await api.leads()) == 2


async def test_a_placeholder_resend_without_alt_jid_is_the_known_contact(api):
    await api.webhook(fixture("messages-upsert-lid"))
    code = (await visit(api, "v-resend"))["code"]
    # Recovered through a placeholder resend: only remoteJid, fromMe, id (no alt, no mode).
    resend = fixture("messages-upsert-lid")
    resend["data"]["key"] = {"remoteJid": LID, "fromMe": False, "id": message_id()}
    resend["data"]["message"]["conversation"] = f"Vi no site {message_code(code)}"
    answer = await api.webhook(resend)
    assert answer["match"] == "code"
    lead = await only_lead(api, code=code)
    assert lead["phone"] == "5531991234567"  # known from the earlier message
    assert lead["lid"] == "214365870912345"
    assert len(await api.leads()) == 2


async def test_a_placeholder_resend_ctwa_message_from_a_new_contact_is_a_ctwa_lead(api):
    envelope = fixture("messages-upsert-ctwa-ad")
    envelope["data"]["key"] = {"remoteJid": "99887766554433@lid", "fromMe": False,
                               "id": message_id()}
    answer = await api.webhook(envelope)
    assert answer["match"] == "ctwa"
    lead = await only_lead(api)
    assert (lead["phone"], lead["lid"]) == (None, "99887766554433")
    assert lead["attribution"]["ad_id"] == "120212345678900123"


async def test_a_key_without_any_usable_jid_is_ignored(api):
    answer = await api.webhook(with_key({"remoteJid": "abc@c.us"}))
    assert "ignored" in answer
    assert await api.leads() == []


async def test_a_known_contacts_later_messages_keep_its_name_current(api):
    phone = new_phone()
    first = upsert("Oi", phone=phone)
    first["data"]["pushName"] = "Ana"
    contact_id = (await api.webhook(first))["contact_id"]
    row = await api.db.fetchone("SELECT * FROM contacts WHERE id = ?", contact_id)
    renamed = upsert("Sou eu de novo", phone=phone)
    renamed["data"]["pushName"] = "Ana Souza 🌸"
    assert (await api.webhook(renamed))["contact_id"] == contact_id
    unnamed = upsert("E mais uma", phone=phone)
    unnamed["data"].pop("pushName", None)
    answer = await api.webhook(unnamed)
    assert answer["contact_id"] == contact_id and answer["ignored"] == "existing contact"
    after = await api.db.fetchone("SELECT * FROM contacts WHERE id = ?", contact_id)
    assert after["name"] == "Ana Souza 🌸"  # a message without a name keeps the last one
    assert after["updated_at"] >= row["updated_at"]
    assert (after["phone"], after["lid"]) == (row["phone"], row["lid"])
    assert len(await api.db.fetchall("SELECT id FROM contacts")) == 1


# ==================================================================================================
# Duplicate deliveries
# ==================================================================================================

async def test_a_duplicate_delivery_has_no_second_effect(api):
    envelope = fixture("messages-upsert-conversation")
    first = await api.webhook(envelope)
    assert first["match"] == "none"
    second = await api.webhook(envelope)
    assert second["ok"] is True
    assert second["ignored"] == "duplicate"
    assert "lead_id" not in second
    assert len(await api.leads()) == 1
    # Both deliveries are stored (raw bodies are kept) and processed.
    assert [d["status"] for d in await deliveries(api)] == ["processed", "processed"]


async def test_a_duplicate_of_a_coded_message_does_not_unmatch_it(api):
    code = (await visit(api, "v-dup"))["code"]
    envelope = upsert(message_code(code))
    assert (await api.webhook(envelope))["match"] == "code"
    assert (await api.webhook(envelope))["ignored"] == "duplicate"
    lead = await only_lead(api)
    assert lead["code"] == code and lead["match_method"] == "code"


async def test_concurrent_duplicate_deliveries_make_one_lead(api):
    envelope = upsert("Oi, tudo bem?")
    answers = await asyncio.gather(*(api.webhook(envelope) for _ in range(6)))
    assert sum(1 for a in answers if "lead_id" in a) == 1
    assert sum(1 for a in answers if a.get("ignored") == "duplicate") == 5
    assert len(await api.leads()) == 1


async def test_the_same_message_id_on_another_instance_is_not_a_duplicate(api):
    msg_id = "3EB0SAMEID0000000001"
    first = await api.webhook(upsert("Oi", phone=new_phone(), message_id=msg_id,
                                     instance="loja-centro"))
    second = await api.webhook(upsert("Oi", phone=new_phone(), message_id=msg_id,
                                      instance="loja-norte"))
    assert first["match"] == second["match"] == "none"
    leads = await api.leads()
    assert sorted(lead["connection_id"] for lead in leads) == ["loja-centro", "loja-norte"]


async def test_the_same_message_id_in_another_company_is_not_a_duplicate(api, client):
    other = await create_company(client, "outra")
    envelope = upsert("Oi")
    await api.webhook(envelope)
    resp = await client.post("/webhook/outra", json=envelope,
                             headers={"X-Webhook-Secret": other["webhook_secret"]})
    answer = await resp.json()
    assert resp.status == 200 and answer["match"] == "none"
    assert len(await api.leads()) == 1


async def test_concurrent_first_messages_of_one_new_contact_make_one_lead(api):
    """People often send "Oi" and their question at once; Evolution posts them concurrently."""
    await api.webhook(fixture("connection-update-open"))  # a connection in use already
    phone = new_phone()
    answers = await asyncio.gather(*(api.webhook(upsert(f"mensagem {n}", phone=phone))
                                     for n in range(4)))
    assert sum(1 for a in answers if "lead_id" in a) == 1, answers
    assert len({a["contact_id"] for a in answers}) == 1
    assert len(await api.leads()) == 1


# ==================================================================================================
# Authentication
# ==================================================================================================

async def test_a_delivery_without_a_secret_is_401_and_not_stored(api):
    answer = await api.webhook(fixture("messages-upsert-conversation"), expect=401, secret=None)
    assert answer == {"error": "Unauthorized"}
    assert await deliveries(api) == []
    assert await api.leads() == []


async def test_a_delivery_with_a_wrong_secret_is_401_and_not_stored(api):
    answer = await api.webhook(fixture("messages-upsert-conversation"), expect=401,
                               secret="whs_not-the-secret")
    assert answer == {"error": "Unauthorized"}
    resp = await api.client.post(f"/webhook/{COMPANY}", json=upsert("Oi"),
                                 headers={"Authorization": "Bearer whs_wrong"})
    assert resp.status == 401
    assert await resp.json() == {"error": "Unauthorized"}
    assert await deliveries(api) == []
    assert await api.leads() == []


async def test_another_companys_secret_is_401(api, client):
    other = await create_company(client, "outra")
    answer = await api.webhook(upsert("Oi"), expect=401, secret=other["webhook_secret"])
    assert answer == {"error": "Unauthorized"}
    assert await api.leads() == []


async def test_the_company_token_is_not_a_webhook_secret(api):
    resp = await api.client.post(f"/webhook/{COMPANY}", json=upsert("Oi"), headers=api.auth)
    assert resp.status == 401


async def test_malformed_json_without_a_secret_is_401_and_not_stored(api):
    answer = await api.webhook(b'{"event": "messages.upsert", "data": ', expect=401, secret=None)
    assert answer == {"error": "Unauthorized"}
    assert await deliveries(api) == []


async def test_the_webhook_secret_works_as_a_bearer_token(api):
    resp = await api.client.post(f"/webhook/{COMPANY}", json=upsert("Oi"),
                                 headers={"Authorization": f"Bearer {api.webhook_secret}"})
    answer = await resp.json()
    assert resp.status == 200, answer
    assert answer["match"] == "none"
    assert len(await api.leads()) == 1


async def test_an_envelope_apikey_equal_to_the_stored_instance_token_works(api):
    await api.webhook(fixture("connection-update-open"))  # authenticated: creates the connection
    token = "B6D711FC-DE4D-4FD5-9365-44120E713976"  # the fixtures' apikey
    await set_sql(api, "UPDATE connections SET instance_token = ? WHERE company_id = ? AND id = ?",
                  token, COMPANY, "loja-centro")
    answer = await api.webhook(fixture("messages-upsert-conversation"), secret=None)
    assert answer["match"] == "none"
    assert len(await api.leads()) == 1
    # Another token, or the right token claimed for another instance, is refused.
    wrong = upsert("Oi")
    wrong["apikey"] = "00000000-0000-0000-0000-000000000000"
    assert await api.webhook(wrong, expect=401, secret=None) == {"error": "Unauthorized"}
    elsewhere = upsert("Oi", instance="loja-norte")
    elsewhere["apikey"] = token
    await api.webhook(elsewhere, expect=401, secret=None)
    missing = upsert("Oi")
    missing["apikey"] = None  # Evolution sends null when the token is not exposed
    await api.webhook(missing, expect=401, secret=None)
    assert len(await api.leads()) == 1


async def test_an_apikey_is_refused_when_no_instance_token_is_stored(api):
    await api.webhook(fixture("connection-update-open"))
    envelope = upsert("Oi")
    envelope["apikey"] = ""
    await api.webhook(envelope, expect=401, secret=None)
    await api.webhook(fixture("messages-upsert-conversation"), expect=401, secret=None)


async def test_an_inserted_connection_with_an_instance_token_authenticates(api):
    ts = time.time()
    await set_sql(api, "INSERT INTO connections (company_id, id, instance_token, created_at, "
                       "updated_at) VALUES (?, ?, ?, ?, ?)",
                  COMPANY, "loja-centro", "tok-loja-centro", ts, ts)
    envelope = upsert("Oi")
    envelope["apikey"] = "tok-loja-centro"
    assert (await api.webhook(envelope, secret=None))["match"] == "none"


async def test_a_per_connection_webhook_secret_works(api):
    await api.webhook(fixture("connection-update-open"))
    # Stored as its SHA-256, as create-instance and adoption store it (issue 13, D9).
    await set_sql(api, "UPDATE connections SET webhook_secret = ? WHERE company_id = ? AND id = ?",
                  hash_token("conn-secret-123"), COMPANY, "loja-centro")
    answer = await api.webhook(upsert("Oi"), secret="conn-secret-123")
    assert answer["match"] == "none"
    resp = await api.client.post(f"/webhook/{COMPANY}", json=upsert("Olá", phone=new_phone()),
                                 headers={"Authorization": "Bearer conn-secret-123"})
    assert resp.status == 200
    assert len(await api.leads()) == 2


async def test_deliveries_are_accepted_unauthenticated_when_the_company_turns_auth_off(api):
    await api.webhook(upsert("Oi"), expect=401, secret=None)
    updated = await patch_company(api, webhook_auth_required=False)
    assert updated["webhook_auth_required"] is False
    answer = await api.webhook(fixture("messages-upsert-conversation"), secret=None)
    assert answer["match"] == "none"
    assert len(await api.leads()) == 1
    await patch_company(api, webhook_auth_required=True)
    await api.webhook(upsert("Oi", phone=new_phone()), expect=401, secret=None)
    assert len(await api.leads()) == 1


async def test_an_unknown_company_is_404(api):
    resp = await api.client.post("/webhook/nao-existe", json=upsert("Oi"),
                                 headers={"X-Webhook-Secret": api.webhook_secret})
    assert resp.status == 404
    assert await resp.json() == {"error": "Company not found"}
    resp = await api.client.post("/webhook/nao-existe/messages-upsert", json=upsert("Oi"),
                                 headers={"X-Webhook-Secret": api.webhook_secret})
    assert resp.status == 404
    assert await resp.json() == {"error": "Company not found"}
    assert await deliveries(api) == []


# ==================================================================================================
# Raw deliveries, body limits, URL forms
# ==================================================================================================

async def test_malformed_json_is_400_and_its_raw_body_is_stored_byte_for_byte(api):
    raw = ('{"event": "messages.upsert", "instance": "loja-centro", "data": {"key": '
           '"Promoção ').encode() + b"\xff\xfe\x00 trailing"
    answer = await api.webhook(raw, expect=400)
    assert answer["error"]
    assert isinstance(answer["delivery_id"], int)
    row = await api.db.fetchone("SELECT * FROM webhook_deliveries WHERE id = ?",
                                answer["delivery_id"])
    assert bytes(row["body"]) == raw
    assert row["company_id"] == COMPANY
    assert await api.leads() == []


async def test_a_processed_delivery_is_stored_byte_for_byte_with_status_processed(api):
    raw = json.dumps(fixture("messages-upsert-conversation"), ensure_ascii=False,
                     indent=1).encode()
    answer = await api.webhook(raw)
    row = await api.db.fetchone("SELECT * FROM webhook_deliveries WHERE id = ?",
                                answer["delivery_id"])
    # byte for byte but for the instance token (issue 13: `apikey` is redacted)
    assert bytes(row["body"]) == raw.replace(b"B6D711FC-DE4D-4FD5-9365-44120E713976",
                                             b"[redacted]")
    assert row["status"] == "processed"
    assert row["event"] == "messages.upsert"
    assert row["instance"] == "loja-centro"
    assert row["company_id"] == COMPANY


async def test_every_stored_delivery_of_a_processed_message_is_processed(api):
    code = (await visit(api, "v-all"))["code"]
    for envelope in (fixture("connection-update-open"), fixture("qrcode-updated"),
                     fixture("messages-upsert-conversation"),
                     fixture("messages-upsert-conversation"),  # duplicate
                     fixture("messages-upsert-from-me"), fixture("messages-upsert-lid"),
                     fixture("messages-upsert-ctwa-ad"), fixture("labels-edit"),
                     upsert(message_code(code), phone=new_phone())):
        await api.webhook(envelope)
    await api.webhook(upsert("Oi"), suffix="messages-upsert")
    stored = await deliveries(api)
    assert len(stored) == 10
    assert {d["status"] for d in stored} == {"processed"}
    assert all(d["processed_at"] is not None for d in stored)


async def test_a_body_over_one_mebibyte_is_413(api):
    raw = b'{"event": "messages.upsert", "pad": "' + b"A" * WEBHOOK_BODY_MAX + b'"}'
    answer = await api.webhook(raw, expect=413)
    assert answer["error"]
    assert await api.leads() == []


async def test_a_chunked_body_over_one_mebibyte_is_413(api):
    async def chunks():
        yield b'{"event": "messages.upsert", "pad": "'
        for _ in range(17):
            yield b"A" * 65536
        yield b'"}'

    resp = await api.client.post(f"/webhook/{COMPANY}", data=chunks(),
                                 headers={"X-Webhook-Secret": api.webhook_secret,
                                          "Content-Type": "application/json"})
    assert resp.status == 413
    assert "error" in await resp.json()


async def test_a_body_of_exactly_one_mebibyte_is_accepted_whole(api):
    """A large upsert (webhookBase64 media) arrives in many chunks and must be read whole."""
    envelope = upsert("Foto do produto", phone=new_phone())
    envelope["data"]["message"]["base64"] = ""
    size = len(json.dumps(envelope).encode())
    envelope["data"]["message"]["base64"] = "Q" * (WEBHOOK_BODY_MAX - size)
    raw = json.dumps(envelope).encode()
    assert len(raw) == WEBHOOK_BODY_MAX
    answer = await api.webhook(raw)
    assert answer["match"] == "none"
    row = await api.db.fetchone("SELECT body FROM webhook_deliveries WHERE id = ?",
                                answer["delivery_id"])
    assert bytes(row["body"]) == raw.replace(envelope["apikey"].encode(), b"[redacted]")


async def test_a_chunked_body_under_the_limit_is_read_whole(api):
    envelope = upsert("Oi, segue o arquivo", phone=new_phone())
    envelope["data"]["message"]["base64"] = "Q" * 300_000
    raw = json.dumps(envelope).encode()

    async def chunks():
        for start in range(0, len(raw), 4096):
            yield raw[start:start + 4096]

    resp = await api.client.post(f"/webhook/{COMPANY}", data=chunks(),
                                 headers={"X-Webhook-Secret": api.webhook_secret,
                                          "Content-Type": "application/json"})
    answer = await resp.json()
    assert resp.status == 200, answer
    assert answer["match"] == "none"


async def test_the_by_events_url_form_works(api):
    answer = await api.webhook(fixture("messages-upsert-conversation"), suffix="messages-upsert")
    assert answer["match"] == "none"
    answer = await api.webhook(fixture("connection-update-open"), suffix="connection-update")
    assert answer["state"] == "open"
    assert (await connection_row(api))["state"] == "open"
    assert len(await api.leads()) == 1


async def test_the_by_events_suffix_names_the_event_when_the_body_does_not(api):
    envelope = upsert("Oi")
    del envelope["event"]
    answer = await api.webhook(envelope, suffix="messages-upsert")
    assert answer["match"] == "none"
    assert len(await api.leads()) == 1


# ==================================================================================================
# Code matching when the visitor edited the message
# ==================================================================================================

EDITED = {
    "text_added_before_and_after": lambda c: f"Olá! Vi o anúncio {message_code(c)} e queria o preço",
    "lower_case": lambda c: f"oi, quero o desconto [ref {c.lower()}]",
    "brackets_removed": lambda c: f"Oi ref {c} quero comprar",
    "only_the_invisible_copy_left": lambda c: "Oi, quero comprar" + invisible_code(c),
    "only_the_visible_copy_left": lambda c: f"Oi, quero comprar [ref {c}]",
    "ref_with_extra_punctuation": lambda c: f"Oi!! (Ref.: {c})...",
    "code_at_the_start_with_no_text": lambda c: message_code(c),
    "bare_code_alone": lambda c: c,
    "mistyped_visible_but_invisible_intact": lambda c: (
        f"Oi [ref {c[:3]}{'9' if c[3] != '9' else '8'}{c[4:]}]{invisible_code(c)}"),
}


@pytest.mark.parametrize("edit", list(EDITED), ids=list(EDITED))
async def test_a_code_survives_the_visitor_editing_the_message(api, edit):
    decoy = await visit(api, "v-decoy", page_url="https://loja.test/?utm_source=bing")
    mine = await visit(api, "v-mine")
    phone = new_phone()
    answer = await api.webhook(upsert(EDITED[edit](mine["code"]), phone=phone))
    assert answer["match"] == "code", answer
    lead = await only_lead(api)
    assert lead["phone"] == phone
    assert lead["code"] == mine["code"] != decoy["code"]
    assert lead["session_id"] == mine["session_id"]
    assert lead["match_method"] == "code"
    assert lead["confidence"] == 1.0
    assert lead["attribution"]["utm_source"] == "google"
    assert lead["attribution"]["utm_campaign"] == "x"
    assert lead["attribution"]["page_url"] == SITE


async def test_every_edited_message_matches_its_own_visitor(api):
    """All the edits at once, each from its own phone with its own visitor's code."""
    expected = {}
    for n, edit in enumerate(EDITED):
        answer_visit = await visit(api, f"visitor-{n}",
                                   page_url=f"https://loja.test/?utm_source=google&utm_campaign=c{n}")
        phone = new_phone()
        answer = await api.webhook(upsert(EDITED[edit](answer_visit["code"]), phone=phone))
        assert answer["match"] == "code", (edit, answer)
        expected[phone] = (answer_visit["code"], f"c{n}")
    leads = await api.leads()
    assert len(leads) == len(EDITED)
    for lead in leads:
        code, campaign = expected[lead["phone"]]
        assert lead["code"] == code
        assert lead["attribution"]["utm_campaign"] == campaign


async def test_a_mistyped_code_gives_none_and_matches_no_other_visitor(api):
    mine = await visit(api, "v-typo")
    other = await visit(api, "v-other")
    code = mine["code"]
    for position in range(7):
        wrong_char = next(ch for ch in "0123456789ABCDEFGHJKMNPQRSTVWXYZ" if ch != code[position])
        typed = code[:position] + wrong_char + code[position + 1:]
        phone = new_phone()
        answer = await api.webhook(upsert(f"Oi [ref {typed}]", phone=phone))
        assert answer["match"] == "none", (typed, answer)
        lead = await only_lead(api, phone=phone)
        assert lead["match_method"] == "none"
        assert lead["code"] is None
        assert lead["session_id"] is None
        assert lead["attribution"]["utm_source"] == "direct"
    # Both codes are still free for their own visitors.
    assert (await api.webhook(upsert(message_code(other["code"]))))["match"] == "code"
    assert (await api.webhook(upsert(message_code(code), phone=new_phone())))["match"] == "code"


async def test_an_expired_code_gives_none(api):
    mine = await visit(api, "v-expired")
    await set_sql(api, "UPDATE visits SET expires_at = ? WHERE company_id = ? AND code = ?",
                  time.time() - 60, COMPANY, mine["code"])
    answer = await api.webhook(upsert(message_code(mine["code"])))
    assert answer["match"] == "none"
    lead = await only_lead(api)
    assert lead["code"] is None and lead["session_id"] is None
    assert lead["attribution"]["utm_source"] == "direct"


async def test_a_code_of_another_company_gives_none(api, client):
    await create_company(client, "outra")
    resp = await client.post("/tracking", json={"company_id": "outra", "visitor_id": "v-outra",
                                                "page_url": SITE})
    theirs = (await resp.json())["code"]
    answer = await api.webhook(upsert(message_code(theirs)))
    assert answer["match"] == "none"
    lead = await only_lead(api)
    assert lead["code"] is None and lead["match_method"] == "none"


async def test_a_company_with_only_the_invisible_copy_configured_matches(api):
    await patch_company(api, code_mode="invisible")
    mine = await visit(api, "v-invisible")
    answer = await api.webhook(upsert("Olá, tenho interesse" + message_code(mine["code"],
                                                                            "invisible")))
    assert answer["match"] == "code"
    assert (await only_lead(api))["first_message"] == "Olá, tenho interesse"


async def test_a_custom_visible_template_matches(api):
    await patch_company(api, code_template="Código: {code}", code_mode="visible")
    mine = await visit(api, "v-template")
    text = "Quero saber mais. " + message_code(mine["code"], "visible", "Código: {code}")
    answer = await api.webhook(upsert(text))
    assert answer["match"] == "code"
    assert (await only_lead(api))["first_message"] == text


# ==================================================================================================
# Lead rules
# ==================================================================================================

async def test_only_the_first_message_of_a_contact_creates_a_lead(api):
    phone = new_phone()
    first = await api.webhook(upsert("Oi", phone=phone))
    assert first["match"] == "none"
    later = await api.webhook(upsert("Vocês têm em azul?", phone=phone))
    assert later["ignored"] == "existing contact"
    assert "lead_id" not in later
    lead = await only_lead(api)
    assert lead["first_message"] == "Oi"
    assert lead["id"] == first["lead_id"]


async def test_a_later_message_with_a_new_code_creates_a_new_lead(api):
    phone = new_phone()
    first_visit = await visit(api, "v-returning",
                              page_url="https://loja.test/?utm_source=google&utm_campaign=a")
    first = await api.webhook(upsert(f"Oi {message_code(first_visit['code'])}", phone=phone))
    assert first["match"] == "code"
    # The same visitor clicks a new ad: the visit already brought a lead, so a new code is issued.
    second_visit = await visit(api, "v-returning",
                               page_url="https://loja.test/?utm_source=facebook&utm_campaign=b")
    assert second_visit["code"] != first_visit["code"]
    plain = await api.webhook(upsert("Ainda tem?", phone=phone))
    assert plain["ignored"] == "existing contact"
    second = await api.webhook(upsert(f"Voltei {message_code(second_visit['code'])}", phone=phone))
    assert second["match"] == "code"
    assert second["contact_id"] == first["contact_id"]
    leads = {lead["code"]: lead for lead in await api.leads()}
    assert set(leads) == {first_visit["code"], second_visit["code"]}
    assert leads[first_visit["code"]]["attribution"]["utm_campaign"] == "a"
    assert leads[second_visit["code"]]["attribution"]["utm_source"] == "facebook"
    assert leads[second_visit["code"]]["attribution"]["utm_campaign"] == "b"
    assert all(lead["phone"] == phone for lead in leads.values())


async def test_an_organic_contact_who_later_sends_a_code_gets_a_code_lead(api):
    phone = new_phone()
    await api.webhook(upsert("Oi", phone=phone))
    mine = await visit(api, "v-later")
    answer = await api.webhook(upsert(message_code(mine["code"]), phone=phone))
    assert answer["match"] == "code"
    methods = sorted(lead["match_method"] for lead in await api.leads())
    assert methods == ["code", "none"]


async def test_the_same_contact_repeating_a_matched_code_makes_no_new_lead(api):
    phone = new_phone()
    mine = await visit(api, "v-repeat")
    await api.webhook(upsert(message_code(mine["code"]), phone=phone))
    again = await api.webhook(upsert(f"Oi? {message_code(mine['code'])}", phone=phone))
    assert again["ignored"] == "code already matched"
    assert len(await api.leads()) == 1


async def test_a_code_matched_once_is_not_matched_to_a_second_contact(api):
    mine = await visit(api, "v-forwarded")
    text = f"Olha essa loja {message_code(mine['code'])}"
    first_phone, second_phone = new_phone(), new_phone()
    assert (await api.webhook(upsert(text, phone=first_phone)))["match"] == "code"
    second = await api.webhook(upsert(text, phone=second_phone))  # a forwarded message
    assert second["match"] == "none"
    first_lead = await only_lead(api, phone=first_phone)
    second_lead = await only_lead(api, phone=second_phone)
    assert first_lead["code"] == mine["code"] and first_lead["match_method"] == "code"
    assert second_lead["code"] is None and second_lead["match_method"] == "none"
    assert second_lead["session_id"] is None


async def test_attribution_is_the_last_touch_and_the_first_touch_is_kept(api):
    first = await visit(api, "v-touch",
                        page_url="https://loja.test/promo?utm_source=google&utm_medium=cpc"
                                 "&utm_campaign=primavera&gclid=Cj0KCQ-first")
    last = await visit(api, "v-touch",
                       page_url="https://loja.test/?utm_source=facebook&utm_medium=paid"
                                "&utm_campaign=verao&fbclid=IwAR-last",
                       referrer="https://l.facebook.com/", fbp="fb.1.1700000000.123")
    assert last["code"] == first["code"]  # same visit, no lead yet: the code is kept
    answer = await api.webhook(upsert(message_code(last["code"])))
    assert answer["match"] == "code"
    lead = await only_lead(api)
    attribution = lead["attribution"]
    assert attribution["utm_source"] == "facebook"
    assert attribution["utm_medium"] == "paid"
    assert attribution["utm_campaign"] == "verao"
    assert attribution["fbclid"] == "IwAR-last"
    assert attribution["fbp"] == "fb.1.1700000000.123"
    assert attribution["referrer"] == "https://l.facebook.com/"
    assert attribution["gclid"] is None
    assert lead["first_touch"]["utm_source"] == "google"
    assert lead["first_touch"]["utm_campaign"] == "primavera"
    assert lead["first_touch"]["gclid"] == "Cj0KCQ-first"
    assert set(attribution) >= {"utm_source", "utm_medium", "utm_campaign", "utm_term",
                                "utm_content", "gclid", "gbraid", "wbraid", "fbclid", "fbc",
                                "fbp", "ttclid", "msclkid", "ga_client_id", "ctwa_clid", "ad_id",
                                "ad_title", "referrer", "landing_page", "page_url"}


async def test_store_first_message_false_stores_no_text(api):
    await patch_company(api, store_first_message=False)
    mine = await visit(api, "v-private")
    await api.webhook(upsert("Oi, meu CPF é 123.456.789-00", phone=new_phone()))
    await api.webhook(upsert(f"Quero comprar {message_code(mine['code'])}", phone=new_phone()))
    await api.webhook(fixture("messages-upsert-ctwa-ad"))
    leads = await api.leads()
    assert sorted(lead["match_method"] for lead in leads) == ["code", "ctwa", "none"]
    assert all(lead["first_message"] is None for lead in leads)


async def test_a_new_ad_click_from_a_known_contact_creates_a_new_ctwa_lead(api):
    first = fixture("messages-upsert-ctwa-ad")
    assert (await api.webhook(first))["match"] == "ctwa"
    same_click = fixture("messages-upsert-ctwa-ad")
    same_click["data"]["key"]["id"] = message_id()
    again = await api.webhook(same_click)
    assert "lead_id" not in again and "ignored" in again
    new_click = fixture("messages-upsert-ctwa-ad")
    new_click["data"]["key"]["id"] = message_id()
    new_click["data"]["contextInfo"]["externalAdReply"]["ctwaClid"] = "ARAnotherClickId"
    assert (await api.webhook(new_click))["match"] == "ctwa"
    leads = await api.leads()
    assert sorted(lead["attribution"]["ctwa_clid"] for lead in leads) == sorted(
        ["ARAnotherClickId", first["data"]["contextInfo"]["externalAdReply"]["ctwaClid"]])


async def test_a_ctwa_message_without_a_click_id_from_a_known_contact_makes_no_lead(api):
    phone = "5521976543210"  # the ctwa fixture's sender
    await api.webhook(upsert("Oi", phone=phone))
    envelope = fixture("messages-upsert-ctwa-ad")
    del envelope["data"]["contextInfo"]["externalAdReply"]["ctwaClid"]
    answer = await api.webhook(envelope)
    assert answer["ignored"] == "existing contact"
    assert len(await api.leads()) == 1


# ==================================================================================================
# The `window` method
# ==================================================================================================

async def _click(api, visitor_id: str, phone: str = CONNECTION_PHONE) -> dict:
    return await visit(api, visitor_id, event="whatsapp_click", whatsapp_phone=phone)


async def _window_setup(api) -> None:
    await patch_company(api, window_match=True, window_minutes=30)
    await api.webhook(fixture("connection-update-open"))
    assert (await connection_row(api))["phone"] == CONNECTION_PHONE


async def test_window_attributes_a_codeless_message_to_the_single_recent_click(api):
    await _window_setup(api)
    clicked = await _click(api, "v-window")
    answer = await api.webhook(upsert("Oi, vi no site", phone=new_phone()))
    assert answer["match"] == "window"
    lead = await only_lead(api)
    assert lead["match_method"] == "window"
    assert 0 < lead["confidence"] < 1
    assert lead["session_id"] == clicked["session_id"]
    assert lead["attribution"]["utm_source"] == "google"
    assert lead["attribution"]["utm_campaign"] == "x"
    assert lead["clicked_at"] is not None
    assert lead["code"] is None
    # That click is used up: the next stranger is organic.
    assert (await api.webhook(upsert("Oi", phone=new_phone())))["match"] == "none"


async def test_window_with_two_recent_clicks_gives_none(api):
    await _window_setup(api)
    await _click(api, "v-window-1")
    await _click(api, "v-window-2")
    answer = await api.webhook(upsert("Oi, vi no site", phone=new_phone()))
    assert answer["match"] == "none"
    assert (await only_lead(api))["session_id"] is None


async def test_window_off_gives_none(api):
    await api.webhook(fixture("connection-update-open"))
    await _click(api, "v-window-off")
    answer = await api.webhook(upsert("Oi, vi no site", phone=new_phone()))
    assert answer["match"] == "none"
    assert (await only_lead(api))["match_method"] == "none"


async def test_window_ignores_clicks_older_than_the_window(api):
    await _window_setup(api)
    clicked = await _click(api, "v-window-old")
    await set_sql(api, "UPDATE visits SET clicked_at = ? WHERE id = ?",
                  time.time() - 31 * 60, clicked["session_id"])
    assert (await api.webhook(upsert("Oi", phone=new_phone())))["match"] == "none"


async def test_window_ignores_clicks_to_another_number(api):
    await _window_setup(api)
    await _click(api, "v-window-other", phone="5511955554444")
    assert (await api.webhook(upsert("Oi", phone=new_phone())))["match"] == "none"


async def test_window_does_not_apply_to_a_known_contact(api):
    await _window_setup(api)
    phone = new_phone()
    await api.webhook(upsert("Oi", phone=phone))
    await _click(api, "v-window-known")
    answer = await api.webhook(upsert("Voltei", phone=phone))
    assert answer["ignored"] == "existing contact"
    assert len(await api.leads()) == 1


async def test_a_code_wins_over_the_window(api):
    await _window_setup(api)
    await _click(api, "v-window-a")
    coded = await _click(api, "v-window-b")
    answer = await api.webhook(upsert(message_code(coded["code"]), phone=new_phone()))
    assert answer["match"] == "code"
    assert (await only_lead(api))["session_id"] == coded["session_id"]
