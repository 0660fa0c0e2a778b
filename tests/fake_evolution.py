"""A small fake of Evolution API v2.3.6 (the REST routes of shared/evolution/CONTRACT.md §1-§3).

It answers with the bodies of tests/fixtures/responses/ (copies of Evolution's real answers),
follows Evolution's guard order (a missing instance is 404 before the API key is looked at; a name
in use on create is 403 before it), keeps per-instance state that tests flip, records every
request, and can misbehave:

    fake = FakeEvolution()
    await fake.start()                       # listens on 127.0.0.1, fake.url
    fake.instances["loja-centro"]["state"] = "open"
    fake.open("loja-centro")                 # the same, with the owner's number and profile
    fake.misbehave = "html"                  # every answer: HTTP 502 with an HTML page
    fake.misbehave = "slow"; fake.delay = 3  # every answer after `delay` seconds
    fake.misbehave = "stall-create"          # create makes the instance (and its webhook), then
                                             # answers only after `delay` seconds, as Evolution's
                                             # fixed 5 s wait plus a slow socket start-up does
    fake.misbehave = "drop-create"           # create makes the instance, then the connection
                                             # drops before any answer
    fake.misbehave = "unlicensed"            # Evolution 2.4 not activated: every route 503
    fake.version = 1                         # Evolution v1: restart is PUT, `hash` an object
    fake.override("GET", "/instance/connect/x", 200, {"error": True, "message": "[object Object]"})
    fake.instances["x"]["webhook"]           # the instance's webhook row as /webhook/find shows it
    fake.set_webhook("x", url, headers)      # somebody set it in Evolution's manager
    fake.requests                            # [Recorded(method, path, query, headers, json)]
    await fake.close()

`closed_port_url()` gives a URL where nothing listens (Evolution down).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import socket
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

JSON_BODY = web.RequestKey("json", object) if hasattr(web, "RequestKey") else "json"

RESPONSES = Path(__file__).resolve().parent / "fixtures" / "responses"
GLOBAL_KEY = "evo-global-key-BQYHJGJHJ"
INTEGRATIONS = ("WHATSAPP-BAILEYS", "WHATSAPP-BUSINESS", "EVOLUTION")
# EventController.events: what webhook.events may hold (CONTRACT §3.8, §4.2)
EVENTS = ("APPLICATION_STARTUP QRCODE_UPDATED MESSAGES_SET MESSAGES_UPSERT MESSAGES_EDITED "
          "MESSAGES_UPDATE MESSAGES_DELETE SEND_MESSAGE SEND_MESSAGE_UPDATE CONTACTS_SET "
          "CONTACTS_UPSERT CONTACTS_UPDATE PRESENCE_UPDATE CHATS_SET CHATS_UPSERT CHATS_UPDATE "
          "CHATS_DELETE GROUPS_UPSERT GROUP_UPDATE GROUP_PARTICIPANTS_UPDATE CONNECTION_UPDATE "
          "LABELS_EDIT LABELS_ASSOCIATION CALL TYPEBOT_START TYPEBOT_CHANGE_STATUS REMOVE_INSTANCE "
          "LOGOUT_INSTANCE INSTANCE_CREATE INSTANCE_DELETE STATUS_INSTANCE").split()


def response(name: str) -> Any:
    """A copy of one recorded Evolution answer (tests/fixtures/responses/<name>.json)."""
    return copy.deepcopy(json.loads((RESPONSES / f"{name}.json").read_text("utf-8")))


QR = response("connect-qr")
PAIRING = response("connect-pairing-code")
OWNER_NUMBER = "5511900001111"
PROFILE_NAME = "Loja Centro"
PICTURE_URL = response("fetch-instances")[0]["profilePicUrl"]


# What Evolution 2.4's licence gate lets through (runtime.ts `gateMiddleware`).
UNGATED = ("/license", "/manager", "/assets", "/store", "/health", "/favicon.ico")


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def error_body(status: int, reason: str, message: Any) -> dict:
    """Evolution's error shape (CONTRACT §2)."""
    return {"status": status, "error": reason, "response": {"message": message}}


@dataclasses.dataclass
class Recorded:
    method: str
    path: str
    query: dict
    headers: dict
    json: Any
    raw: bytes

    @property
    def apikey(self) -> str | None:
        return self.headers.get("apikey")


