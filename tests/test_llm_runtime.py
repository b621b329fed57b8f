"""The `llm` kind end to end: a checkpoint written by `modelgw llm make-checkpoint`, served
by a real `modelgw runtime serve --kind llm` process registered in a real etcd, with an
unmodified tritonclient: ModelInfer, ModelStreamInfer, clear errors for bad requests,
and a client that cancels mid-stream freeing its cache (seen in the endpoint record)."""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import modelgw_command
from runtime_helpers import Runtime, expect_error

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.store import RegistryStore

REGISTRY_RUNTIME = "llm-test"
# a long context, so that a cancelled long request could not have finished by itself in the
# time the cancellation tests wait for its cache to be freed (it would take minutes)
MAX_POSITION = 65536


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    done = subprocess.run(
        modelgw_command("llm", "make-checkpoint", str(directory), "--layers", "2", "--hidden", "64", "--heads", "4",
                        "--kv-heads", "2", "--vocab", "512", "--max-position", str(MAX_POSITION), "--seed", "3"),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (directory / name).is_file(), name
    return directory


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint: Path):
    """transformers' own reading of the checkpoint's tokenizer: an independent token count."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def count(hf_tokenizer, prompt: str) -> int:
    return len(hf_tokenizer(prompt)["input_ids"])


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"/modelgw-test/{uuid.uuid4().hex[:12]}/"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, etcd_server, prefix: str) -> Iterator[Runtime]:
    log = tmp_path_factory.mktemp("llm-runtime") / "runtime.log"
    server = Runtime(
        log, "--kind", "llm", "--model", f"tiny={checkpoint}",
        "--option", "threads=1", "--option", "max_num_seqs=8", "--option", "max_num_batched_tokens=256",
        "--option", "kv_cache_mb=40",  # 80k tokens: one full-length sequence
        "--registry", etcd_server.endpoint, "--prefix", prefix, "--runtime", REGISTRY_RUNTIME,
    )
    yield server
    assert server.stop() == 0, server.output()


def text_input(prompt: str, name: str = "text_input") -> triton.InferInput:
    tensor = triton.InferInput(name, [1], "BYTES")
    tensor.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    return tensor


def infer(runtime: Runtime, prompt: str = "Hello world", **parameters) -> triton.InferResult:
    return runtime.client.infer("tiny", [text_input(prompt)], parameters=parameters or None)


def text_of(result: triton.InferResult) -> str:
    return result.as_numpy("text_output")[0].decode()


def response_parameters(result: triton.InferResult) -> dict:
    params = result.get_response().parameters
    return {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in params.items()}


def stream(runtime: Runtime, inputs: list[triton.InferInput], empty_final: bool, **parameters) -> list[triton.InferResult]:
    """One request on a ModelStreamInfer stream: its responses up to the flagged final one."""
    responses: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(runtime.url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("tiny", inputs, request_id="s", parameters=parameters or None,
                                  enable_empty_final_response=empty_final)
        collected = []
        while True:
            result, error = responses.get(timeout=60)
            assert error is None, error
            collected.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return collected
    finally:
        client.stop_stream()
        client.close()


# -- ModelInfer and ModelStreamInfer ---------------------------------------------------------


def test_metadata_declares_the_contract(runtime: Runtime) -> None:
    metadata = runtime.client.get_model_metadata("tiny", as_json=True)
    assert metadata["platform"] == "llm_torch"
    assert {i["name"] for i in metadata["inputs"]} == {"text_input", "messages", "sampling_parameters"}
    assert {o["name"] for o in metadata["outputs"]} == {"text_output", "token_ids", "logprobs"}


@pytest.mark.parametrize("empty_final", [False, True])
def test_stream_concatenates_to_the_infer_text(runtime: Runtime, hf_tokenizer, empty_final: bool) -> None:
    params = dict(max_tokens=24, temperature=0, ignore_eos=True)
    whole = infer(runtime, "The quick brown fox", **params)
    expected = text_of(whole)
    prompt_tokens = count(hf_tokenizer, "The quick brown fox")
    assert response_parameters(whole) == {"prompt_tokens": prompt_tokens, "completion_tokens": 24,
                                          "finish_reason": "length"}
    assert len(whole.as_numpy("token_ids")) == 24

    responses = stream(runtime, [text_input("The quick brown fox")], empty_final, **params)
    assert len(responses) > 3, "expected one response per token chunk"
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r in responses]
    assert finals == [False] * (len(responses) - 1) + [True]
    texts = [r.as_numpy("text_output")[0].decode() for r in responses if r.as_numpy("text_output") is not None]
    assert "".join(texts) == expected
    tokens = np.concatenate([r.as_numpy("token_ids") for r in responses if r.as_numpy("token_ids") is not None])
    assert tokens.tolist() == whole.as_numpy("token_ids").tolist()
    last = response_parameters(responses[-1])
    assert last == {"prompt_tokens": prompt_tokens, "completion_tokens": 24, "finish_reason": "length",
                    "triton_final_response": True}


def test_logprobs_seeded_sampling_and_stop_strings(runtime: Runtime) -> None:
    with_logprobs = infer(runtime, max_tokens=8, temperature=0, logprobs=1, ignore_eos=True)
    logprobs = with_logprobs.as_numpy("logprobs")
    assert logprobs.shape == (8,) and (logprobs <= 0).all()
    assert infer(runtime, max_tokens=8, temperature=0).as_numpy("logprobs").shape == (0,)

    # tritonclient cannot send floats as parameters: numbers may come as strings
    seeded = [text_of(infer(runtime, max_tokens=20, temperature="0.9", top_p="0.95", seed=11)) for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert text_of(infer(runtime, max_tokens=20, temperature="0.9", top_p="0.95", seed=12)) != seeded[0]

    base = text_of(infer(runtime, "It is sunny", max_tokens=40, temperature=0, ignore_eos=True))
    stop = base[6:9]
    stopped = infer(runtime, "It is sunny", max_tokens=40, temperature=0, ignore_eos=True, stop=json.dumps([stop]))
    assert text_of(stopped) == base[:base.find(stop)]
    assert response_parameters(stopped)["finish_reason"] == "stop"


def test_chat_messages_and_the_sampling_parameters_input(runtime: Runtime, hf_tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chat = text_input(json.dumps(messages), "messages")
    sampling = text_input(json.dumps({"max_tokens": 6, "temperature": 0, "ignore_eos": True}), "sampling_parameters")
    result = runtime.client.infer("tiny", [chat, sampling])
    reference = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(reference, list):  # a BatchEncoding in recent transformers
        reference = reference["input_ids"]
    assert response_parameters(result) == {"prompt_tokens": len(reference), "completion_tokens": 6,
                                           "finish_reason": "length"}


def test_a_developer_message_is_rendered_as_the_system_message(runtime: Runtime) -> None:
    """OpenAI's developer role is the system role of newer models; chat templates know system."""
    answers = []
    for role in ("developer", "system"):
        messages = [{"role": role, "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
        result = runtime.client.infer("tiny", [text_input(json.dumps(messages), "messages")],
                                      parameters={"max_tokens": 6, "temperature": 0, "ignore_eos": True})
        answers.append((text_of(result), response_parameters(result)["prompt_tokens"]))
    assert answers[0] == answers[1]


# -- bad requests ----------------------------------------------------------------------------


@pytest.mark.parametrize("messages, message", [
    ([{"role": "hacker", "content": "Hi"}],
     "messages[0].role must be one of system, developer, user, assistant, got 'hacker'"),
    ([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "4", "tool_call_id": "c1"}],
     "messages[1].role 'tool' is not supported"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0]: only text parts"),
    ([{"role": 3, "content": "Hi"}], "messages[0] must be an object with a string 'role'"),
])
def test_chat_messages_the_runtime_cannot_render_are_invalid_argument(runtime: Runtime, messages: list,
                                                                       message: str) -> None:
    chat = [text_input(json.dumps(messages), "messages")]
    error = expect_error(lambda: runtime.client.infer("tiny", chat), "INVALID_ARGUMENT")
    assert message in error, error


@pytest.mark.parametrize("parameters, message", [
    (dict(temperature="-1"), "temperature must be >= 0"),
    (dict(top_p="0"), r"top_p must be in (0, 1]"),
    (dict(top_p="1.5"), r"top_p must be in (0, 1]"),
    (dict(temperature="hot"), "temperature must be a number, got str 'hot'"),
    (dict(temperature=True), "temperature must be a number, got a boolean"),
    (dict(max_tokens="many"), "max_tokens must be an integer"),
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(stop_token_ids="[1, 'x']"), "stop_token_ids must be"),
    (dict(max_tokens=MAX_POSITION), "the prompt has {prompt} tokens and max_tokens is {max_tokens}: "
                                    "{total} tokens are beyond the model's context of {context} tokens"),
])
def test_bad_sampling_parameters_are_invalid_argument(runtime: Runtime, hf_tokenizer, parameters: dict,
                                                      message: str) -> None:
    error = expect_error(lambda: infer(runtime, **parameters), "INVALID_ARGUMENT")
    prompt = count(hf_tokenizer, "Hello world")
    message = message.format(prompt=prompt, max_tokens=MAX_POSITION, total=prompt + MAX_POSITION, context=MAX_POSITION)
    assert message in error, error


