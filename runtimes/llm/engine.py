"""The engine interface, and the `torch` engine.

An Engine is synchronous and single-threaded; whoever drives it (AsyncEngine: a
background thread) calls, between steps:

    engine.add_request(GenerationRequest("r1", prompt_ids, SamplingParams(max_tokens=32)))
    outputs = engine.step()             # one batched forward pass; RequestOutputs of this step
    engine.abort("r1")                  # cancel: frees the request's cache at once
    engine.figures()                    # waiting, running, KV-cache use (any thread may read)

A RequestOutput (sequence.py) carries what a request gained in this step: a text delta
(never part of a stop string), the new token ids (and their logprobs when asked), and on
the last one finished=True with the finish reason ("stop" | "length" | "cancelled" |
"error") and token counts. A step that produced a token but no text yet (an incomplete
character, or the possible start of a stop string) gives no output for that request; its
tokens come with the next.

A step is vLLM v1's three calls:

    step = scheduler.schedule()                          # plain data: rows of token ids, block ids
    result = runner.execute(step)                        # tensors only: forward + sampling
    outputs = scheduler.update_from_output(step, result) # every change of request state

TorchEngine = Scheduler (who runs; appends tokens, applies stops, finishes, frees the
cache) + ModelRunner (cache tensors, forward, sampler). Only the runner touches the model,
and nothing but the scheduler changes a Sequence.

The `tensorrt` engine (design, not built: no GPU here)
-----------------------------------------------------
It reuses everything above except the ModelRunner: scheduling, the block pool, stops
and detokenization are engine-independent, and a `TensorRTRunner.execute(step) ->
SampleResult` takes the same ScheduledStep (plain data: token ids, positions, block ids,
sampling parameters) and samples on the GPU with the shared Sampler.

- Export: the Decoder's forward is exported to ONNX with flat inputs (input_ids [T],
  positions [T], slot_mapping [T], block tables [rows, max_blocks], context lengths
  [rows], logits_index [S]) and the KV cache as external tensors: one device buffer per
  layer for K and V ([blocks, block_size, kv_heads, head_dim]), allocated by the runner
  from the same memory budget and bound by address on every execution (in/out aliasing,
  updated in place by a paged-attention plugin), never copied through the engine.
  The ONNX export of each shape profile is checked against onnxruntime on CPU.
- Optimization profiles are fixed at build time: one for decode (T = rows in
  1..max_num_seqs, opt at max_num_seqs) and one for prefill/mixed steps (T in
  1..max_num_batched_tokens); the scheduler's limits must lie within them, so the engine
  config is part of the cache key. Decode steps may be captured as CUDA graphs per batch
  size bucket.
- Engine cache on disk: <cache_dir>/<key>.plan with key = sha256 of (config.json, the
  safetensors files' headers and sizes, dtype, the profiles and scheduler limits) +
  TensorRT version + GPU name and compute capability. A missing plan is built once (slow)
  and written atomically (temp file + rename); a plan for another GPU or TensorRT version
  is never loaded.
- fp16/bf16 only; logits are float32 for the shared sampler.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from modelgw.runtimes.errors import ModelLoadError
from modelgw.runtimes.llm.checkpoint import Checkpoint
from modelgw.runtimes.llm.kv_cache import BlockPool, KVCache, blocks_for_budget
from modelgw.runtimes.llm.model import Decoder
from modelgw.runtimes.llm.runner import ModelRunner
from modelgw.runtimes.llm.sampling import SamplingParams
from modelgw.runtimes.llm.scheduler import Scheduler, SchedulerConfig
from modelgw.runtimes.llm.sequence import RequestOutput, Sequence

__all__ = ["ENGINES", "Engine", "EngineConfig", "EngineFigures", "GenerationRequest", "RequestOutput",
           "TorchEngine", "create_engine"]

log = logging.getLogger(__name__)

ENGINES = ("torch", "tensorrt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True)
class EngineFigures:
    waiting: int
    running: int
    kv_cache_usage: float     # 0..1 of the cache blocks held


@dataclass(frozen=True)
class EngineConfig:
    engine: str = "torch"
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                    # auto | float32 | bfloat16 | float16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None       # default: the model's max_position_embeddings
    block_size: int = 16
    kv_cache_bytes: int | None = None      # default: room for max_num_seqs full-length sequences, at most 1 GiB
    max_waiting: int = 1024


class Engine(ABC):
    """What the runtime drives. Not thread-safe: one thread calls everything but figures()."""

    max_model_len: int

    @abstractmethod
    def add_request(self, request: GenerationRequest) -> None:
        """Queue a request; ValueError if it can never run (e.g. beyond the cache), QueueFull."""

    @abstractmethod
    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request, free its cache; its final output (None if unknown or done)."""

    @abstractmethod
    def abort_all(self, reason: str = "cancelled") -> list[RequestOutput]:
        """Cancel every request (after an error, or at shutdown)."""

    @abstractmethod
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step."""

    @abstractmethod
    def has_unfinished(self) -> bool: ...

    @abstractmethod
    def figures(self) -> EngineFigures: ...

    def close(self) -> None:  # noqa: B027 - a hook with a default: an engine holding nothing needs no close
        """Release the model and the cache."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"device '{device}': {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' asked for, but no CUDA GPU is available")
    if resolved.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device '{device}' is not supported; use cpu or cuda")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype '{dtype}' is not supported; use one of auto, {', '.join(DTYPES)}")
    if dtype == "float16" and device.type == "cpu":
        raise ModelLoadError("float16 on CPU is not supported; use bfloat16 or float32")
    return DTYPES[dtype]


