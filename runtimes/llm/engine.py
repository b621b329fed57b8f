"""The engine interface, and the `torch` engine.

An Engine is synchronous and single-threaded; whoever drives it (AsyncEngine: a
background thread) calls, between steps:

    engine.add_request(GenerationRequest("r1", prompt_ids, SamplingParams(max_tokens=32)))
    outputs = engine.step()             # one batched forward pass; RequestOutputs of this step
    engine.abort("r1")                  # cancel: frees the request's cache at once
    engine.figures()                    # waiting, running, KV-cache use (any thread may read)

A RequestOutput carries what a request gained in this step: a text delta (never part of a
stop string), the new token ids (and their logprobs when asked), and on the last one
finished=True with the finish reason ("stop" | "length" | "cancelled") and token counts.
A step that produced a token but no text yet (an incomplete character, or the possible
start of a stop string) gives no output for that request; its tokens come with the next.

TorchEngine = Scheduler (who runs) + ModelRunner (tensors, cache, forward) + Sampler
(next tokens) + TextStream per sequence (detokenization, stop strings). Only the runner
touches the model.

The `tensorrt` engine (design, not built: no GPU here)
-----------------------------------------------------
It reuses everything above except the ModelRunner: scheduling, the block pool, sampling
and detokenization are engine-independent, and a `TensorRTRunner.execute(step) -> logits`
takes the same ScheduledStep.

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
- fp16/bf16 only; logits come back as float32 for the shared sampler.
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
from modelgw.runtimes.llm.sampling import Sampler, SamplingParams
from modelgw.runtimes.llm.scheduler import Scheduler, SchedulerConfig
from modelgw.runtimes.llm.sequence import Sequence, Status

log = logging.getLogger(__name__)

ENGINES = ("torch", "tensorrt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams


@dataclass
class RequestOutput:
    request_id: str
    text: str                                        # delta since the previous output
    token_ids: list[int]                             # tokens since the previous output
    logprobs: list[float] | None = None              # theirs, when asked
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finished: bool = False
    finish_reason: str | None = None                 # "stop" | "length" | "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0


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

    def close(self) -> None:
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
        self.sampler = Sampler()
        self.device, self.dtype = device, dtype
        log.info("torch engine: %s %s, %d layers, KV cache %d blocks x %d tokens (%.1f MiB), max_model_len %d",
                 device, str(dtype).removeprefix("torch."), model_config.num_layers, num_blocks, config.block_size,
                 self.cache.nbytes / 2**20, max_model_len)

    # -- requests

    def add_request(self, request: GenerationRequest) -> None:
        seq = Sequence(request.request_id, request.prompt_ids, request.params, self.tokenizer, self.eos_token_ids)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.scheduler.abort(request_id)
        return None if seq is None else self._output(seq, final_text=False)

    def abort_all(self, reason: str = "cancelled") -> list[RequestOutput]:
        outputs = []
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.finish(seq, reason)
            outputs.append(self._output(seq, final_text=False))
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def figures(self) -> EngineFigures:
        return EngineFigures(self.scheduler.num_waiting, self.scheduler.num_running, self.pool.usage)

    # -- the step

    def step(self) -> list[RequestOutput]:
        step = self.scheduler.schedule()
        if step.empty:
            return []
        sampling = step.sampling
        logits = self.runner.execute(step)
        if not sampling:
            return []
        result = self.sampler.sample(logits, [s.params for s in sampling], [s.generator for s in sampling])
        outputs = []
        for i, seq in enumerate(sampling):
            token = result.token_ids[i]
            seq.output_ids.append(token)
            seq.pending_ids.append(token)
            if result.logprobs[i] is not None:
                seq.pending_logprobs.append(result.logprobs[i])
                seq.pending_top.append(result.top_logprobs[i])
            reason = None
            if token in seq.stop_ids:
                reason = "stop"  # eos / stop token: not part of the text
            else:
                seq.text.add(token)
                if seq.text.stopped:
                    reason = "stop"
                elif len(seq.output_ids) >= seq.params.max_tokens:
                    reason = "length"
            if reason is not None:
                self.scheduler.finish(seq, reason)
            output = self._output(seq)
            if output is not None:
                outputs.append(output)
        return outputs

    def _output(self, seq: Sequence, final_text: bool = True) -> RequestOutput | None:
        finished = seq.status is Status.FINISHED
        text = seq.text.take(final=finished) if final_text or not finished else ""
        if not text and not finished:
            return None  # nothing to show yet: the tokens travel with the next output
        asked = seq.params.logprobs > 0
        output = RequestOutput(
            request_id=seq.request_id,
            text=text,
            token_ids=seq.pending_ids,
            logprobs=seq.pending_logprobs if asked else None,
            top_logprobs=seq.pending_top if asked else None,
            finished=finished,
            finish_reason=seq.finish_reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
        )
        seq.pending_ids, seq.pending_logprobs, seq.pending_top = [], [], []
        return output

    def close(self) -> None:
        self.abort_all()
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
