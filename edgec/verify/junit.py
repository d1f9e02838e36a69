"""JUnit XML in the form CI systems read and the common JUnit schema (Apache Ant's JUnit task) accepts.

One test case per gate of each artifact (a ``<failure type="gate">`` with the value and the
threshold when it did not hold) and, for a release, a case per stage that stopped on an error
(``<error>`` naming the exception kind). Each ``<testsuite>`` carries what the schema requires:
``name``, ``timestamp`` (local time, no zone), ``hostname``, ``tests``, ``failures``, ``errors``,
``time``, and the ``properties``, ``system-out`` and ``system-err`` elements in that order. Several
suites go into ``<testsuites>``, each with its ``package`` and ``id``.
"""

from __future__ import annotations

import socket
import time as _time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field


@dataclass
class Case:
    name: str
    classname: str
    seconds: float = 0.0
    failure: str | None = None  # a gate did not hold
    failure_type: str = "gate"
    error: str | None = None  # a stage stopped on an error (bad input, missing toolchain)
    error_type: str = "error"
    detail: str = ""  # text inside <failure>/<error>


@dataclass
class Suite:
    name: str
    cases: list[Case] = field(default_factory=list)
    seconds: float | None = None  # default: the sum of the cases
    timestamp: float | None = None  # epoch seconds; default: now
    properties: dict[str, str] = field(default_factory=dict)
    system_out: str = ""


def gate_case(classname: str, target: str, artifact: str, gate: dict, seconds: float) -> Case:
    """One case for one gate of one artifact."""
    case = Case(name=f"{target}/{artifact}: {gate['gate']}", classname=classname, seconds=seconds)
    if not gate["passed"]:
        case.failure = f"{gate['metric']} = {gate['value']}, threshold {gate['threshold']}"
        case.detail = f"gate {gate['gate']} failed: {case.failure}"
    return case


def _decimal(seconds: float | None) -> str:
    """xs:decimal: plain digits, never 1e-05 or nan."""
    s = float(seconds or 0.0)
    return f"{max(s, 0.0):.3f}" if s == s and s not in (float("inf"), float("-inf")) else "0.000"


def _token(text: str) -> str:
    """xs:token with at least one character: no leading, trailing or repeated whitespace."""
    return " ".join(str(text).split()) or "-"


def _clean(text: str) -> str:
    """Characters XML 1.0 cannot hold (control characters) replaced."""
    return "".join(c if c in "\t\n\r" or (" " <= c <= "\ud7ff") or ("\ue000" <= c <= "\ufffd")
                   or ("\U00010000" <= c <= "\U0010ffff") else "?" for c in str(text))


def _suite_element(suite: Suite, tag: str = "testsuite", *, package: str | None = None, index: int | None = None,
                   hostname: str | None = None) -> ET.Element:
    failures = sum(c.failure is not None for c in suite.cases)
    errors = sum(c.error is not None and c.failure is None for c in suite.cases)
    seconds = suite.seconds if suite.seconds is not None else sum(c.seconds for c in suite.cases)
    stamp = _time.strftime("%Y-%m-%dT%H:%M:%S", _time.localtime(suite.timestamp if suite.timestamp else _time.time()))
    attrs = {"name": _token(suite.name), "timestamp": stamp, "hostname": _token(hostname or socket.gethostname()
                                                                                  or "localhost"),
             "tests": str(len(suite.cases)), "failures": str(failures), "errors": str(errors), "skipped": "0",
             "time": _decimal(seconds)}
    if package is not None:
        attrs.update(package=_token(package), id=str(index or 0))
    el = ET.Element(tag, attrs)
    props = ET.SubElement(el, "properties")
    for key, value in suite.properties.items():
        ET.SubElement(props, "property", {"name": _token(key), "value": _clean(value)})
    for c in suite.cases:
        case = ET.SubElement(el, "testcase", {"name": _token(c.name), "classname": _token(c.classname),
                                              "time": _decimal(c.seconds)})
        if c.failure is not None:
            f = ET.SubElement(case, "failure", {"message": _clean(c.failure), "type": _token(c.failure_type)})
            f.text = _clean(c.detail or c.failure)
        elif c.error is not None:
            e = ET.SubElement(case, "error", {"message": _clean(c.error), "type": _token(c.error_type)})
            e.text = _clean(c.detail or c.error)
    ET.SubElement(el, "system-out").text = _clean(suite.system_out)
    ET.SubElement(el, "system-err").text = ""
    return el


def _serialize(root: ET.Element) -> str:
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def testsuite_xml(suite: Suite) -> str:
    """A document whose root is one ``<testsuite>``."""
    return _serialize(_suite_element(suite))


def testsuites_xml(suites: list[Suite], package: str = "edgec") -> str:
    """A document whose root is ``<testsuites>``, one ``<testsuite>`` per entry (``package``, ``id`` 0, 1, ...)."""
    root = ET.Element("testsuites")
    host = socket.gethostname() or "localhost"
    for i, suite in enumerate(suites):
        root.append(_suite_element(suite, package=package, index=i, hostname=host))
    return _serialize(root)


__all__ = ["Case", "Suite", "gate_case", "testsuite_xml", "testsuites_xml"]
