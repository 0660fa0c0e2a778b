"""Small fakes of the platforms conversions go out to (SPEC §9): Meta's Conversions API, GA4's
Measurement Protocol (and its validation server), TikTok's Events API, Google's OAuth token
endpoint with the Data Manager API, and a CRM's signed-webhook receiver.

Each is an aiohttp app on 127.0.0.1 that records every request it receives and can be told to
misbehave, one answer at a time or until told otherwise:

    meta = await FakeMeta().start()          # META_GRAPH_URL=meta.url
    meta.fail("500")                         # the next answer: HTTP 500
    meta.fail("429", retry_after=1)          # the next answer: 429 with Retry-After: 1
    meta.fail("400")                         # the next answer: Meta's OAuthException JSON
    meta.fail("hang", times=2)               # the next two: no answer until the client gives up
    meta.fail("transient")                   # Meta: HTTP 400 with a temporary error (code 4)
    meta.fail("received0")                   # Meta: HTTP 200 with events_received 0
    tiktok.fail("code")                      # TikTok: HTTP 200 with an error code
    meta.fail("hold", times=2); meta.release()   # the next two wait for release(), then answer
    meta.fail("500", times=None)             # every answer from now on, until meta.recover()
    await meta.go_down(); await meta.come_back()   # connection refused, then the same port again
    meta.events                              # the events Meta accepted (with the request's fields)
    await meta.close()

FakeMeta validates like the Graph API does and answers 400 with Meta's error JSON when an event
would be refused; FakeGA4 answers 204 to everything (the real endpoint validates nothing) and
records `problems` for the tests to check, while its /debug/mp/collect answers them as
validationMessages; FakeTiktok answers HTTP 200 with TikTok's `code`; FakeGoogle verifies the
service account's signed JWT, then takes events:ingest and reports each request PROCESSING, then
SUCCESS (or FAILED) on requestStatus:retrieve; FakeCrm verifies the HMAC signature (401 if wrong).

Sources of the answers' shapes:
- Meta: developers.facebook.com/docs/graph-api/guides/error-handling (error object, codes 1, 2,
  4, 17, 341 temporary, is_transient), developers.facebook.com/docs/marketing-api/
  conversions-api/using-the-api (events_received, messages, fbtrace_id), business-messaging
  event names: docs.zernio.com/whatsapp/send-whatsapp-conversion (subcode 2804066).
- GA4: developers.google.com/analytics/devguides/collection/protocol/ga4/validating-events
  ({"validationMessages": [{fieldPath, description, validationCode}]}).
- TikTok: ads.tiktok.com/marketing_api/docs?id=1741601162187777 ({"code", "message",
  "request_id", "data"}; code 0 is success, 40002 a parameter error, 40100 too many requests,
  40105 a bad access token).
- Google: developers.google.com/identity/protocols/oauth2/service-account (JWT-bearer grant:
  iss, scope, aud, iat, exp; RS256), developers.google.com/data-manager/api/reference/rest/v1/
  events/ingest and …/requestStatus/retrieve (requestId; requestStatusPerDestination with
  requestStatus PROCESSING | SUCCESS | FAILED | PARTIAL_SUCCESS, errorInfo.errorCounts), errors
  as google.rpc.Status ({"error": {code, message, status}}).
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
import urllib.parse
import uuid
from datetime import datetime
from typing import Any

from aiohttp import web

META_WINDOW = 7 * 86400  # seconds: Meta refuses older events
GA4_WINDOW = 72 * 3600  # seconds: GA4 drops events with an older timestamp_micros
CRM_CLOCK_SKEW = 300  # seconds the CRM tolerates between its clock and the timestamp header
META_ACTION_SOURCES = ("email", "website", "app", "phone_call", "chat", "physical_store",
                       "system_generated", "business_messaging", "other")
# The event names Meta accepts with action_source=business_messaging (WhatsApp).
# Zernio's live-verified allowlist (Graph v25.0); other names: subcode 2804066.
META_MESSAGING_EVENTS = ("LeadSubmitted", "Purchase", "AddToCart", "InitiateCheckout",
                         "ViewContent")
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

    modes: tuple[str, ...] = ()  # the platform's own misbehaviours (see `special`)

    def routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    def special(self, mode: str) -> web.Response:
        """The answer of one of `modes`."""
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
        assert mode in ("500", "429", "400", "401", "hang", "hold", *self.modes), mode
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
        if mode in self.modes:
            return self.special(mode)
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

    # transient: code 4 ("Application request limit reached"), HTTP 400, is_transient true;
    # received0: 200 with events_received 0 and Meta's reason in messages.
    modes = ("transient", "received0")

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/{version}/{dataset_id}/events", self.collect)

    def platform_error(self, message: str, code: int = 100, subcode: int | None = None,
                       transient: bool = False) -> web.Response:
        error = {"message": message, "type": "OAuthException", "code": code,
                 "is_transient": transient, "fbtrace_id": "A" + uuid.uuid4().hex[:22]}
        if subcode is not None:
            error.update(error_subcode=subcode, error_user_title="Invalid event",
                         error_user_msg=message)
        return web.json_response({"error": error}, status=400)

    def special(self, mode: str) -> web.Response:
        if mode == "transient":
            return self.platform_error("(#4) Application request limit reached", code=4,
                                       transient=True)
        return web.json_response({"events_received": 0, "messages": [
            "Events were discarded: the dataset is not connected to this business"],
            "fbtrace_id": "A" + uuid.uuid4().hex[:22]})

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
            if not user.get("whatsapp_business_account_id") and not user.get("page_id"):
                return ("Invalid parameter: page_id or whatsapp_business_account_id is required "
                        "for business_messaging")
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
                subcode = 2804066 if "not supported for business_messaging" in problem else None
                return self.platform_error(problem, subcode=subcode)
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
    property would silently drop or misreport (the tests assert it stays empty).
    `POST /debug/mp/collect`, the validation server: 200 with the same findings as
    validationMessages (fieldPath, description, validationCode), nothing recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.payloads: list[dict] = []  # accepted bodies, with "_query" added
        self.problems: list[str] = []
        self.validated: list[dict] = []  # bodies the validation server saw

    @property
    def collect_url(self) -> str:
        return self.url + "/mp/collect"

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/mp/collect", self.collect)
        router.add_post("/debug/mp/collect", self.debug)

    def events(self) -> list[dict]:
        """Every event received, each with the payload's client_id and timestamp_micros."""
        return [{**e, "client_id": p.get("client_id"),
                 "timestamp_micros": p.get("timestamp_micros")}
                for p in self.payloads for e in p.get("events") or []]

    def findings(self, query: dict, body: Any) -> list[tuple[str, str, str]]:
        """(fieldPath, description, validationCode) of each problem, as the validation server
        words them."""
        out = []
        if not query.get("measurement_id") or not query.get("api_secret"):
            out.append(("measurement_id", "measurement_id and api_secret are required in the "
                        "query", "VALUE_REQUIRED"))
        if not isinstance(body, dict):
            return out + [("", "the body is not a JSON object", "VALUE_INVALID")]
        if not isinstance(body.get("client_id"), str) or not body["client_id"]:
            out.append(("client_id", "client_id is missing", "VALUE_REQUIRED"))
        micros = body.get("timestamp_micros")
        if micros is not None:
            if not isinstance(micros, int) or isinstance(micros, bool):
                out.append(("timestamp_micros", "timestamp_micros must be an integer",
                            "VALUE_INVALID"))
            elif not time.time() - GA4_WINDOW <= micros / 1e6 <= time.time() + 1:
                out.append(("timestamp_micros", "timestamp_micros is not within the last 72 "
                            "hours", "VALUE_OUT_OF_BOUNDS"))
        events = body.get("events")
        if not isinstance(events, list) or not 1 <= len(events) <= 25:
            return out + [("events", "events must be a list of 1 to 25 events",
                           "VALUE_INVALID")]
        for i, event in enumerate(events):
            name = event.get("name") if isinstance(event, dict) else None
            where = f"events[{i}]"
            if not isinstance(name, str) or not GA4_EVENT_NAME_RE.match(name):
                out.append((f"{where}.name", f"bad event name {name!r}", "NAME_INVALID"))
                continue
            params = event.get("params") or {}
            if name in ("purchase", "refund") and not params.get("transaction_id"):
                out.append((f"{where}.params.transaction_id", f"{name} without transaction_id",
                            "VALUE_REQUIRED"))
            if ("value" in params) != ("currency" in params):
                out.append((f"{where}.params.currency",
                            f"{name}: value and currency must come together", "VALUE_REQUIRED"))
            if "value" in params and not isinstance(params["value"], (int, float)):
                out.append((f"{where}.params.value", f"{name}: value must be a number",
                            "VALUE_INVALID"))
            if "session_id" in params and not str(params["session_id"]).isdigit():
                out.append((f"{where}.params.session_id", f"{name}: session_id must be the "
                            "number of the _ga_<id> cookie", "VALUE_INVALID"))
        return out

    def check(self, query: dict, body: Any) -> list[str]:
        return [description for _, description, _ in self.findings(query, body)]

    async def collect(self, request: web.Request) -> web.Response:
        body = request["json"]
        self.problems.extend(self.check(dict(request.query), body))
        if isinstance(body, dict):
            self.payloads.append({**body, "_query": dict(request.query)})
        return web.Response(status=204)

    async def debug(self, request: web.Request) -> web.Response:
        body = request["json"]
        self.validated.append(body)
        return web.json_response({"validationMessages": [
            {"fieldPath": path, "description": text, "validationCode": code}
            for path, text, code in self.findings(dict(request.query), body)]})


