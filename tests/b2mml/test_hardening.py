"""Hostile and broken XML is refused with a B2MMLError before anything reads it."""

from __future__ import annotations

import pytest

import mes.b2mml.parsing as parsing
from mes.b2mml import B2MMLError, decode, parse_xml
from tests.b2mml.conftest import example

PROCESS = example("process-operations-schedule.xml")
BOD_ID = "9f1c2e34-5b6a-4c7d-8e9f-0a1b2c3d4e5f"

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE ProcessOperationsSchedule [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<ProcessOperationsSchedule xmlns="http://www.mesa.org/xml/B2MML" releaseID="7.01">
  <ApplicationArea><CreationDateTime>2030-01-01T00:00:00Z</CreationDateTime>
    <BODID>&secret;</BODID></ApplicationArea>
</ProcessOperationsSchedule>"""

BILLION_LAUGHS = (
    b'<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + b"".join(
        f' <!ENTITY lol{i} "{f"&lol{i - 1};" * 10 if i > 1 else "&lol;" * 10}">\n'.encode()
        for i in range(1, 10)
    )
    + b"]>\n<lolz>&lol9;</lolz>"
)

EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE ConfirmBOD SYSTEM "http://example.invalid/evil.dtd">
<ConfirmBOD xmlns="http://www.mesa.org/xml/B2MML"/>"""


def refused(data: bytes, **kwargs: int) -> B2MMLError:
    with pytest.raises(B2MMLError) as caught:
        decode(data, **kwargs)
    assert caught.value.reasons
    assert str(caught.value) == "; ".join(caught.value.reasons)
    return caught.value


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(EXTERNAL_ENTITY, id="external-entity"),
        pytest.param(BILLION_LAUGHS, id="billion-laughs"),
        pytest.param(EXTERNAL_DTD, id="external-dtd"),
        pytest.param(
            EXTERNAL_ENTITY.decode().replace('"1.0"?', '"1.0" encoding="UTF-16"?').encode("utf-16"),
            id="utf-16",
        ),
    ],
)
def test_doctype_is_refused(data: bytes) -> None:
    error = refused(data)
    assert error.reasons == [
        "the message has a DOCTYPE; B2MML uses none, and DTDs and entities are refused"
    ]


def test_entities_are_not_expanded_even_past_the_byte_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without the byte check, the parser itself must neither expand nor load anything:
    # libxml2 stops the bomb, and the file's entity is never read.
    monkeypatch.setattr(parsing, "_has_doctype", lambda data: False)
    bomb = refused(BILLION_LAUGHS)
    assert "not well-formed XML" in bomb.reasons[0] or "DOCTYPE" in bomb.reasons[0]
    xxe = refused(EXTERNAL_ENTITY)
    assert xxe.reasons == ["the message has a DOCTYPE; DTDs and entities are refused"]
    assert "root:" not in str(xxe)


def test_oversize_is_refused_before_parsing() -> None:
    error = refused(PROCESS, max_bytes=len(PROCESS) - 1)
    assert error.reasons == [
        f"the message is {len(PROCESS)} bytes; the limit is {len(PROCESS) - 1}"
    ]
    decode(PROCESS, max_bytes=len(PROCESS))


def test_default_limit_is_two_megabytes() -> None:
    padding = b"<!--" + b"x" * 2_000_000 + b"-->"
    error = refused(PROCESS + padding)
    assert "the limit is 2000000" in error.reasons[0]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not well-formed XML"),
        (b"<ProcessOperationsSchedule", "not well-formed XML: line 1"),
        (PROCESS.replace(b"</DataArea>", b""), "not well-formed XML: line "),
        (b"\xff\xfe\x00garbage", "not well-formed XML"),
    ],
)
def test_invalid_xml_is_refused(data: bytes, reason: str) -> None:
    assert refused(data).reasons[0].startswith(reason)


def test_schema_invalid_names_the_line_and_keeps_the_bod_id() -> None:
    data = PROCESS.replace(b"<Priority>5</Priority>", b"<Priority>high</Priority>")
    error = refused(data)
    line = PROCESS[: PROCESS.index(b"<Priority>5")].count(b"\n") + 1
    assert error.reasons[0].startswith(f"line {line}: Element 'Priority': 'high' is not a valid")
    assert (error.bod_id, error.message_type) == (BOD_ID, "ProcessOperationsSchedule")


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ((b' releaseID="7.01"', b""), "The attribute 'releaseID' is required"),
        ((b"<ID>PO-2030-0002</ID>", b""), "Element 'Description': This element is not expected"),
        (
            (b"<MaterialUse>Produced</MaterialUse>", b"<MaterialUse>Baked</MaterialUse>"),
            "Element 'MaterialUse': [facet 'enumeration'] The value 'Baked'",
        ),
        ((b"2030-03-01T14:00:00+01:00", b"1 March 2030"), "Element 'EndTime': '1 March 2030'"),
    ],
)
def test_schema_invalid_b2mml_is_refused(edit: tuple[bytes, bytes], reason: str) -> None:
    error = refused(PROCESS.replace(*edit, 1))
    assert any(reason in r for r in error.reasons), error.reasons


def test_xml_outside_the_b2mml_namespace_is_refused() -> None:
    data = PROCESS.replace(b"http://www.mesa.org/xml/B2MML", b"urn:other")
    error = refused(data)
    assert error.reasons == [
        "the root element ProcessOperationsSchedule is not in the B2MML namespace "
        "http://www.mesa.org/xml/B2MML"
    ]


def test_valid_b2mml_of_another_kind_is_refused_with_its_bod_id() -> None:
    data = PROCESS.replace(b"ProcessOperationsSchedule", b"GetOperationsSchedule").replace(
        b'<Process acknowledgeCode="Always"/>', b"<Get/>"
    )
    error = refused(data)
    assert error.reasons[0].startswith("GetOperationsSchedule is valid B2MML but not a message")
    assert (error.bod_id, error.message_type) == (BOD_ID, "GetOperationsSchedule")


def test_parse_xml_returns_the_validated_root() -> None:
    root = parse_xml(PROCESS)
    assert root.tag == "{http://www.mesa.org/xml/B2MML}ProcessOperationsSchedule"
