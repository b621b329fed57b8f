"""The decoder step exported as one ONNX graph (`modelgw llm export-onnx`): the graph passes
onnx.checker, and under onnxruntime on CPU (fp32) its logits and its updated KV cache equal
the torch Decoder's for a prefill, a chunked prefill over a cached part, and decode steps
over a filled cache, the cache carried from step to step by the graph's own outputs; and the
`onnxruntime` engine (the same scheduler, pool and sampler, that graph as the forward pass)
gives the torch engine's greedy tokens for 8 prompts, in one mixed batch and alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from llm_helpers import MAX_TOKENS, PROMPTS, greedy, run, save_hf_checkpoint

from modelgw.runtimes.errors import ModelLoadError
from modelgw.runtimes.llm.checkpoint import Checkpoint
from modelgw.runtimes.llm.engine import EngineConfig, GenerationRequest, create_engine
from modelgw.runtimes.llm.kv_cache import KVCache
from modelgw.runtimes.llm.make_checkpoint import make_checkpoint
from modelgw.runtimes.llm.model import Decoder
from modelgw.runtimes.llm.onnx_export import INPUT_NAMES, OUTPUT_NAMES, graph_inputs
from modelgw.runtimes.llm.ort_runner import OnnxRuntimeEngine
from modelgw.runtimes.llm.runner import ModelRunner
from modelgw.runtimes.llm.sampling import SamplingParams
from modelgw.runtimes.llm.scheduler import NewRequest, ScheduledRow, ScheduledStep

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

BLOCK_SIZE = 4
NUM_BLOCKS = 24
ATOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "qwen2-tied"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":  # grouped-query attention (4 heads, 2 kv heads), untied head, 3 layers
        return make_checkpoint(directory, layers=3, hidden=64, heads=4, kv_heads=2, vocab=512, max_position=256)
    # q/k/v biases and the embedding shared with the LM head
    return save_hf_checkpoint(directory, "qwen2", num_hidden_layers=3, tie_word_embeddings=True,
                              max_position_embeddings=256)


@pytest.fixture(scope="module")
def graph(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "step.onnx"
    done = subprocess.run([sys.executable, "-m", "modelgw", "llm", "export-onnx", str(checkpoint), str(out),
                           "--block-size", str(BLOCK_SIZE)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "onnx.checker: ok" in done.stdout
    return out


def test_the_graph_passes_the_checker_with_the_cache_as_inputs_and_outputs(graph: Path) -> None:
    model = onnx.load(str(graph))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == INPUT_NAMES
    assert [o.name for o in model.graph.output] == OUTPUT_NAMES
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    # the step's sizes and the pool's block count are dynamic; only the model's own are fixed
    assert isinstance(dims["input_ids"][0], str)
    assert all(isinstance(d, str) for d in dims["block_tables"])
    assert isinstance(dims["key_cache"][1], str) and dims["key_cache"][0] == 3 and dims["key_cache"][2:] == [BLOCK_SIZE, 2, 16]


def test_export_of_a_missing_checkpoint_fails_naming_it(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "modelgw", "llm", "export-onnx", str(tmp_path / "nope"),
                           str(tmp_path / "out.onnx")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "nope" in done.stderr and "not a checkpoint directory" in done.stderr


def test_onnxruntime_logits_equal_torch_for_prefill_and_decode_over_a_filled_cache(checkpoint: Path,
                                                                                   graph: Path) -> None:
    ckpt = Checkpoint.open(checkpoint)
    config = ckpt.config
    decoder = Decoder.from_weights(config, ckpt.load_weights(), max_len=config.max_position_embeddings)
    cache = KVCache(config.num_layers, NUM_BLOCKS, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    runner = ModelRunner(decoder, cache)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    ort_keys = np.zeros(tuple(cache.keys.shape), dtype=np.float32)
    ort_values = np.zeros_like(ort_keys)

    # a: 10-token prompt over 3 blocks; b: a 14-token prompt in two chunks; c: 3 tokens
    blocks = {"a": [5, 0, 17, 9], "b": [2, 11, 3, 20, 7], "c": [13, 1, 22]}
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    runner.execute(ScheduledStep(new_requests=[NewRequest(r, b, greedy) for r, b in blocks.items()]))
    rng = np.random.default_rng(0)
    prompt = {r: rng.integers(3, 500, size=n).tolist() for r, n in (("a", 10), ("b", 14), ("c", 3))}
    length = {"a": 10, "b": 14, "c": 3}

    def step(rows: list[ScheduledRow], num_single: int) -> torch.Tensor:
        nonlocal ort_keys, ort_values
        scheduled = ScheduledStep(rows=rows, num_single=num_single)
        expected = decoder.forward(runner.build(scheduled), cache)
        feed = graph_inputs(scheduled, blocks, BLOCK_SIZE)
        logits, ort_keys, ort_values = session.run(None, {**feed, "key_cache": ort_keys, "value_cache": ort_values})
        np.testing.assert_allclose(logits, expected.numpy(), atol=ATOL, rtol=0)
        # the graph wrote the same K/V into the same slots of the pool
        np.testing.assert_allclose(ort_keys, cache.keys.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(ort_values, cache.values.numpy(), atol=ATOL, rtol=0)
        return expected

    # prefill: a whole, b's first chunk (no token sampled), c whole
    step([ScheduledRow("a", prompt["a"], 0, True), ScheduledRow("b", prompt["b"][:6], 0, False),
          ScheduledRow("c", prompt["c"], 0, True)], 0)
    # mixed: a and c decode while b's second chunk attends to its cached first one
    last = {"a": 7, "c": 9}
    logits = step([ScheduledRow("a", [last["a"]], length["a"], True), ScheduledRow("c", [last["c"]], length["c"], True),
                   ScheduledRow("b", prompt["b"][6:], 6, True)], 2)
    for r in ("a", "c"):
        length[r] += 1
    next_tokens = dict(zip(("a", "c", "b"), logits.argmax(-1).tolist(), strict=True))
    # decode steps over the filled cache, crossing block boundaries, greedy tokens fed back
    for _ in range(5):
        order = ["b", "a", "c"]
        logits = step([ScheduledRow(r, [next_tokens[r]], length[r], True) for r in order], 3)
        for r, token in zip(order, logits.argmax(-1).tolist(), strict=True):
            length[r] += 1
            next_tokens[r] = token
    assert length == {"a": 16, "b": 19, "c": 9}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("llama"), layers=2, hidden=64, heads=4, kv_heads=2, vocab=512,
                           max_position=512)


def test_the_onnxruntime_engine_gives_the_torch_engines_greedy_tokens(llama: Path) -> None:
    # a small token budget per step, so that the batch mixes chunked prefills and decodes
    limits = dict(device="cpu", max_num_seqs=8, max_num_batched_tokens=24, block_size=8)
    ckpt = Checkpoint.open(llama)
    prompts = [ckpt.tokenizer.encode(p) for p in PROMPTS]

    def requests() -> list[GenerationRequest]:
        return [GenerationRequest(f"r{i}", tuple(ids), greedy(n))
                for i, (ids, n) in enumerate(zip(prompts, MAX_TOKENS, strict=True))]

    torch_engine = create_engine(ckpt, EngineConfig(engine="torch", **limits))
    ort_engine = create_engine(ckpt, EngineConfig(engine="onnxruntime", **limits))
    try:
        assert isinstance(ort_engine, OnnxRuntimeEngine) and ort_engine.choice is not None
        assert ort_engine.choice.engine == "onnxruntime"
        batched_torch = run(torch_engine, requests())
        batched_ort = run(ort_engine, requests())
        assert {r: x.tokens for r, x in batched_ort.items()} == {r: x.tokens for r, x in batched_torch.items()}
        assert [len(batched_ort[f"r{i}"].tokens) for i in range(8)] == MAX_TOKENS  # no eos met: whole lengths compared
        for request in requests():  # alone: one request in the engine at a time
            alone = run(ort_engine, [request])[request.request_id]
            assert alone.tokens == batched_torch[request.request_id].tokens, request.request_id
            assert alone.text == batched_torch[request.request_id].text
    finally:
        torch_engine.close()
        ort_engine.close()


def test_the_onnxruntime_engine_refuses_what_its_graph_cannot_run(llama: Path) -> None:
    ckpt = Checkpoint.open(llama)
    with pytest.raises(ModelLoadError, match="float32 only, not dtype=bfloat16"):
        create_engine(ckpt, EngineConfig(engine="onnxruntime", device="cpu", dtype="bfloat16"))
