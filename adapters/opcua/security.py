"""OPC UA security: certificates both ways and a user name / password login.

An endpoint in master data names its ``security`` (``mes.masterdata.schema.OPCUA_SECURITY``:
None, or Basic256Sha256 in Sign or SignAndEncrypt mode) and, in its ``settings``
(``OpcUaSettings``), the files and names the session needs: the MES's certificate and
private key, the server certificate it expects, and the user with where its password is (an
environment variable or a file). Secrets are read here, on the worker, when a session
opens; they are never logged, and the errors name the file or variable, never its content.

The server side (``ServerSecurity``) is the PLC simulator's: it offers only the secured
endpoints, accepts only client certificates in its trust list and only its users' logins.
``make_certificate`` issues a self-signed application certificate (OPC 10000-6 6.2.2), as
``mes dev --secure`` does for the simulator and the MES.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto import cert_gen, uacrypto
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.internal_server import InternalServer
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import ValidationError

from mes.machines import MachineSecurityError
from mes.masterdata.schema import OpcUaSettings

#: Endpoint security (master data) → message security mode, all with Basic256Sha256.
MODES: Mapping[str, ua.MessageSecurityMode] = {
    "Basic256Sha256-Sign": ua.MessageSecurityMode.Sign,
    "Basic256Sha256-SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}
_SERVER_POLICIES: Mapping[str, ua.SecurityPolicyType] = {
    "Basic256Sha256-Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "Basic256Sha256-SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}

# What a server's refusal means for whoever keeps the endpoint's master data.
_REFUSALS: Mapping[int, str] = {
    StatusCodes.BadUserAccessDenied: "the server refused the login: wrong user name or password",
    StatusCodes.BadIdentityTokenRejected: "the server does not accept this kind of login "
    "(it may require a user name and password)",
    StatusCodes.BadIdentityTokenInvalid: "the server could not read the login",
    StatusCodes.BadCertificateUntrusted: "the server does not trust the MES's client "
    "certificate (add it to the server's trusted certificates)",
    StatusCodes.BadCertificateRevoked: "the server revoked the MES's client certificate",
    StatusCodes.BadCertificateTimeInvalid: "the MES's client certificate has expired "
    "or is not valid yet",
    StatusCodes.BadCertificateUriInvalid: "the application URI of the MES's client "
    "certificate is not the one the server expects",
    StatusCodes.BadCertificateUseNotAllowed: "the MES's client certificate is not made "
    "for an OPC UA client (key usage)",
    StatusCodes.BadCertificateInvalid: "the server refused the MES's client certificate",
    StatusCodes.BadSecurityChecksFailed: "the secure channel failed its security checks "
    "(a certificate or key that does not match)",
    StatusCodes.BadSecurityPolicyRejected: "the server does not offer this security policy",
    StatusCodes.BadSecurityModeRejected: "the server does not offer this security mode",
}


class _WithholdLogin(logging.Filter):
    """asyncua's client logs every request it sends at DEBUG, and ActivateSession carries
    the login's password (in the clear inside an encrypting channel): that request is
    logged by name only."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if any(isinstance(arg, ua.ActivateSessionRequest) for arg in args):
            record.msg, record.args = "Sending: ActivateSessionRequest (identity withheld)", ()
        return True


logging.getLogger("asyncua.client.ua_client.UASocketProtocol").addFilter(_WithholdLogin())


def refusal(exc: UaError, security: str) -> str | None:
    """Why the server refused the session, if ``exc`` is a security refusal; else None."""
    if isinstance(exc, UaStatusCodeError):
        return _REFUSALS.get(exc.code)
    # asyncua's own checks of the server's answer raise plain UaErrors.
    message = str(exc)
    if message.startswith("No matching endpoints"):
        return f"the server offers no endpoint with security {security}: name one it offers"
    if message.startswith("Server certificate mismatch"):
        return "the server's certificate is not the server_certificate of the endpoint"
    return None


async def secure_client(client: Client, security: str, settings: Mapping[str, Any]) -> None:
    """Set up ``client`` (before it connects) for the endpoint's security and login.

    MachineSecurityError when the settings are not usable here: an unknown security, a
    missing file, an unset password variable.
    """
    try:
        config = OpcUaSettings.model_validate(settings)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise MachineSecurityError(f"endpoint settings: {reasons}") from None
    if security != "None":
        try:
            mode = MODES[security]
        except KeyError:
            raise MachineSecurityError(
                f"security {security!r} is not one of None, {', '.join(MODES)}"
            ) from None
        certificate = _file(config.certificate, "certificate")
        private_key = _file(config.private_key, "private_key")
        server_certificate = _file(config.server_certificate, "server_certificate")
        try:
            # The server checks the certificate's application URI against the client's.
            own = await uacrypto.load_certificate(certificate)
            client.application_uri = application_uri(own)
            await client.set_security(
                SecurityPolicyBasic256Sha256,
                certificate,
                private_key,
                server_certificate=server_certificate,
                mode=mode,
            )
        except (ValueError, TypeError) as exc:
            raise MachineSecurityError(
                "endpoint settings: certificate, private_key or server_certificate is not a "
                f"readable certificate or key (DER or PEM): {type(exc).__name__}"
            ) from exc
    if config.user is not None:
        client.set_user(config.user)
        client.set_password(_password(config))


