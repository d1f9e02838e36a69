"""JUnit output holds to the common JUnit schema (Apache Ant's JUnit task, as published in
windyroad/JUnit-Schema's JUnit.xsd): checked here by a validator written from that schema's rules."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from decimal import Decimal, InvalidOperation

import pytest

from edgec.release import to_junit as release_junit
from edgec.verify.run import to_junit as verify_junit

_TIMESTAMP = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}$")
_SUITE_ATTRS = {"name", "timestamp", "hostname", "tests", "failures", "errors", "time"}


def _token(value: str | None, what: str, *, min_length: int = 0) -> None:
    assert value is not None, f"{what}: required"
    assert value == " ".join(value.split()), f"{what}: not an xs:token ({value!r})"
    assert len(value) >= min_length, f"{what}: empty"


def _int(value: str | None, what: str) -> int:
    assert value is not None and re.fullmatch(r"[+-]?[0-9]+", value), f"{what}: not an xs:int ({value!r})"
    n = int(value)
    assert -(2**31) <= n < 2**31, what
    return n


def _decimal(value: str | None, what: str) -> None:
    assert value is not None and re.fullmatch(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)", value), \
        f"{what}: not an xs:decimal ({value!r})"
    try:
        Decimal(value)
    except InvalidOperation:  # pragma: no cover - the pattern already holds
        raise AssertionError(what) from None


def _check_suite(el: ET.Element, *, aggregated: bool) -> None:
    allowed = _SUITE_ATTRS | {"skipped"} | ({"package", "id"} if aggregated else set())
    assert set(el.attrib) <= allowed, f"testsuite: undeclared attributes {set(el.attrib) - allowed}"
    for key in _SUITE_ATTRS | ({"package", "id"} if aggregated else set()):
        assert key in el.attrib, f"testsuite: missing required attribute {key}"
    _token(el.get("name"), "testsuite/@name", min_length=1)
    _token(el.get("hostname"), "testsuite/@hostname", min_length=1)
    assert _TIMESTAMP.match(el.get("timestamp", "")), f"testsuite/@timestamp {el.get('timestamp')!r}"
    tests, failures, errors = (_int(el.get(k), f"testsuite/@{k}") for k in ("tests", "failures", "errors"))
    if "skipped" in el.attrib:
        _int(el.get("skipped"), "testsuite/@skipped")
    _decimal(el.get("time"), "testsuite/@time")
    if aggregated:
        _token(el.get("package"), "testsuite/@package")
        _int(el.get("id"), "testsuite/@id")
    tags = [c.tag for c in el]
    # sequence: properties, testcase*, system-out, system-err (each of the three exactly once)
    assert tags and tags[0] == "properties", f"testsuite children {tags}"
    assert tags[-2:] == ["system-out", "system-err"], f"testsuite children {tags}"
    assert all(t == "testcase" for t in tags[1:-2]), f"testsuite children {tags}"
    for prop in el[0]:
        assert prop.tag == "property" and set(prop.attrib) == {"name", "value"}
        _token(prop.get("name"), "property/@name", min_length=1)
    for out in el[-2:]:
        assert len(out) == 0 and not out.attrib, f"{out.tag}: text only"
    cases = el[1:-2]
    seen_failures = seen_errors = 0
    for case in cases:
        assert set(case.attrib) == {"name", "classname", "time"}, case.attrib
        _token(case.get("name"), "testcase/@name")
        _token(case.get("classname"), "testcase/@classname")
        _decimal(case.get("time"), "testcase/@time")
        assert len(case) <= 1, "testcase: at most one of skipped, error, failure"
        for child in case:
            assert child.tag in ("skipped", "error", "failure"), child.tag
            if child.tag in ("error", "failure"):
                assert set(child.attrib) <= {"message", "type"} and "type" in child.attrib, \
                    f"{child.tag}: 'type' is required"
                assert len(child) == 0
                seen_failures += child.tag == "failure"
                seen_errors += child.tag == "error"
    assert (tests, failures, errors) == (len(cases), seen_failures, seen_errors), \
        f"counts {tests, failures, errors} vs cases {len(cases), seen_failures, seen_errors}"


def validate_junit(text: str) -> ET.Element:
    """Raise AssertionError where ``text`` breaks the JUnit schema; return the root."""
    root = ET.fromstring(text.encode())
    if root.tag == "testsuite":
        _check_suite(root, aggregated=False)
    else:
        assert root.tag == "testsuites", root.tag
        assert not root.attrib, f"testsuites takes no attributes in the schema: {root.attrib}"
        ids = []
        for suite in root:
            assert suite.tag == "testsuite"
            _check_suite(suite, aggregated=True)
            ids.append(int(suite.get("id")))
        assert ids == list(range(len(ids))), "ids start at 0 and count up"
    return root


def _gate(gate: str, metric: str, value: float, threshold: float, passed: bool) -> dict:
    return {"gate": gate, "metric": metric, "value": value, "threshold": threshold, "passed": passed}


REPORT = {
    "target": "cpu", "golden_device": "cpu", "passed": False,
    "results": [
        {"artifact": "model.int8.onnx", "seconds": 1.5e-05,
         "gates": [_gate("agreement>=0.97", "agreement", 0.95, 0.97, False),
                   _gate("cosine_mean>=0.95", "cosine_mean", 0.99, 0.95, True)]},
        {"artifact": 'weird "name" <&>.onnx', "seconds": 0.2,
         "gates": [_gate("agreement>=0.97", "agreement", 1.0, 0.97, True)]},
    ],
}


def test_verify_junit_is_valid_and_names_the_failing_gate():
    root = validate_junit(verify_junit(REPORT))
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("3", "1", "0")
    failure = root.find("testcase/failure")
    assert failure.get("type") == "gate" and failure.get("message") == "agreement = 0.95, threshold 0.97"
    assert root.findall("testcase")[2].get("name") == 'cpu/weird "name" <&>.onnx: agreement>=0.97'


def test_release_junit_is_valid_with_gate_failures_and_errors():
    release = {"targets": {
        "cpu": {"verify": {"seconds": 0.5, "status": "ok"}, "compile": {"status": "ok", "seconds": 3.0},
                "gates": [{**g, "artifact": "model.fp32.onnx"} for g in REPORT["results"][0]["gates"]]},
        "edgetpu": {"compile": {"status": "failed", "seconds": 2.0, "exit_code": 3,
                                "error": "edgetpu_compiler is not installed"}, "gates": []},
    }}
    root = validate_junit(release_junit(release))
    cpu, tpu = root.findall("testsuite")
    assert (cpu.get("failures"), cpu.get("errors"), tpu.get("failures"), tpu.get("errors")) == ("1", "0", "0", "1")
    error = tpu.find("testcase/error")
    assert error.get("type") == "missing toolchain" and "edgetpu_compiler" in error.get("message")


@pytest.mark.parametrize("bad", [
    # edgec's JUnit before this check: no timestamp/hostname/errors/time, no failure type
    '<testsuite name="edgec verify cpu" tests="1" failures="1"><testcase classname="c" name="n" time="1">'
    '<failure message="m"/></testcase></testsuite>',
    # time in scientific notation is not an xs:decimal
    '<testsuite name="s" timestamp="2026-01-01T00:00:00" hostname="h" tests="0" failures="0" errors="0" time="1e-05">'
    '<properties/><system-out/><system-err/></testsuite>',
    # a time zone in the timestamp
    '<testsuite name="s" timestamp="2026-01-01T00:00:00Z" hostname="h" tests="0" failures="0" errors="0" time="0">'
    '<properties/><system-out/><system-err/></testsuite>',
    # counts that do not match the cases
    '<testsuite name="s" timestamp="2026-01-01T00:00:00" hostname="h" tests="2" failures="0" errors="0" time="0">'
    '<properties/><testcase name="a" classname="c" time="0"/><system-out/><system-err/></testsuite>',
    # attributes on <testsuites>
    '<testsuites tests="0"/>',
])
def test_the_validator_rejects_what_the_schema_rejects(bad):
    with pytest.raises(AssertionError):
        validate_junit(bad)