# ##################################################################################################
# TikTok Events API
# ##################################################################################################

class FakeTiktok(FakePlatform):
    """`POST /open_api/v1.3/event/track/` with the `Access-Token` header: HTTP 200 always, the
    outcome in TikTok's `code` (0: taken)."""

    modes = ("code", "ratelimit")  # 200 with code 40002 (a parameter error) / 40100

    def __init__(self, pixel_code: str, access_token: str) -> None:
        super().__init__()
        self.pixel_code = pixel_code
        self.access_token = access_token
        self.events: list[dict] = []  # accepted events, with "_test_event_code"

    @property
    def track_url(self) -> str:
        return self.url + "/open_api/v1.3/event/track/"

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/open_api/v1.3/event/track/", self.track)

    def answer(self, code: int, message: str) -> web.Response:
        return web.json_response({"code": code, "message": message,
                                  "request_id": uuid.uuid4().hex, "data": {}})

    def special(self, mode: str) -> web.Response:
        if mode == "code":
            return self.answer(40002, "Invalid value for event_source_id")
        return self.answer(40100, "Too many requests. Please retry in some time.")

    def problem(self, body: Any) -> str | None:
        if not isinstance(body, dict) or body.get("event_source") != "web":
            return "event_source must be web"
        if body.get("event_source_id") != self.pixel_code:
            return "Invalid value for event_source_id: pixel not found"
        data = body.get("data")
        if not isinstance(data, list) or not 1 <= len(data) <= 1000:
            return "data must be a list of 1 to 1000 events"
        for event in data:
            if not isinstance(event, dict) or not isinstance(event.get("event"), str):
                return "event is required"
            if not isinstance(event.get("event_time"), int) or event["event_time"] > time.time() + 1:
                return "event_time must be a unix time in seconds, not ahead"
            user = event.get("user")
            if not isinstance(user, dict):
                return "user is required"
            phones = user.get("phone", [])
            if not isinstance(phones, list) or not all(
                    isinstance(p, str) and SHA256_RE.match(p) for p in phones):
                return "phone must be SHA-256 hashes"
            props = event.get("properties")
            if props is not None and ("value" in props) != ("currency" in props):
                return "value and currency must come together"
        return None

    async def track(self, request: web.Request) -> web.Response:
        if request.headers.get("Access-Token") != self.access_token:
            return self.answer(40105, "The access token is invalid or has been revoked.")
        body = request["json"]
        problem = self.problem(body)
        if problem:
            return self.answer(40002, problem)
        for event in body["data"]:
            self.events.append({**event, "_test_event_code": body.get("test_event_code")})
        return self.answer(0, "OK")


