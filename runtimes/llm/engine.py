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

The `tensorrt` engine: runtimes/llm/tensorrt_engine.py (TensorRTEngine = this engine with
a TensorRTRunner over onnx_export's step graph; optimization profiles, the plan cache and
its refusal of foreign plans are described and unit-tested there; its TensorRT parts have
not run yet: no GPU or TensorRT on our machines).

Which engine: `create_engine(checkpoint, config)` asks `choose_engine(config, platform)`,
with the platform (a CUDA GPU? TensorRT importable?) from `detect_platform()` or given by
a test. engine=auto (the default) takes tensorrt where a GPU and TensorRT are present,
else torch on CUDA, else torch on CPU; the EngineChoice (engine, device, reason) is
logged, kept on the engine (`engine.choice`), and the runtime publishes it as the model's
message in its endpoint record. A named engine whose needs are missing fails at load
saying what is missing and how to get it. quantization=int8 (quantization.py) is the torch
engine's on CPU only; any other combination is refused at load.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch

from modelgw.runtimes.errors import ModelLoadError
from modelgw.runtimes.llm.checkpoint import Checkpoint
from modelgw.runtimes.llm.kv_cache import BlockPool, KVCache, blocks_for_budget
from modelgw.runtimes.llm.model import Decoder
from modelgw.runtimes.llm.quantization import int8_supported
from modelgw.runtimes.llm.runner import ModelRunner
from modelgw.runtimes.llm.sampling import SamplingParams
from modelgw.runtimes.llm.scheduler import Scheduler, SchedulerConfig
from modelgw.runtimes.llm.sequence import RequestOutput, Sequence

__all__ = ["ENGINES", "QUANTIZATIONS", "Engine", "EngineChoice", "EngineConfig", "EngineFigures",
           "GenerationRequest", "Platform", "RequestOutput", "TorchEngine", "choose_engine", "create_engine",
           "detect_platform"]

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "tensorrt", "onnxruntime")
QUANTIZATIONS = ("none", "int8")
TENSORRT_HOW_TO_GET = ("install it on a machine with an NVIDIA GPU and driver: `python -m pip install --upgrade "
                       "tensorrt` (CUDA 13; `tensorrt-cu12` for CUDA 12; the wheels come from NVIDIA's index, "
                       "pypi.nvidia.com)")
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
    engine: str = "auto"                   # auto | torch | tensorrt | onnxruntime (choose_engine)
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                    # auto | float32 | bfloat16 | float16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None       # default: the model's max_position_embeddings
    block_size: int = 16
    kv_cache_bytes: int | None = None      # default: room for max_num_seqs full-length sequences, at most 1 GiB
    max_waiting: int = 1024
    quantization: str = "none"             # none | int8 (weight-only, torch engine on CPU)


@dataclass(frozen=True)
class Platform:
    """What engine=auto looks at. `detect_platform()` reads this machine's; tests pass their own."""

    gpu_name: str | None                  # the first CUDA GPU's name; None: no CUDA GPU torch can use
    tensorrt_version: str | None          # None: `import tensorrt` failed
    tensorrt_missing: str = ""            # why it failed (the import error)


def detect_platform() -> Platform:
    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        import tensorrt  # type: ignore[import-not-found, unused-ignore]
    except Exception as exc:  # ImportError, or OSError from libraries the bindings cannot load
        return Platform(gpu_name, None, f"import tensorrt failed: {type(exc).__name__}: {exc}")
    return Platform(gpu_name, str(tensorrt.__version__))


@dataclass(frozen=True)
class EngineChoice:
    """The engine and device an EngineConfig resolves to, and why (logged; in the endpoint record)."""

    engine: str                           # torch | tensorrt | onnxruntime
    device: str                           # cpu | cuda | cuda:N
    reason: str

    def describe(self) -> str:
        return f"engine {self.engine} on {self.device}: {self.reason}"