class TorchEngine(Engine):
    """The Llama-family decoder in PyTorch, CPU or GPU."""

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig = EngineConfig()) -> None:
        model_config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.eos_token_ids = checkpoint.eos_token_ids
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        max_model_len = config.max_model_len or model_config.max_position_embeddings
        if model_config.sliding_window:
            max_model_len = min(max_model_len, model_config.sliding_window)
        if config.block_size < 1:
            raise ModelLoadError(f"block_size must be >= 1, got {config.block_size}")
        per_token = model_config.kv_bytes_per_token * torch.empty((), dtype=dtype).element_size()
        budget = config.kv_cache_bytes
        if budget is None:
            budget = min(config.max_num_seqs * max_model_len * per_token, 1 << 30)
        num_blocks = blocks_for_budget(budget, config.block_size, model_config.kv_bytes_per_token, dtype)
        if num_blocks < 1:
            raise ModelLoadError(
                f"a KV cache of {budget} bytes holds no block of {config.block_size} tokens "
                f"({per_token} bytes per token); give more memory"
            )
        capacity = num_blocks * config.block_size
        if capacity < max_model_len:
            log.warning("the KV cache holds %d tokens: max_model_len lowered from %d to fit", capacity, max_model_len)
            max_model_len = capacity
        self.max_model_len = max_model_len
        scheduler_config = SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting)
        try:
            scheduler_config.check()
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        self.model = Decoder.from_weights(model_config, checkpoint.load_weights(), max_len=max_model_len,
                                          device=device, dtype=dtype)
        self.pool = BlockPool(num_blocks, config.block_size)
        self.cache = KVCache(model_config.num_layers, num_blocks, config.block_size, model_config.num_kv_heads,
                             model_config.head_dim, dtype, device)
        self.scheduler = Scheduler(scheduler_config, self.pool)
        self.runner = ModelRunner(self.model, self.cache)
        self.device, self.dtype = device, dtype
        log.info("torch engine: %s %s, %d layers, KV cache %d blocks x %d tokens (%.1f MiB), max_model_len %d",
                 device, str(dtype).removeprefix("torch."), model_config.num_layers, num_blocks, config.block_size,
                 self.cache.nbytes / 2**20, max_model_len)

    # -- requests

    def add_request(self, request: GenerationRequest) -> None:
        seq = Sequence(request.request_id, request.prompt_ids, request.params, self.tokenizer, self.eos_token_ids)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        return self.scheduler.abort(request_id)

    def abort_all(self, reason: str = "cancelled") -> list[RequestOutput]:
        return self.scheduler.abort_all(reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def figures(self) -> EngineFigures:
        return EngineFigures(self.scheduler.num_waiting, self.scheduler.num_running, self.pool.usage)

    # -- the step

    def step(self) -> list[RequestOutput]:
        step = self.scheduler.schedule()
        result = self.runner.execute(step)  # an empty step too: the runner forgets requests that left
        return self.scheduler.update_from_output(step, result)

    def close(self) -> None:
        self.abort_all()
        self.runner.close()
        del self.cache, self.model, self.runner


def create_engine(checkpoint: Checkpoint, config: EngineConfig) -> Engine:
    if config.engine == "torch":
        return TorchEngine(checkpoint, config)
    if config.engine == "tensorrt":
        raise ModelLoadError(
            "the tensorrt engine is designed (see modelgw.runtimes.llm.engine) but not built yet: "
            "it needs an NVIDIA GPU with TensorRT; use engine=torch"
        )
    raise ModelLoadError(f"unknown LLM engine '{config.engine}'; engines: {', '.join(ENGINES)}")
