"""OPC UA security: Basic256Sha256 Sign and SignAndEncrypt with certificates both ways and a
user name / password login, against our PLC simulator and against the independent job-control
server (secured here with asyncua alone); every refusal says why, and no password is logged.

Certificates (RSA 2048, self-signed) are made once for the module.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.internal_server import InternalServer
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager

from adapters.machines import connect
from adapters.opcua.client import JobControlClient
from adapters.opcua.security import ServerSecurity, make_certificate
from adapters.opcua.simulator import PlcSimulator, SimUnit
from mes.machines import (
    Endpoint,
    JobOrderData,
    JobState,
    MachineSecurityError,
    MaterialRequirement,
)
from tests.adapters.independent_jobcontrol import IndependentJobControlServer

SIGN = "Basic256Sha256-Sign"
ENCRYPT = "Basic256Sha256-SignAndEncrypt"
USER = "mes-line-1"
PASSWORD = "correct horse battery staple 7f3a"
PASSWORD_ENV = "MES_TEST_OPCUA_PASSWORD"
SERVER_URI = "urn:tests:secured-plc"


@dataclass(frozen=True)
class Pki:
    folder: Path

    def path(self, name: str) -> Path:
        return self.folder / name

    def settings(self, client: str = "mes", **changes: Any) -> dict[str, Any]:
        """A secured endpoint's settings: this client's certificate, the server's, the user."""
        settings: dict[str, Any] = {
            "certificate": str(self.path(f"{client}-cert.der")),
            "private_key": str(self.path(f"{client}-key.pem")),
            "server_certificate": str(self.path("server-cert.der")),
            "user": USER,
            "password_env": PASSWORD_ENV,
        }
        settings.update(changes)
        return settings


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    make_certificate(folder / "server-cert.der", folder / "server-key.pem", SERVER_URI, server=True)
    for client in ("mes", "rogue"):
        make_certificate(
            folder / f"{client}-cert.der",
            folder / f"{client}-key.pem",
            f"urn:tests:{client}",
            server=False,
        )
    (folder / "trusted").mkdir()
    (folder / "trusted" / "mes-cert.der").write_bytes((folder / "mes-cert.der").read_bytes())
    return Pki(folder)


@pytest.fixture(autouse=True)
def password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)


@pytest.fixture(scope="module")
async def simulator(pki: Pki) -> AsyncIterator[PlcSimulator]:
    security = ServerSecurity(
        certificate=pki.path("server-cert.der"),
        private_key=pki.path("server-key.pem"),
        trusted=pki.path("trusted"),
        securities=(SIGN, ENCRYPT),
        users={USER: PASSWORD},
        application_uri=SERVER_URI,
    )
    async with PlcSimulator([SimUnit("Filler", cycle_time_s=0.2)], security=security) as sim:
        yield sim


def job(job_order_id: str) -> JobOrderData:
    return JobOrderData(
        job_order_id=job_order_id,
        work_master_id="WM-FILL",
        material_requirements=[MaterialRequirement("BOTTLE", "Produced", 3, "pcs")],
    )


# --- the independent server, secured with asyncua's own API ------------------------------


class _OneUser(UserManager):
    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        ok = username == USER and password == PASSWORD
        return User(role=UserRole.User) if ok else None


def asyncua_security(pki: Pki, policy: ua.SecurityPolicyType) -> Any:
    async def setup(server: Server) -> None:
        await server.set_application_uri(SERVER_URI)
        await server.load_certificate(str(pki.path("server-cert.der")))
        await server.load_private_key(str(pki.path("server-key.pem")))
        server.set_security_policy([policy])
        trust = TrustStore([pki.path("trusted")], [])
        await trust.load()
        options = (
            CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT
        )
        server.set_certificate_validator(CertificateValidator(options, trust))
        server.iserver.set_user_manager(_OneUser())
        server.set_identity_tokens([ua.UserNameIdentityToken])

    return setup


# --- a job over a secured session ------------------------------------------------------------


@pytest.mark.parametrize("security", [SIGN, ENCRYPT])
async def test_a_job_runs_over_a_secured_session_on_our_simulator(
    pki: Pki, simulator: PlcSimulator, security: str
) -> None:
    endpoint = Endpoint("opcua", simulator.url, "Filler", security, pki.settings())
    async with connect(endpoint) as plc:
        await plc.store_and_start(job(f"SEC-{security}"))
        assert isinstance(plc, JobControlClient)
        assert await plc.wait_until_final(f"SEC-{security}", poll_s=0.05) == JobState.ENDED
        response = await plc.job_response(f"SEC-{security}")
    assert [(m.material_definition_id, m.quantity) for m in response.material_actuals] == [
        ("BOTTLE", 3.0)
    ]


