"""A fake of Meta's webhook sender for the WhatsApp Cloud API source (SPEC §13).

It delivers what Meta delivers, the way Meta delivers it, to a URL on 127.0.0.1:

    body = cloud_fixture("text-referral-image-ad", phone_number_id="106540352242922")
    delivery = await send(client, "/webhook/cloud/acme", body, APP_SECRET)
    delivery.status, delivery.text                    # the last answer
    await send(client, url, body, APP_SECRET, signature="sha256=" + "0" * 64)   # forged
    await send(client, url, body, APP_SECRET, retries=2)    # the same bytes, three times
    await send(client, url, fresh_ids(body), APP_SECRET)    # same content, new message ids
    status, text = await verify(client, url, verify_token)  # the subscription handshake

`client` is an aiohttp `ClientSession` (with a full URL) or pytest-aiohttp's `TestClient` (with a
path). The bodies come from tests/fixtures/cloud/ (see its README: each file names the Meta reference
page it follows); they are Meta's documented shapes with Brazilian test people, never our parser's
expectations read back.

How Meta sends (the behaviour copied here, with where it is written down):

- `POST` with `Content-Type: application/json`, user agent `facebookexternalua`, and
  `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body, key = the app secret>`.
  https://developers.facebook.com/docs/graph-api/webhooks/getting-started#validate-payloads
- The body is JSON with non-ASCII characters escaped (`\\u00e4`, lowercase hex; emoji as surrogate
  pairs) and `/` written `\\/`; the signature is of those exact bytes, so a receiver that parses and
  re-serialises before hashing gets another signature ("we generate the signature using an escaped
  unicode version of the payload, with lowercase hex digits" — same page). `meta_bytes()` builds them.
- Verification: `GET <callback>?hub.mode=subscribe&hub.challenge=<int>&hub.verify_token=<token>`;
  the endpoint must answer the challenge (plain text, 200) only when the token is the one typed into
  the Meta app. https://developers.facebook.com/docs/graph-api/webhooks/getting-started#verification-requests
  and https://developers.facebook.com/documentation/business-messaging/whatsapp/webhooks/create-webhook-endpoint
- Retries: "If we send a webhook request to your endpoint and your server responds with an HTTP status
  code other than 200, or if we are unable to deliver the webhook for another reason, we will keep
  trying with decreasing frequency until the request succeeds, for up to 7 days." Retries carry the
  identical payload, so the same message id can arrive more than once (also after a 200 that Meta
  did not see in time): receivers must deduplicate.
  https://developers.facebook.com/documentation/business-messaging/whatsapp/webhooks/overview
  `send(..., retries=n)` re-sends the same bytes n more times whatever the answer was — the
  redelivery a receiver has to survive; the schedule (minutes to days) is not imitated.
- One POST can batch several entries (one per WhatsApp Business Account), several changes and several
  messages/statuses per change: fixtures two-entries.json and two-contacts.json.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import hmac
import json
import random
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cloud"
USER_AGENT = "facebookexternalua"
SIGNATURE_HEADER = "X-Hub-Signature-256"


def sign(body: bytes, app_secret: str) -> str:
    """`sha256=` + the hex HMAC-SHA256 of exactly these bytes with the app secret, as Meta signs."""
    return "sha256=" + hmac.new(app_secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def meta_bytes(body: Any) -> bytes:
    """The bytes Meta puts on the wire for this JSON value: compact, non-ASCII escaped, `/` as `\\/`."""
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    text = json.dumps(body, ensure_ascii=True, separators=(",", ":"))
    return text.replace("/", "\\/").encode("ascii")


def fixture_names() -> list[str]:
    """Every fixture in tests/fixtures/cloud (names without .json)."""
    return sorted(path.stem for path in FIXTURES.glob("*.json"))


def _per_entry(value: str | Sequence[str] | None, index: int) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value[index]


def cloud_fixture(
    name: str,
    *,
    phone_number_id: str | Sequence[str] | None = None,
    waba_id: str | Sequence[str] | None = None,
    display_phone_number: str | Sequence[str] | None = None,
    text: str | None = None,
) -> dict:
    """A copy of tests/fixtures/cloud/<name>.json with the business's ids put in.

    Each id is one string for every entry, or a list with one per entry (two-entries.json holds two
    businesses). `text` replaces the body of the first text message (e.g. to carry a tracking code).
    """
    body = json.loads((FIXTURES / f"{name}.json").read_text("utf-8"))
    for index, entry in enumerate(body["entry"]):
        if (value := _per_entry(waba_id, index)) is not None:
            entry["id"] = value
        for change in entry["changes"]:
            metadata = change["value"]["metadata"]
            if (value := _per_entry(phone_number_id, index)) is not None:
                metadata["phone_number_id"] = value
            if (value := _per_entry(display_phone_number, index)) is not None:
                metadata["display_phone_number"] = value
    if text is not None:
        message = next(m for m in messages(body) if m.get("type") == "text")
        message["text"]["body"] = text
    return body


def messages(body: dict) -> list[dict]:
    """Every incoming message of a body, in order (entries × changes × messages)."""
    return [m for e in body["entry"] for c in e["changes"] for m in c["value"].get("messages", [])]


def new_wamid() -> str:
    """A message id of the shape Meta uses (`wamid.` + base64), never seen before."""
    raw = b"\x1c\x18\x0d" + b"55" + str(random.randrange(10**10, 10**11)).encode()
    raw += b"\x15\x02\x00\x12\x18\x14" + secrets.token_hex(10).upper().encode() + b"\x00"
    return "wamid." + base64.b64encode(raw).decode()


def fresh_ids(body: dict) -> dict:
    """A copy whose messages, echoes and statuses carry new ids: the same content, a new delivery."""
    body = copy.deepcopy(body)
    for entry in body["entry"]:
        for change in entry["changes"]:
            value = change["value"]
            for key in ("messages", "message_echoes", "statuses"):
                for item in value.get(key, []):
                    item["id"] = new_wamid()
    return body


@dataclasses.dataclass
class Delivery:
    """The receiver's answer to the last attempt, and every attempt's (status, text)."""

    status: int
    text: str
    attempts: list[tuple[int, str]]
    body: bytes
    signature: str


async def send(
    client: Any,
    url: str,
    body: Any,
    app_secret: str,
    *,
    signature: str | None = None,
    retries: int = 0,
    headers: dict | None = None,
) -> Delivery:
    """POST a webhook like Meta: the exact bytes, signed with `app_secret` (or `signature` as given).

    `body` is a JSON value (serialised by `meta_bytes`) or bytes sent untouched. `retries` re-sends
    the identical request that many more times (Meta's redelivery). `headers` adds or overrides
    headers (e.g. drop the signature with `{SIGNATURE_HEADER: ""}` — an empty value is removed).
    """
    raw = meta_bytes(body)
    signature = sign(raw, app_secret) if signature is None else signature
    sent = {"Content-Type": "application/json", "User-Agent": USER_AGENT, SIGNATURE_HEADER: signature}
    sent.update(headers or {})
    sent = {name: value for name, value in sent.items() if value != ""}
    attempts = []
    for _ in range(retries + 1):
        async with client.post(url, data=raw, headers=sent) as response:
            attempts.append((response.status, await response.text()))
    status, text = attempts[-1]
    return Delivery(status, text, attempts, raw, signature)


async def verify(
    client: Any, url: str, verify_token: str, challenge: str | None = None, *, mode: str = "subscribe"
) -> tuple[int, str]:
    """Meta's verification request; returns (status, text). The challenge is a random integer."""
    challenge = challenge if challenge is not None else str(random.randrange(10**9, 2 * 10**9))
    params = {"hub.mode": mode, "hub.challenge": challenge, "hub.verify_token": verify_token}
    async with client.get(url, params=params, headers={"User-Agent": USER_AGENT}) as response:
        return response.status, await response.text()
