"""The `llm` runtime kind: a checkpoint directory served by an engine, over OIP/Triton.

    modelgw runtime serve --kind llm --model tiny=/models/tiny --port 8001 \
        --option max_num_seqs=32 --option threads=2

Inputs, outputs and parameters follow the LLM contract (runtimes/llm/CONTRACT.md):
`text_input` (BYTES [1], a prompt) or `messages` (BYTES [1], JSON chat messages with the
roles system, developer, user or assistant, rendered with the checkpoint's chat template),
optional `sampling_parameters` (BYTES [1], a JSON object); sampling parameters in the
request's parameters too (those win). Outputs
`text_output` (BYTES [1]), `token_ids` (INT64 [n]) and `logprobs` (FP32 [n] when asked,
else [0]). ModelInfer answers the whole text; ModelStreamInfer one response per chunk of
tokens. The last response (and the ModelInfer response) carries the parameters
prompt_tokens, completion_tokens and finish_reason.

Options (--option KEY=VALUE): engine (torch), device (auto|cpu|cuda[:N]), dtype
(auto|float32|bfloat16|float16), threads (torch intra-op threads), max_num_seqs,
max_num_batched_tokens, max_model_len, block_size, kv_cache_mb, max_waiting.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
import numpy as np

from modelgw.chat import MessageError, check_messages
from modelgw.runtimes.errors import InferenceError, InvalidInput, ModelLoadError, ModelNotReady
from modelgw.runtimes.model import Model, Tensors, TensorSpec

log = logging.getLogger(__name__)

_INT_PARAMETERS = ("max_tokens", "top_k", "seed", "logprobs")
_FLOAT_PARAMETERS = ("temperature", "top_p")
_BOOL_PARAMETERS = ("ignore_eos",)
_LIST_PARAMETERS = ("stop", "stop_token_ids")
SAMPLING_KEYS = frozenset(_INT_PARAMETERS + _FLOAT_PARAMETERS + _BOOL_PARAMETERS + _LIST_PARAMETERS)


def _in_own_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a thread that ends with it. Loading the weights runs torch's OpenMP
    kernels, which give the calling thread a pool of OpenMP workers for the rest of its
    life; the engine thread gets a pool of its own, and with two pools on the machine's
    cores libgomp stops spinning between kernels (every kernel then wakes its workers
    from sleep: ~30% slower decode steps here). A thread that exits frees its pool."""
    result: list = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn(*args))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name="llm-load")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class ResponseTensors(dict):
    """Output tensors plus response parameters (the server copies them onto the response)."""

    def __init__(self, tensors: Tensors, parameters: Mapping[str, Any] | None = None) -> None:
        super().__init__(tensors)
        self.parameters = dict(parameters or {})


# -- request parameters -> SamplingParams ------------------------------------------------


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise InvalidInput(f"{key} must be an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise InvalidInput(f"{key} must be an integer, got {type(value).__name__} {value!r}")


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidInput(f"{key} must be a number, got a boolean")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise InvalidInput(f"{key} must be a number, got {type(value).__name__} {value!r}")


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise InvalidInput(f"{key} must be a boolean, got {type(value).__name__} {value!r}")


def _as_stop(value: Any) -> tuple[str, ...]:
    """A list of strings, a JSON list of strings in a string, or one string."""
    if isinstance(value, str):
        if value.startswith("["):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list) and all(isinstance(s, str) for s in parsed):
                return tuple(parsed)
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise InvalidInput(f"stop must be a string or a list of strings, got {type(value).__name__} {value!r}")


def _as_token_ids(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InvalidInput(f"stop_token_ids must be a JSON list of integers, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return tuple(value)
    raise InvalidInput(f"stop_token_ids must be a list of integers, got {value!r}")


def sampling_params(parameters: Mapping[str, Any]) -> Any:
    """SamplingParams from known keys of `parameters` (others are ignored); InvalidInput
    naming the parameter when a value has the wrong type or range."""
    from modelgw.runtimes.llm.sampling import SamplingParams

    values: dict[str, Any] = {}
    for key, value in parameters.items():
        if key not in SAMPLING_KEYS or value is None:
            continue
        if key in _INT_PARAMETERS:
            values[key] = _as_int(key, value)
        elif key in _FLOAT_PARAMETERS:
            values[key] = _as_float(key, value)
        elif key in _BOOL_PARAMETERS:
            values[key] = _as_bool(key, value)
        elif key == "stop":
            values[key] = _as_stop(value)
        else:
            values[key] = _as_token_ids(value)
    params = SamplingParams(**values)
    try:
        params.check()
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    return params


def _single_text(inputs: Tensors, name: str) -> str:
    value = inputs[name].reshape(-1)[0]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"input '{name}' is not valid UTF-8: {exc}") from None
    return str(value)


def _text_bytes(inputs: Tensors) -> int:
    return sum(len(item) for array in inputs.values() if array.dtype == object for item in array.reshape(-1))


def _parse_messages(text: str) -> list[dict[str, Any]]:
    """The `messages` input, checked as the gateway checks it (modelgw.chat): roles the
    chat template renders (developer as system), text content."""
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"input 'messages' is not JSON: {exc}") from None
    try:
        return check_messages(messages)
    except MessageError as exc:
        raise InvalidInput(f"input 'messages': {exc}") from None


