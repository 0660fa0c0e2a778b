"""Small fakes of the platforms conversions go out to (SPEC §9): Meta's Conversions API, GA4's
Measurement Protocol and a CRM's signed-webhook receiver.

Each is an aiohttp app on 127.0.0.1 that records every request it receives and can be told to
misbehave, one answer at a time or until told otherwise:

    meta = await FakeMeta().start()          # META_GRAPH_URL=meta.url
    meta.fail("500")                         # the next answer: HTTP 500
    meta.fail("429", retry_after=1)          # the next answer: 429 with Retry-After: 1
    meta.fail("400")                         # the next answer: Meta's OAuthException JSON
    meta.fail("hang", times=2)               # the next two: no answer until the client gives up
    meta.fail("hold", times=2); meta.release()   # the next two wait for release(), then answer
    meta.fail("500", times=None)             # every answer from now on, until meta.recover()
    await meta.go_down(); await meta.come_back()   # connection refused, then the same port again
    meta.events                              # the events Meta accepted (with the request's fields)
    await meta.close()

FakeMeta validates like the Graph API does and answers 400 with Meta's error JSON when an event
would be refused; FakeGA4 answers 204 to everything (the real endpoint validates nothing) and
records `problems` for the tests to check; FakeCrm verifies the HMAC signature (401 if wrong).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import re
import socket
import time
import uuid
from typing import Any

from aiohttp import web

META_WINDOW = 7 * 86400  # seconds: Meta refuses older events
GA4_WINDOW = 72 * 3600  # seconds: GA4 drops events with an older timestamp_micros
CRM_CLOCK_SKEW = 300  # seconds the CRM tolerates between its clock and the timestamp header
META_ACTION_SOURCES = ("email", "website", "app", "phone_call", "chat", "physical_store",
                       "system_generated", "business_messaging", "other")
# The event names Meta accepts with action_source=business_messaging (WhatsApp).
META_MESSAGING_EVENTS = ("LeadSubmitted", "Purchase", "AddToCart", "InitiateCheckout",
                         "ViewContent", "QualifiedLead")
GA4_EVENT_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,39}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (a destination that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclasses.dataclass
class Received:
    method: str
    path: str
    query: dict
    headers: dict  # lower-case names
    raw: bytes
    json: Any
    status: int = 0  # what the fake answered
    received_at: float = 0.0


class FakePlatform:
    """What the three fakes share: a server on its own port, the record, the misbehaviour."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.url = ""
        self.port = 0
        self.delay = 0.0  # seconds every answer takes (a slow but healthy platform)
        self._failures: list[tuple[str, dict]] = []  # consumed one per request
        self._always: tuple[str, dict] | None = None
        self._release = asyncio.Event()
        self._hold = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._record])
        self.routes(self.app.router)

    def routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self, port: int = 0):
        self._release = asyncio.Event()
        self._hold = asyncio.Event()
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def close(self) -> None:
        self._release.set()  # hanging answers end at once
        self._hold.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def go_down(self) -> None:
        """Stop listening: connections to self.url are refused until come_back()."""
        await self.close()

    async def come_back(self) -> None:
        await self.start(self.port)

    # ---- misbehaviour ----------------------------------------------------------------------

    def fail(self, mode: str, times: int | None = 1, retry_after: float | str | None = None,
             hang_seconds: float = 30.0) -> None:
        """Answer the next `times` requests (None: all, until recover()) with `mode`:
        "500", "429" (with Retry-After when given), "400" (the platform's error), "hang" (no
        answer for `hang_seconds`, then a 504) or "hold" (the normal answer once release())."""
        assert mode in ("500", "429", "400", "401", "hang", "hold"), mode
        how = {"retry_after": retry_after, "hang_seconds": hang_seconds}
        if times is None:
            self._always = (mode, how)
        else:
            self._failures.extend([(mode, how)] * times)

    def recover(self) -> None:
        self._failures.clear()
        self._always = None

    def release(self) -> None:
        """Let the held requests have their answers; later "hold" requests are held again."""
        self._hold.set()
        self._hold = asyncio.Event()

    async def _misbehave(self, request: web.Request) -> web.StreamResponse | None:
        if self._failures:
            mode, how = self._failures.pop(0)
        elif self._always is not None:
            mode, how = self._always
        else:
            return None
        if mode == "hold":
            await self._hold.wait()
            return None
        if mode == "hang":
            try:
                await asyncio.wait_for(self._release.wait(), how["hang_seconds"])
            except asyncio.TimeoutError:
                pass
            return web.json_response({"error": "too late"}, status=504)
        if mode == "500":
            return web.json_response({"error": "Internal server error"}, status=500)
        if mode == "429":
            headers = {}
            if how["retry_after"] is not None:
                headers["Retry-After"] = str(how["retry_after"])
            return web.json_response({"error": "Too many requests"}, status=429,
                                     headers=headers)
        if mode == "401":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return self.platform_error("Invalid parameter")

    def platform_error(self, message: str) -> web.Response:
        return web.json_response({"error": message}, status=400)

    @web.middleware
    async def _record(self, request: web.Request, handler):
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        entry = Received(request.method, request.path, dict(request.query),
                         {k.lower(): v for k, v in request.headers.items()}, raw, body,
                         received_at=time.time())
        self.requests.append(entry)
        request["json"] = body
        request["raw"] = raw
        if self.delay:
            await asyncio.sleep(self.delay)
        response = await self._misbehave(request)
        if response is None:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = web.json_response({"error": exc.reason}, status=exc.status)
        entry.status = response.status
        return response