# ##################################################################################################
# Google: the OAuth token endpoint and the Data Manager API
# ##################################################################################################

def new_service_account(email: str = "whatstracking@loja-test.iam.gserviceaccount.com") -> dict:
    """A service-account key as Google Cloud's JSON file has it, with a fresh RSA key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return {"type": "service_account", "project_id": "loja-test",
            "private_key_id": uuid.uuid4().hex, "private_key": pem, "client_email": email,
            "client_id": "1234567890", "token_uri": "https://oauth2.googleapis.com/token"}


class FakeGoogle(FakePlatform):
    """`POST /token`: the JWT-bearer grant, the JWT's RS256 signature checked against the
    service account's public key; `POST /v1/events:ingest` and
    `GET /v1/requestStatus:retrieve` of the Data Manager API with the token it gave."""

    DATA_MANAGER_SCOPE = "https://www.googleapis.com/auth/datamanager"
    EVENT_SOURCES = ("WEB", "APP", "IN_STORE", "PHONE", "OTHER")

    def __init__(self, service_account: dict) -> None:
        super().__init__()
        from cryptography.hazmat.primitives import serialization

        self.email = service_account["client_email"]
        private = serialization.load_pem_private_key(
            service_account["private_key"].encode(), password=None)
        self.public_pem = private.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        self.tokens: set[str] = set()
        self.grants: list[dict] = []  # the verified JWT claims
        self.ingested: list[dict] = []  # accepted bodies (validateOnly too), with "_requestId"
        self.statuses: dict[str, list[str]] = {}  # requestId → the statuses still to report
        self.checks: list[str] = []  # requestIds asked for
        # What each new request reports on requestStatus:retrieve, one per check; the last one
        # stays (the default: processing once, then done).
        self.script = ["PROCESSING", "SUCCESS"]

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def api_url(self) -> str:
        return self.url + "/v1"

    def routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/token", self.token)
        router.add_post("/v1/events:ingest", self.ingest)
        router.add_get("/v1/requestStatus:retrieve", self.retrieve)

    @staticmethod
    def google_error(code: int, status: str, message: str) -> web.Response:
        return web.json_response({"error": {"code": code, "message": message, "status": status}},
                                 status=code)

    def platform_error(self, message: str) -> web.Response:
        return self.google_error(400, "INVALID_ARGUMENT", message)

    async def token(self, request: web.Request) -> web.Response:
        from google.auth import jwt

        form = dict(urllib.parse.parse_qsl(request["raw"].decode()))

        def refuse(description: str) -> web.Response:
            return web.json_response({"error": "invalid_grant",
                                      "error_description": description}, status=400)

        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type",
                                      "error_description": "Invalid grant_type"}, status=400)
        try:
            claims = jwt.decode(form.get("assertion", ""), certs=self.public_pem,
                                audience=self.token_url)
        except ValueError:
            return refuse("Invalid JWT Signature.")
        if claims.get("iss") != self.email:
            return refuse("Invalid email or User ID")
        if self.DATA_MANAGER_SCOPE not in str(claims.get("scope", "")).split():
            return refuse("Invalid scope")
        if not 0 < claims.get("exp", 0) - claims.get("iat", 0) <= 3600:
            return refuse("Invalid JWT: Token must be a short-lived token (60 minutes)")
        self.grants.append(claims)
        token = "ya29." + uuid.uuid4().hex
        self.tokens.add(token)
        return web.json_response({"access_token": token, "expires_in": 3599,
                                  "token_type": "Bearer"})

    def authorized(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "")
        return given.startswith("Bearer ") and given[7:] in self.tokens

    def problem(self, body: Any) -> str | None:
        if not isinstance(body, dict):
            return "Invalid JSON payload received."
        destinations = body.get("destinations")
        if not isinstance(destinations, list) or not destinations:
            return "destinations: at least one is required"
        for d in destinations:
            account = (d or {}).get("operatingAccount") or {}
            if account.get("accountType") != "GOOGLE_ADS" or not re.fullmatch(
                    r"\d{10}", str(account.get("accountId", ""))):
                return "destinations.operatingAccount: a Google Ads account id (10 digits)"
            if not str(d.get("productDestinationId", "")).isdigit():
                return "destinations.productDestinationId: the conversion action id"
        events = body.get("events")
        if not isinstance(events, list) or not 1 <= len(events) <= 2000:
            return "events: 1 to 2000 events"
        for event in events:
            if not isinstance(event, dict):
                return "events: objects"
            try:
                datetime.fromisoformat(str(event.get("eventTimestamp")).replace("Z", "+00:00"))
            except ValueError:
                return "events.eventTimestamp: RFC 3339 required"
            if event.get("eventSource") not in self.EVENT_SOURCES:
                return "events.eventSource is required for offline conversions"
            ids = event.get("adIdentifiers") or {}
            if set(ids) - {"gclid", "gbraid", "wbraid"} or len(ids) > 1:
                return "events.adIdentifiers: one of gclid, gbraid, wbraid"
            identifiers = ((event.get("userData") or {}).get("userIdentifiers")) or []
            if not ids and not identifiers:
                return "events: an ad identifier or user data is required"
            if identifiers and body.get("encoding") not in ("HEX", "BASE64"):
                return "encoding is required with user data"
            for identifier in identifiers:
                if not SHA256_RE.match(str(identifier.get("phoneNumber", ""))):
                    return "userIdentifiers.phoneNumber: a SHA-256 hash (HEX)"
            if ("conversionValue" in event) != ("currency" in event):
                return "events: conversionValue and currency come together"
        return None

    async def ingest(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return self.google_error(401, "UNAUTHENTICATED", "Request had invalid "
                                     "authentication credentials.")
        body = request["json"]
        problem = self.problem(body)
        if problem:
            return self.platform_error(problem)
        request_id = str(uuid.uuid4())
        self.ingested.append({**body, "_requestId": request_id})
        if body.get("validateOnly"):
            return web.json_response({})
        self.statuses[request_id] = list(self.script)
        return web.json_response({"requestId": request_id})

    async def retrieve(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return self.google_error(401, "UNAUTHENTICATED", "Request had invalid "
                                     "authentication credentials.")
        request_id = request.query.get("requestId", "")
        if request_id not in self.statuses:
            return self.google_error(404, "NOT_FOUND", "Request not found.")
        self.checks.append(request_id)
        script = self.statuses[request_id]
        state = script.pop(0) if len(script) > 1 else script[0]
        body = next(b for b in self.ingested if b["_requestId"] == request_id)
        per: dict[str, Any] = {"destination": body["destinations"][0], "requestStatus": state,
                               "eventsIngestionStatus": {"recordCount": str(len(body["events"]))}}
        if state in ("FAILED", "PARTIAL_SUCCESS"):
            per["errorInfo"] = {"errorCounts": [{"recordCount": str(len(body["events"])),
                                                 "reason": "INVALID_GCLID"}]}
        return web.json_response({"requestStatusPerDestination": [per]})


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
