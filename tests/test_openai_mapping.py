"""The OpenAI API's mapping, in process: request bodies -> the LLM contract's ModelInferRequest,
the contract's responses -> OpenAI bodies and chunks, errors -> OpenAI's error format.
(End to end against a real runtime: test_openai_api.py.)"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from modelgw.gateway.errors import GatewayError
from modelgw.gateway.openai.errors import InvalidRequest, describe, stream_error
from modelgw.gateway.openai.parsing import infer_request, parse_body, parse_chat, parse_completion
from modelgw.gateway.openai.rendering import CallInfo, ChunkRenderer, completion_body, read_piece
from modelgw.oip.codec import add_output, decode_request_inputs, parameters_dict, set_parameter
from modelgw.protos import inference_pb2 as pb

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo"}]


def contract_inputs(message: pb.ModelInferRequest) -> tuple[dict, dict]:
    """What the runtime decodes: (inputs by name, parameters)."""
    return decode_request_inputs(message), parameters_dict(message.parameters)


# -- requests -----------------------------------------------------------------------------


def test_completion_fields_become_contract_parameters() -> None:
    body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 3,
            "seed": 11, "stop": "\n", "user": "someone", "n": 1, "presence_penalty": 0, "logit_bias": {}}
    call = parse_completion(body)
    assert (call.chat, call.model, call.stream) == (False, "tiny", False)
    inputs, parameters = contract_inputs(infer_request(call, "cmpl-1"))
    assert list(inputs) == ["text_input"]
    assert inputs["text_input"].shape == (1,) and inputs["text_input"][0] == b"Once upon"
    assert parameters == {"max_tokens": 7, "temperature": 0.0, "top_p": 0.5, "top_k": 3, "seed": 11,
                          "stop": json.dumps(["\n"])}
    # greedy: a float temperature, so the runtime reads 0 the same whatever JSON type came
    assert infer_request(call, "x").parameters["temperature"].WhichOneof("parameter_choice") == "double_param"


def test_a_prompt_list_of_one_string_is_that_prompt() -> None:
    inputs, _ = contract_inputs(infer_request(parse_completion({"model": "m", "prompt": ["just one"]}), "i"))
    assert inputs["text_input"][0] == b"just one"


def test_chat_sends_the_messages_as_json_for_the_chat_template() -> None:
    call = parse_chat({"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "max_completion_tokens": 9,
                       "logprobs": True, "stop": ["a", "b"], "stream": True,
                       "stream_options": {"include_usage": True}})
    assert call.chat and call.stream and call.include_usage and call.logprobs
    message = infer_request(call, "chatcmpl-1")
    assert message.id == "chatcmpl-1" and message.model_name == "tiny"
    inputs, parameters = contract_inputs(message)
    assert list(inputs) == ["messages"]
    assert json.loads(inputs["messages"][0].decode("utf-8")) == MESSAGES
    # max_completion_tokens is the newer name and wins; logprobs: the chosen tokens'
    assert parameters["max_tokens"] == 9 and parameters["logprobs"] == 1
    assert json.loads(parameters["stop"]) == ["a", "b"]
    # streamed: each token chunk leaves the runtime at once, the usage comes flagged final
    assert parameters["triton_enable_empty_final_response"] is True


def test_include_usage_needs_stream_and_extensions_pass_through() -> None:
    call = parse_completion({"model": "m", "prompt": "p", "stream_options": {"include_usage": True},
                             "ignore_eos": True, "stop_token_ids": [5, 6]})
    assert not call.stream and not call.include_usage
    _, parameters = contract_inputs(infer_request(call, "i"))
    assert parameters["ignore_eos"] is True and json.loads(parameters["stop_token_ids"]) == [5, 6]
    assert "triton_enable_empty_final_response" not in parameters


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "p"}, "model"),
        ({"model": 3, "prompt": "p"}, "model"),
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": [1, 2, 3]}, "prompt"),
        ({"model": "m", "prompt": 5}, "prompt"),
        ({"model": "m", "prompt": "p", "n": 2}, "n"),
        ({"model": "m", "prompt": "p", "best_of": 3}, "best_of"),
        ({"model": "m", "prompt": "p", "echo": True}, "echo"),
        ({"model": "m", "prompt": "p", "suffix": "end"}, "suffix"),
        ({"model": "m", "prompt": "p", "logit_bias": {"5": 10}}, "logit_bias"),
        ({"model": "m", "prompt": "p", "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"model": "m", "prompt": "p", "logprobs": 2}, "logprobs"),
        ({"model": "m", "prompt": "p", "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m", "prompt": "p", "max_tokens": "7"}, "max_tokens"),
        ({"model": "m", "prompt": "p", "temperature": "hot"}, "temperature"),
        ({"model": "m", "prompt": "p", "temperature": True}, "temperature"),
        ({"model": "m", "prompt": "p", "seed": 2**70}, "seed"),
        ({"model": "m", "prompt": "p", "stop": [1]}, "stop"),
        ({"model": "m", "prompt": "p", "stream": "yes"}, "stream"),
        ({"model": "m", "prompt": "p", "stream_options": []}, "stream_options"),
    ],
)
def test_completion_refusals_name_the_parameter(body: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_completion(body)
    assert caught.value.param == param
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.http_status == 400
    assert param.split("[")[0] in caught.value.message


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": [{"content": "no role"}]}, "messages[0]"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "m", "messages": MESSAGES, "n": 3}, "n"),
        ({"model": "m", "messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"model": "m", "messages": MESSAGES, "tool_choice": "required"}, "tool_choice"),
        ({"model": "m", "messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format"),
        ({"model": "m", "messages": MESSAGES, "logprobs": True, "top_logprobs": 2}, "top_logprobs"),
        ({"model": "m", "messages": MESSAGES, "logprobs": 1}, "logprobs"),
    ],
)
def test_chat_refusals_name_the_parameter(body: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_chat(body)
    assert caught.value.param == param


@pytest.mark.parametrize(
    "messages, param, code, says",
    [
        ([{"role": "hacker", "content": "Hi"}], "messages[0].role", "invalid_value",
         "messages[0].role must be one of system, developer, user, assistant, got 'hacker'"),
        ([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42", "tool_call_id": "c1"}],
         "messages[1].role", "unsupported_value", "messages[1].role 'tool' is not supported"),
        ([{"role": "function", "name": "f", "content": "42"}], "messages[0].role", "unsupported_value",
         "messages[0].role 'function' is not supported"),
        ([{"role": "USER", "content": "Hi"}], "messages[0].role", "invalid_value", "got 'USER'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
         "messages[0].content[0]", "unsupported_value", "only text parts"),
    ],
)
def test_chat_roles_and_parts_the_runtime_cannot_render_are_refused(messages: list, param: str, code: str,
                                                                    says: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_chat({"model": "m", "messages": messages})
    assert (caught.value.param, caught.value.openai_code) == (param, code)
    assert says in caught.value.message and caught.value.http_status == 400


def test_chat_accepts_every_role_the_runtime_renders() -> None:
    messages = [{"role": role, "content": "x"} for role in ("developer", "system", "user", "assistant")]
    messages.append({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]})
    messages.append({"role": "assistant", "content": None, "name": "bot"})
    assert parse_chat({"model": "m", "messages": messages}).messages == messages


def test_chat_accepts_what_clients_routinely_send() -> None:
    call = parse_chat({"model": "m", "messages": MESSAGES, "n": 1, "user": "u", "store": False, "metadata": {},
                       "tool_choice": "none", "tools": [], "response_format": {"type": "text"},
                       "parallel_tool_calls": True, "presence_penalty": 0.0, "frequency_penalty": 0,
                       "logprobs": False, "top_logprobs": 0, "service_tier": "auto", "modalities": ["text"]})
    assert call.parameters == {} and not call.logprobs


@pytest.mark.parametrize("raw", [b"", b"{not json", b'["a"]', b'{"model": NaN}', b"\xff\xfe"])
def test_malformed_bodies_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_body(raw)
    assert caught.value.http_status == 400


# -- responses ----------------------------------------------------------------------------


def contract_response(text: str, token_ids: list[int], logprobs: list[float], final: bool | None = None,
                      **parameters) -> pb.ModelInferResponse:
    """A response as the runtime builds it (raw outputs, response parameters)."""
    response = pb.ModelInferResponse(model_name="tiny", model_version="1")
    add_output(response, "text_output", np.array([text.encode()], dtype=object), "BYTES")
    add_output(response, "token_ids", np.array(token_ids, dtype=np.int64), "INT64")
    add_output(response, "logprobs", np.array(logprobs, dtype=np.float32), "FP32")
    for key, value in parameters.items():
        set_parameter(response.parameters, key, value)
    if final is not None:
        set_parameter(response.parameters, "triton_final_response", final)
    return response


def test_whole_answers_in_openai_shape() -> None:
    response = contract_response("four words of text", [7, 8, 9, 10], [-0.5, -1.0, -0.25, -2.0],
                                 prompt_tokens=5, completion_tokens=4, finish_reason="length")
    piece = read_piece(response, final=True)
    chat = completion_body(CallInfo(True, "chatcmpl-x", 1700000000, "tiny", logprobs=True), piece)
    assert chat["object"] == "chat.completion" and chat["id"] == "chatcmpl-x" and chat["model"] == "tiny"
    (choice,) = chat["choices"]
    assert choice["message"] == {"role": "assistant", "content": "four words of text"}
    assert choice["finish_reason"] == "length"
    assert chat["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert [e["token"] for e in choice["logprobs"]["content"]] == ["token_id:7", "token_id:8", "token_id:9", "token_id:10"]
    assert [e["logprob"] for e in choice["logprobs"]["content"]] == [-0.5, -1.0, -0.25, -2.0]

    text = completion_body(CallInfo(False, "cmpl-x", 1700000000, "tiny"), piece)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "four words of text"
    assert text["choices"][0]["logprobs"] is None and text["choices"][0]["finish_reason"] == "length"


def test_stream_chunks_in_openai_shape() -> None:
    info = CallInfo(True, "chatcmpl-s", 1700000000, "tiny")
    chunks = ChunkRenderer(info, include_usage=True)
    first = chunks.start()
    assert first["object"] == "chat.completion.chunk" and first["usage"] is None
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [chunks.delta(read_piece(contract_response(t, [i], [-1.0], final=False))) for i, t in enumerate(["He", "llo"])]
    assert [d["choices"][0]["delta"] for d in deltas] == [{"content": "He"}, {"content": "llo"}]
    assert all(d["choices"][0]["finish_reason"] is None and d["id"] == "chatcmpl-s" for d in deltas)
    # a piece with no text (held back by the detokenizer) makes no chunk
    assert chunks.delta(read_piece(contract_response("", [3], [-1.0], final=False))) is None
    # the runtime's empty final response carries the finish reason and the usage figures
    final = read_piece(pb.ModelInferResponse(parameters={
        "triton_final_response": pb.InferParameter(bool_param=True),
        "prompt_tokens": pb.InferParameter(int64_param=6),
        "completion_tokens": pb.InferParameter(int64_param=3),
        "finish_reason": pb.InferParameter(string_param="stop"),
    }))
    assert final.final and final.text == ""
    last = chunks.finish(final)
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    usage = chunks.usage(final)
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}

    text_chunks = ChunkRenderer(CallInfo(False, "cmpl-s", 1, "tiny"))
    assert text_chunks.start() is None and text_chunks.usage(final) is None
    delta = text_chunks.delta(read_piece(contract_response("Hi", [4], [-1.0], final=False)))
    assert delta["object"] == "text_completion" and delta["choices"][0]["text"] == "Hi" and "usage" not in delta
    assert text_chunks.finish(final)["choices"][0] == {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}


# -- errors --------------------------------------------------------------------------------


def test_runtime_refusals_get_the_openai_param() -> None:
    status, body = describe(GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1], got 2.0"))
    assert status == 400
    assert body == {"error": {"message": "top_p must be in (0, 1], got 2.0", "type": "invalid_request_error",
                              "param": "top_p", "code": None}}
    _, body = describe(GatewayError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "the prompt has 3 tokens and max_tokens is 900: 903 tokens are beyond the model's context of 256 tokens"))
    assert body["error"]["code"] == "context_length_exceeded"
    status, body = describe(GatewayError(grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"))
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    for code, status, kind in [(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
                               (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
                               (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
                               (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
                               (grpc.StatusCode.INTERNAL, 500, "server_error")]:
        got, body = describe(GatewayError(code, "why"))
        assert (got, body["error"]["type"], body["error"]["message"]) == (status, kind, "why")


@pytest.mark.parametrize(
    "message, code",
    [
        ("UNAVAILABLE: model 'm' version '1' has no ready replica", grpc.StatusCode.UNAVAILABLE),
        ("NOT_FOUND: unknown model 'x'", grpc.StatusCode.NOT_FOUND),
        ("temperature must be >= 0, got -1.0", grpc.StatusCode.INVALID_ARGUMENT),
        ("input 'text_input' is empty: the prompt needs at least one character", grpc.StatusCode.INVALID_ARGUMENT),
        ("model 'tiny': 64 requests are queued already (max_waiting); retry later", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("model 'tiny' version '1' is loading, not ready", grpc.StatusCode.UNAVAILABLE),
        ("model 'tiny' is shutting down", grpc.StatusCode.UNAVAILABLE),
        ("internal error: KeyError: 'x'", grpc.StatusCode.INTERNAL),
        ("model 'tiny' failed: RuntimeError: boom", grpc.StatusCode.INTERNAL),
    ],
)
def test_stream_errors_get_a_status(message: str, code: grpc.StatusCode) -> None:
    err = stream_error(message)
    assert err.code == code
    assert err.message in message
