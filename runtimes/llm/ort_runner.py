"""The `onnxruntime` engine: the exported step graph (onnx_export.py) run by onnxruntime.

    engine = create_engine(checkpoint, EngineConfig(engine="onnxruntime", device="cpu"))

Everything but the forward pass is the torch engine's: the scheduler, the block pool, the
sampler, the detokenizer, the request bookkeeping of ModelRunner. OnnxRuntimeRunner
overrides only `forward`: it feeds the step's index tensors (`graph_inputs`) and the KV
cache to the graph, and the graph's updated cache becomes the engine's KVCache tensors, so
the pool the scheduler allocates from is the one the graph reads and writes.

The graph returns the whole cache as outputs (ONNX has no in-place update), so a step
writes a full copy of it. With IO binding those outputs go into a second, preallocated
pair of cache arrays, and the two pairs swap roles each step: no cache-sized allocation
(and page faults) per step, and the input arrays are read without a copy. This holds two
caches, which is what onnxruntime's freshly allocated outputs cost at every step's peak
before.

The graph is exported from the checkpoint at load (fp32; seconds for small models) into a
temporary file that lives only until onnxruntime has read it. fp32 only. Providers:
CPUExecutionProvider, or CUDAExecutionProvider first for device=cuda where that onnxruntime
build has it (the cache then travels host <-> device each step: correct, not fast).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelgw.runtimes.errors import ModelLoadError
from modelgw.runtimes.llm.checkpoint import Checkpoint
from modelgw.runtimes.llm.engine import EngineConfig, TorchEngine
from modelgw.runtimes.llm.kv_cache import KVCache
from modelgw.runtimes.llm.onnx_export import export_decoder, graph_inputs
from modelgw.runtimes.llm.runner import StepRunner
from modelgw.runtimes.llm.scheduler import ScheduledStep

log = logging.getLogger(__name__)


class OnnxRuntimeRunner(StepRunner):
    """A runner whose forward pass is an onnxruntime session of the step graph."""

    def __init__(self, session: Any, cache: KVCache) -> None:
        if cache.keys.dtype != torch.float32 or cache.keys.device.type != "cpu":
            raise ModelLoadError(f"the onnxruntime runner needs a float32 CPU KV cache, got "
                                 f"{cache.keys.dtype} on {cache.keys.device}")
        super().__init__(cache.block_size, torch.device("cpu"))
        self.session = session
        self.cache = cache
        # where the next step's updated cache goes; swapped with the cache after each step
        self._spare = (np.empty(tuple(cache.keys.shape), np.float32), np.empty(tuple(cache.values.shape), np.float32))

    def forward(self, step: ScheduledStep) -> torch.Tensor:
        feed: dict[str, np.ndarray] = graph_inputs(step, self.block_ids(step), self.block_size)
        keys, values = self.cache.keys.numpy(), self.cache.values.numpy()
        feed["key_cache"], feed["value_cache"] = keys, values
        out_keys, out_values = self._spare
        binding = self.session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output("logits", "cpu")  # first: get_outputs() lists outputs in the order bound
        for name, array in (("key_cache_out", out_keys), ("value_cache_out", out_values)):
            binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()  # only the logits are copied out
        self.cache.keys, self.cache.values = torch.from_numpy(out_keys), torch.from_numpy(out_values)
        self._spare = (keys, values)
        return torch.from_numpy(logits)

    def close(self) -> None:
        super().close()
        self.session = None
        self._spare = (np.empty(0, np.float32), np.empty(0, np.float32))


def _session(path: Path, device: torch.device) -> Any:
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelLoadError(
                f"engine=onnxruntime on {device}: this onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                "(providers: " + ", ".join(ort.get_available_providers()) + "); install onnxruntime-gpu, "
                "or use device=cpu"
            )
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the engine thread's budget, as torch's
    return ort.InferenceSession(str(path), options, providers=providers)


class OnnxRuntimeEngine(TorchEngine):
    """TorchEngine with the forward pass run by onnxruntime from the exported step graph."""

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError(f"engine=onnxruntime needs the onnxruntime package ({exc}); "
                                 "pip install onnxruntime") from None
        if config.dtype not in ("auto", "float32"):
            raise ModelLoadError(f"engine=onnxruntime runs the graph in float32 only, not dtype={config.dtype}; "
                                 "use dtype=float32 (or auto), or engine=torch")
        if config.quantization != "none":
            raise ModelLoadError(f"engine=onnxruntime has no quantization={config.quantization}; "
                                 "use engine=torch with device=cpu for int8 weights")
        device = torch.device(config.device if config.device != "auto" else "cpu")
        # the torch engine's setup (limits, cache budget, scheduler) on the CPU in float32:
        # the graph is exported from its Decoder, and its KVCache is the graph's cache
        super().__init__(checkpoint, replace(config, device="cpu", dtype="float32"))
        with tempfile.TemporaryDirectory(prefix="modelgw-onnx-") as directory:
            path = export_decoder(self.model, Path(directory) / "step.onnx", block_size=self.cache.block_size)
            session = _session(path, device)  # the session holds the graph: the file may go
        del self.model  # the session has its own copy of the weights
        self.runner = OnnxRuntimeRunner(session, self.cache)
        log.info("onnxruntime engine: providers %s", ", ".join(session.get_providers()))

    def close(self) -> None:
        self.abort_all()
        self.runner.close()
        del self.cache, self.runner
