"""docs/openapi.yaml is a valid OpenAPI 3.1 document and describes exactly what the API serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from palsd.api.server import ApiServer
from palsd.config import MqttConfig
from palsd.feed.mqtt import MqttFeed
from palsd.report.metrics import Metrics
from tests.unit.test_daemon import MemoryHost, make_daemon

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
METHODS = {"get", "put", "post", "delete", "patch"}
TOKEN = "test-token"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
    return loaded


def test_spec_is_a_valid_openapi_31_document(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1")
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(spec)


def test_every_served_route_is_in_the_spec_and_nothing_else(spec: dict[str, Any], tmp_path) -> None:
    app = ApiServer(make_daemon(tmp_path, MemoryHost(2)), tmp_path / "s.sock", None).app()
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(m, p) for p, item in spec["paths"].items() for m in item if m in METHODS}
    assert served == documented


def _check(spec: dict[str, Any], path: str, method: str, status: int, body: Any) -> None:
    responses = spec["paths"][path][method]["responses"]
    response = responses[str(status)]
    if "$ref" in response:
        response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = response["content"]["application/json"]["schema"]
    # OpenAPI 3.1 schemas are JSON Schema 2020-12; refs resolve inside the wrapping document.
    jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(body)


async def test_live_responses_match_their_documented_schemas(spec: dict[str, Any], tmp_path):
    daemon = make_daemon(tmp_path, MemoryHost(4))
    # A feed that has not connected yet: status then carries its `feed` object as in production.
    mqtt = MqttConfig(enabled=True, host_id="h1")
    feed = MqttFeed(mqtt, daemon, daemon.status, Metrics().registry)
    daemon.status_extra["feed"] = feed.state
    await daemon.tick()
    api = ApiServer(daemon, tmp_path / "s.sock", None, token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with TestClient(TestServer(api.app())) as client:
        calls: list[tuple[str, str, dict[str, Any], Any]] = [
            ("get", "/v1/status", {}, None),
            ("get", "/v1/health", {}, None),
            ("put", "/v1/budget/override", auth, {"budget_w": 1600, "ttl_s": 60, "reason": "t"}),
            ("put", "/v1/budget/override", auth, {"budget_w": -1}),
            ("put", "/v1/budget/override", {}, {"budget_w": 1600}),
            ("delete", "/v1/budget/override", auth, None),
        ]
        statuses = []
        for method, path, headers, body in calls:
            resp = await client.request(method.upper(), path, headers=headers, json=body)
            statuses.append(resp.status)
            if path == "/v1/status":
                assert "feed" in await resp.json()
            _check(spec, path, method, resp.status, await resp.json())
    assert statuses == [200, 200, 200, 400, 401, 200]
