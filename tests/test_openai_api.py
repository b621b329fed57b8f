"""The OpenAI API end to end: the unmodified openai SDK (and plain HTTP) against a real
`modelgw gateway` process, routing to a real `modelgw runtime serve --kind llm` process
with a tiny random Llama checkpoint written by `modelgw llm make-checkpoint`, both
registered in a real etcd. Also: tritonclient streaming through the gateway's gRPC port,
a client that disconnects mid-generation freeing its KV cache (seen in the runtime's
endpoint record), and bad input answered in OpenAI's error format."""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import pytest
import tritonclient.grpc as triton
from conftest import modelgw_command
from gateway_helpers import (
    Fleet,
    GatewayProcess,
    endpoints,
    http_request,
    metric_value,
    model_spec,
    runtime_spec,
    wait_model_ready,
    wait_until,
)

from modelgw.protos import registry_pb2 as rpb

RUNTIME = "llm"
MODEL = "tiny"
FORMAT = "hf-llama"
# a long context, so that a generation the client abandons could not finish by itself in
# the time the disconnect tests wait for its cache to be freed (it would take minutes: the
# tiny model makes under a thousand tokens a second on one thread, fewer as its context grows)
CONTEXT = 131072
LONG = 125000
FREED_WITHIN = 30.0
MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hello world, how are you?"}]
PROMPT = "The quick brown fox jumps over the lazy dog"


@dataclass
class Stack:
    fleet: Fleet
    gateway: GatewayProcess
    checkpoint: Path

    @property
    def base(self) -> str:
        return f"{self.gateway.base}/v1"

    def client(self, **options) -> openai.OpenAI:
        # no retries: a test must see the first answer, not a retried one
        return openai.OpenAI(base_url=self.base, api_key="unused", max_retries=0, timeout=120, **options)

    def load(self) -> rpb.LoadFigures:
        (endpoint,) = [e for e in endpoints(self.fleet.etcd, self.fleet.prefix) if e.runtime == RUNTIME]
        return endpoint.load

    def wait_load(self, condition, what: str, timeout: float = 60.0) -> rpb.LoadFigures:
        """Poll the runtime's endpoint record (its load figures are published throttled)."""
        seen: list[rpb.LoadFigures] = []

        def satisfied() -> rpb.LoadFigures | None:
            seen.append(self.load())
            return seen[-1] if condition(seen[-1]) else None

        try:
            return wait_until(satisfied, timeout, what, interval=0.2)
        except TimeoutError as err:
            raise AssertionError(f"{err}; last load figures: {seen[-1] if seen else None}") from None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, etcd_server) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("openai")
    checkpoint = root / "tiny"
    made = subprocess.run(
        modelgw_command("llm", "make-checkpoint", str(checkpoint), "--layers", "2", "--hidden", "64",
                        "--max-position", str(CONTEXT), "--seed", "5"),
        capture_output=True, text=True, timeout=120,
    )
    assert made.returncode == 0, made.stderr
    fleet = Fleet(etcd_server.endpoint, f"/modelgw-test/{uuid.uuid4().hex[:12]}/", root)
    try:
        fleet.apply(
            runtime_spec(RUNTIME, "llm", [FORMAT]),
            model_spec(MODEL, RUNTIME, FORMAT, {"1": str(checkpoint)}),
            # a model of another kind (no replica needed): not listed, refused by /v1
            runtime_spec("vision", "onnx", ["onnx"]),
            model_spec("classifier", "vision", "onnx", {"1": str(root / "classifier.onnx")}),
        )
        fleet.replica(RUNTIME, "llm", "--option", "threads=1", "--option", "max_num_seqs=8",
                      "--option", "kv_cache_mb=80")  # 160k tokens: one full-length sequence
        gateway = fleet.gateway()
        wait_model_ready(gateway.grpc_url, MODEL, timeout=180, what=f"(logs in {root})")
        yield Stack(fleet, gateway, checkpoint)
    finally:
        fleet.close()


