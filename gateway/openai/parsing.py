"""OpenAI request bodies -> the LLM contract's ModelInferRequest (runtimes/llm/CONTRACT.md).

    body = parse_body(raw)                   # a JSON object, else InvalidRequest
    call = parse_completion(body)            # or parse_chat(body)
    message = infer_request(call, "cmpl-...")

Fields map to the contract's inputs (`text_input`, or `messages` as JSON so that the
runtime renders the checkpoint's chat template: the gateway has no tokenizer) and its
sampling parameters. Types are checked here; value ranges are the runtime's to check (one
set of rules, with messages naming the parameter). Fields that OpenAI clients routinely
send are ignored; fields whose meaning we cannot honour (n > 1, best_of, echo, suffix,
logit_bias, penalties, tools, JSON response formats, top logprobs) are refused with a 400
naming them, rather than silently answered differently. Extensions, as vLLM names them:
top_k, ignore_eos, stop_token_ids. Chat messages pass the contract's own check
(modelgw.chat: roles system, developer, user, assistant; text content), the one the
runtime applies, so a bad one is a 400 naming it (`messages[0].role`) before any runtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelgw.chat import MessageError, check_messages
from modelgw.gateway.json_body import BadBody, parse_json
from modelgw.gateway.openai.errors import InvalidRequest
from modelgw.oip.codec import add_input, set_parameter
from modelgw.oip.protocol import ENABLE_EMPTY_FINAL_RESPONSE
from modelgw.protos import inference_pb2 as pb

_INT64 = 2**63


@dataclass(frozen=True)
class GenerationCall:
    """One OpenAI generation request, ready for the runtime."""

    chat: bool
    model: str
    prompt: str | None = None                 # completions
    messages: list[Any] | None = None         # chat completions
    parameters: dict[str, Any] = field(default_factory=dict)  # the contract's sampling parameters
    stream: bool = False
    include_usage: bool = False               # stream_options.include_usage
    logprobs: bool = False                    # return the chosen tokens' log-probabilities


# -- the body ----------------------------------------------------------------------------


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; InvalidRequest otherwise."""
    if not raw.strip():
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        body = parse_json(raw)  # the gateway's one JSON body reader: not JSON, or nested too deep
    except BadBody as err:
        raise InvalidRequest(err.message) from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {_json_type(body)}")
    return body


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise InvalidRequest("you must provide a model parameter", "model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(f"model must be a non-empty string, got {_json_type(model)}", "model")
    return model


# -- typed fields (None: absent or null) --------------------------------------------------


def _int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{key} must be an integer, got {_json_type(value)}", key)
    if not -_INT64 <= value < _INT64:
        raise InvalidRequest(f"{key} is out of range: {value}", key)
    return value


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{key} must be a number, got {_json_type(value)}", key)
    return float(value)


def _bool(body: dict[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise InvalidRequest(f"{key} must be a boolean, got {_json_type(value)}", key)
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise InvalidRequest("stop must be a string or an array of strings", "stop")


# -- what we cannot honour ----------------------------------------------------------------


def _refuse_unless_default(body: dict[str, Any], key: str, default_ok: Any, why: str) -> None:
    """400 when `key` is set to anything but null or a value `default_ok` accepts."""
    value = body.get(key)
    if value is None or default_ok(value):
        return
    raise InvalidRequest(f"{key}={json.dumps(value)[:80]} is not supported: {why}", key, "unsupported_parameter")


def _refuse_unsupported(body: dict[str, Any]) -> None:
    _refuse_unless_default(body, "n", lambda v: v == 1 and not isinstance(v, bool), "one choice per request (n=1)")
    for penalty in ("presence_penalty", "frequency_penalty"):
        _refuse_unless_default(
            body, penalty, lambda v: v == 0 and not isinstance(v, bool), "the runtime applies no penalties"
        )
    _refuse_unless_default(body, "logit_bias", lambda v: v == {}, "the runtime applies no logit bias")


def _sampling(body: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    """The contract's sampling parameters from the fields both endpoints share."""
    parameters: dict[str, Any] = {}
    if max_tokens is not None:
        parameters["max_tokens"] = max_tokens
    for key in ("temperature", "top_p"):
        value = _number(body, key)
        if value is not None:
            parameters[key] = value
    for key in ("top_k", "seed"):
        value = _int(body, key)
        if value is not None:
            parameters[key] = value
    stop = _stop(body)
    if stop:
        parameters["stop"] = json.dumps(stop)  # always a JSON list: one string could look like one
    ignore_eos = _bool(body, "ignore_eos")
    if ignore_eos is not None:
        parameters["ignore_eos"] = ignore_eos
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None:
        if not isinstance(stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in stop_token_ids
        ):
            raise InvalidRequest("stop_token_ids must be an array of integers", "stop_token_ids")
        if stop_token_ids:
            parameters["stop_token_ids"] = json.dumps(stop_token_ids)
    return parameters


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest("stream_options must be an object", "stream_options")
        include_usage = bool(_bool(options, "include_usage"))
    return stream, include_usage and stream


# -- the two endpoints -----------------------------------------------------------------------


def parse_completion(body: dict[str, Any]) -> GenerationCall:
    """POST /v1/completions."""
    model = model_of(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest("you must provide a prompt", "prompt")
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif prompt and all(isinstance(p, str) for p in prompt):
            raise InvalidRequest(
                f"batched prompts are not supported ({len(prompt)} prompts in one request): "
                "send one request per prompt",
                "prompt",
            )
        elif prompt and all(isinstance(p, (int, list)) and not isinstance(p, bool) for p in prompt):
            raise InvalidRequest("token-id prompts are not supported: send the prompt as a string", "prompt")
        elif not prompt:
            raise InvalidRequest("prompt is empty: give at least one character", "prompt")
        else:
            raise InvalidRequest("prompt must be a string (or an array holding one string)", "prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest(f"prompt must be a string, got {_json_type(prompt)}", "prompt")
    if not prompt:
        raise InvalidRequest("prompt is empty: give at least one character", "prompt")
    _refuse_unsupported(body)
    _refuse_unless_default(body, "best_of", lambda v: v == 1 and not isinstance(v, bool), "one candidate per request")
    _refuse_unless_default(body, "echo", lambda v: v is False, "the prompt is not repeated in the answer")
    _refuse_unless_default(body, "suffix", lambda v: v == "", "the runtime does not fill in the middle")
    # logprobs N: the chosen token's log-probability and the N most likely alternatives;
    # the runtime returns the chosen token's only, so 0 is what we can honour
    logprobs = _int(body, "logprobs")
    if logprobs is not None and logprobs != 0:
        raise InvalidRequest(
            f"logprobs={logprobs} is not supported: the runtime returns the chosen tokens' log-probabilities only; "
            "send logprobs: 0 for those",
            "logprobs", "unsupported_parameter",
        )
    parameters = _sampling(body, _int(body, "max_tokens"))
    if logprobs == 0:
        parameters["logprobs"] = 1
    stream, include_usage = _streaming(body)
    return GenerationCall(False, model, prompt=prompt, parameters=parameters, stream=stream,
                          include_usage=include_usage, logprobs=logprobs == 0)


def _check_messages(messages: Any) -> list[Any]:
    """The messages as sent, once the contract's check (modelgw.chat, which the runtime
    applies too) passes: roles the chat template renders, text content."""
    if messages is None:
        raise InvalidRequest("you must provide messages", "messages")
    try:
        check_messages(messages)
    except MessageError as err:
        raise InvalidRequest(str(err), err.field, err.code) from None
    return messages


def parse_chat(body: dict[str, Any]) -> GenerationCall:
    """POST /v1/chat/completions."""
    model = model_of(body)
    messages = _check_messages(body.get("messages"))
    _refuse_unsupported(body)
    for key in ("tools", "functions"):
        _refuse_unless_default(body, key, lambda v: v == [], "the runtime does not call tools")
    _refuse_unless_default(body, "tool_choice", lambda v: v in ("none", "auto"), "the runtime does not call tools")
    _refuse_unless_default(
        body, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text",
        "the runtime generates plain text (no JSON mode or schemas)",
    )
    _refuse_unless_default(body, "audio", lambda v: False, "text only")
    _refuse_unless_default(body, "modalities", lambda v: v == ["text"], "text only")
    logprobs = bool(_bool(body, "logprobs"))
    top_logprobs = _int(body, "top_logprobs")
    if top_logprobs:
        raise InvalidRequest(
            f"top_logprobs={top_logprobs} is not supported: the runtime returns the chosen tokens' "
            "log-probabilities only (logprobs: true)",
            "top_logprobs", "unsupported_parameter",
        )
    # max_completion_tokens is the newer name of max_tokens
    max_tokens = _int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    parameters = _sampling(body, max_tokens)
    if logprobs:
        parameters["logprobs"] = 1
    stream, include_usage = _streaming(body)
    return GenerationCall(True, model, messages=messages, parameters=parameters, stream=stream,
                          include_usage=include_usage, logprobs=logprobs)


# -- the contract's request -----------------------------------------------------------------

def infer_request(call: GenerationCall, request_id: str) -> pb.ModelInferRequest:
    """The ModelInferRequest for a call. Streamed calls ask for an empty final response, so
    that each token chunk leaves the runtime as soon as it exists (the usage figures and
    the finish reason come on the flagged final response)."""
    message = pb.ModelInferRequest(model_name=call.model, id=request_id)
    if call.chat:
        text = json.dumps(call.messages, ensure_ascii=False)
        add_input(message, "messages", np.array([text.encode("utf-8")], dtype=object), "BYTES")
    else:
        prompt = call.prompt or ""  # parse_completion refuses an empty prompt
        add_input(message, "text_input", np.array([prompt.encode("utf-8")], dtype=object), "BYTES")
    for key, value in call.parameters.items():
        set_parameter(message.parameters, key, value)
    if call.stream:
        set_parameter(message.parameters, ENABLE_EMPTY_FINAL_RESPONSE, True)
    return message
