"""The checked-in OpenAPI document is the app's: a change to the API must update openapi/."""

from __future__ import annotations

import json

from mes.cli import OPENAPI_FILE, main, openapi_document


def test_openapi_document_matches_the_app() -> None:
    assert OPENAPI_FILE.exists(), "run `uv run mes openapi` to export the document"
    assert OPENAPI_FILE.read_text() == openapi_document(), "openapi/ drifted: run `mes openapi`"
    assert main(["openapi", "--check"]) == 0


def test_document_covers_the_order_path() -> None:
    doc = json.loads(openapi_document())
    paths = doc["paths"]
    for path in (
        "/api/v1/production-orders",
        "/api/v1/production-orders/{order_id}",
        "/api/v1/genealogy/lots/{lot}/backward",
        "/api/v1/genealogy/lots/{lot}/forward",
        "/api/v1/genealogy/lots/{lot}/impact",
        "/api/v1/products",
        "/api/v1/equipment",
        "/health",
    ):
        assert path in paths, path
    assert "post" in paths["/api/v1/production-orders"]
