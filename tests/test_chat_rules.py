"""Chat rules (SPEC §14, issue 19), on SQLite and on Postgres: the business's own WhatsApp messages
(Evolution `fromMe`) and the customer's record events on the chat's lead, once per message, with
the value read from Brazilian money in the text; through the outbox to a fake CRM webhook; the
text never stored; erasure; `POST /api/chat-rules/test`; the rules' validation. The value reader
and the keyword matching are pure functions, tested against tables of real-looking messages.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

import whatstracking
from conftest import ADMIN_TOKEN, Api, create_company, fixture, upsert
from test_conversions import (  # noqa: F401 - crm: a fixture
    CRM_SECRET, FAST, call, configure, crm, delivery, lead_events, new_phone)

SALE = {"from": "business", "keywords": ["pedido confirmado", "venda fechada"],
        "event": "purchase", "value": "from_text"}
QUALIFIED = {"from": "customer", "keywords": ["quero comprar", "orçamento"],
             "event": "qualified", "value": None}


# ---- fixtures and helpers -----------------------------------------------------------------------

@pytest.fixture
async def api(make_config, aiohttp_client) -> Api:
    """A company on a server whose delivery worker is fast (the CRM webhook is its destination
    here: no Meta or GA4 fake is needed)."""
    client = await aiohttp_client(whatstracking.create_app(make_config(**FAST)))
    return Api(client, await create_company(client))


def from_business(text: str, phone: str, message_id: str | None = None, **key) -> dict:
    """The business's own message to the chat with `phone`, typed on the phone (the fromMe
    fixture: status SERVER_ACK, pushName "Você")."""
    envelope = fixture("messages-upsert-from-me")
    envelope["data"]["key"].update(id=message_id or uuid.uuid4().hex[:20].upper(),
                                   remoteJid=f"{phone}@s.whatsapp.net", **key)
    envelope["data"]["key"].pop("remoteJidAlt", None)
    envelope["data"]["message"]["conversation"] = text
    return envelope


async def direct_lead(api: Api, phone: str, text: str = "Oi, vi o anúncio, quanto custa?") -> int:
    result = await api.webhook(upsert(text, phone=phone))
    assert result["match"] == "none", result
    return result["lead_id"]


async def count(api: Api, table: str) -> int:
    return (await api.db.fetchone(f"SELECT COUNT(*) AS n FROM {table}"))["n"]


# ---- the business's messages ---------------------------------------------------------------------

async def test_business_sale_message_records_one_purchase_with_its_value_delivered_once(api, crm):
    await configure(api, chat_rules=[SALE], crm_webhook={"url": crm.hook_url,
                                                         "secret": CRM_SECRET})
    phone = new_phone()
    lead_id = await direct_lead(api, phone)
    sale = from_business("Pedido confirmado ✅ Total: R$ 1.250,90 no Pix. Obrigado, Ana!", phone)

    answer = await api.webhook(sale)
    assert answer["from_business"] is True and answer["lead_id"] == lead_id
    assert [(m["event"], m["value"]) for m in answer["chat_rules"]] == [("purchase", 1250.9)]
    events = await lead_events(api, lead_id)
    assert [e["name"] for e in events] == ["lead", "purchase"]
    purchase = events[1]
    assert purchase["source"] == "chat_rule"
    assert purchase["rule"] == SALE
    assert (purchase["value"], purchase["currency"]) == (1250.9, "BRL")
    delivered = await delivery(api, lead_id, "crm_webhook", "purchase", ("delivered",))
    assert delivered["event_id"] == purchase["event_id"]
    sent = [b for b in crm.bodies if b["type"] == "lead.purchase"]
    assert len(sent) == 1
    assert sent[0]["event"]["value"] == 1250.9 and sent[0]["event"]["source"] == "chat_rule"
    assert sent[0]["event"]["rule"] == SALE and sent[0]["lead"]["id"] == lead_id

    # Evolution delivers the same message again: nothing new, nothing sent again.
    again = await api.webhook(sale)
    assert again["ignored"] == "duplicate"
    assert [e["name"] for e in await lead_events(api, lead_id)] == ["lead", "purchase"]
    found = (await call(api, "GET", "/api/deliveries", 200,
                        params={"lead_id": str(lead_id)}))["deliveries"]
    assert [d["event"] for d in found].count("purchase") == 1
    assert len([b for b in crm.bodies if b["type"] == "lead.purchase"]) == 1


async def test_the_customer_writing_the_business_keyword_records_nothing(api):
    await configure(api, chat_rules=[SALE])
    phone = new_phone()
    lead_id = await direct_lead(api, phone)
    answer = await api.webhook(upsert("Meu pedido confirmado? Paguei R$ 300,00", phone=phone))
    assert "chat_rules" not in answer
    assert [e["name"] for e in await lead_events(api, lead_id)] == ["lead"]


async def test_a_business_message_to_a_stranger_creates_nothing(api):
    await configure(api, chat_rules=[SALE])
    answer = await api.webhook(from_business("Venda fechada! R$ 500,00", new_phone()))
    assert answer["ignored"] == "business message to a chat with no lead"
    assert await api.leads() == []
    assert await count(api, "contacts") == 0
    assert await count(api, "lead_events") == 0
    # The fixture as Evolution sends it (its chat has no lead either).
    answer = await api.webhook(fixture("messages-upsert-from-me"))
    assert answer["ignored"] == "business message to a chat with no lead"
    assert await count(api, "contacts") == 0


async def test_without_business_rules_the_business_messages_are_ignored_as_before(api):
    await configure(api, chat_rules=[QUALIFIED])  # a customer rule only
    phone = new_phone()
    await direct_lead(api, phone)
    answer = await api.webhook(from_business("Quero comprar? Pedido confirmado", phone))
    assert answer["ignored"] == "from me"
    assert await count(api, "lead_events") == 1


async def test_a_sale_message_without_an_amount_records_a_purchase_without_a_value(api):
    await configure(api, chat_rules=[SALE])
    phone = new_phone()
    lead_id = await direct_lead(api, phone)
    await api.webhook(from_business("Pedido confirmado! Pedido nº 4521, entrega amanhã", phone))
    purchase = (await lead_events(api, lead_id))[1]
    assert (purchase["name"], purchase["value"], purchase["currency"]) == ("purchase", None, None)


async def test_a_business_message_fires_on_the_chats_latest_lead(api):
    await configure(api, chat_rules=[SALE])
    phone = new_phone()
    first = await direct_lead(api, phone)
    code = (await api.track(visitor_id="v-second", page_url="https://loja.test/"))["code"]
    second = (await api.webhook(upsert(whatstracking.message_code(code), phone=phone)))
    assert second["match"] == "code"
    answer = await api.webhook(from_business("venda fechada, R$ 89,90", phone))
    assert answer["lead_id"] == second["lead_id"]
    assert [e["name"] for e in await lead_events(api, first)] == ["lead"]
    assert [e["name"] for e in await lead_events(api, second["lead_id"])] == ["lead", "purchase"]


async def test_a_business_message_finds_the_chat_by_lid_and_by_the_12_digit_id(api):
    await configure(api, chat_rules=[SALE])
    lid_lead = (await api.webhook(fixture("messages-upsert-lid")))["lead_id"]
    by_lid = from_business("Pedido confirmado R$ 10,00", "0")
    by_lid["data"]["key"]["remoteJid"] = "214365870912345@lid"  # the LID fixture's sender
    assert (await api.webhook(by_lid))["lead_id"] == lid_lead
    # A Brazilian mobile known by its dialable 13 digits; the chat names its 12-digit id.
    lead_id = await direct_lead(api, "5511987654321")
    answer = await api.webhook(from_business("Pedido confirmado R$ 20,00", "551187654321"))
    assert answer["lead_id"] == lead_id
    assert [m["value"] for m in answer["chat_rules"]] == [20.0]


async def test_one_event_of_a_kind_per_message_and_every_kind_that_fires(api):
    await configure(api, chat_rules=[
        SALE, {"from": "any", "keywords": ["confirmado"], "event": "purchase", "value": None},
        {"from": "business", "keywords": ["fechada"], "event": "qualified"}])
    phone = new_phone()
    lead_id = await direct_lead(api, phone)
    answer = await api.webhook(from_business("Venda fechada e pedido confirmado: R$ 2 mil",
                                             phone))
    assert [(m["event"], m["value"]) for m in answer["chat_rules"]] == [
        ("purchase", 2000.0), ("qualified", None)]
    events = await lead_events(api, lead_id)
    assert sorted(e["name"] for e in events) == ["lead", "purchase", "qualified"]
    assert next(e for e in events if e["name"] == "purchase")["rule"] == SALE


async def test_business_messages_of_one_batch_each_reach_their_lead(api):
    await configure(api, chat_rules=[SALE])
    phones = [new_phone() for _ in range(6)]
    leads = [await direct_lead(api, phone) for phone in phones]
    answers = await asyncio.gather(*(
        api.webhook(from_business(f"Pedido confirmado, R$ {n},50", phone))
        for n, phone in enumerate(phones, 1)))
    assert [a["lead_id"] for a in answers] == leads
    for n, lead_id in enumerate(leads, 1):
        assert [e["value"] for e in await lead_events(api, lead_id)] == [None, n + 0.5]
    assert await count(api, "contacts") == 6


# ---- the customer's messages --------------------------------------------------------------------

async def test_a_customer_rule_records_its_event_on_the_new_or_latest_lead(api):
    await configure(api, chat_rules=[QUALIFIED, SALE])
    phone = new_phone()
    first = await api.webhook(upsert("Olá! Quero comprar o plano anual 😀", phone=phone))
    assert first["match"] == "none"
    assert [m["event"] for m in first["chat_rules"]] == ["qualified"]
    assert [e["name"] for e in await lead_events(api, first["lead_id"])] == ["lead", "qualified"]

    other = new_phone()
    lead_id = await direct_lead(api, other)
    later = await api.webhook(upsert("Pode me mandar um ORCAMENTO?", phone=other))
    assert later["ignored"] == "existing contact"  # no new lead; the rule fires on the lead
    assert [(m["lead_id"], m["event"]) for m in later["chat_rules"]] == [(lead_id, "qualified")]
    events = await lead_events(api, lead_id)
    assert [(e["name"], e["source"], e["rule"]) for e in events] == [
        ("lead", "whatsapp", None), ("qualified", "chat_rule", QUALIFIED)]


async def test_a_business_keyword_from_the_business_fires_a_rule_from_any(api):
    rule = {"from": "any", "keywords": ["desisti"], "event": "lost", "value": None}
    await configure(api, chat_rules=[rule])
    phone = new_phone()
    lead_id = await direct_lead(api, phone)
    await api.webhook(from_business("Que pena que você desistiu 😢", phone))
    assert [e["name"] for e in await lead_events(api, lead_id)] == ["lead", "lost"]


# ---- privacy ------------------------------------------------------------------------------------

async def test_rules_never_store_the_text(api):
    await configure(api, chat_rules=[QUALIFIED, SALE], store_first_message=False)
    phone = new_phone()
    first = await api.webhook(upsert("Quero comprar: Xilofone-Primeira", phone=phone))
    await api.webhook(from_business("Pedido confirmado Xilofone-Segunda R$ 99,00", phone))
    lead = (await api.leads())[0]
    assert lead["first_message"] is None
    assert len(await lead_events(api, first["lead_id"])) == 3
    for table in ("leads", "lead_events", "contacts", "messages", "deliveries"):
        for row in await api.db.fetchall(f"SELECT * FROM {table}"):
            assert "xilofone" not in repr(row).lower(), (table, row)

    await configure(api, store_first_message=True)
    phone = new_phone()
    await api.webhook(upsert("Quero comprar: Xilofone-Terceira", phone=phone))
    await api.webhook(from_business("Pedido confirmado Xilofone-Quarta R$ 99,00", phone))
    kept = [repr(row).lower() for table in ("leads", "lead_events", "contacts", "messages")
            for row in await api.db.fetchall(f"SELECT * FROM {table}")]
    assert sum("xilofone-terceira" in row for row in kept) == 1  # the first message, on its lead
    assert not any("xilofone-quarta" in row for row in kept)


async def test_erasing_a_person_removes_the_events_rules_made(api):
    await configure(api, chat_rules=[QUALIFIED, SALE])
    phone, other = new_phone(), new_phone()
    await api.webhook(upsert("Quero comprar", phone=phone))
    await api.webhook(from_business("Pedido confirmado, R$ 350,00", phone))
    await api.webhook(upsert("Quero comprar também", phone=other))
    assert await count(api, "lead_events") == 5
    answer = await call(api, "DELETE", f"/api/contacts/{phone}", 200)
    assert answer["erased"]["lead_events"] == 3
    assert answer["erased"]["messages"] == 2  # the customer's message and the business's
    rows = await api.db.fetchall("SELECT source, lead_id FROM lead_events")
    assert len(rows) == 2 and {r["source"] for r in rows} == {"whatsapp", "chat_rule"}


# ---- POST /api/chat-rules/test -------------------------------------------------------------------

async def test_trying_a_message_answers_what_would_fire_and_stores_nothing(api):
    await configure(api, chat_rules=[QUALIFIED, SALE])
    phone = new_phone()
    await direct_lead(api, phone)
    before = {t: await count(api, t) for t in ("lead_events", "messages", "deliveries",
                                               "webhook_deliveries")}
    answer = await call(api, "POST", "/api/chat-rules/test", 200, json={
        "text": "✅ PEDIDO CONFIRMADO — total R$ 1.250,00 (3x sem juros)", "from": "business"})
    assert answer == {"fired": [{"rule": 1, "event": "purchase", "keyword": "pedido confirmado",
                                 "value": 1250.0, "currency": "BRL"}], "amount": 1250.0}
    answer = await call(api, "POST", "/api/chat-rules/test", 200, json={
        "text": "pedido confirmado", "from": "customer"})
    assert answer == {"fired": [], "amount": None}
    answer = await call(api, "POST", "/api/chat-rules/test", 200, json={
        "text": "Queria um orçamento de 2 mil reais", "from": "customer"})
    assert answer["fired"] == [{"rule": 0, "event": "qualified", "keyword": "orçamento",
                                "value": None, "currency": None}]
    assert answer["amount"] == 2000.0
    # Rules being edited, not saved yet.
    answer = await call(api, "POST", "/api/chat-rules/test", 200, json={
        "text": "Reembolso feito: R$ 49,90", "from": "business", "chat_rules": [
            {"from": "business", "keywords": ["reembolso"], "event": "refund",
             "value": "from_text"}]})
    assert answer["fired"][0]["event"] == "refund" and answer["fired"][0]["value"] == 49.9
    assert {t: await count(api, t) for t in before} == before


async def test_trying_a_message_refuses_bad_input_and_strangers(api):
    for body, field in (({"from": "business"}, "text"), ({"text": 3, "from": "business"}, "text"),
                        ({"text": "oi"}, "from"), ({"text": "oi", "from": "bot"}, "from"),
                        ({"text": "oi", "from": "any", "x": 1}, "x"),
                        ({"text": "oi", "from": "customer", "chat_rules": [{"from": "any"}]},
                         "chat_rules[0].keywords")):
        answer = await call(api, "POST", "/api/chat-rules/test", 400, json=body)
        assert field in answer["error"], (body, answer)
    await call(api, "POST", "/api/chat-rules/test", 401, token=None,
               json={"text": "oi", "from": "business"})
    other = await create_company(api.client, "outra-empresa")
    await call(api, "POST", "/api/chat-rules/test", 404, token=other["token"],
               json={"text": "oi", "from": "business", "company_id": api.company_id})
    await call(api, "POST", "/api/chat-rules/test", 400, token=ADMIN_TOKEN,
               json={"text": "oi", "from": "business"})
    answer = await call(api, "POST", "/api/chat-rules/test", 200, token=ADMIN_TOKEN,
                        json={"text": "oi", "from": "business", "company_id": api.company_id})
    assert answer == {"fired": [], "amount": None}


# ---- the rules' validation ----------------------------------------------------------------------

@pytest.mark.parametrize("rules, error", [
    ("venda", "chat_rules must be a list"),
    ([SALE, "venda"], "chat_rules[1] must be an object"),
    ([{**SALE, "from": "bot"}], "chat_rules[0].from must be business, customer or any"),
    ([{**SALE, "keywords": []}], "chat_rules[0].keywords must be a list of 1 to 20"),
    ([{**SALE, "keywords": "venda"}], "chat_rules[0].keywords must be a list"),
    ([SALE, {**SALE, "keywords": ["ok", ""]}], "chat_rules[1].keywords must be a list"),
    ([{**SALE, "keywords": ["x" * 101]}], "chat_rules[0].keywords must be a list"),
    ([{**SALE, "keywords": ["ok", "✅!!"]}], "chat_rules[0].keywords[1] must contain a letter"),
    ([{**SALE, "event": "lead"}], "chat_rules[0].event must be qualified, purchase, refund or"),
    ([{**SALE, "value": "total"}], 'chat_rules[0].value must be "from_text" or null'),
    ([{**SALE, "valor": "from_text"}], "Unknown field: chat_rules[0].valor"),
    ([{k: v for k, v in SALE.items() if k != "event"}], "chat_rules[0].event must be"),
    ([SALE] * 51, "at most 50 rules"),
])
async def test_a_bad_rule_is_a_400_naming_it_and_nothing_is_saved(api, rules, error):
    await configure(api, chat_rules=[QUALIFIED])
    answer = await call(api, "PATCH", "/api/company", 400,
                        json={"chat_rules": rules, "currency": "USD"})
    assert error in answer["error"], answer
    company = await call(api, "GET", "/api/company", 200)
    assert company["chat_rules"] == [QUALIFIED] and company["currency"] == "BRL"


async def test_rules_are_saved_normalised_and_null_removes_them(api):
    company = await call(api, "GET", "/api/company", 200)
    assert company["chat_rules"] == []
    saved = await configure(api, chat_rules=[{"from": "business", "keywords": ["  Vendido! "],
                                              "event": "purchase"}])
    assert saved["chat_rules"] == [{"from": "business", "keywords": ["Vendido!"],
                                    "event": "purchase", "value": None}]
    assert (await configure(api, chat_rules=None))["chat_rules"] == []


# ---- matching and the value reader (pure) --------------------------------------------------------

@pytest.mark.parametrize("text, fires", [
    ("PEDIDO CONFIRMADO", True),
    ("pedido confirmádo", True),  # accents ignored both ways
    ("Pédido Cönfirmado!", True),
    ("✅✅ Pedido, confirmado!!! 🎉", True),  # emoji and punctuation do not get in the way
    ("Seu pedido\nconfirmado.", True),
    ("Oi! Seu *pedido confirmado* segue em anexo", True),  # WhatsApp's bold
    ("pedidoconfirmado", False),
    ("pedido não confirmado ainda", False),  # (the words must follow each other)
    ("Olá, tudo bem?", False),
    ("", False),
])
def test_keywords_match_ignoring_case_accents_emoji_and_punctuation(text, fires):
    rules = whatstracking.validate_chat_rules([{"from": "any", "keywords": ["Pedido Confirmado"],
                                                "event": "purchase"}])
    assert bool(whatstracking.firing_chat_rules(rules, text, "business")) is fires


def test_a_keyword_is_found_inside_a_longer_word_and_with_its_own_accents():
    rules = whatstracking.validate_chat_rules([
        {"from": "any", "keywords": ["orçamento"], "event": "qualified"},
        {"from": "business", "keywords": ["vend"], "event": "purchase"}])
    assert [r[0] for r in whatstracking.firing_chat_rules(
        rules, "Mandei o ORCAMENTO; produto vendido", "business")] == [0, 1]
    assert [r[0] for r in whatstracking.firing_chat_rules(
        rules, "Mandei o ORCAMENTO; produto vendido", "customer")] == [0]


# At least 20 messages as Brazilian attendants write them, and what the reader takes from each:
# the first amount, in reais. Decided: "R$ 2 mil" is 2000 (mil, k, milhão scale the number); a
# number needs R$, "reais" or Brazilian cents to be an amount, so order numbers, quantities and
# dates are not read.
MONEY = [
    ("Pedido confirmado, total R$ 1.250,00", 1250.0),
    ("pedido confirmado no valor de R$200", 200.0),
    ("Venda fechada! R$ 1.250,90 no cartão", 1250.9),
    ("Fechado por R$1250", 1250.0),
    ("Ficou R$ 89,90 com o frete", 89.9),
    ("total: 1.250,00 reais", 1250.0),
    ("Deu 350 reais certinho", 350.0),
    ("Pagamento de R$ 2 mil recebido", 2000.0),
    ("Fechamos em 2 mil reais 🙌", 2000.0),
    ("R$ 1,5 mil de entrada", 1500.0),
    ("r$ 49,9 no pix", 49.9),
    ("Valor: R$ 89.90", 89.9),
    ("Recebido R$ 10.000,00 - contrato assinado", 10000.0),
    ("PIX de R$ 12.500 confirmado ✅", 12500.0),
    ("Ficou em 3x de R$ 416,67 (total R$ 1.250,00)", 416.67),
    ("Pedido nº 4521 confirmado, total 1.250,00", 1250.0),
    ("Pedido confirmado, valor total R$ 1.250,00 em 10x sem juros", 1250.0),
    ("Entrega dia 12/03, pagamento R$ 300,00", 300.0),
    ("Venda de 2 unidades por R$ 59,80", 59.8),
    ("Consultoria fechada: R$ 3.5 mil", 3500.0),
    ("O carro saiu por R$ 1,2 milhão", 1200000.0),
    ("Sinal de R$ 500 pago, restante na entrega", 500.0),
    ("Total BRL 99,00", 99.0),
    ("Desconto de 10,50% aplicado, fica R$ 90,00", 90.0),
    ("Pedido 4521 confirmado", None),
    ("Paguei 150 ontem", None),
    ("Chega em 2 dias, às 14h30", None),
    ("Fechou! Depois te passo o valor", None),
]


@pytest.mark.parametrize("text, value", MONEY)
def test_the_value_reader_reads_brazilian_money_as_people_write_it(text, value):
    assert whatstracking.read_money(text) == value