def test_bad_prompts_are_invalid_argument(runtime: Runtime) -> None:
    client = runtime.client
    assert "'text_input' is empty" in expect_error(lambda: infer(runtime, ""), "INVALID_ARGUMENT")
    both = [text_input("Hi"), text_input('[{"role": "user", "content": "Hi"}]', "messages")]
    assert "exactly one of" in expect_error(lambda: client.infer("tiny", both), "INVALID_ARGUMENT")
    params_only = [text_input("{}", "sampling_parameters")]
    assert "exactly one of" in expect_error(lambda: client.infer("tiny", params_only), "INVALID_ARGUMENT")
    bad_json = [text_input("[{", "messages")]
    assert "'messages' is not JSON" in expect_error(lambda: client.infer("tiny", bad_json), "INVALID_ARGUMENT")
    unknown_key = [text_input("Hi"), text_input('{"temprature": 0}', "sampling_parameters")]
    assert "unknown key(s) temprature" in expect_error(lambda: client.infer("tiny", unknown_key), "INVALID_ARGUMENT")
    wrong_type = triton.InferInput("text_input", [1], "INT64")
    wrong_type.set_data_from_numpy(np.array([3], dtype=np.int64))
    assert "datatype INT64, expected BYTES" in expect_error(lambda: client.infer("tiny", [wrong_type]),
                                                            "INVALID_ARGUMENT")
    long_prompt = "Hello world " * (MAX_POSITION // 2)
    error = expect_error(lambda: infer(runtime, long_prompt, max_tokens=16), "INVALID_ARGUMENT")
    assert "max_tokens is 16" in error and f"context of {MAX_POSITION} tokens" in error, error


def test_unknown_model_is_not_found(runtime: Runtime) -> None:
    error = expect_error(lambda: runtime.client.infer("no-such-llm", [text_input("Hi")]), "NOT_FOUND")
    assert "no-such-llm" in error


def test_errors_on_a_stream_keep_the_stream_open(runtime: Runtime) -> None:
    responses: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(runtime.url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("tiny", [text_input("")], request_id="bad")
        _, error = responses.get(timeout=30)
        assert error is not None and "'text_input' is empty" in str(error)
        client.async_stream_infer("tiny", [text_input("Hi")], request_id="good", parameters={"max_tokens": 3})
        while True:
            result, error = responses.get(timeout=30)
            assert error is None, error
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        assert response_parameters(result)["completion_tokens"] == 3
    finally:
        client.stop_stream()
        client.close()


# -- cancellation frees the cache, visible in the endpoint record ------------------------------


def endpoint_load(etcd_endpoint: str, prefix: str) -> rpb.LoadFigures:
    async def read() -> rpb.LoadFigures:
        async with RegistryStore(etcd_endpoint, prefix=prefix) as store:
            endpoints = (await store.list_endpoints(REGISTRY_RUNTIME)).endpoints
            assert len(endpoints) == 1, endpoints
            return endpoints[0].load

    return asyncio.run(read())


def wait_for_load(etcd_endpoint: str, prefix: str, condition, timeout: float = 30.0) -> rpb.LoadFigures:
    """Poll the endpoint record until its load figures satisfy `condition` (the publisher
    rewrites it, throttled, when they change)."""
    deadline = time.monotonic() + timeout
    while True:
        load = endpoint_load(etcd_endpoint, prefix)
        if condition(load):
            return load
        assert time.monotonic() < deadline, f"endpoint load never got there: {load}"
        time.sleep(0.1)


def test_cancelled_stream_frees_its_cache(runtime: Runtime, etcd_server, prefix: str) -> None:
    wait_for_load(etcd_server.endpoint, prefix, lambda load: load.kv_cache_usage == 0 and load.running == 0)
    responses: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(runtime.url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    cancelled = False
    try:
        client.async_stream_infer("tiny", [text_input("Hello world")], request_id="long",
                                  parameters={"max_tokens": MAX_POSITION - 16, "ignore_eos": True},
                                  enable_empty_final_response=True)
        for _ in range(3):  # it is streaming
            result, error = responses.get(timeout=30)
            assert error is None, error
            assert not result.get_response().parameters["triton_final_response"].bool_param
        busy = wait_for_load(etcd_server.endpoint, prefix, lambda load: load.running == 1)
        assert busy.kv_cache_usage > 0 and busy.in_flight == 1
        client.stop_stream(cancel_requests=True)
        cancelled = True
    finally:
        if not cancelled:
            client.stop_stream(cancel_requests=True)
        client.close()
    idle = wait_for_load(etcd_server.endpoint, prefix, lambda load: load.running == 0 and load.kv_cache_usage == 0)
    assert idle.queue_depth == 0 and idle.in_flight == 0
    # the runtime serves on, and the cancelled request did not finish in the background
    assert response_parameters(infer(runtime, max_tokens=2))["completion_tokens"] == 2


def test_cancelled_infer_frees_its_cache(runtime: Runtime, etcd_server, prefix: str) -> None:
    wait_for_load(etcd_server.endpoint, prefix, lambda load: load.kv_cache_usage == 0)
    client = triton.InferenceServerClient(runtime.url)
    try:
        expect_error(lambda: client.infer("tiny", [text_input("Hello world")], client_timeout=1.0,
                                          parameters={"max_tokens": MAX_POSITION - 16, "ignore_eos": True}),
                     "DEADLINE_EXCEEDED")
    finally:
        client.close()
    wait_for_load(etcd_server.endpoint, prefix, lambda load: load.running == 0 and load.kv_cache_usage == 0 and load.in_flight == 0)


def test_make_checkpoint_refuses_bad_sizes(tmp_path: Path) -> None:
    done = subprocess.run(modelgw_command("llm", "make-checkpoint", str(tmp_path / "x"), "--hidden", "60",
                                          "--heads", "8"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "hidden (60) must be a multiple of heads (8)" in done.stderr
    assert sys.executable  # the CLI ran under this interpreter
