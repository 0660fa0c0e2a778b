"""WhatsTracking: which ad campaign brought each customer who wrote to you on WhatsApp.

A script on the website (``tracker.js``) records where a visitor came from and puts a short tracking
code in the WhatsApp message; Evolution API posts the incoming message to this server; the code is
matched and a lead is recorded with its campaign.

Run:
    python whatstracking.py                 # serve (SQLite: whatstracking.db beside this file)
    python whatstracking.py migrate         # create / upgrade the database schema
    python whatstracking.py purge           # delete raw data older than RETENTION_DAYS now
    python whatstracking.py company add ID --name NAME [--evolution-url URL --evolution-key KEY]
    python whatstracking.py token add COMPANY_ID [--name NAME]
    python whatstracking.py check [--company ID] [--json]   # the doctor: exit 1 if something is wrong

Environment (also read from ``.env`` in the working directory, then beside this file; the real
environment wins), see ``config.example.env``:
    HOST, PORT, DATABASE_URL (sqlite:///whatstracking.db | postgresql://...), PUBLIC_URL,
    ADMIN_TOKEN, WEBHOOK_SHARED_TOKEN, EVOLUTION_API_URL, EVOLUTION_API_KEY, LOG_LEVEL,
    LOG_FORMAT (json|text), METRICS_TOKEN, TRUST_PROXY, RETENTION_DAYS, META_GRAPH_URL, GA4_MP_URL,
    TIKTOK_EVENTS_URL, GOOGLE_TOKEN_URL, DATA_MANAGER_URL,
    SQLITE_SYNCHRONOUS (FULL|NORMAL), EVOLUTION_TIMEOUT, META_API_VERSION, DELIVERY_TIMEOUT,
    DELIVERY_RETRY_SECONDS, DELIVERY_POLL_SECONDS, DELIVERY_CONCURRENCY, DELIVERY_PER_COMPANY,
    ALLOW_PRIVATE_URLS, RATE_LIMIT_TRACKING, RATE_LIMIT_PUBLIC

Sections (banners), each using only what is above it:
    Constants · Config · Errors and small helpers
    Storage: SQLite and Postgres behind one interface; the unit of work (Tx), BatchKind
    Domain: companies and tokens · tracking codes · website tracking (the tracking batch) ·
        Evolution API envelopes · conversion events and the delivery outbox · chat rules ·
        connections, contacts and leads (the lead rules, UnitCache) · connections and signed
        links · webhook ingestion (Source, the webhook batch) · reports · retention and erasure
    Integrations: outbound URLs a company sets · Evolution API v2 · conversions out
    The doctor (``check`` and GET /api/checks)
    HTTP: keys, request helpers and authentication
    HTTP handlers: health and the tracker script · tracking from the website · Evolution
        webhooks · companies and leads · connections, QR codes and onboarding links · generic
        webhook ingest · conversion events, deliveries and the Google Ads export · reports and
        the dashboard · operations and privacy · the doctor
    Middlewares · Application factory (``create_app()``) · CLI and ``main()``
Pages shipped beside this file: dashboard.html (and console/, locales/), connect.html and
connect-error.html; tracker.js.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import csv
import dataclasses
import errno
import functools
import gzip
import hashlib
import hmac
import html
import io
import ipaddress
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import socket
import sqlite3
import sys
import time
import unicodedata
import urllib.parse
import uuid
import zoneinfo
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Protocol

import aiohttp
from aiohttp import web

# ##################################################################################################
# Constants
# ##################################################################################################

VERSION = "0.1.0"
HERE = Path(__file__).resolve().parent
TRACKER_PATH = HERE / "tracker.js"

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8080
DEFAULT_DATABASE_URL = "sqlite:///whatstracking.db"
DEFAULT_META_GRAPH_URL = "https://graph.facebook.com"
DEFAULT_GA4_MP_URL = "https://www.google-analytics.com/mp/collect"
DEFAULT_META_API_VERSION = "v25.0"  # Graph API versions live about two years (changelog/versions)
DEFAULT_TIKTOK_EVENTS_URL = "https://business-api.tiktok.com/open_api/v1.3/event/track/"
DEFAULT_GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"  # OAuth 2.0, JWT-bearer grant
DEFAULT_DATA_MANAGER_URL = "https://datamanager.googleapis.com/v1"

TRACKING_BODY_MAX = 64 * 1024  # bytes
WEBHOOK_BODY_MAX = 1024 * 1024  # bytes; also the most of a raw body we store
FIELD_MAX = 2048  # characters, one attribution value
URL_FIELD_MAX = 4096  # characters, page_url / referrer / landing_page
FIRST_MESSAGE_MAX = 1000  # characters kept of a lead's first message
# JSON nesting accepted in a body. Evolution's deepest envelopes (a quoted message in a wrapper)
# are about 12 levels; a structure we keep (an ad's context) must also read back and serialise at
# any stack depth, which thousands of levels cannot (RecursionError).
JSON_DEPTH_MAX = 64  # levels
# A WhatsApp QR string is about 240 characters (ref, noise key, identity key, ADV secret). A render
# costs more the longer it is: measured, 240 characters 24 ms, 1024 100 ms, 2900 280 ms (4096
# took 0.6-0.9 s in the attack report, or does not fit a QR at all). Four times a real one leaves
# room for a longer ref while any webhook's QR stays cheap; longer is no QR and is not kept.
QR_CODE_MAX = 1024  # characters
ID_MAX = 2 ** 63 - 1  # the largest row id: a 64-bit BIGINT (Postgres) and INTEGER (SQLite)
# Event times (a message's, a conversion's) before 1970 are no WhatsApp conversion, and a time past
# a few minutes ahead of now is a wrong clock; both would break what reads them back.
EVENT_TIME_MIN = 0.0  # unix seconds: 1970-01-01
CLOCK_SKEW_MAX = 300  # seconds an event time may be ahead of ours
TIME_MIN = -62135596800.0  # unix seconds of 0001-01-01T00:00:00Z, the first time an answer shows
TIME_MAX = 253402300799.0  # unix seconds of 9999-12-31T23:59:59Z, the last
TRACKER_MAX_AGE = 3600  # seconds, Cache-Control of the served script
SQLITE_BATCH_MAX = 512  # units of work committed together at most
SQLITE_BUSY_TIMEOUT_MS = 10_000  # how long a write waits for another process's write lock
# The database holds webhook secrets and signing keys: only its owner may read it. SQLite gives
# the -wal and -shm files it creates beside it the database file's mode.
SQLITE_FILE_MODE = 0o600
# seconds: how soon a thread waiting for the GIL gets it from the busy event loop (Python's
# default is 5 ms). The SQLite writer thread's COMMIT must hand its result back to the loop, and
# every request of a group waits for that hand-over.
GIL_SWITCH_INTERVAL = 0.0001
BATCH_MAX = 256  # items of one batched kind (e.g. tracking requests) run together at most
# Concurrent transactions of one batched kind on Postgres. Their statements are set-wise (one per
# batch, whatever its size), so fewer, larger batches cost Postgres and the loop less CPU per
# item; measured on 2 CPUs, 2 beat 4 for tracking and webhooks alike (throughput and p99).
POSTGRES_BATCHES_IN_FLIGHT = 2
ROLLUP_BUCKET = 900  # seconds: the report's time grain (every timezone offset divides it)
# Seconds a stop (SIGTERM, Ctrl-C) waits for the requests under way, bodies still arriving
# included, before closing their connections (Docker's `stop` sends SIGKILL after 10 s).
SHUTDOWN_TIMEOUT = 10
WEBHOOK_NOTE_KEYS = 10_000  # connections (or refused names) whose last note time is remembered
REJECTION_LINES_PER_MINUTE = 30  # log lines about refused webhooks that name no connection

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_BODY_LEN = 6  # random characters; a check character follows
# The invisible copy of a code: 35 bits (7 characters x 5) as zero-width characters, framed.
ZW_ZERO, ZW_ONE, ZW_FRAME = "\u200b", "\u200c", "\u200d"

UTM_KEYS = ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content", "utm_id")
CLICK_ID_KEYS = ("gclid", "gbraid", "wbraid", "fbclid", "ttclid", "msclkid")
COOKIE_KEYS = ("fbc", "fbp", "ga_client_id", "ga_session_id")
CAMPAIGN_KEYS = UTM_KEYS + CLICK_ID_KEYS
URL_KEYS = ("page_url", "referrer", "landing_page")
TOUCH_KEYS = CAMPAIGN_KEYS + COOKIE_KEYS + URL_KEYS
LEAD_ATTRIBUTION_KEYS = (
    UTM_KEYS[:5] + ("gclid", "gbraid", "wbraid", "fbclid", "fbc", "fbp", "ttclid", "msclkid",
                    "ga_client_id", "ga_session_id", "ctwa_clid", "ad_id", "ad_title", "referrer",
                    "landing_page", "page_url")
)

DEFAULT_SETTINGS: dict[str, Any] = {
    "allowed_origins": [],  # empty: any origin
    "code_mode": "both",  # visible | invisible | both
    "code_template": "[ref {code}]",
    "attribution_window_days": 30,
    "store_first_message": True,
    "window_match": False,  # the `window` fallback of SPEC §6, off by default
    "window_minutes": 30,
    "timezone": "America/Sao_Paulo",
    "currency": "BRL",
    "webhook_auth_required": True,
    "chat_rules": [],  # SPEC §14 (see "Domain: chat rules")
}
WINDOW_CONFIDENCE = 0.5
# A lead's lifecycle (see "Domain: conversion events"); what follows "lead" is recorded by hand
# (POST /api/leads/{id}/events) or by a WhatsApp label (the label_events setting).
EVENT_NAMES = ("lead", "qualified", "purchase", "refund", "lost")
FOLLOW_UP_EVENTS = EVENT_NAMES[1:]
DELIVERY_STATUSES = ("pending", "sending", "delivered", "failed", "skipped")  # an outbox row's
CURRENCY_RE = re.compile(r"^[A-Za-z]{3}\Z")  # an ISO 4217 code, any case (stored upper-case)
# Our event name → the Google Ads conversion action name written in the offline-conversions CSV.
DEFAULT_GOOGLE_ADS_CONVERSIONS = {"lead": "WhatsApp Lead", "qualified": "WhatsApp Qualified Lead",
                                  "purchase": "WhatsApp Purchase"}

log = logging.getLogger("whatstracking")


# ##################################################################################################
# Config
# ##################################################################################################

class ConfigError(Exception):
    """A setting is wrong; the message is one sentence for the operator."""


@dataclasses.dataclass(frozen=True)
class Config:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    database_url: str = DEFAULT_DATABASE_URL
    public_url: str = ""
    admin_token: str = ""
    metrics_token: str = ""  # a bearer for GET /metrics alone (ADMIN_TOKEN works there too)
    webhook_shared_token: str = ""
    evolution_api_url: str = ""
    evolution_api_key: str = ""
    log_level: str = "INFO"
    log_format: str = "text"
    # Whose X-Forwarded-For is believed: "loopback" (a proxy on this host), "true" (any peer: a
    # load balancer), "false" (nobody: the peer is the client).
    trust_proxy: str = "loopback"
    retention_days: int = 0
    meta_graph_url: str = DEFAULT_META_GRAPH_URL
    ga4_mp_url: str = DEFAULT_GA4_MP_URL
    tiktok_events_url: str = DEFAULT_TIKTOK_EVENTS_URL
    google_token_url: str = DEFAULT_GOOGLE_TOKEN_URL
    data_manager_url: str = DEFAULT_DATA_MANAGER_URL
    sqlite_synchronous: str = "FULL"
    # Seconds for one Evolution API call (EVOLUTION_TIMEOUT: whole); create-instance gets
    # EVOLUTION_CREATE_WAIT more: 20 s covers Evolution's fixed 5 s and a slow socket start-up.
    evolution_timeout: int = 15
    meta_api_version: str = DEFAULT_META_API_VERSION
    delivery_timeout: float = 10.0  # seconds for one conversion delivery
    delivery_retry_seconds: float = 30.0  # first retry delay; doubles each attempt
    delivery_poll_seconds: float = 5.0  # how often the worker looks for due deliveries
    delivery_concurrency: int = 16  # deliveries one process sends at once
    delivery_per_company: int = 4  # of which one company's, at most (all processes together)
    allow_private_urls: bool = False  # companies may point URLs at loopback / private addresses
    rate_limit_tracking: int = 600  # POST /tracking per client address per minute (0: off)
    rate_limit_public: int = 60  # /public/*, onboarding links and their QR, per address a minute


def _parse_bool(name: str, value: str) -> bool:
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {value!r}.")


def _parse_trust_proxy(value: str) -> str:
    low = value.strip().lower()
    if low in ("", "loopback"):
        return "loopback"
    try:
        return "true" if _parse_bool("TRUST_PROXY", low) else "false"
    except ConfigError:
        raise ConfigError(f"TRUST_PROXY must be loopback, true or false, not {value!r}.") from None


def _parse_number(name: str, value: str, low: float, high: float, kind: type = int) -> Any:
    """`value` as an int (or float) within [low, high], or ConfigError in one sentence."""
    try:
        number = kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name} must be {what}, not {value!r}.") from None
    if not low <= number <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, not {number:g}.")
    return number


def _parse_int(name: str, value: str, low: int, high: int) -> int:
    return _parse_number(name, value, low, high, int)


def _parse_float(name: str, value: str, low: float, high: float) -> float:
    return _parse_number(name, value, low, high, float)


def load_config(environ: Mapping[str, str] | None = None) -> Config:
    """Build the Config from an environment mapping; raise ConfigError with one readable sentence."""
    env = os.environ if environ is None else environ

    def get(name: str, default: Any = "") -> str:
        """The variable `name`, or `default` (a Config default, written there once) as text."""
        return (env.get(name) or str(default)).strip()

    database_url = get("DATABASE_URL", Config.database_url)
    if not database_url.startswith(("sqlite:", "postgres://", "postgresql://")):
        raise ConfigError("DATABASE_URL must start with sqlite:/// or postgresql://.")
    log_format = get("LOG_FORMAT", Config.log_format).lower()
    if log_format not in ("json", "text"):
        raise ConfigError("LOG_FORMAT must be json or text.")
    log_level = get("LOG_LEVEL", Config.log_level).upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError("LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL.")
    synchronous = get("SQLITE_SYNCHRONOUS", Config.sqlite_synchronous).upper()
    if synchronous not in ("FULL", "NORMAL"):
        raise ConfigError("SQLITE_SYNCHRONOUS must be FULL or NORMAL.")
    urls = {}
    for name, default in (("PUBLIC_URL", Config.public_url),
                          ("EVOLUTION_API_URL", Config.evolution_api_url),
                          ("META_GRAPH_URL", Config.meta_graph_url),
                          ("GA4_MP_URL", Config.ga4_mp_url),
                          ("TIKTOK_EVENTS_URL", Config.tiktok_events_url),
                          ("GOOGLE_TOKEN_URL", Config.google_token_url),
                          ("DATA_MANAGER_URL", Config.data_manager_url)):
        value = get(name, default)
        if name != "TIKTOK_EVENTS_URL":  # a base, joined with paths; TikTok's is the endpoint
            value = value.rstrip("/")
        if value and not value.startswith(("http://", "https://")):
            raise ConfigError(f"{name} must start with http:// or https://.")
        urls[name] = value
    return Config(
        host=get("HOST", Config.host),
        port=_parse_int("PORT", get("PORT", Config.port), 0, 65535),
        database_url=database_url,
        public_url=urls["PUBLIC_URL"],
        admin_token=get("ADMIN_TOKEN", Config.admin_token),
        metrics_token=get("METRICS_TOKEN", Config.metrics_token),
        webhook_shared_token=get("WEBHOOK_SHARED_TOKEN", Config.webhook_shared_token),
        evolution_api_url=urls["EVOLUTION_API_URL"],
        evolution_api_key=get("EVOLUTION_API_KEY", Config.evolution_api_key),
        log_level=log_level,
        log_format=log_format,
        trust_proxy=_parse_trust_proxy(get("TRUST_PROXY", Config.trust_proxy)),
        retention_days=_parse_int("RETENTION_DAYS", get("RETENTION_DAYS", Config.retention_days),
                                  0, 36500),
        meta_graph_url=urls["META_GRAPH_URL"],
        ga4_mp_url=urls["GA4_MP_URL"],
        tiktok_events_url=urls["TIKTOK_EVENTS_URL"],
        google_token_url=urls["GOOGLE_TOKEN_URL"],
        data_manager_url=urls["DATA_MANAGER_URL"],
        sqlite_synchronous=synchronous,
        evolution_timeout=_parse_int(
            "EVOLUTION_TIMEOUT", get("EVOLUTION_TIMEOUT", Config.evolution_timeout), 1, 300),
        meta_api_version=get("META_API_VERSION", Config.meta_api_version),
        delivery_timeout=_parse_float(
            "DELIVERY_TIMEOUT", get("DELIVERY_TIMEOUT", Config.delivery_timeout), 0.1, 300),
        delivery_retry_seconds=_parse_float(
            "DELIVERY_RETRY_SECONDS", get("DELIVERY_RETRY_SECONDS", Config.delivery_retry_seconds),
            0.01, 86400),
        delivery_poll_seconds=_parse_float(
            "DELIVERY_POLL_SECONDS", get("DELIVERY_POLL_SECONDS", Config.delivery_poll_seconds),
            0.01, 3600),
        delivery_concurrency=_parse_int(
            "DELIVERY_CONCURRENCY", get("DELIVERY_CONCURRENCY", Config.delivery_concurrency),
            1, 1000),
        delivery_per_company=_parse_int(
            "DELIVERY_PER_COMPANY", get("DELIVERY_PER_COMPANY", Config.delivery_per_company),
            1, 1000),
        allow_private_urls=_parse_bool(
            "ALLOW_PRIVATE_URLS", get("ALLOW_PRIVATE_URLS", Config.allow_private_urls)),
        rate_limit_tracking=_parse_int(
            "RATE_LIMIT_TRACKING", get("RATE_LIMIT_TRACKING", Config.rate_limit_tracking),
            0, 10_000_000),
        rate_limit_public=_parse_int(
            "RATE_LIMIT_PUBLIC", get("RATE_LIMIT_PUBLIC", Config.rate_limit_public), 0, 10_000_000),
    )


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
                 "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextLogFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        return f"{text} {json.dumps(fields, ensure_ascii=False, default=str)}" if fields else text


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if config.log_format == "json" else TextLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level)


# ##################################################################################################
# Errors and small helpers
# ##################################################################################################

# One encoder for all: json.dumps with any non-default argument builds a new encoder per call.
# Strict: NaN and Infinity are no JSON, so a non-finite number raises instead of going out.
json_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


class NotJson(ValueError):
    """A body that is not JSON we accept; the message says why, for a 400."""


class Refused(Exception):
    """The domain's refusal of a request: the HTTP status and the one sentence to answer with.
    Domain and storage code raise it (or a batch returns it as an item's result); the error
    middleware answers it as SPEC §4's {"error": sentence}, the CLI prints the sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _refuse_constant(name: str) -> Any:
    raise NotJson("NaN and Infinity are not numbers in JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):  # e.g. 1e999: Python reads it as infinity
        raise NotJson(f"{text[:20]} is too large a number")
    return value


_JSON_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_BAD_ESCAPE_RE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")  # a NUL or surrogate, as a JSON escape
_BAD_CHAR_RE = re.compile("[\x00\ud800-\udfff]")  # after decoding, a surrogate is always unpaired
_JSON_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[{]}")


def clean_text(value: str) -> str:
    """`value` without NUL characters, each unpaired surrogate replaced by U+FFFD: text every
    database stores (Postgres refuses NUL; no UTF-8 encodes a lone surrogate)."""
    if value.isascii():
        return value.replace("\x00", "") if "\x00" in value else value
    return _BAD_CHAR_RE.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", value)


def _scrub(value: Any, strict: bool) -> Any:
    """`value` (decoded JSON) with clean strings, keys too; `strict`: NotJson at the first bad
    one."""
    if isinstance(value, str):
        if _BAD_CHAR_RE.search(value) is None:
            return value
        if strict:
            raise NotJson("a string holds a NUL character or an unpaired surrogate")
        return clean_text(value)
    if isinstance(value, dict):
        return {_scrub(k, strict): _scrub(v, strict) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, strict) for v in value]
    return value


def _deeper_than(raw: bytes, limit: int) -> bool:
    """Whether the JSON text `raw` (valid: its strings end) nests deeper than `limit`: with the
    strings left out, each round takes away the innermost level of brackets."""
    brackets = _JSON_STRING_RE.sub(b"", raw).translate(_BRACKETS, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return False
        brackets = brackets.replace(b"()", b"")
    return bool(brackets)


def parse_json(raw: bytes, scrub: bool = False) -> Any:
    """`raw` as strict JSON, or NotJson saying why: UTF-8, no NaN or Infinity, at most
    JSON_DEPTH_MAX levels deep, and no string with a NUL character or an unpaired surrogate
    (Postgres and UTF-8 refuse them), or with `scrub` such strings cleaned (clean_text). Costs a
    few scans of the bytes; the decoded value is walked only when an escape of those is there."""
    if raw[:3] == b"\xef\xbb\xbf":  # a UTF-8 byte order mark, which RFC 8259 lets us ignore
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
        value = _JSON_DECODER.decode(text)
    except RecursionError:
        raise NotJson(f"nested more than {JSON_DEPTH_MAX} levels deep") from None
    except NotJson:
        raise
    except UnicodeDecodeError:
        raise NotJson("it is not UTF-8") from None
    except ValueError:  # the JSONDecodeError, whose position would be noise to a client
        raise NotJson("") from None
    if raw.count(b"[") + raw.count(b"{") > JSON_DEPTH_MAX and _deeper_than(raw, JSON_DEPTH_MAX):
        raise NotJson(f"nested more than {JSON_DEPTH_MAX} levels deep")
    if "\\u" in text and _BAD_ESCAPE_RE.search(text):
        value = _scrub(value, strict=not scrub)
    return value


def one_of(choices: tuple[str, ...]) -> str:
    """The choices as a refusal names them: "a, b or c"."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]


def now() -> float:
    return time.time()


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC; None also for a time no answer can show (a row stored before times were
    checked: NaN, or past year 9999)."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace(
            "+00:00", "Z")
    except (ValueError, OverflowError, OSError):
        return None


def plausible_time(value: Any) -> float | None:
    """A number as the unix seconds of an event that can have happened (EVENT_TIME_MIN to
    CLOCK_SKEW_MAX ahead of now), else None (NaN, 1e308, -1e18, an int past a float's range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        ts = float(value)
    except OverflowError:
        return None
    return ts if EVENT_TIME_MIN <= ts <= now() + CLOCK_SKEW_MAX else None


def parse_time(value: Any, field: str, clamp: bool = False) -> float:
    """ISO 8601 (``Z`` or offset) or unix seconds → unix seconds, from year 1 to 9999 (Refused
    400 outside: no answer could show it; or, with `clamp`, the nearer end of that range, for a
    bound that only has to be before or after everything)."""
    ts = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            ts = float(value)
        except OverflowError:  # an int past a float's range
            if not clamp:
                raise Refused(400, f"{field} is out of range") from None
            ts = TIME_MAX if value > 0 else TIME_MIN
    elif isinstance(value, str) and re.fullmatch(r"[0-9]{9,11}(\.[0-9]+)?", value.strip()):
        ts = float(value)  # unix seconds written as text (query strings)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone.utc)
            ts = parsed.timestamp()
        except ValueError:
            pass
        except OverflowError:  # year 1 at a positive offset is year 0 in UTC
            if not clamp:
                raise Refused(400, f"{field} is out of range") from None
            ts = TIME_MIN
    if ts is None:
        raise Refused(400, f"{field} must be an ISO 8601 time or unix seconds")
    if not TIME_MIN <= ts <= TIME_MAX:
        if not clamp:
            raise Refused(400, f"{field} is out of range")
        ts = min(max(ts, TIME_MIN), TIME_MAX)
    return ts


def parse_range(query: Mapping[str, str], zone: zoneinfo.ZoneInfo | None = None
                ) -> tuple[float | None, float | None]:
    """`from` and `to` as ISO 8601 times or dates; a date is midnight in ``zone`` (UTC without
    one) and a `to` date includes that whole day."""
    bounds: list[float | None] = []
    for field in ("from", "to"):
        value = query.get(field)
        if not value:
            bounds.append(None)
            continue
        if re.match(r"^\d{4}-\d{2}-\d{2}$", value):
            try:
                day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=zone or timezone.utc)
            except ValueError:
                raise Refused(400, f"{field} must be a date or an ISO 8601 time") from None
            try:
                if field == "to":
                    day = (day.replace(tzinfo=None) + timedelta(days=1)).replace(
                        tzinfo=zone or timezone.utc)
                bounds.append(min(max(day.timestamp(), TIME_MIN), TIME_MAX))
            except OverflowError:  # the day after 9999-12-31, or year 1 east of UTC: the end
                bounds.append(TIME_MAX if field == "to" else TIME_MIN)
        else:
            bounds.append(parse_time(value, field, clamp=True))
    return bounds[0], bounds[1]


def hash_token(token: str) -> str:
    # surrogateescape: the bytes of a header that is not UTF-8, as sent (no match, not a 500)
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def same_secret(given: str | None, expected: str | None) -> bool:
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                               expected.encode("utf-8", "surrogateescape"))


_NON_DIGITS = re.compile(r"[^0-9]+")  # ASCII: "³" or "٣" is no digit of a phone number
_ID_RE = re.compile(r"[0-9]{1,19}")


def parse_id(text: str | None) -> int | None:
    """A row id written in a path or query, or None when it cannot be one (not plain digits, or
    past 64 bits, which the databases refuse)."""
    if text and _ID_RE.fullmatch(text):
        value = int(text)
        return value if value <= ID_MAX else None
    return None


def whole_number(value: Any) -> int | None:
    """A JSON number that is whole (``235`` or ``235.0``, as JSON Schema's integer), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) else None


def digits(value: str | None) -> str:
    return _NON_DIGITS.sub("", value or "")


def phone_forms(phone: str | None) -> tuple[str, ...]:
    """The forms one number takes, the dialable one first. Brazil's mobiles gained a 9th digit
    (2012-2016) but WhatsApp ids of older accounts kept the 8-digit form: `55` + area + 8 digits
    whose first is 6-9 is a mobile, dialled as `55` + area + `9` + those 8; a 13-digit mobile is
    also known by its 12-digit id. Landlines (first local digit 2-5) and other countries have one
    form. Digits only; () for none."""
    number = digits(phone)
    if not number:
        return ()
    if number.startswith("55"):
        if len(number) == 12 and number[4] in "6789":
            return number[:4] + "9" + number[4:], number
        if len(number) == 13 and number[4] == "9" and number[5] in "6789":
            return number, number[:4] + number[5:]
    return (number,)


def dialable_phone(phone: str | None) -> str | None:
    """The number as it is dialled (a Brazilian 12-digit mobile id with its 9th digit)."""
    forms = phone_forms(phone)
    return forms[0] if forms else None


# Stored JSON read back: a NaN or Infinity kept before bodies were strict reads as null.
_STORED_JSON_DECODER = json.JSONDecoder(parse_constant=lambda name: None)


def loads_or(value: str | None, default: Any) -> Any:
    return _STORED_JSON_DECODER.decode(value) if value else default


# ##################################################################################################
# Storage
#
# One small interface (Storage) with two backends. Queries are written once with `?` placeholders;
# the Postgres backend translates them. Writes run as units of work through `transact(fn)`: the
# unit gets a transaction object (`tx`) and its result is returned only after the commit. SQLite
# commits many concurrent units together (group commit: one fsync for a batch, each unit in its
# own savepoint so one failure does not undo the others); Postgres runs each unit in its own
# transaction from a pool.
# ##################################################################################################

# Counts visit_rollup from the visits (migration 5, and rebuild_rollup after changes by hand).
ROLLUP_FILL = """INSERT INTO visit_rollup SELECT company_id, dimension, value, bucket, COUNT(*),
    SUM(CASE WHEN clicks > 0 THEN 1 ELSE 0 END),
    SUM(CASE WHEN clicks > 0 AND lead_id IS NOT NULL THEN 1 ELSE 0 END) FROM (
    SELECT company_id, '' AS dimension, '' AS value, {bucket} AS bucket, clicks, lead_id
        FROM visits
    UNION ALL SELECT company_id, 'utm_source', COALESCE(utm_source, ''), {bucket}, clicks, lead_id
        FROM visits
    UNION ALL SELECT company_id, 'utm_medium', COALESCE(utm_medium, ''), {bucket}, clicks, lead_id
        FROM visits
    UNION ALL SELECT company_id, 'utm_campaign', COALESCE(utm_campaign, ''), {bucket}, clicks,
        lead_id FROM visits
    UNION ALL SELECT company_id, 'click_phone', COALESCE(click_phone, ''), {bucket}, clicks,
        lead_id FROM visits) AS v GROUP BY 1, 2, 3, 4"""

# A name is managed by one company at most: the public routes look connections up by name alone.
VERIFIED_INDEX = ("CREATE UNIQUE INDEX connections_verified ON connections (id) "
                  "WHERE verified = 1 AND deleted_at IS NULL")


async def verify_connections_hash_secrets(tx: Tx) -> None:
    """Migration 6 (a Python step: SQLite has no SHA-256 in SQL, and one hash_token keeps both
    backends identical). Connections become `verified` (manageable) when the company made them
    with create-instance, which stored their instance token; rows known only from webhook
    deliveries stay unverified. One live verified connection per name: should two companies
    ever have both made one (a race the old check allowed), the earlier keeps it. Inbound
    secrets are stored as their SHA-256, like API tokens."""
    await tx.execute("ALTER TABLE connections ADD COLUMN verified INTEGER NOT NULL DEFAULT 0")
    await tx.execute(
        "UPDATE connections SET verified = 1 WHERE instance_token IS NOT NULL AND NOT EXISTS ("
        "SELECT 1 FROM connections o WHERE o.id = connections.id AND o.instance_token IS NOT NULL "
        "AND o.deleted_at IS NULL AND connections.deleted_at IS NULL AND (o.created_at < "
        "connections.created_at OR (o.created_at = connections.created_at AND o.company_id < "
        "connections.company_id)))")
    await tx.execute(VERIFIED_INDEX)
    for row in await tx.fetchall("SELECT id, webhook_secret FROM companies"):
        await tx.execute("UPDATE companies SET webhook_secret = ? WHERE id = ?",
                         hash_token(row["webhook_secret"]), row["id"])
    for row in await tx.fetchall("SELECT company_id, id, webhook_secret FROM connections "
                                 "WHERE webhook_secret IS NOT NULL"):
        await tx.execute("UPDATE connections SET webhook_secret = ? WHERE company_id = ? "
                         "AND id = ?", hash_token(row["webhook_secret"]), row["company_id"],
                         row["id"])


async def identities_and_cloud_connections(tx: Tx) -> None:
    """Migration 9. A person is known by phone, WhatsApp id, LID and business-scoped user id
    (BSUID, from Meta's Cloud API) with an @username beside them; connections have a type
    (`evolution`, `cloud`) and a Cloud API number's ids and secrets. Brazilian mobiles stored
    in their 12-digit WhatsApp form become the dialable 13-digit phone (the id kept as
    `wa_id`); where both forms had become contacts, the newer folds into the older."""
    for statement in (
            "ALTER TABLE contacts ADD COLUMN wa_id TEXT",
            "ALTER TABLE contacts ADD COLUMN bsuid TEXT",
            "ALTER TABLE contacts ADD COLUMN username TEXT",
            "CREATE UNIQUE INDEX contacts_bsuid ON contacts (company_id, bsuid) "
            "WHERE bsuid IS NOT NULL",
            "ALTER TABLE leads ADD COLUMN wa_id TEXT",
            "ALTER TABLE leads ADD COLUMN bsuid TEXT",
            "ALTER TABLE leads ADD COLUMN username TEXT",
            "ALTER TABLE leads ADD COLUMN source TEXT",
            "ALTER TABLE connections ADD COLUMN type TEXT NOT NULL DEFAULT 'evolution'",
            "ALTER TABLE connections ADD COLUMN phone_number_id TEXT",
            "ALTER TABLE connections ADD COLUMN waba_id TEXT",
            "ALTER TABLE connections ADD COLUMN app_secret TEXT",
            "ALTER TABLE connections ADD COLUMN access_token TEXT",
            "ALTER TABLE connections ADD COLUMN verify_token TEXT",
            "CREATE INDEX connections_phone_number ON connections (company_id, phone_number_id)",
            "UPDATE contacts SET wa_id = phone WHERE phone IS NOT NULL",
            "UPDATE leads SET wa_id = phone WHERE phone IS NOT NULL",
            "UPDATE leads SET source = 'evolution'"):
        await tx.execute(statement)
    short = "LENGTH(phone) = 12 AND phone LIKE '55%'"
    for row in await tx.fetchall(f"SELECT id, company_id, phone FROM contacts WHERE {short} "
                                 "ORDER BY id"):
        dialable = dialable_phone(row["phone"])
        if dialable == row["phone"]:
            continue  # a landline
        twin = await tx.fetchone("SELECT id FROM contacts WHERE company_id = ? AND phone = ?",
                                 row["company_id"], dialable)
        if twin is None:
            await tx.execute("UPDATE contacts SET phone = ? WHERE id = ?", dialable, row["id"])
            continue
        keep, gone = sorted((row["id"], twin["id"]))
        for table in ("leads", "messages"):
            await tx.execute(f"UPDATE {table} SET contact_id = ? WHERE contact_id = ?", keep,
                             gone)
        await tx.execute("DELETE FROM contacts WHERE id = ?", gone)
        await tx.execute("UPDATE contacts SET phone = ?, wa_id = ? WHERE id = ?", dialable,
                         row["phone"], keep)
    for row in await tx.fetchall(f"SELECT DISTINCT phone FROM leads WHERE {short}"):
        dialable = dialable_phone(row["phone"])
        if dialable != row["phone"]:
            await tx.execute("UPDATE leads SET phone = ? WHERE phone = ?", dialable,
                             row["phone"])


# A migration is SQL text (dialect types in braces) or an async function of the transaction.
MIGRATIONS: list[tuple[int, str | Callable[[Any], Awaitable[None]]]] = [
    (1, """
CREATE TABLE companies (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}',
    evolution_url TEXT,
    evolution_key TEXT,
    webhook_secret TEXT NOT NULL,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL
);
CREATE TABLE api_tokens (
    id {id},
    company_id TEXT NOT NULL REFERENCES companies (id) ON DELETE CASCADE,
    name TEXT,
    token_hash TEXT NOT NULL UNIQUE,
    created_at {real} NOT NULL
);
CREATE TABLE visits (
    id {id},
    company_id TEXT NOT NULL,
    visitor_id TEXT NOT NULL,
    code TEXT NOT NULL,
    expires_at {real} NOT NULL,
    utm_source TEXT,
    utm_medium TEXT,
    utm_campaign TEXT,
    last_touch TEXT NOT NULL,
    first_touch TEXT NOT NULL,
    pageviews INTEGER NOT NULL DEFAULT 0,
    clicks INTEGER NOT NULL DEFAULT 0,
    clicked_at {real},
    click_phone TEXT,
    lead_id {bigint},
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL,
    UNIQUE (company_id, code)
);
CREATE INDEX visits_visitor ON visits (company_id, visitor_id, id);
CREATE INDEX visits_click ON visits (company_id, click_phone, clicked_at);
CREATE TABLE tracking_events (
    id {id},
    company_id TEXT NOT NULL,
    visit_id {bigint} NOT NULL,
    event TEXT NOT NULL,
    page_url TEXT,
    referrer TEXT,
    utm_source TEXT,
    utm_medium TEXT,
    utm_campaign TEXT,
    whatsapp_phone TEXT,
    created_at {real} NOT NULL
);
CREATE INDEX tracking_events_company_time ON tracking_events (company_id, created_at);
CREATE INDEX tracking_events_time ON tracking_events (created_at);
CREATE TABLE connections (
    company_id TEXT NOT NULL,
    id TEXT NOT NULL,
    state TEXT,
    phone TEXT,
    profile_name TEXT,
    picture_url TEXT,
    instance_id TEXT,
    instance_token TEXT,
    webhook_secret TEXT,
    qr_code TEXT,
    qr_pairing_code TEXT,
    qr_at {real},
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL,
    deleted_at {real},
    PRIMARY KEY (company_id, id)
);
CREATE TABLE contacts (
    id {id},
    company_id TEXT NOT NULL,
    phone TEXT,
    lid TEXT,
    name TEXT,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL
);
CREATE UNIQUE INDEX contacts_phone ON contacts (company_id, phone) WHERE phone IS NOT NULL;
CREATE UNIQUE INDEX contacts_lid ON contacts (company_id, lid) WHERE lid IS NOT NULL;
CREATE TABLE leads (
    id {id},
    company_id TEXT NOT NULL,
    connection_id TEXT,
    contact_id {bigint},
    phone TEXT,
    lid TEXT,
    name TEXT,
    first_message TEXT,
    message_id TEXT,
    code TEXT,
    match_method TEXT NOT NULL,
    confidence {real} NOT NULL,
    visit_id {bigint},
    utm_source TEXT,
    utm_medium TEXT,
    utm_campaign TEXT,
    ad_id TEXT,
    gclid TEXT,
    ctwa_clid TEXT,
    attribution TEXT NOT NULL,
    first_touch TEXT,
    context_info TEXT,
    clicked_at {real},
    created_at {real} NOT NULL
);
CREATE UNIQUE INDEX leads_code ON leads (company_id, code) WHERE code IS NOT NULL;
CREATE UNIQUE INDEX leads_ctwa ON leads (company_id, ctwa_clid) WHERE ctwa_clid IS NOT NULL;
CREATE INDEX leads_company_time ON leads (company_id, created_at);
CREATE INDEX leads_contact ON leads (contact_id);
CREATE TABLE messages (
    id {id},
    company_id TEXT NOT NULL,
    connection_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    contact_id {bigint},
    lead_id {bigint},
    created_at {real} NOT NULL,
    UNIQUE (company_id, connection_id, message_id)
);
CREATE TABLE lead_events (
    id {id},
    company_id TEXT NOT NULL,
    lead_id {bigint} NOT NULL,
    name TEXT NOT NULL,
    value {real},
    currency TEXT,
    occurred_at {real} NOT NULL,
    event_id TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at {real} NOT NULL,
    UNIQUE (company_id, event_id)
);
CREATE INDEX lead_events_lead ON lead_events (lead_id);
CREATE TABLE webhook_deliveries (
    id {id},
    company_id TEXT,
    source TEXT NOT NULL,
    instance TEXT,
    event TEXT,
    headers TEXT,
    body {blob} NOT NULL,
    truncated INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    result TEXT,
    error TEXT,
    received_at {real} NOT NULL,
    processed_at {real}
);
CREATE INDEX webhook_deliveries_time ON webhook_deliveries (received_at);
CREATE INDEX webhook_deliveries_status ON webhook_deliveries (status, id);
"""),
    (2, """
ALTER TABLE companies ADD COLUMN signing_key TEXT;
CREATE INDEX connections_id ON connections (id);
"""),
    (3, """
ALTER TABLE visits ADD COLUMN user_agent TEXT;
CREATE INDEX visits_company_time ON visits (company_id, created_at);
CREATE INDEX lead_events_company_time ON lead_events (company_id, occurred_at);
CREATE TABLE deliveries (
    id {id},
    company_id TEXT NOT NULL,
    event_row_id {bigint} NOT NULL,
    lead_id {bigint} NOT NULL,
    destination TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at {real} NOT NULL,
    locked_until {real},
    last_status INTEGER,
    last_error TEXT,
    response TEXT,
    delivered_at {real},
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL,
    UNIQUE (event_row_id, destination)
);
CREATE INDEX deliveries_due ON deliveries (status, next_attempt_at);
CREATE INDEX deliveries_company ON deliveries (company_id, status, id);
CREATE TABLE labels (
    company_id TEXT NOT NULL,
    connection_id TEXT NOT NULL,
    label_id TEXT NOT NULL,
    name TEXT,
    deleted INTEGER NOT NULL DEFAULT 0,
    updated_at {real} NOT NULL,
    PRIMARY KEY (company_id, connection_id, label_id)
);
"""),
    (4, """
CREATE INDEX visits_report ON visits (company_id, created_at, utm_source, utm_medium,
    utm_campaign, clicks, lead_id, click_phone);
DROP INDEX visits_company_time;
"""),
    # The report's visit counters per 15 minutes and value of one dimension (a UTM tag, the
    # number clicked, or '' for all visits), kept up to date by every write that changes a visit
    # (see the website tracking section); '' stands for no value (keys cannot be NULL).
    (5, """
CREATE TABLE visit_rollup (
    company_id TEXT NOT NULL,
    dimension TEXT NOT NULL,
    value TEXT NOT NULL,
    bucket {bigint} NOT NULL,
    visits {bigint} NOT NULL,
    clicks {bigint} NOT NULL,
    matched {bigint} NOT NULL,
    PRIMARY KEY (company_id, dimension, bucket, value)
){without_rowid};
""" + ROLLUP_FILL + """;
DROP INDEX visits_report;
CREATE INDEX visits_company_time ON visits (company_id, created_at);
CREATE INDEX leads_report ON leads (company_id, created_at, match_method, utm_source, utm_medium,
    utm_campaign, ad_id, connection_id);
DROP INDEX leads_company_time;
CREATE INDEX lead_events_report ON lead_events (company_id, occurred_at, name, value, lead_id);
DROP INDEX lead_events_company_time;
"""),
    (6, verify_connections_hash_secrets),
    # What a connection last heard, so "no leads arrive" can be diagnosed: an accepted delivery
    # (to the minute), and a refused one with its reason.
    (7, """
ALTER TABLE connections ADD COLUMN last_delivery_at {real};
ALTER TABLE connections ADD COLUMN last_rejected_at {real};
ALTER TABLE connections ADD COLUMN last_rejection TEXT;
"""),
    # When each API token was last used (to the minute: see TokenUses), for the tokens list.
    (8, """
ALTER TABLE api_tokens ADD COLUMN last_used_at {real};
"""),
    (9, identities_and_cloud_connections),
    # The chat rule that made an event (SPEC §14), as JSON; null for the other sources.
    (10, """
ALTER TABLE lead_events ADD COLUMN rule TEXT;
"""),
]

DIALECT_TYPES = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "bigint": "INTEGER", "real": "REAL",
               "blob": "BLOB", "without_rowid": " WITHOUT ROWID"},  # the key is the table
    "postgres": {"id": "BIGSERIAL PRIMARY KEY", "bigint": "BIGINT", "real": "DOUBLE PRECISION",
                 "blob": "BYTEA", "without_rowid": ""},
}


class StorageError(Exception):
    pass


def insert_sql(table: str, columns: tuple[str, ...]) -> str:
    """`INSERT INTO table (columns) VALUES (?, ...)`: one row, every column a parameter."""
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


class Tx(Protocol):
    """What a unit of work may do with its transaction (SqliteTx and PostgresTx; see
    DeferredWrites for the deferred writes). Reads and immediate writes see the unit's own
    deferred writes: a statement naming a table with writes pending flushes them first (free
    when nothing is pending), so no unit flushes by hand."""

    memo: dict[Any, Any]  # the unit's cache of reads; domain code goes through a UnitCache

    async def fetchone(self, sql: str, *args: Any) -> dict | None: ...
    async def fetchall(self, sql: str, *args: Any) -> list[dict]: ...
    async def execute(self, sql: str, *args: Any) -> int: ...
    async def executemany(self, sql: str, rows: list[tuple]) -> None: ...
    def defer(self, sql: str, *args: Any) -> None: ...
    def defer_row(self, sql: str, row: dict, columns: tuple[str, ...]) -> None: ...
    def add(self, sql: str, key: tuple, values: tuple) -> None: ...
    async def flush(self) -> None: ...
    def savepoint(self) -> contextlib.AbstractAsyncContextManager[Any]: ...
    async def new_id(self, table: str) -> int: ...
    async def stock_ids(self, wanted: Mapping[str, int]) -> None: ...
    async def lock_keys(self, keys: list[str]) -> None: ...
    def any_of(self, column: str, values: list) -> tuple[str, list]: ...
    def rows_of(self, types: tuple[str, ...], rows: list[tuple]) -> tuple[str, list]: ...


@dataclasses.dataclass(frozen=True, eq=False)
class BatchKind:
    """One kind of batched unit of work (Storage.submit), declared once at module level:
    `prefetch(tx, items) -> ctx` reads what all the items need at once; `apply(tx, ctx, item)`
    is the one-item rule (a batch of one runs it too) and returns the item's result, a domain
    refusal being a result like any other; `write(tx, ctx, results) -> results` writes set-wise
    what the items made and completes their results. `spread`: the batch's statements grow with
    each item (see submit). Storage.submit groups the items waiting by their kind."""

    name: str
    prefetch: Callable[[Tx, list], Awaitable[Any]]
    apply: Callable[[Tx, Any, Any], Awaitable[Any]]
    write: Callable[[Tx, Any, list], Awaitable[list]] | None = None
    spread: bool = False

    async def __call__(self, tx: Tx, items: list) -> list:
        ctx = await self.prefetch(tx, items)
        results = [await self.apply(tx, ctx, item) for item in items]
        return results if self.write is None else await self.write(tx, ctx, results)


class Storage:
    """What the application needs from a database; subclasses provide the primitives."""

    dialect = ""

    def skip_locked(self, alias: str) -> str:
        """Appended to a claiming SELECT: the rows of `alias` another process holds are passed
        over (Postgres); SQLite has one writer at a time, so it needs nothing."""
        return ""

    def bucket(self, expr: str, seconds: int) -> str:
        """SQL for floor(expr / seconds) as an integer (positive values)."""
        return f"CAST({expr} / {seconds} AS INTEGER)"

    def blob_contains(self, column: str) -> str:
        """SQL: the binary `column` contains the bytes given as the next parameter."""
        return f"instr({column}, ?) > 0"

    def lower(self, expr: str) -> str:
        """SQL: the text `expr` in lower case, as Python's str.lower() writes it (Postgres's
        lower() in a UTF-8 database does; SQLite's folds ASCII only: see SqliteStorage)."""
        return f"LOWER({expr})"

    def location(self) -> str:
        """Which database this is, for the operator's eyes: never a password."""
        raise NotImplementedError

    async def connect(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def fetchone(self, sql: str, *args: Any) -> dict | None:
        """A read outside any unit of work (sees committed data only)."""
        raise NotImplementedError

    async def fetchall(self, sql: str, *args: Any) -> list[dict]:
        raise NotImplementedError

    async def transact(self, fn: Callable[[Tx], Awaitable[Any]]) -> Any:
        """Run ``await fn(tx)`` in a transaction; return its result once committed."""
        raise NotImplementedError

    async def submit(self, run: Callable[[Tx, list], Awaitable[list]], item: Any,
                     spread: bool = False) -> Any:
        """Batched units of work: ``await run(tx, items)`` handles many concurrent items of one
        kind in one go (set-wise statements, one round trip for all) and returns one result per
        item, an exception instance standing for that item's refusal. `run` is a BatchKind
        declared once (a plain function groups by its identity: tests). Returns this item's result
        once committed, or raises its exception. Should the batch as a whole fail, each item is
        run on its own (a failing item then fails alone). `spread` (or the kind's): the run's
        statements grow with each item, so where transactions run side by side (Postgres), the
        waiting items are shared out among them instead of all going in the next one."""
        raise NotImplementedError

    @staticmethod
    async def _run_isolated(attempt: Callable[[list], Awaitable[list]], items: list,
                            retryable: tuple) -> list:
        """``attempt(items)`` runs a batch in a transaction (or savepoint) of its own. If the
        batch fails, each item is attempted alone, twice when the failure is `retryable` (a unique
        key or lock taken by a concurrent writer: the second attempt reads it). Returns one
        result or exception instance per item."""
        try:
            return await attempt(items)
        except Exception as exc:  # noqa: BLE001 - isolated below
            if len(items) == 1 and not isinstance(exc, retryable):
                return [exc]
        results = []
        for item in items:
            for n in (1, 2):
                try:
                    results.append((await attempt([item]))[0])
                    break
                except Exception as exc:  # noqa: BLE001 - this item's failure
                    if n == 2 or not isinstance(exc, retryable):
                        results.append(exc)
                        break
        return results

    async def lock_migrations(self, tx: Tx) -> None:
        """Keep other processes out while migrating (SQLite's write transaction already does)."""

    async def migrate(self) -> list[int]:
        """Apply the pending migrations in one transaction; return the versions applied."""
        async def run(tx: Tx) -> list[int]:
            await self.lock_migrations(tx)
            for statement in self.migration_statements(
                    "CREATE TABLE IF NOT EXISTS schema_migrations "
                    "(version INTEGER PRIMARY KEY, applied_at {real} NOT NULL)"):
                await tx.execute(statement)
            done = {r["version"] for r in await tx.fetchall("SELECT version FROM schema_migrations")}
            applied = []
            for version, sql in MIGRATIONS:
                if version in done:
                    continue
                if callable(sql):
                    await sql(tx)
                else:
                    for statement in self.migration_statements(sql):
                        await tx.execute(statement)
                await tx.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                                 version, now())
                applied.append(version)
            return applied

        return await self.transact(run)

    async def ping(self) -> None:
        await self.fetchone("SELECT 1 AS one")

    @staticmethod
    def from_url(url: str, config: Config | None = None) -> "Storage":
        if url.startswith("sqlite:"):
            return SqliteStorage(url, synchronous=config.sqlite_synchronous if config else "FULL")
        if url.startswith(("postgres://", "postgresql://")):
            return PostgresStorage(url)
        raise ConfigError("DATABASE_URL must start with sqlite:/// or postgresql://.")

    def migration_statements(self, sql: str) -> list[str]:
        types = {**DIALECT_TYPES[self.dialect],
                 "bucket": self.bucket("created_at", ROLLUP_BUCKET)}
        sql = re.sub(r"\{(id|bigint|real|blob|bucket|without_rowid)\}",
                     lambda m: types[m.group(1)], sql)
        return [s.strip() for s in sql.split(";") if s.strip()]


_WRITTEN_TABLE_RE = re.compile(r"\s*(?:INSERT INTO|UPDATE|DELETE FROM)\s+(\w+)", re.I)


class DeferredWrites:
    """What a transaction object keeps for the end of its transaction (both dialects).

    - `defer(sql, *args)`: a write whose outcome the unit does not read and whose order against
      the transaction's other deferred statements does not matter (an outbox row, a back
      reference). At `flush` the rows of one statement text go as one `executemany`.
    - `add(sql, key, values)`: an additive upsert (counters); values are summed per key first,
      so many units counting into one hot row write it once, just before COMMIT, in key order
      (concurrent Postgres transactions then lock such rows briefly and in one order).
    - `memo`: a cache of reads for the rest of the transaction (a row it already read).

    - `defer_row(sql, row, columns)`: an INSERT of the dict `row`, whose values are read at
      `flush` (until then the unit keeps changing the dict; `row["_pending"]` says it is not in
      the table yet). Such rows take their ids from `new_id`.
    - `new_id(table)`: an id for a new row of `table`, given out now so rows can refer to each
      other before they are inserted; `stock_ids({table: n})` reserves ids for it ahead, for
      several tables in one statement where that saves round trips (Postgres).

    A savepoint flushes on entry and, when rolled back, drops what was deferred inside it along
    with the memo. The storages flush before every COMMIT. And a statement run now (a read, or a
    write that reads) flushes first when its text names a table with writes pending: the unit
    sees its own writes, and writes to tables nobody reads back still go set-wise at the end.
    """

    def _start(self) -> None:
        self._deferred: list[tuple[str, Any]] = []
        self._sums: dict[str, dict[tuple, tuple]] = {}
        self._tables: set[str] = set()  # the tables with writes pending
        self.memo: dict[Any, Any] = {}

    async def _see_pending(self, sql: str) -> None:
        """Flush before `sql` when it names a table with writes pending (free when none are)."""
        if self._tables and any(re.search(rf"\b{t}\b", sql) for t in self._tables):
            await self.flush()

    def _pending(self, sql: str) -> None:
        self._tables.add(_WRITTEN_TABLE_RE.match(sql)[1])

    def defer(self, sql: str, *args: Any) -> None:
        self._pending(sql)
        self._deferred.append((sql, args))

    def defer_row(self, sql: str, row: dict, columns: tuple[str, ...]) -> None:
        def values() -> tuple:
            row["_pending"] = False
            return tuple(row[c] for c in columns)

        row["_pending"] = True
        self._pending(sql)
        self._deferred.append((sql, values))

    def add(self, sql: str, key: tuple, values: tuple) -> None:
        self._pending(sql)
        sums = self._sums.setdefault(sql, {})
        old = sums.get(key)
        sums[key] = values if old is None else tuple(a + b for a, b in zip(old, values))

    async def flush(self) -> None:
        deferred, sums = self._deferred, self._sums
        self._deferred, self._sums = [], {}
        self._tables.clear()
        grouped: dict[str, list[tuple]] = {}
        for sql, args in deferred:
            grouped.setdefault(sql, []).append(args() if callable(args) else args)
        for sql, rows in grouped.items():
            await self.executemany(sql, rows)
        for sql, by_key in sums.items():
            rows = [key + values for key, values in sorted(by_key.items()) if any(values)]
            if rows:
                await self.executemany(sql, rows)

    def _discard(self) -> None:
        self._deferred, self._sums = [], {}
        self._tables.clear()
        self.memo.clear()


class SqliteTx(DeferredWrites):
    """The transaction object handed to units of work on SQLite.

    Its statements run right here on the event loop's thread, on the writer connection (a plain
    sqlite3 connection): inside the group's write transaction a statement never waits for a lock
    and costs microseconds, much less than a round trip to a database thread. Only BEGIN and
    COMMIT (which waits for the disk) leave the loop. So keep units of work short: a statement
    over millions of rows holds the whole server while it runs (delete in chunks).
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._depth = 0
        self._next_ids: dict[str, int] = {}  # table → the next id new_id gives out
        self._start()

    async def fetchone(self, sql: str, *args: Any) -> dict | None:
        await self._see_pending(sql)
        cur = self.conn.execute(sql, args)
        try:
            row = cur.fetchone()
        finally:
            cur.close()
        return dict(row) if row is not None else None

    async def fetchall(self, sql: str, *args: Any) -> list[dict]:
        await self._see_pending(sql)
        cur = self.conn.execute(sql, args)
        try:
            return [dict(r) for r in cur.fetchall()]
        finally:
            cur.close()

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; return the number of rows it changed."""
        await self._see_pending(sql)
        cur = self.conn.execute(sql, args)
        try:
            return cur.rowcount
        finally:
            cur.close()

    async def executemany(self, sql: str, rows: list[tuple]) -> None:
        """One statement over many rows (no RETURNING)."""
        self.conn.executemany(sql, rows).close()

    @staticmethod
    def any_of(column: str, values: list) -> tuple[str, list]:
        """SQL and arguments for `column` equal to any of `values` (a non-empty list)."""
        return f"{column} IN ({', '.join('?' * len(values))})", list(values)

    @staticmethod
    def rows_of(types: tuple[str, ...], rows: list[tuple]) -> tuple[str, list]:
        """SQL and arguments for `rows` as a row source (`INSERT INTO t (...) <here>`); `types`
        are the columns' Postgres types."""
        marks = f"({', '.join('?' * len(types))})"
        return f"VALUES {', '.join([marks] * len(rows))}", [v for row in rows for v in row]

    async def lock_keys(self, keys: list[str]) -> None:
        """Hold `keys` until the transaction ends, against concurrent transactions that lock
        them too. SQLite has one writer at a time: nothing to do."""

    async def stock_ids(self, wanted: Mapping[str, int]) -> None:
        """Nothing: here an id costs no round trip, and ids stocked but not used would leave
        gaps in the numbering."""

    async def new_id(self, table: str) -> int:
        """The ids after the table's AUTOINCREMENT counter, counted here, with no statement
        per id. The rows taking them must be inserted before any row of `table` without an id
        (one that would take the counter's next): the deferred rows are, at `flush`, which
        also moves the counter past them and so starts the count again. (Rows inserted at once
        with their ids, like new visits, move it themselves.)"""
        if table not in self._next_ids:
            row = await self.fetchone("SELECT seq FROM sqlite_sequence WHERE name = ?", table)
            self._next_ids[table] = (row["seq"] if row else 0) + 1
        self._next_ids[table] += 1
        return self._next_ids[table] - 1

    async def flush(self) -> None:
        await super().flush()
        self._next_ids.clear()

    @contextlib.asynccontextmanager
    async def savepoint(self):
        await self.flush()
        self._depth += 1
        name = f"sp{self._depth}"
        self.conn.execute(f"SAVEPOINT {name}")
        try:
            yield self
        except BaseException:
            self._discard()
            self.conn.execute(f"ROLLBACK TO {name}")
            self.conn.execute(f"RELEASE {name}")
            raise
        else:
            self.conn.execute(f"RELEASE {name}")
        finally:
            self._depth -= 1


def sqlite_path(path: str) -> str:
    """The file a DATABASE_URL's SQLite path names. A relative path is beside whatstracking.py
    (where its .env is), whatever the working directory: a CLI command run from elsewhere must not
    quietly make a second, empty database. Until 0.1.0 it was the working directory; a file found
    only there is still used, with a warning."""
    given = Path(path)
    if given.is_absolute():
        return path
    beside, before = HERE / given, Path.cwd() / given
    if not beside.exists() and before.exists() and before.resolve() != beside.resolve():
        log.warning("Using the SQLite database %s in the working directory; a relative "
                    "DATABASE_URL now means beside whatstracking.py (%s): move the file there or "
                    "give an absolute path.", before, beside)
        return str(before)
    return str(beside)


def _user_name() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return "this user"


def sqlite_open_error(path: str, exc: BaseException) -> str:
    """One sentence for a database file that cannot be opened; permissions named as such."""
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "read-only file system" if exc.errno == errno.EROFS else "permission denied"
        user, directory = _user_name(), Path(path).parent
        return (f"DATABASE_URL: {reason} for user {user} on {exc.filename or path} (SQLite "
                f"writes {path} and its -wal and -shm files in {directory}: give this user the "
                f"directory, e.g. `chown -R {user} {directory}`, or choose another path).")
    return f"DATABASE_URL: cannot open the SQLite database {path} ({exc})."


def _sql_lower(value: Any) -> Any:
    """SQLite's wt_lower(): lower case beyond ASCII ("JOÃO" → "joão"), like Postgres's."""
    return value.lower() if isinstance(value, str) else value


class SqliteStorage(Storage):
    """SQLite: one writer connection fed by a group-commit loop, one reader (aiosqlite).

    The writer is a plain sqlite3 connection with a thread of its own for BEGIN and COMMIT; the
    statements of the units of work run on the event loop (see SqliteTx). A batch costs two
    thread round trips, whatever its size; every unit is answered after the COMMIT returns.
    """

    dialect = "sqlite"

    def __init__(self, url: str, synchronous: str = "FULL") -> None:
        path = url[len("sqlite:"):]
        if path.startswith("///"):
            path = path[3:]
        elif path.startswith("//"):
            path = path[2:]
        if not path or path == ":memory:":
            raise ConfigError("DATABASE_URL for SQLite must name a file, e.g. "
                              "sqlite:///whatstracking.db.")
        self.path = sqlite_path(path)
        self.synchronous = synchronous
        self._writer = None
        self._writer_thread = None  # a one-thread executor: BEGIN, COMMIT, open, close
        self._reader = None
        self._queue: asyncio.Queue | None = None
        self._loop_task: asyncio.Task | None = None
        self._read_lock = asyncio.Lock()

    def location(self) -> str:
        return f"sqlite:///{Path(self.path).resolve()}"

    def lower(self, expr: str) -> str:
        return f"wt_lower({expr})"

    def _create_file(self) -> None:
        """Make the database file (owner only) or check it can be written, and that SQLite can
        make its -wal and -shm files beside it: its own error would only say "unable to open"."""
        directory = Path(self.path).parent
        directory.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, SQLITE_FILE_MODE))
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied", str(directory))

    def _open_writer(self) -> Any:
        self._create_file()
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.row_factory = sqlite3.Row
            for pragma in ("journal_mode=WAL", f"synchronous={self.synchronous}",
                           f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}", "foreign_keys=ON"):
                conn.execute(f"PRAGMA {pragma}")
            conn.create_function("wt_lower", 1, _sql_lower, deterministic=True)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _in_writer_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._writer_thread, fn, *args)

    async def connect(self) -> None:
        import concurrent.futures

        import aiosqlite

        self._writer_thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="sqlite-writer")
        try:
            self._writer = await self._in_writer_thread(self._open_writer)
        except (OSError, aiosqlite.Error) as exc:
            self._writer_thread.shutdown(wait=False)
            raise ConfigError(sqlite_open_error(self.path, exc)) from None
        self._reader = await aiosqlite.connect(self.path, isolation_level=None)
        self._reader.row_factory = aiosqlite.Row
        await self._reader.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        await self._reader.execute("PRAGMA query_only=ON")
        await self._reader.create_function("wt_lower", 1, _sql_lower, deterministic=True)
        self._queue = asyncio.Queue()
        self._loop_task = asyncio.create_task(self._commit_loop(), name="sqlite-group-commit")

    async def close(self) -> None:
        if self._loop_task is not None:
            # Flush: let every queued unit of work commit before the connections close.
            await self._queue.put(None)
            await self._loop_task
            self._loop_task = None
        if self._reader is not None:
            await self._reader.close()
        if self._writer is not None:
            await self._in_writer_thread(self._writer.close)
            self._writer_thread.shutdown(wait=False)
        self._reader = self._writer = None

    async def fetchone(self, sql: str, *args: Any) -> dict | None:
        rows = await self._reader.execute_fetchall(sql, args)  # one round trip to its thread
        return dict(rows[0]) if rows else None

    async def fetchall(self, sql: str, *args: Any) -> list[dict]:
        return [dict(r) for r in await self._reader.execute_fetchall(sql, args)]

    async def transact(self, fn: Callable[[Tx], Awaitable[Any]]) -> Any:
        if self._loop_task is None or self._loop_task.done():
            raise StorageError("the database is closed")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((fn, future))
        return await future

    async def submit(self, run: Callable[[Tx, list], Awaitable[list]], item: Any,
                     spread: bool = False) -> Any:
        if self._loop_task is None or self._loop_task.done():
            raise StorageError("the database is closed")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((run, item, future))  # committed with the next group
        return await future

    async def _begin(self) -> None:
        """BEGIN IMMEDIATE right here when the write lock is free (it is, unless another process
        writes): a trip to the writer thread costs more than the statement. Else wait for the
        lock in the writer thread, as long as busy_timeout allows."""
        conn = self._writer
        conn.execute("PRAGMA busy_timeout=0")
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError:  # "database is locked": another process holds it
            pass
        finally:
            conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        await self._in_writer_thread(conn.execute, "BEGIN IMMEDIATE")

    async def _commit_loop(self) -> None:
        stopping = False
        while not stopping:
            item = await self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < SQLITE_BATCH_MAX and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            await self._run_batch(batch)

    async def _attempt(self, run: Callable[[Tx, list], Awaitable[list]], items: list) -> list:
        tx = SqliteTx(self._writer)
        async with tx.savepoint():
            results = await run(tx, items)
            await tx.flush()
            return results

    async def _run_batch(self, batch: list) -> None:
        results = []  # (future, result or exception instance)
        grouped: dict[Any, list] = {}  # batched kind → [(item, future)]
        try:
            await self._begin()
            for entry in batch:
                if len(entry) == 3:
                    grouped.setdefault(entry[0], []).append(entry[1:])
                    continue
                fn, future = entry
                tx = SqliteTx(self._writer)
                try:
                    async with tx.savepoint():
                        value = await fn(tx)
                        await tx.flush()
                    results.append((future, value))
                except Exception as exc:  # noqa: BLE001 - handed to the unit's caller
                    results.append((future, exc))
            for run, entries in grouped.items():
                for start in range(0, len(entries), BATCH_MAX):
                    chunk = entries[start:start + BATCH_MAX]
                    values = await self._run_isolated(
                        functools.partial(self._attempt, run), [item for item, _ in chunk],
                        (sqlite3.IntegrityError,))
                    results.extend(zip((future for _, future in chunk), values))
            await self._in_writer_thread(self._writer.execute, "COMMIT")
        except Exception as exc:  # the batch as a whole failed: nothing of it is committed
            with contextlib.suppress(Exception):
                await self._in_writer_thread(self._writer.execute, "ROLLBACK")
            for entry in batch:
                if not entry[-1].done():
                    entry[-1].set_exception(exc)
            return
        for future, value in results:
            if future.done():  # the caller went away (cancelled); the work is committed anyway
                continue
            if isinstance(value, BaseException):
                future.set_exception(value)
            else:
                future.set_result(value)


@functools.lru_cache(maxsize=512)
def to_dollar_params(sql: str) -> str:
    """Translate `?` placeholders to Postgres' `$1, $2, ...` (queries carry no `?` literals)."""
    parts = sql.split("?")
    out = [parts[0]]
    for n, part in enumerate(parts[1:], start=1):
        out.append(f"${n}{part}")
    return "".join(out)


_INSERT_VALUES_RE = re.compile(
    r"(?P<head>INSERT INTO \w+ \([\w, ]+\)) VALUES \((?:\?, )*\?\)(?P<tail>[^?]*)", re.S)
_UPDATE_BY_ID_RE = re.compile(r"UPDATE (?P<table>\w+) SET (?P<set>[^;]+?) WHERE id = \?", re.S)


class PostgresTx(DeferredWrites):
    def __init__(self, conn: Any, set_wise: dict[str, str | None] | None) -> None:
        self.conn = conn
        # Its storage's set-wise forms (statement text → its form, or None), learnt as they come;
        # None: no set-wise writes, as learning a statement's parameter types takes a named
        # prepared statement, which a transaction pooler (Supabase's port 6543, no statement
        # cache) cannot keep.
        self.set_wise = set_wise
        self._ids: dict[str, collections.deque] = {}  # table → ids reserved, in order
        self._start()

    async def fetchone(self, sql: str, *args: Any) -> dict | None:
        await self._see_pending(sql)
        row = await self.conn.fetchrow(to_dollar_params(sql), *args)
        return dict(row) if row is not None else None

    async def fetchall(self, sql: str, *args: Any) -> list[dict]:
        await self._see_pending(sql)
        return [dict(r) for r in await self.conn.fetch(to_dollar_params(sql), *args)]

    async def execute(self, sql: str, *args: Any) -> int:
        await self._see_pending(sql)
        status = await self.conn.execute(to_dollar_params(sql), *args)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: str, rows: list[tuple]) -> None:
        """Many rows: one statement over arrays when the statement has a set-wise form (see
        `_set_wise_form`), else one execution per row, pipelined in one round trip."""
        if len(rows) > 1 and self.set_wise is not None:
            if sql not in self.set_wise:
                self.set_wise[sql] = await self._set_wise_form(sql)
            set_wise = self.set_wise[sql]
            # (An UPDATE joined to its rows changes a row once: one id twice goes in order.)
            if set_wise is not None and not (set_wise.startswith("UPDATE") and
                                             len({row[-1] for row in rows}) < len(rows)):
                await self.conn.execute(set_wise, *(list(column) for column in zip(*rows)))
                return
        await self.conn.executemany(to_dollar_params(sql), rows)

    async def _set_wise_form(self, sql: str) -> str | None:
        """The form of `sql` run once over arrays (one per parameter, typed as Postgres infers
        them): `INSERT ... VALUES (?, ...)` reads the rows from unnest(); `UPDATE t SET ...
        WHERE id = ?` joins them. Each row of a statement run per row costs Postgres an
        execution of its own; this costs one for all."""
        insert = _INSERT_VALUES_RE.fullmatch(sql)
        update = _UPDATE_BY_ID_RE.fullmatch(sql)
        if insert is None and update is None:
            return None
        stmt = await self.conn.prepare(to_dollar_params(sql))
        types = [t.name for t in stmt.get_parameters()]
        arrays = ", ".join(f"${n}::{t}[]" for n, t in enumerate(types, start=1))
        if insert is not None:
            return f"{insert['head']} SELECT * FROM unnest({arrays}){insert['tail']}"
        columns = ", ".join(f"c{n}" for n in range(1, len(types) + 1))
        parts = update["set"].split("?")
        assignments = parts[0] + "".join(f"u.c{n}{part}" for n, part in enumerate(parts[1:], 1))
        return (f"UPDATE {update['table']} SET {assignments} FROM unnest({arrays}) "
                f"AS u({columns}) WHERE {update['table']}.id = u.c{len(types)}")

    @staticmethod
    def any_of(column: str, values: list) -> tuple[str, list]:
        return f"{column} = ANY(?)", [list(values)]  # one statement text whatever the count

    @staticmethod
    def rows_of(types: tuple[str, ...], rows: list[tuple]) -> tuple[str, list]:
        # One array per column: one statement text whatever the count.
        return (f"SELECT * FROM unnest({', '.join(f'?::{t}[]' for t in types)})",
                [list(column) for column in zip(*rows)])

    async def lock_keys(self, keys: list[str]) -> None:
        # Transaction-scoped advisory locks on 64-bit hashes, taken in one order (no deadlock
        # between two batches; a hash collision only makes one wait for the other).
        hashed = sorted({int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(),
                                        "big", signed=True) for k in keys})
        if hashed:
            await self.conn.execute("SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) "
                                    "AS k", hashed)

    async def stock_ids(self, wanted: Mapping[str, int]) -> None:
        """Ids from the tables' sequences, for several tables in one statement (ids reserved but
        not used are gaps, as sequences leave anyway)."""
        wanted = {table: n for table, n in wanted.items() if n > 0}
        if wanted:
            for row in await self.conn.fetch(
                    "SELECT w.t, nextval(pg_get_serial_sequence(w.t, 'id')) AS id "
                    "FROM unnest($1::text[], $2::int[]) AS w(t, n), generate_series(1, w.n) "
                    "ORDER BY id", list(wanted), list(wanted.values())):
                self._ids.setdefault(row["t"], collections.deque()).append(row["id"])

    async def new_id(self, table: str) -> int:
        if not self._ids.get(table):
            await self.stock_ids({table: 1})
        return self._ids[table].popleft()

    @contextlib.asynccontextmanager
    async def savepoint(self):
        await self.flush()
        try:
            async with self.conn.transaction():
                yield self
        except BaseException:
            self._discard()
            raise


class PostgresStorage(Storage):
    """Postgres (and Supabase) through an asyncpg pool."""

    dialect = "postgres"

    def skip_locked(self, alias: str) -> str:
        return f" FOR UPDATE OF {alias} SKIP LOCKED"

    def bucket(self, expr: str, seconds: int) -> str:
        return f"FLOOR({expr} / {seconds})::BIGINT"  # a plain cast would round, not floor

    def blob_contains(self, column: str) -> str:
        return f"position(?::bytea in {column}) > 0"
    MIGRATION_LOCK = 7_405_119_213  # pg_advisory_xact_lock key: one migrator at a time

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        cache_size = None
        kept = []
        for key, value in query:
            if key == "statement_cache_size":
                cache_size = _parse_int("statement_cache_size", value, 0, 100_000)
            else:
                kept.append((key, value))
        if cache_size is None:
            # Supabase's transaction pooler (port 6543) cannot keep prepared statements.
            cache_size = 0 if parts.port == 6543 else 100
        self.statement_cache_size = cache_size
        self.set_wise: dict[str, str | None] = {}  # statement text → its set-wise form, or None
        self.dsn = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept)))
        self.pool = None
        self._pending: dict[Any, list] = {}  # batched kind → [(item, future)] waiting
        self._in_flight: dict[Any, int] = {}  # batched kind → transactions running
        self._spread: dict[Any, bool] = {}  # batched kind → share the waiting items out
        self._idle: dict[Any, int] = {}  # batched kind → its flushes between two batches
        self._flushes: set[asyncio.Task] = set()

    def location(self) -> str:
        parts = urllib.parse.urlsplit(self.dsn)  # no password, no query (it may hold one)
        user = f"{parts.username}@" if parts.username else ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{user}{parts.hostname or ''}{port}{parts.path}"

    async def connect(self) -> None:
        import asyncpg

        try:
            self.pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=10, statement_cache_size=self.statement_cache_size,
                command_timeout=30, reset=self._keep_session)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError,
                asyncpg.InterfaceError) as exc:
            where = urllib.parse.urlsplit(self.dsn)  # no password in the message
            raise ConfigError(f"DATABASE_URL: cannot connect to Postgres at {where.hostname}:"
                              f"{where.port or 5432}{where.path} ({exc}).") from None

    @staticmethod
    async def _keep_session(conn: Any) -> None:
        """The pool's reset of a released connection. asyncpg has already rolled back any open
        transaction; WhatsTracking keeps no session state (no LISTEN, session SET, session
        advisory lock or cursor), so the default `RESET ALL` round trip is skipped."""

    async def close(self) -> None:
        if self._flushes:  # batched items already accepted are committed first
            await asyncio.gather(*self._flushes, return_exceptions=True)
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def fetchone(self, sql: str, *args: Any) -> dict | None:
        row = await self.pool.fetchrow(to_dollar_params(sql), *args)
        return dict(row) if row is not None else None

    async def fetchall(self, sql: str, *args: Any) -> list[dict]:
        return [dict(r) for r in await self.pool.fetch(to_dollar_params(sql), *args)]

    async def transact(self, fn: Callable[[Tx], Awaitable[Any]]) -> Any:
        if self.pool is None:
            raise StorageError("the database is closed")
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                tx = PostgresTx(conn, self.set_wise if self.statement_cache_size > 0 else None)
                value = await fn(tx)
                await tx.flush()
                return value

    async def submit(self, run: Callable[[Tx, list], Awaitable[list]], item: Any,
                     spread: bool = False) -> Any:
        """Items wait while POSTGRES_BATCHES_IN_FLIGHT transactions of their kind run; the next
        free one takes all that wait (up to BATCH_MAX), or with `spread` its share of them. Under
        no load an item goes at once."""
        if self.pool is None:
            raise StorageError("the database is closed")
        future = asyncio.get_running_loop().create_future()
        self._pending.setdefault(run, []).append((item, future))
        self._spread[run] = spread or getattr(run, "spread", False)
        if self._in_flight.get(run, 0) < POSTGRES_BATCHES_IN_FLIGHT:
            self._in_flight[run] = self._in_flight.get(run, 0) + 1
            self._idle[run] = self._idle.get(run, 0) + 1
            task = asyncio.create_task(self._flush(run))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        return await future

    async def _attempt(self, run: Callable[[Tx, list], Awaitable[list]], items: list) -> list:
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                tx = PostgresTx(conn, self.set_wise if self.statement_cache_size > 0 else None)
                results = await run(tx, items)
                await tx.flush()
                return results

    async def _flush(self, run: Callable[[Tx, list], Awaitable[list]]) -> None:
        import asyncpg

        retryable = (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError,
                     asyncpg.SerializationError)
        pending = self._pending[run]
        idle = True  # this flush is counted in self._idle while it is between batches
        try:
            while pending:
                # Spread: an equal share of what waits among the flushes about to take some, so
                # no item waits behind one long batch while another transaction has few.
                size = (min(BATCH_MAX, -(-len(pending) // self._idle[run]))
                        if self._spread[run] else BATCH_MAX)
                chunk = pending[:size]
                del pending[:size]
                self._idle[run] -= 1
                idle = False
                try:
                    values = await self._run_isolated(functools.partial(self._attempt, run),
                                                      [item for item, _ in chunk], retryable)
                except Exception as exc:  # noqa: BLE001 - e.g. the pool is closing
                    values = [exc] * len(chunk)
                for (_, future), value in zip(chunk, values):
                    if future.done():
                        continue
                    if isinstance(value, BaseException):
                        future.set_exception(value)
                    else:
                        future.set_result(value)
                self._idle[run] += 1
                idle = True
        finally:
            self._in_flight[run] -= 1
            if idle:
                self._idle[run] -= 1
            if not self._in_flight[run] and not pending:  # a kind not waiting keeps no keys
                for state in (self._pending, self._in_flight, self._spread, self._idle):
                    state.pop(run, None)

    async def lock_migrations(self, tx: Tx) -> None:
        # Several processes may start at once: one migrates, the others wait and find it done.
        await tx.execute(f"SELECT pg_advisory_xact_lock({self.MIGRATION_LOCK})")


# ##################################################################################################
# Domain: companies and tokens
# ##################################################################################################

COMPANY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
ID_RULE = "1-64 letters, digits, '-', '_' or '.'"  # COMPANY_ID_RE (and CONNECTION_ID_RE) in words


@dataclasses.dataclass(frozen=True)
class Company:
    id: str
    name: str
    settings: dict
    evolution_url: str | None
    evolution_key: str | None
    webhook_secret: str  # its SHA-256 (hash_token): the secret itself is shown once, when made
    signing_key: str | None = None  # HMAC key of onboarding links, made on first use

    @classmethod
    def from_row(cls, row: dict) -> "Company":
        settings = dict(DEFAULT_SETTINGS)
        settings.update(loads_or(row["settings"], {}))
        return cls(row["id"], row["name"], settings, row["evolution_url"], row["evolution_key"],
                   row["webhook_secret"], row.get("signing_key"))

    def public(self) -> dict:
        """The company as its token holders see it: secrets are write-only."""
        settings = dict(self.settings)
        settings.pop("operator_urls", None)  # the operator's record (see outbound URLs)
        for destination, fields in DESTINATION_FIELDS.items():
            if isinstance(settings.get(destination), dict):
                stored = settings[destination]
                shown = {k: v for k, v in stored.items() if not fields.get(k)}
                shown.update({f"{k}_set": bool(stored.get(k)) for k, secret in fields.items()
                              if secret})
                settings[destination] = shown
        return {"company_id": self.id, "name": self.name, **settings,
                "google_ads_conversion_names": google_ads_conversion_names(self),
                "evolution_url": self.evolution_url,
                "evolution_key_set": bool(self.evolution_key)}


def google_ads_conversions(company: Company) -> dict[str, str]:
    """Our event name → the Google Ads conversion action the export writes for it."""
    conversions = {**DEFAULT_GOOGLE_ADS_CONVERSIONS,
                   **(company.settings.get("google_ads_conversions") or {})}
    return {event: name for event, name in conversions.items() if name}


def google_ads_conversion_names(company: Company) -> list[str]:
    """The conversion names the Google Ads export knows for this company, in event order."""
    return list(dict.fromkeys(google_ads_conversions(company).values()))


async def get_company(db: Storage, company_id: str) -> Company | None:
    row = await db.fetchone("SELECT * FROM companies WHERE id = ?", company_id)
    return Company.from_row(row) if row else None


async def companies_by_id(tx: Tx, company_ids: set[str]) -> dict[str, Company]:
    """The companies of a batch's items, read in one statement; unknown ids are left out."""
    where, args = tx.any_of("id", list(company_ids))
    return {row["id"]: Company.from_row(row)
            for row in await tx.fetchall(f"SELECT * FROM companies WHERE {where}", *args)}


def _validate_destination(name: str, value: Any, current: Any) -> dict | None:
    """A destination's settings merged over the current ones (secrets stay unless replaced;
    a null field removes it; null as a whole removes the destination)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Refused(400, f"{name} must be an object or null")
    merged = dict(current) if isinstance(current, dict) else {}
    for key, field in value.items():
        where = f"{name}.{key}"
        if key not in DESTINATION_FIELDS[name]:
            raise Refused(400, f"Unknown field: {where}")
        if field is None:
            merged.pop(key, None)
        elif key == "enabled":
            if not isinstance(field, bool):
                raise Refused(400, f"{where} must be true or false")
            merged[key] = field
        elif key == "event_names":
            valid = isinstance(field, dict) and all(
                isinstance(k, str) and (v is None or isinstance(v, (str, dict)))
                for k, v in field.items())
            if not valid:
                raise Refused(400, f"{where} must map event names to platform event names")
            merged[key] = field
        elif key == "url":
            if (not isinstance(field, str) or not re.match(r"^https?://\S+\Z", field)
                    or len(field) > 1024):
                raise Refused(400, f"{where} must be an http(s) URL")
            merged[key] = field
        elif key == "conversion_actions":  # our event name → a Google Ads conversion action id
            valid = isinstance(field, dict) and all(
                k in EVENT_NAMES and (v is None or (
                    isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 20) or (
                    whole_number(v) is not None and 0 <= whole_number(v) < 10 ** 20))
                for k, v in field.items())
            if not valid:
                raise Refused(400, f"{where} must map event names ({', '.join(EVENT_NAMES)}) "
                                   "to conversion action ids (digits)")
            actions = {k: v if isinstance(v, str) else str(whole_number(v))
                       for k, v in field.items() if v is not None}
            if actions:
                merged[key] = actions
            else:
                merged.pop(key, None)
        elif key in ("customer_id", "login_customer_id"):  # Google Ads ids: 123-456-7890
            if isinstance(field, bool) or not isinstance(field, (str, int)) \
                    or not re.match(r"^[ -]*(?:[0-9][ -]*){10}\Z", str(field)):
                raise Refused(400, f"{where} must be a Google Ads customer id like 123-456-7890")
            merged[key] = digits(str(field))
        elif key == "service_account_key":  # the JSON key file of a Google Cloud service account
            valid = (isinstance(field, dict) and len(field) <= 20
                     and isinstance(field.get("client_email"), str)
                     and 1 <= len(field["client_email"]) <= 320
                     and isinstance(field.get("private_key"), str)
                     and 1 <= len(field["private_key"]) <= 8192)
            if not valid:
                raise Refused(400, f"{where} must be a service account's JSON key (an object "
                                   "with client_email and private_key)")
            merged[key] = json_dumps(field)
        else:
            if not isinstance(field, str) or not field.strip() or len(field) > 1024:
                raise Refused(400, f"{where} must be non-empty text")
            merged[key] = field.strip()
    return merged


def _validate_mapping(key: str, value: Any, allowed: tuple[str, ...] | None) -> dict:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and k and (v is None or isinstance(v, str))
            for k, v in value.items()):
        raise Refused(400, f"{key} must be an object of names")
    if allowed is not None:
        for k, v in value.items():
            if v is not None and v not in allowed:
                raise Refused(400, f"{key}: {v!r} is not one of {', '.join(allowed)}")
    return {k: v for k, v in value.items() if v is not None}


def validate_settings(patch: Mapping[str, Any], current: Mapping[str, Any] | None = None) -> dict:
    """Check company settings; return them normalised or Refused(400) naming the field."""
    current = current or {}
    out: dict[str, Any] = {}
    for key, value in patch.items():
        if key in DESTINATION_FIELDS:
            out[key] = _validate_destination(key, value, current.get(key))
        elif key == "label_events":
            out[key] = _validate_mapping(key, value, FOLLOW_UP_EVENTS)
        elif key == "chat_rules":  # (see "Domain: chat rules")
            out[key] = validate_chat_rules(value)
        elif key == "google_ads_conversions":
            out[key] = _validate_mapping(key, value, None)
        elif key == "allowed_origins":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise Refused(400, "allowed_origins must be a list of origins")
            for origin in value:
                if origin != "*" and not re.match(r"^https?://[^/\s]+/?\Z", origin):
                    raise Refused(400, f"allowed_origins: {origin!r} is not an origin "
                                       "like https://example.com")
            out[key] = [o.rstrip("/") for o in value]
        elif key == "code_mode":
            if value not in ("visible", "invisible", "both"):
                raise Refused(400, "code_mode must be visible, invisible or both")
            out[key] = value
        elif key == "code_template":
            if not isinstance(value, str) or "{code}" not in value or len(value) > 64:
                raise Refused(400, "code_template must be text of at most 64 characters "
                                   "containing {code}")
            out[key] = value
        elif key in ("attribution_window_days", "window_minutes"):
            high = 365 if key == "attribution_window_days" else 1440
            value = whole_number(value)
            if value is None or not 1 <= value <= high:
                raise Refused(400, f"{key} must be a whole number from 1 to {high}")
            out[key] = value
        elif key in ("store_first_message", "window_match", "webhook_auth_required"):
            if not isinstance(value, bool):
                raise Refused(400, f"{key} must be true or false")
            out[key] = value
        elif key == "timezone":
            try:
                zoneinfo.ZoneInfo(value)
            except (zoneinfo.ZoneInfoNotFoundError, TypeError, ValueError):
                raise Refused(400, "timezone must be an IANA name like America/Sao_Paulo"
                              ) from None
            out[key] = value
        elif key == "currency":
            if not isinstance(value, str) or not CURRENCY_RE.match(value):
                raise Refused(400, "currency must be a three-letter ISO 4217 code")
            out[key] = value.upper()
        else:
            raise Refused(400, f"Unknown field: {key}")
    return out


def validate_evolution(patch: Mapping[str, Any]) -> dict:
    out = {}
    if "evolution_url" in patch:
        url = patch["evolution_url"]
        if url is not None and (not isinstance(url, str)
                                or not re.match(r"^https?://\S+\Z", url) or len(url) > 512):
            raise Refused(400, "evolution_url must be an http(s) URL or null")
        out["evolution_url"] = url.rstrip("/") if url else None
    if "evolution_key" in patch:
        key = patch["evolution_key"]
        if key is not None and (not isinstance(key, str) or not key or len(key) > 512):
            raise Refused(400, "evolution_key must be text or null")
        out["evolution_key"] = key or None
    return out


async def create_company(db: Storage, company_id: str, name: str, settings: Mapping | None = None,
                         evolution_url: str | None = None,
                         evolution_key: str | None = None) -> dict:
    """Create a company with a first API token; return the secrets (shown once)."""
    token = new_secret("wt_")
    webhook_secret = new_secret("whs_")
    t = now()

    async def run(tx: Tx) -> bool:
        if await tx.fetchone("SELECT id FROM companies WHERE id = ?", company_id):
            return False
        await tx.execute(
            "INSERT INTO companies (id, name, settings, evolution_url, evolution_key, "
            "webhook_secret, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            company_id, name, json_dumps(dict(settings or {})), evolution_url, evolution_key,
            hash_token(webhook_secret), t, t)
        await tx.execute("INSERT INTO api_tokens (company_id, name, token_hash, created_at) "
                         "VALUES (?, ?, ?, ?)", company_id, "default", hash_token(token), t)
        return True

    if not await db.transact(run):
        raise Refused(409, f"Company {company_id} already exists")
    return {"company_id": company_id, "name": name, "token": token,
            "webhook_secret": webhook_secret}


TOKEN_NAME_MAX = 100
# Seconds: a token's last_used_at is written at most once a minute per process (see TokenUses).
TOKEN_USE_INTERVAL = 60


def token_json(row: Mapping[str, Any]) -> dict:
    """An API token as it is listed: never its value (only its hash is stored)."""
    return {"id": row["id"], "name": row["name"], "created_at": iso(row["created_at"]),
            "last_used_at": iso(row["last_used_at"])}


async def create_token(db: Storage, company_id: str, name: str | None = None) -> dict:
    """Make an API token for a company: {id, name, created_at, token}, the value shown once."""
    token = new_secret("wt_")

    async def run(tx: Tx) -> dict | None:
        if not await tx.fetchone("SELECT id FROM companies WHERE id = ?", company_id):
            return None
        return await tx.fetchone(
            "INSERT INTO api_tokens (company_id, name, token_hash, created_at) "
            "VALUES (?, ?, ?, ?) RETURNING id, name, created_at", company_id, name,
            hash_token(token), now())

    row = await db.transact(run)
    if row is None:
        raise Refused(404, "Company not found")
    return {"id": row["id"], "name": row["name"], "created_at": iso(row["created_at"]),
            "token": token}


async def add_token(db: Storage, company_id: str, name: str | None = None) -> str:
    return (await create_token(db, company_id, name))["token"]


async def company_tokens(db: Storage, company_id: str) -> list[dict]:
    rows = await db.fetchall("SELECT id, name, created_at, last_used_at FROM api_tokens "
                             "WHERE company_id = ? ORDER BY id", company_id)
    return [token_json(r) for r in rows]


async def revoke_token(db: Storage, company_id: str, token_id: int) -> bool:
    """Delete a company's token (refused at once everywhere: every request reads the tokens);
    False when the company has no such token."""
    return bool(await db.transact(lambda tx: tx.execute(
        "DELETE FROM api_tokens WHERE id = ? AND company_id = ?", token_id, company_id)))


async def token_row(db: Storage, token: str) -> dict | None:
    """The token's {id, company_id}, read from the database on every request, so a revoked
    token is refused at once by every process. It is compared by its SHA-256 through the unique
    index; timing reveals nothing about the token itself."""
    return await db.fetchone("SELECT id, company_id FROM api_tokens WHERE token_hash = ?",
                             hash_token(token))


class TokenUses:
    """When this process last wrote each token's last_used_at (token id → monotonic seconds):
    a use is recorded at most once per TOKEN_USE_INTERVAL, not a write per request."""

    def __init__(self, interval: float = TOKEN_USE_INTERVAL, max_keys: int = 50_000) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self.written: dict[int, float] = {}

    def due(self, token_id: int) -> bool:
        """Whether this use is to be written (and if so, it counts as written from now)."""
        t = time.monotonic()
        last = self.written.get(token_id)
        if last is not None and t - last < self.interval:
            return False
        if len(self.written) >= self.max_keys:
            self.written.clear()  # tokens are few; this only bounds memory
        self.written[token_id] = t
        return True


async def note_token_use(db: Storage, token_id: int) -> None:
    """Record a token's use now; the UPDATE only moves last_used_at forward (another process
    may have written a later time meanwhile)."""
    t = now()
    await db.transact(lambda tx: tx.execute(
        "UPDATE api_tokens SET last_used_at = ? WHERE id = ? "
        "AND (last_used_at IS NULL OR last_used_at < ?)", t, token_id, t))


# ##################################################################################################
# Domain: tracking codes
#
# Crockford base32 (no I, L, O, U), six random characters and a check character: the weighted sum
# of the values with odd weights modulo 32, so any single mistyped character changes the check and
# the code is rejected instead of matching somebody else. I and L read as 1, O as 0.
# ##################################################################################################

_CODE_VALUE = {c: i for i, c in enumerate(CROCKFORD)}
_CODE_ALIASES = str.maketrans({"I": "1", "L": "1", "O": "0"})
_INVISIBLE_RE = re.compile(f"{ZW_FRAME}([{ZW_ZERO}{ZW_ONE}]{{35}}){ZW_FRAME}")
_REF_CODE_RE = re.compile(r"ref\W{0,3}([0-9a-z]{7})(?![0-9a-z])", re.IGNORECASE)
_TOKEN_RE = re.compile(r"(?<![0-9A-Za-z])([0-9A-Za-z]{7})(?![0-9A-Za-z])")


def code_check(body: str) -> str:
    return CROCKFORD[sum((2 * i + 1) * _CODE_VALUE[c] for i, c in enumerate(body)) % 32]


_BYTE_TO_CROCKFORD = bytes(ord(CROCKFORD[b & 31]) for b in range(256))  # 256 % 32 == 0: uniform


def new_code() -> str:
    # One os.urandom call per code (a getrandom system call, ~0.4 µs): no pool of bytes kept
    # between calls, so no state a fork could share.
    body = os.urandom(CODE_BODY_LEN).translate(_BYTE_TO_CROCKFORD).decode()
    return body + code_check(body)


def normalize_code(text: Any) -> str | None:
    """The canonical code for ``text``, or None if it is not a well-formed code."""
    if not isinstance(text, str) or len(text) != CODE_BODY_LEN + 1:
        return None
    code = text.upper().translate(_CODE_ALIASES)
    if any(c not in _CODE_VALUE for c in code):
        return None
    return code if code_check(code[:-1]) == code[-1] else None


def invisible_code(code: str) -> str:
    bits = "".join(format(_CODE_VALUE[c], "05b") for c in code)
    return ZW_FRAME + bits.replace("0", ZW_ZERO).replace("1", ZW_ONE) + ZW_FRAME


def message_code(code: str, mode: str = "both", template: str = "[ref {code}]") -> str:
    """What tracker.js appends to a WhatsApp message (the server's copy, used by tests and docs)."""
    visible = template.replace("{code}", code)
    if mode == "visible":
        return visible
    if mode == "invisible":
        return invisible_code(code)
    return visible + invisible_code(code)


def find_codes(text: str) -> list[str]:
    """Well-formed codes in a message, most trustworthy first: the invisible copy, a code after
    "ref", then any seven-character word that passes the check."""
    found: list[str] = []
    for match in _INVISIBLE_RE.finditer(text):
        bits = match.group(1).replace(ZW_ZERO, "0").replace(ZW_ONE, "1")
        code = "".join(CROCKFORD[int(bits[i:i + 5], 2)] for i in range(0, 35, 5))
        if normalize_code(code):
            found.append(code)
    for regex in (_REF_CODE_RE, _TOKEN_RE):
        for match in regex.finditer(text):
            code = normalize_code(match.group(1))
            if code:
                found.append(code)
    return list(dict.fromkeys(found))


# ##################################################################################################
# Domain: website tracking
# ##################################################################################################

def _clean(value: Any, field: str, limit: int = FIELD_MAX, numbers: bool = True) -> str | None:
    """Trimmed text or None; a number becomes text where `numbers` (attribution values)."""
    if value is None:
        return None
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise Refused(400, f"{field} must be a string")
    value = value.strip()
    if len(value) > limit:
        raise Refused(400, f"{field} is longer than {limit} characters")
    return value or None


def _touch_from(source: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    touch = {}
    for key in TOUCH_KEYS:
        value = source.get(key)
        if value is not None:  # (most keys are absent: no call for them)
            value = _clean(value, prefix + key, URL_FIELD_MAX if key in URL_KEYS else FIELD_MAX)
            if value is not None:
                touch[key] = value
    return touch


_CAMPAIGN_KEY_SET = frozenset(CAMPAIGN_KEYS)
_VISITOR_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+\Z")


def _url_params(url: str | None, known: Mapping[str, str] = {}) -> dict[str, str]:
    """UTM tags and click ids in the query of `url` that `known` does not have yet (the first
    occurrence of each, like parse_qsl but reading only the keys wanted)."""
    query = url.partition("?")[2].partition("#")[0] if url else ""
    params: dict[str, str] = {}
    for pair in query.split("&") if query else ():
        key, _, value = pair.partition("=")
        if "%" in key or "+" in key:
            key = urllib.parse.unquote_plus(key)
        if key in _CAMPAIGN_KEY_SET and key not in known and key not in params and value:
            value = urllib.parse.unquote_plus(value) if "%" in value or "+" in value else value
            if value:
                params[key] = value[:FIELD_MAX]
    return params


@dataclasses.dataclass
class TrackingInput:
    company_id: str
    event: str
    visitor_id: str | None
    code: str | None
    touch: dict  # attribution of this request (last touch as the browser knows it)
    first_touch: dict | None
    whatsapp_phone: str | None
    user_agent: str | None = None  # kept on the visit: Meta needs it for website events
    origin: str | None = None  # the request's Origin header, checked against allowed_origins


def parse_tracking(body: Any) -> TrackingInput:
    if not isinstance(body, dict):
        raise Refused(400, "Body must be a JSON object")
    for key in ("company_id", "companie_id"):  # the second: the tracker's original spelling
        if key in body and (not isinstance(body[key], str) or not body[key].strip()):
            raise Refused(400, f"{key} is required")
    company_id = body.get("company_id", body.get("companie_id"))
    if company_id is None:
        raise Refused(400, "company_id is required")
    event = body.get("event")
    if event is None:
        event = "pageview"
    elif event not in ("pageview", "whatsapp_click"):
        raise Refused(400, "event must be pageview or whatsapp_click")
    visitor_id = _clean(body.get("visitor_id"), "visitor_id", 64, numbers=False)
    if visitor_id is not None and not _VISITOR_ID_RE.match(visitor_id):
        raise Refused(400, "visitor_id may only hold letters, digits, '-', '_' and '.'")
    raw_code = _clean(body.get("code"), "code", 64, numbers=False)
    touch = _touch_from(body)
    if "page_url" in touch:
        touch.update(_url_params(touch["page_url"], touch))
    first = body.get("first_touch")
    if first is not None and not isinstance(first, dict):
        raise Refused(400, "first_touch must be an object")
    first_touch = None
    if first:
        first_touch = _touch_from(first, "first_touch.")
        ts = first.get("ts")
        if ts is not None:
            if not isinstance(ts, (int, float)) or isinstance(ts, bool):
                raise Refused(400, "first_touch.ts must be a number (milliseconds)")
            first_touch["ts"] = ts
    phone = _clean(body.get("whatsapp_phone"), "whatsapp_phone", 64)
    return TrackingInput(company_id.strip(), event, visitor_id,
                         normalize_code(raw_code) if raw_code else None, touch, first_touch,
                         digits(phone) or None)


def _campaign(touch: Mapping[str, Any]) -> tuple:
    return tuple(touch.get(k) for k in CAMPAIGN_KEYS)


def _next_last_touch(stored: dict | None, touch: dict) -> tuple[dict, bool]:
    """The visit's last touch after this request, and whether a new campaign replaced it."""
    if any(touch.get(k) for k in CAMPAIGN_KEYS) and (
            stored is None or _campaign(touch) != _campaign(stored)):
        new = dict(touch)
        new.setdefault("landing_page", touch.get("page_url"))
        return new, True
    if stored is None:
        new = dict(touch)
        new.setdefault("landing_page", touch.get("page_url"))
        return new, False
    merged = dict(stored)
    for key in COOKIE_KEYS:  # cookies appear later (consent banners); keep them once seen
        if touch.get(key) and not merged.get(key):
            merged[key] = touch[key]
    return merged, False


def origin_allowed(company: Company, origin: str | None) -> bool:
    allowed = company.settings["allowed_origins"]
    return (not origin or not allowed or "*" in allowed or origin.rstrip("/") in allowed)


# The report's visit counters (table visit_rollup): each visit counts once per dimension, in
# the row of its 15-minute bucket and its value of that dimension; as clicked (clicks > 0) and as
# matched (clicked and brought a lead). One row per dimension and value, not per combination, so
# the rows stay few however many campaigns run. Every write that changes a visit updates the
# counters in the same transaction, by the difference between its contribution before and after.
ROLLUP_DIMENSIONS = ("", "utm_source", "utm_medium", "utm_campaign", "click_phone")
ROLLUP_UPSERT = (
    "INSERT INTO visit_rollup (company_id, dimension, value, bucket, visits, clicks, matched) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (company_id, dimension, bucket, value) "
    "DO UPDATE SET visits = visit_rollup.visits + excluded.visits, "
    "clicks = visit_rollup.clicks + excluded.clicks, "
    "matched = visit_rollup.matched + excluded.matched")


def rollup_count(tx: Tx, visit: Mapping[str, Any], sign: int) -> None:
    """Add (sign 1) or take away (sign -1) `visit`'s contribution to the report counters. The
    transaction sums them per counter row and writes each row once, just before COMMIT."""
    bucket = int(visit["created_at"] // ROLLUP_BUCKET)
    clicked = sign if visit["clicks"] > 0 else 0
    matched = clicked if visit["lead_id"] is not None else 0
    for dimension in ROLLUP_DIMENSIONS:
        key = (visit["company_id"], dimension, (visit[dimension] or "") if dimension else "",
               bucket)
        tx.add(ROLLUP_UPSERT, key, (sign, clicked, matched))


async def rebuild_rollup(db: Storage) -> int:
    """Recount visit_rollup from the visits (after visits were changed by hand); returns rows."""
    fill, = db.migration_statements(ROLLUP_FILL)

    async def run(tx: Tx) -> int:
        await tx.execute("DELETE FROM visit_rollup")
        await tx.execute(fill)
        return (await tx.fetchone("SELECT COUNT(*) AS n FROM visit_rollup"))["n"]

    return await db.transact(run)


VISIT_COLUMNS = ("id", "company_id", "visitor_id", "code", "expires_at", "utm_source",
                 "utm_medium", "utm_campaign", "last_touch", "first_touch", "pageviews", "clicks",
                 "clicked_at", "click_phone", "lead_id", "created_at", "updated_at", "user_agent")
_VISIT_CHANGES = ("expires_at", "utm_source", "utm_medium", "utm_campaign", "last_touch",
                  "pageviews", "clicks", "clicked_at", "click_phone", "user_agent", "updated_at")
VISIT_TYPES = ("bigint", "text", "text", "text", "float8", "text", "text", "text", "text", "text",
               "int", "int", "float8", "text", "bigint", "float8", "float8", "text")
VISIT_UPDATE = f"UPDATE visits SET {' = ?, '.join(_VISIT_CHANGES)} = ? WHERE id = ?"
TRACKING_EVENT_INSERT = (
    "INSERT INTO tracking_events (company_id, visit_id, event, page_url, referrer, utm_source, "
    "utm_medium, utm_campaign, whatsapp_phone, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


async def _known_visits(tx: Tx, items: list[TrackingInput], companies: Mapping[str, Any]
                        ) -> tuple[dict, dict]:
    """The stored visits the items may continue: by (company, code) and the latest by (company,
    visitor)."""
    by_code: dict[tuple, dict] = {}
    latest: dict[tuple, dict] = {}
    for company_id in companies:
        codes = list({t.code for t in items if t.company_id == company_id and t.code})
        visitors = list({t.visitor_id for t in items
                         if t.company_id == company_id and t.visitor_id})
        # One lookup per column: a single `code IN (...) OR visitor_id IN (...)` is planned by
        # SQLite as a scan of all the company's visits.
        for column, values in (("code", codes), ("visitor_id", visitors)):
            if not values:
                continue
            where, args = tx.any_of(column, values)
            for row in await tx.fetchall(f"SELECT * FROM visits WHERE company_id = ? AND {where}",
                                         company_id, *args):
                by_code[(company_id, row["code"])] = row
                key = (company_id, row["visitor_id"])
                if key not in latest or latest[key]["id"] < row["id"]:
                    latest[key] = row
    return by_code, latest


async def insert_visits(tx: Tx, visits: list[dict]) -> None:
    """Insert new visits in one statement. A code somebody else holds (one not read, as a new
    random code among many stored ones may be, or one a concurrent transaction just took) is
    replaced by a new one and that visit inserted again: the others are not run again."""
    while visits:
        rows, args = tx.rows_of(VISIT_TYPES, [tuple(v[c] for c in VISIT_COLUMNS) for v in visits])
        inserted = {row["id"] for row in await tx.fetchall(
            f"INSERT INTO visits ({', '.join(VISIT_COLUMNS)}) {rows} "
            "ON CONFLICT (company_id, code) DO NOTHING RETURNING id", *args)}
        visits = [v for v in visits if v["id"] not in inserted]
        for visit in visits:
            visit["code"] = new_code()


@dataclasses.dataclass(slots=True)
class TrackingBatch:
    """What a tracking batch read (prefetch) and what its items made (apply), to write."""
    ts: float
    companies: dict[str, Company]
    by_code: dict[tuple, dict]  # visits by (company, code), the batch's new ones too
    latest: dict[tuple, dict]  # the latest visit by (company, visitor)
    new_visits: list[dict] = dataclasses.field(default_factory=list)
    changed: dict[int, dict] = dataclasses.field(default_factory=dict)  # stored visits, by id
    events: list[tuple] = dataclasses.field(default_factory=list)  # (item, visit)


async def _tracking_prefetch(tx: Tx, items: list[TrackingInput]) -> TrackingBatch:
    companies = await companies_by_id(tx, {t.company_id for t in items})
    # One visitor's requests in concurrent batches (Postgres) go one batch after the other, each
    # reading the visit the previous one wrote.
    await tx.lock_keys([f"visitor {t.company_id} {t.visitor_id}" for t in items
                        if t.visitor_id and t.company_id in companies])
    by_code, latest = await _known_visits(tx, items, companies)
    return TrackingBatch(now(), companies, by_code, latest)


async def _tracking_apply(tx: Tx, b: TrackingBatch, t: TrackingInput) -> Any:
    """One tracking request: its visit continued or begun, with the report's counters. Items
    are applied in order, so a visitor's two requests in one batch see each other."""
    ts, by_code, latest = b.ts, b.by_code, b.latest
    company = b.companies.get(t.company_id)
    if company is None:
        return Refused(404, "Company not found")
    if not origin_allowed(company, t.origin):
        return Refused(403, "Origin not allowed")
    window = company.settings["attribution_window_days"] * 86400  # seconds
    visitor_id = t.visitor_id or uuid.uuid4().hex
    visit = None
    if t.code:
        row = by_code.get((company.id, t.code))
        if row and row["visitor_id"] == visitor_id and row["expires_at"] > ts:
            visit = row
    if visit is None and t.visitor_id:
        row = latest.get((company.id, visitor_id))
        if row and row["expires_at"] > ts:
            visit = row
    last_touch, new_campaign = _next_last_touch(
        loads_or(visit["last_touch"], None) if visit else None, t.touch)
    previous = visit
    if visit is not None and visit["lead_id"] is not None and new_campaign:
        visit = None  # this visit's code already brought a lead: a new ad click, a new code
    clicked = t.event == "whatsapp_click"
    if visit is None:
        if previous is not None:
            first_touch = loads_or(previous["first_touch"], {})
        else:
            first_touch = t.first_touch or dict(last_touch)
        # The code sent, unless somebody holds it; else a new one (made only when needed).
        code = t.code
        while code is None or (company.id, code) in by_code:
            code = new_code()
        visit = {"id": None, "company_id": company.id, "visitor_id": visitor_id,
                 "code": code, "first_touch": json_dumps(first_touch), "pageviews": 0,
                 "clicks": 0, "clicked_at": None, "click_phone": None, "lead_id": None,
                 "created_at": ts, "user_agent": None}
        b.new_visits.append(visit)
        by_code[(company.id, code)] = latest[(company.id, visitor_id)] = visit
    else:
        rollup_count(tx, visit, -1)
        if visit["id"] is not None:
            b.changed[visit["id"]] = visit
    visit.update(
        expires_at=ts + window, utm_source=last_touch.get("utm_source"),
        utm_medium=last_touch.get("utm_medium"), utm_campaign=last_touch.get("utm_campaign"),
        last_touch=json_dumps(last_touch), updated_at=ts,
        user_agent=t.user_agent or visit["user_agent"])
    if clicked:
        visit["clicks"] += 1
        visit["clicked_at"] = ts
        visit["click_phone"] = t.whatsapp_phone or visit["click_phone"]
    else:
        visit["pageviews"] += 1
    rollup_count(tx, visit, 1)
    b.events.append((t, visit))
    return (company, visit, visitor_id)


async def _tracking_write(tx: Tx, b: TrackingBatch, results: list) -> list:
    """The batch's visits and events in a few set-wise statements; then each item's (company,
    {session_id, visitor_id, code}), its visit's id known."""
    if b.new_visits:
        await tx.stock_ids({"visits": len(b.new_visits)})
        for visit in b.new_visits:
            visit["id"] = await tx.new_id("visits")
        await insert_visits(tx, b.new_visits)
    if b.changed:
        await tx.executemany(VISIT_UPDATE, [tuple(v[c] for c in _VISIT_CHANGES) + (v["id"],)
                                            for v in b.changed.values()])
    if b.events:
        await tx.executemany(TRACKING_EVENT_INSERT, [
            (visit["company_id"], visit["id"], t.event, t.touch.get("page_url"),
             t.touch.get("referrer"), t.touch.get("utm_source"), t.touch.get("utm_medium"),
             t.touch.get("utm_campaign"), t.whatsapp_phone, b.ts) for t, visit in b.events])
    return [r if isinstance(r, Exception) else
            (r[0], {"session_id": r[1]["id"], "visitor_id": r[2], "code": r[1]["code"]})
            for r in results]


# Tracking requests (Storage.submit): one (company, {session_id, visitor_id, code}) per item, or
# the error refusing it. (Handlers look the kind up by its name at call time: tests count it.)
track_batch = BatchKind("tracking", _tracking_prefetch, _tracking_apply, _tracking_write)


# ##################################################################################################
# Domain: Evolution API envelopes (see the Evolution contract, §4-§8)
# ##################################################################################################

TEXT_WRAPPERS = ("ephemeralMessage", "viewOnceMessage", "viewOnceMessageV2",
                 "viewOnceMessageV2Extension", "documentWithCaptionMessage", "editedMessage")
JID_PHONE = "@s.whatsapp.net"
JID_LID = "@lid"


def normalize_event(name: Any) -> str:
    """`messages.upsert`, `MESSAGES_UPSERT` and `messages-upsert` all become `messages.upsert`."""
    if not isinstance(name, str):
        return ""
    return name.strip().lower().replace("_", ".").replace("-", ".")


def jid_user(jid: str) -> str:
    """The user part of a JID without the device suffix: `5511...:12@s.whatsapp.net` → `5511...`."""
    return jid.split("@", 1)[0].split(":", 1)[0]


def extract_text(message: Any, depth: int = 0) -> str | None:
    """The text of a WhatsApp message in Evolution's JSON, in the contract's priority order."""
    if not isinstance(message, dict) or depth > 4:
        return None

    def text_at(*path: str) -> str | None:
        node: Any = message
        for key in path:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node if isinstance(node, str) and node else None

    for path in (("conversation",), ("extendedTextMessage", "text"),
                 ("imageMessage", "caption"), ("videoMessage", "caption"),
                 ("documentMessage", "caption"),
                 ("buttonsResponseMessage", "selectedDisplayText"),
                 ("listResponseMessage", "title"),
                 ("templateButtonReplyMessage", "selectedDisplayText"),
                 ("interactiveResponseMessage", "body", "text")):
        text = text_at(*path)
        if text:
            return text
    for wrapper in TEXT_WRAPPERS:
        inner = message.get(wrapper)
        if isinstance(inner, dict):
            text = extract_text(inner.get("message", inner), depth + 1)
            if text:
                return text
    return None


# Where a conversation began, as WhatsApp writes it in a message's contextInfo (Baileys proto
# ContextInfo). Since 2026-02 some ad clicks carry no `externalAdReply`, only these (Baileys#2354:
# ctwaPayload and conversionData are opaque bytes; nothing in them is a click id).
CONVERSION_FIELDS = ("ctwaPayload", "conversionData", "conversionSource",
                     "entryPointConversionSource")


def find_ad_context(data: Mapping[str, Any]) -> dict | None:
    """The contextInfo that carries Click-to-WhatsApp ad data, wherever this version put it: one
    with `externalAdReply` first, else one with only the opaque conversion fields."""
    candidates = [data.get("contextInfo")]
    message = data.get("message")
    if isinstance(message, dict):
        for value in message.values():
            if isinstance(value, dict):
                candidates.append(value.get("contextInfo"))
                inner = value.get("message")
                if isinstance(inner, dict):
                    candidates.extend(v.get("contextInfo") for v in inner.values()
                                      if isinstance(v, dict))
    infos = [info for info in candidates if isinstance(info, dict)]
    for info in infos:
        if isinstance(info.get("externalAdReply"), dict):
            return info
    for info in infos:
        if any(info.get(field) not in (None, "", {}) for field in CONVERSION_FIELDS):
            return info
    return None


def entry_point_is_ad(info: Mapping[str, Any]) -> bool:
    """Whether a contextInfo without `externalAdReply` says the chat began at an ad.
    `entryPointConversionSource` decides where present: `ctwa_ad` (and any `*_ad` / `*_ads`) is
    an ad; `click_to_chat_link` and `message_short_link` (wa.me links), `global_search_new_chat`
    (WhatsApp's search) and every other value are not. Without it, `ctwaPayload` (only ad clicks
    carry one) or a `conversionSource` naming ads (`FB_Ads`) is an ad; `conversionData` alone is
    not (it says nothing of where the chat began). An unknown value is never taken for an ad."""
    entry = info.get("entryPointConversionSource")
    if isinstance(entry, str) and entry.strip():
        entry = entry.strip().lower()
        return entry == "ctwa_ad" or entry.endswith(("_ad", "_ads"))
    source = info.get("conversionSource")
    return (info.get("ctwaPayload") not in (None, "", {})
            or (isinstance(source, str) and source.strip().lower().endswith(("_ad", "_ads"))))


# Messages that are no content of their own (Baileys proto Message fields): a vote on a poll, a
# reaction to a message, a protocol message (revoke, edit, ephemeral setting, history sync), a
# pin or keep. From a new contact they make no lead; there is no text to read in any of them.
NO_CONTENT = {"pollUpdateMessage": "poll vote", "reactionMessage": "reaction",
              "encReactionMessage": "reaction", "protocolMessage": "protocol message",
              "pinInChatMessage": "protocol message", "keepInChatMessage": "protocol message",
              "encEventResponseMessage": "poll vote"}
# Fields beside a message's content, never content themselves.
MESSAGE_METADATA = ("messageContextInfo", "senderKeyDistributionMessage")


def no_content(data: Mapping[str, Any]) -> str | None:
    """Why an upsert is no message of the customer's (poll vote, reaction, protocol message), or
    None. An upsert without `message`, or a media message without caption, is still one."""
    message = data.get("message")
    if not isinstance(message, dict):
        return None
    kinds = [key for key in message if key not in MESSAGE_METADATA]
    if kinds and all(key in NO_CONTENT for key in kinds):
        return NO_CONTENT[kinds[0]]
    return None


@dataclasses.dataclass
class InboundMessage:
    """One inbound private message, the same whatever source brought it (see Source): what the
    lead rules read. Parsed once per delivery; its codes are found once, here."""
    source: str  # the Source's name
    message_id: str
    # The sender, by any of IDENTITY_FORMS: phone number (given as WhatsApp writes it: kept as
    # `wa_id`, and made dialable), WhatsApp LID, business-scoped user id (BSUID, Cloud API).
    phone: str | None
    lid: str | None
    name: str | None
    text: str
    timestamp: float | None
    # A click on an ad, normalised as ad_attribution writes it (utm_source, utm_medium, ad_id,
    # ctwa_clid, ad_title, landing_page, page_url); the source's raw ad data is kept on the lead.
    ad: dict | None = None
    ad_context: dict | None = None  # the raw data (also where it says the chat began elsewhere)
    bsuid: str | None = None
    username: str | None = None  # the WhatsApp @username, without the @
    # The business's own message to the chat of the customer named by the sender fields
    # (Evolution `fromMe`, a Cloud API echo): only the chat rules read it
    # (apply_business_message); it makes no contact and no lead.
    from_business: bool = False
    wa_id: str | None = dataclasses.field(init=False)
    codes: list[str] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.wa_id = digits(self.phone) or None
        self.phone = dialable_phone(self.wa_id)
        self.codes = find_codes(self.text)


# How one person is known; any two seen together are the same contact (resolve_contact).
IDENTITY_FORMS = ("phone", "lid", "bsuid")


def parse_upsert(data: Any) -> InboundMessage | str:
    """An inbound private message, or the reason it is ignored."""
    if not isinstance(data, dict):
        return "no message data"
    key = data.get("key")
    if not isinstance(key, dict):
        return "no message key"
    message_id = key.get("id")
    if not isinstance(message_id, str) or not message_id or len(message_id) > 128:
        return "no message id"
    from_business = key.get("fromMe") is True
    chat = key.get("remoteJid")
    if not isinstance(chat, str):
        return "no chat"
    if chat.endswith("@g.us"):
        return "group"
    if chat == "status@broadcast" or chat.endswith("@broadcast"):
        return "broadcast"
    if chat.endswith("@newsletter"):
        return "newsletter"
    phone = lid = None
    for field in ("remoteJid", "remoteJidAlt", "senderPn", "previousRemoteJid", "senderLid"):
        jid = key.get(field)
        if not isinstance(jid, str):
            continue
        if phone is None and jid.endswith(JID_PHONE):
            phone = digits(jid_user(jid)) or None
        elif lid is None and jid.endswith(JID_LID):
            lid = jid_user(jid) or None
    if phone is None and lid is None:
        return "unknown sender"
    stub = no_content(data)
    if stub:
        return stub
    name = data.get("pushName")
    name = name[:200] if isinstance(name, str) and name else None
    # Out of range (1e308, -1e18, years ahead): the receipt time is used; the stored raw body
    # keeps the value sent.
    timestamp = plausible_time(data.get("messageTimestamp"))
    if from_business:  # (its pushName is the business's own; an ad is the customer's click)
        return InboundMessage("evolution", message_id, phone, lid, None,
                              extract_text(data.get("message")) or "", timestamp,
                              from_business=True)
    ad_context = find_ad_context(data)
    return InboundMessage("evolution", message_id, phone, lid, name,
                          extract_text(data.get("message")) or "", timestamp,
                          ad_attribution(ad_context) if ad_context else None, ad_context)


def ad_attribution(info: Mapping[str, Any]) -> dict | None:
    """The ad click of a contextInfo (see InboundMessage.ad), or None when it is no ad click.
    With `externalAdReply`: its ad id, title, URL and click id. Without (the opaque fields only):
    `entry_point_is_ad` decides, and the lead is a `ctwa` lead with no ad id and no click id
    (its raw contextInfo is kept on the lead); nothing is read out of the opaque bytes."""
    ad = info.get("externalAdReply")
    if not isinstance(ad, dict):
        if not entry_point_is_ad(info):
            return None
        ad = {}

    def text(value: Any) -> str | None:
        return str(value)[:FIELD_MAX] if isinstance(value, (str, int)) and value != "" else None

    source_url = text(ad.get("sourceUrl"))
    return {"utm_source": "meta_ads", "utm_medium": "ctwa", "ad_id": text(ad.get("sourceId")),
            "ctwa_clid": text(ad.get("ctwaClid")), "ad_title": text(ad.get("title")),
            "landing_page": source_url, "page_url": source_url}


# ##################################################################################################
# Domain: WhatsApp Cloud API webhooks (Meta's documented payloads)
#
# Meta posts {"object": "whatsapp_business_account", "entry": [{"id": <WABA id>, "changes":
# [{"field", "value"}]}]}; a `messages` change carries `metadata.phone_number_id` (the business
# number), `contacts[]` (wa_id when Meta shares the phone, user_id = the business-scoped user id
# or BSUID, profile.name and .username) and `messages[]` or `statuses[]`; a message may carry
# `from_user_id` and no `from`. `smb_message_echoes` (coexistence with the Business app) carries
# what the business sent from the app. One body can hold several entries, changes and messages.
# https://developers.facebook.com/documentation/business-messaging/whatsapp/webhooks/reference/messages/
# ##################################################################################################

# A message of these types opens a conversation like a text does (a voice note, a location);
# reactions, system notices, unsupported or unknown types and "request_welcome" (a chat opened,
# nothing written) never make a lead.
CLOUD_CONTENT_TYPES = frozenset(("text", "image", "video", "document", "audio", "sticker",
                                 "location", "contacts", "button", "interactive", "order"))
BSUID_MAX = 160  # "CC." + up to 128 characters, with room for a parent id's "CC.ENT."
BSUID_RE = re.compile(r"[A-Z]{2}\.(?:ENT\.)?[0-9A-Za-z]{1,128}")  # BR.1502576394655843


def cloud_text(message: Mapping[str, Any]) -> str:
    """What the customer wrote or chose: a text's body, a media caption, a quick-reply button's
    text, an interactive reply's title."""
    kind = message.get("type")
    node = message.get(kind) if isinstance(kind, str) else None
    if not isinstance(node, dict):
        return ""
    if kind == "interactive":
        node = node.get("button_reply") or node.get("list_reply") or {}
        text = node.get("title") if isinstance(node, dict) else None
    else:
        text = node.get({"text": "body", "button": "text"}.get(kind, "caption"))
    return text if isinstance(text, str) else ""


def cloud_ad(referral: Any) -> tuple[dict | None, dict | None]:
    """(attribution, context kept on the lead) of a Click-to-WhatsApp `referral`. Meta omits
    `ctwa_clid` for ads on WhatsApp Status: still an ad's lead, noted as having no click id."""
    if not isinstance(referral, dict) or not referral:
        return None, None

    def text(value: Any) -> str | None:
        return str(value)[:FIELD_MAX] if isinstance(value, (str, int)) and value != "" else None

    url = text(referral.get("source_url"))
    ad = {"utm_source": "meta_ads", "utm_medium": "ctwa", "ad_id": text(referral.get("source_id")),
          "ctwa_clid": text(referral.get("ctwa_clid")), "ad_title": text(referral.get("headline")),
          "landing_page": url, "page_url": url}
    context = {"referral": referral}
    if ad["ctwa_clid"] is None:
        context["note"] = "no click id (Meta sends none for WhatsApp Status ads)"
    return ad, context


def _bsuid(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= BSUID_MAX else None


def _wa_id(value: Any) -> str | None:
    number = digits(value) if isinstance(value, str) else ""
    return number if 6 <= len(number) <= 20 else None


def cloud_time(value: Any) -> float | None:
    """Meta writes unix seconds as a string ("1739321024")."""
    if isinstance(value, str) and value.isdigit() and len(value) <= 12:
        value = int(value)
    return plausible_time(value)


def cloud_contact(message: Mapping[str, Any], contacts: list) -> dict:
    """The `contacts[]` entry of the message's sender: by wa_id or user_id, else the only one."""
    people = [c for c in contacts if isinstance(c, dict)]
    for person in people:
        if ((message.get("from") and person.get("wa_id") == message.get("from"))
                or (message.get("from_user_id")
                    and person.get("user_id") == message.get("from_user_id"))):
            return person
    return people[0] if len(people) == 1 else {}


@dataclasses.dataclass(slots=True)
class Sender:
    """Who somebody is, by the IDENTITY_KEYS (the phone given as WhatsApp writes it)."""
    phone: str | None = None
    lid: str | None = None
    bsuid: str | None = None
    username: str | None = None
    wa_id: str | None = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.wa_id = digits(self.phone) or None
        self.phone = dialable_phone(self.wa_id)


@dataclasses.dataclass(slots=True)
class IdentityChange:
    """A customer's new number or new BSUID (system messages `user_changed_number`,
    `user_changed_user_id`): the contact known as `old` is known as `new` from now on."""
    kind: str
    old: Sender
    new: Sender


def cloud_identity_change(message: Mapping[str, Any]) -> IdentityChange | str:
    system = message.get("system")
    kind = system.get("type") if isinstance(system, dict) else None
    if kind not in ("user_changed_number", "user_changed_user_id"):
        return "system message"
    old_bsuid = _bsuid(system.get("previous_user_id"))
    new_bsuid = _bsuid(system.get("user_id")) or _bsuid(message.get("from_user_id"))
    if new_bsuid == old_bsuid:
        new_bsuid = None
    old = Sender(_wa_id(message.get("from")), bsuid=old_bsuid or (
        None if new_bsuid else _bsuid(message.get("from_user_id"))))
    new = Sender(_wa_id(system.get("wa_id")) if kind == "user_changed_number" else None,
                 bsuid=new_bsuid)
    if not (old.phone or old.bsuid) or not (new.phone or new.bsuid):
        return "identity change without the identities"
    return IdentityChange(kind, old, new)


def cloud_message(message: Any, contacts: list) -> InboundMessage | IdentityChange | str:
    """An inbound message (or a customer's identity change), or the reason it is ignored."""
    if not isinstance(message, dict):
        return "no message"
    message_id = message.get("id")
    if not isinstance(message_id, str) or not message_id or len(message_id) > 128:
        return "no message id"
    kind = message.get("type")
    if kind == "system":
        return cloud_identity_change(message)
    if kind not in CLOUD_CONTENT_TYPES:
        return f"{kind} message" if isinstance(kind, str) and len(kind) <= 40 else "no type"
    person = cloud_contact(message, contacts)
    profile = person.get("profile") if isinstance(person.get("profile"), dict) else {}
    phone = _wa_id(message.get("from")) or _wa_id(person.get("wa_id"))
    bsuid = _bsuid(message.get("from_user_id")) or _bsuid(person.get("user_id"))
    if phone is None and bsuid is None:
        return "unknown sender"
    name, username = profile.get("name"), profile.get("username")
    username = username.lstrip("@")[:100] if isinstance(username, str) and username else None
    ad, context = cloud_ad(message.get("referral"))
    return InboundMessage("cloud", message_id, phone, None,
                          name[:200] if isinstance(name, str) and name else None,
                          cloud_text(message), cloud_time(message.get("timestamp")), ad,
                          context, bsuid, username)


def cloud_echo(echo: Any) -> InboundMessage | str:
    """A message the business sent from the WhatsApp Business app (coexistence), as the
    business's own message to the customer's chat (`to`, `to_user_id`), or why it is ignored."""
    if not isinstance(echo, dict):
        return "no message"
    message_id = echo.get("id")
    if not isinstance(message_id, str) or not message_id or len(message_id) > 128:
        return "no message id"
    phone, bsuid = _wa_id(echo.get("to")), _bsuid(echo.get("to_user_id"))
    if phone is None and bsuid is None:
        return "unknown chat"
    return InboundMessage("cloud", message_id, phone, None, None, cloud_text(echo),
                          cloud_time(echo.get("timestamp")), bsuid=bsuid, from_business=True)


def cloud_changes(envelope: Any) -> list[tuple[str, str | None, dict]]:
    """(field, phone_number_id, value) of each change in a Cloud API webhook body."""
    out = []
    entries = envelope.get("entry") if isinstance(envelope, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        changes = entry.get("changes") if isinstance(entry, dict) else None
        for change in changes if isinstance(changes, list) else []:
            if not isinstance(change, dict) or not isinstance(change.get("value"), dict):
                continue
            value = change["value"]
            metadata = value.get("metadata") if isinstance(value.get("metadata"), dict) else {}
            number = metadata.get("phone_number_id")
            field = change.get("field")
            out.append((field if isinstance(field, str) else "",
                        number if isinstance(number, str) and 0 < len(number) <= 64 else None,
                        value))
    return out


# ##################################################################################################
# Domain: conversion events and the delivery outbox
#
# A lead's lifecycle is a list of events (lead, qualified, purchase, refund, lost). Recording an
# event also commits, in the same transaction, one outbox row per destination the company has set
# up (Meta, GA4, TikTok, Google Ads, its CRM webhook); a background worker sends them. Nothing
# is lost on a restart.
# ##################################################################################################

# The destinations themselves (DESTINATIONS) are classes in "Integrations: conversions out".
def missing_destination_fields(settings: Mapping[str, Any]) -> dict[str, list[str]]:
    """Destination → its required settings still empty, for each destination set up and on."""
    return {name: destination.missing(settings) for name, destination in DESTINATIONS.items()
            if destination.set_up(settings)}


def configured_destinations(company: Company) -> list[str]:
    """The destinations a lead event of this company is queued for."""
    return [name for name, destination in DESTINATIONS.items()
            if destination.configured(company.settings)]


LEAD_EVENT_COLUMNS = ("company_id", "lead_id", "name", "value", "currency", "occurred_at",
                      "event_id", "source", "created_at", "rule")
LEAD_EVENT_INSERT = insert_sql("lead_events", LEAD_EVENT_COLUMNS)
NEW_LEAD_EVENT_INSERT = insert_sql("lead_events", ("id", *LEAD_EVENT_COLUMNS))  # id from new_id


async def record_event(tx: Tx, company: Company, lead_id: int, name: str, event_id: str,
                       occurred_at: float, source: str, value: float | None = None,
                       currency: str | None = None, new: bool = False,
                       rule: Mapping[str, Any] | None = None) -> tuple[dict, bool]:
    """Insert a lead event and its outbox rows; (event row, created). An existing event_id is
    returned as it is, with no second delivery. `new`: the event_id cannot exist yet (a new
    lead's), so the row is written at the end of the transaction. `rule`: the chat rule that
    made it (source chat_rule), kept on the event."""
    ts = now()
    values = (company.id, lead_id, name, value, currency, occurred_at, event_id, source, ts,
              json_dumps(rule) if rule is not None else None)
    if new:
        row = {"id": await tx.new_id("lead_events"), **dict(zip(LEAD_EVENT_COLUMNS, values))}
        tx.defer(NEW_LEAD_EVENT_INSERT, row["id"], *values)
    else:
        row = await tx.fetchone(LEAD_EVENT_INSERT + " ON CONFLICT (company_id, event_id) "
                                "DO NOTHING RETURNING *", *values)
    if row is None:
        existing = await tx.fetchone("SELECT * FROM lead_events WHERE company_id = ? AND "
                                     "event_id = ?", company.id, event_id)
        return existing, False
    for destination in configured_destinations(company):  # the outbox, written before COMMIT
        tx.defer(
            "INSERT INTO deliveries (company_id, event_row_id, lead_id, destination, status, "
            "attempts, next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            company.id, row["id"], lead_id, destination, "pending", 0, ts, ts, ts)
    return row, True


def event_json(row: Mapping[str, Any]) -> dict:
    return {"id": row["id"], "lead_id": row["lead_id"], "name": row["name"],
            "value": row["value"], "currency": row["currency"],
            "occurred_at": iso(row["occurred_at"]), "event_id": row["event_id"],
            "source": row["source"], "rule": loads_or(row.get("rule"), None),
            "created_at": iso(row["created_at"])}


def delivery_response(text: str | None) -> Any:
    """A delivery's kept answer from the platform: parsed when it is JSON, else the text."""
    if text is None:
        return None
    try:
        return parse_json(text.encode())
    except (NotJson, UnicodeEncodeError):
        return text


def delivery_json(row: Mapping[str, Any]) -> dict:
    return {"id": row["id"], "lead_id": row["lead_id"], "event_row_id": row["event_row_id"],
            "event_id": row.get("event_key"), "event": row.get("event_name"),
            "destination": row["destination"],
            "status": row["status"], "attempts": row["attempts"],
            "last_status": row["last_status"], "last_error": row["last_error"],
            "next_attempt_at": iso(row["next_attempt_at"]) if row["status"] == "pending" else None,
            "delivered_at": iso(row["delivered_at"]), "created_at": iso(row["created_at"]),
            "updated_at": iso(row["updated_at"]),
            "response": delivery_response(row.get("response"))}


async def apply_label_edit(tx: Tx, company_id: str, connection_id: str, data: Any) -> dict:
    if not isinstance(data, dict) or not isinstance(data.get("id"), (str, int)):
        return {"ignored": "no label"}
    name = data.get("name") if isinstance(data.get("name"), str) else None
    deleted = 1 if data.get("deleted") is True else 0
    await tx.execute(
        "INSERT INTO labels (company_id, connection_id, label_id, name, deleted, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (company_id, connection_id, label_id) DO UPDATE "
        "SET name = COALESCE(excluded.name, labels.name), deleted = excluded.deleted, "
        "updated_at = excluded.updated_at",
        company_id, connection_id, str(data["id"]), name, deleted, now())
    return {"label": str(data["id"])}


async def apply_label_association(tx: Tx, company: Company, connection_id: str, data: Any) -> dict:
    """A label added to a lead's chat records the event the company mapped that label to."""
    if not isinstance(data, dict) or data.get("type") != "add":
        return {"ignored": "not a label added"}
    chat, label_id = data.get("chatId"), data.get("labelId")
    if not isinstance(chat, str) or not isinstance(label_id, (str, int)):
        return {"ignored": "no chat or label"}
    label = await tx.fetchone("SELECT name FROM labels WHERE company_id = ? AND "
                              "connection_id = ? AND label_id = ?",
                              company.id, connection_id, str(label_id))
    if label is None or not label["name"]:
        return {"ignored": "unknown label"}
    name = (company.settings.get("label_events") or {}).get(label["name"])
    if not name:
        return {"ignored": "label not mapped to an event"}
    column, value = (("lid", jid_user(chat)) if chat.endswith(JID_LID)
                     else ("phone", digits(jid_user(chat))))
    lead = await tx.fetchone(
        f"SELECT l.id FROM leads l JOIN contacts c ON c.id = l.contact_id "
        f"WHERE c.company_id = ? AND c.{column} = ? ORDER BY l.id DESC LIMIT 1",
        company.id, value)
    if lead is None:
        return {"ignored": "no lead for this chat"}
    event, created = await record_event(
        tx, company, lead["id"], name, f"label-{connection_id}-{label_id}-{lead['id']}", now(),
        "label")
    return {"lead_id": lead["id"], "lead_event": name, "event_row_id": event["id"],
            **({} if created else {"duplicate": True})}


# ##################################################################################################
# Domain: chat rules (SPEC §14)
#
# A company's rules read WhatsApp messages as they pass: the attendant writes "pedido confirmado,
# total R$ 1.250,00" and a purchase of 1250 is recorded on the chat's lead (record_event, so it
# goes through the outbox like any event). Private by design: the text is read in memory here and
# dropped; only the event and the rule that made it are stored. Any message source calls
# apply_chat_rules; Evolution's `fromMe` messages come through apply_business_message.
# ##################################################################################################

CHAT_RULE_SENDERS = ("business", "customer", "any")
CHAT_RULE_FIELDS = ("from", "keywords", "event", "value")
CHAT_RULES_MAX = 50  # rules per company
CHAT_RULE_KEYWORDS_MAX = 20  # keywords per rule
CHAT_KEYWORD_MAX = 100  # characters of one keyword
CHAT_TEXT_MAX = 65536  # characters a WhatsApp text message can hold (the test route's limit)
CHAT_VALUE_MAX = 1e12  # the largest value an event takes (as POST /api/leads/{id}/events)


# A keyword must hold something chat_words keeps: a digit or a letter of the Latin alphabets
# (accented ones included; not × and ÷, which sit among them).
_KEYWORD_CHAR_RE = re.compile("[0-9A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u00ff]")


def validate_chat_rules(value: Any) -> list[dict]:
    """The `chat_rules` setting checked and normalised (keywords stripped, `value` present), or
    Refused(400) naming the rule and field: `chat_rules[2].keywords must be ...`. null: none."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > CHAT_RULES_MAX:
        raise Refused(400, f"chat_rules must be a list of at most {CHAT_RULES_MAX} rules")
    rules = []
    for i, rule in enumerate(value):
        where = f"chat_rules[{i}]"
        if not isinstance(rule, dict):
            raise Refused(400, f"{where} must be an object with from, keywords, event and value")
        for key in rule:
            if key not in CHAT_RULE_FIELDS:
                raise Refused(400, f"Unknown field: {where}.{key}")
        if rule.get("from") not in CHAT_RULE_SENDERS:
            raise Refused(400, f"{where}.from must be {one_of(CHAT_RULE_SENDERS)}")
        keywords = rule.get("keywords")
        if (not isinstance(keywords, list) or not 1 <= len(keywords) <= CHAT_RULE_KEYWORDS_MAX
                or not all(isinstance(k, str) and k.strip() and len(k) <= CHAT_KEYWORD_MAX
                           for k in keywords)):
            raise Refused(400, f"{where}.keywords must be a list of 1 to "
                               f"{CHAT_RULE_KEYWORDS_MAX} words or phrases of at most "
                               f"{CHAT_KEYWORD_MAX} characters")
        for j, keyword in enumerate(keywords):
            if not _KEYWORD_CHAR_RE.search(keyword):  # (the same class as openapi.json's)
                raise Refused(400, f"{where}.keywords[{j}] must contain a letter or a digit "
                                   "(emoji and punctuation are not matched)")
        if rule.get("event") not in FOLLOW_UP_EVENTS:
            raise Refused(400, f"{where}.event must be {one_of(FOLLOW_UP_EVENTS)}")
        if rule.get("value") not in ("from_text", None):
            raise Refused(400, f"{where}.value must be \"from_text\" or null")
        rules.append({"from": rule["from"], "keywords": [k.strip() for k in keywords],
                      "event": rule["event"], "value": rule.get("value")})
    return rules


def chat_words(text: str) -> str:
    """`text` as rules compare it: lower case, without accents, every run of what is neither a
    letter nor a digit (spaces, punctuation, emoji) one space, framed by spaces. Invisible
    characters (the tracking code's zero-width ones) are dropped, not spaces: they never split a
    word. "✅ Pedido CONFIRMADO!!" → " pedido confirmado "."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    out, gap = [" "], False
    for char in decomposed:
        kind = unicodedata.category(char)
        if kind[0] in "LN":
            if gap:
                out.append(" ")
                gap = False
            out.append(char)
        elif kind not in ("Mn", "Cf"):  # an accent's mark, or an invisible format character
            gap = len(out) > 1
    out.append(" ")
    return "".join(out) if len(out) > 2 else ""


# Brazilian money as people write it. A number is an amount when money marks it: R$ (or BRL)
# before it, "reais"/"real" after it, or Brazilian cents ("89,90", "1.250,00"). A bare number
# ("pedido 4521", "2 unidades") is no amount: it could be an order number or a quantity.
_AMOUNT = (r"[0-9]{1,3}(?:\.[0-9]{3})+(?:,[0-9]{1,2})?"  # 1.250 / 1.250,90 (thousands dots)
           r"|[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]{1,2})?"  # 1,250.90 (written the US way)
           r"|[0-9]+(?:[.,][0-9]{1,2})?")  # 1250 / 89,90 / 89.90
_SCALE = r"(?:\s*(?P<{0}>mil|k|milh[oõ]es|milh[aã]o|mi)\b)?"
_MONEY_RE = re.compile(
    rf"(?:\b(?:r\s?\$|brl)\s*(?P<marked>{_AMOUNT}){_SCALE.format('marked_scale')})"
    rf"|(?:\b(?P<spoken>{_AMOUNT}){_SCALE.format('spoken_scale')}\s*(?:reais|real)\b)"
    r"|(?:(?<![0-9.,])(?P<cents>[0-9]{1,3}(?:\.[0-9]{3})*,[0-9]{2}|[0-9]+,[0-9]{2})"
    r"(?![0-9])(?!\s*%))")  # (a percentage is no amount)
_SCALES = {"mil": 1e3, "k": 1e3, "mi": 1e6, "milhao": 1e6, "milhão": 1e6, "milhoes": 1e6,
           "milhões": 1e6}


def _amount_value(amount: str) -> float:
    """One amount matched by _AMOUNT as a number: a comma or dot before 1-2 final digits is the
    decimal mark; before 3 digits, it separates thousands."""
    decimal = re.search(r"[.,]([0-9]{1,2})\Z", amount)
    if decimal:
        return float(f"{digits(amount[:decimal.start()])}.{decimal.group(1)}")
    return float(digits(amount))


def read_money(text: str) -> float | None:
    """The first amount of Brazilian money in `text`, or None. Read: "R$ 1.250,90" 1250.9,
    "R$1250" 1250, "R$ 89,90" 89.9, "1.250,00 reais" 1250, "total 1.250,00" 1250, "R$ 89.90"
    89.9, "R$ 2 mil" / "R$ 2k" / "2 mil reais" 2000, "R$ 1,5 mil" 1500, "R$ 1 milhão" 1000000.
    Not read: a number without R$, reais or cents ("pedido 4521", "paguei 150"). Amounts past
    CHAT_VALUE_MAX are no amount."""
    found = _MONEY_RE.search(unicodedata.normalize("NFKC", text).casefold())
    if found is None:
        return None
    for group in ("marked", "spoken", "cents"):
        amount = found.group(group)
        if amount is not None:
            break
    value = _amount_value(amount)
    scale = found.group("marked_scale") or found.group("spoken_scale")
    if scale:
        value *= _SCALES[scale]
    value = round(value, 2)
    return value if value <= CHAT_VALUE_MAX else None


def firing_chat_rules(rules: list[dict], text: str, sender: str) -> list[tuple[int, dict, str]]:
    """The rules `text` from `sender` ("business" or "customer") fires, in their order, as
    (index, rule, the keyword found). A keyword fires when its words are found inside the
    message's (chat_words: "confirm" is inside "Confirmado!"). One event of a kind per message:
    a later rule for an event an earlier rule fired is passed over (no purchase counted twice)."""
    words, fired, events = None, [], set()
    for i, rule in enumerate(rules):
        if rule["from"] not in (sender, "any") or rule["event"] in events:
            continue
        if words is None:
            words = chat_words(text)
        keyword = next((k for k in rule["keywords"] if chat_words(k).strip() in words), None)
        if keyword is not None:
            fired.append((i, rule, keyword))
            events.add(rule["event"])
    return fired


def company_chat_rules(company: Company, sender: str) -> list[dict]:
    """The company's rules that can fire for a message from `sender`."""
    return [rule for rule in company.settings.get("chat_rules") or ()
            if rule["from"] in (sender, "any")]


def chat_rule_event_id(message_key: str, rule: Mapping[str, Any]) -> str:
    """The event_id of what `rule` made of the message `message_key`: the same for a message
    delivered again (and the same rule), so a redelivery makes nothing new."""
    digest = hashlib.sha256(f"{message_key}\n{json_dumps(rule)}".encode("utf-8",
                                                                        "surrogatepass"))
    return "chat_rule-" + digest.hexdigest()[:32]


def dry_run_chat_rules(company: Company, rules: list[dict], text: str, sender: str) -> dict:
    """What `rules` would make of `text` from `sender`, storing nothing (the test route)."""
    amount = read_money(text)
    fired = []
    for i, rule, keyword in firing_chat_rules(rules, text, sender):
        value = amount if rule["value"] == "from_text" else None
        fired.append({"rule": i, "event": rule["event"], "keyword": keyword, "value": value,
                      "currency": company.settings["currency"] if value is not None else None})
    return {"fired": fired, "amount": amount}


async def apply_chat_rules(tx: Tx, company: Company, lead_id: int, text: str, sender: str,
                           message_key: str, occurred_at: float | None = None) -> list[dict]:
    """Record on `lead_id` the event of each of the company's rules that the message `text`
    from `sender` ("business" or "customer") fires: source "chat_rule", the rule kept on the
    event, value (for "from_text") the first amount of the text in the company's currency.
    `message_key` names the message for good (source, connection, message id): a message
    delivered twice records nothing new. The text itself is not kept. Returns what was made
    ({lead_id, event, event_row_id, value, duplicate?} each)."""
    fired = firing_chat_rules(company_chat_rules(company, sender), text, sender)
    made = []
    for _, rule, _ in fired:
        value = read_money(text) if rule["value"] == "from_text" else None
        event, created = await record_event(
            tx, company, lead_id, rule["event"], chat_rule_event_id(message_key, rule),
            occurred_at or now(), "chat_rule", value,
            company.settings["currency"] if value is not None else None, rule=rule)
        made.append({"lead_id": lead_id, "event": rule["event"], "event_row_id": event["id"],
                     "value": value, **({} if created else {"duplicate": True})})
    return made


async def chat_latest_lead(tx: Tx, company_id: str, chat: InboundMessage) -> dict | None:
    """The latest lead of the contact a chat is with, by any identity the chat names (a phone in
    either Brazilian form, a LID, a BSUID); None when the chat has no contact or the contact no
    lead."""
    for form in IDENTITY_FORMS:
        value = getattr(chat, form)
        values = phone_forms(value) if form == "phone" else (value,) if value else ()
        if not values:
            continue
        where, args = tx.any_of(f"c.{form}", list(values))
        lead = await tx.fetchone(
            "SELECT l.id, l.contact_id FROM leads l JOIN contacts c ON c.id = l.contact_id "
            f"WHERE c.company_id = ? AND {where} ORDER BY l.id DESC LIMIT 1", company_id, *args)
        if lead is not None:
            return lead
    return None


async def apply_business_message(tx: Tx, company: Company, msg: InboundMessage,
                                 message_key: str) -> dict:
    """The business's own message (Evolution `fromMe`, a Cloud API echo) to the chat `msg`
    names: the business
    rules run against the latest lead of the chat's contact. A chat with no lead gets nothing:
    no contact and no lead are made from an outgoing message."""
    lead = await chat_latest_lead(tx, company.id, msg)
    if lead is None:
        return {"ignored": "business message to a chat with no lead"}
    made = await apply_chat_rules(tx, company, lead["id"], msg.text, "business", message_key,
                                  msg.timestamp)
    return {"from_business": True, "contact_id": lead["contact_id"], "lead_id": lead["id"],
            "chat_rules": made}


async def apply_customer_message(tx: Tx, company: Company, contact_id: int,
                                 lead_id: int | None, msg: InboundMessage,
                                 message_key: str) -> list[dict]:
    """The customer and any rules on a customer's message, against the lead it made (`lead_id`)
    or else the contact's latest lead. Nothing is read unless a rule fires."""
    if not firing_chat_rules(company_chat_rules(company, "customer"), msg.text, "customer"):
        return []
    if lead_id is None:
        lead = await tx.fetchone("SELECT id FROM leads WHERE contact_id = ? "
                                 "ORDER BY id DESC LIMIT 1", contact_id)
        if lead is None:
            return []
        lead_id = lead["id"]
    return await apply_chat_rules(tx, company, lead_id, msg.text, "customer", message_key,
                                  msg.timestamp)


# ##################################################################################################
# Domain: connections, contacts and leads
# ##################################################################################################

class UnitCache:
    """What a unit of work of this domain has read, kept for the rest of the unit so a batch
    reads each row once: connections, contacts by phone and by LID (None: known not to exist),
    the live visit of a code (with whether a lead took it), and the row id of a message recorded
    in the unit. A getter answers `UNKNOWN` for what the unit has not read yet. Whoever changes
    such a row says so through the matching setter or invalidator. The cache lives in `tx.memo`,
    which a rolled-back savepoint clears with what was written inside it."""

    UNKNOWN: Any = object()
    __slots__ = ("_memo",)

    def __init__(self, tx: Tx) -> None:
        self._memo = tx.memo

    def connection(self, company_id: str, connection_id: str) -> dict | Any:
        return self._memo.get(("connection", company_id, connection_id), self.UNKNOWN)

    def set_connection(self, company_id: str, connection_id: str, row: dict) -> None:
        self._memo[("connection", company_id, connection_id)] = row

    def forget_connection(self, company_id: str, connection_id: str) -> None:
        self._memo.pop(("connection", company_id, connection_id), None)

    def contact(self, company_id: str, form: str, value: str) -> dict | None | Any:
        """The contact whose `form` ("phone" or "lid") is `value`; None: there is none."""
        return self._memo.get(("contact", company_id, form, value), self.UNKNOWN)

    def set_contact(self, company_id: str, form: str, value: str, row: dict | None) -> None:
        self._memo[("contact", company_id, form, value)] = row

    def code_visit(self, company_id: str, code: str) -> dict | None | Any:
        """The live visit of `code` with `code_lead_id`/`code_contact_id`; None: none is live."""
        return self._memo.get(("code visit", company_id, code), self.UNKNOWN)

    def set_code_visit(self, company_id: str, code: str, row: dict | None) -> None:
        self._memo[("code visit", company_id, code)] = row

    def has_message(self, company_id: str, connection_id: str, message_id: str) -> bool:
        return ("message", company_id, connection_id, message_id) in self._memo

    def set_message(self, company_id: str, connection_id: str, message_id: str,
                    row_id: int | None) -> None:
        """The message's row id recorded in this unit, or None for one seen before."""
        self._memo[("message", company_id, connection_id, message_id)] = row_id

    def take_message(self, company_id: str, connection_id: str, message_id: str) -> int | None:
        """The row id, forgotten: a second copy in the unit is recorded (and refused) anew."""
        return self._memo.pop(("message", company_id, connection_id, message_id))

    def read(self, source: Any, envelope: Any, hint: str = "") -> list:
        """`source.read(envelope, hint)` as a list, once per delivery in the unit: the batch's
        prefetch and the delivery's processing share one parse (and one search for codes)."""
        key = ("read", source.name, id(envelope), hint)
        kept = self._memo.get(key)
        if kept is None or kept[0] is not envelope:
            read = source.read(envelope, hint)
            kept = self._memo[key] = (envelope, read if isinstance(read, list) else [read])
        return kept[1]

    def cloud_numbers(self, company_id: str) -> dict | Any:
        """phone_number_id → the company's live Cloud API connection row."""
        return self._memo.get(("cloud numbers", company_id), self.UNKNOWN)

    def set_cloud_numbers(self, company_id: str, rows: dict) -> None:
        self._memo[("cloud numbers", company_id)] = rows


async def ensure_connection(tx: Tx, company_id: str, connection_id: str) -> dict:
    """The connection row for an Evolution instance, created the first time it is heard from
    (kept in the unit's cache: a batch of messages to one number reads it once)."""
    cache = UnitCache(tx)
    row = cache.connection(company_id, connection_id)
    if row is cache.UNKNOWN:
        select = "SELECT * FROM connections WHERE company_id = ? AND id = ?"
        row = await tx.fetchone(select, company_id, connection_id)
        if row is None:
            ts = now()
            await tx.execute("INSERT INTO connections (company_id, id, created_at, updated_at) "
                             "VALUES (?, ?, ?, ?) ON CONFLICT (company_id, id) DO NOTHING",
                             company_id, connection_id, ts, ts)
            row = await tx.fetchone(select, company_id, connection_id)
        cache.set_connection(company_id, connection_id, row)
    return row


async def cloud_numbers(tx: Tx, company_id: str) -> dict:
    """phone_number_id → the company's live Cloud API connection (read once per unit)."""
    cache = UnitCache(tx)
    rows = cache.cloud_numbers(company_id)
    if rows is cache.UNKNOWN:
        rows = {r["phone_number_id"]: r for r in await tx.fetchall(
            "SELECT id, phone_number_id, app_secret FROM connections WHERE company_id = ? "
            "AND type = 'cloud' AND deleted_at IS NULL", company_id)}
        cache.set_cloud_numbers(company_id, rows)
    return rows


CONTACT_COLUMNS = ("id", "company_id", "phone", "wa_id", "lid", "bsuid", "username", "name",
                   "created_at", "updated_at")
CONTACT_INSERT = insert_sql("contacts", CONTACT_COLUMNS)


async def prefetch_contacts(tx: Tx, company_id: str, senders: list[Any]) -> None:
    """Read the contacts of `senders` (InboundMessages, or anything with the IDENTITY_FORMS as
    attributes) by each form they have, in one statement, into the unit's cache, where
    `resolve_contact` finds them; a sender form not found is remembered as having no contact."""
    cache = UnitCache(tx)
    wanted = {}
    for form in IDENTITY_FORMS:
        values = {getattr(m, form) for m in senders if getattr(m, form)}
        wanted[form] = [v for v in values
                        if cache.contact(company_id, form, v) is cache.UNKNOWN]
    if not any(wanted.values()):
        return
    # One SELECT per column, joined: an OR of them is planned by SQLite as a scan.
    parts, args = [], []
    for form, values in wanted.items():
        if values:
            where, more = tx.any_of(form, values)
            parts.append(f"SELECT * FROM contacts WHERE company_id = ? AND {where}")
            args += [company_id, *more]
    for form, values in wanted.items():
        for value in values:
            cache.set_contact(company_id, form, value, None)
    for row in await tx.fetchall(" UNION ".join(parts), *args):
        for form in IDENTITY_FORMS:
            if row[form]:
                cache.set_contact(company_id, form, row[form], row)


async def fold_contact(tx: Tx, keep: dict, gone: dict) -> None:
    """`gone` was the same person as `keep`: its leads and message records move to `keep`, and
    it is deleted (before `keep` takes its phone, LID or BSUID: each is unique)."""
    for table in ("leads", "messages"):
        await tx.execute(f"UPDATE {table} SET contact_id = ? WHERE contact_id = ?", keep["id"],
                         gone["id"])
    await tx.execute("DELETE FROM contacts WHERE id = ?", gone["id"])
    cache = UnitCache(tx)
    for form in IDENTITY_FORMS:
        if gone[form]:
            cache.set_contact(keep["company_id"], form, gone[form], None)


async def set_identities(tx: Tx, contact: dict, identities: Mapping[str, str | None],
                         folded: bool = False) -> None:
    """Write the contact's identities that changed and fill its leads that lack them (all of
    them when other contacts were `folded` into it: their leads may lack any), keeping the
    unit's cache in step. A form given as None is left as it was."""
    changed = {k: v for k, v in identities.items() if v and v != contact[k]}
    cache = UnitCache(tx)
    for form in IDENTITY_FORMS:
        if form in changed and contact[form]:
            cache.set_contact(contact["company_id"], form, contact[form], None)
    if changed:
        assignments = ", ".join(f"{k} = ?" for k in changed)
        await tx.execute(f"UPDATE contacts SET {assignments} WHERE id = ?", *changed.values(),
                         contact["id"])
    contact.update(changed)
    filled = {k: contact[k] for k in identities if contact[k]} if folded else changed
    if filled:
        fill = ", ".join(f"{k} = COALESCE({k}, ?)" for k in filled)
        await tx.execute(f"UPDATE leads SET {fill} WHERE contact_id = ?", *filled.values(),
                         contact["id"])
    for form in IDENTITY_FORMS:
        if contact[form]:
            cache.set_contact(contact["company_id"], form, contact[form], contact)


# What a contact (and a lead) records of who the person is: the IDENTITY_FORMS, the WhatsApp id
# the phone came as, and the @username.
IDENTITY_KEYS = ("phone", "wa_id", "lid", "bsuid", "username")


def sender_identities(sender: Any) -> dict:
    """The IDENTITY_KEYS of an InboundMessage (or any sender with them as attributes)."""
    return {k: getattr(sender, k) for k in IDENTITY_KEYS}


async def resolve_contact(tx: Tx, company_id: str, msg: InboundMessage) -> tuple[dict, bool]:
    """Find or create the sender's contact. One person is one contact: the contacts the
    sender's phone, LID and BSUID point to (Evolution 2.3.6 wrote the LID where 2.3.7 writes the
    phone; Meta may withhold the phone and give a BSUID) are folded into the oldest, which takes
    what this message says of the sender. Returns (contact, is_new). A new contact is written at
    the end of the transaction; until then it lives in the unit's cache, where the sender's next
    message in the unit finds it."""
    ts = now()
    await prefetch_contacts(tx, company_id, [msg])  # (nothing to read when prefetched)
    cache = UnitCache(tx)
    found = {}
    for form in IDENTITY_FORMS:
        row = getattr(msg, form) and cache.contact(company_id, form, getattr(msg, form))
        if row:
            found[id(row)] = row
    if not found:
        contact = {"id": await tx.new_id("contacts"), "company_id": company_id,
                   **sender_identities(msg), "name": msg.name, "created_at": ts,
                   "updated_at": ts}
        tx.defer_row(CONTACT_INSERT, contact, CONTACT_COLUMNS)  # a taken identity fails
        for form in IDENTITY_FORMS:  # the batch, which is then run item by item
            if contact[form]:
                cache.set_contact(company_id, form, contact[form], contact)
        return dict(contact), True
    rows = sorted(found.values(), key=lambda r: r["id"])
    for row in rows:
        # This message's name and time, on the contact (and on one about to be folded into it).
        row["name"], row["updated_at"] = msg.name or row["name"], ts
        row["username"] = msg.username or row["username"]
        if not row.get("_pending"):
            tx.defer("UPDATE contacts SET name = ?, username = ?, updated_at = ? WHERE id = ?",
                     row["name"], row["username"], ts, row["id"])
    contact, others = rows[0], rows[1:]
    identities = {k: o[k] for o in reversed(others) for k in IDENTITY_KEYS if o[k]}
    identities.update({k: v for k, v in sender_identities(msg).items() if v})
    if not others and all(contact[k] == v for k, v in identities.items()):
        return dict(contact), False
    # The same person under another contact, or a form of the sender learned (rare): change
    # the rows (what waits is written first).
    for other in others:
        await fold_contact(tx, contact, other)
    await set_identities(tx, contact, identities, folded=bool(others))
    return dict(contact), False


async def apply_identity_change(tx: Tx, company: Company, connection_id: str,
                                change: IdentityChange) -> dict:
    """A customer changed number or BSUID: their contact takes the new one (a contact the new
    one already made, written from it before the notice came, is folded in); leads keep the
    number they came from."""
    await prefetch_contacts(tx, company.id, [change.old, change.new])
    cache = UnitCache(tx)

    def contacts_of(sender: Sender) -> dict[int, dict]:
        rows = (getattr(sender, f) and cache.contact(company.id, f, getattr(sender, f))
                for f in IDENTITY_FORMS)
        return {id(row): row for row in rows if row}

    found = contacts_of(change.old)
    if not found:
        return {"ignored": "unknown contact"}
    contact, *others = sorted({**found, **contacts_of(change.new)}.values(),
                              key=lambda r: r["id"])
    for other in others:
        await fold_contact(tx, contact, other)
    await set_identities(tx, contact, {k: v for k, v in sender_identities(change.new).items()
                                       if k != "username"}, folded=bool(others))
    return {"contact_id": contact["id"], "changed": change.kind}


async def insert_messages(tx: Tx, company_id: str, keys: list[tuple[str, str]]) -> None:
    """Record inbound messages, (connection_id, message_id) each, in one statement: the unit's
    cache gets each one's row id, or None for a message seen before (a redelivery)."""
    keys = list(dict.fromkeys(keys))
    ts = now()
    cache = UnitCache(tx)
    rows, args = tx.rows_of(("text", "text", "text", "float8"),
                            [(company_id, c, m, ts) for c, m in keys])
    for c, m in keys:
        cache.set_message(company_id, c, m, None)
    for row in await tx.fetchall(
            f"INSERT INTO messages (company_id, connection_id, message_id, created_at) {rows} "
            "ON CONFLICT (company_id, connection_id, message_id) DO NOTHING "
            "RETURNING id, connection_id, message_id", *args):
        cache.set_message(company_id, row["connection_id"], row["message_id"], row["id"])


CODE_VISIT_SELECT = (
    "SELECT v.*, l.id AS code_lead_id, l.contact_id AS code_contact_id FROM visits v "
    "LEFT JOIN leads l ON l.company_id = v.company_id AND l.code = v.code "
    "WHERE v.company_id = ? AND v.expires_at > ? AND ")


async def prefetch_code_visits(tx: Tx, company_id: str, codes: list[str]) -> None:
    """Read the live visits of `codes` (and whether a lead took each code) in one statement,
    into the unit's cache, where `_visit_for_code` finds them."""
    cache = UnitCache(tx)
    codes = [c for c in dict.fromkeys(codes)
             if cache.code_visit(company_id, c) is cache.UNKNOWN]
    if not codes:
        return
    where, args = tx.any_of("v.code", codes)
    found = {row["code"]: row for row in
             await tx.fetchall(CODE_VISIT_SELECT + where, company_id, now(), *args)}
    for code in codes:
        cache.set_code_visit(company_id, code, found.get(code))


async def _visit_for_code(tx: Tx, company_id: str, codes: list[str], contact_id: int
                          ) -> tuple[dict | None, str | None]:
    """The live visit of the first code that can attribute this contact, or why none can."""
    reason, cache = None, UnitCache(tx)
    for code in codes:
        visit = cache.code_visit(company_id, code)
        if visit is not cache.UNKNOWN:
            visit = visit and dict(visit)
        else:
            visit = await tx.fetchone(CODE_VISIT_SELECT + "v.code = ?", company_id, now(), code)
        if visit is None:
            continue
        lead_contact = visit.pop("code_contact_id")
        if visit.pop("code_lead_id") is None:
            return visit, None
        # A code matched once is not matched again: to the same person it is the same lead; to
        # another person (a forwarded message) it attributes nothing.
        reason = "code already matched" if lead_contact == contact_id else reason
    return None, reason


async def _window_visit(tx: Tx, company: Company, connection: dict) -> dict | None:
    forms = phone_forms(connection.get("phone"))
    if not company.settings["window_match"] or not forms:
        return None
    since = now() - company.settings["window_minutes"] * 60
    # The site's link may carry the number with or without Brazil's 9th digit.
    where, args = tx.any_of("click_phone", list(forms))
    rows = await tx.fetchall(
        f"SELECT * FROM visits WHERE company_id = ? AND {where} AND clicked_at >= ? "
        "AND lead_id IS NULL LIMIT 2", company.id, *args, since)
    return rows[0] if len(rows) == 1 else None


LEAD_INSERT = insert_sql("leads", (
    "id", "company_id", "connection_id", "contact_id", "phone", "lid", "name", "first_message",
    "message_id", "code", "match_method", "confidence", "visit_id", "utm_source", "utm_medium",
    "utm_campaign", "ad_id", "gclid", "ctwa_clid", "attribution", "first_touch", "context_info",
    "clicked_at", "created_at", "wa_id", "bsuid", "username", "source"))


async def insert_lead(tx: Tx, company: Company, connection_id: str, contact: dict,
                      msg: InboundMessage, method: str, confidence: float, visit: dict | None,
                      attribution: dict, context_info: dict | None) -> int | None:
    """Insert a lead and its `lead` event; None if its code or ad click is already taken."""
    ts = now()
    first_touch = loads_or(visit["first_touch"], None) if visit else None
    full = {k: attribution.get(k) for k in LEAD_ATTRIBUTION_KEYS}
    text = None
    if company.settings["store_first_message"]:  # without the invisible code: it is noise to a reader
        text = _INVISIBLE_RE.sub("", msg.text)[:FIRST_MESSAGE_MAX]
    code = visit["code"] if visit and method == "code" else None
    values = (
        company.id, connection_id, contact["id"], contact["phone"], contact["lid"],
        msg.name or contact.get("name"), text or None, msg.message_id, code, method, confidence,
        visit["id"] if visit else None, full["utm_source"], full["utm_medium"],
        full["utm_campaign"], full["ad_id"], full["gclid"], full["ctwa_clid"], json_dumps(full),
        json_dumps(first_touch) if first_touch else None,
        json_dumps(context_info) if context_info else None,
        visit["clicked_at"] if visit else None, ts, contact["wa_id"], contact["bsuid"],
        msg.username or contact["username"], msg.source)
    if full["ctwa_clid"] is None:
        # Written at the end of the transaction. Its code (if any) is free as far as this
        # transaction knows (the memo keeps the codes it takes); one a concurrent transaction
        # takes meanwhile fails the batch, which is then run item by item and reads it taken.
        lead_id = await tx.new_id("leads")
        tx.defer(LEAD_INSERT, lead_id, *values)
    else:  # an ad click already taken is refused here and now
        row = await tx.fetchone(LEAD_INSERT + " ON CONFLICT DO NOTHING RETURNING id",
                                await tx.new_id("leads"), *values)
        if row is None:
            return None
        lead_id = row["id"]
    if visit is not None and visit["lead_id"] is None:  # (as read in this transaction)
        tx.defer("UPDATE visits SET lead_id = ? WHERE id = ?", lead_id, visit["id"])
        if visit["clicks"] > 0:  # the report's matched clicks
            rollup_count(tx, visit, -1)
            rollup_count(tx, {**visit, "lead_id": lead_id}, 1)
    await record_event(tx, company, lead_id, "lead", f"lead-{lead_id}", msg.timestamp or ts,
                       "whatsapp", new=True)
    return lead_id


def makes_lead(msg: InboundMessage, free_code: bool, new_contact: bool) -> bool:
    """SPEC §6 in one place: a message makes a lead when one of its codes has a live visit no
    lead took yet, when its sender is a new contact, or when it carries an ad click id."""
    return free_code or new_contact or bool(msg.ad and msg.ad["ctwa_clid"])


async def match_message(tx: Tx, company: Company, connection: dict, msg: InboundMessage) -> dict:
    """Apply SPEC §6's lead rules to one inbound message inside a unit of work (and SPEC §14's
    chat rules, which alone read the business's own messages)."""
    cache = UnitCache(tx)
    if msg.from_business and not company_chat_rules(company, "business"):
        return {"ignored": "from me"}
    if not cache.has_message(company.id, connection["id"], msg.message_id):
        await insert_messages(tx, company.id, [(connection["id"], msg.message_id)])
    message_row_id = cache.take_message(company.id, connection["id"], msg.message_id)
    if message_row_id is None:
        return {"ignored": "duplicate"}
    message_key = f"{msg.source}-{connection['id']}-{msg.message_id}"  # (the chat rules')
    if msg.from_business:
        result = await apply_business_message(tx, company, msg, message_key)
        tx.defer("UPDATE messages SET contact_id = ?, lead_id = ? WHERE id = ?",
                 result.get("contact_id"), result.get("lead_id"), message_row_id)
        return result
    contact, is_new = await resolve_contact(tx, company.id, msg)
    result: dict[str, Any] = {"contact_id": contact["id"]}
    visit, reason = await _visit_for_code(tx, company.id, msg.codes, contact["id"])
    lead_id = None
    if not makes_lead(msg, visit is not None, is_new):
        reason = reason or "existing contact"
    elif visit is not None:
        touch = loads_or(visit["last_touch"], {})
        lead_id = await insert_lead(tx, company, connection["id"], contact, msg, "code", 1.0,
                                    visit, touch, None)
        result["match"] = "code"
        if lead_id is None:
            reason = "code already matched"
        else:  # the code is taken now, by this contact (and the visit has its lead)
            cache.set_code_visit(company.id, visit["code"], {
                **visit, "lead_id": visit["lead_id"] or lead_id, "code_lead_id": lead_id,
                "code_contact_id": contact["id"]})
    elif msg.ad is not None:
        lead_id = await insert_lead(tx, company, connection["id"], contact, msg, "ctwa", 1.0,
                                    None, msg.ad, msg.ad_context)
        result["match"] = "ctwa"
        if lead_id is None:
            reason = "ad click already matched"
    else:  # a new contact
        visit = await _window_visit(tx, company, connection)
        if visit is not None:
            lead_id = await insert_lead(tx, company, connection["id"], contact, msg, "window",
                                        WINDOW_CONFIDENCE, visit, loads_or(visit["last_touch"], {}),
                                        msg.ad_context)
            result["match"] = "window"
        else:  # (a chat begun from a wa.me link or WhatsApp's search keeps where it began)
            lead_id = await insert_lead(tx, company, connection["id"], contact, msg, "none", 0.0,
                                        None, {"utm_source": "direct"}, msg.ad_context)
            result["match"] = "none"
    if lead_id is not None:
        result["lead_id"] = lead_id
    else:
        result.pop("match", None)
        result["ignored"] = reason or "no lead"
    made = await apply_customer_message(tx, company, contact["id"], lead_id, msg, message_key)
    if made:
        result["chat_rules"] = made
    tx.defer("UPDATE messages SET contact_id = ?, lead_id = ? WHERE id = ?",
             contact["id"], lead_id, message_row_id)
    return result


async def apply_connection_update(tx: Tx, company_id: str, connection_id: str, data: Any) -> dict:
    if not isinstance(data, dict):
        return {"ignored": "no data"}
    await ensure_connection(tx, company_id, connection_id)
    UnitCache(tx).forget_connection(company_id, connection_id)  # changed below
    state = data.get("state") if isinstance(data.get("state"), str) else None
    wuid = data.get("wuid")
    phone = digits(jid_user(wuid)) if isinstance(wuid, str) and wuid.endswith(JID_PHONE) else None
    name = data.get("profileName") if isinstance(data.get("profileName"), str) else None
    picture = data.get("profilePictureUrl")
    picture = picture if isinstance(picture, str) else None
    await tx.execute(
        "UPDATE connections SET state = COALESCE(?, state), phone = COALESCE(?, phone), "
        "profile_name = COALESCE(?, profile_name), picture_url = COALESCE(?, picture_url), "
        "updated_at = ? WHERE company_id = ? AND id = ?",
        state, phone or None, name, picture, now(), company_id, connection_id)
    if state == "open":  # a fresh QR is useless once connected
        await tx.execute("UPDATE connections SET qr_code = NULL, qr_pairing_code = NULL "
                         "WHERE company_id = ? AND id = ?", company_id, connection_id)
    return {"state": state}


def qr_string(value: Any) -> str | None:
    """A QR string worth keeping and drawing: text of at most QR_CODE_MAX characters."""
    return value if isinstance(value, str) and 0 < len(value) <= QR_CODE_MAX else None


async def apply_qrcode_update(tx: Tx, company_id: str, connection_id: str, data: Any) -> dict:
    qr = data.get("qrcode") if isinstance(data, dict) else None
    await ensure_connection(tx, company_id, connection_id)
    UnitCache(tx).forget_connection(company_id, connection_id)  # changed below
    if not isinstance(qr, dict) or qr_string(qr.get("code")) is None:
        # "QR code limit reached": Evolution gave up waiting for a scan. (Or no QR at all: longer
        # than QR_CODE_MAX. Either way the QR shown until now is stale.)
        await tx.execute("UPDATE connections SET qr_code = NULL, qr_pairing_code = NULL, "
                         "updated_at = ? WHERE company_id = ? AND id = ?",
                         now(), company_id, connection_id)
        too_long = isinstance(qr, dict) and isinstance(qr.get("code"), str) and qr["code"]
        return {"ignored": f"qr code longer than {QR_CODE_MAX} characters" if too_long
                else "no qr code"}
    pairing = qr.get("pairingCode") if isinstance(qr.get("pairingCode"), str) else None
    ts = now()
    await tx.execute("UPDATE connections SET qr_code = ?, qr_pairing_code = ?, qr_at = ?, "
                     "updated_at = ? WHERE company_id = ? AND id = ?",
                     qr["code"], pairing, ts, ts, company_id, connection_id)
    return {"qrcode": True}


def envelope_parts(envelope: Any, event_hint: str = "") -> tuple[str, str | None]:
    """(event, instance) of an Evolution envelope (a dict); instance None when it has no
    usable one."""
    event = normalize_event(envelope.get("event")) or normalize_event(event_hint)
    instance = envelope.get("instance")
    if not isinstance(instance, str) or not instance or len(instance) > 128:
        instance = None
    return event, instance


def lead_json(row: Mapping[str, Any]) -> dict:
    attribution = {k: None for k in LEAD_ATTRIBUTION_KEYS}
    attribution.update(loads_or(row["attribution"], {}))
    out = {
        "id": row["id"], "company_id": row["company_id"], "connection_id": row["connection_id"],
        "source": row["source"], "phone": row["phone"], "lid": row["lid"],
        "identities": {k: row[k] for k in IDENTITY_KEYS},
        "name": row["name"],
        "first_message": row["first_message"], "message_id": row["message_id"],
        "code": row["code"], "match_method": row["match_method"],
        "confidence": row["confidence"], "session_id": row["visit_id"],
        "attribution": attribution, "first_touch": loads_or(row["first_touch"], None),
        "clicked_at": iso(row["clicked_at"]), "created_at": iso(row["created_at"]),
    }
    if row.get("context_info"):
        out["context_info"] = loads_or(row["context_info"], None)
    return out


# ##################################################################################################
# Domain: connections (their records, and the signed links that show a connection's QR)
#
# A connection is one Evolution instance of a company: its stored state, the name verified as the
# company's, and the expiring signed link (POST /api/connection-link) that lets a client scan its
# QR without a token. The HTTP handlers below call these; nothing here speaks HTTP.
# ##################################################################################################

def mask_phone(phone: str | None) -> str | None:
    """Country and area code and the last four digits: enough to recognise, not to call."""
    if not phone:
        return None
    if len(phone) <= 8:
        return phone[:2] + "*" * (len(phone) - 2)
    return phone[:4] + "*" * (len(phone) - 8) + phone[-4:]


def connection_json(row: Mapping[str, Any]) -> dict:
    return {"connectionId": row["id"], "companyId": row["company_id"], "state": row["state"],
            "phone": row["phone"], "profileName": row["profile_name"],
            "pictureUrl": row["picture_url"], "instanceId": row["instance_id"],
            "qrAt": iso(row["qr_at"]), "createdAt": iso(row["created_at"]),
            "updatedAt": iso(row["updated_at"]), "deletedAt": iso(row["deleted_at"]),
            "verified": bool(row["verified"]), "lastDeliveryAt": iso(row["last_delivery_at"]),
            "lastRejectedAt": iso(row["last_rejected_at"]), "lastRejection": row["last_rejection"],
            "type": row["type"], **(cloud_connection_json(row) if row["type"] == "cloud" else {})}


def cloud_connection_json(row: Mapping[str, Any]) -> dict:
    """A Cloud API number's ids; its secrets only as whether they are set."""
    return {"phone_number_id": row["phone_number_id"], "waba_id": row["waba_id"],
            "app_secret_set": bool(row["app_secret"]),
            "access_token_set": bool(row["access_token"])}


async def verified_holder(db: Storage, connection_id: str) -> dict | None:
    """The company managing the live connection of this name (its id and Evolution URL), if
    any: one at most (VERIFIED_INDEX)."""
    return await db.fetchone(
        "SELECT c.company_id, p.evolution_url FROM connections c JOIN companies p ON "
        "p.id = c.company_id WHERE c.id = ? AND c.verified = 1 AND c.deleted_at IS NULL",
        connection_id)


async def get_connection(db: Storage, company_id: str, connection_id: str,
                         include_deleted: bool = False, cloud_ok: bool = False) -> dict:
    """A connection the company may manage: one it created or adopted. A connection known only
    from deliveries to its webhook is not (anybody can name any instance there: SPEC §6); a
    deleted one only with `include_deleted`, and not once another company holds the name. A
    Cloud API number only where the caller handles one (`cloud_ok`): 409 for Evolution's
    routes."""
    row = await db.fetchone("SELECT * FROM connections WHERE company_id = ? AND id = ?",
                            company_id, connection_id)
    if row is None or not row["verified"] or (row["deleted_at"] is not None and (
            not include_deleted or await verified_holder(db, connection_id))):
        raise Refused(404, "Connection not found")
    if row["type"] == "cloud" and not cloud_ok:
        raise Refused(409, f"Connection {connection_id} is a WhatsApp Cloud API number: Meta "
                           "runs it, there is no Evolution instance, QR code or session")
    return row


async def update_connection(db: Storage, company_id: str, connection_id: str, **fields: Any
                            ) -> None:
    assignments = ", ".join(f"{name} = ?" for name in fields)

    async def run(tx: Tx) -> None:
        await tx.execute(f"UPDATE connections SET {assignments}, updated_at = ? "
                         "WHERE company_id = ? AND id = ?",
                         *fields.values(), now(), company_id, connection_id)

    await db.transact(run)


def qr_payload(code: str, pairing_code: str | None, state: str | None) -> dict:
    import segno

    qr = segno.make_qr(code)
    return {"code": code, "pairingCode": pairing_code,
            "base64": qr.png_data_uri(scale=6, border=4), "state": state}


async def store_adopted(db: Storage, company: Company, connection_id: str, found: dict,
                        instance_token: str | None, secret: str) -> dict:
    """The adopted connection, verified, with its new secret; a row its webhook deliveries made
    keeps its number and profile where Evolution shows none now."""
    owner = found["owner"] or ""
    phone = digits(jid_user(owner)) if owner.endswith(JID_PHONE) else None
    ts = now()

    async def run(tx: Tx) -> dict:
        return await tx.fetchone(
            "INSERT INTO connections (company_id, id, state, phone, profile_name, picture_url, "
            "instance_id, instance_token, webhook_secret, verified, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?) ON CONFLICT (company_id, id) DO UPDATE "
            "SET state = COALESCE(excluded.state, connections.state), "
            "phone = COALESCE(excluded.phone, connections.phone), "
            "profile_name = COALESCE(excluded.profile_name, connections.profile_name), "
            "picture_url = COALESCE(excluded.picture_url, connections.picture_url), "
            "instance_id = excluded.instance_id, instance_token = excluded.instance_token, "
            "webhook_secret = excluded.webhook_secret, verified = 1, qr_code = NULL, "
            "qr_pairing_code = NULL, qr_at = NULL, deleted_at = NULL, "
            "updated_at = excluded.updated_at RETURNING *",
            company.id, connection_id, found["state"], phone or None, found["profile_name"],
            found["picture_url"], found["instance_id"], instance_token, hash_token(secret),
            ts, ts)

    return await db.transact(run)


_META_ID_RE = re.compile(r"[0-9]{5,32}")
_APP_SECRET_RE = re.compile(r"[0-9A-Za-z]{16,256}")  # Meta's are 32 hex digits


def cloud_connection_fields(body: Mapping[str, Any]) -> dict:
    """The fields of a `{"type": "cloud"}` POST /api/connections, checked (Refused 400 naming
    the field)."""
    fields = {}
    for name in ("phone_number_id", "waba_id"):
        value = body.get(name)
        if not isinstance(value, str) or not _META_ID_RE.fullmatch(value):
            raise Refused(400, f"{name} must be the number Meta shows for it (digits)")
        fields[name] = value
    secret = body.get("app_secret")
    if not isinstance(secret, str) or not _APP_SECRET_RE.fullmatch(secret):
        raise Refused(400, "app_secret must be the Meta app's secret (App settings > Basic)")
    fields["app_secret"] = secret
    token = body.get("access_token")
    if "access_token" in body and (not isinstance(token, str) or not 0 < len(token) <= 2048):
        raise Refused(400, "access_token must be text of at most 2048 characters")
    fields["access_token"] = token
    return fields


async def create_cloud_connection(db: Storage, company: Company, connection_id: str,
                                  fields: Mapping[str, Any]) -> tuple[dict, str]:
    """Register a Cloud API number: (the connection row, the verify token to paste into the
    Meta app, shown once: stored as its SHA-256). 409 when the name or the number is taken."""
    verify_token = new_secret("wvt_")

    async def run(tx: Tx) -> dict:
        row = await tx.fetchone(
            "SELECT company_id FROM connections WHERE id = ? AND deleted_at IS NULL AND "
            "(verified = 1 OR company_id = ?)", connection_id, company.id)
        if row is not None:
            raise Refused(409, f"Connection {connection_id} already exists")
        if fields["phone_number_id"] in await cloud_numbers(tx, company.id):
            raise Refused(409, f"phone_number_id {fields['phone_number_id']} is already "
                               "connected")
        await tx.execute("DELETE FROM connections WHERE company_id = ? AND id = ?", company.id,
                         connection_id)  # a deleted one's history: the id is taken anew
        ts = now()
        return await tx.fetchone(
            "INSERT INTO connections (company_id, id, type, phone_number_id, waba_id, "
            "app_secret, access_token, verify_token, verified, created_at, updated_at) "
            "VALUES (?, ?, 'cloud', ?, ?, ?, ?, ?, 1, ?, ?) ON CONFLICT DO NOTHING RETURNING *",
            company.id, connection_id, fields["phone_number_id"], fields["waba_id"],
            fields["app_secret"], fields["access_token"], hash_token(verify_token), ts, ts)

    row = await db.transact(run)
    if row is None:  # the name, taken meanwhile by another company
        raise Refused(409, f"Connection {connection_id} already exists")
    return row, verify_token


async def cloud_verify_token_matches(db: Storage, company_id: str, given: str) -> bool:
    """Whether `given` is the verify token of one of the company's live Cloud API numbers."""
    rows = await db.fetchall("SELECT verify_token FROM connections WHERE company_id = ? AND "
                             "type = 'cloud' AND deleted_at IS NULL", company_id)
    hashed = hash_token(given)
    return any(same_secret(hashed, r["verify_token"]) for r in rows if r["verify_token"])


def link_signature(key: str, company_id: str, connection_id: str, expires: int) -> str:
    mac = hmac.new(key.encode(), f"{company_id}\n{connection_id}\n{expires}".encode(),
                   hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


async def signing_key(db: Storage, company: Company) -> str:
    """The company's key for onboarding links, made the first time one is asked for."""
    if company.signing_key:
        return company.signing_key

    async def run(tx: Tx) -> str:
        await tx.execute("UPDATE companies SET signing_key = ? WHERE id = ? AND "
                         "signing_key IS NULL", new_secret("sk_"), company.id)
        row = await tx.fetchone("SELECT signing_key FROM companies WHERE id = ?", company.id)
        return row["signing_key"]

    return await db.transact(run)


class LinkError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def verify_link(db: Storage, query: Mapping[str, str], connection_id: str) -> Company:
    """The company of a signed onboarding link, or LinkError(401 tampered | 410 expired)."""
    company_id, expires, sig = query.get("c", ""), query.get("exp", ""), query.get("sig", "")
    company = await get_company(db, company_id) if company_id else None
    if company is None or not company.signing_key or not re.fullmatch(r"[0-9]{1,12}", expires):
        raise LinkError(401, "This link is not valid")
    expected = link_signature(company.signing_key, company_id, connection_id, int(expires))
    if not same_secret(sig, expected):
        raise LinkError(401, "This link is not valid")
    if int(expires) < now():
        raise LinkError(410, "This link has expired: ask for a new one")
    return company


# ##################################################################################################
# Domain: webhook ingestion
#
# A delivery from a message source (today Evolution API) becomes stored rows: the webhook batch
# authenticates each delivery, reads what its messages will need for all of them at once, applies
# the lead rules (above) one delivery at a time and stores each raw body with its outcome. No HTTP
# here: a refusal is a value the handler turns into its answer.
# ##################################################################################################

_APIKEY_RE = re.compile(rb'"apikey"\s*:\s*("[^"\\]*(?:\\.[^"\\]*)*")')


def redact_apikey(raw: bytes) -> bytes:
    """`raw` with the value of its `apikey` (the instance's token, which authenticates deliveries)
    replaced, the JSON kept valid: stored bodies are read by people and backups that must not get
    it. (A key inside a JSON string has escaped quotes: no match.)"""
    parts, start = [], 0
    for match in _APIKEY_RE.finditer(raw):  # (a splice: 3x faster than re.sub's template)
        parts += (raw[start:match.start(1)], b'"[redacted]"')
        start = match.end()
    return b"".join(parts) + raw[start:] if parts else raw


async def _store_delivery(tx: Tx, company_id: str | None, source: str, raw: bytes,
                          headers: Mapping[str, str], envelope: Any, status: str = "received",
                          result: dict | None = None, error: str | None = None,
                          delivery_id: int | None = None) -> int:
    """Store a delivery's raw body; with a reserved `delivery_id`, at the end of the transaction
    (one statement for a batch)."""
    instance = event = None
    if isinstance(envelope, dict) and "entry" in envelope:  # Meta's: its first change's
        changes = cloud_changes(envelope)
        event, instance = changes[0][:2] if changes else (None, None)
    elif isinstance(envelope, dict):
        instance = envelope.get("instance") if isinstance(envelope.get("instance"), str) else None
        event = normalize_event(envelope.get("event")) or None
    kept = {k: clean_text(v) for k, v in headers.items()  # (bytes not UTF-8 come surrogates)
            if k.lower() in ("content-type", "user-agent", "x-request-id", "x-instance-id",
                             "x-instance-name", "x-event-type", "x-timestamp")}
    ts = now()
    values = (company_id, source, instance and instance[:128], event and event[:64],
              json_dumps(kept), redact_apikey(raw[:WEBHOOK_BODY_MAX]), 0, status,
              None if result is None else json_dumps(result), error, ts,
              None if status == "received" else ts)
    columns = ("company_id, source, instance, event, headers, body, truncated, status, result, "
               "error, received_at, processed_at")
    if delivery_id is not None:
        tx.defer(f"INSERT INTO webhook_deliveries (id, {columns}) "
                 f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", delivery_id, *values)
        return delivery_id
    row = await tx.fetchone(f"INSERT INTO webhook_deliveries ({columns}) "
                            f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id", *values)
    return row["id"]


async def _header_authenticated(tx: Tx, company: Company, given: str | None,
                                envelope: Any) -> bool:
    """The company's webhook secret, or the secret of the connection the envelope names (a
    connection's secret speaks for that instance only, and only while it is not deleted). Both
    are stored as their SHA-256."""
    if not given:
        return False
    given = hash_token(given)
    if same_secret(given, company.webhook_secret):
        return True
    instance = envelope.get("instance") if isinstance(envelope, dict) else None
    if not isinstance(instance, str):
        return False
    row = await tx.fetchone("SELECT webhook_secret FROM connections WHERE company_id = ? "
                            "AND id = ? AND deleted_at IS NULL", company.id, instance)
    return bool(row) and same_secret(given, row["webhook_secret"])


async def _apikey_authenticated(tx: Tx, company: Company, envelope: Any) -> bool:
    if not isinstance(envelope, dict):
        return False
    instance, apikey = envelope.get("instance"), envelope.get("apikey")
    if not isinstance(instance, str) or not isinstance(apikey, str):
        return False
    row = await tx.fetchone("SELECT instance_token FROM connections WHERE company_id = ? AND id = ? "
                            "AND deleted_at IS NULL", company.id, instance)
    return bool(row) and same_secret(apikey, row["instance_token"])


@dataclasses.dataclass(slots=True)
class SourceEvent:
    """What a source reads from a delivery, once (a delivery may hold several: Source.read):
    its event, the connection it is for, and its message (for a message event) or the answer
    for what it ignores."""
    event: str  # normalised ("messages.upsert"), "" when none
    connection_id: str | None  # None until Source.locate finds it from `number`
    data: Any = None
    message: InboundMessage | None = None
    ignored: dict | None = None  # the whole result, for a delivery nothing is done with
    number: str | None = None  # the source's own id of the business number (Cloud API)


EventHandler = Callable[[Tx, Company, str, Any], Awaitable[dict]]


class Source:
    """A message source (a WhatsApp server posting webhooks): how a delivery authenticates,
    which messages it carries, normalised as InboundMessages that the lead rules read, and its
    other events, a handler each. A second source is a subclass and an entry in SOURCES."""

    name = ""
    events: Mapping[str, EventHandler] = {}
    # Whether a company may accept the source's deliveries unauthenticated (the setting
    # webhook_auth_required off): not where the sender always signs (Meta).
    optional_auth = True

    def read(self, envelope: Any, hint: str = "") -> SourceEvent | list[SourceEvent]:
        """What the delivery holds: one SourceEvent, or a list for a source whose deliveries
        bundle several messages (UnitCache.read makes it a list)."""
        raise NotImplementedError

    async def authenticate(self, tx: Tx, company: Company, item: Any) -> bool:
        """Whether the delivery `item` (a WebhookInput: raw body, headers, the secret the
        request gave, envelope) is the source's own for `company`."""
        raise NotImplementedError

    async def locate(self, tx: Tx, company: Company, read: SourceEvent) -> str | None:
        """The connection `read` is for (None: none of the company's)."""
        return read.connection_id

    async def process(self, tx: Tx, company: Company, reads: list[SourceEvent]) -> dict:
        """Apply one delivery inside a unit of work, each thing it holds in turn: one answers
        for itself, several as `results`."""
        results = [await self.apply(tx, company, read) for read in reads]
        if len(results) == 1:
            return results[0]
        return {"results": results} if results else {"ignored": "nothing in the delivery"}

    async def apply(self, tx: Tx, company: Company, read: SourceEvent) -> dict:
        """One message to the lead rules, or one event to the event's handler."""
        if read.ignored is not None:
            return read.ignored
        connection_id = await self.locate(tx, company, read)
        if connection_id is None:
            return {"event": read.event, "ignored": f"no connection for number {read.number}"}
        if read.message is not None:
            connection = await ensure_connection(tx, company.id, connection_id)
            return {"event": read.event,
                    **await match_message(tx, company, connection, read.message)}
        handler = self.events[read.event]
        return {"event": read.event, **await handler(tx, company, connection_id, read.data)}


class EvolutionSource(Source):
    """Evolution API v2 (the Evolution contract, §4-§8): an envelope {event, instance, data,
    apikey}, the instance being the connection."""

    name = "evolution"
    message_event = "messages.upsert"
    events: Mapping[str, EventHandler] = {
        "connection.update": lambda tx, company, connection_id, data: apply_connection_update(
            tx, company.id, connection_id, data),
        "qrcode.updated": lambda tx, company, connection_id, data: apply_qrcode_update(
            tx, company.id, connection_id, data),
        "labels.edit": lambda tx, company, connection_id, data: apply_label_edit(
            tx, company.id, connection_id, data),
        "labels.association": apply_label_association,
    }

    def read(self, envelope: Any, hint: str = "") -> SourceEvent:
        if not isinstance(envelope, dict):
            return SourceEvent("", None, ignored={"ignored": "not an Evolution envelope"})
        event, instance = envelope_parts(envelope, hint)
        if instance is None:
            return SourceEvent(event, None, ignored={"event": event, "ignored": "no instance"})
        data = envelope.get("data")
        if event == self.message_event:
            msg = parse_upsert(data)
            if isinstance(msg, str):
                return SourceEvent(event, instance, data, ignored={"event": event,
                                                                   "ignored": msg})
            return SourceEvent(event, instance, data, message=msg)
        if event not in self.events:
            return SourceEvent(event, instance, data, ignored={
                "event": event or None, "ignored": "event not handled"})
        return SourceEvent(event, instance, data)

    async def authenticate(self, tx: Tx, company: Company, item: Any) -> bool:
        return (await _header_authenticated(tx, company, item.secret, item.envelope)
                or await _apikey_authenticated(tx, company, item.envelope))


def hub_signature(secret: str, raw: bytes) -> str:
    """Meta's X-Hub-Signature-256: "sha256=" and the HMAC-SHA256 of the raw body, in hex."""
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


class CloudSource(Source):
    """Meta's WhatsApp Cloud API (SPEC §13): a signed body of entries and changes, the business
    number named by its phone_number_id (a cloud connection of the company)."""

    name = "cloud"
    optional_auth = False  # Meta signs every delivery with the app secret
    events: Mapping[str, EventHandler] = {"system": apply_identity_change}

    def read(self, envelope: Any, hint: str = "") -> list[SourceEvent]:
        if not isinstance(envelope, dict) or envelope.get("object") != "whatsapp_business_account":
            return [SourceEvent("", None, ignored={"ignored": "not a WhatsApp Cloud API body"})]
        reads = []
        for field, number, value in cloud_changes(envelope):
            if field == "smb_message_echoes":
                echoes = value.get("message_echoes")
                for echo in echoes if isinstance(echoes, list) else []:
                    found = cloud_echo(echo)
                    reads.append(SourceEvent(field, None, echo, message=found, number=number)
                                 if isinstance(found, InboundMessage) else SourceEvent(
                                     field, None, ignored={"event": field, "ignored": found}))
                continue
            messages = value.get("messages") if field == "messages" else None
            if not isinstance(messages, list) or not messages:
                what = "status updates" if value.get("statuses") else "event not handled"
                reads.append(SourceEvent(field, None, ignored={"event": field or None,
                                                               "ignored": what}))
                continue
            contacts = value.get("contacts") if isinstance(value.get("contacts"), list) else []
            for message in messages:
                found = cloud_message(message, contacts)
                if isinstance(found, str):
                    reads.append(SourceEvent(field, None, ignored={"event": field,
                                                                   "ignored": found}))
                elif isinstance(found, IdentityChange):
                    reads.append(SourceEvent("system", None, found, number=number))
                else:
                    reads.append(SourceEvent(field, None, message, message=found, number=number))
        return reads

    async def authenticate(self, tx: Tx, company: Company, item: Any) -> bool:
        given = item.secret
        if not isinstance(given, str) or not given.startswith("sha256="):
            return False
        return any(hmac.compare_digest(given.encode(), hub_signature(row["app_secret"],
                                                                     item.raw).encode())
                   for row in (await cloud_numbers(tx, company.id)).values()
                   if row["app_secret"])

    async def locate(self, tx: Tx, company: Company, read: SourceEvent) -> str | None:
        if read.connection_id is None and read.number is not None:
            row = (await cloud_numbers(tx, company.id)).get(read.number)
            read.connection_id = row and row["id"]
        return read.connection_id


EVOLUTION = EvolutionSource()
CLOUD = CloudSource()
SOURCES: dict[str, Source] = {s.name: s for s in (EVOLUTION, CLOUD)}


async def process_envelope(tx: Tx, company: Company, envelope: Any, event_hint: str = "") -> dict:
    """Process one Evolution webhook envelope inside a unit of work (read once per unit)."""
    return await EVOLUTION.process(tx, company, UnitCache(tx).read(EVOLUTION, envelope,
                                                                   event_hint))


async def process_delivery(tx: Tx, company: Company, via: Source, envelope: Any,
                           hint: str = "") -> dict:
    """Process one delivery of the source `via` inside a unit of work (read once per unit).
    Evolution's goes through process_envelope, its entry point of old (tests wrap it)."""
    if via is EVOLUTION:
        return await process_envelope(tx, company, envelope, hint)
    return await via.process(tx, company, UnitCache(tx).read(via, envelope, hint))


async def ingest_envelope(tx: Tx, company: Company, raw: bytes, envelope: Any,
                          headers: Mapping[str, str], source: str, event_hint: str = "",
                          delivery_id: int | None = None, isolated: bool = True,
                          via: Source = EVOLUTION) -> dict:
    """Process a delivery and store its raw body with the outcome; both commit together, but a
    processing failure is only recorded on the stored delivery (it can be replayed after a
    fix). Not `isolated` (one of a batch), a failure raises instead: the batch is rolled back
    and its deliveries are ingested one by one."""
    try:
        async with tx.savepoint() if isolated else contextlib.nullcontext():
            result = await process_delivery(tx, company, via, envelope, event_hint)
    except Exception as exc:  # noqa: BLE001 - recorded on the delivery, re-raised as 500
        if not isolated:
            raise
        delivery_id = await _store_delivery(tx, company.id, source, raw, headers, envelope,
                                            "failed", error=repr(exc)[:2000],
                                            delivery_id=delivery_id)
        log.exception("webhook processing failed (delivery %s)", delivery_id)
        return {"delivery_id": delivery_id, "failed": True}
    delivery_id = await _store_delivery(tx, company.id, source, raw, headers, envelope,
                                        "processed", result, delivery_id=delivery_id)
    return {"delivery_id": delivery_id, **result}


async def store_failed_delivery(db: Storage, company_id: str, source: str, raw: bytes,
                                headers: Mapping[str, str], envelope: Any,
                                exc: Exception) -> dict:
    """Keep a delivery whose own transaction failed after processing (a deferred write, the
    commit), status failed with the error, in a transaction of its own: it is not lost and can
    be replayed once the cause is fixed."""
    log.error("webhook delivery failed; storing its body as failed", exc_info=exc)
    delivery_id = await db.transact(lambda tx: _store_delivery(
        tx, company_id, source, raw, headers, envelope, "failed", error=repr(exc)[:2000]))
    return {"delivery_id": delivery_id, "failed": True}


@dataclasses.dataclass(slots=True)
class WebhookInput:
    """One `POST /webhook` delivery, read and parsed, waiting for its batch."""
    company_id: str
    raw: bytes
    envelope: Any
    bad_json: bool
    headers: Mapping[str, str]
    secret: str | None  # what the request authenticated with (header or bearer)
    hint: str  # the event named by the URL's suffix
    source: str = EVOLUTION.name  # the stored delivery's source label (/webhook-ingest's ?source)
    trusted: bool = False  # authenticated by the caller (/webhook-ingest's shared token)
    via: Source = EVOLUTION  # the source whose deliveries these are: it reads and authenticates


class Ingested(dict):
    """What the webhook batch made of one delivery: the answer's fields, and what the handler
    does next (a value: the batch writes nothing into its input)."""

    refused: tuple[int, str] | None = None  # (status, message): not accepted, nothing stored
    wake: bool = False  # deliveries to send may wait now

    @classmethod
    def refusal(cls, status: int, message: str) -> "Ingested":
        out = cls()
        out.refused = (status, message)
        return out


async def webhook_authenticated(tx: Tx, company: Company, item: WebhookInput) -> bool:
    """Whether `item` may be stored for `company`: its secret or the instance's apikey
    matches, or the company turned authentication off (logged)."""
    if item.trusted or await item.via.authenticate(tx, company, item):
        return True
    if company.settings["webhook_auth_required"] or not item.via.optional_auth:
        return False
    log.warning("unauthenticated webhook accepted: company %s turned authentication off",
                company.id)
    return True


async def prefetch_messages(tx: Tx, inbound: list[tuple[str, str, InboundMessage]],
                            record: bool) -> collections.Counter:
    """What the messages of a batch of deliveries, (company_id, instance, message) each, will
    read, in one statement per kind instead of one per message: the visits of their codes, their
    senders' contacts and, when `record`, their rows in `messages` (not for a lone delivery: it
    is recorded inside its savepoint). Returns how many new rows of each table they will likely
    write (for `stock_ids`)."""
    by_company: dict[str, list[tuple[str, InboundMessage]]] = {}
    for company_id, instance, msg in inbound:
        by_company.setdefault(company_id, []).append((instance, msg))
    wanted, cache = collections.Counter(), UnitCache(tx)
    for company_id, found in by_company.items():
        msgs = [msg for _, msg in found]
        await prefetch_code_visits(tx, company_id, [c for msg in msgs for c in msg.codes])
        await prefetch_contacts(tx, company_id, msgs)
        if record:
            for instance in dict.fromkeys(i for i, _ in found):  # first, as Source.process
                await ensure_connection(tx, company_id, instance)  # does: one lock order
            await insert_messages(tx, company_id, [(i, msg.message_id) for i, msg in found])
        senders = set()
        for msg in msgs:  # the rows they will likely make, by the lead rule itself
            if msg.from_business:  # (makes no contact nor lead)
                continue
            who = tuple(getattr(msg, form) for form in IDENTITY_FORMS)
            known = [cache.contact(company_id, form, value)
                     for form, value in zip(IDENTITY_FORMS, who) if value]
            new = not any(known) and who not in senders
            if new:
                senders.add(who)
                wanted["contacts"] += 1
            visits = [cache.code_visit(company_id, code) for code in msg.codes]
            if makes_lead(msg, any(isinstance(v, dict) and v["code_lead_id"] is None
                                   for v in visits), new):
                wanted["leads"] += 1
                wanted["lead_events"] += 1
    return wanted


@dataclasses.dataclass(slots=True)
class WebhookBatch:
    """What a webhook batch read for its deliveries (prefetch)."""
    companies: dict[str, Company]
    accepted: dict[int, Company]  # id(item) → its company, for the deliveries authenticated
    isolated: bool  # a lone delivery: processed in a savepoint, a failure recorded on it


async def _webhook_prefetch(tx: Tx, items: list[WebhookInput]) -> WebhookBatch:
    """Each company once; each delivery authenticated and read once; what their messages will
    read, read for all at once; the ids their rows will take, in one statement."""
    companies = await companies_by_id(tx, {t.company_id for t in items})
    accepted = {}
    for t in items:
        company = companies.get(t.company_id)
        if company is not None and await webhook_authenticated(tx, company, t):
            accepted[id(t)] = company
    cache, inbound = UnitCache(tx), []
    for t in items:
        if (company := accepted.get(id(t))) is None:
            continue
        for read in cache.read(t.via, t.envelope, t.hint):
            if read.message is not None and (where := await t.via.locate(tx, company, read)):
                inbound.append((company.id, where, read.message))
    wanted = await prefetch_messages(tx, inbound, record=len(items) > 1)
    wanted["webhook_deliveries"] = len(accepted)
    await tx.stock_ids(wanted)
    return WebhookBatch(companies, accepted, isolated=len(items) == 1)


async def _webhook_apply(tx: Tx, b: WebhookBatch, t: WebhookInput) -> Ingested:
    """One delivery: refused (nothing stored), or processed and stored with its outcome; the
    writes nobody reads back go as one statement each at the end of the unit."""
    company = b.accepted.get(id(t))
    if company is None:
        if t.company_id not in b.companies:
            return Ingested.refusal(404, "Company not found")
        return Ingested.refusal(401, "Unauthorized")
    delivery_id = await tx.new_id("webhook_deliveries")
    if t.bad_json:  # kept for a look, then refused
        return Ingested(delivery_id=await _store_delivery(
            tx, company.id, t.source, t.raw, t.headers, None, delivery_id=delivery_id),
            bad_json=True)
    result = Ingested(await ingest_envelope(tx, company, t.raw, t.envelope, t.headers,
                                            t.source, t.hint, delivery_id, b.isolated, t.via))
    # A lead, label or chat rule event has deliveries waiting when the company sends events
    # somewhere.
    result.wake = (any("lead_id" in r or r.get("chat_rules")
                       for r in [result, *result.get("results", ())])
                   and bool(configured_destinations(company)))
    return result


# Evolution deliveries (Storage.submit): one Ingested per item.
webhook_batch = BatchKind("webhook", _webhook_prefetch, _webhook_apply, spread=True)


async def store_failed_webhook(db: Storage, item: WebhookInput, exc: Exception) -> dict | None:
    """store_failed_delivery for a /webhook delivery whose batch failed, when the delivery is
    one the batch would have accepted; None (nothing stored) for one it would have refused."""
    async def accepted(tx: Tx) -> bool:
        company = (await companies_by_id(tx, {item.company_id})).get(item.company_id)
        return company is not None and await webhook_authenticated(tx, company, item)

    if not await db.transact(accepted):
        return None
    return await store_failed_delivery(db, item.company_id, item.source, item.raw, item.headers,
                                       item.envelope, exc)


# ##################################################################################################
# Domain: reports
#
# Grouped queries (visits, leads, lead events) merged in Python. Visits are counted from the
# 15-minute counters of visit_rollup (raw visits only for the partial 15 minutes at either end of
# the period), so the cost grows with the buckets in the period, not with the visits. Days are
# counted in the company's timezone: the database groups by 15-minute UTC buckets (which every
# timezone offset divides evenly) and Python folds them into local days, so both backends share
# one SQL text.
# ##################################################################################################

REPORT_GROUPS = ("utm_source", "utm_medium", "utm_campaign", "ad_id", "connection", "day")
REPORT_DEFAULT_DAYS = 30  # a report or summary without `from` covers the last 30 days
MATCH_METHODS = ("code", "ctwa", "window", "none")


def _report_keys(db: Storage, group_by: str) -> tuple[str, str, str, str, str]:
    """The visit_rollup dimension, and SQL for the group key on visit_rollup (r), visits (v),
    leads (l) and lead events (joined to their lead l)."""
    if group_by == "day":
        return ("", "r.bucket", db.bucket("v.created_at", ROLLUP_BUCKET),
                db.bucket("l.created_at", ROLLUP_BUCKET), db.bucket("e.occurred_at", ROLLUP_BUCKET))
    if group_by == "connection":
        visit_key = ("(SELECT MIN(c.id) FROM connections c WHERE c.company_id = {0}.company_id "
                     "AND c.phone = {0}.{1})")
        return ("click_phone", visit_key.format("r", "value"),
                visit_key.format("v", "click_phone"), "l.connection_id", "l.connection_id")
    if group_by == "ad_id":
        return "", "NULL", "NULL", "l.ad_id", "l.ad_id"
    return group_by, "NULLIF(r.value, '')", f"v.{group_by}", f"l.{group_by}", f"l.{group_by}"


def _empty_row(key: Any) -> dict:
    return {"key": key, "visits": 0, "clicks": 0, "matched_clicks": 0, "leads": 0,
            "leads_by_method": {m: 0 for m in MATCH_METHODS}, "qualified": 0, "conversions": 0,
            "revenue": 0.0}


# A lead matched by its code or by the click window came from a visit's WhatsApp click; one from
# an ad's own click (ctwa) or from nothing (none) had no click on the site.
CLICK_METHODS = ("code", "window")


def _finish_row(row: dict) -> dict:
    row["revenue"] = round(row["revenue"], 2)
    row["leads_with_click"] = sum(row["leads_by_method"].get(m, 0) for m in CLICK_METHODS)
    row["leads_without_click"] = row["leads"] - row["leads_with_click"]
    # Leads that came through a click, per click: ad (ctwa) and direct leads do not count.
    row["click_to_lead"] = (round(row["leads_with_click"] / row["clicks"], 4)
                            if row["clicks"] else None)
    row["match_rate"] = (round(row["matched_clicks"] / row["clicks"], 4)
                         if row["clicks"] else None)
    return row


def rollup_span(start: float, end: float) -> tuple[int, int, list[tuple[float, float]]]:
    """[start, end) as whole visit_rollup buckets [first, last) and the non-empty partial
    quarter hours at either end, which are counted from the visits themselves."""
    first, last = -int(-start // ROLLUP_BUCKET), int(end // ROLLUP_BUCKET)
    if first < last:
        edges = [(start, first * ROLLUP_BUCKET), (last * ROLLUP_BUCKET, end)]
    else:
        edges = [(start, end)]
    return first, last, [(a, b) for a, b in edges if a < b]


async def build_report(db: Storage, company: Company, group_by: str, start: float, end: float
                       ) -> dict:
    zone = zoneinfo.ZoneInfo(company.settings["timezone"])
    dimension, rollup_key, visit_key, lead_key, event_key = _report_keys(db, group_by)
    first, last, edges = rollup_span(start, end)
    visits = []
    if first < last:
        visits += await db.fetchall(
            f"SELECT {rollup_key} AS k, CAST(SUM(r.visits) AS BIGINT) AS visits, "
            "CAST(SUM(r.clicks) AS BIGINT) AS clicks, CAST(SUM(r.matched) AS BIGINT) AS matched "
            "FROM visit_rollup r WHERE r.company_id = ? AND r.dimension = ? AND r.bucket >= ? "
            "AND r.bucket < ? GROUP BY 1", company.id, dimension, first, last)
    for edge_start, edge_end in edges:
        visits += await db.fetchall(
            f"SELECT {visit_key} AS k, COUNT(*) AS visits, "
            "SUM(CASE WHEN v.clicks > 0 THEN 1 ELSE 0 END) AS clicks, "
            "SUM(CASE WHEN v.clicks > 0 AND v.lead_id IS NOT NULL THEN 1 ELSE 0 END) "
            "AS matched FROM visits v WHERE v.company_id = ? AND v.created_at >= ? "
            "AND v.created_at < ? GROUP BY 1", company.id, edge_start, edge_end)
    leads = await db.fetchall(
        f"SELECT {lead_key} AS k, l.match_method AS method, COUNT(*) AS n FROM leads l "
        "WHERE l.company_id = ? AND l.created_at >= ? AND l.created_at < ? GROUP BY 1, 2",
        company.id, start, end)
    events = await db.fetchall(
        f"SELECT {event_key} AS k, e.name AS name, COUNT(*) AS n, SUM(e.value) AS total "
        "FROM lead_events e JOIN leads l ON l.id = e.lead_id WHERE e.company_id = ? "
        "AND e.occurred_at >= ? AND e.occurred_at < ? "
        "AND e.name IN ('qualified', 'purchase', 'refund') GROUP BY 1, 2",
        company.id, start, end)

    def key_of(raw: Any) -> Any:
        if group_by == "day":
            return datetime.fromtimestamp(int(raw) * ROLLUP_BUCKET, zone).date().isoformat()
        return raw

    rows: dict[Any, dict] = {}
    total = _empty_row(None)
    for row in visits:
        for target in (rows.setdefault(key_of(row["k"]), _empty_row(key_of(row["k"]))), total):
            target["visits"] += row["visits"]
            target["clicks"] += row["clicks"] or 0
            target["matched_clicks"] += row["matched"] or 0
    for row in leads:
        for target in (rows.setdefault(key_of(row["k"]), _empty_row(key_of(row["k"]))), total):
            target["leads"] += row["n"]
            target["leads_by_method"][row["method"]] = (
                target["leads_by_method"].get(row["method"], 0) + row["n"])
    for row in events:
        for target in (rows.setdefault(key_of(row["k"]), _empty_row(key_of(row["k"]))), total):
            if row["name"] == "qualified":
                target["qualified"] += row["n"]
            elif row["name"] == "purchase":
                target["conversions"] += row["n"]
                target["revenue"] += row["total"] or 0.0
            else:  # refunds take revenue back
                target["revenue"] -= row["total"] or 0.0
    ordered = list(rows.values())
    if group_by == "day":
        ordered.sort(key=lambda r: r["key"])
    else:
        ordered.sort(key=lambda r: (-r["leads"], -r["visits"], str(r["key"])))
    return {"group_by": group_by, "from": iso(start), "to": iso(end),
            "timezone": company.settings["timezone"], "currency": company.settings["currency"],
            "rows": [_finish_row(r) for r in ordered], "totals": _finish_row(total)}


CONNECTION_STATES = ("open", "connecting", "close")  # any other state (or none) counts as other


async def company_summaries(db: Storage, start: float, end: float) -> list[dict]:
    """Every company with its leads, clicks and matched clicks in [start, end), its last lead
    ever and its connections by state: the agency's list. A few statements whatever the number
    of companies, each reading through the company-first indexes (the counts and the last lead
    per company are index ranges and seeks, the clicks come from visit_rollup's counters)."""
    first, last, edges = rollup_span(start, end)
    companies = await db.fetchall(
        "SELECT c.id, c.name, c.created_at, (SELECT COUNT(*) FROM leads l "
        "WHERE l.company_id = c.id AND l.created_at >= ? AND l.created_at < ?) AS leads, "
        "(SELECT MAX(l.created_at) FROM leads l WHERE l.company_id = c.id) AS last_lead_at "
        "FROM companies c ORDER BY c.name, c.id", start, end)
    clicks: list[dict] = []
    if first < last:
        clicks += await db.fetchall(
            "SELECT c.id AS company_id, CAST(SUM(r.clicks) AS BIGINT) AS clicks, "
            "CAST(SUM(r.matched) AS BIGINT) AS matched FROM companies c JOIN visit_rollup r "
            "ON r.company_id = c.id AND r.dimension = '' AND r.bucket >= ? AND r.bucket < ? "
            "GROUP BY c.id", first, last)
    for edge_start, edge_end in edges:
        clicks += await db.fetchall(
            "SELECT c.id AS company_id, SUM(CASE WHEN v.clicks > 0 THEN 1 ELSE 0 END) "
            "AS clicks, SUM(CASE WHEN v.clicks > 0 AND v.lead_id IS NOT NULL THEN 1 ELSE 0 "
            "END) AS matched FROM companies c JOIN visits v ON v.company_id = c.id "
            "AND v.created_at >= ? AND v.created_at < ? GROUP BY c.id", edge_start, edge_end)
    connections = await db.fetchall(
        "SELECT company_id, state, COUNT(*) AS n FROM connections WHERE deleted_at IS NULL "
        "GROUP BY company_id, state")
    out = {row["id"]: {
        "company_id": row["id"], "name": row["name"], "created_at": iso(row["created_at"]),
        "leads": row["leads"], "matched_clicks": 0, "clicks": 0, "match_rate": None,
        "last_lead_at": iso(row["last_lead_at"]),
        "connections": {"total": 0, **{state: 0 for state in CONNECTION_STATES}, "other": 0},
    } for row in companies}
    for row in clicks:
        if row["company_id"] in out:
            out[row["company_id"]]["clicks"] += int(row["clicks"] or 0)
            out[row["company_id"]]["matched_clicks"] += int(row["matched"] or 0)
    for row in connections:
        if row["company_id"] in out:
            counts = out[row["company_id"]]["connections"]
            counts["total"] += row["n"]
            counts[row["state"] if row["state"] in CONNECTION_STATES else "other"] += row["n"]
    for summary in out.values():
        if summary["clicks"]:
            summary["match_rate"] = round(summary["matched_clicks"] / summary["clicks"], 4)
    return list(out.values())


async def onboarding_progress(db: Storage, company_id: str) -> dict:
    """How far a company got: its first and last visit, its visits (visit_rollup's counters,
    not a count of the visits), its connections, its first lead and its leads, all time."""
    row = await db.fetchone(
        "SELECT (SELECT MIN(created_at) FROM visits WHERE company_id = ?) AS first_visit_at, "
        "(SELECT MAX(created_at) FROM visits WHERE company_id = ?) AS last_visit_at, "
        "(SELECT CAST(SUM(visits) AS BIGINT) FROM visit_rollup WHERE company_id = ? "
        "AND dimension = '') AS visits, "
        "(SELECT MIN(created_at) FROM leads WHERE company_id = ?) AS first_lead_at, "
        "(SELECT COUNT(*) FROM leads WHERE company_id = ?) AS leads, "
        "(SELECT COUNT(*) FROM connections WHERE company_id = ? AND deleted_at IS NULL) "
        "AS connections, (SELECT COUNT(*) FROM connections WHERE company_id = ? "
        "AND deleted_at IS NULL AND state = 'open') AS open_connections", *[company_id] * 7)
    return {"first_visit_at": iso(row["first_visit_at"]),
            "last_visit_at": iso(row["last_visit_at"]), "visits": int(row["visits"] or 0),
            "connections": {"total": row["connections"], "open": row["open_connections"]},
            "first_lead_at": iso(row["first_lead_at"]), "leads": row["leads"]}


# ##################################################################################################
# Domain: retention and erasure
# ##################################################################################################

RETENTION_CHUNK = 5000  # rows deleted per transaction: short, so the writer is never held long
RETENTION_INTERVAL = 3600  # seconds between purges


async def purge_expired(db: Storage, retention_days: int) -> dict:
    """Delete raw tracking events, raw webhook bodies and message-id records older than the
    retention period, in short chunks. Safe to run from several processes at once."""
    cutoff = now() - retention_days * 86400
    purged = {}
    for table, column in (("tracking_events", "created_at"),
                          ("webhook_deliveries", "received_at"), ("messages", "created_at")):
        total = 0
        while True:
            async def run(tx: Tx, table=table, column=column) -> int:
                return await tx.execute(
                    f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} "
                    f"WHERE {column} < ? ORDER BY id LIMIT ?)", cutoff, RETENTION_CHUNK)
            deleted = await db.transact(run)
            total += deleted
            if deleted < RETENTION_CHUNK:
                break
        purged[table] = total
    return purged


ERASE_WINDOW = 2000  # raw webhook bodies searched per transaction when erasing a person


async def erase_contact(db: Storage, company_id: str, phone: str | None = None,
                        bsuid: str | None = None) -> dict:
    """Erase one person (LGPD/GDPR), known by phone (either Brazilian form) or by BSUID: their
    leads with events and deliveries, message records, the contact, and the raw webhook bodies
    that mention the number or the id. Visits stay (they hold no personal data) but their codes
    are spent, so nobody else can be matched to them."""
    forms = list(phone_forms(phone)) if phone else [bsuid]
    columns = ("phone", "wa_id") if phone else ("bsuid",)

    async def run(tx: Tx) -> dict:
        matches = [tx.any_of(column, forms) for column in columns]
        person = f"company_id = ? AND ({' OR '.join(where for where, _ in matches)})"
        args = [arg for _, more in matches for arg in more]
        contacts = [r["id"] for r in await tx.fetchall(
            f"SELECT id FROM contacts WHERE {person}", company_id, *args)]
        lead_rows = await tx.fetchall(f"SELECT id, visit_id FROM leads WHERE {person}",
                                      company_id, *args)
        taken = {r["id"] for r in lead_rows}
        for contact_id in contacts:
            lead_rows += [r for r in await tx.fetchall(
                "SELECT id, visit_id FROM leads WHERE company_id = ? AND contact_id = ?",
                company_id, contact_id) if r["id"] not in taken]
        erased = dict.fromkeys(("leads", "lead_events", "deliveries", "messages", "contacts",
                                "webhook_deliveries"), 0)
        ts = now()
        for lead in lead_rows:
            erased["deliveries"] += await tx.execute("DELETE FROM deliveries WHERE lead_id = ?",
                                                     lead["id"])
            erased["lead_events"] += await tx.execute("DELETE FROM lead_events WHERE lead_id = ?",
                                                      lead["id"])
            erased["messages"] += await tx.execute(
                "DELETE FROM messages WHERE company_id = ? AND lead_id = ?", company_id, lead["id"])
            if lead["visit_id"] is not None:
                await tx.execute("UPDATE visits SET expires_at = ? WHERE id = ?", ts,
                                 lead["visit_id"])
            erased["leads"] += await tx.execute("DELETE FROM leads WHERE id = ?", lead["id"])
        for contact_id in contacts:
            erased["messages"] += await tx.execute(
                "DELETE FROM messages WHERE company_id = ? AND contact_id = ?", company_id,
                contact_id)
            erased["contacts"] += await tx.execute("DELETE FROM contacts WHERE id = ?",
                                                   contact_id)
        return erased

    erased = await db.transact(run)
    # Raw bodies: scanned in windows of ids, one short transaction each, so a large table never
    # holds the writer (on SQLite, the event loop) for long.
    bounds = await db.fetchone("SELECT MIN(id) AS low, MAX(id) AS high FROM webhook_deliveries "
                               "WHERE company_id = ?", company_id)
    low, high = bounds["low"], bounds["high"]
    while low is not None and low <= high:
        async def scan(tx: Tx, start=low) -> int:
            return await tx.execute(
                "DELETE FROM webhook_deliveries WHERE company_id = ? AND id >= ? AND id < ? "
                f"AND ({' OR '.join([db.blob_contains('body')] * len(forms))})", company_id,
                start, start + ERASE_WINDOW, *(form.encode() for form in forms))
        erased["webhook_deliveries"] += await db.transact(scan)
        low += ERASE_WINDOW
    return erased


# ##################################################################################################
# Integrations: outbound URLs a company sets
#
# A company's CRM webhook and Evolution server are URLs it chooses and this server fetches: they
# must not reach what only this server can (itself, the private network, a cloud's metadata
# service at 169.254.169.254). They are checked when set (400 naming the field), and the address
# each connection actually goes to is checked again (a socket factory on the session used for
# them), so a name that later resolves elsewhere (DNS rebinding) is caught too. URLs the operator
# sets (ADMIN_TOKEN, the CLI) are recorded in the company's settings under "operator_urls"
# (field -> URL) and used as they are while they stay unchanged; ALLOW_PRIVATE_URLS=true allows
# private addresses for every company. The operator's own URLs (EVOLUTION_API_URL, META_GRAPH_URL,
# GA4_MP_URL) are never restricted.
# ##################################################################################################

OPERATOR_URLS = "operator_urls"  # company settings key, never shown nor settable by a company
# The two outbound HTTP sessions: (open, connecting to public addresses only); see session_for.
Sessions = tuple[aiohttp.ClientSession, aiohttp.ClientSession]
RESOLVE_TIMEOUT = 5  # seconds to resolve a URL's host name when the URL is set
PRIVATE_URL_REFUSED = ("{field} must point to a public internet address, not a loopback, "
                       "private or link-local one (only the operator can set such a URL)")


class NonPublicAddress(OSError):
    """A connection to a URL a company chose would go to a non-public address."""


def public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """On the public internet: not loopback, private, link-local, CGNAT, multicast, unspecified,
    reserved or documentation, also when wrapped in an IPv4-mapped or 6to4 IPv6 address."""
    if address.version == 6:
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return public_address(embedded)
        if address.is_site_local:
            return False
    return address.is_global and not (address.is_multicast or address.is_reserved)


def _sockaddr_public(sockaddr: tuple) -> bool:
    return public_address(ipaddress.ip_address(sockaddr[0].partition("%")[0]))


def public_socket(addr_info: tuple) -> socket.socket:
    """aiohttp's socket factory for URLs companies chose: refuses a non-public address."""
    family, kind, proto, _, sockaddr = addr_info
    if not _sockaddr_public(sockaddr):
        raise NonPublicAddress(f"{sockaddr[0]} is not a public address")
    return socket.socket(family, kind, proto)


def refused_address(exc: BaseException) -> bool:
    """Whether an aiohttp error is public_socket's refusal."""
    return any(isinstance(e, NonPublicAddress)
               for e in (exc, getattr(exc, "os_error", None), exc.__cause__))


async def refuse_private_url(field: str, url: str) -> None:
    """Refused(400) naming the field when a URL's host is, or resolves to, a non-public address
    (any spelling: 2130706433, 0x7f.1, [::ffff:127.0.0.1] are all resolved to 127.0.0.1
    first)."""
    import yarl

    try:
        parsed = yarl.URL(url)
        host, port = parsed.raw_host, parsed.port
    except (ValueError, TypeError):
        host = port = None
    if not host:
        raise Refused(400, f"{field} must be an http(s) URL")
    try:
        infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
            host, port or 443, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
    except (OSError, UnicodeError, ValueError, asyncio.TimeoutError):
        raise Refused(400, f"{field}: its host name does not resolve") from None
    if not infos or not all(_sockaddr_public(info[4]) for info in infos):
        raise Refused(400, PRIVATE_URL_REFUSED.format(field=field))


def operator_set(company: Company, field: str, url: str | None) -> bool:
    """Whether the operator set this URL for this field (and it has not changed since)."""
    return bool(url) and (company.settings.get(OPERATOR_URLS) or {}).get(field) == url


def company_chose(config: Config, company: Company, field: str, url: str | None) -> bool:
    """Whether an outbound URL is the company's own choice rather than the operator's."""
    if field == "evolution_url" and url == config.evolution_api_url:
        return False
    return not operator_set(company, field, url)


def session_for(config: Config, company: Company, field: str, url: str | None,
                sessions: Sessions) -> aiohttp.ClientSession:
    """Of the two outbound sessions (open, public addresses only), the one for this URL: the
    restricted one unless the URL is the operator's or ALLOW_PRIVATE_URLS is on."""
    if config.allow_private_urls or not company_chose(config, company, field, url):
        return sessions[0]
    return sessions[1]


def sent_urls(evolution: Mapping[str, Any], body: Mapping[str, Any]) -> dict[str, str]:
    """The outbound URLs a company create or update sets, by field name."""
    urls = {}
    if evolution.get("evolution_url"):
        urls["evolution_url"] = evolution["evolution_url"]
    urls.update((field, url) for field, url in destination_urls(body).items()
                if isinstance(url, str))
    return urls


def record_operator_urls(settings: Mapping[str, Any], urls: Mapping[str, str]) -> dict:
    """The settings with the URLs the operator just set recorded as the operator's."""
    if not urls:
        return dict(settings)
    return {**settings, OPERATOR_URLS: {**(settings.get(OPERATOR_URLS) or {}), **urls}}


# ##################################################################################################
# Integrations: Evolution API v2 (the REST routes of the Evolution contract, §1-§3)
#
# Evolution answers errors in its own shape ({"status", "error", "response": {"message": ...}},
# the message a string, a list or a list of lists), and `connect` / `restart` answer HTTP 200 with
# {"error": true} when they fail. EvolutionClient turns all of that into EvolutionError with the
# status and sentence WhatsTracking answers with.
# ##################################################################################################

# Seconds Evolution always waits inside /instance/create with qrcode:true before it answers
# (`delay(5000)` after starting the socket, 2.3.6 to 2.4.0-rc2): the create call gets them on top
# of EVOLUTION_TIMEOUT, so a slow socket start-up is no timeout.
EVOLUTION_CREATE_WAIT = 5
EVOLUTION_EVENTS = ["MESSAGES_UPSERT", "CONNECTION_UPDATE", "QRCODE_UPDATED", "LABELS_EDIT",
                    "LABELS_ASSOCIATION"]
WEBHOOK_SECRET_HEADER = "x-webhook-secret"
CONNECTION_ID_RE = COMPANY_ID_RE  # an instance name we create or adopt: the same rule (ID_RULE)


def is_connection_id(value: Any) -> bool:
    """Whether `value` is a connectionId by CONNECTION_ID_RE, as the management calls check it.
    The onboarding link, its page and QR and /public/get-connection look a name up as given
    instead (a row a webhook made is named by Evolution, not by this rule)."""
    return isinstance(value, str) and CONNECTION_ID_RE.match(value) is not None


class EvolutionError(Exception):
    """An Evolution call that failed, with the status and sentence to answer our client with.
    `unanswered`: the request went out and no answer came ("timeout", or "cut off" when the
    connection dropped mid-answer), so Evolution may have done what it was asked."""

    def __init__(self, status: int, message: str, upstream_status: int | None = None,
                 unanswered: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.upstream_status = upstream_status
        self.unanswered = unanswered


def evolution_message(body: Any) -> str:
    """The human part of an Evolution error body, whichever of its shapes it has."""
    if isinstance(body, dict):
        message = body.get("message")
        response = body.get("response")
        if isinstance(response, dict) and response.get("message") is not None:
            message = response["message"]
        while isinstance(message, list) and message:
            message = message[0] if len(message) == 1 else "; ".join(map(str, message))
        if isinstance(message, str) and message:
            return message
        if isinstance(body.get("error"), str):
            return body["error"]
    return "no message"


class EvolutionClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str, timeout: float,
                 company_chose: bool = False) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        # A server the company chose: a closed port, a timeout and a service that is not
        # Evolution read alike, so the errors map nothing (they are no port scanner).
        self.company_chose = company_chose

    async def call(self, method: str, path: str, body: Any = None,
                   timeout: float | None = None) -> tuple[int, Any]:
        """(HTTP status, parsed JSON) of one Evolution call; EvolutionError(502) when Evolution
        cannot be reached, is too slow, answers something that is not JSON, or is a 2.4 server
        not activated yet (its licence gate answers every route 503 LICENSE_REQUIRED)."""
        url = self.base_url + path
        timeout = timeout or self.timeout
        try:
            async with self.session.request(
                    method, url, json=body, headers={"apikey": self.api_key},
                    timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                raw = await resp.read()
                status = resp.status
        except asyncio.TimeoutError:
            raise self.unanswered("timeout", EvolutionError(
                502, f"Evolution API did not answer within {timeout:g} seconds "
                     f"({method} {path})")) from None
        except aiohttp.InvalidURL:  # e.g. http://2130706433/, which yarl will not connect to
            raise EvolutionError(400, "evolution_url is not a usable http(s) URL") from None
        except aiohttp.ClientError as exc:
            if refused_address(exc):
                raise EvolutionError(
                    400, PRIVATE_URL_REFUSED.format(field="evolution_url")) from None
            error = self.unreachable() or EvolutionError(
                502, f"Evolution API is unreachable at {self.base_url} "
                     f"({exc.__class__.__name__})")
            # Connected, then cut off before the whole answer came: the request may have run.
            cut_off = (isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError))
                       or (isinstance(exc, aiohttp.ClientOSError)
                           and not isinstance(exc, aiohttp.ClientConnectorError)))
            raise self.unanswered("cut off", error) if cut_off else error from None
        try:
            parsed = parse_json(raw, scrub=True) if raw else None
        except NotJson:
            raise self.unreachable() or EvolutionError(
                502, f"Evolution API answered {method} {path} with something that is not JSON "
                     f"(HTTP {status})", status) from None
        if status == 503 and isinstance(parsed, dict) and parsed.get("code") == "LICENSE_REQUIRED":
            raise EvolutionError(
                502, f"The Evolution server at {self.base_url} must be activated: Evolution 2.4 "
                     "refuses every API call (HTTP 503 LICENSE_REQUIRED) until it is activated "
                     f"in its manager ({self.base_url}/manager) or given a licensing key", status)
        return status, parsed

    def unanswered(self, how: str, error: EvolutionError) -> EvolutionError:
        """`error` (or the company's-own-server one) marked as a request left without answer."""
        error = self.unreachable() or error
        error.unanswered = how
        return error

    def unreachable(self) -> EvolutionError | None:
        """The one error for a company's own server that cannot be talked to (else None)."""
        if not self.company_chose:
            return None
        return EvolutionError(502, f"Evolution API is unreachable at {self.base_url}, or what "
                                   "answers there is not Evolution API: check evolution_url")

    def fail(self, status: int, body: Any, what: str) -> EvolutionError:
        """Map an Evolution error answer that no route handles specially."""
        if status == 401:
            return EvolutionError(502, "Evolution API refused the API key (401): check the "
                                       "company's Evolution key", status)
        message = evolution_message(body)
        if message in ("[object Object]", "no message"):  # Evolution lost its own error text
            message = "it reported an error without details (see the Evolution server's log)"
        return EvolutionError(502, f"Evolution API could not {what}: {message} (HTTP {status})",
                              status)

    @staticmethod
    def not_found(status: int, body: Any) -> bool:
        return status == 404 and "does not exist" in evolution_message(body)

    async def create_instance(self, name: str, token: str, webhook: dict,
                              number: str | None = None) -> dict:
        payload = {"instanceName": name, "integration": "WHATSAPP-BAILEYS", "token": token,
                   "qrcode": True, "webhook": webhook}
        if number:
            payload["number"] = number
        status, body = await self.call("POST", "/instance/create", payload,
                                       timeout=self.timeout + EVOLUTION_CREATE_WAIT)
        if status == 403 and "already in use" in evolution_message(body):
            raise EvolutionError(409, f"Connection {name} already exists on the Evolution server",
                                 status)
        if status not in (200, 201) or not isinstance(body, dict) or body.get("error") is True:
            raise self.fail(status, body, "create the instance")
        return body

    async def connection_state(self, name: str) -> str | None:
        status, body = await self.call("GET", f"/instance/connectionState/{name}")
        self._raise_for_instance(status, body, name, "read the connection state")
        instance = body.get("instance") if isinstance(body, dict) else None
        state = instance.get("state") if isinstance(instance, dict) else None
        return state if isinstance(state, str) else None

    async def fetch_instance(self, name: str) -> dict | None:
        """Owner number, profile name and picture, or None when Evolution does not say."""
        status, body = await self._fetch_instances(name)
        return self.instance_row(body, name) if status == 200 else None

    async def find_instance(self, name: str) -> dict:
        """The instance as fetchInstances shows it, with its own token (always shown by v2);
        EvolutionError(404) when the server has no such instance."""
        status, body = await self._fetch_instances(name)
        if status == 200:
            found = self.instance_row(body, name)
            if found is not None:
                return found
        elif status != 404 or evolution_message(body).startswith("Cannot "):  # not "not found"
            raise self.fail(status, body, "look the instance up")
        raise EvolutionError(404, "Connection not found", status)

    async def _fetch_instances(self, name: str) -> tuple[int, Any]:
        return await self.call(
            "GET", "/instance/fetchInstances?" + urllib.parse.urlencode({"instanceName": name}))

    @staticmethod
    def instance_row(body: Any, name: str) -> dict | None:
        """One instance of a fetchInstances answer (v2 array of rows; v1 objects): owner JID,
        profile, state, Evolution's id and the instance token, each text or None."""
        rows = body if isinstance(body, list) else [body]
        for row in rows:
            if not isinstance(row, dict):
                continue
            inner = row.get("instance")
            if row.get("name") == name:  # v2
                found = {"owner": row.get("ownerJid"), "profile_name": row.get("profileName"),
                         "picture_url": row.get("profilePicUrl"),
                         "state": row.get("connectionStatus"), "instance_id": row.get("id"),
                         "token": row.get("token")}
            elif isinstance(inner, dict) and inner.get("instanceName") == name:  # v1
                found = {"owner": inner.get("owner"), "profile_name": inner.get("profileName"),
                         "picture_url": inner.get("profilePictureUrl"),
                         "state": inner.get("status"), "instance_id": inner.get("instanceId"),
                         "token": None}
            else:
                continue
            return {k: v if isinstance(v, str) else None for k, v in found.items()}
        return None

    async def set_webhook(self, name: str, webhook: dict) -> dict:
        """Point the instance's webhook at us (v2's nested body, CONTRACT §3.8)."""
        status, body = await self.call("POST", f"/webhook/set/{name}", {"webhook": webhook})
        self._raise_for_instance(status, body, name, "set the instance's webhook")
        return body

    async def connect(self, name: str) -> dict:
        """The current QR ({code, pairingCode, base64, count}) or {"instance": {"state": "open"}}."""
        status, body = await self.call("GET", f"/instance/connect/{name}")
        self._raise_for_instance(status, body, name, "produce a QR code")
        return body

    async def restart(self, name: str) -> dict:
        status, body = await self.call("POST", f"/instance/restart/{name}")
        if status == 404 and "Cannot POST" in evolution_message(body):
            status, body = await self.call("PUT", f"/instance/restart/{name}")  # Evolution v1
        if status == 200 and isinstance(body, dict) and body.get("error") is True:
            raise EvolutionError(409, f"Connection {name} is not connected, so it cannot be "
                                      "restarted: scan its QR code first", status)
        self._raise_for_instance(status, body, name, "restart the instance")
        return body

    async def logout(self, name: str) -> dict:
        status, body = await self.call("DELETE", f"/instance/logout/{name}")
        if status == 400 and "not connected" in evolution_message(body):
            raise EvolutionError(409, f"Connection {name} is not connected, so there is nothing "
                                      "to log out", status)
        self._raise_for_instance(status, body, name, "log out")
        return body

    async def delete(self, name: str) -> bool:
        """Delete the instance; False when Evolution no longer had it (which counts as done)."""
        status, body = await self.call("DELETE", f"/instance/delete/{name}")
        if self.not_found(status, body):
            return False
        self._raise_for_instance(status, body, name, "delete the instance")
        return True

    async def list_instances(self) -> list:
        """Every instance the key may see (`fetchInstances`): the cheapest call that proves the
        server answers and takes the key."""
        status, body = await self.call("GET", "/instance/fetchInstances")
        if status != 200 or not isinstance(body, list):
            raise self.fail(status, body, "list its instances")
        return body

    async def find_webhook(self, name: str) -> dict | None:
        """The instance's webhook as Evolution stores it (`url`, `headers`, `enabled`, `events`,
        `webhookByEvents`; CONTRACT §3.8), or None when it has none."""
        status, body = await self.call("GET", "/webhook/find/" + urllib.parse.quote(name, safe=""))
        if self.not_found(status, body):
            raise EvolutionError(404, "Connection not found", status)
        if status != 200:
            raise self.fail(status, body, "read the instance's webhook")
        return body if isinstance(body, dict) else None

    def _raise_for_instance(self, status: int, body: Any, name: str, what: str) -> None:
        if self.not_found(status, body):
            raise EvolutionError(404, "Connection not found", status)
        if status not in (200, 201) or not isinstance(body, dict) or body.get("error") is True:
            raise self.fail(status, body, what)


# ##################################################################################################
# Integrations: conversions out (Meta Conversions API, GA4 Measurement Protocol, TikTok Events
# API, Google's Data Manager API, signed webhook)
#
# Each destination is one small class in DESTINATIONS: its settings (which are secret, which it
# cannot send without), the platform's event for (company, lead, event) or an Outcome saying why
# it is not sent, the HTTP request that carries it, and how the platform's answer reads. Everything
# else (settings validation, secrets masked, the outbox rows, the worker, the test event, the
# doctor) loops over the registry. The answer becomes an Outcome: delivered (the platform says it
# took the event: an HTTP 2xx is not enough where the platform answers refusals with 200),
# retry (network errors, 5xx, 429 and what the platform calls transient; honouring Retry-After),
# failed (any other refusal), processing (taken, its result to be asked for later: Data Manager)
# or skipped (the platform would refuse it: too old, nothing to match on, no event name mapped).
# The platform's documented answer fields are kept on the delivery (GET /api/deliveries).
# ##################################################################################################

DELIVERY_MAX_ATTEMPTS = 8
DELIVERY_BACKOFF_MAX = 6 * 3600  # seconds
# Checks of a request still processing (Data Manager) before the delivery is given up: with the
# backoff (30 s doubling, capped at 6 h) they span about three days.
DELIVERY_POLL_MAX = 20
# Seconds a claimed row stays its worker's beyond the delivery timeout (it is sent at once): the
# reads before the request and the write after it. A worker killed meanwhile leaves the row
# `sending`; once the lock has passed, it is sent again (delivery is at least once).
DELIVERY_LOCK_MARGIN = 60
# The phone number test events carry (Brazil's 5511 9... is a mobile range; no one's number is
# needed for a test the platforms keep apart).
TEST_PHONE = "5511900000000"


@dataclasses.dataclass
class Outcome:
    status: str  # delivered | retry | failed | skipped | processing
    http_status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    response: str | None = None  # the platform's answer as kept (JSON text)


@dataclasses.dataclass(frozen=True)
class EventFacts:
    """What the worker reads for a lead event besides the lead and the event themselves."""
    user_agent: str | None = None  # the browser of the lead's visit (website leads)
    purchase_id: str | None = None  # a refund's purchase: the lead's latest before it (event_id)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime
        return max(0.0, parsedate_to_datetime(value).timestamp() - now())
    except (TypeError, ValueError):
        return None


ANSWER_TEXT_MAX = 500  # characters kept of one field of a platform's answer


def _documented(source: Any, fields: tuple[str, ...]) -> dict:
    """The named fields of a platform's JSON answer, as short text, numbers or true/false, and
    lists of those (ten at most); nothing else."""
    if not isinstance(source, dict):
        return {}
    out = {}
    for key in fields:
        value = source.get(key)
        if value is None:
            continue
        if isinstance(value, list):
            value = [v if isinstance(v, (int, float)) and not isinstance(v, bool)
                     else str(v)[:ANSWER_TEXT_MAX] for v in value[:10]]
        elif not isinstance(value, (int, bool)):
            value = str(value)[:ANSWER_TEXT_MAX]
        out[key] = value
    return out


def _json_answer(raw: bytes) -> Any:
    try:
        return parse_json(raw, scrub=True)
    except NotJson:
        return None


def event_value(company: Company, event: Mapping[str, Any], always: bool = False) -> dict | None:
    """{"value", "currency"} of an event that has a value, or of one whose platform event needs
    them (`always`: a purchase's, 0 when unknown); None otherwise."""
    if event["value"] is None and not always:
        return None
    return {"value": event["value"] or 0,
            "currency": event["currency"] or company.settings["currency"]}


def e164_hashes(phone: str | None) -> list[str]:
    """SHA-256 of each form of the number in E.164 with its `+` (Google, TikTok), the dialable
    form first."""
    return [sha256_hex("+" + form) for form in phone_forms(phone)]


class Destination:
    """A platform a company's lead events are sent to. A subclass sets the class attributes and
    writes `event`, `request` and `test_event` (and `outcome` if the platform's answers need it);
    DESTINATIONS lists one instance of each."""

    name = ""  # the key of its settings (`{"meta": {...}}`) and of its outbox rows
    fields: Mapping[str, bool] = {}  # its settings fields → whether each is a write-only secret
    required: tuple[str, ...] = ()  # the fields it cannot send without
    # The field holding a URL the company chose: checked when set and sent through the
    # public-only session (see "Integrations: outbound URLs a company sets"); None: it posts to
    # the operator's URL, a setting of this server.
    company_url: str | None = None
    # (error sentence, answer to keep) from the platform's reply body: its documented fields
    # only. None: the reply is not read at all, its status alone counts.
    answer: Callable[[bytes], tuple[str | None, str | None]] | None = None
    # What a test event needs beside `required` (Meta's and TikTok's test codes): given in the
    # test request's body or kept in the settings.
    test_fields: tuple[str, ...] = ()

    @property
    def url_field(self) -> str | None:
        """The company's URL as errors and operator_urls name it: `crm_webhook.url`."""
        return f"{self.name}.{self.company_url}" if self.company_url else None

    def set_up(self, settings: Mapping[str, Any]) -> bool:
        """The company has settings for it and has not switched it off."""
        given = settings.get(self.name)
        return isinstance(given, dict) and bool(given.get("enabled", True))

    def missing(self, settings: Mapping[str, Any]) -> list[str]:
        """Its required fields the company's settings leave empty."""
        given = settings.get(self.name) or {}
        return [field for field in self.required if not given.get(field)]

    def configured(self, settings: Mapping[str, Any]) -> bool:
        """Set up and complete: lead events are queued for it."""
        return self.set_up(settings) and not self.missing(settings)

    def event(self, company: Company, lead: Mapping[str, Any], event: Mapping[str, Any],
              facts: EventFacts) -> dict | Outcome:
        """The platform's event for a lead event, or an Outcome saying why it is not sent."""
        raise NotImplementedError

    def request(self, config: Config, settings: Mapping[str, Any],
                payload: dict) -> tuple[str, bytes, dict[str, str]]:
        """(URL, JSON body, extra headers) of the POST carrying `payload`; `settings` are the
        company's settings of this destination, complete (see `required`)."""
        raise NotImplementedError

    def test_event(self, company: Company) -> dict:
        """A made-up event for "Send a test event" (POST /api/destinations/{name}/test)."""
        raise Refused(400, f"{self.name} has no test event")

    def test_request(self, config: Config, settings: Mapping[str, Any],
                     payload: dict) -> tuple[str, bytes, dict[str, str]]:
        """The request of a test event: one the platform keeps apart from real conversions
        (a test code, a validation endpoint, validate-only)."""
        return self.request(config, settings, payload)

    async def authorize(self, session: aiohttp.ClientSession, config: Config,
                        settings: Mapping[str, Any]) -> dict[str, str] | Outcome:
        """Headers that authenticate the request, when they must be fetched first (an OAuth
        token), or an Outcome saying why they could not be."""
        return {}

    async def follow_up(self, session: aiohttp.ClientSession, config: Config,
                        settings: Mapping[str, Any], kept: Any) -> Outcome | None:
        """For a row whose kept answer says the platform is still processing it: ask how it
        went. None: send the event (again)."""
        return None

    def outcome(self, status: int, raw: bytes, retry_after: float | None) -> Outcome:
        """The platform's answer (`raw`: b"" when `answer` is None) as an Outcome: 2xx delivered,
        5xx and 429 retry, any other status failed; `answer`'s fields kept. A platform that says
        "refused" with HTTP 200 overrides this."""
        detail, kept = self.answer(raw) if self.answer else (None, None)
        if 200 <= status < 300:
            return Outcome("delivered", status, response=kept)
        kind = "retry" if status >= 500 or status == 429 else "failed"
        error = f"HTTP {status}" + (f": {detail}" if detail else "")
        return Outcome(kind, status, error=error, retry_after=retry_after, response=kept)

    def test_outcome(self, status: int, raw: bytes, retry_after: float | None) -> Outcome:
        """A test event's answer as an Outcome (a validation endpoint's findings)."""
        return self.outcome(status, raw, retry_after)


async def post_json(session: aiohttp.ClientSession, destination: Destination, url: str, body: bytes,
                    headers: Mapping[str, str], timeout: float,
                    read: Callable[[int, bytes, float | None], Outcome] | None = None,
                    method: str = "POST") -> Outcome:
    """POST a delivery (or GET a status: `method`). Only the destination's documented fields of
    the reply are kept (the CRM webhook's reply: none, its status only), and every network
    failure reads "unreachable", so a company's URL is no window onto what it reaches nor a port
    scanner. `read`: how the answer becomes an Outcome (the destination's `outcome`)."""
    field = destination.url_field or "the URL"
    try:
        async with session.request(method, url, data=body if method == "POST" else None,
                                   headers={"Content-Type": "application/json", **headers},
                                   timeout=aiohttp.ClientTimeout(total=timeout),
                                   allow_redirects=False) as resp:
            raw = await resp.read() if destination.answer else b""
            status = resp.status
            retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
    except asyncio.TimeoutError:
        return Outcome("retry", error="unreachable")
    except aiohttp.InvalidURL:  # e.g. http://2130706433/, which yarl will not connect to
        return Outcome("failed", error=f"{field} is not a usable http(s) URL")
    except aiohttp.ClientError as exc:
        if refused_address(exc):
            return Outcome("failed", error=PRIVATE_URL_REFUSED.format(field=field))
        return Outcome("retry", error="unreachable")
    return (read or destination.outcome)(status, raw, retry_after)


META_WINDOW = 7 * 86400  # seconds: Meta refuses events older than 7 days
META_EVENT_NAMES = {
    # Website and chat leads: standard web events, plus a custom one for qualification.
    "website": {"lead": "Lead", "qualified": "QualifiedLead", "purchase": "Purchase"},
    # Click-to-WhatsApp leads (action_source business_messaging): Meta takes a closed set of
    # names here, and only LeadSubmitted and Purchase are ones every source agrees on (others,
    # QualifiedLead among them, are refused by some accounts with subcode 2804066:
    # docs.zernio.com/whatsapp/send-whatsapp-conversion). More by event_names.messaging.
    "messaging": {"lead": "LeadSubmitted", "purchase": "Purchase"},
}
META_ERROR_FIELDS = ("message", "type", "code", "error_subcode", "is_transient",
                     "error_user_title", "error_user_msg", "fbtrace_id")  # Graph API errors
META_ANSWER_FIELDS = ("events_received", "messages", "fbtrace_id")  # Conversions API success
# Graph API error codes Meta calls temporary ("wait and retry"): 1, 2 (service down), 4, 17, 341
# (throttling). They come as HTTP 400 (developers.facebook.com/docs/graph-api/guides/
# error-handling); `is_transient: true` says the same of any other code.
META_TRANSIENT_CODES = (1, 2, 4, 17, 341)


def meta_phone_hashes(phone: str | None) -> list[str]:
    """Meta's `ph`: digits with country code, SHA-256; a Brazilian mobile in both its forms
    (with and without the 9th digit), since Meta may know the person by either."""
    return [sha256_hex(form) for form in phone_forms(phone)]


class Meta(Destination):
    """Meta Conversions API (META_GRAPH_URL): website leads matched on the hashed phone and the
    fbc/fbp cookies, Click-to-WhatsApp leads on their ctwa_clid as business-messaging events
    (to their own dataset and token when set: a WABA's dataset is often not the pixel's).

    action_source: Meta asks for where the conversion happened (`website`: on your website;
    `chat`: "via a messaging app, SMS, or online messaging feature", parameters page). A website
    lead's `lead` event is the visit's click to WhatsApp, seen on the site with its URL and
    browser: `website`. What follows (qualified, purchase, refund) happens in the WhatsApp chat:
    `chat`, still matched on the visit's fbc/fbp and the hashed phone."""

    name = "meta"
    fields = {"dataset_id": False, "access_token": True, "test_event_code": False,
              "messaging_dataset_id": False, "messaging_access_token": True,
              "waba_id": False, "page_id": False, "event_names": False, "enabled": False}
    required = ("dataset_id", "access_token")
    test_fields = ("test_event_code",)

    def event(self, company: Company, lead: Mapping[str, Any], event: Mapping[str, Any],
              facts: EventFacts) -> dict | Outcome:
        meta = company.settings.get(self.name) or {}
        attribution = loads_or(lead["attribution"], {})
        ctwa = lead["match_method"] == "ctwa" and attribution.get("ctwa_clid")
        path = "messaging" if ctwa else "website"
        names = {**META_EVENT_NAMES[path], **((meta.get("event_names") or {}).get(path) or {})}
        name = names.get(event["name"])
        if not name:
            return Outcome("skipped",
                           error=f"no Meta event name for {event['name']} ({path} leads)")
        if now() - event["occurred_at"] > META_WINDOW:
            return Outcome("skipped", error="older than Meta's 7-day window")
        out: dict[str, Any] = {"event_name": name,
                               "event_time": int(min(event["occurred_at"], now())),  # never ahead
                               "event_id": event["event_id"]}
        if ctwa:
            # The business's identity on WhatsApp: its WABA id, or the Facebook Page where there
            # is no WABA (a number on the WhatsApp Business app); Meta asks for either.
            if meta.get("waba_id"):
                owner = {"whatsapp_business_account_id": meta["waba_id"]}
            elif meta.get("page_id"):
                owner = {"page_id": meta["page_id"]}
            else:
                return Outcome("skipped", error="neither the company's WhatsApp Business Account "
                                                "id (meta.waba_id) nor its Page id (meta.page_id) "
                                                "is set")
            out.update(action_source="business_messaging", messaging_channel="whatsapp",
                       user_data={**owner, "ctwa_clid": attribution["ctwa_clid"]})
        else:
            user: dict[str, Any] = {}
            if lead["phone"]:
                user["ph"] = meta_phone_hashes(lead["phone"])
            for key in ("fbc", "fbp"):
                if attribution.get(key):
                    user[key] = attribution[key]
            if "fbc" not in user and attribution.get("fbclid"):
                # Meta's documented fbc format, built from the click id when the cookie was missing.
                clicked = lead["clicked_at"] or lead["created_at"]
                user["fbc"] = f"fb.1.{int(clicked * 1000)}.{attribution['fbclid']}"
            if not user:
                return Outcome("skipped",
                               error="nothing to match the person on (no phone, fbc, fbp)")
            source_url = attribution.get("page_url") or attribution.get("landing_page")
            if (event["name"] == "lead" and lead["visit_id"] is not None and source_url
                    and facts.user_agent):
                user["client_user_agent"] = facts.user_agent
                out.update(action_source="website", event_source_url=source_url)
            else:
                out["action_source"] = "chat"  # the conversion happened in the WhatsApp chat
            out["user_data"] = user
        custom = event_value(company, event, event["name"] == "purchase")
        if custom:
            out["custom_data"] = custom
        return out

    def request(self, config: Config, settings: Mapping[str, Any],
                payload: dict) -> tuple[str, bytes, dict[str, str]]:
        dataset, token = settings["dataset_id"], settings["access_token"]
        if payload.get("action_source") == "business_messaging":
            dataset = settings.get("messaging_dataset_id") or dataset
            token = settings.get("messaging_access_token") or token
        body: dict[str, Any] = {"data": [payload], "access_token": token}
        if settings.get("test_event_code"):
            body["test_event_code"] = settings["test_event_code"]
        url = f"{config.meta_graph_url}/{config.meta_api_version}/{dataset}/events"
        return url, json_dumps(body).encode(), {}

    def test_event(self, company: Company) -> dict:
        return {"event_name": "Lead", "event_time": int(now()),
                "event_id": f"test-{uuid.uuid4().hex[:12]}", "action_source": "chat",
                "user_data": {"ph": meta_phone_hashes(TEST_PHONE)}}

    @staticmethod
    def answer(raw: bytes) -> tuple[str | None, str | None]:
        """Meta's documented fields: error.message, type, code, error_subcode, is_transient,
        error_user_title, error_user_msg, fbtrace_id; events_received, messages, fbtrace_id on
        success."""
        body = _json_answer(raw)
        error = _documented(body.get("error") if isinstance(body, dict) else None,
                            META_ERROR_FIELDS)
        if error:
            details = ", ".join(f"{k} {error[k]}" for k in ("type", "code", "error_subcode",
                                                             "fbtrace_id") if k in error)
            said = error.get("message") or error.get("error_user_msg") or "Meta error"
            return f"{said}" + (f" ({details})" if details else ""), json_dumps({"error": error})
        kept = _documented(body, META_ANSWER_FIELDS)
        return None, json_dumps(kept) if kept else None

    def outcome(self, status: int, raw: bytes, retry_after: float | None) -> Outcome:
        """Delivered only when Meta counts the event received (it may answer 200 with
        events_received 0 and say why in `messages`); its transient errors are retried."""
        detail, kept = self.answer(raw)
        answer = loads_or(kept, {})
        error = answer.get("error") or {}
        if error:
            transient = (error.get("is_transient") is True
                         or error.get("code") in META_TRANSIENT_CODES)
            kind = "retry" if transient or status >= 500 or status == 429 else "failed"
            return Outcome(kind, status, error=f"HTTP {status}: {detail}",
                           retry_after=retry_after, response=kept)
        if 200 <= status < 300:
            received = answer.get("events_received")
            if received != 1:
                said = "; ".join(answer.get("messages") or [])
                return Outcome("failed", status, response=kept,
                               error=f"Meta received {received or 0} of 1 events"
                                     + (f": {said}" if said else ""))
            return Outcome("delivered", status, response=kept)
        return super().outcome(status, raw, retry_after)


GA4_WINDOW = 72 * 3600  # seconds: GA4 accepts timestamps up to 72 hours back
GA4_EVENT_NAMES = {"lead": "generate_lead", "qualified": "qualify_lead", "purchase": "purchase",
                   "refund": "refund", "lost": "close_unconvert_lead"}
GA4_MESSAGE_FIELDS = ("fieldPath", "description", "validationCode")  # the validation server's
# Milliseconds of engagement an event carries: GA4 counts a session as engaged (and shows the
# event in Realtime) only with engagement_time_msec set (developers.google.com/analytics/
# devguides/collection/protocol/ga4/use-cases); one millisecond adds nothing to averages.
GA4_ENGAGEMENT_MSEC = 1


def ga4_debug_url(config: Config) -> str:
    """GA4's validation server: the collect URL with /debug before /mp/collect."""
    base = config.ga4_mp_url
    if base.endswith("/mp/collect"):
        return base[:-len("/mp/collect")] + "/debug/mp/collect"
    return base


class Ga4(Destination):
    """GA4 Measurement Protocol (GA4_MP_URL): the event on the visitor's GA client id (the _ga
    cookie the tracker read) and session id (its _ga_<id> cookie), so GA4 attributes it to the
    session the ad click started. GA4 answers 2xx to everything, even events it drops: a
    delivery here says GA4 was reached, and only a test event (its validation server) checks
    an event."""

    name = "ga4"
    fields = {"measurement_id": False, "api_secret": True, "event_names": False, "enabled": False}
    required = ("measurement_id", "api_secret")

    def event(self, company: Company, lead: Mapping[str, Any], event: Mapping[str, Any],
              facts: EventFacts) -> dict | Outcome:
        """A refund carries `facts.purchase_id`, the event_id of the purchase it reverses (GA4
        matches refunds to purchases by transaction_id)."""
        ga4 = company.settings.get(self.name) or {}
        attribution = loads_or(lead["attribution"], {})
        client_id = attribution.get("ga_client_id")
        if not client_id:
            return Outcome("skipped", error="the lead has no GA client id (_ga cookie)")
        name = {**GA4_EVENT_NAMES, **(ga4.get("event_names") or {})}.get(event["name"])
        if not name:
            return Outcome("skipped", error=f"no GA4 event name for {event['name']}")
        if now() - event["occurred_at"] > GA4_WINDOW:
            return Outcome("skipped", error="older than GA4's 72-hour window")
        # event_id: our de-duplication key (delivery is at least once), as in every destination's
        # payload; GA4 itself de-duplicates only purchases, by transaction_id.
        params: dict[str, Any] = {"lead_source": attribution.get("utm_source") or "direct",
                                  "match_method": lead["match_method"],
                                  "event_id": event["event_id"],
                                  "engagement_time_msec": GA4_ENGAGEMENT_MSEC}
        session_id = str(attribution.get("ga_session_id") or "")
        if session_id.isdigit():
            params["session_id"] = session_id
        params.update(event_value(company, event, name in ("purchase", "refund")) or {})
        if name == "purchase":
            params["transaction_id"] = event["event_id"]
        elif name == "refund":
            params["transaction_id"] = facts.purchase_id or event["event_id"]
        return {"client_id": client_id, "timestamp_micros": int(event["occurred_at"] * 1_000_000),
                "events": [{"name": name, "params": params}]}

    def _url(self, base: str, settings: Mapping[str, Any]) -> str:
        return base + "?" + urllib.parse.urlencode(
            {"measurement_id": settings["measurement_id"], "api_secret": settings["api_secret"]})

    def request(self, config: Config, settings: Mapping[str, Any],
                payload: dict) -> tuple[str, bytes, dict[str, str]]:
        return self._url(config.ga4_mp_url, settings), json_dumps(payload).encode(), {}

    def test_event(self, company: Company) -> dict:
        return {"client_id": "1234567890.1700000000", "events": [{
            "name": "generate_lead", "params": {
                "event_id": f"test-{uuid.uuid4().hex[:12]}", "value": 0,
                "currency": company.settings["currency"],
                "engagement_time_msec": GA4_ENGAGEMENT_MSEC}}]}

    def test_request(self, config: Config, settings: Mapping[str, Any],
                     payload: dict) -> tuple[str, bytes, dict[str, str]]:
        # ENFORCE_RECOMMENDATIONS: the validation server also reports what GA4 would accept
        # but not use as documented (validating-events page).
        body = {**payload, "validation_behavior": "ENFORCE_RECOMMENDATIONS"}
        return self._url(ga4_debug_url(config), settings), json_dumps(body).encode(), {}

    @staticmethod
    def answer(raw: bytes) -> tuple[str | None, str | None]:
        """The Measurement Protocol answers 2xx with no body; its validation server
        (/debug/mp/collect) lists validationMessages."""
        body = _json_answer(raw)
        messages = body.get("validationMessages") if isinstance(body, dict) else None
        if not isinstance(messages, list):
            return None, None
        kept = [m for m in (_documented(m, GA4_MESSAGE_FIELDS) for m in messages[:10]) if m]
        sentence = "; ".join(f"{m.get('fieldPath', '')}: {m.get('description', '')} "
                             f"({m.get('validationCode', '')})" for m in kept)
        return sentence or None, json_dumps({"validationMessages": kept})

    def test_outcome(self, status: int, raw: bytes, retry_after: float | None) -> Outcome:
        """The validation server's answer: delivered with no validationMessages, else failed
        with them."""
        outcome = self.outcome(status, raw, retry_after)
        if outcome.status == "delivered" and outcome.response is None:
            return Outcome("failed", status, error="GA4's validation server gave no answer")
        detail, _ = self.answer(raw)
        if outcome.status == "delivered" and detail:
            return Outcome("failed", status, error=detail, response=outcome.response)
        return outcome


TIKTOK_EVENT_NAMES = {"lead": "Contact", "purchase": "CompletePayment"}  # standard web events
TIKTOK_ANSWER_FIELDS = ("code", "message", "request_id")
# TikTok answers HTTP 200 with its own `code`: 0 is success; 40100 (too many requests) and
# 50000/50002 (its system errors) are worth retrying; any other code is a refusal.
TIKTOK_RETRY_CODES = (40100, 50000, 50002)


class Tiktok(Destination):
    """TikTok Events API (TIKTOK_EVENTS_URL, /open_api/v1.3/event/track/): website leads with a
    ttclid (the TikTok ad click), matched on it, the hashed phone and the browser
    (ads.tiktok.com/marketing_api/docs?id=1741601162187777)."""

    name = "tiktok"
    fields = {"pixel_code": False, "access_token": True, "test_event_code": False,
              "event_names": False, "enabled": False}
    required = ("pixel_code", "access_token")
    test_fields = ("test_event_code",)

    def event(self, company: Company, lead: Mapping[str, Any], event: Mapping[str, Any],
              facts: EventFacts) -> dict | Outcome:
        tiktok = company.settings.get(self.name) or {}
        attribution = loads_or(lead["attribution"], {})
        if not attribution.get("ttclid"):
            return Outcome("skipped", error="the lead has no TikTok click id (ttclid)")
        name = {**TIKTOK_EVENT_NAMES, **(tiktok.get("event_names") or {})}.get(event["name"])
        if not name:
            return Outcome("skipped", error=f"no TikTok event name for {event['name']}")
        user: dict[str, Any] = {"ttclid": attribution["ttclid"]}
        if lead["phone"]:
            user["phone"] = e164_hashes(lead["phone"])
        if facts.user_agent:
            user["user_agent"] = facts.user_agent
        out: dict[str, Any] = {"event": name, "event_time": int(min(event["occurred_at"], now())),
                               "event_id": event["event_id"], "user": user}
        page = attribution.get("page_url") or attribution.get("landing_page")
        if page:
            out["page"] = {"url": page}
        value = event_value(company, event, event["name"] == "purchase")
        if value:
            out["properties"] = value
        return out

    def request(self, config: Config, settings: Mapping[str, Any],
                payload: dict) -> tuple[str, bytes, dict[str, str]]:
        body: dict[str, Any] = {"event_source": "web", "event_source_id": settings["pixel_code"],
                                "data": [payload]}
        if settings.get("test_event_code"):
            body["test_event_code"] = settings["test_event_code"]
        return (config.tiktok_events_url, json_dumps(body).encode(),
                {"Access-Token": settings["access_token"]})

    def test_event(self, company: Company) -> dict:
        return {"event": "Contact", "event_time": int(now()),
                "event_id": f"test-{uuid.uuid4().hex[:12]}",
                "user": {"phone": e164_hashes(TEST_PHONE)}}

    @staticmethod
    def answer(raw: bytes) -> tuple[str | None, str | None]:
        kept = _documented(_json_answer(raw), TIKTOK_ANSWER_FIELDS)
        if not kept:
            return None, None
        return f"code {kept.get('code')}: {kept.get('message', '')}", json_dumps(kept)

    def outcome(self, status: int, raw: bytes, retry_after: float | None) -> Outcome:
        """Delivered only with `code` 0: TikTok refuses with HTTP 200 and an error code."""
        if not 200 <= status < 300:
            return super().outcome(status, raw, retry_after)
        detail, kept = self.answer(raw)
        code = loads_or(kept, {}).get("code")
        if code == 0:
            return Outcome("delivered", status, response=kept)
        kind = "retry" if code in TIKTOK_RETRY_CODES else "failed"
        return Outcome(kind, status, error=f"TikTok {detail or 'answered without a code'}",
                       retry_after=retry_after, response=kept)


# Google's Data Manager API (developers.google.com/data-manager/api): events:ingest takes the
# conversion, requestStatus:retrieve says later whether Google Ads matched it.
DATA_MANAGER_SCOPE = "https://www.googleapis.com/auth/datamanager"
DATA_MANAGER_WINDOW = 90 * 86400  # seconds: Google Ads takes conversions of clicks up to 90 days
DATA_MANAGER_ERROR_FIELDS = ("code", "message", "status")  # google.rpc.Status
# requestStatus per destination: SUCCESS, PROCESSING, FAILED, PARTIAL_SUCCESS, or unknown.
DATA_MANAGER_PENDING = (None, "PROCESSING", "REQUEST_STATUS_UNKNOWN")
GOOGLE_CLICK_IDS = ("gclid", "gbraid", "wbraid")  # one per conversion, in this preference


def google_click_id(lead: Mapping[str, Any],
                    attribution: Mapping[str, Any]) -> tuple[str, str] | None:
    """(kind, value) of the lead's Google ad click: gclid, else gbraid or wbraid (iOS)."""
    for kind in GOOGLE_CLICK_IDS:
        value = attribution.get(kind) or (lead.get(kind) if kind == "gclid" else None)
        if value:
            return kind, value
    return None


def service_account_key(text: str) -> dict:
    """A service-account key (the JSON file Google Cloud gives) as a dict; ValueError if it is
    not one."""
    key = json.loads(text)
    if not isinstance(key, dict) or not all(isinstance(key.get(k), str) and key[k]
                                            for k in ("client_email", "private_key")):
        raise ValueError("a service-account key has client_email and private_key")
    return key


def google_error(raw: bytes) -> tuple[str | None, str | None]:
    """Google's error answers: {"error": {code, message, status}} (APIs) or {"error",
    "error_description"} (the OAuth token endpoint)."""
    body = _json_answer(raw)
    if not isinstance(body, dict):
        return None, None
    if isinstance(body.get("error"), dict):
        error = _documented(body["error"], DATA_MANAGER_ERROR_FIELDS)
        return (f"{error.get('message', '')} ({error.get('status', '')})" if error else None,
                json_dumps({"error": error}) if error else None)
    kept = _documented(body, ("error", "error_description", "requestId"))
    if "error" in kept:
        return f"{kept['error']}: {kept.get('error_description', '')}", json_dumps(kept)
    return None, json_dumps(kept) if kept else None


class DataManager(Destination):
    """Google's Data Manager API (DATA_MANAGER_URL), replacing the Google Ads API's conversion
    upload for new integrations since 2026-06-15: the conversion with its Google click id
    (gclid, or gbraid/wbraid from iOS) and the hashed phone (enhanced conversions for leads),
    sent as a service account (OAuth 2.0 JWT-bearer grant at GOOGLE_TOKEN_URL, signed by
    google-auth). Google answers a requestId and matches later: the delivery stays pending,
    its request's status asked with backoff until SUCCESS (delivered) or FAILED."""

    name = "data_manager"
    fields = {"service_account_key": True, "customer_id": False, "login_customer_id": False,
              "conversion_actions": False, "enabled": False}
    required = ("service_account_key", "customer_id", "conversion_actions")
    answer = staticmethod(google_error)

    def _destination(self, settings: Mapping[str, Any], action: str) -> dict:
        out: dict[str, Any] = {"operatingAccount": {"accountType": "GOOGLE_ADS",
                                                    "accountId": settings["customer_id"]},
                               "productDestinationId": action}
        if settings.get("login_customer_id"):  # a manager account acting for the customer
            out["loginAccount"] = {"accountType": "GOOGLE_ADS",
                                   "accountId": settings["login_customer_id"]}
        return out

    def event(self, company: Company, lead: Mapping[str, Any], event: Mapping[str, Any],
              facts: EventFacts) -> dict | Outcome:
        settings = company.settings.get(self.name) or {}
        action = (settings.get("conversion_actions") or {}).get(event["name"])
        if not action:
            return Outcome("skipped", error=f"no Google Ads conversion action for "
                                            f"{event['name']} (data_manager.conversion_actions)")
        attribution = loads_or(lead["attribution"], {})
        click = google_click_id(lead, attribution)
        phones = e164_hashes(lead["phone"])
        if click is None and not phones:
            return Outcome("skipped", error="nothing to match on (no Google click id, no phone)")
        if now() - event["occurred_at"] > DATA_MANAGER_WINDOW:
            return Outcome("skipped", error="older than Google Ads' 90-day click window")
        out: dict[str, Any] = {
            "eventTimestamp": datetime.fromtimestamp(min(event["occurred_at"], now()),
                                                     timezone.utc).isoformat(),
            "transactionId": event["event_id"],
            # Where the conversion happened, as for Meta: the click to WhatsApp on the site,
            # then the chat (OTHER: neither web, app, store nor phone call).
            "eventSource": "WEB" if event["name"] == "lead" and lead["visit_id"] else "OTHER"}
        if click:
            out["adIdentifiers"] = {click[0]: click[1]}
        if phones:
            out["userData"] = {"userIdentifiers": [{"phoneNumber": h} for h in phones]}
        value = event_value(company, event)
        if value:
            out.update(conversionValue=value["value"], currency=value["currency"])
        return {"destinations": [self._destination(settings, action)], "events": [out],
                "encoding": "HEX"}

    def request(self, config: Config, settings: Mapping[str, Any],
                payload: dict) -> tuple[str, bytes, dict[str, str]]:
        return f"{config.data_manager_url}/events:ingest", json_dumps(payload).encode(), {}

    def test_event(self, company: Company) -> dict:
        settings = company.settings.get(self.name) or {}
        action = next(iter(settings["conversion_actions"].values()))
        return {"destinations": [self._destination(settings, action)], "encoding": "HEX",
                "events": [{"eventTimestamp": datetime.now(timezone.utc).isoformat(),
                            "transactionId": f"test-{uuid.uuid4().hex[:12]}",
                            "eventSource": "OTHER",
                            "userData": {"userIdentifiers": [
                                {"phoneNumber": h} for h in e164_hashes(TEST_PHONE)]}}]}

    def test_request(self, config: Config, settings: Mapping[str, Any],
                     payload: dict) -> tuple[str, bytes, dict[str, str]]:
        url, _, headers = self.request(config, settings, payload)
        return url, json_dumps({**payload, "validateOnly": True}).encode(), headers

    async def authorize(self, session: aiohttp.ClientSession, config: Config,
                        settings: Mapping[str, Any]) -> dict[str, str] | Outcome:
        """An access token for the service account: a JWT signed with its key (RS256, by
        google-auth) exchanged at the token endpoint (RFC 7523)."""
        from google.auth import crypt, jwt  # only installs that use Data Manager sign JWTs
        try:
            key = service_account_key(settings["service_account_key"])
            signer = crypt.RSASigner.from_service_account_info(key)
        except (ValueError, TypeError):
            return Outcome("failed", error="data_manager.service_account_key is not a usable "
                                           "service-account key")
        issued = int(now())
        assertion = jwt.encode(signer, {"iss": key["client_email"], "scope": DATA_MANAGER_SCOPE,
                                        "aud": config.google_token_url, "iat": issued,
                                        "exp": issued + 3600}).decode()
        form = urllib.parse.urlencode({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                       "assertion": assertion}).encode()
        try:
            async with session.post(config.google_token_url, data=form, headers={
                    "Content-Type": "application/x-www-form-urlencoded"},
                    timeout=aiohttp.ClientTimeout(total=config.delivery_timeout),
                    allow_redirects=False) as resp:
                raw, status = await resp.read(), resp.status
        except (asyncio.TimeoutError, aiohttp.ClientError):
            return Outcome("retry", error="unreachable (Google's token endpoint)")
        body = _json_answer(raw)
        token = body.get("access_token") if isinstance(body, dict) else None
        if status == 200 and isinstance(token, str) and token:
            return {"Authorization": f"Bearer {token}"}
        detail, kept = google_error(raw)
        kind = "retry" if status >= 500 or status == 429 else "failed"
        return Outcome(kind, status, error=f"Google token endpoint: HTTP {status}"
                       + (f": {detail}" if detail else ""), response=kept)

    def outcome(self, status: int, raw: bytes, retry_after: float | None) -> Outcome:
        """events:ingest answers a requestId: the request is Google's now, its result later."""
        outcome = super().outcome(status, raw, retry_after)
        request_id = loads_or(outcome.response, {}).get("requestId")
        if outcome.status != "delivered":
            return outcome
        if not request_id:
            return Outcome("retry", status, error="Data Manager answered without a requestId")
        return Outcome("processing", status, response=json_dumps({"requestId": request_id}))

    def test_outcome(self, status: int, raw: bytes, retry_after: float | None) -> Outcome:
        outcome = super().outcome(status, raw, retry_after)  # validateOnly: nothing to ask later
        if outcome.status == "delivered":
            outcome.response = json_dumps({**loads_or(outcome.response, {}),
                                           "validateOnly": True})
        return outcome

    async def follow_up(self, session: aiohttp.ClientSession, config: Config,
                        settings: Mapping[str, Any], kept: Any) -> Outcome | None:
        if not isinstance(kept, dict) or not kept.get("requestId") \
                or kept.get("requestStatus") not in DATA_MANAGER_PENDING:
            return None
        keep = json_dumps(kept)
        auth = await self.authorize(session, config, settings)
        if isinstance(auth, Outcome):
            auth.response = keep  # the requestId stays: the next try asks again
            return auth
        url = f"{config.data_manager_url}/requestStatus:retrieve?" + urllib.parse.urlencode(
            {"requestId": kept["requestId"]})

        def read(status: int, raw: bytes, retry_after: float | None) -> Outcome:
            if not 200 <= status < 300:
                outcome = Destination.outcome(self, status, raw, retry_after)
                outcome.response = keep
                return outcome
            return self.request_status(status, kept["requestId"], _json_answer(raw))

        return await post_json(session, self, url, b"", auth, config.delivery_timeout, read,
                               method="GET")

    @staticmethod
    def request_status(status: int, request_id: str, body: Any) -> Outcome:
        """requestStatus:retrieve's answer for our one destination as an Outcome, its status,
        error reasons and counts kept."""
        per = body.get("requestStatusPerDestination") if isinstance(body, dict) else None
        first = per[0] if isinstance(per, list) and per and isinstance(per[0], dict) else {}
        state = first.get("requestStatus")
        kept: dict[str, Any] = {"requestId": request_id}
        if isinstance(state, str):
            kept["requestStatus"] = state[:ANSWER_TEXT_MAX]
        ingested = _documented(first.get("eventsIngestionStatus"), ("recordCount",))
        if ingested:
            kept["recordCount"] = ingested["recordCount"]
        for info in ("errorInfo", "warningInfo"):
            counts = (first.get(info) or {}).get(f"{info[:-4]}Counts") \
                if isinstance(first.get(info), dict) else None
            if isinstance(counts, list):
                kept[info] = [_documented(c, ("recordCount", "reason")) for c in counts[:10]]
        reasons = ", ".join(str(c.get("reason")) for c in kept.get("errorInfo", []))
        if state == "SUCCESS":
            return Outcome("delivered", status, response=json_dumps(kept))
        if state in DATA_MANAGER_PENDING:
            return Outcome("processing", status, response=json_dumps(kept))
        return Outcome("failed", status, response=json_dumps(kept),
                       error=f"Data Manager: {state}" + (f" ({reasons})" if reasons else ""))


def crm_payload(company: Company, lead: Mapping[str, Any], event: Mapping[str, Any]) -> dict:
    return {"type": f"lead.{event['name']}", "company_id": company.id,
            "event": event_json(event), "lead": lead_json(lead)}


def crm_signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class CrmWebhook(Destination):
    """The company's own webhook: every event with the whole lead, signed with HMAC-SHA256 of
    the body under the company's secret. Its reply is not read: the status alone counts."""

    name = "crm_webhook"
    fields = {"url": False, "secret": True, "enabled": False}
    required = ("url", "secret")
    company_url = "url"

    def event(self, company: Company, lead: Mapping[str, Any], event: Mapping[str, Any],
              facts: EventFacts) -> dict | Outcome:
        return crm_payload(company, lead, event)

    def request(self, config: Config, settings: Mapping[str, Any],
                payload: dict) -> tuple[str, bytes, dict[str, str]]:
        raw = json_dumps(payload).encode()
        headers = {"X-WhatsTracking-Signature": crm_signature(settings["secret"], raw),
                   "X-WhatsTracking-Timestamp": str(int(now())),
                   "X-WhatsTracking-Event": payload["type"]}
        return settings["url"], raw, headers

    def test_event(self, company: Company) -> dict:
        """A signed ping: the CRM checks the signature as for every event."""
        return {"type": "ping", "company_id": company.id, "sent_at": iso(now())}


# The registry: every loop over destinations goes through it, in this order.
DESTINATIONS: dict[str, Destination] = {
    d.name: d for d in (Meta(), Ga4(), Tiktok(), DataManager(), CrmWebhook())}
# Destination → its settings fields and whether each is a write-only secret (validate_settings
# accepts these fields, Company.public shows a secret only as `<field>_set`).
DESTINATION_FIELDS = {name: dict(d.fields) for name, d in DESTINATIONS.items()}


def destination_urls(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The URLs companies choose for destinations, by field (`crm_webhook.url`), as `settings`
    (a company's, or a request's) give them: None or anything else when not set."""
    out = {}
    for destination in DESTINATIONS.values():
        if destination.company_url:
            given = settings.get(destination.name)
            out[destination.url_field] = (given.get(destination.company_url)
                                          if isinstance(given, dict) else None)
    return out


async def send_payload(session: aiohttp.ClientSession, config: Config, destination: Destination,
                       settings: Mapping[str, Any], payload: dict, test: bool = False) -> Outcome:
    """POST one payload (a test event's when `test`) to a destination and read the answer."""
    auth = await destination.authorize(session, config, settings)
    if isinstance(auth, Outcome):
        return auth
    build = destination.test_request if test else destination.request
    url, body, headers = build(config, settings, payload)
    return await post_json(session, destination, url, body, {**headers, **auth},
                           config.delivery_timeout,
                           destination.test_outcome if test else destination.outcome)


async def send_delivery(session: aiohttp.ClientSession, config: Config, company: Company,
                        destination: Destination, lead: Mapping[str, Any], event: Mapping[str, Any],
                        facts: EventFacts, kept: Any = None) -> Outcome:
    """Send one lead event to one destination the company has configured; `kept`: the
    delivery's kept answer, when it says the platform is still processing it (asked instead)."""
    settings = company.settings.get(destination.name) or {}
    later = await destination.follow_up(session, config, settings, kept)
    if later is not None:
        return later
    payload = destination.event(company, lead, event, facts)
    if isinstance(payload, Outcome):
        return payload
    return await send_payload(session, config, destination, settings, payload)


async def test_destination(config: Config, sessions: Sessions, company: Company, name: str,
                           given: Mapping[str, Any]) -> dict:
    """"Send a test event": a made-up event the platform keeps apart (Meta's and TikTok's test
    codes, GA4's validation server, Data Manager's validateOnly, a signed ping to the CRM), and
    the platform's answer. `given`: the request's body (a test code not kept in the settings).
    Refused: not a destination (404), a bad test code (400), not set up or no test code
    (409: the request is right, the company's settings are not there yet); 502: the platform
    is unreachable."""
    destination = DESTINATIONS.get(name)
    if destination is None:
        raise Refused(404, "Not found")
    settings = dict(company.settings.get(name) or {})
    for field in ("test_event_code",):  # what a test request may bring (Meta's, TikTok's code)
        value = given.get(field)
        if value is not None and (not isinstance(value, str) or not value or len(value) > 256):
            raise Refused(400, f"{field} must be text of 1 to 256 characters")
        if value and value.strip() and field in destination.test_fields:
            settings[field] = value.strip()
    if not destination.set_up(company.settings):
        raise Refused(409, f"{name} is not set up" if name not in company.settings
                      else f"{name} is switched off ({name}.enabled)")
    if destination.missing(company.settings):
        raise Refused(409, f"{name} is not set up: " + ", ".join(
            f"{name}.{m}" for m in destination.missing(company.settings)))
    for field in destination.test_fields:
        if not settings.get(field):
            raise Refused(409, f"{name}.{field} is needed for a test event (the platform shows "
                               f"test events under it, apart from real conversions)")
    session = sessions[0]
    if destination.url_field:
        session = session_for(config, company, destination.url_field,
                              settings.get(destination.company_url), sessions)
    outcome = await send_payload(session, config, destination, settings,
                                 destination.test_event(company), test=True)
    if outcome.http_status is None and outcome.status == "retry":
        raise Refused(502, f"{name} is unreachable")
    return {"ok": outcome.status == "delivered", "destination": name, "status": outcome.status,
            "http_status": outcome.http_status, "error": outcome.error,
            "response": delivery_response(outcome.response)}


DUE = ("((status = 'pending' AND next_attempt_at <= ?) OR "
       "(status = 'sending' AND locked_until < ?))")  # an outbox row to send now (args: now, now)


async def claim_deliveries(db: Storage, lock_seconds: float, limit: int = 16,
                           per_company: int = 4) -> list[dict]:
    """Take up to `limit` due outbox rows for this worker, fairly: every company's first row
    before any company's second, and none past `per_company` rows in flight for one company
    (counting the rows every process is sending), so one company's slow endpoint cannot hold
    all of the workers. Due: pending rows whose time has come, and rows a crashed worker left
    `sending` past their lock. Safe with several processes (SKIP LOCKED). A large backlog costs
    one grouped scan (no sort of it): only each chosen company's first rows are read."""
    async def run(tx: Tx) -> list[dict]:
        ts = now()
        companies = await tx.fetchall(
            "SELECT company_id, MIN(CASE WHEN status = 'pending' OR locked_until < ? THEN "
            "next_attempt_at END) AS due_at, SUM(CASE WHEN status = 'sending' AND "
            "locked_until >= ? THEN 1 ELSE 0 END) AS busy FROM deliveries WHERE (status = "
            "'pending' AND next_attempt_at <= ?) OR status = 'sending' GROUP BY company_id",
            ts, ts, ts)
        shares = sorted((c["due_at"], c["company_id"], per_company - c["busy"])
                        for c in companies if c["due_at"] is not None and c["busy"] < per_company)
        shares = shares[:limit]  # the companies waiting longest; each sends one row at least
        if not shares:
            return []
        firsts = await tx.fetchall(" UNION ALL ".join(
            f"SELECT * FROM (SELECT id, company_id FROM deliveries WHERE company_id = ? AND {DUE}"
            " ORDER BY id LIMIT ?) AS first_rows" for _ in shares),
            *[arg for _, company_id, share in shares for arg in (company_id, ts, ts, share)])
        ids = fair_pick(firsts, [company_id for _, company_id, _ in shares], limit)
        if not ids:  # taken by another process meanwhile
            return []
        marks = ", ".join("?" * len(ids))
        return await tx.fetchall(
            "UPDATE deliveries SET status = 'sending', locked_until = ?, "
            "attempts = attempts + 1, updated_at = ? WHERE id IN (SELECT id FROM deliveries d "
            f"WHERE id IN ({marks}) AND {DUE}{db.skip_locked('d')}) RETURNING *",
            ts + lock_seconds, ts, *ids, ts, ts)

    return await db.transact(run)


def fair_pick(rows: list[Mapping[str, Any]], companies: list[str], limit: int) -> list[int]:
    """Up to `limit` row ids taken round-robin over `companies` (in that order): each one's
    first row, then each one's second..."""
    queues: dict[str, list[int]] = {company_id: [] for company_id in companies}
    for row in sorted(rows, key=lambda r: r["id"]):
        queues[row["company_id"]].append(row["id"])
    picked: list[int] = []
    while len(picked) < limit and any(queues.values()):
        for company_id in companies:
            if queues[company_id] and len(picked) < limit:
                picked.append(queues[company_id].pop(0))
    return picked


def backoff_seconds(attempts: int, base: float) -> float:
    """Exponential backoff with ±20% jitter: base, 2·base, 4·base… capped."""
    delay = min(base * 2 ** max(attempts - 1, 0), DELIVERY_BACKOFF_MAX)
    return delay * (0.8 + 0.4 * secrets.randbelow(1000) / 1000)


async def finish_delivery(db: Storage, row: Mapping[str, Any], outcome: Outcome,
                          retry_base: float) -> None:
    ts = now()
    status = outcome.status
    next_at = row["next_attempt_at"]
    error = outcome.error
    if status == "processing":  # the platform has it; ask again later, a while at most
        if row["attempts"] >= DELIVERY_POLL_MAX:
            status = "failed"
            error = f"still processing after {row['attempts']} checks"
        else:
            status = "pending"
            next_at = ts + backoff_seconds(row["attempts"], retry_base)
    elif status == "retry":
        # A request the platform is still processing (its requestId kept) counts its checks
        # against DELIVERY_POLL_MAX: a failed check must not end it sooner.
        polling = '"requestId"' in (outcome.response or "")
        if row["attempts"] >= (DELIVERY_POLL_MAX if polling else DELIVERY_MAX_ATTEMPTS):
            status = "failed"
        else:
            status = "pending"
            wait = backoff_seconds(row["attempts"], retry_base)
            if outcome.retry_after is not None:
                wait = max(wait, min(outcome.retry_after, 86400))
            next_at = ts + wait

    async def run(tx: Tx) -> None:
        await tx.execute(
            "UPDATE deliveries SET status = ?, next_attempt_at = ?, locked_until = NULL, "
            "last_status = ?, last_error = ?, response = ?, delivered_at = ?, updated_at = ? "
            "WHERE id = ?", status, next_at, outcome.http_status, error,
            outcome.response, ts if status == "delivered" else None, ts, row["id"])

    await db.transact(run)


async def run_delivery(db: Storage, config: Config, sessions: Sessions,
                       row: Mapping[str, Any]) -> Outcome:
    """Send one claimed outbox row. `sessions`: the open HTTP session and the one that connects
    to public addresses only (see session_for)."""
    company = await get_company(db, row["company_id"])
    lead = await db.fetchone("SELECT * FROM leads WHERE id = ?", row["lead_id"])
    event = await db.fetchone("SELECT * FROM lead_events WHERE id = ?", row["event_row_id"])
    if company is None or lead is None or event is None:
        return Outcome("failed", error="the lead or its event no longer exists")
    destination = DESTINATIONS.get(row["destination"])
    if destination is None or not destination.configured(company.settings):
        return Outcome("skipped", error=f"{row['destination']} is no longer set up")
    user_agent = None
    if lead["visit_id"] is not None:
        visit = await db.fetchone("SELECT user_agent FROM visits WHERE id = ?", lead["visit_id"])
        user_agent = visit["user_agent"] if visit else None
    purchase_id = None
    if event["name"] == "refund":  # the purchase it takes back: the lead's latest before it
        purchase = await db.fetchone(
            "SELECT event_id FROM lead_events WHERE lead_id = ? AND name = 'purchase' AND "
            "id < ? ORDER BY id DESC LIMIT 1", lead["id"], event["id"])
        purchase_id = purchase["event_id"] if purchase else None
    session = sessions[0]
    if destination.url_field:
        url = destination_urls(company.settings)[destination.url_field]
        session = session_for(config, company, destination.url_field, url, sessions)
    return await send_delivery(session, config, company, destination, lead, event,
                               EventFacts(user_agent, purchase_id),
                               delivery_response(row["response"]))


async def deliver(db: Storage, config: Config, sessions: Sessions,
                  row: Mapping[str, Any]) -> None:
    """Send one claimed outbox row and record how it went."""
    try:
        outcome = await run_delivery(db, config, sessions, row)
    except Exception as exc:  # noqa: BLE001 - a bug must not stop the other deliveries
        log.exception("delivery %s failed unexpectedly", row["id"])
        outcome = Outcome("retry", error=f"internal error: {exc!r}"[:500])
    try:
        await finish_delivery(db, row, outcome, config.delivery_retry_seconds)
    except Exception:  # noqa: BLE001 - the row stays `sending` and is sent again after its lock
        log.exception("delivery %s: could not record the outcome", row["id"])
        return
    if outcome.status != "delivered":
        log.info("delivery %s to %s: %s", row["id"], row["destination"], outcome.status,
                 extra={"fields": {"event": "delivery", "delivery_id": row["id"],
                                   "status": outcome.status, "http_status": outcome.http_status,
                                   "error": outcome.error}})


async def delivery_worker(db: Storage, config: Config, sessions: Sessions,
                          wake: asyncio.Event, stopping: asyncio.Event) -> None:
    """Send due deliveries, up to DELIVERY_CONCURRENCY at once: a row is claimed only when a
    slot is free and is sent at once, so no claimed row waits behind another company's. `wake`
    set: rows may be due now; `stopping` set: finish what is in flight and return."""
    lock = config.delivery_timeout + DELIVERY_LOCK_MARGIN
    sending: set[asyncio.Task] = set()

    def finished(task: asyncio.Task) -> None:
        sending.discard(task)
        wake.set()  # a slot is free, and the company may have more rows waiting

    while not stopping.is_set():
        wake.clear()  # before claiming: a wake-up during the claim is not lost
        free = config.delivery_concurrency - len(sending)
        rows: list[dict] = []
        if free > 0:
            try:
                rows = await claim_deliveries(db, lock, free, config.delivery_per_company)
            except Exception:  # noqa: BLE001 - the database may be briefly away; try again later
                log.exception("delivery worker: could not claim deliveries")
        for row in rows:
            task = asyncio.create_task(deliver(db, config, sessions, row),
                                       name=f"delivery-{row['id']}")
            sending.add(task)
            task.add_done_callback(finished)
        if rows:
            continue  # more may be due
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), config.delivery_poll_seconds)
    # Stopping: claim nothing more; the deliveries in flight end within their timeout.
    try:
        if sending:
            await asyncio.wait(set(sending))
    except asyncio.CancelledError:
        for task in sending:  # their rows stay `sending` and are sent again after their lock
            task.cancel()
        raise


# ##################################################################################################
# The doctor: `python whatstracking.py check` and GET /api/checks
#
# Each check answers one question asked when "no leads arrive" (is the database there and
# migrated, does PUBLIC_URL reach this server, does each Evolution server take its key, does each
# instance's webhook point here with our header and events, is each destination complete) with
# one sentence, and when it fails, with what to do. The checks that call out run concurrently,
# each bounded by CHECK_TIMEOUT; an Evolution server shared by several companies is asked once.
# ##################################################################################################

CHECK_TIMEOUT = 10.0  # seconds one outside call of a check may take
CHECK_CONCURRENCY = 16  # outside calls of one run in flight at once
CLI_COMMAND = ".venv/bin/python whatstracking.py"  # how the fixes name the command line


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def json(self) -> dict:
        return dataclasses.asdict(self)


def passed(name: str, detail: str) -> Check:
    return Check(name, True, detail)


def failed(name: str, detail: str, fix: str) -> Check:
    return Check(name, False, detail, fix)


def evolution_server(config: Config, company: Company) -> tuple[str, str] | None:
    """(URL, key) of the company's Evolution server: its own, else the default; None if neither
    is complete."""
    if company.evolution_url:
        url, key = company.evolution_url, company.evolution_key
        if not key and url == config.evolution_api_url:  # never send the default key elsewhere
            key = config.evolution_api_key
    else:
        url, key = config.evolution_api_url, config.evolution_api_key
    return (url, key) if url and key else None


def webhook_secret_accepted(company: Company, connection: Mapping[str, Any], value: str) -> bool:
    """Whether our webhook accepts `value`, the secret header Evolution sends for this
    connection: the company's secret or this connection's (both stored as their SHA-256, as
    POST /webhook compares them)."""
    given = hash_token(value)
    return (same_secret(given, company.webhook_secret)
            or same_secret(given, connection.get("webhook_secret")))


def expected_webhook_url(config: Config, company_id: str) -> str | None:
    return f"{config.public_url}/webhook/{company_id}" if config.public_url else None


def webhook_problems(config: Config, company: Company, connection: Mapping[str, Any],
                     webhook: Mapping[str, Any] | None) -> list[str]:
    """What keeps the instance's webhook (Evolution's stored row) from delivering its messages
    to this company, in words; empty when nothing does."""
    if not webhook:
        return ["no webhook is set for it on Evolution"]
    problems = []
    if webhook.get("enabled") is not True:
        problems.append("its webhook is turned off")
    url = webhook.get("url") if isinstance(webhook.get("url"), str) else ""
    expected = expected_webhook_url(config, company.id)
    if expected and url.rstrip("/") != expected:
        problems.append(f"it posts to {url or 'no URL'}, not {expected}")
    elif not expected and not url.rstrip("/").endswith(f"/webhook/{company.id}"):
        problems.append(f"it posts to {url or 'no URL'}, not to …/webhook/{company.id}")
    headers = webhook.get("headers") if isinstance(webhook.get("headers"), dict) else {}
    secret = {k.lower(): v for k, v in headers.items()}.get(WEBHOOK_SECRET_HEADER)
    if company.settings.get("webhook_auth_required", True):
        if not isinstance(secret, str) or not secret:
            problems.append(f"it sends no {WEBHOOK_SECRET_HEADER} header, so every delivery is "
                            "refused (401)")
        elif not webhook_secret_accepted(company, connection, secret):
            problems.append(f"its {WEBHOOK_SECRET_HEADER} header holds a secret WhatsTracking "
                            "does not accept, so every delivery is refused (401)")
    events = webhook.get("events")
    if isinstance(events, list) and events:  # an empty list means every event
        missing = [e for e in EVOLUTION_EVENTS if e not in events]
        if missing:
            problems.append(f"its events lack {', '.join(missing)}")
    return problems


def webhook_fix(config: Config, company: Company, connection_id: str) -> str:
    """Adopting the instance again sets its webhook on Evolution (URL, a new secret, events)."""
    return (f"adopt it again: POST /api/connections {{\"type\": \"evolution\", \"connectionId\": "
            f"\"{connection_id}\", \"adopt\": true}} (README: Connecting an instance you made "
            "outside WhatsTracking); it points the webhook at "
            f"{expected_webhook_url(config, company.id) or 'PUBLIC_URL/webhook/' + company.id} "
            "with a new secret and the events needed")


def destination_checks(company: Company) -> list[Check]:
    checks = []
    for name, missing in missing_destination_fields(company.settings).items():
        label = f"{company.id}: destination {name}"
        if missing:
            example = json.dumps({name: {field: "…" for field in missing}}, ensure_ascii=False)
            checks.append(failed(label, f"{', '.join(missing)} not set, so no conversion is "
                                        "sent there", f"PATCH /api/company {example}"))
        else:
            checks.append(passed(label, "complete; conversions are sent there"))
    if not checks:
        checks.append(passed(f"{company.id}: destinations", "none set up: leads are recorded, "
                             "no conversions are sent (optional)"))
    return checks


def format_checks(checks: list[Check]) -> str:
    """The checklist for a terminal: one line per check, readable without colour."""
    lines = []
    for check in checks:
        line = f"{'OK  ' if check.ok else 'FAIL'}  {check.name}: {check.detail}"
        lines.append(line if check.ok else f"{line}. Fix: {check.fix}")
    bad = sum(not c.ok for c in checks)
    lines.append(f"{bad} of {len(checks)} checks failed." if bad
                 else f"All {len(checks)} checks passed.")
    return "\n".join(lines)


class Doctor:
    """One run of the checks: the HTTP session, a bound on calls in flight, and each Evolution
    server's answer (asked once however many companies share it)."""

    def __init__(self, config: Config, db: Storage | None,
                 sessions: Sessions) -> None:
        self.config = config
        self.db = db
        self.sessions = sessions  # (open, public addresses only): see session_for
        self.gate = asyncio.Semaphore(CHECK_CONCURRENCY)
        self.servers: dict[tuple[str, str], asyncio.Task] = {}

    async def database(self) -> Check:
        name = "database"
        try:
            async with self.gate:
                await asyncio.wait_for(self.db.ping(), CHECK_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - any failure: it does not answer
            return failed(name, f"the {self.db.dialect} database does not answer "
                                f"({exc.__class__.__name__})",
                          "check DATABASE_URL and that the database server runs")
        try:
            done = {r["version"] for r in await self.db.fetchall(
                "SELECT version FROM schema_migrations")}
        except Exception:  # noqa: BLE001 - no such table: never migrated
            done = set()
        pending = [version for version, _ in MIGRATIONS if version not in done]
        if pending:
            return failed(name, f"{self.db.dialect}, {len(pending)} migration(s) not applied "
                                f"(this version needs schema {MIGRATIONS[-1][0]})",
                          f"run `{CLI_COMMAND} migrate` (the server also migrates when it "
                          "starts)")
        return passed(name, f"{self.db.dialect}, schema {MIGRATIONS[-1][0]} (up to date)")

    async def public_url(self) -> Check:
        name = "PUBLIC_URL"
        if not self.config.public_url:
            return failed(name, "not set, so Evolution is given no address to post messages to",
                          "set PUBLIC_URL in the settings to the https:// address this server is "
                          "reached at, e.g. https://track.example.com")
        url = self.config.public_url + "/healthz"
        reach = ("check the name's DNS, the reverse proxy in front (deploy/Caddyfile, "
                 "deploy/nginx.conf) and that the server is running")
        try:
            async with self.gate, self.sessions[0].get(  # PUBLIC_URL: the operator's
                    url, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=CHECK_TIMEOUT)) as resp:
                status, location = resp.status, resp.headers.get("Location", "")
                body = await resp.read()
        except asyncio.TimeoutError:
            return failed(name, f"{url} did not answer within {CHECK_TIMEOUT:g} seconds", reach)
        except aiohttp.ClientError as exc:
            return failed(name, f"{url} cannot be reached from this machine ({exc})", reach)
        if 300 <= status < 400:
            return failed(name, f"{url} redirects to {location or 'elsewhere'}",
                          "set PUBLIC_URL to the address it redirects to: Evolution's "
                          "deliveries do not survive a redirect")
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if status != 200 or not isinstance(answer, dict) or answer.get("ok") is not True:
            return failed(name, f"{url} answered HTTP {status}, not WhatsTracking's health "
                                "answer", "point the proxy for this address at WhatsTracking "
                                "(HOST:PORT), or correct PUBLIC_URL")
        return passed(name, f"{url} answers from this machine")

    def _server_instances(self, client: EvolutionClient) -> asyncio.Task:
        key = (client.base_url, client.api_key)
        if key not in self.servers:
            async def ask() -> list:
                async with self.gate:
                    return await client.list_instances()

            self.servers[key] = asyncio.ensure_future(ask())
        return self.servers[key]

    async def evolution(self, company: Company, client: EvolutionClient) -> Check:
        name = f"{company.id}: Evolution server"
        try:
            instances = await asyncio.shield(self._server_instances(client))
        except EvolutionError as exc:
            if exc.upstream_status == 401:
                fix = ("set the server's global API key (AUTHENTICATION_API_KEY on Evolution): "
                       "EVOLUTION_API_KEY, or the company's evolution_key with PATCH /api/company")
            elif exc.upstream_status is None:
                fix = ("check that Evolution API runs and that this machine reaches it at that "
                       "address (EVOLUTION_API_URL, or the company's evolution_url)")
            elif "LICENSE_REQUIRED" in exc.message:
                fix = (f"activate the Evolution server: open {client.base_url}/manager and "
                       "follow its activation, or set a licensing key as its documentation says")
            else:
                fix = "see the Evolution server's log"
            where = "" if client.base_url in exc.message else f"{client.base_url}: "
            return failed(name, where + exc.message, fix)
        return passed(name, f"{client.base_url} answers and takes the key "
                            f"({len(instances)} instance(s))")

    async def webhook(self, company: Company, client: EvolutionClient,
                      connection: Mapping[str, Any]) -> Check:
        connection_id = connection["id"]
        name = f"{company.id}: webhook of {connection_id}"
        try:
            async with self.gate:
                webhook = await client.find_webhook(connection_id)
        except EvolutionError as exc:
            if exc.status == 404:
                return failed(name, f"instance {connection_id} does not exist on "
                                    f"{client.base_url}",
                              "create it again (POST /api/create-instance), or delete the "
                              "connection (DELETE /instance/delete)")
            return failed(name, exc.message, "see the Evolution server's log")
        problems = webhook_problems(self.config, company, connection, webhook)
        if problems:
            return failed(name, "; ".join(problems),
                          webhook_fix(self.config, company, connection_id))
        return passed(name, f"posts to {webhook['url']} with the {WEBHOOK_SECRET_HEADER} "
                            "header and the events needed")

    async def company(self, company: Company) -> list[Check]:
        """The checks of one company: its Evolution server, then each of its connections'
        webhooks there, and its destinations."""
        server = evolution_server(self.config, company)
        if server is None:
            evolution = [failed(f"{company.id}: Evolution server", "none configured, so no "
                                "WhatsApp number can be connected",
                                "set EVOLUTION_API_URL and EVOLUTION_API_KEY in the settings, or "
                                "the company's own with PATCH /api/company {\"evolution_url\": "
                                "\"…\", \"evolution_key\": \"…\"}")]
        else:
            chose = company_chose(self.config, company, "evolution_url", server[0])
            client = EvolutionClient(
                session_for(self.config, company, "evolution_url", server[0], self.sessions),
                *server, min(self.config.evolution_timeout, CHECK_TIMEOUT), chose)
            evolution = [await self.evolution(company, client)]
            if evolution[0].ok:
                rows = await self.db.fetchall(
                    "SELECT * FROM connections WHERE company_id = ? AND deleted_at IS NULL "
                    "ORDER BY id", company.id)
                evolution += await asyncio.gather(*(
                    self.webhook(company, client, row) for row in rows
                    if row["verified"] and row["type"] == "evolution"))
        return evolution + destination_checks(company)

    async def run(self, companies: list[Company] | None = None) -> list[Check]:
        """The database, PUBLIC_URL and every company's checks (or only `companies`'); without
        a database (it could not be opened) PUBLIC_URL alone."""
        public = asyncio.ensure_future(self.public_url())
        if self.db is None:
            return [await public]
        checks = [await self.database()]
        if checks[0].ok:
            if companies is None:
                rows = await self.db.fetchall("SELECT * FROM companies ORDER BY id")
                companies = [Company.from_row(row) for row in rows]
                if not companies:
                    checks.append(failed("companies", "none yet", f"create one: `{CLI_COMMAND} "
                                         "company add my-company --name \"My Company\"`"))
            for found in await asyncio.gather(*(self.company(c) for c in companies)):
                checks += found
        return checks[:1] + [await public] + checks[1:]


# ##################################################################################################
# HTTP: keys, request helpers and authentication
# ##################################################################################################

def json_response(data: Any, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON answer through the strict encoder; a stray surrogate (a header echoed back) becomes
    '?' rather than a 500."""
    return web.Response(body=json_dumps(data).encode("utf-8", "replace"), status=status,
                        headers=headers, content_type="application/json", charset="utf-8")


def http_error(status: int, message: str, **extra: Any) -> web.HTTPException:
    """An aiohttp HTTP exception whose body is SPEC §4's {"error": sentence}."""
    cls = web.HTTPException
    for candidate in (web.HTTPBadRequest, web.HTTPUnauthorized, web.HTTPForbidden,
                      web.HTTPNotFound, web.HTTPMethodNotAllowed, web.HTTPConflict, web.HTTPGone,
                      web.HTTPRequestEntityTooLarge, web.HTTPUnsupportedMediaType,
                      web.HTTPTooManyRequests, web.HTTPInternalServerError, web.HTTPBadGateway,
                      web.HTTPServiceUnavailable, web.HTTPGatewayTimeout):
        if candidate.status_code == status:
            cls = candidate
            break
    body = json_dumps({"error": message, **extra})
    if cls is web.HTTPMethodNotAllowed:
        return cls("?", extra.get("allow", []), text=body, content_type="application/json")
    if cls is web.HTTPRequestEntityTooLarge:
        return cls(max_size=0, actual_size=0, text=body, content_type="application/json")
    return cls(text=body, content_type="application/json")


DB = web.AppKey("db", Storage)
CONFIG = web.AppKey("config", Config)
TRACKER = web.AppKey("tracker", dict)
HTTP = web.AppKey("http", aiohttp.ClientSession)  # for outbound calls
# The session for URLs companies chose: it connects to public addresses only.
COMPANY_HTTP = web.AppKey("company_http", aiohttp.ClientSession)
DELIVERY_WAKE = web.AppKey("delivery_wake", asyncio.Event)  # set: deliveries are waiting
# Typed request storage where aiohttp has it (3.13+); a plain key on older releases.
REQUEST_ID = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "request_id"

routes = web.RouteTableDef()


class Metrics:
    """This process's counters for GET /metrics. Per process, as Prometheus expects: it adds up
    the processes it scrapes. Totals that must agree across processes come from the database."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # seconds

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.tracking: dict[str, int] = {}
        self.webhook_buckets = [0] * (len(self.BUCKETS) + 1)
        self.webhook_sum = 0.0

    def observe_webhook(self, seconds: float) -> None:
        self.webhook_sum += seconds
        for i, bound in enumerate(self.BUCKETS):
            if seconds <= bound:
                self.webhook_buckets[i] += 1
                return
        self.webhook_buckets[-1] += 1


class RateLimiter:
    """Token buckets per client address (per process; SPEC §3 allows that). `per_minute` 0 turns
    it off. At most `max_keys` addresses are remembered; the oldest are forgotten first."""

    def __init__(self, per_minute: int, max_keys: int = 50_000) -> None:
        self.rate = per_minute / 60.0  # tokens per second
        self.capacity = float(per_minute)
        self.max_keys = max_keys
        self.buckets: dict[str, tuple[float, float]] = {}

    def retry_after(self, key: str) -> float:
        """0 if the request may go ahead (and take a token), else the seconds to wait."""
        if self.rate <= 0:
            return 0.0
        t = time.monotonic()
        tokens, last = self.buckets.pop(key, (self.capacity, t))
        tokens = min(self.capacity, tokens + (t - last) * self.rate)
        if len(self.buckets) >= self.max_keys:
            self.buckets.pop(next(iter(self.buckets)))
        if tokens >= 1.0:
            self.buckets[key] = (tokens - 1.0, t)
            return 0.0
        self.buckets[key] = (tokens, t)
        return (1.0 - tokens) / self.rate


@functools.lru_cache(maxsize=8192)  # the same few addresses arrive again and again
def address_key(text: str) -> tuple[str, bool, bool] | None:
    """(rate-limit key, is loopback, is not global) of a peer address or an X-Forwarded-For
    entry, or None when it is no address. Takes the forms proxies write: 192.0.2.1,
    192.0.2.1:443, 2001:db8::1, [2001:db8::1]:443. An IPv6 visitor is keyed by its /64, the block
    one subscriber gets, so rotating addresses within it buys no new bucket."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:text.find("]")]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    key = str(address)
    if address.version == 6:
        key = str(ipaddress.IPv6Network((address, 64), strict=False))
    return key, address.is_loopback, not address.is_global


def peer_is_proxy(request: web.Request, peer: tuple | None = None) -> bool:
    """Whether the peer is a proxy whose X-Forwarded-* headers are believed (TRUST_PROXY)."""
    mode = request.app[CONFIG].trust_proxy
    if mode == "loopback":
        peer = peer or address_key(request.remote or "")
        return peer is not None and peer[1]
    return mode == "true"


@functools.lru_cache(maxsize=8192)  # one header value per visitor, seen on each of its requests
def forwarded_client(header: str, internal_hops: bool) -> str | None:
    """The right-most entry of an X-Forwarded-For value that is not itself a proxy: loopback,
    and with `internal_hops` any non-global address (a chain of internal load balancers). Each
    proxy appends the address it got the request from, so reading from the right every entry
    after a proxy's is true, and the client's own entries further left are never reached. None:
    no entry to believe."""
    client = None
    for entry in reversed(header.split(",")):
        parsed = address_key(entry)
        if parsed is None:  # no proxy writes this: stop at the last hop we could believe
            break
        client = parsed[0]
        if not parsed[2 if internal_hops else 1]:
            break
    return client


def client_ip(request: web.Request) -> str:
    """The client's rate-limit key: the peer, or behind a trusted proxy the client it names in
    X-Forwarded-For (forwarded_client), so a forged entry buys no new bucket."""
    peer = address_key(request.remote or "")
    client = peer[0] if peer else (request.remote or "unknown")
    forwarded = request.headers.getall("X-Forwarded-For", ())
    if not forwarded or not peer_is_proxy(request, peer):
        return client
    internal_hops = request.app[CONFIG].trust_proxy == "true"
    return forwarded_client(",".join(forwarded), internal_hops) or client


def rate_limit(request: web.Request, kind: str) -> None:
    """429 with Retry-After when this client address is over the `kind` limit."""
    wait = request.app[LIMITS][kind].retry_after(client_ip(request))
    if wait > 0:
        exc = http_error(429, "Too many requests")
        exc.headers["Retry-After"] = str(max(1, int(wait + 0.999)))
        raise exc


class InFlight:
    """The requests this process is handling (headers read; the body may still be arriving),
    so that a stop can wait for them (see `run_server`)."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.stopping = False


METRICS = web.AppKey("metrics", Metrics)
LIMITS = web.AppKey("limits", dict)  # kind → RateLimiter
IN_FLIGHT = web.AppKey("in_flight", InFlight)
TOKEN_USES = web.AppKey("token_uses", TokenUses)
# Once a minute per key (a RateLimiter of one a minute): "delivered" and "rejected" notes on a
# connection, keyed by it; "lines": the log lines about rejections naming no connection.
WEBHOOK_NOTES = web.AppKey("webhook_notes", dict)


def not_json_error(exc: NotJson, **extra: Any) -> web.HTTPException:
    return http_error(400, "Body is not valid JSON" + (f": {exc}" if str(exc) else ""), **extra)


async def read_json(request: web.Request, limit: int) -> Any:
    """The request body as strict JSON (any content type; see parse_json), or 400/413 with the
    reason. API input: a NUL or unpaired surrogate in a string is refused, not cleaned."""
    raw = await read_body(request, limit)
    try:
        return parse_json(raw)
    except NotJson as exc:
        raise not_json_error(exc) from None


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise http_error(413, f"Body is larger than {limit} bytes")
    raw = bytearray()  # read() returns what is buffered, not the whole body: loop until EOF
    while len(raw) <= limit:
        chunk = await request.content.read(limit + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    raw = bytes(raw)
    if len(raw) > limit:
        raise http_error(413, f"Body is larger than {limit} bytes")
    return raw


def shipped_file(path: Path) -> bytes:
    """A file shipped beside whatstracking.py (read per request: an upgrade needs no restart),
    or 404 when the install left it out."""
    try:
        return path.read_bytes()
    except OSError:
        raise http_error(404, "Not found") from None


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


async def authenticate(request: web.Request, company_id: str | None = None) -> Company:
    """The company a request acts for: its token's company, or with ADMIN_TOKEN the company named
    by ``company_id`` (argument, query or body). 401 without a valid token; 404 for an unknown
    company, including one the token does not own."""
    token = bearer(request)
    if not token:
        raise http_error(401, "Unauthorized")
    config, db = request.app[CONFIG], request.app[DB]
    company_id = company_id or request.query.get("company_id")
    if config.admin_token and same_secret(token, config.admin_token):
        if not company_id:
            raise http_error(400, "company_id is required with the admin token")
    else:
        found = await token_row(db, token)
        if found is None:
            raise http_error(401, "Unauthorized")
        owned = found["company_id"]
        if request.app[TOKEN_USES].due(found["id"]):
            try:
                await note_token_use(db, found["id"])
            except Exception as exc:  # noqa: BLE001 - a bookkeeping write never fails the call
                log.warning("could not record the use of API token %s: %s", found["id"], exc)
        if company_id is not None and company_id != owned:
            raise http_error(404, "Company not found")
        company_id = owned
    company = await get_company(db, company_id)
    if company is None:
        raise http_error(404, "Company not found")
    return company


async def object_body(request: web.Request) -> dict:
    """The request body as a JSON object (a copy the handler may pop from), or 400."""
    body = await read_json(request, TRACKING_BODY_MAX)
    if not isinstance(body, dict):
        raise http_error(400, "Body must be a JSON object")
    return dict(body)


async def acting_company(request: web.Request, body: Mapping[str, Any]) -> Company:
    """The company a call with a JSON body acts for (an admin names it with `company_id`)."""
    company_id = body.get("company_id")
    if "company_id" in body and not isinstance(company_id, str):
        raise http_error(400, "company_id must be a string")
    return await authenticate(request, company_id)


def bearer_is(request: web.Request, *accepted: str) -> bool:
    """Whether the request's bearer is one of the `accepted` operator tokens (an unset, empty
    one accepts nothing)."""
    given = bearer(request)
    return any(same_secret(given, token) for token in accepted)


def is_admin(request: web.Request) -> bool:
    return bearer_is(request, request.app[CONFIG].admin_token)


def outbound_session(app: web.Application, company: Company, field: str, url: str | None):
    """The HTTP session for one of a company's outbound URLs: the one restricted to public
    addresses, unless the URL is the operator's (set by the operator, or EVOLUTION_API_URL) or
    ALLOW_PRIVATE_URLS is on."""
    return session_for(app[CONFIG], company, field, url, (app[HTTP], app[COMPANY_HTTP]))


def wake_worker(app: web.Application) -> None:
    """Tell the delivery worker that outbox rows may be due now (it also polls for them)."""
    app[DELIVERY_WAKE].set()


def require_bearer(request: web.Request, *accepted: str) -> None:
    """401 unless the request's bearer is one of the `accepted` operator tokens."""
    if not bearer_is(request, *accepted):
        raise http_error(401, "Unauthorized")


def require_admin(request: web.Request) -> None:
    require_bearer(request, request.app[CONFIG].admin_token)


# ##################################################################################################
# HTTP handlers: health and the tracker script
# ##################################################################################################

@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"ok": True, "version": VERSION})


OPENAPI_PATH = HERE / "openapi.json"


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=shipped_file(OPENAPI_PATH), content_type="application/json",
                        headers={"Access-Control-Allow-Origin": "*"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    db = request.app[DB]
    try:
        await asyncio.wait_for(db.ping(), 5)
    except Exception:  # noqa: BLE001 - any failure means not ready
        log.warning("readiness check failed", exc_info=True)
        raise http_error(503, "Database unreachable") from None
    return json_response({"ok": True, "database": db.dialect})


def load_tracker() -> dict:
    """tracker.js as served: minified once at start-up, so the file stays readable (with its
    why-comments) and sites still load under 3 KB gzipped, with no build step."""
    import rjsmin  # only here: nothing else in the server needs it

    try:
        source = rjsmin.jsmin(TRACKER_PATH.read_text("utf-8")).encode()
    except OSError:
        raise ConfigError(f"tracker.js is missing: expected it at {TRACKER_PATH}.") from None
    return {"raw": source, "gzip": gzip.compress(source, 9, mtime=0),
            "etag": '"' + hashlib.sha256(source).hexdigest()[:20] + '"'}


@routes.get("/scripts/whatsapp-tracker.js")
async def serve_tracker(request: web.Request) -> web.Response:
    script = request.app[TRACKER]
    headers = {"ETag": script["etag"], "Cache-Control": f"public, max-age={TRACKER_MAX_AGE}",
               "Vary": "Accept-Encoding", "Access-Control-Allow-Origin": "*"}
    if script["etag"] in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    body = script["raw"]
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        body = script["gzip"]
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers, content_type="application/javascript",
                        charset="utf-8")


# ##################################################################################################
# HTTP handlers: tracking from the website
# ##################################################################################################

def cors_headers(request: web.Request, company: Company | None = None) -> dict[str, str]:
    origin = request.headers.get("Origin")
    if not origin:
        return {"Access-Control-Allow-Origin": "*"}
    if company is None or origin_allowed(company, origin):
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    return {}


@routes.options("/tracking")
async def tracking_preflight(request: web.Request) -> web.Response:
    # The company is in the body, which a preflight does not carry: the POST enforces origins.
    return web.Response(status=204, headers={
        **cors_headers(request), "Access-Control-Allow-Methods": "POST, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type", "Access-Control-Max-Age": "86400"})


@routes.post("/tracking")
async def track(request: web.Request) -> web.Response:
    rate_limit(request, "tracking")
    body = await read_json(request, TRACKING_BODY_MAX)
    t = parse_tracking(body)
    headers = request.headers
    t.user_agent = clean_text(headers.get("User-Agent", "")[:512]) or None
    t.origin = headers.get("Origin")
    # Batched with the concurrent requests: the company is read, the origin checked and the
    # visit written for all of them at once; answered after the commit. A refusal stores nothing.
    company, result = await request.app[DB].submit(track_batch, t)
    headers = cors_headers(request, company)
    tracked = request.app[METRICS].tracking
    tracked[t.event] = tracked.get(t.event, 0) + 1
    result = {"ok": True, **result, "message": {"mode": company.settings["code_mode"],
                                                "template": company.settings["code_template"]}}
    return json_response(result, headers=headers)


# ##################################################################################################
# HTTP handlers: Evolution webhooks
# ##################################################################################################

def failed_delivery_answer(request: web.Request, delivery_id: int) -> web.Response:
    """202, not 500, for a delivery stored but not processed: a sender retries a 500 into the same
    failure, a stored copy each time. The log has the traceback under the request id."""
    return json_response({"ok": False, "delivery_id": delivery_id, "status": "failed",
                          "error": "Processing failed; the delivery is stored",
                          "request_id": request[REQUEST_ID]}, status=202)


def envelope_instance(envelope: Any) -> str | None:
    return envelope_parts(envelope)[1] if isinstance(envelope, dict) else None


async def note_on_connection(app: web.Application, sql: str, *args: Any) -> int:
    """Run a diagnostic UPDATE of a connection; returns the rows it changed. A note: its failure
    is logged, never the request's answer."""
    try:
        return await app[DB].transact(lambda tx: tx.execute(sql, *args))
    except Exception:  # noqa: BLE001 - the delivery's own outcome stands
        log.exception("could not note a webhook delivery on its connection")
        return 0


async def note_delivery(app: web.Application, item: WebhookInput) -> None:
    """Keep the time of the connection's last accepted delivery, to the minute: one UPDATE a
    minute per connection and process at most, none per message (an existing row only). A
    Cloud API body names its numbers by phone_number_id."""
    if item.via is CLOUD:
        column, named = "phone_number_id", {n for _, n, _ in cloud_changes(item.envelope) if n}
    else:
        column, named = "id", {envelope_instance(item.envelope)} - {None}
    ts = now()
    for name in named:
        if not app[WEBHOOK_NOTES]["delivered"].retry_after((item.company_id, column, name)):
            await note_on_connection(
                app, f"UPDATE connections SET last_delivery_at = ? WHERE company_id = ? AND "
                f"{column} = ? AND (last_delivery_at IS NULL OR last_delivery_at < ?)", ts,
                item.company_id, name, ts)


async def note_rejection(app: web.Application, item: WebhookInput, status: int) -> None:
    """A refused delivery (401, or 404 for an unknown company): once a minute at most per
    reason, company and instance, its time and reason go on the connection it names (an
    existing row of that company: unauthenticated input never makes rows) and in one log line.
    The instance name is the sender's choice: lines about no connection share a budget."""
    if status == 401:  # (Evolution puts an apikey in every envelope: it says nothing here)
        reason = "wrong secret" if item.secret else "missing secret"
    elif status == 404:
        reason = "unknown company"
    else:
        return
    instance, notes = envelope_instance(item.envelope), app[WEBHOOK_NOTES]
    if notes["rejected"].retry_after((reason, item.company_id, instance)):
        return
    recorded = 0
    if status == 401 and instance is not None:
        recorded = await note_on_connection(
            app, "UPDATE connections SET last_rejected_at = ?, last_rejection = ? "
            "WHERE company_id = ? AND id = ?", now(), reason, item.company_id, instance)
    if recorded or not notes["lines"].retry_after(""):
        log.warning("Webhook refused (%s, %s): company %r, instance %r. Evolution does not retry "
                    "it; see the README's \"No leads arrive\". (At most once a minute.)",
                    status, reason, item.company_id[:64], instance, extra={"fields": {
                        "event": "webhook_rejected", "status": status, "reason": reason}})


async def read_webhook(request: web.Request) -> tuple[bytes, Any, NotJson | None]:
    """The raw body, its JSON (None when it is not JSON) and why it is not."""
    raw = await read_body(request, WEBHOOK_BODY_MAX)
    try:  # WhatsApp text may hold a NUL or lone surrogate: cleaned, the lead is not lost
        return raw, parse_json(raw, scrub=True), None
    except NotJson as exc:
        return raw, None, exc


async def receive_webhook(request: web.Request, item: WebhookInput,
                          refused: NotJson | None) -> web.Response:
    """A delivery through the webhook batch, answered: refused (401/404), stored and 400 when
    not JSON, 202 when its processing failed (stored), else 200 with what became of it."""
    started = time.perf_counter()
    db = request.app[DB]
    try:
        result = await db.submit(webhook_batch, item)
    except Exception as exc:
        result = await store_failed_webhook(db, item, exc)
        if result is None:
            raise
    if getattr(result, "refused", None):
        await note_rejection(request.app, item, result.refused[0])
        raise http_error(*result.refused)
    if result.get("bad_json"):
        raise not_json_error(refused, delivery_id=result["delivery_id"])
    await note_delivery(request.app, item)
    request.app[METRICS].observe_webhook(time.perf_counter() - started)
    if result.get("failed"):
        return failed_delivery_answer(request, result["delivery_id"])
    if getattr(result, "wake", False):
        wake_worker(request.app)
    return json_response({"ok": True, **result})


@routes.get("/webhook/cloud/{company_id}")
async def cloud_webhook_verification(request: web.Request) -> web.Response:
    """Meta's subscription check: the challenge, as plain text, only for a verify token of one
    of the company's Cloud API numbers."""
    query = request.query
    challenge, token = query.get("hub.challenge", ""), query.get("hub.verify_token", "")
    if (query.get("hub.mode") != "subscribe" or not challenge or len(challenge) > 256
            or not token or len(token) > 256 or not await cloud_verify_token_matches(
                request.app[DB], request.match_info["company_id"], token)):
        raise http_error(403, "Forbidden")
    return web.Response(text=challenge, content_type="text/plain")


@routes.post("/webhook/cloud/{company_id}")
async def cloud_webhook(request: web.Request) -> web.Response:
    """Meta's deliveries for a company's Cloud API numbers, signed with the app's secret."""
    raw, envelope, refused = await read_webhook(request)
    item = WebhookInput(request.match_info["company_id"], raw, envelope, refused is not None,
                        request.headers, request.headers.get("X-Hub-Signature-256"), "",
                        CLOUD.name, via=CLOUD)
    return await receive_webhook(request, item, refused)


@routes.post("/webhook/{company_id}")
@routes.post("/webhook/{company_id}/{suffix}")
async def evolution_webhook(request: web.Request) -> web.Response:
    raw, envelope, refused = await read_webhook(request)
    item = WebhookInput(request.match_info["company_id"], raw, envelope, refused is not None,
                        request.headers, request.headers.get("X-Webhook-Secret") or bearer(request),
                        request.match_info.get("suffix", ""))
    return await receive_webhook(request, item, refused)


# ##################################################################################################
# HTTP handlers: companies and leads
# ##################################################################################################

@routes.post("/api/companies")
async def create_company_route(request: web.Request) -> web.Response:
    require_admin(request)
    body = await object_body(request)
    given = {key: body.pop(key) for key in ("company_id", "id") if key in body}
    for key, value in given.items():  # `id`: the same, for older clients; company_id wins
        if not isinstance(value, str) or not COMPANY_ID_RE.match(value):
            raise http_error(400, f"{key} must be {ID_RULE}")
    company_id = given.get("company_id", given.get("id"))
    if company_id is None:
        raise http_error(400, "company_id is required")
    name = body.pop("name", "")
    if not isinstance(name, str) or len(name) > 200:
        raise http_error(400, "name must be text of at most 200 characters")
    name = name or company_id
    evolution = validate_evolution(body)
    body.pop("evolution_url", None)
    body.pop("evolution_key", None)
    settings = validate_settings(body)
    settings = record_operator_urls(settings, sent_urls(evolution, body))  # the admin's URLs
    created = await create_company(request.app[DB], company_id, name, settings,
                                   evolution.get("evolution_url"), evolution.get("evolution_key"))
    company = await get_company(request.app[DB], company_id)
    log.info("company created: %s", company_id)
    return json_response({**company.public(), **created}, status=201)


@routes.get("/api/company")
async def show_company(request: web.Request) -> web.Response:
    company = await authenticate(request)
    return json_response(company.public())


@routes.patch("/api/company")
async def update_company(request: web.Request) -> web.Response:
    body = await object_body(request)
    company = await acting_company(request, body)
    body.pop("company_id", None)
    name = body.pop("name", company.name)
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise http_error(400, "name must be text of at most 200 characters")
    rotate = body.pop("rotate_webhook_secret", False)
    if not isinstance(rotate, bool):
        raise http_error(400, "rotate_webhook_secret must be true or false")
    evolution = validate_evolution(body)
    body.pop("evolution_url", None)
    body.pop("evolution_key", None)
    settings = {**company.settings, **validate_settings(body, company.settings)}
    settings = await check_outbound_urls(request, company, settings, sent_urls(evolution, body))
    stored = {k: v for k, v in settings.items() if DEFAULT_SETTINGS.get(k) != v and v is not None}
    secret = new_secret("whs_") if rotate else None
    url = evolution.get("evolution_url", company.evolution_url)
    key = evolution.get("evolution_key", company.evolution_key)

    async def run(tx: Tx) -> None:
        await tx.execute(
            "UPDATE companies SET name = ?, settings = ?, evolution_url = ?, evolution_key = ?, "
            "webhook_secret = ?, updated_at = ? WHERE id = ?",
            name.strip(), json_dumps(stored), url, key,
            hash_token(secret) if secret else company.webhook_secret, now(), company.id)

    await request.app[DB].transact(run)
    updated = await get_company(request.app[DB], company.id)
    out = updated.public()
    if rotate:
        out["webhook_secret"] = secret
    return json_response(out)


@routes.post("/api/chat-rules/test")
async def try_chat_rules(request: web.Request) -> web.Response:
    """Which chat rule a message would fire and the value it would read (SPEC §14), storing
    nothing: against the company's rules, or the `chat_rules` given (the console's editor tries
    rules before they are saved)."""
    body = await object_body(request)
    company = await acting_company(request, body)
    for key in body:
        if key not in ("company_id", "text", "from", "chat_rules"):
            raise http_error(400, f"Unknown field: {key}")
    text, sender = body.get("text"), body.get("from")
    if not isinstance(text, str) or len(text) > CHAT_TEXT_MAX:
        raise http_error(400, f"text must be text of at most {CHAT_TEXT_MAX} characters")
    if sender not in ("business", "customer"):
        raise http_error(400, "from must be business or customer")
    rules = (validate_chat_rules(body["chat_rules"]) if "chat_rules" in body
             else company.settings["chat_rules"])
    return json_response(dry_run_chat_rules(company, rules, text, sender))


@routes.get("/api/companies")
async def list_companies(request: web.Request) -> web.Response:
    """The agency's list (admin): every company with a summary over from/to (default the last
    30 days); dates are days in `timezone` (default the product's, America/Sao_Paulo)."""
    require_admin(request)
    name = request.query.get("timezone", DEFAULT_SETTINGS["timezone"])
    try:
        zone = zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, TypeError, ValueError):
        raise http_error(400, "timezone must be an IANA name like America/Sao_Paulo") from None
    start, end = parse_range(request.query, zone)
    end = end if end is not None else now()
    start = start if start is not None else end - REPORT_DEFAULT_DAYS * 86400
    return json_response({"companies": await company_summaries(request.app[DB], start, end),
                          "from": iso(start), "to": iso(end), "timezone": name})


@routes.get("/api/tokens")
async def list_tokens(request: web.Request) -> web.Response:
    company = await authenticate(request)
    return json_response({"tokens": await company_tokens(request.app[DB], company.id)})


@routes.post("/api/tokens")
async def create_token_route(request: web.Request) -> web.Response:
    body = await object_body(request)
    company = await acting_company(request, body)
    for key in body:
        if key not in ("company_id", "name"):
            raise http_error(400, f"Unknown field: {key}")
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > TOKEN_NAME_MAX):
        raise http_error(400, f"name must be text of at most {TOKEN_NAME_MAX} characters")
    created = await create_token(request.app[DB], company.id, (name or "").strip() or None)
    log.info("API token %s made for company %s", created["id"], company.id)
    return json_response(created, status=201)


@routes.delete("/api/tokens/{token_id}")
async def revoke_token_route(request: web.Request) -> web.Response:
    company = await authenticate(request)
    token_id = parse_id(request.match_info["token_id"])
    if token_id is None or not await revoke_token(request.app[DB], company.id, token_id):
        raise http_error(404, "Token not found")
    log.info("API token %s of company %s revoked", token_id, company.id)
    return json_response({"ok": True, "id": token_id})


async def check_outbound_urls(request: web.Request, company: Company, settings: dict,
                              urls: Mapping[str, str]) -> dict:
    """The settings after outbound URLs were set: the operator's are recorded as theirs; a
    company's new ones must be public (400 naming the field) unless ALLOW_PRIVATE_URLS is on."""
    if is_admin(request):
        return record_operator_urls(settings, urls)
    current = {"evolution_url": company.evolution_url, **destination_urls(company.settings)}
    if not request.app[CONFIG].allow_private_urls:
        for field, url in urls.items():
            if url != current[field] and not operator_set(company, field, url):
                await refuse_private_url(field, url)
    return settings


LEAD_CSV_COLUMNS = ("id", "created_at", "phone", "name", "match_method", "confidence", "code",
                    "connection_id", "utm_source", "utm_medium", "utm_campaign", "utm_term",
                    "utm_content", "gclid", "fbclid", "ctwa_clid", "ad_id", "ad_title",
                    "landing_page", "referrer", "clicked_at", "first_message", "source",
                    "wa_id", "bsuid", "username")


LEAD_SEARCH_MAX = 100  # characters of a lead search (q)


def like_pattern(text: str) -> str:
    """A LIKE pattern (ESCAPE '\\') matching any text containing `text` as it is: its own
    % and _ match only themselves."""
    return "%" + re.sub(r"([\\%_])", r"\\\1", text) + "%"


def lead_filters(query: Mapping[str, str], company: Company, db: Storage
                 ) -> tuple[str, list[Any]]:
    """The WHERE clause of a lead listing from its query parameters."""
    sql = "company_id = ?"
    args: list[Any] = [company.id]
    start, end = parse_range(query, zoneinfo.ZoneInfo(company.settings["timezone"]))
    if start is not None:
        sql += " AND created_at >= ?"
        args.append(start)
    if end is not None:
        sql += " AND created_at < ?"
        args.append(end)
    for field, column in (("utm_source", "utm_source"), ("utm_medium", "utm_medium"),
                          ("utm_campaign", "utm_campaign"), ("connection", "connection_id"),
                          ("connection_id", "connection_id"), ("ad_id", "ad_id")):
        if query.get(field):
            sql += f" AND {column} = ?"
            args.append(query[field])
    method = query.get("match_method")
    if method:
        if method not in MATCH_METHODS:
            raise http_error(400, f"match_method must be {one_of(MATCH_METHODS)}")
        sql += " AND match_method = ?"
        args.append(method)
    search = query.get("q", "").strip()
    if len(search) > LEAD_SEARCH_MAX:
        raise http_error(400, f"q must be at most {LEAD_SEARCH_MAX} characters")
    if search:
        # The name or @username contains it (any case), or, when it has digits, the phone
        # contains them.
        sql += f" AND ({db.lower('name')} LIKE ? ESCAPE '\\' OR username LIKE ? ESCAPE '\\'"
        args += [like_pattern(search.lower()), like_pattern(search.lower().lstrip("@"))]
        if digits(search):
            sql += " OR phone LIKE ?"
            args.append(like_pattern(digits(search)))
        sql += ")"
    return sql, args


def csv_cell(value: Any) -> Any:
    # A cell starting with = + - @ would run as a formula in a spreadsheet.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


async def leads_csv(request: web.Request, where: str, args: list[Any]) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": 'attachment; filename="leads.csv"'})
    await response.prepare(request)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    out.write("\ufeff")  # a BOM, so spreadsheets read UTF-8 ("João") correctly
    writer.writerow(LEAD_CSV_COLUMNS)
    cursor = None
    while True:  # in pages, so a large export never sits in memory whole
        page_sql, page_args = where, list(args)
        if cursor is not None:
            page_sql += " AND id < ?"
            page_args.append(cursor)
        rows = await request.app[DB].fetchall(
            f"SELECT * FROM leads WHERE {page_sql} ORDER BY id DESC LIMIT 1000", *page_args)
        for row in rows:
            lead = lead_json(row)
            flat = {**lead, **lead["attribution"], **lead["identities"]}
            writer.writerow([csv_cell(flat.get(col)) for col in LEAD_CSV_COLUMNS])
        await response.write(out.getvalue().encode())
        out.seek(0)
        out.truncate()
        if len(rows) < 1000:
            break
        cursor = rows[-1]["id"]
    await response.write_eof()
    return response


@routes.get("/api/leads")
async def list_leads(request: web.Request) -> web.StreamResponse:
    company = await authenticate(request)
    query = request.query
    where, args = lead_filters(query, company, request.app[DB])
    if query.get("format") not in (None, "json", "csv"):
        raise http_error(400, "format must be json or csv")
    if query.get("format") == "csv" or (
            "text/csv" in request.headers.get("Accept", "") and query.get("format") != "json"):
        return await leads_csv(request, where, args)
    try:
        limit = int(query.get("limit", "100"))
    except ValueError:
        raise http_error(400, "limit must be a whole number") from None
    if not 1 <= limit <= 1000:
        raise http_error(400, "limit must be from 1 to 1000")
    if "cursor" in query:
        cursor = parse_id(query["cursor"])
        if cursor is None:
            raise http_error(400, "cursor is not valid")
        args.append(cursor)
        where += " AND id < ?"
    args.append(limit + 1)
    rows = await request.app[DB].fetchall(
        f"SELECT * FROM leads WHERE {where} ORDER BY id DESC LIMIT ?", *args)
    more = len(rows) > limit
    rows = rows[:limit]
    return json_response({"leads": [lead_json(r) for r in rows],
                              "next_cursor": str(rows[-1]["id"]) if more else None})


# ##################################################################################################
# HTTP handlers: connections (Evolution instances), QR codes and onboarding links
# ##################################################################################################

QR_FRESH_SECONDS = 30  # a qrcode.updated younger than this is shown without asking Evolution
LINK_TTL_DEFAULT = 7 * 86400  # seconds
LINK_TTL_MAX = 30 * 86400  # seconds


def evolution_for(request: web.Request, company: Company) -> EvolutionClient:
    config = request.app[CONFIG]
    server = evolution_server(config, company)
    if server is None:
        raise http_error(400, "No server configured")
    url, key = server
    return EvolutionClient(outbound_session(request.app, company, "evolution_url", url), url, key,
                           config.evolution_timeout,
                           company_chose(config, company, "evolution_url", url))


def evolution_http_error(exc: EvolutionError) -> web.HTTPException:
    if exc.status >= 500:
        log.warning("Evolution API: %s", exc.message)
    return http_error(exc.status, exc.message)


async def evolution_call(coro: Awaitable[Any]) -> Any:
    try:
        return await coro
    except EvolutionError as exc:
        raise evolution_http_error(exc) from None


async def connection_request(request: web.Request, place: str = "body"
                             ) -> tuple[Company, str]:
    """The company and connectionId of a management call. `connectionId` is read where the
    route documents it (`place`: "query" or "body"); the other place is looked at only when it
    is missing there, for clients of either habit, so an invalid value is never passed over."""
    body = await object_body(request) if request.can_read_body else {}
    places = {"query": request.query, "body": body}
    where = place if "connectionId" in places[place] else ("body" if place == "query"
                                                           else "query")
    connection_id = places[where].get("connectionId")
    if not isinstance(connection_id, str) or not connection_id:
        raise http_error(400, "connectionId is required")
    if not is_connection_id(connection_id):
        raise http_error(400, f"connectionId must be {ID_RULE}")
    return await acting_company(request, body), connection_id


def public_base(request: web.Request) -> str:
    config = request.app[CONFIG]
    if config.public_url:
        return config.public_url
    scheme = request.scheme
    if peer_is_proxy(request):
        scheme = request.headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip()
    return f"{scheme}://{request.host}"


def tracker_snippets(base: str, company_id: str) -> dict[str, str]:
    """The two forms of the website snippet (README, "The website snippet")."""
    src = html.escape(f"{base}/scripts/whatsapp-tracker.js")
    company = html.escape(company_id)
    return {"attribute": f'<script src="{src}" data-company="{company}" async></script>',
            "global": f"<script>window.whatsappcompanieId = '{company}';</script>\n"
                      f'<script src="{src}"></script>'}


@routes.get("/api/onboarding")
async def onboarding(request: web.Request) -> web.Response:
    """What a new company needs next: its snippets and how far it got (visits, connections,
    leads)."""
    company = await authenticate(request)
    base = public_base(request)
    return json_response({"public_url": base, "snippets": tracker_snippets(base, company.id),
                          **await onboarding_progress(request.app[DB], company.id)})


def instance_webhook(request: web.Request, company: Company, secret: str) -> dict:
    """The webhook an instance of ours gets on Evolution: every delivery to the company's URL
    with the connection's own secret header."""
    return {"url": f"{public_base(request)}/webhook/{company.id}", "byEvents": False,
            "base64": False, "headers": {WEBHOOK_SECRET_HEADER: secret},
            "events": EVOLUTION_EVENTS}


def cloud_webhook_url(request: web.Request, company: Company) -> str:
    """Where Meta posts a company's Cloud API deliveries (the Meta app's Callback URL)."""
    return f"{public_base(request)}/webhook/cloud/{urllib.parse.quote(company.id, safe='')}"


@routes.get("/api/connections")
async def list_connections(request: web.Request) -> web.Response:
    company = await authenticate(request)
    rows = await request.app[DB].fetchall(
        "SELECT * FROM connections WHERE company_id = ? ORDER BY created_at, id", company.id)
    hook = cloud_webhook_url(request, company)
    return json_response({"connections": [
        {**connection_json(r), **({"webhook_url": hook} if r["type"] == "cloud" else {})}
        for r in rows]})


def adoption_request(body: Mapping[str, Any]) -> tuple[str, str | None]:
    """(connectionId, instance_token or None) of a POST /api/connections, or 400."""
    if body.get("type") != "evolution":
        raise http_error(400, 'type must be "evolution" or "cloud"')
    if body.get("adopt") is not True:
        raise http_error(400, "adopt must be true: an instance that exists on the Evolution "
                              "server is adopted (POST /api/create-instance makes a new one)")
    connection_id = body.get("connectionId")
    if not is_connection_id(connection_id):
        raise http_error(400, f"connectionId must be {ID_RULE}")
    token = body.get("instance_token")
    if token is not None and (not isinstance(token, str) or not 0 < len(token) <= 256):
        raise http_error(400, "instance_token must be text of at most 256 characters")
    return connection_id, token


async def refuse_held_name(request: web.Request, company: Company, evolution: EvolutionClient,
                           connection_id: str) -> None:
    """Another company manages a connection of this name: on the same Evolution server it is
    that company's instance (404, as if it did not exist); elsewhere the name is taken (409)."""
    holder = await verified_holder(request.app[DB], connection_id)
    if holder is None or holder["company_id"] == company.id:
        return
    holder_url = holder["evolution_url"] or request.app[CONFIG].evolution_api_url
    if holder_url.rstrip("/") == evolution.base_url:
        raise http_error(404, "Connection not found")
    raise http_error(409, f"Connection {connection_id} already exists")


async def add_cloud_connection(request: web.Request, company: Company,
                               body: Mapping[str, Any]) -> web.Response:
    """Register a WhatsApp Cloud API number (SPEC §13): 201 with the Callback URL and the
    verify token to paste into the Meta app (the token shown only here)."""
    connection_id = body.get("connectionId")
    if not is_connection_id(connection_id):
        raise http_error(400, f"connectionId must be {ID_RULE}")
    row, verify_token = await create_cloud_connection(request.app[DB], company, connection_id,
                                                      cloud_connection_fields(body))
    hook = cloud_webhook_url(request, company)
    log.info("cloud connection added: %s/%s", company.id, connection_id)
    return json_response({"ok": True, "connection": {**connection_json(row), "webhook_url": hook},
                          "webhook_url": hook, "verify_token": verify_token}, status=201)


@routes.post("/api/connections")
async def adopt_connection(request: web.Request) -> web.Response:
    """Adopt an instance made outside WhatsTracking: check it on the company's Evolution server,
    point its webhook at us with a secret header of its own, and register it as verified."""
    body = await object_body(request)
    company = await acting_company(request, body)
    if body.get("type") == "cloud":
        return await add_cloud_connection(request, company, body)
    connection_id, given_token = adoption_request(body)
    evolution = evolution_for(request, company)
    # On the shared default server every company reaches every instance with the global key:
    # only the instance's own token shows that it is this company's.
    if (given_token is None
            and evolution.base_url == request.app[CONFIG].evolution_api_url.rstrip("/")):
        # 403, not 400: the request is well formed; it has not shown the instance is the company's.
        raise http_error(403, "instance_token is required on the shared Evolution server: "
                              "give the instance's own token (its apikey)")
    await refuse_held_name(request, company, evolution, connection_id)
    found = await evolution_call(evolution.find_instance(connection_id))
    if given_token is not None and not same_secret(given_token, found["token"]):
        raise http_error(403, "instance_token is not this instance's token on the Evolution "
                              "server")
    secret = new_secret("whc_")
    await evolution_call(evolution.set_webhook(
        connection_id, {"enabled": True, **instance_webhook(request, company, secret)}))
    row = await store_adopted(request.app[DB], company, connection_id, found,
                              found["token"] or given_token, secret)
    log.info("connection adopted: %s/%s", company.id, connection_id)
    return json_response({"ok": True, "connection": connection_json(row)}, status=201)


@routes.post("/api/create-instance")
async def create_instance(request: web.Request) -> web.Response:
    body = await object_body(request)
    company = await acting_company(request, body)
    connection_id = body.get("connectionId")
    if not is_connection_id(connection_id):
        raise http_error(400, f"connectionId must be {ID_RULE}")
    number = body.get("number")
    if number is not None and (not isinstance(number, str) or not 8 <= len(digits(number)) <= 15):
        raise http_error(400, "number must be a phone number with country code")
    db = request.app[DB]
    if await verified_holder(db, connection_id) is not None:  # not a row only webhooks made
        raise http_error(409, f"Connection {connection_id} already exists")
    evolution = evolution_for(request, company)
    instance_token = str(uuid.uuid4()).upper()
    secret = new_secret("whc_")
    try:
        created = await evolution.create_instance(
            connection_id, instance_token, instance_webhook(request, company, secret),
            digits(number) if number else None)
    except EvolutionError as exc:
        if not exc.unanswered:
            raise evolution_http_error(exc) from None
        created = await reconcile_create(request, company, evolution, connection_id,
                                         instance_token, secret, exc)
    instance = created.get("instance") if isinstance(created.get("instance"), dict) else {}
    token = created.get("hash")
    if isinstance(token, dict):  # Evolution v1: {"apikey": ...}
        token = token.get("apikey")
    qr = created.get("qrcode") if isinstance(created.get("qrcode"), dict) else {}
    code = qr_string(qr.get("code"))
    pairing = qr.get("pairingCode") if isinstance(qr.get("pairingCode"), str) else None
    ts = now()

    async def run(tx: Tx) -> dict:
        # A connection deleted earlier under this name, or known only from webhooks, comes back
        # to life with new secrets; all undone when another company took the name meanwhile.
        await tx.execute("DELETE FROM connections WHERE company_id = ? AND id = ?",
                         company.id, connection_id)
        row = await tx.fetchone(
            "INSERT INTO connections (company_id, id, state, instance_id, instance_token, "
            "webhook_secret, qr_code, qr_pairing_code, qr_at, created_at, updated_at, verified) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT DO NOTHING RETURNING *",
            company.id, connection_id, instance.get("status")
            if instance.get("status") in ("open", "connecting", "close") else "connecting",
            instance.get("instanceId"), token if isinstance(token, str) else instance_token,
            hash_token(secret), code, pairing, ts if code else None, ts, ts)
        if row is None:
            raise http_error(409, f"Connection {connection_id} already exists")
        return row

    row = await db.transact(run)
    log.info("connection created: %s/%s", company.id, connection_id)
    qrcode = qr_payload(code, pairing, row["state"]) if code else None
    if created.get("reconciled") and row["state"] != "open":  # its QR was in the lost answer
        try:
            qrcode = await current_qr(request, company, connection_id)
            row = await get_connection(db, company.id, connection_id)
        except web.HTTPException:  # no QR yet: GET /qrcode/generate-qrcode asks again
            pass
    return json_response({"ok": True, "connection": connection_json(row), "qrcode": qrcode},
                         status=201)


async def reconcile_create(request: web.Request, company: Company, evolution: EvolutionClient,
                           connection_id: str, instance_token: str, secret: str,
                           lost: EvolutionError) -> dict:
    """A create call left without answer (Evolution waits EVOLUTION_CREATE_WAIT seconds and
    more before it answers, and may have made the instance, its webhook carrying our secret):
    ask fetchInstances. Ours (it carries the token we generated): point its webhook at us as
    adoption does and go on as a create whose answer had no QR. Absent: it was not created
    (504 after a timeout, else 502). Another token: somebody else's instance took the name (409)."""
    timed_out = lost.unanswered == "timeout"
    try:
        found = await evolution.find_instance(connection_id)
    except EvolutionError as exc:
        if exc.status == 404:
            raise http_error(504 if timed_out else 502,
                             f"Connection {connection_id} was not created: the create call got "
                             f"no answer ({lost.message}) and the Evolution server does not "
                             "list the instance; try again") from None
        if evolution.company_chose and exc.upstream_status is None:
            # A company's own server that cannot be talked to: the one answer a closed port gets.
            raise evolution_http_error(exc) from None
        log.warning("Evolution API: %s; then %s", lost.message, exc.message)
        raise http_error(504 if timed_out else 502,
                         f"The create call got no answer ({lost.message}) and whether the "
                         f"Evolution server made connection {connection_id} could not be "
                         f"checked ({exc.message}); try again in a minute") from None
    if not same_secret(instance_token, found["token"]):
        raise http_error(409, f"Connection {connection_id} exists on the Evolution server but "
                              "is not the one this request created (it has another token): "
                              "adopt it (POST /api/connections with its instance_token) or "
                              "choose another connectionId")
    log.warning("Evolution API: %s; the instance %s/%s was made all the same, registering it",
                lost.message, company.id, connection_id)
    await evolution_call(evolution.set_webhook(
        connection_id, {"enabled": True, **instance_webhook(request, company, secret)}))
    return {"instance": {"instanceId": found["instance_id"], "status": found["state"]},
            "hash": found["token"], "reconciled": True}


@routes.get("/api/instance-status")
async def instance_status(request: web.Request) -> web.Response:
    company, connection_id = await connection_request(request, "query")
    db = request.app[DB]
    await get_connection(db, company.id, connection_id)
    evolution = evolution_for(request, company)
    state = await evolution_call(evolution.connection_state(connection_id))
    fields: dict[str, Any] = {"state": state} if state else {}
    if state == "open":
        info = await evolution_call(evolution.fetch_instance(connection_id))
        if info:
            owner = info.get("owner")
            if isinstance(owner, str) and owner.endswith(JID_PHONE):
                fields["phone"] = digits(jid_user(owner))
            for key in ("profile_name", "picture_url"):
                if isinstance(info.get(key), str):
                    fields[key] = info[key]
    if fields:
        await update_connection(db, company.id, connection_id, **fields)
    row = await get_connection(db, company.id, connection_id)
    return json_response(connection_json(row))


@routes.delete("/api/delete-instance")
async def delete_instance(request: web.Request) -> web.Response:
    """Delete the Evolution instance; keep the connection's history, marked deleted."""
    company, connection_id = await connection_request(request, "query")
    db = request.app[DB]
    row = await get_connection(db, company.id, connection_id, include_deleted=True,
                               cloud_ok=True)
    if row["type"] == "cloud":  # nothing to delete at Meta; its secrets go now
        await update_connection(db, company.id, connection_id, state="deleted",
                                deleted_at=row["deleted_at"] or now(), app_secret=None,
                                access_token=None, verify_token=None)
        return json_response({"ok": True, "connectionId": connection_id, "deleted": True})
    existed = await evolution_call(evolution_for(request, company).delete(connection_id))
    ts = now()
    await update_connection(db, company.id, connection_id, state="deleted", deleted_at=ts,
                            qr_code=None, qr_pairing_code=None)
    return json_response({"ok": True, "connectionId": connection_id, "deleted": True,
                              "existedOnEvolution": existed})


@routes.delete("/instance/delete")
async def delete_instance_completely(request: web.Request) -> web.Response:
    """Delete the Evolution instance and the local connection with its secrets and QR data;
    leads keep the connection id as text."""
    company, connection_id = await connection_request(request)
    db = request.app[DB]
    row = await get_connection(db, company.id, connection_id, include_deleted=True,
                               cloud_ok=True)
    existed = None
    if row["type"] != "cloud":
        existed = await evolution_call(evolution_for(request, company).delete(connection_id))

    async def run(tx: Tx) -> None:
        await tx.execute("DELETE FROM connections WHERE company_id = ? AND id = ?",
                         company.id, connection_id)

    await db.transact(run)
    answer = {"ok": True, "connectionId": connection_id, "deleted": True}
    return json_response(answer if existed is None else {**answer, "existedOnEvolution": existed})


@routes.post("/instance/restart")
async def restart_instance(request: web.Request) -> web.Response:
    company, connection_id = await connection_request(request)
    db = request.app[DB]
    await get_connection(db, company.id, connection_id)
    body = await evolution_call(evolution_for(request, company).restart(connection_id))
    instance = body.get("instance") if isinstance(body.get("instance"), dict) else {}
    state = instance.get("state") or instance.get("status")
    return json_response({"ok": True, "connectionId": connection_id,
                              "state": state if isinstance(state, str) else None})


@routes.post("/instance/logout")
async def logout_instance(request: web.Request) -> web.Response:
    company, connection_id = await connection_request(request)
    db = request.app[DB]
    await get_connection(db, company.id, connection_id)
    await evolution_call(evolution_for(request, company).logout(connection_id))
    await update_connection(db, company.id, connection_id, state="close")
    return json_response({"ok": True, "connectionId": connection_id, "state": "close"})


@routes.post("/api/connection-link")
async def create_connection_link(request: web.Request) -> web.Response:
    body = await object_body(request)
    company = await acting_company(request, body)
    connection_id = body.get("connectionId")
    if not isinstance(connection_id, str) or not connection_id:
        raise http_error(400, "connectionId is required")
    ttl = whole_number(body.get("ttl", LINK_TTL_DEFAULT))
    if ttl is None or not 60 <= ttl <= LINK_TTL_MAX:
        raise http_error(400, f"ttl must be seconds from 60 to {LINK_TTL_MAX}")
    db = request.app[DB]
    await get_connection(db, company.id, connection_id)
    key = await signing_key(db, company)
    expires = int(now()) + ttl
    query = urllib.parse.urlencode({"c": company.id, "exp": expires,
                                    "sig": link_signature(key, company.id, connection_id, expires)})
    path = f"/connect/{urllib.parse.quote(connection_id)}?{query}"
    return json_response({"ok": True, "connectionId": connection_id,
                              "url": public_base(request) + path, "expires_at": iso(expires)},
                             status=201)


async def current_qr(request: web.Request, company: Company, connection_id: str) -> dict:
    """The freshest QR of a connection: a recent qrcode.updated, else Evolution's connect.
    409 (with the state) when the number is already connected."""
    db = request.app[DB]
    row = await get_connection(db, company.id, connection_id)
    if (qr_string(row["qr_code"]) and row["qr_at"] and now() - row["qr_at"] < QR_FRESH_SECONDS
            and row["state"] != "open"):
        return qr_payload(row["qr_code"], row["qr_pairing_code"], row["state"])
    body = await evolution_call(evolution_for(request, company).connect(connection_id))
    instance = body.get("instance")
    if isinstance(instance, dict) and instance.get("state") == "open":
        await update_connection(db, company.id, connection_id, state="open", qr_code=None,
                                qr_pairing_code=None)
        row = await get_connection(db, company.id, connection_id)
        raise http_error(409, f"Connection {connection_id} is already connected", state="open",
                         phone=row["phone"], profileName=row["profile_name"])
    code = body.get("code")
    if not isinstance(code, str) or not code:
        raise http_error(503, "Evolution API has no QR code yet; try again in a few seconds")
    if qr_string(code) is None:
        raise http_error(502, f"Evolution API answered a QR code longer than {QR_CODE_MAX} "
                              "characters, which is no WhatsApp QR code")
    pairing = body.get("pairingCode") if isinstance(body.get("pairingCode"), str) else None
    await update_connection(db, company.id, connection_id, state="connecting", qr_code=code,
                            qr_pairing_code=pairing, qr_at=now())
    return qr_payload(code, pairing, "connecting")


@routes.get("/qrcode/generate-qrcode")
async def generate_qrcode(request: web.Request) -> web.Response:
    import segno

    connection_id = request.query.get("instanceId") or request.query.get("connectionId")
    if not connection_id:
        raise http_error(400, "instanceId is required")
    fmt = request.query.get("format", "png")
    if fmt not in ("png", "svg", "json"):
        raise http_error(400, "format must be png, svg or json")
    if "sig" in request.query:
        rate_limit(request, "public")
        try:
            company = await verify_link(request.app[DB], request.query, connection_id)
        except LinkError as exc:
            raise http_error(exc.status, exc.message) from None
    else:
        company = await authenticate(request)
    qr = await current_qr(request, company, connection_id)
    headers = {"Cache-Control": "no-store"}
    if fmt == "json":
        return json_response(qr, headers=headers)
    buffer = io.BytesIO()
    segno.make_qr(qr["code"]).save(buffer, kind=fmt, scale=8, border=4)
    content_type = "image/png" if fmt == "png" else "image/svg+xml"
    return web.Response(body=buffer.getvalue(), content_type=content_type, headers=headers)


def shipped_page(name: str) -> str:
    """An HTML page shipped beside whatstracking.py, read once at start-up (the hashes of its
    inline script and style go in its Content-Security-Policy); "" when the install left it out
    (its route then answers 404)."""
    try:
        return (HERE / name).read_text(encoding="utf-8")
    except OSError:
        return ""


def inline(tag: str, page: str) -> str:
    """The content of `page`'s first plain <tag> element (<script>, <style>), "" if none."""
    match = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.S)
    return match.group(1) if match else ""


# connect.html: the same script for every link and language. The link's QR URL is in the body's
# data-qr-url and the page's words in a JSON data block (#texts, never run), so the script's hash
# in the page's Content-Security-Policy lets it run, and nothing else. __MARKERS__ are filled in
# by connect_page_template and connect_page.
CONNECT_PAGE = shipped_page("connect.html")
CONNECT_SCRIPT, CONNECT_STYLE = inline("script", CONNECT_PAGE), inline("style", CONNECT_PAGE)
CONNECT_ERROR_PAGE = shipped_page("connect-error.html")
CONNECT_ERROR_STYLE = inline("style", CONNECT_ERROR_PAGE)
# The page's languages (locales/<language>.json, keys connect.*); the first is the default.
CONNECT_LANGUAGES = ("pt-BR", "en")
CONNECT_ERROR_KEYS = {401: "connect.error.invalid", 410: "connect.error.expired",
                      404: "connect.error.not_found"}


def csp_hash(text: str) -> str:
    """A CSP source allowing the inline <script> or <style> whose content is exactly `text`."""
    return f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"


def page_headers(policy: str, **extra: str) -> dict[str, str]:
    """An HTML page's headers: its Content-Security-Policy, and no framing by other sites
    (frame-ancestors for today's browsers, X-Frame-Options for older ones)."""
    return {"Content-Security-Policy": f"{policy}; base-uri 'none'; frame-ancestors 'none'",
            "X-Frame-Options": "DENY", **extra}


# The link's signature is in the page's URL: no Referer may carry it elsewhere. The words vary
# by language, the script and style do not: one policy for all.
CONNECT_HEADERS = page_headers(
    f"default-src 'none'; script-src {csp_hash(CONNECT_SCRIPT)}; style-src "
    f"{csp_hash(CONNECT_STYLE)}; img-src data:; connect-src 'self'; form-action 'none'",
    **{"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
       "Vary": "Accept-Language"})
CONNECT_ERROR_HEADERS = page_headers(
    f"default-src 'none'; style-src {csp_hash(CONNECT_ERROR_STYLE)}; form-action 'none'",
    **{"Referrer-Policy": "no-referrer", "Vary": "Accept-Language"})


def page_language(tag: str) -> str | None:
    """One of CONNECT_LANGUAGES for a language tag (pt, pt-PT, pt-BR → pt-BR; en* → en)."""
    primary = tag.strip().lower().split("-")[0].split("_")[0]
    return {"pt": "pt-BR", "en": "en"}.get(primary)


def connect_language(request: web.Request) -> str:
    """The /connect page's language: ?lang=, else the first of Accept-Language's languages (by
    preference) that it has, else pt-BR."""
    chosen = page_language(request.query.get("lang", ""))
    if chosen:
        return chosen
    ranked = []
    for i, part in enumerate(request.headers.get("Accept-Language", "").split(",")[:20]):
        tag, _, params = part.partition(";")
        weight = 1.0
        match = re.search(r"q\s*=\s*([^;\s]*)", params)
        if match:  # a weight that is no number (nor 0) leaves the language out
            try:
                weight = float(match.group(1))
            except ValueError:
                weight = 0.0
        if weight > 0:
            ranked.append((-weight, i, tag))
    for _, _, tag in sorted(ranked):
        chosen = page_language(tag)
        if chosen:
            return chosen
    return CONNECT_LANGUAGES[0]


@functools.lru_cache(maxsize=len(CONNECT_LANGUAGES))
@functools.lru_cache(maxsize=len(CONNECT_LANGUAGES))
def connect_texts(language: str) -> dict[str, str]:
    """The page's words in `language` (connect.* keys without the prefix), English for a key
    the language lacks. Read once per process."""
    texts = {}
    for source in ("en", language):
        texts.update({key[len("connect."):]: value for key, value in dictionary(source).items()
                      if key.startswith("connect.") and isinstance(value, str)})
    return texts


@functools.lru_cache(maxsize=len(CONNECT_LANGUAGES))
def connect_page_template(language: str) -> str:
    """The page in `language`, with __QR_URL__ left for the link. Built once per language."""
    t = connect_texts(language)
    script_texts = {key: t.get(key, "") for key in (
        "scan", "pairing", "connected", "waiting", "lost")}
    script_texts.update({key: t.get(f"error.{key}", "")
                         for key in ("invalid", "expired", "not_found")})
    # In a script element only "</" (or "<!--") could end it early: no "<" goes in.
    data = json.dumps(script_texts, ensure_ascii=False).replace("<", "\\u003c")
    page = CONNECT_PAGE.replace("__TEXTS__", data)
    for marker, key in (("__TITLE__", "title"), ("__LOADING__", "loading"),
                        ("__QR_ALT__", "qr_alt"), ("__HELP__", "help")):
        page = page.replace(marker, html.escape(t.get(key, "")))
    return page.replace("__LANG__", language)


@routes.get("/connect/{connection_id}")
async def connect_page(request: web.Request) -> web.Response:
    """The page an agency sends its client: the QR, refreshed until the number is connected."""
    rate_limit(request, "public")
    connection_id = request.match_info["connection_id"]
    language = connect_language(request)
    if not CONNECT_PAGE or not CONNECT_ERROR_PAGE:
        raise http_error(404, "Not found")  # (the install left connect.html out)
    try:
        company = await verify_link(request.app[DB], request.query, connection_id)
        row = await request.app[DB].fetchone(
            "SELECT deleted_at, verified FROM connections WHERE company_id = ? AND id = ?",
            company.id, connection_id)
        if row is None or row["deleted_at"] is not None or not row["verified"]:
            raise LinkError(404, "Connection not found")
    except LinkError as exc:
        if "text/html" not in request.headers.get("Accept", "text/html"):
            raise http_error(exc.status, exc.message) from None
        t = connect_texts(language)
        message = t.get(CONNECT_ERROR_KEYS.get(exc.status, "")[len("connect."):]) or exc.message
        page = (CONNECT_ERROR_PAGE.replace("__LANG__", language)
                .replace("__TITLE__", html.escape(t.get("error.title", "")))
                .replace("__ASK__", html.escape(t.get("ask_again", "")))
                .replace("__MESSAGE__", html.escape(message)))
        return web.Response(status=exc.status, text=page, content_type="text/html",
                            headers={**CONNECT_ERROR_HEADERS, "Content-Language": language})
    query = urllib.parse.urlencode({"instanceId": connection_id, "format": "json",
                                    "c": request.query["c"], "exp": request.query["exp"],
                                    "sig": request.query["sig"]})
    page = connect_page_template(language).replace(
        "__QR_URL__", html.escape("/qrcode/generate-qrcode?" + query))
    return web.Response(text=page, content_type="text/html",
                        headers={**CONNECT_HEADERS, "Content-Language": language})


@routes.get("/public/get-connection")
async def public_connection(request: web.Request) -> web.Response:
    rate_limit(request, "public")
    connection_id = request.query.get("connectionId")
    if not connection_id:
        raise http_error(400, "connectionId is required")
    row = await request.app[DB].fetchone(
        "SELECT c.id, c.state, c.phone, c.profile_name, p.name AS company_name "
        "FROM connections c JOIN companies p ON p.id = c.company_id "
        "WHERE c.id = ? AND c.verified = 1 AND c.deleted_at IS NULL", connection_id)
    if row is None:
        raise http_error(404, "Connection not found")
    return json_response({"connectionId": row["id"], "company": row["company_name"],
                              "state": row["state"], "phone": mask_phone(row["phone"]),
                              "profileName": row["profile_name"]})


# ##################################################################################################
# HTTP handlers: generic webhook ingest
# ##################################################################################################

@routes.post("/webhook-ingest")
async def webhook_ingest(request: web.Request) -> web.Response:
    config, db = request.app[CONFIG], request.app[DB]
    given = request.headers.get("X-Webhook-Token") or bearer(request)
    if not same_secret(given, config.webhook_shared_token):
        raise http_error(401, "Unauthorized")
    raw = await read_body(request, WEBHOOK_BODY_MAX)
    try:
        payload = parse_json(raw, scrub=True)
    except NotJson as exc:
        raise not_json_error(exc) from None
    source = clean_text(request.query.get("source") or request.headers.get("X-Webhook-Source")
                        or "ingest")[:64]
    company = None
    company_id = request.query.get("company_id")
    if company_id:
        company = await get_company(db, company_id)
        if company is None:
            raise http_error(404, "Company not found")
    evolution = (company is not None and isinstance(payload, dict)
                 and isinstance(payload.get("event"), str) and "instance" in payload
                 and "data" in payload)
    if evolution:  # the same batch as /webhook, authenticated here by the shared token
        item = WebhookInput(company.id, raw, payload, False, request.headers, None, "", source,
                            trusted=True)
        try:
            result = await db.submit(webhook_batch, item)
        except Exception as exc:  # noqa: BLE001 - the body is kept (and the error logged)
            result = await store_failed_delivery(db, company.id, source, raw, request.headers,
                                                 payload, exc)
        if getattr(result, "refused", None):  # (the company was deleted meanwhile)
            raise http_error(*result.refused)
        await note_delivery(request.app, item)
        if result.get("failed"):
            return failed_delivery_answer(request, result["delivery_id"])
        if getattr(result, "wake", False):
            wake_worker(request.app)
    else:
        delivery_id = await db.transact(lambda tx: _store_delivery(
            tx, company.id if company else None, source, raw, request.headers, payload))
        result = {"delivery_id": delivery_id, "processed": False}
    log.info("webhook ingested", extra={"fields": {
        "event": "webhook_ingest", "source": source, "company_id": company_id,
        "delivery_id": result["delivery_id"], "bytes": len(raw),
        "payload_event": payload.get("event") if isinstance(payload, dict) else None,
        "processed": evolution, "request_id": request[REQUEST_ID]}})
    return json_response({"ok": True, "id": result["delivery_id"], **result}, status=202)


# ##################################################################################################
# HTTP handlers: conversion events, deliveries and the Google Ads export
# ##################################################################################################

async def company_lead(request: web.Request, company: Company) -> dict:
    lead_id = parse_id(request.match_info["lead_id"])
    if lead_id is None:
        raise http_error(404, "Lead not found")
    lead = await request.app[DB].fetchone("SELECT * FROM leads WHERE company_id = ? AND id = ?",
                                          company.id, lead_id)
    if lead is None:
        raise http_error(404, "Lead not found")
    return lead


@routes.post("/api/leads/{lead_id}/events")
async def add_lead_event(request: web.Request) -> web.Response:
    body = await object_body(request)
    company = await acting_company(request, body)
    lead = await company_lead(request, company)
    name = body.get("name")
    if name not in FOLLOW_UP_EVENTS:
        raise http_error(400, f"name must be {one_of(FOLLOW_UP_EVENTS)}")
    value = body.get("value")
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                              or value < 0 or value > 1e12):
        raise http_error(400, "value must be a number from 0")
    currency = body.get("currency", company.settings["currency"])
    if not isinstance(currency, str) or not CURRENCY_RE.match(currency):
        raise http_error(400, "currency must be a three-letter ISO 4217 code")
    occurred_at = now()
    if body.get("occurred_at") is not None:
        # Ahead of our clock is taken as now (as Meta takes event_time): no static schema can
        # say "not in the future", and a client whose clock runs ahead still records the sale.
        # So is a time text past 9999-12-31 by its offset; a number past it is out of range.
        given = body["occurred_at"]
        occurred_at = parse_time(given, "occurred_at", clamp=isinstance(given, str))
        if occurred_at > now() + CLOCK_SKEW_MAX:
            occurred_at = now()
        if occurred_at < EVENT_TIME_MIN:
            raise http_error(400, "occurred_at is before 1970")
    event_id = body.get("event_id")
    if event_id is None:
        event_id = f"{name}-{lead['id']}-{uuid.uuid4().hex[:12]}"
    elif not isinstance(event_id, str) or not 1 <= len(event_id) <= 128:
        raise http_error(400, "event_id must be text of 1 to 128 characters")
    event, created = await request.app[DB].transact(lambda tx: record_event(
        tx, company, lead["id"], name, event_id, occurred_at, "api",
        float(value) if value is not None else None, currency.upper()))
    if event["lead_id"] != lead["id"]:
        raise http_error(409, "event_id is already used by another lead's event")
    if created:
        wake_worker(request.app)
    return json_response({"ok": True, "event": event_json(event), "duplicate": not created},
                             status=201 if created else 200)


@routes.get("/api/leads/{lead_id}/events")
async def list_lead_events(request: web.Request) -> web.Response:
    company = await authenticate(request)
    lead = await company_lead(request, company)
    rows = await request.app[DB].fetchall("SELECT * FROM lead_events WHERE lead_id = ? "
                                          "ORDER BY occurred_at, id", lead["id"])
    return json_response({"events": [event_json(r) for r in rows]})


DELIVERY_SELECT = ("SELECT d.*, e.name AS event_name, e.event_id AS event_key FROM deliveries d "
                   "JOIN lead_events e ON e.id = d.event_row_id WHERE d.company_id = ?")


@routes.get("/api/leads/{lead_id}")
async def show_lead(request: web.Request) -> web.Response:
    """A lead's page: the lead, its events and their deliveries."""
    company = await authenticate(request)
    lead = await company_lead(request, company)
    db = request.app[DB]
    events = await db.fetchall("SELECT * FROM lead_events WHERE lead_id = ? "
                               "ORDER BY occurred_at, id", lead["id"])
    deliveries = await db.fetchall(DELIVERY_SELECT + " AND d.lead_id = ? ORDER BY d.id",
                                   company.id, lead["id"])
    return json_response({"lead": lead_json(lead), "events": [event_json(r) for r in events],
                          "deliveries": [delivery_json(r) for r in deliveries]})


@routes.get("/api/deliveries")
async def list_deliveries(request: web.Request) -> web.Response:
    company = await authenticate(request)
    sql = DELIVERY_SELECT
    args: list[Any] = [company.id]
    status = request.query.get("status")
    if status is not None:
        if status not in DELIVERY_STATUSES:
            raise http_error(400, f"status must be {one_of(DELIVERY_STATUSES)}")
        sql += " AND d.status = ?"
        args.append(status)
    if "lead_id" in request.query:
        lead_id = parse_id(request.query["lead_id"])
        if lead_id is None:
            raise http_error(400, "lead_id must be a lead's id")
        sql += " AND d.lead_id = ?"
        args.append(lead_id)
    rows = await request.app[DB].fetchall(sql + " ORDER BY d.id DESC LIMIT 500", *args)
    return json_response({"deliveries": [delivery_json(r) for r in rows]})


@routes.post("/api/deliveries/{delivery_id}/retry")
async def retry_delivery(request: web.Request) -> web.Response:
    company = await authenticate(request)
    delivery_id = parse_id(request.match_info["delivery_id"])
    if delivery_id is None:
        raise http_error(404, "Not found")

    async def run(tx: Tx) -> dict | None:
        row = await tx.fetchone("SELECT * FROM deliveries WHERE id = ? AND company_id = ?",
                                delivery_id, company.id)
        if row is None or row["status"] != "failed":
            return row
        await tx.execute("UPDATE deliveries SET status = 'pending', attempts = 0, "
                         "next_attempt_at = ?, updated_at = ? WHERE id = ?", now(), now(),
                         delivery_id)
        return await tx.fetchone(
            "SELECT d.*, e.name AS event_name, e.event_id AS event_key FROM deliveries d "
            "JOIN lead_events e ON e.id = d.event_row_id WHERE d.id = ?", delivery_id)

    row = await request.app[DB].transact(run)
    if row is None:
        raise http_error(404, "Not found")
    if row["status"] != "pending":
        raise http_error(409, f"Only failed deliveries can be retried (this one is "
                              f"{row['status']})")
    wake_worker(request.app)
    return json_response({"ok": True, "delivery": delivery_json(row)})


@routes.post("/api/destinations/{name}/test")
async def send_test_event(request: web.Request) -> web.Response:
    """Send a test event the platform keeps apart and answer with what the platform said."""
    body = await object_body(request) if request.body_exists else {}
    company = await acting_company(request, body)
    result = await test_destination(request.app[CONFIG], (request.app[HTTP],
                                    request.app[COMPANY_HTTP]), company,
                                    request.match_info["name"], body)
    return json_response(result)


@routes.get("/api/exports/google-ads.csv")
async def google_ads_export(request: web.Request) -> web.Response:
    """Offline click conversions in Google Ads' upload template: leads with a Google click id
    (gclid, or gbraid/wbraid from iOS: one of the three per row, as the template wants), with
    the hashed phone of enhanced conversions for leads (SHA-256 of E.164 with its `+`)."""
    company = await authenticate(request)
    start, end = parse_range(request.query, zoneinfo.ZoneInfo(company.settings["timezone"]))
    conversions = google_ads_conversions(company)
    wanted = request.query.get("conversion_name")
    if wanted and wanted not in conversions.values():
        raise http_error(400, "conversion_name must be one of: " + ", ".join(
            google_ads_conversion_names(company)))
    names = {event: name for event, name in conversions.items()
             if not wanted or name == wanted}
    # gbraid/wbraid live in the attribution JSON: every lead with a click id of the three.
    sql = ("SELECT l.gclid, l.phone, l.attribution, e.name, e.value, e.currency, e.occurred_at "
           "FROM lead_events e JOIN leads l ON l.id = e.lead_id WHERE e.company_id = ? AND "
           "(l.gclid IS NOT NULL OR l.attribution LIKE '%braid\":\"%')")
    args: list[Any] = [company.id]
    if start is not None:
        sql += " AND e.occurred_at >= ?"
        args.append(start)
    if end is not None:
        sql += " AND e.occurred_at < ?"
        args.append(end)
    rows = await request.app[DB].fetchall(sql + " ORDER BY e.occurred_at, e.id", *args)
    zone = zoneinfo.ZoneInfo(company.settings["timezone"])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([f"Parameters:TimeZone={company.settings['timezone']}"])
    writer.writerow(["Google Click ID", "GBRAID", "WBRAID", "Conversion Name", "Conversion Time",
                     "Conversion Value", "Conversion Currency", "Phone Number"])
    for row in rows:
        click = google_click_id(row, loads_or(row["attribution"], {}))
        if row["name"] not in names or click is None:
            continue
        ids = [click[1] if kind == click[0] else "" for kind in GOOGLE_CLICK_IDS]
        when = datetime.fromtimestamp(row["occurred_at"], zone).strftime("%Y-%m-%d %H:%M:%S")
        value = "" if row["value"] is None else f"{row['value']:g}"
        phone = e164_hashes(row["phone"])
        writer.writerow([*ids, names[row["name"]], when, value,
                         row["currency"] or company.settings["currency"],
                         phone[0] if phone else ""])
    return web.Response(text=out.getvalue(), content_type="text/csv", charset="utf-8", headers={
        "Content-Disposition": 'attachment; filename="google-ads-conversions.csv"'})


# ##################################################################################################
# HTTP handlers: reports and the dashboard
# ##################################################################################################

DASHBOARD_PATH = HERE / "dashboard.html"
# The console runs only its own files (/console/*.js): no inline script, no on* attribute.
DASHBOARD_HEADERS = page_headers(
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'", **{"Cache-Control": "no-cache"})


@routes.get("/api/report")
async def report(request: web.Request) -> web.Response:
    company = await authenticate(request)
    group_by = request.query.get("group_by", "utm_source")
    if group_by not in REPORT_GROUPS:
        raise http_error(400, "group_by must be one of " + ", ".join(REPORT_GROUPS))
    start, end = parse_range(request.query, zoneinfo.ZoneInfo(company.settings["timezone"]))
    end = end if end is not None else now()
    start = start if start is not None else end - REPORT_DEFAULT_DAYS * 86400
    return json_response(await build_report(request.app[DB], company, group_by, start, end))


@routes.get("/dashboard")
async def dashboard(request: web.Request) -> web.Response:
    return web.Response(body=shipped_file(DASHBOARD_PATH), content_type="text/html",
                        charset="utf-8", headers=DASHBOARD_HEADERS)


# The console's views (console/*.js) and the dictionaries (locales/<language>.json) are plain
# files beside whatstracking.py, served as they are: no build step. A third language is one file.
CONSOLE_DIR = HERE / "console"
LOCALES_DIR = HERE / "locales"
CONSOLE_FILE_RE = re.compile(r"^[a-z][a-z0-9-]{0,40}\.js\Z")
LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(-[A-Z]{2})?\Z")


@routes.get("/console/{name}")
async def console_script(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not CONSOLE_FILE_RE.match(name):
        raise http_error(404, "Not found")
    return web.Response(body=shipped_file(CONSOLE_DIR / name), content_type="application/javascript",
                        charset="utf-8", headers={"Cache-Control": "no-cache"})


def dictionary(language: str) -> dict:
    """locales/<language>.json as a dict ({} when the install has no such file)."""
    if not LANGUAGE_RE.match(language):
        return {}
    try:
        return json.loads((LOCALES_DIR / f"{language}.json").read_text("utf-8"))
    except (OSError, ValueError):
        return {}


def languages() -> list[dict]:
    """The dictionaries shipped: [{"code": "en", "name": "English"}, ...], by code."""
    found = []
    for path in sorted(LOCALES_DIR.glob("*.json")):
        if LANGUAGE_RE.match(path.stem):
            found.append({"code": path.stem, "name": dictionary(path.stem).get("language.name",
                                                                                 path.stem)})
    return found


@routes.get("/locales")
async def list_languages(request: web.Request) -> web.Response:
    return json_response({"languages": languages()}, headers={"Cache-Control": "no-cache"})


@routes.get("/locales/{language}.json")
async def serve_dictionary(request: web.Request) -> web.Response:
    language = request.match_info["language"]
    if not LANGUAGE_RE.match(language):
        raise http_error(404, "Not found")
    return web.Response(body=shipped_file(LOCALES_DIR / f"{language}.json"),
                        content_type="application/json", charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


# ##################################################################################################
# HTTP handlers: operations and privacy (metrics, erasure)
# ##################################################################################################

def _prometheus_labels(**labels: Any) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels.items())
    return "{" + inner + "}"


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format. Leads and deliveries come from the database (every process's);
    requests, tracking events and webhook timings are this process's since it started. Lead
    counts span every company, so only the operator's METRICS_TOKEN or ADMIN_TOKEN reads them."""
    config = request.app[CONFIG]
    require_bearer(request, config.metrics_token, config.admin_token)
    m, db = request.app[METRICS], request.app[DB]
    lines = ["# HELP whatstracking_http_requests_total HTTP requests by route, method and status.",
             "# TYPE whatstracking_http_requests_total counter"]
    for (route, method, status), n in sorted(m.requests.items()):
        lines.append("whatstracking_http_requests_total"
                     f"{_prometheus_labels(route=route, method=method, status=status)} {n}")
    lines += ["# HELP whatstracking_http_requests_in_flight Requests being handled (headers read, "
              "this one included).", "# TYPE whatstracking_http_requests_in_flight gauge",
              f"whatstracking_http_requests_in_flight {request.app[IN_FLIGHT].count}"]
    lines += ["# HELP whatstracking_tracking_events_total Tracking events stored, by event.",
              "# TYPE whatstracking_tracking_events_total counter"]
    for event, n in sorted(m.tracking.items()):
        lines.append(f"whatstracking_tracking_events_total{_prometheus_labels(event=event)} {n}")
    lines += ["# HELP whatstracking_leads Leads in the database, by match method.",
              "# TYPE whatstracking_leads gauge"]
    counts = {r["match_method"]: r["n"] for r in await db.fetchall(
        "SELECT match_method, COUNT(*) AS n FROM leads GROUP BY match_method")}
    for method in MATCH_METHODS:
        lines.append(f"whatstracking_leads{_prometheus_labels(match_method=method)} "
                     f"{counts.get(method, 0)}")
    lines += ["# HELP whatstracking_deliveries Conversion deliveries, by destination and status.",
              "# TYPE whatstracking_deliveries gauge"]
    for row in await db.fetchall("SELECT destination, status, COUNT(*) AS n FROM deliveries "
                                 "GROUP BY destination, status ORDER BY destination, status"):
        lines.append("whatstracking_deliveries"
                     f"{_prometheus_labels(destination=row['destination'], status=row['status'])}"
                     f" {row['n']}")
    lines += ["# HELP whatstracking_webhook_processing_seconds Time to store and process one "
              "Evolution delivery.", "# TYPE whatstracking_webhook_processing_seconds histogram"]
    cumulative = 0
    for bound, n in zip([*map(str, Metrics.BUCKETS), "+Inf"], m.webhook_buckets):
        cumulative += n
        lines.append("whatstracking_webhook_processing_seconds_bucket"
                     f"{_prometheus_labels(le=bound)} {cumulative}")
    lines.append(f"whatstracking_webhook_processing_seconds_sum {m.webhook_sum:.6f}")
    lines.append(f"whatstracking_webhook_processing_seconds_count {cumulative}")
    return web.Response(text="\n".join(lines) + "\n",
                        content_type="text/plain", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


@routes.delete("/api/contacts/{phone}")
async def delete_contact(request: web.Request) -> web.Response:
    company = await authenticate(request)
    given = request.match_info["phone"]
    if BSUID_RE.fullmatch(given):  # a person Meta knows only by their business-scoped id
        erased = await erase_contact(request.app[DB], company.id, bsuid=given)
        who = {"bsuid": given}
    else:
        phone = digits(given)
        if not 8 <= len(phone) <= 15:
            raise http_error(400, "phone must be a number with country code (8 to 15 digits) "
                                  "or a BSUID (BR.1502576394655843)")
        erased = await erase_contact(request.app[DB], company.id, phone)
        who = {"phone": phone}
    log.info("contact erased", extra={"fields": {
        "event": "contact_erased", "company_id": company.id, **erased,
        "request_id": request[REQUEST_ID]}})
    return json_response({"ok": True, **who, "erased": erased})


# ##################################################################################################
# HTTP handlers: the doctor
# ##################################################################################################

@routes.get("/api/checks")
async def show_checks(request: web.Request) -> web.Response:
    """The doctor's checks for one company (its token, or the admin's with company_id)."""
    company = await authenticate(request)
    found = await Doctor(request.app[CONFIG], request.app[DB],
                         (request.app[HTTP], request.app[COMPANY_HTTP])).run([company])
    return json_response({"ok": all(c.ok for c in found),
                         "checks": [c.json() for c in found]})


# ##################################################################################################
# Middlewares
# ##################################################################################################

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_STATUS_MESSAGES = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
                    405: "Method not allowed", 413: "Request body too large"}


@web.middleware
async def in_flight_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Counts the requests under way for a stop to wait for; once stopping, each answer asks
    its client to close the connection (its next request goes to a process that stays)."""
    flight = request.app[IN_FLIGHT]
    flight.count += 1
    flight.idle.clear()
    try:
        response = await handler(request)
    finally:
        flight.count -= 1
        if not flight.count:
            flight.idle.set()
    if flight.stopping:
        response.force_close()
    return response


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every error becomes SPEC §4's JSON; every response carries X-Request-Id."""
    given = request.headers.get("X-Request-Id", "")
    # A log correlation id, not a secret: the fast PRNG spares a system call per request.
    request_id = given if _REQUEST_ID_RE.match(given) else f"{random.getrandbits(128):032x}"
    request[REQUEST_ID] = request_id
    try:
        if "%00" in request.raw_path:  # (the HTTP parser refuses a raw NUL or bytes not UTF-8)
            raise http_error(400, "The address holds a NUL character (%00)")
        response = await handler(request)
    except Refused as exc:  # the domain's refusal: the JSON http_error(status, message) gives
        response = web.Response(status=exc.status, text=json_dumps({"error": exc.message}),
                                content_type="application/json")
    except web.HTTPException as exc:
        if exc.status < 400:
            exc.headers["X-Request-Id"] = request_id
            raise
        if exc.content_type == "application/json":
            response = web.Response(status=exc.status, text=exc.text,
                                    content_type="application/json", headers={
                                        k: v for k, v in exc.headers.items()
                                        if k.lower() in ("allow", "retry-after", "www-authenticate",
                                                         "access-control-allow-origin")})
        else:
            message = _STATUS_MESSAGES.get(exc.status, exc.reason)
            response = json_response({"error": message}, status=exc.status)
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s (request %s)", request.method, request.path,
                      request_id)
        response = json_response({"error": "Internal server error",
                                      "request_id": request_id}, status=500)
    response.headers["X-Request-Id"] = request_id
    resource = request.match_info.route.resource
    key = (resource.canonical if resource is not None else "unmatched", request.method,
           response.status)
    counts = request.app[METRICS].requests
    counts[key] = counts.get(key, 0) + 1
    return response


# ##################################################################################################
# Application factory
# ##################################################################################################

async def storage_ctx(app: web.Application):
    db = app[DB]
    await db.connect()
    await db.migrate()
    yield
    await db.close()  # flushes units of work still queued


def new_http_session(public_only: bool = False) -> aiohttp.ClientSession:
    """An aiohttp.ClientSession for outbound calls (the server's, and the CLI's `check`);
    `public_only`: it connects to public addresses only (URLs companies chose)."""
    connector = aiohttp.TCPConnector(socket_factory=public_socket) if public_only else None
    return aiohttp.ClientSession(connector=connector,
                                 timeout=aiohttp.ClientTimeout(total=60, connect=10),
                                 headers={"User-Agent": f"WhatsTracking/{VERSION}"})


async def http_client_ctx(app: web.Application):
    app[HTTP] = new_http_session()
    app[COMPANY_HTTP] = new_http_session(public_only=True)
    yield
    await app[HTTP].close()
    await app[COMPANY_HTTP].close()


async def delivery_worker_ctx(app: web.Application):
    stopping = asyncio.Event()
    sessions = (app[HTTP], app[COMPANY_HTTP])  # opened by http_client_ctx, before this one
    task = asyncio.create_task(
        delivery_worker(app[DB], app[CONFIG], sessions, app[DELIVERY_WAKE], stopping),
        name="delivery-worker")
    yield
    # Finish the delivery in flight, hand back the rest, stop.
    stopping.set()
    wake_worker(app)
    try:
        await asyncio.wait_for(task, app[CONFIG].delivery_timeout + 5)
    except asyncio.TimeoutError:
        log.warning("delivery worker did not stop in time; its claimed rows retry later")


async def retention_ctx(app: web.Application):
    """Purge what RETENTION_DAYS lets go, soon after start and then every hour."""
    days = app[CONFIG].retention_days

    async def loop() -> None:
        delay = 60.0  # seconds: let the start-up traffic settle first
        while True:
            await asyncio.sleep(delay)
            delay = RETENTION_INTERVAL
            try:
                purged = await purge_expired(app[DB], days)
            except Exception:  # noqa: BLE001 - try again next time
                log.exception("retention purge failed")
                continue
            log.info("retention purge", extra={"fields": {"event": "retention_purge",
                                                          "days": days, **purged}})

    task = asyncio.create_task(loop(), name="retention") if days > 0 else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def create_app(config: Config | None = None) -> web.Application:
    """The WhatsTracking application; nothing connects until it starts."""
    config = config or load_config({})
    app = web.Application(middlewares=[in_flight_middleware, error_middleware],
                          client_max_size=WEBHOOK_BODY_MAX)
    app[CONFIG] = config
    app[DB] = Storage.from_url(config.database_url, config)
    app[TRACKER] = load_tracker()
    app.cleanup_ctx.append(storage_ctx)
    app.cleanup_ctx.append(http_client_ctx)
    app[DELIVERY_WAKE] = asyncio.Event()
    app.cleanup_ctx.append(delivery_worker_ctx)
    app.cleanup_ctx.append(retention_ctx)
    app[METRICS] = Metrics()
    app[IN_FLIGHT] = InFlight()
    app[TOKEN_USES] = TokenUses()
    app[WEBHOOK_NOTES] = {"delivered": RateLimiter(1, WEBHOOK_NOTE_KEYS),
                          "rejected": RateLimiter(1, WEBHOOK_NOTE_KEYS),
                          "lines": RateLimiter(REJECTION_LINES_PER_MINUTE)}
    app[LIMITS] = {"tracking": RateLimiter(config.rate_limit_tracking),
                   "public": RateLimiter(config.rate_limit_public)}
    app.add_routes(routes)
    return app


# ##################################################################################################
# CLI
# ##################################################################################################

def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2))


async def _connect(config: Config) -> Storage:
    db = Storage.from_url(config.database_url, config)
    await db.connect()
    # Every command names its database: a token made against the wrong file is noticed.
    print(f"database: {db.location()}", file=sys.stderr)
    return db


async def _with_storage(config: Config, fn: Callable[[Storage], Awaitable[Any]]) -> Any:
    db = await _connect(config)
    try:
        await db.migrate()
        return await fn(db)
    finally:
        await db.close()


async def cli_migrate(config: Config, args: argparse.Namespace) -> Any:
    db = await _connect(config)
    try:
        applied = await db.migrate()
    finally:
        await db.close()
    return {"applied": applied, "latest": MIGRATIONS[-1][0]}


async def cli_purge(config: Config, args: argparse.Namespace) -> Any:
    if config.retention_days <= 0:
        raise ConfigError("RETENTION_DAYS is 0 (keep everything): set it to purge.")
    return await _with_storage(config, lambda db: purge_expired(db, config.retention_days))


async def cli_rollup(config: Config, args: argparse.Namespace) -> Any:
    return {"rollup_rows": await _with_storage(config, rebuild_rollup)}


async def cli_company_add(config: Config, args: argparse.Namespace) -> Any:
    if not COMPANY_ID_RE.match(args.id):
        raise ConfigError(f"ID must be {ID_RULE}.")
    evolution = validate_evolution({k: v for k, v in (("evolution_url", args.evolution_url),
                                                      ("evolution_key", args.evolution_key))
                                    if v is not None})
    settings = record_operator_urls({}, sent_urls(evolution, {}))  # the operator's URL
    return await _with_storage(config, lambda db: create_company(
        db, args.id, args.name or args.id, settings, evolution.get("evolution_url"),
        evolution.get("evolution_key")))


async def cli_company_list(config: Config, args: argparse.Namespace) -> Any:
    async def run(db: Storage) -> dict:
        rows = await db.fetchall(
            "SELECT c.id, c.name, c.created_at, (SELECT COUNT(*) FROM api_tokens t "
            "WHERE t.company_id = c.id) AS tokens FROM companies c ORDER BY c.id")
        return {"companies": [{"company_id": r["id"], "name": r["name"],
                               "created_at": iso(r["created_at"]), "tokens": r["tokens"]}
                              for r in rows]}

    return await _with_storage(config, run)


async def cli_token_add(config: Config, args: argparse.Namespace) -> Any:
    async def run(db: Storage) -> dict:
        return {"company_id": args.company_id,
                **await create_token(db, args.company_id, args.name)}

    return await _with_storage(config, run)


async def cli_token_list(config: Config, args: argparse.Namespace) -> Any:
    async def run(db: Storage) -> dict:
        if await get_company(db, args.company_id) is None:
            raise Refused(404, "Company not found")
        return {"company_id": args.company_id,
                "tokens": await company_tokens(db, args.company_id)}

    return await _with_storage(config, run)


async def cli_token_revoke(config: Config, args: argparse.Namespace) -> Any:
    token_id = parse_id(args.token_id)
    if token_id is None:
        raise ConfigError("TOKEN_ID must be a token's id (see `token list`).")

    async def run(db: Storage) -> dict:
        if await get_company(db, args.company_id) is None:
            raise Refused(404, "Company not found")
        if not await revoke_token(db, args.company_id, token_id):
            raise Refused(404, "Token not found")
        return {"ok": True, "company_id": args.company_id, "id": token_id}

    return await _with_storage(config, run)


CLI_COMMANDS = {("migrate", None): cli_migrate, ("purge", None): cli_purge,
                ("rollup", None): cli_rollup, ("company", "add"): cli_company_add,
                ("company", "list"): cli_company_list, ("token", "add"): cli_token_add,
                ("token", "list"): cli_token_list, ("token", "revoke"): cli_token_revoke}


async def cli_check(config: Config, args: argparse.Namespace) -> int:
    """Print the doctor's checklist (or its JSON); 1 when a check failed."""
    db = Storage.from_url(config.database_url, config)
    found: list[Check] = []
    if isinstance(db, SqliteStorage) and not Path(db.path).exists():
        # Opening it would create an empty database: say which file is missing instead.
        found.append(failed("database", f"the SQLite file {Path(db.path).resolve()} does not "
                                        "exist", "run the command where the server runs (its "
                                        ".env and database are there), or set DATABASE_URL; "
                                        f"`{CLI_COMMAND} migrate` creates a new database"))
        db = None
    else:
        try:
            await db.connect()
        except ConfigError as exc:
            found.append(failed("database", str(exc).rstrip("."), "check DATABASE_URL"))
            db = None
    try:
        async with new_http_session() as session, new_http_session(public_only=True) as public:
            doctor = Doctor(config, db, (session, public))
            companies = None
            if args.company and db is not None:
                company = await get_company(db, args.company)
                if company is None:
                    raise ConfigError(f"Company {args.company} not found.")
                companies = [company]
            found = found[:1] + await doctor.run(companies)
    finally:
        if db is not None:
            await db.close()
    if args.json:
        _print_json({"ok": all(c.ok for c in found), "checks": [c.json() for c in found]})
    else:
        print(format_checks(found))
    return 0 if all(c.ok for c in found) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whatstracking.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the server (the default)")
    sub.add_parser("migrate", help="create or upgrade the database schema")
    sub.add_parser("purge", help="delete raw data older than RETENTION_DAYS now")
    sub.add_parser("rollup", help="recount the report's visit counters (after editing visits "
                   "by hand)")
    company = sub.add_parser("company", help="manage companies").add_subparsers(dest="action",
                                                                                required=True)
    add = company.add_parser("add", help="create a company and its first API token")
    add.add_argument("id")
    add.add_argument("--name")
    add.add_argument("--evolution-url")
    add.add_argument("--evolution-key")
    token = sub.add_parser("token", help="manage API tokens").add_subparsers(dest="action",
                                                                            required=True)
    token_add = token.add_parser("add", help="create another API token for a company")
    token_add.add_argument("company_id")
    token_add.add_argument("--name")
    company.add_parser("list", help="list the companies")
    token_list = token.add_parser("list", help="list a company's API tokens (never their "
                                  "values)")
    token_list.add_argument("company_id")
    token_revoke = token.add_parser("revoke", help="revoke an API token (refused at once)")
    token_revoke.add_argument("company_id")
    token_revoke.add_argument("token_id")
    check = sub.add_parser("check", help="check the set-up (database, PUBLIC_URL, Evolution "
                           "servers and webhooks, destinations); exit 1 if something is wrong")
    check.add_argument("--company", help="check only this company")
    check.add_argument("--json", action="store_true", help="print the checks as JSON")
    return parser


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when uvloop is installed (optional, `pip install uvloop`: the same
    behaviour, less CPU per request), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def listen_error(config: Config, exc: OSError) -> str:
    """One sentence for an address the server cannot listen on, the usual causes named."""
    if isinstance(exc, socket.gaierror):
        return (f"HOST {config.host!r} is not an address or name this machine can listen on "
                f"({exc.strerror}).")
    if exc.errno == errno.EADDRINUSE:
        return (f"PORT {config.port} is already in use on {config.host} (is WhatsTracking "
                f"already running?): stop the other program or set another PORT.")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"HOST {config.host} is not an address of this machine: use 0.0.0.0 (every "
                f"address), 127.0.0.1 (behind a proxy on this machine) or one of its addresses.")
    if exc.errno == errno.EACCES:
        return (f"Permission denied listening on port {config.port}: ports below 1024 need root; "
                f"use e.g. 8080 behind a reverse proxy.")
    return f"Cannot listen on {config.host}:{config.port} ({exc.strerror or exc})."


def announce(app: web.Application, site: web.TCPSite, companies: int) -> None:
    """Said once the address is bound, not before: the first line claims nothing untrue. Nothing
    is awaited between the bind and this, so whoever sees /healthz answer can read the hint."""
    log.info("WhatsTracking %s listening on %s (database: %s)", VERSION, site.name,
             app[DB].location())
    if companies == 0:
        console = (app[CONFIG].public_url or site.name.replace("0.0.0.0", "localhost")) + "/dashboard"
        how = ("sign in with ADMIN_TOKEN" if app[CONFIG].admin_token
               else "set ADMIN_TOKEN in .env, restart, and sign in with it")
        print(f"No company yet. Create one in the console, {console} ({how}), or with:\n"
              f"  {command_hint()} company add my-company --name \"My Company\"",
              file=sys.stderr)


def command_hint() -> str:
    """How this program was started, for hints: `.venv/bin/python whatstracking.py` in a venv
    (a stock VPS has no `python`), shortened to a path relative to the working directory."""
    def short(path: str) -> str:
        relative = os.path.relpath(path)
        return path if relative.startswith("..") else relative
    python = short(sys.executable) if sys.prefix != sys.base_prefix else "python3"
    return f"{python} {short(sys.argv[0])}"


async def run_server(app: web.Application, config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then stop: no new connections; the requests under way
    finish, their bodies still arriving included (at most SHUTDOWN_TIMEOUT); then connections
    close, the delivery in flight finishes, queued writes commit and the database closes.
    (aiohttp's own shutdown stops reading bodies at once, so the drain comes first.)"""
    # The short timeout is for a request that slips in between the drain and the close.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await runner.setup()  # connects and migrates the database
    try:
        companies = (await app[DB].fetchone("SELECT COUNT(*) AS n FROM companies"))["n"]
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(listen_error(config, exc)) from None
        announce(app, site, companies)
        await stop.wait()
        flight = app[IN_FLIGHT]
        flight.stopping = True
        await site.stop()
        log.info("Stopping: no new connections; finishing %d request(s) under way (at most "
                 "%d s).", flight.count, SHUTDOWN_TIMEOUT)
        try:
            await asyncio.wait_for(flight.idle.wait(), SHUTDOWN_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("%d request(s) still under way after %d s: closing their connections "
                        "unanswered.", flight.count, SHUTDOWN_TIMEOUT)
    finally:
        await runner.cleanup()


def serve(config: Config) -> None:
    app = create_app(config)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    # No access log: it would sit on the hot path of every tracked page view.
    loop = new_event_loop()
    log.debug("event loop: %s", type(loop).__module__.split(".")[0])
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(run_server(app, config))
    finally:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


def main(argv: list[str] | None = None) -> int:
    try:
        from dotenv import find_dotenv, load_dotenv
    except ImportError:  # optional at run time: plain environment variables still work
        pass
    else:
        # The working directory's .env first (as before), then the one beside this file; a
        # variable keeps the first value it gets, the real environment's above all.
        load_dotenv(find_dotenv(usecwd=True), override=False)
        load_dotenv(HERE / ".env", override=False)
    args = build_parser().parse_args(argv)
    try:
        config = load_config()
        setup_logging(config)
        command = args.command or "serve"
        if command == "serve":
            serve(config)
            return 0
        if command == "check":
            return asyncio.run(cli_check(config, args))
        handler = CLI_COMMANDS[command, getattr(args, "action", None)]
        _print_json(asyncio.run(handler(config, args)))
        return 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Refused as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
