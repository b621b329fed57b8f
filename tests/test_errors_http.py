"""Errors on the gateway's HTTP surfaces, declared once: one middleware answers what any
route raises, in each surface's body format (OIP `{"error": ...}`, OpenAI's
`{"error": {"message", "type", "param", "code"}}`, the admin API's `{"error", "problems"}`),
for 400, 404, 405, 413 and 500; one JSON body reader refuses deep nesting with 400 on
every route; a client that drops a half-sent body costs one INFO line, no traceback.

The real gateway in-process (a real etcd), raw HTTP over sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator

import pytest

from modelgw.gateway.admin import AdminApi
from modelgw.gateway.app import Gateway, GatewayConfig
from modelgw.gateway.openai.api import OpenAIApi
from modelgw.gateway.rest_frontend import RestFrontend

MAX_BODY = 64 * 1024
DEEP = b"[" * 10_000 + b"]" * 10_000


def _boom(*args, **kwargs):
    raise RuntimeError("a bug of ours")


@pytest.fixture
async def gateway(etcd_server, etcd_prefix, monkeypatch) -> AsyncIterator[Gateway]:
    # one route per surface raises an unexpected exception: the 500s below
    async def boom(self, request):
        _boom()

    monkeypatch.setattr(RestFrontend, "server_metadata", boom)
    monkeypatch.setattr(AdminApi, "list_endpoints", boom)
    monkeypatch.setattr(OpenAIApi, "list_models", boom)
    gateway = Gateway(GatewayConfig(
        etcd=etcd_server.endpoint, prefix=etcd_prefix, host="127.0.0.1", http_port=0, grpc_port=0,
        max_message_bytes=MAX_BODY, insecure_no_auth=True,
    ))
    await gateway.start()
    await gateway.wait_synced(30)
    try:
        yield gateway
    finally:
        await gateway.stop(0)


def _request(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, dict, dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head_raw, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_raw.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        payload = _unchunk(payload)
    assert headers.get("content-type", "").startswith("application/json"), (lines[0], payload[:200])
    return int(lines[0].split()[1]), json.loads(payload), headers


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, data = out + rest[:n], rest[n + 2 :]
    return out


async def call(gateway: Gateway, method: str, path: str, body: bytes = b"") -> tuple[int, dict, dict]:
    return await asyncio.to_thread(_request, gateway.http_port, method, path, body)


def assert_oip(answer: dict, fragment: str) -> None:
    assert isinstance(answer["error"], str) and fragment in answer["error"], answer


def assert_openai(answer: dict, fragment: str, kind: str, code: str | None = None) -> None:
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert fragment in error["message"] and error["type"] == kind, error
    if code is not None:
        assert error["code"] == code, error


def assert_admin(answer: dict, fragment: str) -> None:
    assert isinstance(answer["error"], str) and fragment in answer["error"], answer


# -- each surface, each status ----------------------------------------------------------------


async def test_oip_errors(gateway: Gateway) -> None:
    status, answer, _ = await call(gateway, "POST", "/v2/models/m/infer", b"{not json")
    assert status == 400 and assert_oip(answer, "JSON") is None
    status, answer, _ = await call(gateway, "GET", "/v2/no/such/thing")
    assert status == 404 and assert_oip(answer, "no such endpoint: GET /v2/no/such/thing") is None
    status, answer, _ = await call(gateway, "DELETE", "/v2/models/m/infer")
    assert status == 405 and assert_oip(answer, "DELETE") is None
    status, answer, _ = await call(gateway, "POST", "/v2/models/m/infer", b"[" + b"0," * MAX_BODY + b"0]")
    assert status == 413 and assert_oip(answer, f"limit of {MAX_BODY} bytes") is None
    status, answer, _ = await call(gateway, "GET", "/v2")
    assert status == 500 and answer == {"error": "internal error; see the gateway log"}, answer


async def test_openai_errors(gateway: Gateway) -> None:
    status, answer, _ = await call(gateway, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and assert_openai(answer, "not valid JSON", "invalid_request_error") is None
    status, answer, _ = await call(gateway, "GET", "/v1/engines")
    assert status == 404 and assert_openai(answer, "GET /v1/engines", "invalid_request_error", "unknown_url") is None
    status, answer, _ = await call(gateway, "GET", "/v1/completions")
    assert status == 405 and assert_openai(answer, "GET", "invalid_request_error", "method_not_allowed") is None
    status, answer, _ = await call(gateway, "POST", "/v1/completions", b'"' + b"a" * MAX_BODY + b'"')
    assert status == 413 and assert_openai(answer, f"limit of {MAX_BODY} bytes", "invalid_request_error") is None
    status, answer, _ = await call(gateway, "GET", "/v1/models")
    assert status == 500 and assert_openai(answer, "internal error", "server_error", "internal_error") is None


async def test_admin_errors(gateway: Gateway) -> None:
    status, answer, _ = await call(gateway, "POST", "/admin/v1/models", b"{not json")
    assert status == 400 and assert_admin(answer, "not valid JSON") is None and answer["problems"], answer
    status, answer, _ = await call(gateway, "GET", "/admin/v1/models/never-applied")
    assert status == 404 and assert_admin(answer, "never-applied") is None
    status, answer, _ = await call(gateway, "GET", "/admin/v1/nothing-here")
    assert status == 404 and assert_admin(answer, "no such endpoint") is None
    status, answer, _ = await call(gateway, "PATCH", "/admin/v1/models")
    assert status == 405 and assert_admin(answer, "PATCH") is None
    status, answer, _ = await call(gateway, "POST", "/admin/v1/models", b'"' + b"a" * MAX_BODY + b'"')
    assert status == 413 and assert_admin(answer, f"limit of {MAX_BODY} bytes") is None
    status, answer, _ = await call(gateway, "GET", "/admin/v1/endpoints")
    assert status == 500 and assert_admin(answer, "internal error") is None


async def test_over_long_messages_are_cut_in_http_bodies_too(gateway: Gateway) -> None:
    name = "n" * 20_000
    body = json.dumps({"name": name, "versions": [{"version": "1", "uri": "file:///m", "format": "python", "runtime": name}]})
    status, answer, _ = await call(gateway, "PUT", "/admin/v1/models/other", body.encode())
    assert status == 400 and len(answer["error"]) < 10_000 and "cut" in answer["error"], len(answer["error"])


# -- one JSON body reader: nesting and size ---------------------------------------------------


@pytest.mark.parametrize("path", ["/admin/v1/models", "/admin/v1/runtimes/r", "/v1/chat/completions", "/v1/completions",
                                  "/v2/models/m/infer"])
async def test_deeply_nested_json_is_400_on_every_route(gateway: Gateway, path: str) -> None:
    method = "PUT" if path.startswith("/admin/v1/runtimes/") else "POST"
    status, answer, _ = await call(gateway, method, path, DEEP)
    assert status == 400, (status, answer)
    message = answer["error"]["message"] if path.startswith("/v1/") else answer["error"]
    assert "nested" in message, answer


async def test_nesting_past_the_readers_depth_limit_is_400_well_before_python_recursion(gateway: Gateway) -> None:
    document = b'{"name": "m", "versions": ' + b"[" * 200 + b"]" * 200 + b"}"
    status, answer, _ = await call(gateway, "POST", "/admin/v1/models", document)
    assert status == 400 and "nested more than" in answer["error"], answer


# -- a client that drops its half-sent body ---------------------------------------------------


def _drop_half_sent(port: int, path: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n".encode() + b'{"name": "m", ')


@pytest.mark.parametrize("path", ["/v2/models/m/infer", "/admin/v1/models", "/v1/chat/completions"])
async def test_a_client_dropping_a_half_sent_body_is_one_info_line(gateway: Gateway, path: str, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    await asyncio.to_thread(_drop_half_sent, gateway.http_port, path)
    for _ in range(50):  # the gateway notices the closed connection on its next read
        if any("went away" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.1)
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.INFO and path in gone[0].getMessage(), caplog.text
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, caplog.text
    status, _, _ = await call(gateway, "GET", "/admin/v1/models/still-serving")
    assert status == 404
