"""B2MML equipment properties carry an OPC UA endpoint's security and settings, never a
password: a ControllerPassword is refused by name, without its value in the reasons."""

from __future__ import annotations

import pytest

from mes.masterdata import MasterDataError, parse_plant
from tests.b2mml.test_sync import plant_of, sync, value


def equipment(*properties: tuple[str, str]) -> bytes:
    props = "".join(
        f"<EquipmentProperty><ID>{name}</ID>{value(text)}</EquipmentProperty>"
        for name, text in properties
    )
    return sync(
        "Equipment",
        f"<Equipment><ID>WU-SEC</ID><EquipmentLevel>WorkUnit</EquipmentLevel>{props}</Equipment>",
    )


ENDPOINT = (
    ("ControllerProtocol", "opcua"),
    ("ControllerURL", "opc.tcp://plc.example:4840/"),
    ("ControllerSecurity", "Basic256Sha256-SignAndEncrypt"),
)


def test_equipment_properties_name_the_security_settings() -> None:
    data = equipment(
        *ENDPOINT,
        ("ControllerCertificate", "pki/mes-cert.der"),
        ("ControllerPrivateKey", "pki/mes-key.pem"),
        ("ControllerServerCertificate", "pki/plc-cert.der"),
        ("ControllerUser", "mes"),
        ("ControllerPasswordEnv", "PLC_PASSWORD"),
    )
    plant = parse_plant(plant_of(data), partial=True)
    endpoint = plant.equipment[0].endpoint
    assert endpoint is not None
    assert endpoint.security == "Basic256Sha256-SignAndEncrypt"
    assert endpoint.settings == {
        "certificate": "pki/mes-cert.der",
        "private_key": "pki/mes-key.pem",
        "server_certificate": "pki/plc-cert.der",
        "user": "mes",
        "password_env": "PLC_PASSWORD",
    }


def test_a_password_property_is_refused_without_showing_it() -> None:
    data = equipment(*ENDPOINT, ("ControllerUser", "mes"), ("ControllerPassword", "s3cret-pw"))
    with pytest.raises(MasterDataError) as caught:
        parse_plant(plant_of(data), partial=True)
    problems = caught.value.problems
    assert any(
        p.startswith("equipment[0] (WU-SEC).endpoint.settings.password: master data does not")
        for p in problems
    ), problems
    assert "s3cret-pw" not in "; ".join(problems)
    assert "s3cret-pw" not in str(caught.value)