def choose_engine(config: EngineConfig, platform: Platform) -> EngineChoice:
    """engine=auto: tensorrt where a GPU and TensorRT are present, else torch on CUDA, else
    torch on CPU. A named engine is checked against the platform: ModelLoadError naming what
    is missing (and how to get it) or which options cannot go together."""
    engine, device, quantization = config.engine, config.device, config.quantization
    if engine not in ENGINES:
        raise ModelLoadError(f"unknown LLM engine '{engine}'; engines: {', '.join(ENGINES)}")
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"quantization '{quantization}' is not supported; use one of {', '.join(QUANTIZATIONS)}")
    gpu = platform.gpu_name
    wants_cpu = device == "cpu"
    if engine == "auto":
        if wants_cpu:
            choice = EngineChoice("torch", "cpu", "auto: device=cpu asked")
        elif quantization == "int8":
            if device != "auto" or gpu is not None:
                raise ModelLoadError(
                    f"quantization=int8 runs on the torch engine on CPU only, and this would run on a GPU "
                    f"({gpu or device}); set device=cpu, or drop quantization"
                )
            choice = EngineChoice("torch", "cpu", "auto: no CUDA GPU (quantization=int8: torch on CPU)")
        elif gpu is None:
            if device != "auto":
                raise ModelLoadError(f"device '{device}' asked for, but no CUDA GPU is available")
            choice = EngineChoice("torch", "cpu", "auto: no CUDA GPU")
        elif platform.tensorrt_version is not None:
            choice = EngineChoice("tensorrt", _cuda(device),
                                  f"auto: GPU {gpu} and TensorRT {platform.tensorrt_version} present")
        else:
            choice = EngineChoice("torch", _cuda(device),
                                  f"auto: GPU {gpu} but no TensorRT ({platform.tensorrt_missing or 'not installed'})")
    elif engine == "tensorrt":
        missing = []
        if wants_cpu:
            missing.append("a GPU: device=cpu was asked (TensorRT runs on NVIDIA GPUs only)")
        elif gpu is None:
            missing.append("an NVIDIA GPU: torch sees no CUDA device (torch.cuda.is_available() is False)")
        if platform.tensorrt_version is None:
            missing.append(f"TensorRT ({platform.tensorrt_missing or 'not installed'}); {TENSORRT_HOW_TO_GET}")
        if missing:
            raise ModelLoadError(f"engine=tensorrt cannot load: it needs {'; and '.join(missing)}. "
                                 "engine=torch (or auto) runs without them")
        choice = EngineChoice("tensorrt", _cuda(device), f"engine=tensorrt asked; TensorRT {platform.tensorrt_version}")
    else:
        resolved = "cpu" if wants_cpu or (device == "auto" and gpu is None) else device
        if resolved != "cpu" and gpu is None:
            raise ModelLoadError(f"device '{device}' asked for, but no CUDA GPU is available")
        choice = EngineChoice(engine, _cuda(resolved) if resolved != "cpu" else "cpu", f"engine={engine} asked")
    if quantization == "int8" and (choice.engine != "torch" or choice.device != "cpu"):
        raise ModelLoadError(
            f"quantization=int8 is built for the torch engine on CPU only, not {choice.engine} on {choice.device}; "
            "use engine=torch with device=cpu, or drop quantization"
        )
    return choice


def _cuda(device: str) -> str:
    return "cuda" if device == "auto" else device


class Engine(ABC):
    """What the runtime drives. Not thread-safe: one thread calls everything but figures()."""

    max_model_len: int
    choice: EngineChoice | None = None    # set by create_engine

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
        if config.quantization == "int8":
            if device.type != "cpu":
                raise ModelLoadError(f"quantization=int8 is built for the CPU only, not {device}; use device=cpu")
            unsupported = int8_supported()
            if unsupported:
                raise ModelLoadError(f"quantization=int8: {unsupported}")
        self.model = Decoder.from_weights(model_config, checkpoint.load_weights(), max_len=max_model_len,
                                          device=device, dtype=dtype, quantization=config.quantization)
        self.pool = BlockPool(num_blocks, config.block_size)
        self.cache = KVCache(model_config.num_layers, num_blocks, config.block_size, model_config.num_kv_heads,
                             model_config.head_dim, dtype, device)
        self.scheduler = Scheduler(scheduler_config, self.pool)
        self.runner = ModelRunner(self.model, self.cache)
        self.device, self.dtype = device, dtype
        log.info("torch engine: %s %s%s, %d layers, KV cache %d blocks x %d tokens (%.1f MiB), max_model_len %d",
                 device, str(dtype).removeprefix("torch."),
                 " int8 weights" if config.quantization == "int8" else "", model_config.num_layers, num_blocks, config.block_size,
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


def create_engine(checkpoint: Checkpoint, config: EngineConfig, platform: Platform | None = None) -> Engine:
    """The engine `choose_engine` picks for this config on this platform (detected when None)."""
    choice = choose_engine(config, platform or detect_platform())
    log.info("LLM %s", choice.describe())
    resolved = replace(config, engine=choice.engine, device=choice.device)
    engine: Engine
    if choice.engine == "torch":
        engine = TorchEngine(checkpoint, resolved)
    elif choice.engine == "tensorrt":
        from modelgw.runtimes.llm.tensorrt_engine import TensorRTEngine  # imports this module

        engine = TensorRTEngine(checkpoint, resolved)
    elif choice.engine == "onnxruntime":
        from modelgw.runtimes.llm.ort_runner import OnnxRuntimeEngine  # imports this module

        engine = OnnxRuntimeEngine(checkpoint, resolved)
    else:
        raise ModelLoadError(f"the {choice.engine} engine is not built yet; use engine=torch")
    engine.choice = choice
    return engine