# ##################################################################################################
# Meta Conversions API
# ##################################################################################################

class FakeMeta(FakePlatform):
    """`POST /{version}/{dataset_id}/events` of the Graph API, validating like Meta does."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict] = []  # accepted events, each with "_dataset", "_version",
        # "_access_token" and "_test_event_code" of the request that carried it

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/{version}/{dataset_id}/events", self.collect)

    def platform_error(self, message: str, code: int = 100) -> web.Response:
        return web.json_response({"error": {
            "message": message, "type": "OAuthException", "code": code,
            "fbtrace_id": "A" + uuid.uuid4().hex[:22]}}, status=400)

    def accepted(self, event_id: str | None = None) -> list[dict]:
        return [e for e in self.events if event_id is None or e.get("event_id") == event_id]

    def problem(self, event: Any) -> str | None:
        """Why Meta would refuse this event, or None."""
        if not isinstance(event, dict):
            return "Invalid parameter: each event must be an object"
        name = event.get("event_name")
        if not isinstance(name, str) or not name:
            return "Invalid parameter: event_name is required"
        event_time = event.get("event_time")
        if not isinstance(event_time, int) or isinstance(event_time, bool):
            return "Invalid parameter: event_time must be an integer unix time"
        current = time.time()
        if event_time > current + 1:
            return "Invalid parameter: event_time is in the future"
        if event_time < current - META_WINDOW:
            return ("Invalid parameter: The timestamp for this event is more than 7 days in the "
                    "past")
        source = event.get("action_source")
        if source not in META_ACTION_SOURCES:
            return f"Invalid parameter: action_source {source!r} is not allowed"
        user = event.get("user_data")
        if not isinstance(user, dict) or not user:
            return "Invalid parameter: user_data is required"
        for value in user.get("ph", []) if isinstance(user.get("ph"), list) else [user.get("ph")]:
            if value is not None and not (isinstance(value, str) and SHA256_RE.match(value)):
                return "Invalid parameter: ph must be a SHA-256 hash (lowercase hex)"
        if source == "website":
            if not event.get("event_source_url"):
                return "Invalid parameter: event_source_url is required for website events"
            if not user.get("client_user_agent"):
                return "Invalid parameter: client_user_agent is required for website events"
        if source == "business_messaging":
            if event.get("messaging_channel") != "whatsapp":
                return "Invalid parameter: messaging_channel must be whatsapp"
            if not user.get("ctwa_clid"):
                return "Invalid parameter: ctwa_clid is required for business_messaging"
            if not user.get("whatsapp_business_account_id"):
                return ("Invalid parameter: whatsapp_business_account_id is required for "
                        "business_messaging")
            if name not in META_MESSAGING_EVENTS:
                return f"Invalid parameter: {name} is not supported for business_messaging"
        if name == "Purchase":
            custom = event.get("custom_data")
            if not isinstance(custom, dict) or custom.get("value") is None \
                    or not custom.get("currency"):
                return "Invalid parameter: Purchase events need custom_data.value and currency"
        return None

    async def collect(self, request: web.Request) -> web.Response:
        body = request["json"]
        if not isinstance(body, dict):
            return self.platform_error("Invalid parameter: the body must be JSON")
        token = body.get("access_token") or request.query.get("access_token")
        if not token:
            return self.platform_error("An access token is required to request this resource.",
                                       code=104)
        data = body.get("data")
        if isinstance(data, str):  # the Graph API also takes data as a JSON string
            try:
                data = json.loads(data)
            except ValueError:
                data = None
        if not isinstance(data, list) or not data:
            return self.platform_error("Invalid parameter: data must be a non-empty array")
        for event in data:
            problem = self.problem(event)
            if problem:
                return self.platform_error(problem)
        for event in data:
            self.events.append({**event, "_version": request.match_info["version"],
                                "_dataset": request.match_info["dataset_id"],
                                "_access_token": token,
                                "_test_event_code": body.get("test_event_code")})
        return web.json_response({"events_received": len(data), "messages": [],
                                  "fbtrace_id": "A" + uuid.uuid4().hex[:22]})


# ##################################################################################################
# GA4 Measurement Protocol
# ##################################################################################################

class FakeGA4(FakePlatform):
    """`POST /mp/collect`: 204 whatever it gets, like Google's; `problems` lists what the real
    property would silently drop or misreport (the tests assert it stays empty)."""

    def __init__(self) -> None:
        super().__init__()
        self.payloads: list[dict] = []  # accepted bodies, with "_query" added
        self.problems: list[str] = []

    @property
    def collect_url(self) -> str:
        return self.url + "/mp/collect"

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/mp/collect", self.collect)

    def events(self) -> list[dict]:
        """Every event received, each with the payload's client_id and timestamp_micros."""
        return [{**e, "client_id": p.get("client_id"),
                 "timestamp_micros": p.get("timestamp_micros")}
                for p in self.payloads for e in p.get("events") or []]

    def check(self, query: dict, body: Any) -> list[str]:
        problems = []
        if not query.get("measurement_id") or not query.get("api_secret"):
            problems.append("measurement_id and api_secret are required in the query")
        if not isinstance(body, dict):
            return problems + ["the body is not a JSON object"]
        if not isinstance(body.get("client_id"), str) or not body["client_id"]:
            problems.append("client_id is missing")
        micros = body.get("timestamp_micros")
        if micros is not None:
            if not isinstance(micros, int) or isinstance(micros, bool):
                problems.append("timestamp_micros must be an integer")
            elif not time.time() - GA4_WINDOW <= micros / 1e6 <= time.time() + 1:
                problems.append("timestamp_micros is not within the last 72 hours")
        events = body.get("events")
        if not isinstance(events, list) or not 1 <= len(events) <= 25:
            return problems + ["events must be a list of 1 to 25 events"]
        for event in events:
            name = event.get("name") if isinstance(event, dict) else None
            if not isinstance(name, str) or not GA4_EVENT_NAME_RE.match(name):
                problems.append(f"bad event name {name!r}")
                continue
            params = event.get("params") or {}
            if name in ("purchase", "refund") and not params.get("transaction_id"):
                problems.append(f"{name} without transaction_id")
            if ("value" in params) != ("currency" in params):
                problems.append(f"{name}: value and currency must come together")
            if "value" in params and not isinstance(params["value"], (int, float)):
                problems.append(f"{name}: value must be a number")
        return problems

    async def collect(self, request: web.Request) -> web.Response:
        body = request["json"]
        self.problems.extend(self.check(dict(request.query), body))
        if isinstance(body, dict):
            self.payloads.append({**body, "_query": dict(request.query)})
        return web.Response(status=204)