@pytest.fixture(scope="module")
def hf_tokenizer(stack: Stack):
    """transformers' own reading of the checkpoint's tokenizer: independent token counts."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stack.checkpoint)


def post(stack: Stack, path: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer, _ = http_request("POST", stack.base + path, raw, {"Content-Type": "application/json", **(headers or {})},
                                     timeout=120)
    return status, json.loads(answer)


# -- models -----------------------------------------------------------------------------------


def test_models_lists_the_llm_models(stack: Stack) -> None:
    client = stack.client()
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]  # not the onnx model
    (card,) = models
    assert card.object == "model" and card.owned_by == "modelgw" and card.created > 0
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("classifier")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# -- completions with the openai SDK ------------------------------------------------------------


def test_chat_completion_streamed_equals_whole(stack: Stack, hf_tokenizer) -> None:
    client = stack.client()
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-") and whole.model == MODEL
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    # the runtime rendered the checkpoint's chat template: transformers renders the same
    templated = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    templated = templated["input_ids"] if isinstance(templated, dict) or hasattr(templated, "keys") else templated
    assert whole.usage.prompt_tokens == len(templated) > 0
    assert 0 < whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert choice.finish_reason == ("length" if whole.usage.completion_tokens == 12 else "stop")

    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == choice.message.content  # greedy: the same text, streamed or not
    assert [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason] == [choice.finish_reason]
    assert with_choices[-1].choices[0].finish_reason is not None
    # include_usage: a last chunk without choices carries the same figures
    assert not chunks[-1].choices and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_streamed_equals_whole_and_stops_at_max_tokens(stack: Stack, hf_tokenizer) -> None:
    client = stack.client()
    # ignore_eos (an extension, as vLLM names it): the random model must run to max_tokens
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True})
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    (choice,) = whole.choices
    assert choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 10
    assert whole.usage.prompt_tokens == len(hf_tokenizer(PROMPT)["input_ids"])
    # one log-probability per generated token, each a probability's log
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == whole.usage.completion_tokens
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    # the tokens decode to the text
    ids = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == choice.text

    chunks = list(client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=10, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_sampling_with_a_seed_is_reproducible_and_stop_strings_end_the_text(stack: Stack) -> None:
    client = stack.client()
    runs = [client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9, seed=42,
                                      extra_body={"top_k": 50, "ignore_eos": True}).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0]
    # a stop string from what greedy decoding says (a random model's text has invalid
    # UTF-8 in it too: take a plain character)
    stop = next(c for c in full.text[1:] if c.isascii() and c.isalnum())
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop", (full.text, stop, cut)
    assert cut.text == full.text[: full.text.index(stop)]


# -- tritonclient through the gateway ------------------------------------------------------------


def test_tritonclient_streams_through_the_gateway(stack: Stack) -> None:
    expected = stack.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                                 extra_body={"ignore_eos": True}).choices[0].text
    responses: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(stack.gateway.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        prompt = triton.InferInput("text_input", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
        client.async_stream_infer(MODEL, [prompt], request_id="t1", enable_empty_final_response=True,
                                  parameters={"max_tokens": 12, "temperature": 0, "ignore_eos": True})
        deltas, final = [], None
        while final is None:
            result, error = responses.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            if response.parameters["triton_final_response"].bool_param:
                final = response
            else:
                deltas.append(result.as_numpy("text_output")[0].decode())
    finally:
        client.stop_stream()
        client.close()
    assert len(deltas) > 1  # streamed token by token, not in one piece
    assert "".join(deltas) == expected
    assert final.parameters["completion_tokens"].int64_param == 12
    assert final.parameters["finish_reason"].string_param == "length"


# -- a client that goes away ---------------------------------------------------------------------


def test_a_client_disconnecting_mid_stream_frees_its_cache(stack: Stack) -> None:
    stack.wait_load(lambda load: load.running == 0 and load.kv_cache_usage == 0, "the runtime is idle")
    before = metric_value(stack.gateway.metrics(), "modelgw_requests_total", protocol="openai", status="CANCELLED")
    stream = stack.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=LONG, temperature=0,
                                                    stream=True, extra_body={"ignore_eos": True})
    try:
        received = [chunk for chunk, _ in zip(stream, range(5), strict=False)]
        assert len(received) == 5
        busy = stack.wait_load(lambda load: load.running == 1, "the generation shows in the load figures")
        assert busy.kv_cache_usage > 0
    finally:
        stream.close()  # the client goes away mid-generation
    stack.wait_load(lambda load: load.running == 0 and load.kv_cache_usage == 0, "the abandoned generation's cache freed",
                    FREED_WITHIN)
    wait_until(
        lambda: metric_value(stack.gateway.metrics(), "modelgw_requests_total", protocol="openai", status="CANCELLED")
        == before + 1, 10, "the stream counted as cancelled",
    )
    # and the runtime serves the next request as before; a client leaving is no error
    assert stack.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0).choices[0].text
    assert "Traceback" not in stack.gateway.output() and " ERROR " not in stack.gateway.output()


def test_a_client_disconnecting_before_the_answer_frees_its_cache(stack: Stack) -> None:
    """A non-streaming request: nothing is written to the client until the end, so the
    gateway notices the closed connection by watching it."""
    stack.wait_load(lambda load: load.running == 0 and load.kv_cache_usage == 0, "the runtime is idle")
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", stack.gateway.http_port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        stack.wait_load(lambda load: load.running == 1 and load.kv_cache_usage > 0, "the generation shows in the load figures")
    stack.wait_load(lambda load: load.running == 0 and load.kv_cache_usage == 0, "the abandoned generation's cache freed",
                    FREED_WITHIN)
    assert "Traceback" not in stack.gateway.output() and " ERROR " not in stack.gateway.output()


# -- errors in OpenAI's format -------------------------------------------------------------------


def assert_openai_error(status: int, body: dict, expected_status: int, param: str | None = None,
                        code: str | None = None, kind: str = "invalid_request_error") -> None:
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], body
    assert error["type"] == kind, body
    if param is not None:
        assert error["param"] == param, body
    if code is not None:
        assert error["code"] == code, body


CHAT = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4}
BAD_REQUESTS = {
    # name: (path, body, status, param, code)
    "empty prompt": ("/completions", {**COMPLETION, "prompt": ""}, 400, "prompt", None),
    "max_tokens beyond the context": ("/completions", {**COMPLETION, "max_tokens": CONTEXT + 10}, 400, None,
                                      "context_length_exceeded"),
    "chat beyond the context": ("/chat/completions", {**CHAT, "max_tokens": CONTEXT}, 400, None, "context_length_exceeded"),
    "max_tokens 0": ("/completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens", None),
    "temperature -1": ("/chat/completions", {**CHAT, "temperature": -1}, 400, "temperature", None),
    "top_p 0": ("/completions", {**COMPLETION, "top_p": 0}, 400, "top_p", None),
    "top_p 2": ("/chat/completions", {**CHAT, "top_p": 2}, 400, "top_p", None),
    "top_k -1": ("/completions", {**COMPLETION, "top_k": -1}, 400, "top_k", None),
    "temperature a string": ("/completions", {**COMPLETION, "temperature": "hot"}, 400, "temperature", None),
    "unknown model": ("/chat/completions", {**CHAT, "model": "no-such-model"}, 404, "model", "model_not_found"),
    "not an LLM": ("/completions", {**COMPLETION, "model": "classifier"}, 400, "model", "model_not_supported"),
    "n=2": ("/chat/completions", {**CHAT, "n": 2}, 400, "n", "unsupported_parameter"),
    "echo": ("/completions", {**COMPLETION, "echo": True}, 400, "echo", None),
    "missing model": ("/chat/completions", {"messages": MESSAGES}, 400, "model", None),
    "missing messages": ("/chat/completions", {"model": MODEL}, 400, "messages", None),
    "unknown role": ("/chat/completions", {**CHAT, "messages": [{"role": "hacker", "content": "Hi"}]}, 400,
                     "messages[0].role", "invalid_value"),
    "tool role": ("/chat/completions", {**CHAT, "messages": [*MESSAGES, {"role": "tool", "content": "4",
                                                                       "tool_call_id": "c1"}]}, 400,
                  f"messages[{len(MESSAGES)}].role", "unsupported_value"),
    "batched prompts": ("/completions", {**COMPLETION, "prompt": ["a", "b"]}, 400, "prompt", None),
    "malformed JSON": ("/chat/completions", b'{"model": "tiny", "messages": [', 400, None, None),
    "not an object": ("/completions", b'["tiny"]', 400, None, None),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_openai_errors_over_http(stack: Stack, case: str, stream: bool) -> None:
    path, body, status, param, code = BAD_REQUESTS[case]
    if stream and isinstance(body, dict):
        body = {**body, "stream": True}  # refused before any event: a plain HTTP error too
    got, answer = post(stack, path, body)
    assert_openai_error(got, answer, status, param, code, "invalid_request_error")


def test_unknown_urls_and_methods_get_openai_errors(stack: Stack) -> None:
    status, raw, _ = http_request("GET", stack.base + "/engines")
    assert_openai_error(status, json.loads(raw), 404, code="unknown_url")
    status, raw, _ = http_request("GET", stack.base + "/completions")
    assert_openai_error(status, json.loads(raw), 405)


def test_bad_requests_raise_the_sdks_errors(stack: Stack) -> None:
    client = stack.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=-1)
    assert caught.value.param == "temperature" and "temperature" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        list(client.chat.completions.create(model=MODEL, messages=MESSAGES, top_p=2, stream=True))
    assert caught.value.param == "top_p"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="", max_tokens=3)
    assert caught.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=CONTEXT)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
    assert caught.value.param == "n"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        list(client.completions.create(model="no-such-model", prompt=PROMPT, stream=True))


# -- metrics ---------------------------------------------------------------------------------------


def test_requests_are_counted_like_the_other_routes(stack: Stack) -> None:
    def ok() -> float:
        return metric_value(stack.gateway.metrics(), "modelgw_requests_total", model=MODEL, runtime=RUNTIME,
                            protocol="openai", status="OK")

    before = ok()
    client = stack.client()
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, stream=True))
    assert ok() == before + 2
    text = stack.gateway.metrics()
    assert metric_value(text, "modelgw_request_duration_seconds_count", model=MODEL, protocol="openai") >= 2
    assert metric_value(text, "modelgw_in_flight_requests", model=MODEL) == 0
