"""engine=auto and the engine checks (issue 12, item 4): what `choose_engine` picks for a
platform (injected: no GPU or TensorRT exists here), the refusals naming what is missing,
and the choice with its reason in the log, the runtime's model status, the endpoint record
and `modelgw get endpoints`."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.cli import _endpoint_row
from modelgw.runtimes.errors import ModelLoadError
from modelgw.runtimes.llm.checkpoint import Checkpoint
from modelgw.runtimes.llm.engine import (
    EngineConfig,
    Platform,
    TorchEngine,
    choose_engine,
    create_engine,
    detect_platform,
)
from modelgw.runtimes.llm.make_checkpoint import make_checkpoint
from modelgw.runtimes.registration import EndpointRegistration
from modelgw.runtimes.repository import ModelRepository

NO_TRT = "import tensorrt failed: No module named 'tensorrt'"
NOTHING = Platform(gpu_name=None, tensorrt_version=None, tensorrt_missing=NO_TRT)
GPU_ONLY = Platform(gpu_name="NVIDIA H200", tensorrt_version=None, tensorrt_missing=NO_TRT)
GPU_AND_TRT = Platform(gpu_name="NVIDIA H200", tensorrt_version="10.15.1")
TRT_NO_GPU = Platform(gpu_name=None, tensorrt_version="10.15.1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), layers=1, hidden=32, heads=2, kv_heads=1, vocab=300)


def test_auto_is_the_default() -> None:
    assert EngineConfig().engine == "auto"


@pytest.mark.parametrize(("platform", "engine", "device", "reason"), [
    (NOTHING, "torch", "cpu", "no CUDA GPU"),
    (GPU_ONLY, "torch", "cuda", "GPU NVIDIA H200 but no TensorRT (import tensorrt failed: No module named 'tensorrt')"),
    (GPU_AND_TRT, "tensorrt", "cuda", "GPU NVIDIA H200 and TensorRT 10.15.1 present"),
    (TRT_NO_GPU, "torch", "cpu", "no CUDA GPU"),
])
def test_auto_prefers_tensorrt_then_torch_on_cuda_then_torch_on_cpu(platform, engine, device, reason) -> None:
    choice = choose_engine(EngineConfig(), platform)
    assert (choice.engine, choice.device) == (engine, device)
    assert reason in choice.reason
    assert choice.describe().startswith(f"engine {engine} on {device}: auto")


def test_auto_keeps_to_the_device_asked() -> None:
    assert choose_engine(EngineConfig(device="cpu"), GPU_AND_TRT).engine == "torch"
    assert choose_engine(EngineConfig(device="cpu"), GPU_AND_TRT).device == "cpu"
    assert choose_engine(EngineConfig(device="cuda:1"), GPU_ONLY).device == "cuda:1"
    with pytest.raises(ModelLoadError, match="device 'cuda' asked for, but no CUDA GPU"):
        choose_engine(EngineConfig(device="cuda"), NOTHING)


def test_tensorrt_without_tensorrt_or_gpu_names_what_is_missing_and_how_to_get_it() -> None:
    with pytest.raises(ModelLoadError) as both:
        choose_engine(EngineConfig(engine="tensorrt"), NOTHING)
    message = str(both.value)
    assert "engine=tensorrt" in message and "an NVIDIA GPU" in message
    assert "No module named 'tensorrt'" in message and "pip install --upgrade tensorrt" in message
    with pytest.raises(ModelLoadError) as no_trt:
        choose_engine(EngineConfig(engine="tensorrt"), GPU_ONLY)
    assert "TensorRT" in str(no_trt.value) and "NVIDIA GPU:" not in str(no_trt.value)
    with pytest.raises(ModelLoadError) as no_gpu:
        choose_engine(EngineConfig(engine="tensorrt"), TRT_NO_GPU)
    assert "an NVIDIA GPU" in str(no_gpu.value) and "pip install" not in str(no_gpu.value)
    with pytest.raises(ModelLoadError, match="device=cpu was asked"):
        choose_engine(EngineConfig(engine="tensorrt", device="cpu"), GPU_AND_TRT)
    choice = choose_engine(EngineConfig(engine="tensorrt"), GPU_AND_TRT)
    assert (choice.engine, choice.device) == ("tensorrt", "cuda")


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(ModelLoadError, match="unknown LLM engine 'vllm'; engines: auto, torch, tensorrt"):
        choose_engine(EngineConfig(engine="vllm"), NOTHING)


def test_tensorrt_at_load_on_this_machine_names_what_is_missing(checkpoint: Path) -> None:
    platform = detect_platform()
    if platform.gpu_name is not None and platform.tensorrt_version is not None:
        pytest.skip("this machine has a GPU and TensorRT")
    with pytest.raises(ModelLoadError, match="engine=tensorrt cannot load: it needs"):
        create_engine(Checkpoint.open(checkpoint), EngineConfig(engine="tensorrt"))


def test_create_engine_logs_the_choice_and_the_engine_carries_it(checkpoint: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="modelgw.runtimes.llm.engine"):
        engine = create_engine(Checkpoint.open(checkpoint), EngineConfig(kv_cache_bytes=1 << 20), NOTHING)
    try:
        assert isinstance(engine, TorchEngine) and engine.device == torch.device("cpu")
        assert engine.choice is not None and engine.choice.describe() == "engine torch on cpu: auto: no CUDA GPU"
        assert "engine torch on cpu: auto: no CUDA GPU" in caplog.text
    finally:
        engine.close()


def test_the_choice_reaches_the_endpoint_record_and_get_endpoints(checkpoint: Path) -> None:
    async def main() -> rpb.Endpoint:
        repository = ModelRepository("llm")
        try:
            served = await repository.load("tiny", "1", str(checkpoint), {"kv_cache_mb": "1"})
            assert served.metadata.platform == "llm_torch"
            server = SimpleNamespace(repository=repository, ready=True, address="127.0.0.1:1")
            registration = EndpointRegistration(None, server, runtime="llm", instance="i0")
            return registration.endpoint()
        finally:
            await repository.close()

    endpoint = asyncio.run(main())
    [model] = endpoint.models
    assert model.state == rpb.LoadedModel.READY
    # on this machine: no CUDA GPU (the CI has none either); a GPU machine says which engine it took
    expected = detect_platform()
    assert model.message.startswith("engine torch on cpu: auto:" if expected.gpu_name is None else "engine ")
    row = _endpoint_row(endpoint)
    assert row[-1] == f"tiny:1 {model.message}"
