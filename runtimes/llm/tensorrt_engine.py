"""The `tensorrt` LLM engine: X1's ONNX step graph built into a TensorRT 10.x plan, cached on disk.

    profiles = plan_profiles(scheduler_config, max_model_len, num_layers=..., num_blocks=..., ...)
    key = cache_key(model_fingerprint(checkpoint.directory), "bfloat16", profiles, scheduler_config,
                    BuildTarget.current())
    plan = PlanCache(cache_dir).load(key, target)      # None: not built; ForeignPlanError: refused
    engine = TensorRTEngine(checkpoint, EngineConfig(engine="tensorrt", device="cuda"), cache_dir=...)

What is pure (profile planning, the cache key, atomic plan writes, the refusal of a foreign
plan) runs and is tested on CPU; `tensorrt` is imported lazily, only by the build and the
runner, so this module imports without it (`tensorrt_missing()` says what is absent).

The graph (runtimes/llm/onnx_export.py, INPUT_NAMES / OUTPUT_NAMES) takes one scheduler step,
flattened: input_ids, positions, slot_mapping [T]; block_tables [T, W] (each token's
sequence's blocks); logits_index [S]; key_cache / value_cache [layers, blocks, block_size,
kv_heads, head_dim]; it returns logits [S, vocab] and key_cache_out / value_cache_out.

Two optimization profiles cover the scheduler's limits (a step outside them cannot be
scheduled, so none can miss): `decode` (T = S = rows 1..max_num_seqs, tuned at a full batch)
and `mixed` (prefill chunks + decodes: T 1..max_num_batched_tokens, S 1..max_num_seqs). W runs
1..ceil(max_model_len / block_size); the cache shape is fixed (the runner's own buffers).

Plans are cached at <cache_dir>/<key>.plan, key = sha256 over the model fingerprint
(config.json, each safetensors file's header and size), dtype, profiles, scheduler limits,
TensorRT version, GPU name and compute capability. A sidecar <key>.json records the
version/GPU it was built for and is checked before a plan is deserialized: a plan without
one, or for another GPU or TensorRT version, is refused (ForeignPlanError), never loaded.
Both files are written to a temp file and os.replace'd; the sidecar last, so a plan without
a sidecar is an interrupted write.

The KV cache: the runner owns two device buffer pairs and binds them by address; X1's graph
writes the updated cache as a separate output (ONNX has no in-place update), so the pairs
swap roles every step (no host copy, but the engine writes the whole cache each step).
Replacing the graph's scatter + attention with IKVCacheUpdateLayer / IAttention (TensorRT
10.15+) makes the update in place; not done: it needs a GPU to verify.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from modelgw.runtimes.errors import ModelLoadError
from modelgw.runtimes.llm.checkpoint import Checkpoint
from modelgw.runtimes.llm.engine import TENSORRT_HOW_TO_GET, EngineConfig, TorchEngine
from modelgw.runtimes.llm.onnx_export import INPUT_NAMES, OUTPUT_NAMES
from modelgw.runtimes.llm.runner import StepRunner
from modelgw.runtimes.llm.scheduler import SchedulerConfig

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "BuildTarget", "ForeignPlanError", "PlanCache", "Profile", "ShapeRange",
           "TensorRTEngine", "TensorRTRunner", "build_plan", "cache_key", "model_fingerprint", "plan_profiles",
           "select_profile", "tensorrt_missing"]

log = logging.getLogger(__name__)



def tensorrt_missing() -> str | None:
    """None when TensorRT imports and a CUDA GPU is visible; else what is missing and how to get it."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"the tensorrt module does not import ({exc}); {TENSORRT_HOW_TO_GET}"
    import torch

    if not torch.cuda.is_available():
        return "TensorRT imports but torch sees no CUDA GPU; the tensorrt engine needs an NVIDIA GPU"
    return None


# -- optimization profiles


@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def holds(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max, strict=True))


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, ShapeRange]   # every graph input, by name

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: [list(v.min), list(v.opt), list(v.max)] for k, v in self.shapes.items()}}


