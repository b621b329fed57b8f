"""The TensorRT engine's CPU-checkable parts: optimization profiles planned from the
scheduler's limits, the engine cache key, atomic plan writes, and the refusal of a plan
built for another GPU or TensorRT version (checked on the sidecar, before any
deserializing). What needs TensorRT and a GPU is marked `gpu` and skips with its reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from modelgw.runtimes.llm.scheduler import SchedulerConfig
from modelgw.runtimes.llm.tensorrt_engine import (
    INPUT_NAMES,
    BuildTarget,
    ForeignPlanError,
    PlanCache,
    ShapeRange,
    cache_key,
    model_fingerprint,
    plan_profiles,
    select_profile,
    tensorrt_missing,
)

LIMITS = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)
KV = dict(num_layers=2, num_blocks=40, block_size=16, num_kv_heads=2, head_dim=16)
TARGET = BuildTarget(tensorrt_version="10.15.1", gpu_name="NVIDIA H200", compute_capability=(9, 0))


def _profiles():
    return plan_profiles(LIMITS, max_model_len=512, **KV)


def test_profiles_cover_the_scheduler_limits():
    decode, mixed = _profiles()
    assert decode.name == "decode" and mixed.name == "mixed"
    # decode: one token per row, rows 1..max_num_seqs, tuned at a full batch
    assert decode.shapes["input_ids"] == ShapeRange((1,), (8,), (8,))
    assert decode.shapes["block_tables"] == ShapeRange((1, 1), (8, 32), (8, 32))  # a row per token; 512 / 16 blocks
    assert decode.shapes["logits_index"] == ShapeRange((1,), (8,), (8,))
    # prefill / mixed: tokens 1..max_num_batched_tokens, rows 1..max_num_seqs
    assert mixed.shapes["input_ids"] == ShapeRange((1,), (64,), (64,))
    assert mixed.shapes["block_tables"] == ShapeRange((1, 1), (64, 32), (64, 32))
    assert mixed.shapes["logits_index"] == ShapeRange((1,), (8,), (8,))  # one sampled row per sequence at most
    # the cache is one fixed shape in both: the runner's own buffers
    for profile in (decode, mixed):
        assert profile.shapes["key_cache"] == ShapeRange(*[(2, 40, 16, 2, 16)] * 3)
        assert set(profile.shapes) == set(INPUT_NAMES)
        for shape in profile.shapes.values():
            assert all(lo <= o <= hi for lo, o, hi in zip(shape.min, shape.opt, shape.max, strict=True))


def test_profiles_refuse_impossible_limits():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        plan_profiles(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4), max_model_len=64, **KV)
    with pytest.raises(ValueError, match="max_model_len"):
        plan_profiles(LIMITS, max_model_len=0, **KV)


def test_a_step_picks_the_smallest_profile_that_holds_it():
    profiles = _profiles()
    decode_shapes = {"input_ids": (5,), "block_tables": (5, 3), "logits_index": (5,)}
    assert select_profile(profiles, decode_shapes) == 0
    mixed_shapes = {"input_ids": (40,), "block_tables": (40, 3), "logits_index": (3,)}
    assert select_profile(profiles, mixed_shapes) == 1
    with pytest.raises(ValueError, match=r"input_ids.*\(65,\).*profile"):
        select_profile(profiles, {"input_ids": (65,)})


def test_cache_key_changes_with_every_part(tmp_path: Path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 64}')
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    fingerprint = model_fingerprint(model)
    profiles = _profiles()
    base = cache_key(fingerprint, "bfloat16", profiles, LIMITS, TARGET)
    assert base == cache_key(model_fingerprint(model), "bfloat16", _profiles(), LIMITS, TARGET)  # stable
    variants = [
        cache_key(fingerprint, "float16", profiles, LIMITS, TARGET),
        cache_key(fingerprint, "bfloat16", plan_profiles(LIMITS, max_model_len=256, **KV), LIMITS, TARGET),
        cache_key(fingerprint, "bfloat16", profiles, SchedulerConfig(8, 64, max_waiting=5), TARGET),
        cache_key(fingerprint, "bfloat16", profiles, LIMITS, BuildTarget("10.16.0", "NVIDIA H200", (9, 0))),
        cache_key(fingerprint, "bfloat16", profiles, LIMITS, BuildTarget("10.15.1", "NVIDIA H100", (9, 0))),
        cache_key(fingerprint, "bfloat16", profiles, LIMITS, BuildTarget("10.15.1", "NVIDIA H200", (8, 0))),
    ]
    (model / "config.json").write_text('{"hidden_size": 65}')
    variants.append(cache_key(model_fingerprint(model), "bfloat16", profiles, LIMITS, TARGET))
    assert len({base, *variants}) == len(variants) + 1


def test_a_plan_is_written_atomically_with_its_sidecar(tmp_path: Path):
    cache = PlanCache(tmp_path / "engines")
    path = cache.store("k1", b"PLAN-BYTES", TARGET)
    assert path == tmp_path / "engines" / "k1.plan"
    assert path.read_bytes() == b"PLAN-BYTES"
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["tensorrt_version"] == "10.15.1" and sidecar["gpu_name"] == "NVIDIA H200"
    assert sidecar["compute_capability"] == [9, 0]
    assert sorted(os.listdir(tmp_path / "engines")) == ["k1.json", "k1.plan"]  # no temp files left
    assert cache.load("k1", TARGET) == b"PLAN-BYTES"
    assert cache.load("absent", TARGET) is None


def test_a_failed_write_leaves_no_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache = PlanCache(tmp_path)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        cache.store("k2", b"PLAN", TARGET)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("field", "other"), [
    ("tensorrt_version", BuildTarget("10.16.0", "NVIDIA H200", (9, 0))),
    ("gpu_name", BuildTarget("10.15.1", "NVIDIA H100 80GB HBM3", (9, 0))),
    ("compute_capability", BuildTarget("10.15.1", "NVIDIA H200", (8, 9))),
])
def test_a_foreign_plan_is_refused_before_deserializing(tmp_path: Path, field: str, other: BuildTarget):
    cache = PlanCache(tmp_path)
    cache.store("k3", b"PLAN", TARGET)
    with pytest.raises(ForeignPlanError, match=field):
        cache.load("k3", other)


def test_a_plan_without_its_sidecar_is_refused(tmp_path: Path):
    cache = PlanCache(tmp_path)
    cache.store("k4", b"PLAN", TARGET)
    (tmp_path / "k4.json").unlink()
    with pytest.raises(ForeignPlanError, match="sidecar"):
        cache.load("k4", TARGET)
    (tmp_path / "k4.json").write_text("{not json")
    with pytest.raises(ForeignPlanError, match="sidecar"):
        cache.load("k4", TARGET)


def test_the_module_imports_without_tensorrt():
    # the module is imported above with no TensorRT here; the reason names what to install
    reason = tensorrt_missing()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert reason is not None and "tensorrt" in reason
    else:
        assert reason is None or "GPU" in reason


@pytest.mark.skipif(tensorrt_missing() is None, reason="TensorRT and a GPU are present here")
def test_the_engine_without_tensorrt_fails_at_load_naming_what_is_missing(tmp_path: Path):
    from modelgw.runtimes.errors import ModelLoadError
    from modelgw.runtimes.llm.checkpoint import Checkpoint
    from modelgw.runtimes.llm.make_checkpoint import make_checkpoint
    from modelgw.runtimes.llm.tensorrt_engine import TensorRTEngine

    checkpoint = Checkpoint.open(make_checkpoint(tmp_path / "ckpt"))
    with pytest.raises(ModelLoadError, match=r"engine=tensorrt: .*(tensorrt module|no CUDA GPU)"):
        TensorRTEngine(checkpoint)


@pytest.mark.gpu
@pytest.mark.skipif(tensorrt_missing() is not None, reason=str(tensorrt_missing()))
def test_tensorrt_engine_builds_and_matches_torch_greedy(tmp_path: Path):
    from llm_helpers import save_hf_checkpoint

    from modelgw.runtimes.llm.checkpoint import Checkpoint
    from modelgw.runtimes.llm.engine import EngineConfig, GenerationRequest, TorchEngine
    from modelgw.runtimes.llm.sampling import SamplingParams
    from modelgw.runtimes.llm.tensorrt_engine import TensorRTEngine

    checkpoint = Checkpoint.open(save_hf_checkpoint(tmp_path / "ckpt"))
    config = EngineConfig(device="cuda", dtype="float16", max_num_seqs=4, max_num_batched_tokens=64)
    ids = checkpoint.tokenizer.encode("The quick brown fox")
    outputs = {}
    for name, cls in (("torch", TorchEngine), ("tensorrt", TensorRTEngine)):
        engine = cls(checkpoint, config) if name == "torch" else cls(checkpoint, config, cache_dir=tmp_path / "plans")
        engine.add_request(GenerationRequest("r", tuple(ids), SamplingParams(max_tokens=8, temperature=0.0)))
        tokens: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens.extend(out.token_ids)
        engine.close()
        outputs[name] = tokens
    assert torch.cuda.is_available()
    assert outputs["tensorrt"] == outputs["torch"]


def test_gpu_check_runs_on_cpu_quick_and_reports(tmp_path: Path):
    """bench/gpu_check.py is for the GPU machine; --device cpu --quick exercises all of it
    but the CUDA parts here (the reference, the agreement, the levels, the report)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(repo / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=240, cwd=repo)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    torch_row, tensorrt_row = report["reports"]
    assert torch_row["engine"] == "torch" and torch_row["skipped"] is None
    assert torch_row["agreement"]["identical_prompts"] == torch_row["agreement"]["prompts"] == 2  # fp32 vs fp32
    assert [level["concurrency"] for level in torch_row["levels"]] == [1, 4]
    assert all(level["output_tokens"] == level["requests"] * 8 for level in torch_row["levels"])
    assert tensorrt_row["engine"] == "tensorrt"
    if tensorrt_missing() is not None:
        assert "tensorrt" in tensorrt_row["skipped"]
    assert "tok/s" in done.stdout and "TTFT" in done.stdout

    bad = subprocess.run([sys.executable, str(repo / "bench" / "gpu_check.py"), "--concurrency", "1,x"],
                         capture_output=True, text=True, timeout=60, cwd=repo)
    assert bad.returncode == 2 and "--concurrency" in bad.stderr
