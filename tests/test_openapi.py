"""openapi.json describes every route the app registers, and nothing else (SPEC §10).

When a route is added, removed or renamed in whatstracking.py, the sync test below fails with the
difference; update openapi.json to match.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import whatstracking

SPEC_PATH = Path(whatstracking.__file__).resolve().parent / "openapi.json"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

# Routes anyone may call without a token or a webhook secret (their operations say `security: []`).
PUBLIC_ROUTES = {
    ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/openapi.json"),
    ("GET", "/dashboard"), ("GET", "/console/{name}"), ("GET", "/locales"),
    ("GET", "/locales/{language}.json"), ("GET", "/scripts/whatsapp-tracker.js"),
    ("OPTIONS", "/tracking"), ("POST", "/tracking"),
    ("GET", "/connect/{connection_id}"), ("GET", "/public/get-connection"),
}


@pytest.fixture(scope="module")
def spec() -> dict:
    return json.loads(SPEC_PATH.read_text("utf-8"))


def openapi_template(aiohttp_path: str) -> str:
    """aiohttp's `{name}` / `{name:regex}` → OpenAPI's `{name}`."""
    return re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[^{}]*)?\}", r"{\1}", aiohttp_path)


def app_routes(tmp_path) -> set[tuple[str, str]]:
    config = whatstracking.load_config({"DATABASE_URL": f"sqlite:///{tmp_path}/x.db"})
    app = whatstracking.create_app(config)
    found = set()
    for route in app.router.routes():
        if route.method == "HEAD":  # aiohttp adds HEAD beside every GET
            continue
        resource = route.resource
        assert resource is not None, f"a route without a resource: {route!r}"
        found.add((route.method, openapi_template(resource.canonical)))
    return found


def spec_routes(spec: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in spec["paths"].items()
            for method in item if method in HTTP_METHODS}


def operations(spec: dict):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield method.upper(), path, item, operation


def resolve(spec: dict, ref: str):
    assert ref.startswith("#/"), f"only local references are used: {ref}"
    node = spec
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"unresolved $ref {ref}"
        node = node[part]
    return node


def deref(spec: dict, node):
    while isinstance(node, dict) and "$ref" in node:
        node = resolve(spec, node["$ref"])
    return node


def test_every_route_is_documented_and_nothing_else(spec, tmp_path):
    registered = app_routes(tmp_path)
    documented = spec_routes(spec)
    missing = sorted(registered - documented)
    stale = sorted(documented - registered)
    lines = []
    if missing:
        lines.append("Routes the app registers but openapi.json does not describe:")
        lines += [f"  + {method} {path}" for method, path in missing]
    if stale:
        lines.append("Routes in openapi.json the app does not register:")
        lines += [f"  - {method} {path}" for method, path in stale]
    assert not lines, "openapi.json is out of sync with the app:\n" + "\n".join(lines)


def test_info_names_the_product_and_its_version(spec):
    assert spec["openapi"].startswith("3.1.")
    assert spec["info"]["title"] == "WhatsTracking"
    assert spec["info"]["version"] == whatstracking.VERSION


def test_passes_the_openapi_validator(spec):
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(spec)


def test_every_reference_resolves(spec):
    refs = []

    def walk(node, where):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append((node["$ref"], where))
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(spec, "#")
    assert refs, "the document uses shared components"
    broken = []
    for ref, where in refs:
        try:
            resolve(spec, ref)
        except AssertionError:
            broken.append(f"{where}: {ref}")
    assert not broken, "unresolved references:\n" + "\n".join(broken)


def test_every_operation_is_complete(spec):
    problems = []
    ids = {}
    for method, path, _, operation in operations(spec):
        where = f"{method} {path}"
        if not operation.get("summary"):
            problems.append(f"{where}: no summary")
        op_id = operation.get("operationId")
        if not op_id:
            problems.append(f"{where}: no operationId")
        elif op_id in ids:
            problems.append(f"{where}: operationId {op_id} is also used by {ids[op_id]}")
        else:
            ids[op_id] = where
        responses = operation.get("responses") or {}
        if not responses:
            problems.append(f"{where}: no responses")
        for status, response in responses.items():
            if not re.fullmatch(r"[1-5](\d\d|XX)|default", status):
                problems.append(f"{where}: response key {status!r} is not a status code")
            if not deref(spec, response).get("description"):
                problems.append(f"{where}: response {status} has no description")
        if not any(s.startswith("2") for s in responses):
            problems.append(f"{where}: no success response")
        if "security" not in operation:
            problems.append(f"{where}: says nothing about auth (no `security`)")
    assert not problems, "\n".join(problems)


def test_path_parameters_match_the_templates(spec):
    problems = []
    for method, path, item, operation in operations(spec):
        in_template = set(re.findall(r"\{([^{}]+)\}", path))
        declared = {}
        for parameter in [*item.get("parameters", []), *operation.get("parameters", [])]:
            parameter = deref(spec, parameter)
            if parameter.get("in") == "path":
                declared[parameter["name"]] = parameter
        for name in sorted(in_template - set(declared)):
            problems.append(f"{method} {path}: path parameter {name!r} is not declared")
        for name in sorted(set(declared) - in_template):
            problems.append(f"{method} {path}: declares path parameter {name!r} it lacks")
        for name, parameter in declared.items():
            if parameter.get("required") is not True:
                problems.append(f"{method} {path}: path parameter {name!r} must be required")
    assert not problems, "\n".join(problems)


def test_auth_is_declared_and_public_routes_are_exactly_the_public_ones(spec):
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert {(s["in"], s["name"]) for s in schemes.values() if s["type"] == "apiKey"} >= {
        ("header", "X-Webhook-Secret"), ("header", "X-Webhook-Token")}
    unknown, public = [], set()
    for method, path, _, operation in operations(spec):
        requirements = operation["security"]
        if requirements == []:
            public.add((method, path))
        for requirement in requirements:
            unknown += [f"{method} {path}: {name}" for name in requirement if name not in schemes]
    assert not unknown, "undefined security schemes:\n" + "\n".join(unknown)
    assert public == PUBLIC_ROUTES, (
        f"public in openapi.json but not expected: {sorted(public - PUBLIC_ROUTES)}; "
        f"expected public but needing auth in openapi.json: {sorted(PUBLIC_ROUTES - public)}")


def test_enums_follow_the_code(spec):
    def query_enum(path, method, name):
        for parameter in spec["paths"][path][method].get("parameters", []):
            parameter = deref(spec, parameter)
            if parameter["in"] == "query" and parameter["name"] == name:
                return parameter["schema"]["enum"]
        raise AssertionError(f"{method.upper()} {path} has no query parameter {name}")

    schemas = spec["components"]["schemas"]
    assert query_enum("/api/report", "get", "group_by") == list(whatstracking.REPORT_GROUPS)
    assert query_enum("/api/leads", "get", "match_method") == list(whatstracking.MATCH_METHODS)
    assert schemas["Lead"]["properties"]["match_method"]["enum"] == list(
        whatstracking.MATCH_METHODS)
    assert schemas["LeadEventRequest"]["properties"]["name"]["enum"] == list(
        whatstracking.EVENT_NAMES[1:])
    assert schemas["Delivery"]["properties"]["destination"]["enum"] == list(
        whatstracking.DESTINATIONS)
    assert set(query_enum("/qrcode/generate-qrcode", "get", "format")) == {"png", "svg", "json"}
    assert set(query_enum("/api/deliveries", "get", "status")) == {
        "pending", "sending", "delivered", "failed", "skipped"}


def test_delivery_statuses_follow_the_code(spec):
    statuses = [deref(spec, p)["schema"]["enum"]
                for p in spec["paths"]["/api/deliveries"]["get"]["parameters"]
                if deref(spec, p)["name"] == "status"]
    assert statuses == [list(whatstracking.DELIVERY_STATUSES)]


async def test_served_at_get_openapi_json(aiohttp_client, tmp_path, spec):
    config = whatstracking.load_config({"DATABASE_URL": f"sqlite:///{tmp_path}/served.db"})
    client = await aiohttp_client(whatstracking.create_app(config))
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    served = await response.json()
    assert served == spec
    assert served["info"]["version"] == whatstracking.VERSION