@pytest.mark.parametrize(
    ("security", "policy"),
    [
        (SIGN, ua.SecurityPolicyType.Basic256Sha256_Sign),
        (ENCRYPT, ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt),
    ],
)
async def test_a_job_runs_over_a_secured_session_on_an_independent_server(
    pki: Pki, security: str, policy: ua.SecurityPolicyType
) -> None:
    server = IndependentJobControlServer(run_s=0.1, secure=asyncua_security(pki, policy))
    async with server:
        endpoint = Endpoint("opcua", server.url, server.machine, security, pki.settings())
        async with connect(endpoint) as plc:
            await plc.store_and_start(job("IND-1"))
            assert isinstance(plc, JobControlClient)
            assert await plc.wait_until_final("IND-1", poll_s=0.05) == JobState.ENDED


# --- refusals ---------------------------------------------------------------------------------


async def refused(endpoint: Endpoint) -> MachineSecurityError:
    with pytest.raises(MachineSecurityError) as caught:
        async with connect(endpoint):
            pass
    assert caught.value.retryable is False  # a person must fix it; retrying will not
    return caught.value


async def test_a_wrong_password_is_refused(
    pki: Pki, simulator: PlcSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "not the password")
    error = await refused(Endpoint("opcua", simulator.url, "Filler", ENCRYPT, pki.settings()))
    assert "wrong user name or password" in str(error)
    assert "BadUserAccessDenied" in str(error)
    assert "not the password" not in str(error)


async def test_a_client_certificate_the_server_does_not_trust_is_refused(
    pki: Pki, simulator: PlcSimulator
) -> None:
    settings = pki.settings(client="rogue")
    error = await refused(Endpoint("opcua", simulator.url, "Filler", ENCRYPT, settings))
    assert "does not trust the MES's client certificate" in str(error)
    assert "BadCertificateUntrusted" in str(error)


async def test_an_untrusted_certificate_is_refused_by_the_independent_server(pki: Pki) -> None:
    policy = ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt
    async with IndependentJobControlServer(secure=asyncua_security(pki, policy)) as server:
        endpoint = Endpoint(
            "opcua", server.url, server.machine, ENCRYPT, pki.settings(client="rogue")
        )
        error = await refused(endpoint)
    assert "BadCertificateUntrusted" in str(error)


async def test_an_unsecured_endpoint_is_refused_by_a_server_requiring_security(
    pki: Pki, simulator: PlcSimulator
) -> None:
    plain = Endpoint("opcua", simulator.url, "Filler")
    error = await refused(plain)
    assert "offers no endpoint with security None" in str(error)
    # The login alone does not make up for it.
    login = {"user": USER, "password_env": PASSWORD_ENV}
    error = await refused(Endpoint("opcua", simulator.url, "Filler", "None", login))
    assert "offers no endpoint with security None" in str(error)


async def test_a_server_that_is_not_the_expected_one_is_refused(
    pki: Pki, simulator: PlcSimulator
) -> None:
    # The rogue's certificate pinned as the server's: the real server cannot prove to be it.
    settings = pki.settings(server_certificate=str(pki.path("rogue-cert.der")))
    client = JobControlClient(
        simulator.url, "Filler", timeout_s=1, security=SIGN, settings=settings
    )
    with pytest.raises(MachineSecurityError, match="not the server_certificate of the endpoint"):
        async with client:
            pass


async def test_missing_secrets_are_named_without_connecting(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "opc.tcp://127.0.0.1:1/"  # nothing listens: the settings fail first
    monkeypatch.delenv(PASSWORD_ENV)
    error = await refused(Endpoint("opcua", url, "Filler", ENCRYPT, pki.settings()))
    assert f"password_env {PASSWORD_ENV} is not set" in str(error)
    settings = pki.settings(private_key=str(pki.path("nowhere.pem")))
    error = await refused(Endpoint("opcua", url, "Filler", ENCRYPT, settings))
    assert "private_key" in str(error)
    assert "no such file" in str(error)
    garbage = pki.path("garbage.pem")
    garbage.write_text("not a key")
    error = await refused(
        Endpoint("opcua", url, "Filler", ENCRYPT, pki.settings(private_key=str(garbage)))
    )
    assert "not a readable certificate or key" in str(error)


async def test_a_password_from_a_file_logs_in(
    pki: Pki, simulator: PlcSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PASSWORD_ENV)
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    settings = pki.settings(password_env=None, password_file=str(secret))
    settings = {k: v for k, v in settings.items() if v is not None}
    async with connect(Endpoint("opcua", simulator.url, "Filler", ENCRYPT, settings)) as plc:
        assert (await plc.capacity()).max_job_orders is not None


async def test_no_password_is_logged(
    pki: Pki, simulator: PlcSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    endpoint = Endpoint("opcua", simulator.url, "Filler", ENCRYPT, pki.settings())
    async with connect(endpoint) as plc:
        await plc.store_and_start(job("LOG-1"))
        assert isinstance(plc, JobControlClient)
        await plc.wait_until_final("LOG-1", poll_s=0.05)
    wrong = "wrong-password-also-secret"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PASSWORD_ENV, wrong)
        await refused(endpoint)
    await asyncio.sleep(0.1)  # the server's side of the refusal logs too
    assert caplog.records, "DEBUG logging was captured"
    assert PASSWORD not in caplog.text
    assert wrong not in caplog.text
