"""The protocol's ground floor stays one floor: the gateway and the runtimes are peers that
share modelgw/oip and never import each other, and each protocol constant is written once,
in modelgw/oip/protocol.py (checked on the source, so a second copy fails here)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from modelgw.oip import protocol

REPO = Path(__file__).resolve().parent.parent


def imported_modules(directory: Path) -> dict[str, set[str]]:
    """file (relative to the repository) -> the absolute modules it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted(directory.rglob("*.py")):
        modules: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.add(node.module)
        found[str(path.relative_to(REPO))] = modules
    return found


@pytest.mark.parametrize("directory, forbidden", [("gateway", "modelgw.runtimes"), ("runtimes", "modelgw.gateway"),
                                                  ("modelgw/oip", "modelgw.runtimes"), ("modelgw/oip", "modelgw.gateway")])
def test_peers_do_not_import_each_other(directory: str, forbidden: str) -> None:
    offenders = {
        path: sorted(m for m in modules if m == forbidden or m.startswith(forbidden + "."))
        for path, modules in imported_modules(REPO / directory).items()
    }
    assert not {path: mods for path, mods in offenders.items() if mods}


# Each constant's value as source might spell it; only protocol.py may.
SPELLINGS = [
    r"64\s*\*\s*1024\s*\*\s*1024", r"\b67108864\b",
    r"[\"']triton_final_response[\"']", r"[\"']triton_enable_empty_final_response[\"']",
    r"[\"']binary_tensor_data[\"']",
    r"[\"']x-modelgw-(subject|session|timeout)[\"']", r"[\"']x-request-id[\"']", r"[\"']traceparent[\"']",
]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_each_protocol_constant_is_written_once(spelling: str) -> None:
    pattern = re.compile(spelling)
    places = [
        str(path.relative_to(REPO))
        for top in ("gateway", "runtimes", "registry", "reconciler", "modelgw")
        for path in sorted((REPO / top).rglob("*.py"))
        if pattern.search(path.read_text())
    ]
    assert [place for place in places if place != "modelgw/oip/protocol.py"] == []


def test_protocol_values() -> None:
    assert protocol.MAX_MESSAGE_BYTES == 64 * 1024 * 1024
    assert protocol.FINAL_RESPONSE == "triton_final_response"
    assert set(protocol.PROPAGATED_HEADERS) == {"x-request-id", "traceparent", "tracestate"}
    assert all(name == name.lower() for name in (protocol.SUBJECT_HEADER, protocol.SESSION_HEADER, protocol.TIMEOUT_HEADER))