class FakeEvolution:
    def __init__(self, global_key: str = GLOBAL_KEY, version: int = 2) -> None:
        self.global_key = global_key
        self.version = version
        self.instances: dict[str, dict] = {}
        self.requests: list[Recorded] = []
        self.misbehave: str | None = None  # see the module's docstring
        self.overrides: dict[tuple[str, str], list[tuple[int, Any]]] = {}
        self.delay = 3.0  # seconds, for misbehave == "slow" and "stall-create"
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()
        self.app = web.Application(middlewares=[self._record, self._misbehave])
        self.app.router.add_post("/instance/create", self.create)
        self.app.router.add_get("/instance/fetchInstances", self.fetch_instances)
        self.app.router.add_get("/instance/connectionState/{instance}", self.connection_state)
        self.app.router.add_get("/instance/connect/{instance}", self.connect)
        self.app.router.add_route("*", "/instance/restart/{instance}", self.restart)
        self.app.router.add_delete("/instance/logout/{instance}", self.logout)
        self.app.router.add_delete("/instance/delete/{instance}", self.delete)
        self.app.router.add_post("/webhook/set/{instance}", self.webhook_set)
        self.app.router.add_get("/webhook/find/{instance}", self.webhook_find)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> "FakeEvolution":
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        self._release.set()  # slow answers finish at once
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- what tests use ------------------------------------------------------------------------

    def add_instance(self, name: str, state: str = "close", token: str | None = None,
                     code: str | None = None) -> dict:
        """An instance that exists on the server (created by somebody else, or earlier)."""
        self.instances[name] = {
            "name": name, "id": str(uuid.uuid4()), "token": token or str(uuid.uuid4()).upper(),
            "state": state, "code": code or QR["code"], "pairingCode": None, "count": 0,
            "webhook": None, "number": None, "owner": OWNER_NUMBER, "profileName": PROFILE_NAME,
            "profilePicUrl": PICTURE_URL}
        return self.instances[name]

    def set_webhook(self, name: str, url: str, headers: dict | None = None,
                    events: list | None = None, by_events: bool = False, base64: bool = False,
                    enabled: bool = True) -> dict:
        """The instance's webhook, stored as Evolution's Prisma `Webhook` row (what `find` shows;
        `enabled: false` stores no events)."""
        instance = self.instances[name]
        row = response("webhook-set")
        previous = instance.get("webhook") or {}
        row.update(id=previous.get("id") or uuid.uuid4().hex[:25], url=url, headers=headers,
                   enabled=enabled, events=list(events or []) if enabled else [],
                   webhookByEvents=by_events, webhookBase64=base64, instanceId=instance["id"],
                   createdAt=previous.get("createdAt") or row["createdAt"])
        instance["webhook"] = row
        return row

    def open(self, name: str, number: str = OWNER_NUMBER, profile_name: str = PROFILE_NAME) -> None:
        """The number scanned the QR: the instance is connected."""
        self.instances[name].update(state="open", owner=number, profileName=profile_name)

    def override(self, method: str, path: str, status: int, body: Any, times: int = 1) -> None:
        """Answer the next `times` requests to `method path` with this status and JSON body
        (after recording them, before any guard)."""
        self.overrides.setdefault((method, path), []).extend([(status, body)] * times)

    def calls(self, method: str | None = None, path: str | None = None) -> list[Recorded]:
        """Recorded requests, optionally only those with this method and path (or path prefix
        when `path` ends with '/')."""
        out = []
        for r in self.requests:
            if method and r.method != method:
                continue
            if path and not (r.path.startswith(path) if path.endswith("/") else r.path == path):
                continue
            out.append(r)
        return out

    # ---- middlewares -------------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler):
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.requests.append(Recorded(request.method, request.path, dict(request.query),
                                      {k.lower(): v for k, v in request.headers.items()},
                                      body, raw))
        request[JSON_BODY] = body
        try:
            return await handler(request)
        except web.HTTPNotFound:  # Express's answer to an unknown route or method
            return self.cannot(request)
        except web.HTTPMethodNotAllowed:
            return self.cannot(request)

    @web.middleware
    async def _misbehave(self, request: web.Request, handler):
        queued = self.overrides.get((request.method, request.path))
        if queued:
            status, body = queued.pop(0)
            return self.answer(status, body)
        if self.misbehave == "unlicensed" and not request.path.startswith(UNGATED):
            return self.answer(503, self.licence_required(request))
        if self.misbehave == "html":
            return web.Response(status=502, content_type="text/html", text=(
                "<html><head><title>502 Bad Gateway</title></head><body><center>"
                "<h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"))
        if self.misbehave == "slow":
            await self.stall()
        return await handler(request)

    async def stall(self) -> None:
        """Wait `delay` seconds, or until the fake closes."""
        try:
            await asyncio.wait_for(self._release.wait(), self.delay)
        except asyncio.TimeoutError:
            pass

    @staticmethod
    def licence_required(request: web.Request) -> dict:
        """Evolution 2.4.0-rc2's licence gate (src/licensing/runtime.ts `gateMiddleware`, L311-351
        at tag 2.4.0-rc2; issues #2534, #2596): the body every gated route answers."""
        manager = f"http://{request.host}/manager/login"
        docs = "https://docs.evolutionfoundation.com.br/licensing"
        return {"error": "service not activated", "code": "LICENSE_REQUIRED",
                "register_url": manager, "instance_id": "5f0c3a9e-2b1d-4c6e-9a7f-1e2d3c4b5a69",
                "docs_url": docs,
                "message": f"This Evolution API instance is not activated. Open {manager} to "
                           "activate, or set AUTHENTICATION_API_KEY in your .env with a valid "
                           f"licensing key. Docs: {docs}"}

    # ---- guards (CONTRACT §1: instanceExistsGuard, instanceLoggedGuard, then authGuard) -------

    @staticmethod
    def answer(status: int, body: Any) -> web.Response:
        return web.json_response(body, status=status)

    def cannot(self, request: web.Request) -> web.Response:
        return self.answer(404, error_body(404, "Not Found",
                                           [f"Cannot {request.method} {request.path}"]))

    def unauthorized(self) -> web.Response:
        return self.answer(401, response("unauthorized"))

    def instance_or_error(self, request: web.Request) -> dict | web.Response:
        name = request.match_info["instance"]
        instance = self.instances.get(name)
        if instance is None:  # before the API key is checked
            return self.answer(404, error_body(404, "Not Found",
                                               [f'The "{name}" instance does not exist']))
        key = request.headers.get("apikey")
        if key != self.global_key and key != instance["token"]:
            return self.unauthorized()
        return instance

    def qr_body(self, instance: dict) -> dict:
        instance["count"] += 1
        body = copy.deepcopy(PAIRING if instance["pairingCode"] else QR)
        body.update(code=instance["code"], count=instance["count"])
        if instance["pairingCode"]:
            body["pairingCode"] = instance["pairingCode"]
        return body

    # ---- routes ------------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        body = request[JSON_BODY]
        if not isinstance(body, dict):
            return self.answer(400, error_body(400, "Bad Request", [["instance is not of a type(s) "
                                                                      "object"]]))
        name = body.get("instanceName")
        if isinstance(name, str) and name in self.instances:  # before authentication
            return self.answer(403, error_body(403, "Forbidden",
                                               [f'This name "{name}" is already in use.']))
        if request.headers.get("apikey") != self.global_key:  # instance tokens too: no {instance}
            return self.unauthorized()
        if not isinstance(name, str) or not name:
            return self.answer(400, error_body(400, "Bad Request",
                                               [['instance requires property "instanceName"']]))
        if body.get("integration") not in INTEGRATIONS:
            return self.answer(400, response("create-instance-invalid-integration"))
        webhook = body.get("webhook")
        if isinstance(webhook, dict) and "events" not in webhook:
            return self.answer(400, response("create-instance-webhook-without-events"))
        instance = self.add_instance(name, token=body.get("token") or None)
        if isinstance(webhook, dict) and webhook.get("url"):
            self.set_webhook(name, webhook["url"], webhook.get("headers"), webhook.get("events"),
                             webhook.get("byEvents", False), webhook.get("base64", False))
        qrcode = bool(body.get("qrcode"))
        if body.get("number"):
            instance["number"] = body["number"]
            instance["pairingCode"] = PAIRING["pairingCode"]
        instance["state"] = "connecting" if qrcode else "close"
        out = response("create-instance")
        out["instance"].update(instanceName=name, instanceId=instance["id"],
                               integration=body["integration"],
                               status=instance["state"] if self.version == 2 else "created")
        out["hash"] = instance["token"] if self.version == 2 else {"apikey": instance["token"]}
        webhook = webhook if isinstance(webhook, dict) else {}
        out["webhook"] = {"webhookUrl": webhook.get("url"),
                          "webhookHeaders": webhook.get("headers"),
                          "webhookByEvents": webhook.get("byEvents"),
                          "webhookBase64": webhook.get("base64")}
        if qrcode:
            out["qrcode"] = self.qr_body(instance)
        else:
            out.pop("qrcode")
        # The instance and its webhook exist from here on (instance.controller.ts: setInstance,
        # then connectToWhatsapp and delay(5000), then the answer).
        if self.misbehave == "stall-create":
            await self.stall()
        elif self.misbehave == "drop-create":
            request.transport.close()
        return self.answer(201, out)

    async def fetch_instances(self, request: web.Request) -> web.Response:
        key = request.headers.get("apikey")
        name = request.query.get("instanceName")
        if key == self.global_key:
            rows = list(self.instances.values())
        else:
            rows = [i for i in self.instances.values() if i["token"] == key]
            if not rows:
                return self.unauthorized()
        if name is not None:
            rows = [i for i in rows if i["name"] == name]
            if not rows:
                if key != self.global_key:
                    return self.unauthorized()
                return self.answer(404, error_body(404, "Not Found",
                                                   [f'Instance "{name}" not found']))
        template = response("fetch-instances")[0]
        out = []
        for i in rows:
            row = copy.deepcopy(template)
            opened = i["state"] == "open"
            row.update(id=i["id"], name=i["name"], connectionStatus=i["state"], token=i["token"],
                       ownerJid=f"{i['owner']}@s.whatsapp.net" if opened else None,
                       profileName=i["profileName"] if opened else None,
                       profilePicUrl=i["profilePicUrl"] if opened else None, number=i["number"])
            row["Setting"]["instanceId"] = i["id"]
            out.append(row)
        return self.answer(200, out)

    async def connection_state(self, request: web.Request) -> web.Response:
        instance = self.instance_or_error(request)
        if isinstance(instance, web.Response):
            return instance
        return self.answer(200, {"instance": {"instanceName": instance["name"],
                                              "state": instance["state"]}})

    async def connect(self, request: web.Request) -> web.Response:
        instance = self.instance_or_error(request)
        if isinstance(instance, web.Response):
            return instance
        if instance["state"] == "open":
            body = response("connect-already-open")
            body["instance"]["instanceName"] = instance["name"]
            return self.answer(200, body)
        instance["state"] = "connecting"
        return self.answer(200, self.qr_body(instance))

    async def restart(self, request: web.Request) -> web.Response:
        if request.method != ("POST" if self.version == 2 else "PUT"):
            return self.cannot(request)
        instance = self.instance_or_error(request)
        if isinstance(instance, web.Response):
            return instance
        if instance["state"] == "close":  # the swallowed "instance is not connected"
            return self.answer(200, response("restart-not-connected"))
        body = response("restart")
        body["instance"].update(instanceName=instance["name"], state=instance["state"])
        return self.answer(200, body)

    async def logout(self, request: web.Request) -> web.Response:
        instance = self.instance_or_error(request)
        if isinstance(instance, web.Response):
            return instance
        if instance["state"] == "close":
            return self.answer(400, error_body(400, "Bad Request", [
                f'The "{instance["name"]}" instance is not connected']))
        instance["state"] = "close"
        return self.answer(200, response("logout"))

    async def delete(self, request: web.Request) -> web.Response:
        instance = self.instance_or_error(request)
        if isinstance(instance, web.Response):
            return instance
        del self.instances[instance["name"]]
        return self.answer(200, response("delete"))

    async def webhook_set(self, request: web.Request) -> web.Response:
        instance = self.instance_or_error(request)
        if isinstance(instance, web.Response):
            return instance
        body = request[JSON_BODY]
        webhook = body.get("webhook") if isinstance(body, dict) else None
        if not isinstance(webhook, dict):
            return self.answer(400, error_body(400, "Bad Request",
                                               [['instance requires property "webhook"']]))
        for field in ("enabled", "url"):
            if field not in webhook:
                return self.answer(400, error_body(400, "Bad Request", [
                    [f'webhook requires property "{field}"']]))
        events = webhook.get("events")
        if webhook["enabled"] and events is None:  # the `.length` TypeError, as a 500
            return self.answer(500, error_body(500, "Internal Server Error", [
                "Cannot read properties of undefined (reading 'length')"]))
        for n, event in enumerate(events or []):
            if event not in EVENTS:
                body = response("webhook-set-validation-error")
                body["response"]["message"][0][0] = body["response"]["message"][0][0].replace(
                    "webhook.events[0]", f"webhook.events[{n}]")
                return self.answer(400, body)
        row = self.set_webhook(instance["name"], webhook["url"], webhook.get("headers"), events,
                               bool(webhook.get("byEvents")), bool(webhook.get("base64")),
                               bool(webhook["enabled"]))
        return self.answer(201, row)

    async def webhook_find(self, request: web.Request) -> web.Response:
        instance = self.instance_or_error(request)
        if isinstance(instance, web.Response):
            return instance
        return self.answer(200, instance.get("webhook"))
