"""Every operation of the OpenAPI document, called with no token, an unknown token, and a
token of every role: the answers must follow the access matrix of issue 4, and no route but
/health and the docs answers without a token."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from mes.cli import OPENAPI_FILE
from mes.launch import Stack

pytestmark = pytest.mark.postgres

ROLES = ("erp", "supervisor", "auditor", "admin")
EVERYONE = set(ROLES)

#: The matrix, written from the issue (not from the code): (method, path) → roles allowed.
MATRIX: dict[tuple[str, str], set[str]] = {
    ("POST", "/api/v1/production-orders"): {"erp"},
    ("GET", "/api/v1/production-orders"): {"erp", "supervisor", "auditor"},
    ("GET", "/api/v1/production-orders/{order_id}"): {"erp", "supervisor", "auditor"},
    ("PATCH", "/api/v1/production-orders/{order_id}"): {"supervisor"},
    ("POST", "/api/v1/production-orders/{order_id}/hold"): {"supervisor"},
    ("POST", "/api/v1/production-orders/{order_id}/resume"): {"supervisor"},
    ("POST", "/api/v1/production-orders/{order_id}/cancel"): {"supervisor"},
    ("GET", "/api/v1/work-orders"): {"supervisor", "auditor"},
    ("GET", "/api/v1/work-orders/{job_id}"): {"supervisor", "auditor"},
    ("PATCH", "/api/v1/work-orders/{job_id}"): {"supervisor"},
    ("POST", "/api/v1/work-orders/{job_id}/hold"): {"supervisor"},
    ("POST", "/api/v1/work-orders/{job_id}/resume"): {"supervisor"},
    ("POST", "/api/v1/work-orders/{job_id}/cancel"): {"supervisor"},
    ("GET", "/api/v1/work-centers/{work_center}/dispatch-list"): {"supervisor", "auditor"},
    ("GET", "/api/v1/genealogy/lots/{lot}/backward"): {"supervisor", "auditor"},
    ("GET", "/api/v1/genealogy/lots/{lot}/forward"): {"supervisor", "auditor"},
    ("GET", "/api/v1/genealogy/lots/{lot}/impact"): {"supervisor", "auditor"},
    ("GET", "/api/v1/products"): EVERYONE,
    ("GET", "/api/v1/equipment"): EVERYONE,
    ("GET", "/api/v1/audit-events"): {"supervisor", "auditor"},
    ("GET", "/api/v1/audit-events/verify"): {"supervisor", "auditor"},
    ("GET", "/api/v1/audit-events/checkpoints"): {"supervisor", "auditor"},
    ("GET", "/api/v1/tokens"): {"admin"},
    ("POST", "/api/v1/tokens"): {"admin"},
    ("DELETE", "/api/v1/tokens/{name}"): {"admin"},
    # Orders and materials from the ERP; master data that drives machines from the admin
    # (each message is then judged by what it carries: tests/test_least_privilege.py).
    ("POST", "/api/v1/b2mml"): {"erp", "admin"},
    ("POST", "/api/v1/master-data"): {"admin"},
    ("GET", "/api/v1/production-orders/{order_id}/performance"): {"erp", "supervisor", "auditor"},
    ("PUT", "/api/v1/erp-clients/{name}"): {"admin"},
    ("GET", "/api/v1/erp-clients/{name}"): {"admin"},
    ("POST", "/api/v1/erp-clients/{name}/signing-secret"): {"admin"},
    ("POST", "/api/v1/quality/results"): {"supervisor"},
    ("GET", "/api/v1/quality/nonconformances"): {"supervisor", "auditor"},
    ("GET", "/api/v1/quality/nonconformances/{nc_id}"): {"supervisor", "auditor"},
    ("POST", "/api/v1/quality/nonconformances/{nc_id}/disposition"): {"supervisor"},
    ("GET", "/api/v1/quality/yield"): {"supervisor", "auditor"},
    ("GET", "/api/v1/kpi/oee"): {"supervisor", "auditor"},
    ("GET", "/api/v1/kpi/delivery"): {"supervisor", "auditor"},
    ("GET", "/api/v1/kpi/throughput"): {"supervisor", "auditor"},
    # Operations metrics: a token of any role (public only with MES_METRICS_PUBLIC=1).
    ("GET", "/metrics"): EVERYONE,
}
PUBLIC = {("GET", "/health")}
#: Path parameters: values that name nothing, so allowed calls answer 4xx, not 401/403,
#: and change nothing.
PLACEHOLDERS = {
    "order_id": "987654321",
    "job_id": "NO-SUCH-JOB",
    "work_center": "NO-SUCH-CENTER",
    "lot": "NO-SUCH-LOT",
    "name": "no-such-token",
    "nc_id": "NO-SUCH-NC",
}


def operations() -> list[tuple[str, str]]:
    doc = json.loads(OPENAPI_FILE.read_text())
    return [
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    ]


def test_the_matrix_covers_every_operation() -> None:
    assert set(operations()) == set(MATRIX) | PUBLIC


def _url(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: PLACEHOLDERS[m.group(1)], path)


@pytest.mark.parametrize(("method", "path"), sorted(MATRIX))
async def test_every_route_by_every_role(stack: Stack, method: str, path: str) -> None:
    url = _url(path)
    # An empty JSON object: invalid for every body, so an allowed call writes nothing.
    body: dict[str, object] | None = {} if method in ("POST", "PATCH", "PUT") else None
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        anonymous = await http.request(method, url, json=body)
        assert anonymous.status_code == 401, (method, path, anonymous.text)
        assert anonymous.headers["content-type"].startswith("application/problem+json")
        assert anonymous.headers["www-authenticate"].startswith("Bearer")

        forged = await http.request(
            method, url, json=body, headers={"Authorization": "Bearer mes_not-a-real-token"}
        )
        assert forged.status_code == 401, (method, path)

        for role in ROLES:
            r = await http.request(
                method,
                url,
                json=body,
                headers={"Authorization": f"Bearer {stack.tokens[role]}"},
            )
            if role in MATRIX[(method, path)]:
                assert r.status_code not in (401, 403), (method, path, role, r.text)
                assert r.status_code < 500, (method, path, role, r.text)
            else:
                assert r.status_code == 403, (method, path, role, r.text)
                assert r.headers["content-type"].startswith("application/problem+json")


async def test_public_routes_need_no_token(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/schema/openapi.json")).status_code == 200


async def test_revoked_token_is_refused(stack: Stack) -> None:
    admin = {"Authorization": f"Bearer {stack.tokens['admin']}"}
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30, headers=admin) as http:
        made = await http.post("/api/v1/tokens", json={"name": "temp-auditor", "role": "auditor"})
        assert made.status_code == 201, made.text
        token = made.json()["token"]
        as_new = {"Authorization": f"Bearer {token}"}
        assert (await http.get("/api/v1/audit-events", headers=as_new)).status_code == 200
        listed = (await http.get("/api/v1/tokens")).json()
        assert "token" not in json.dumps(listed).replace('"name"', "")  # secrets never listed
        assert (await http.delete("/api/v1/tokens/temp-auditor")).status_code == 200
        assert (await http.get("/api/v1/audit-events", headers=as_new)).status_code == 401
        bad_role = await http.post("/api/v1/tokens", json={"name": "x", "role": "boss"})
        assert bad_role.status_code == 400