# ##################################################################################################
# A CRM / n8n receiving the signed webhook
# ##################################################################################################

class FakeCrm(FakePlatform):
    """`POST /hook`: checks `X-WhatsTracking-Signature: sha256=<HMAC-SHA256(secret, raw body)>`
    and a fresh `X-WhatsTracking-Timestamp`; 401 when either is wrong."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret
        self.bodies: list[dict] = []  # verified bodies
        self.rejected = 0

    @property
    def hook_url(self) -> str:
        return self.url + "/hook"

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/hook", self.receive)

    def signature(self, raw: bytes) -> str:
        return "sha256=" + hmac.new(self.secret.encode(), raw, hashlib.sha256).hexdigest()

    def event_ids(self) -> list[str]:
        return [b["event"]["event_id"] for b in self.bodies]

    async def receive(self, request: web.Request) -> web.Response:
        raw = request["raw"]
        given = request.headers.get("X-WhatsTracking-Signature", "")
        stamp = request.headers.get("X-WhatsTracking-Timestamp", "")
        fresh = stamp.isdigit() and abs(time.time() - int(stamp)) <= CRM_CLOCK_SKEW
        if not hmac.compare_digest(given, self.signature(raw)) or not fresh:
            self.rejected += 1
            return web.json_response({"error": "bad signature"}, status=401)
        self.bodies.append(json.loads(raw))
        return web.json_response({"ok": True})