# -- the Model -------------------------------------------------------------------------


def _option_int(options: Mapping[str, str], key: str, default: int | None) -> int | None:
    value = options.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ModelLoadError(f"option {key}={value!r} must be an integer") from None


class LLMModel(Model):
    """A Llama-family checkpoint served by the engine `engine=` picks (auto: engine.choose_engine), with streaming."""

    platform = "llm_torch"
    inputs = [
        TensorSpec("text_input", "BYTES", [1], optional=True),
        TensorSpec("messages", "BYTES", [1], optional=True),
        TensorSpec("sampling_parameters", "BYTES", [1], optional=True),
    ]
    outputs = [
        TensorSpec("text_output", "BYTES", [1]),
        TensorSpec("token_ids", "INT64", [-1]),
        TensorSpec("logprobs", "FP32", [-1]),
    ]
    max_batch_size = 0  # the engine batches continuously; the server must not

    def load(self) -> None:
        import torch

        from modelgw.runtimes.llm.async_engine import AsyncEngine
        from modelgw.runtimes.llm.checkpoint import Checkpoint
        from modelgw.runtimes.llm.engine import EngineConfig, create_engine
        from modelgw.runtimes.storage import local_path

        options = self.options
        threads = _option_int(options, "threads", None)
        if threads:
            torch.set_num_threads(threads)
        kv_mb = options.get("kv_cache_mb")
        try:
            kv_bytes = int(float(kv_mb) * 2**20) if kv_mb else None
        except ValueError:
            raise ModelLoadError(f"option kv_cache_mb={kv_mb!r} must be a number (MiB)") from None
        defaults = EngineConfig()
        config = EngineConfig(
            engine=options.get("engine", defaults.engine),
            device=options.get("device", defaults.device),
            dtype=options.get("dtype", defaults.dtype),
            max_num_seqs=_option_int(options, "max_num_seqs", defaults.max_num_seqs),
            max_num_batched_tokens=_option_int(options, "max_num_batched_tokens", defaults.max_num_batched_tokens),
            max_model_len=_option_int(options, "max_model_len", None),
            block_size=_option_int(options, "block_size", defaults.block_size),
            kv_cache_bytes=kv_bytes,
            max_waiting=_option_int(options, "max_waiting", defaults.max_waiting),
            quantization=options.get("quantization", defaults.quantization),
        )
        self.checkpoint = Checkpoint.open(local_path(self.uri))  # file://, pvc:// as every kind reads them
        self.tokenizer = self.checkpoint.tokenizer
        engine = _in_own_thread(create_engine, self.checkpoint, config)
        choice = engine.choice
        self.platform = f"llm_{choice.engine if choice else config.engine}"
        self.status_message = choice.describe() if choice else ""  # in the endpoint record: which engine, why
        self.max_model_len = engine.max_model_len
        self.engine = AsyncEngine(engine, self.name)
        self._ids = itertools.count()

    def unload(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None and engine.shutdown():
            engine.engine.close()  # only once its thread is gone: it may still be in a step

    # -- requests

    def make_request(self, inputs: Tensors, parameters: Mapping[str, Any]) -> Any:
        """A GenerationRequest from the request's tensors and parameters (InvalidInput if bad)."""
        from modelgw.runtimes.llm.engine import GenerationRequest

        merged: dict[str, Any] = {}
        if "sampling_parameters" in inputs:
            text = _single_text(inputs, "sampling_parameters")
            try:
                given = json.loads(text) if text.strip() else {}
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"input 'sampling_parameters' is not JSON: {exc}") from None
            if not isinstance(given, dict):
                raise InvalidInput("input 'sampling_parameters' must hold a JSON object")
            unknown = sorted(set(given) - SAMPLING_KEYS)
            if unknown:
                raise InvalidInput(
                    f"input 'sampling_parameters': unknown key(s) {', '.join(unknown)}; "
                    f"known: {', '.join(sorted(SAMPLING_KEYS))}"
                )
            merged.update(given)
        merged.update(parameters)
        params = sampling_params(merged)
        has_text, has_messages = "text_input" in inputs, "messages" in inputs
        if has_text == has_messages:
            raise InvalidInput("give exactly one of the inputs 'text_input' (a prompt) and 'messages' (chat messages)")
        if has_text:
            prompt = _single_text(inputs, "text_input")
            if not prompt:
                raise InvalidInput("input 'text_input' is empty: the prompt needs at least one character")
            prompt_ids = self.tokenizer.encode(prompt)
        else:
            messages = _parse_messages(_single_text(inputs, "messages"))
            try:
                prompt_ids = self.tokenizer.apply_chat_template(messages)
            except Exception as exc:  # jinja2 errors, raise_exception() in the template, no template
                raise InvalidInput(f"cannot render the chat template: {exc}") from None
        if not prompt_ids:
            raise InvalidInput("the prompt is empty after tokenization")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidInput(
                f"the prompt has {len(prompt_ids)} tokens and max_tokens is {params.max_tokens}: "
                f"{total} tokens are beyond the model's context of {self.max_model_len} tokens"
            )
        return GenerationRequest(f"{self.name}-{next(self._ids)}", tuple(prompt_ids), params)

    async def _outputs(self, inputs: Tensors, parameters: Mapping[str, Any]) -> AsyncIterator[Any]:
        from modelgw.runtimes.llm.async_engine import EngineStopped
        from modelgw.runtimes.llm.scheduler import QueueFull

        if _text_bytes(inputs) > 16384:  # tokenizing a long prompt takes milliseconds: not on the event loop
            request = await asyncio.to_thread(self.make_request, inputs, parameters)
        else:
            request = self.make_request(inputs, parameters)
        try:
            async for output in self.engine.generate(request):
                yield output
        except QueueFull as exc:
            raise InferenceError(f"model '{self.name}': {exc}", grpc.StatusCode.RESOURCE_EXHAUSTED) from None
        except EngineStopped as exc:
            raise ModelNotReady(str(exc)) from None
        except ValueError as exc:  # the engine refused it (e.g. beyond the KV cache)
            raise InvalidInput(str(exc)) from None
        except RuntimeError as exc:
            raise InferenceError(f"model '{self.name}': {exc}") from None

    async def generate(self, inputs: Tensors, parameters: Mapping[str, Any]) -> AsyncIterator[Tensors]:
        async for output in self._outputs(inputs, parameters):
            yield self._tensors(output.text, output.token_ids, output.logprobs, output)

    async def predict(self, inputs: Tensors, parameters: Mapping[str, Any]) -> Tensors:
        """The whole completion; awaited on the event loop (the server awaits async predicts)."""
        text: list[str] = []
        token_ids: list[int] = []
        logprobs: list[float] | None = None
        last = None
        async for output in self._outputs(inputs, parameters):
            text.append(output.text)
            token_ids.extend(output.token_ids)
            if output.logprobs is not None:
                logprobs = (logprobs or []) + output.logprobs
            last = output
        return self._tensors("".join(text), token_ids, logprobs, last)

    @staticmethod
    def _tensors(text: str, token_ids: list[int], logprobs: list[float] | None, output: Any) -> ResponseTensors:
        tensors = {
            "text_output": np.array([text.encode("utf-8")], dtype=object),
            "token_ids": np.array(token_ids, dtype=np.int64),
            "logprobs": np.array(logprobs or [], dtype=np.float32),
        }
        parameters = None
        if output is not None and output.finished:
            parameters = {
                "prompt_tokens": output.prompt_tokens,
                "completion_tokens": output.completion_tokens,
                "finish_reason": output.finish_reason or "stop",
            }
        return ResponseTensors(tensors, parameters)

    # -- load figures (the server's extra_load_figures hook calls this)

    def add_load_figures(self, load: Any) -> None:
        """Add this model's queued and running sequences and KV-cache use to an endpoint's
        LoadFigures (several LLM models on one replica: the fullest cache counts)."""
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        figures = engine.figures()
        load.queue_depth += figures.waiting
        load.running += figures.running
        load.kv_cache_usage = max(load.kv_cache_usage, figures.kv_cache_usage)