def plan_profiles(limits: SchedulerConfig, max_model_len: int, *, num_layers: int, num_blocks: int, block_size: int,
                  num_kv_heads: int, head_dim: int) -> list[Profile]:
    """The `decode` and `mixed` profiles that cover every step the scheduler can make."""
    limits.check()  # ValueError naming max_num_seqs / max_num_batched_tokens
    if max_model_len < 1:
        raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
    if block_size < 1 or num_blocks < 1:
        raise ValueError(f"a KV cache needs at least one block of one token, got {num_blocks} x {block_size}")
    width = -(-max_model_len // block_size)  # blocks of the longest sequence
    cache = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
    fixed = ShapeRange(cache, cache, cache)
    seqs, tokens = limits.max_num_seqs, limits.max_num_batched_tokens

    def profile(name: str, max_tokens: int) -> Profile:
        flat = ShapeRange((1,), (max_tokens,), (max_tokens,))
        shapes = {"input_ids": flat, "positions": flat, "slot_mapping": flat,
                  "block_tables": ShapeRange((1, 1), (max_tokens, width), (max_tokens, width)),
                  "logits_index": ShapeRange((1,), (seqs,), (seqs,)),
                  "key_cache": fixed, "value_cache": fixed}
        missing = set(INPUT_NAMES) ^ set(shapes)
        if missing:  # the graph's inputs changed: the profiles must name each of them
            raise ValueError(f"the profile does not match the graph's inputs: {sorted(missing)}")
        return Profile(name, {n: shapes[n] for n in INPUT_NAMES})

    return [profile("decode", seqs), profile("mixed", tokens)]


def select_profile(profiles: list[Profile], shapes: dict[str, tuple[int, ...]]) -> int:
    """The index of the first (smallest) profile whose ranges hold these input shapes."""
    for index, profile in enumerate(profiles):
        if all(profile.shapes[name].holds(shape) for name, shape in shapes.items()):
            return index
    name, shape = next((n, s) for n, s in shapes.items() if not profiles[-1].shapes[n].holds(s))
    largest = profiles[-1].shapes[name]
    raise ValueError(f"input {name} of shape {shape} is in no optimization profile "
                     f"(largest: min {largest.min}, max {largest.max}); the scheduler's limits exceed the plan's")


# -- the engine cache


@dataclass(frozen=True)
class BuildTarget:
    """What a plan is only valid for."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]

    @classmethod
    def current(cls, device: int = 0) -> BuildTarget:
        import tensorrt as trt
        import torch

        props = torch.cuda.get_device_properties(device)
        return cls(trt.__version__, props.name, (props.major, props.minor))


class ForeignPlanError(Exception):
    """A cached plan that was built for another GPU or TensorRT version, or lacks its sidecar."""


def model_fingerprint(directory: str | Path) -> str:
    """sha256 of config.json and each safetensors file's name, size and header (the tensor
    names, shapes, dtypes and offsets: cheap to read, and a change of weights changes it
    unless the bytes change in place at equal size; then clear the cache)."""
    directory = Path(directory)
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as f:
            head = f.read(8)
            (length,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            header = f.read(min(length, 100 << 20))
        digest.update(f"{path.name}:{path.stat().st_size}:".encode())
        digest.update(header)
    return digest.hexdigest()


def cache_key(fingerprint: str, dtype: str, profiles: list[Profile], limits: SchedulerConfig, target: BuildTarget) -> str:
    record = {"model": fingerprint, "dtype": dtype, "profiles": [p.as_json() for p in profiles],
              "limits": asdict(limits), "target": asdict(target)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class PlanCache:
    """<directory>/<key>.plan + <key>.json (the sidecar: what the plan was built for)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def plan_path(self, key: str) -> Path:
        return self.directory / f"{key}.plan"

    def store(self, key: str, plan: bytes, target: BuildTarget) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.plan_path(key)
        _write_atomically(path, plan)
        sidecar = {"key": key, **asdict(target), "plan_bytes": len(plan)}
        _write_atomically(path.with_suffix(".json"), json.dumps(sidecar, indent=1).encode())
        return path

    def load(self, key: str, target: BuildTarget) -> bytes | None:
        """The plan's bytes; None when none is cached; ForeignPlanError when it is not for `target`."""
        path = self.plan_path(key)
        if not path.is_file():
            return None
        sidecar_path = path.with_suffix(".json")
        try:
            sidecar = json.loads(sidecar_path.read_text())
        except (OSError, ValueError) as exc:
            raise ForeignPlanError(f"{path}: its sidecar {sidecar_path.name} is missing or unreadable ({exc}); "
                                   "the plan may be from an interrupted write: delete it to rebuild") from None
        built_for = {"tensorrt_version": sidecar.get("tensorrt_version"), "gpu_name": sidecar.get("gpu_name"),
                     "compute_capability": tuple(sidecar.get("compute_capability") or ())}
        for field, wanted in asdict(target).items():
            wanted = tuple(wanted) if isinstance(wanted, list | tuple) else wanted
            if built_for[field] != wanted:
                raise ForeignPlanError(f"{path} was built for {field} {built_for[field]!r}, this is {wanted!r}; "
                                       "it is not loaded (delete it to rebuild)")
        data = path.read_bytes()
        if sidecar.get("plan_bytes") not in (None, len(data)):
            raise ForeignPlanError(f"{path}: {len(data)} bytes, its sidecar says {sidecar['plan_bytes']}; delete it")
        return data