async def pinned_certificate_differs(
    url: str, settings: Mapping[str, Any], timeout_s: float
) -> bool:
    """Whether the server at ``url`` presents a certificate other than the endpoint's
    ``server_certificate`` (asked over the discovery channel, which needs no security).

    Such a server cannot read what the MES encrypted for the expected one and never
    answers, so a secured connect that timed out asks this to tell why.
    """
    pinned_path = settings.get("server_certificate")
    if not isinstance(pinned_path, str):
        return False
    pinned = (await uacrypto.load_certificate(pinned_path)).public_bytes(Encoding.DER)
    probe = Client(url, timeout=timeout_s)
    try:
        async with asyncio.timeout(timeout_s):
            endpoints = await probe.connect_and_get_server_endpoints()
    except (OSError, TimeoutError, UaError):
        return False
    finally:
        probe.disconnect_socket()
    # A server may send its chain after its own certificate.
    presented = [bytes(ep.ServerCertificate) for ep in endpoints if ep.ServerCertificate]
    return bool(presented) and not any(der.startswith(pinned) for der in presented)


def _file(path: str | None, setting: str) -> str:
    if path is None:
        raise MachineSecurityError(f"endpoint settings: {setting} is missing")
    if not Path(path).is_file():
        raise MachineSecurityError(f"endpoint settings: {setting} {path}: no such file")
    return path


def _password(config: OpcUaSettings) -> str:
    if config.password_env is not None:
        value = os.environ.get(config.password_env)
        if value is None:
            raise MachineSecurityError(
                f"endpoint settings: password_env {config.password_env} is not set"
            )
        return value
    path = _file(config.password_file, "password_file")
    return Path(path).read_text(encoding="utf-8").rstrip("\r\n")


def application_uri(certificate: x509.Certificate) -> str:
    """The application URI an OPC UA certificate carries (its SubjectAltName URI)."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if not uris:
        raise MachineSecurityError("the certificate carries no application URI (SubjectAltName)")
    return uris[0]


# --- certificates -------------------------------------------------------------------------


def make_certificate(
    certificate: Path, private_key: Path, application_uri: str, *, server: bool
) -> None:
    """A new RSA 2048 key and a self-signed application certificate for it, valid a year.

    The certificate (DER) names ``application_uri``, this host and localhost; the key (PEM,
    unencrypted) is written readable by its owner only.
    """
    key = cert_gen.generate_private_key()
    hosts = dict.fromkeys([socket.gethostname(), "localhost"])
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    names += [x509.DNSName(host) for host in hosts]
    use = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = cert_gen.generate_self_signed_app_certificate(
        key, application_uri, {}, names, [use], days=365
    )
    private_key.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(cert_gen.dump_private_key_as_pem(key))
    certificate.write_bytes(cert.public_bytes(Encoding.DER))


# --- the server's side (the PLC simulator) -------------------------------------------------


@dataclass(frozen=True)
class ServerSecurity:
    """How a server is secured: its certificate and key, the folder of client certificates
    it trusts (DER or PEM files), the securities it offers and the users it lets in (user
    name → password; none: anonymous logins are accepted)."""

    certificate: Path
    private_key: Path
    trusted: Path
    securities: Sequence[str] = ("Basic256Sha256-SignAndEncrypt",)
    users: Mapping[str, str] = field(default_factory=dict)
    application_uri: str = "urn:mes:plc-simulator"


class _Users(UserManager):
    """asyncua's user manager for a fixed set of user names and passwords."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = dict(users)

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        expected = self._users.get(username or "")
        if expected is None or password is None:
            return None
        return User(role=UserRole.User) if hmac.compare_digest(expected, password) else None


async def secure_server(server: Server, security: ServerSecurity) -> None:
    """Set up an initialised, not yet started ``server``: only the secured endpoints, only
    trusted client certificates, only its users when it has any."""
    unknown = [s for s in security.securities if s not in _SERVER_POLICIES]
    if unknown or not security.securities:
        raise ValueError(f"securities must be some of {', '.join(_SERVER_POLICIES)}: {unknown}")
    await server.set_application_uri(security.application_uri)
    await server.load_certificate(str(security.certificate))
    await server.load_private_key(str(security.private_key))
    server.set_security_policy([_SERVER_POLICIES[s] for s in security.securities])
    trust = TrustStore([security.trusted], [])
    await trust.load()
    server.set_certificate_validator(
        CertificateValidator(
            CertificateValidatorOptions.TRUSTED_VALIDATION
            | CertificateValidatorOptions.PEER_CLIENT,
            trust,
        )
    )
    if security.users:
        server.iserver.set_user_manager(_Users(security.users))
        server.set_identity_tokens([ua.UserNameIdentityToken])