# -- TensorRT: build and run (needs tensorrt and a GPU; tests marked `gpu`)


def _progress_monitor(trt: Any) -> Any:
    """An IProgressMonitor that logs each top-level phase and its steps (builds take minutes)."""

    class LogProgress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self._steps[phase_name] = num_steps
            if parent_phase is None:
                log.info("tensorrt build: %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            log.debug("tensorrt build: %s %d/%d", phase_name, step + 1, self._steps.get(phase_name, 0))
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            self._steps.pop(phase_name, None)

    return LogProgress()


def build_plan(onnx_path: str | Path, profiles: list[Profile], dtype: str, workspace_bytes: int = 4 << 30) -> bytes:
    """Parse the ONNX graph and build a serialized plan with these profiles, in fp16 or bf16."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    # the graph is fp32 (onnx_export); the cache travels in the build dtype, so its buffers are half the size
    trt_dtype = {"float16": trt.float16, "bfloat16": trt.bfloat16}.get(dtype)
    cache_tensors = [network.get_input(i) for i in range(network.num_inputs)
                     if network.get_input(i).name in ("key_cache", "value_cache")]
    cache_tensors += [network.get_output(i) for i in range(network.num_outputs)
                      if network.get_output(i).name in ("key_cache_out", "value_cache_out")]
    for tensor in cache_tensors:
        if trt_dtype is not None:
            tensor.dtype = trt_dtype
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    flags = {"float16": trt.BuilderFlag.FP16, "bfloat16": trt.BuilderFlag.BF16}
    if dtype not in flags:
        raise ValueError(f"dtype {dtype!r}: the tensorrt engine builds float16 or bfloat16")
    config.set_flag(flags[dtype])
    monitor = _progress_monitor(trt)
    config.progress_monitor = monitor  # must outlive the build: held in this frame
    for profile in profiles:
        optimization = builder.create_optimization_profile()
        for name, shape in profile.shapes.items():
            optimization.set_shape(name, shape.min, shape.opt, shape.max)
        config.add_optimization_profile(optimization)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build {onnx_path} (see the log above)")
    return bytes(serialized)


class TensorRTRunner(StepRunner):
    """A runner whose forward pass is a deserialized TensorRT engine of the step graph,
    on its own CUDA stream; the inputs are onnx_export's flat layout. The per-request
    bookkeeping and sampling are StepRunner's, as for every runner."""

    def __init__(self, plan: bytes, profiles: list[Profile], cache_shape: tuple[int, ...], block_size: int,
                 device: Any) -> None:
        import tensorrt as trt
        import torch

        super().__init__(block_size, torch.device(device))
        self._trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the plan")
        self.context = self.engine.create_execution_context()
        self.profiles = profiles
        self.stream = torch.cuda.Stream(device=self.device)
        self._profile = -1
        # two cache pairs: the graph reads one and writes the other (see the module doc)
        # every buffer in the dtype the plan declares for it (build_plan sets the cache's)
        self._input_dtypes = {name: self._torch_dtype(self.engine.get_tensor_dtype(name)) for name in INPUT_NAMES}
        self._logits_dtype = self._torch_dtype(self.engine.get_tensor_dtype("logits"))
        cache_dtype = self._input_dtypes["key_cache"]
        self.caches = [(torch.zeros(cache_shape, dtype=cache_dtype, device=self.device),
                        torch.zeros(cache_shape, dtype=cache_dtype, device=self.device)) for _ in range(2)]
        self._current = 0

    def _torch_dtype(self, trt_dtype: Any) -> Any:
        import torch

        trt = self._trt
        table = {trt.int64: torch.int64, trt.int32: torch.int32, trt.float32: torch.float32,
                 trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
        return table[trt_dtype]

    def flat_inputs(self, step: Any) -> dict[str, Any]:
        """The graph's index inputs for a step (onnx_export.graph_inputs: one row per token),
        as device tensors of the dtypes the plan expects."""
        import numpy as np
        import torch

        from modelgw.runtimes.llm.onnx_export import graph_inputs

        arrays = graph_inputs(step, self.block_ids(step), self.block_size)
        if not len(arrays["logits_index"]):  # a step of prompt chunks only: the profiles start at one logits row
            arrays["logits_index"] = np.zeros(1, dtype=np.int64)  # row 0's logits, unused
        dtypes = self._input_dtypes
        return {name: torch.from_numpy(array).to(device=self.device, dtype=dtypes[name]) for name, array in arrays.items()}

    def forward(self, step: Any) -> Any:
        import torch

        inputs = self.flat_inputs(step)
        shapes = {name: tuple(t.shape) for name, t in inputs.items()}
        profile = select_profile(self.profiles, shapes)
        stream = self.stream.cuda_stream
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, stream)
            self._profile = profile
        keys_in, values_in = self.caches[self._current]
        keys_out, values_out = self.caches[1 - self._current]
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in (("key_cache", keys_in), ("value_cache", values_in)):
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        rows = inputs["logits_index"].shape[0]
        vocab = self.engine.get_tensor_shape("logits")[-1]
        logits = torch.empty((rows, vocab), dtype=self._logits_dtype, device=self.device)
        self.context.set_tensor_address("logits", logits.data_ptr())
        self.context.set_tensor_address("key_cache_out", keys_out.data_ptr())
        self.context.set_tensor_address("value_cache_out", values_out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the inputs were made on the default stream
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the log)")
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self._current = 1 - self._current
        return logits.float()  # the shared sampler takes float32

    def close(self) -> None:
        super().close()
        del self.context, self.engine, self.caches


class TensorRTEngine(TorchEngine):
    """TorchEngine's scheduler, block pool, sampler and detokenizer, with a TensorRTRunner.

    Builds (or loads from `cache_dir`, default <checkpoint>/.tensorrt) the plan for this
    checkpoint, dtype, scheduler limits and GPU at construction; a build is logged phase
    by phase. The torch decoder is loaded first (its cache shape and max_model_len are the
    plan's), then dropped."""

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None,
                 cache_dir: str | Path | None = None) -> None:
        import torch

        from modelgw.runtimes.llm.onnx_export import export_onnx

        missing = tensorrt_missing()
        if missing:
            raise ModelLoadError(f"engine=tensorrt: {missing}")
        super().__init__(checkpoint, config or EngineConfig(engine="tensorrt"))
        dtype_name = str(self.dtype).removeprefix("torch.")
        if dtype_name not in ("float16", "bfloat16"):
            raise ModelLoadError(f"engine=tensorrt builds float16 or bfloat16, got dtype {dtype_name}")
        cache_shape = tuple(self.cache.keys.shape)
        layers, blocks, block_size, kv_heads, head_dim = cache_shape
        limits = self.scheduler.config
        profiles = plan_profiles(limits, self.max_model_len, num_layers=layers, num_blocks=blocks,
                                 block_size=block_size, num_kv_heads=kv_heads, head_dim=head_dim)
        target = BuildTarget.current(self.device.index or 0)
        key = cache_key(model_fingerprint(checkpoint.directory), dtype_name, profiles, limits, target)
        plans = PlanCache(cache_dir or Path(checkpoint.directory) / ".tensorrt")
        try:
            plan = plans.load(key, target)
        except ForeignPlanError as exc:
            raise ModelLoadError(str(exc)) from None
        if plan is None:
            with tempfile.TemporaryDirectory() as tmp:
                onnx_path = export_onnx(checkpoint, Path(tmp) / "step.onnx", max_len=self.max_model_len)
                log.info("tensorrt: building %s (this takes minutes)", plans.plan_path(key))
                plan = build_plan(onnx_path, profiles, dtype_name)
            plans.store(key, plan, target)
        trt_runner = TensorRTRunner(plan, profiles, cache_shape, block_size, self.device)
        self.runner.close()
        self.runner: Any = trt_runner
        del self.model, self.cache  # TensorRT holds its own weights and cache
        torch.cuda.empty_cache()

    def close(self) -> None:
        self.abort_all()
        self.runner.close()
        del self.runner
