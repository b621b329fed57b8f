"""Our decoder and engine against transformers, on tiny random checkpoints that
transformers itself saved (save_pretrained): the same greedy tokens for 8 prompts, alone
and all in one continuously batched run (chunked prefill, decodes and prefills mixed in
steps), and the same logits within a stated tolerance.

Tolerance: float32 on CPU, |ours - transformers| <= 1e-4 on logits and log-probabilities
(the two implementations fuse and order matmuls differently; observed gaps are ~1e-6)."""

from __future__ import annotations

import pytest
import torch
from llm_helpers import (
    MAX_TOKENS,
    PROMPTS,
    greedy,
    make_engine,
    prompt_logits_transformers,
    run,
    save_hf_checkpoint,
    tiny_checkpoint,
    transformers_greedy,
)

from modelgw.runtimes.llm.checkpoint import Checkpoint
from modelgw.runtimes.llm.engine import GenerationRequest
from modelgw.runtimes.llm.kv_cache import KVCache
from modelgw.runtimes.llm.model import Decoder, PrefillSpan, StepBatch

ATOL = 1e-4
TOP = 5  # log-probabilities compared per generated token: the top 5 of ours against transformers'

FAMILIES = {
    "llama": ("llama", {}),
    # grouped-query attention with one kv head, Llama 3.1 rope scaling that matters at these lengths
    "llama3-rope": ("llama", {"num_key_value_heads": 1,
                              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "tie_word_embeddings": True}),
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "mistral": ("mistral", {"num_key_value_heads": 4, "sliding_window": 256}),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    family, overrides = FAMILIES[request.param]
    directory = save_hf_checkpoint(tmp_path_factory.mktemp(request.param), family, **overrides)
    tokenizer = Checkpoint.open(directory).tokenizer
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    references = transformers_greedy(directory, prompt_ids, MAX_TOKENS)
    return directory, prompt_ids, references


def _requests(prompt_ids: list[list[int]]) -> list[GenerationRequest]:
    return [GenerationRequest(f"p{i}", tuple(ids), greedy(n, logprobs=TOP))
            for i, (ids, n) in enumerate(zip(prompt_ids, MAX_TOKENS, strict=True))]


def _check_against_reference(results, references) -> None:
    for i, reference in enumerate(references):
        result = results[f"p{i}"]
        assert result.tokens == reference.tokens, f"prompt {i}: tokens differ from transformers'"
        assert result.finish_reason == ("stop" if reference.tokens[-1] == 2 else "length")
        # our top-5 log-probabilities per step, against transformers' at the same tokens
        for step, top in enumerate(result.top):
            ids = torch.tensor([t for t, _ in top])
            ours = torch.tensor([lp for _, lp in top])
            theirs = reference.logprobs[step, ids]
            assert torch.allclose(ours, theirs, atol=ATOL), (i, step, (ours - theirs).abs().max())
            assert ids[0] == reference.tokens[step]


def test_greedy_alone_matches_transformers(case) -> None:
    directory, prompt_ids, references = case
    engine = make_engine(directory, max_num_seqs=4, max_num_batched_tokens=64)
    results = {}
    for request in _requests(prompt_ids):  # one at a time: nothing else in the batch
        results.update(run(engine, [request]))
    _check_against_reference(results, references)
    assert engine.figures().kv_cache_usage == 0.0


def test_greedy_batched_matches_transformers(case) -> None:
    """All 8 at once, different lengths and max_tokens; a small token budget forces chunked
    prefill of the long prompts while others decode, and requests joining mid-run."""
    directory, prompt_ids, references = case
    engine = make_engine(directory, max_num_seqs=8, max_num_batched_tokens=24, block_size=8)
    results = run(engine, _requests(prompt_ids))
    _check_against_reference(results, references)
    assert engine.figures() == type(engine.figures())(0, 0, 0.0)


def test_greedy_batched_in_small_decode_chunks_matches_transformers(case) -> None:
    """The same batch with decode rows split into many chunks of similar length (a tiny
    model's rows otherwise fit one): rows reordered by length, per-chunk padding and masks,
    and every sampled token back to its own request."""
    directory, prompt_ids, references = case
    engine = make_engine(directory, max_num_seqs=8, max_num_batched_tokens=24, block_size=8)
    engine.runner.decode_chunk_blocks = 3
    build = engine.runner.build
    chunked = []

    def spy(step):
        batch = build(step)
        chunked.append(batch)
        return batch

    engine.runner.build = spy  # type: ignore[method-assign]  # a spy that keeps the real build's batches
    results = run(engine, _requests(prompt_ids))
    _check_against_reference(results, references)
    assert max(len(batch.chunks) for batch in chunked) >= 4
    assert any(c.mask is not None for batch in chunked for c in batch.chunks)


def test_prompt_logits_match_transformers(case) -> None:
    """Every position's logits of the longest prompt, in one prefill and in chunks that
    attend to what earlier chunks put in the paged cache."""
    directory, prompt_ids, _ = case
    ids = max(prompt_ids, key=len)
    theirs = prompt_logits_transformers(directory, ids)
    checkpoint = Checkpoint.open(directory)
    config = checkpoint.config
    model = Decoder.from_weights(config, checkpoint.load_weights(), max_len=256)
    n, block = len(ids), 4
    blocks = list(range(-(-n // block)))[::-1]  # deliberately out of order
    slots = [blocks[p // block] * block + p % block for p in range(n)]

    def cache() -> KVCache:
        return KVCache(config.num_layers, len(blocks), block, config.num_kv_heads, config.head_dim)

    whole = StepBatch(torch.tensor(ids), torch.arange(n), torch.tensor(slots),
                      spans=[PrefillSpan(0, n, 0, None, None)], logits_index=torch.arange(n))
    ours = model.forward(whole, cache())
    assert torch.allclose(ours, theirs, atol=ATOL), (ours - theirs).abs().max()

    chunked_cache, pieces, start = cache(), [], 0
    for length in (7, 1, 13, n):  # chunks, one of them a single token
        length = min(length, n - start)
        if length <= 0:
            break
        end = start + length
        context_blocks = torch.tensor(blocks[:-(-end // block)])
        mask = torch.ones(length, end, dtype=torch.bool).tril(diagonal=start)
        span = PrefillSpan(0, length, start, context_blocks if start else None, mask if start else None)
        batch = StepBatch(torch.tensor(ids[start:end]), torch.arange(start, end), torch.tensor(slots[start:end]),
                          spans=[span], logits_index=torch.arange(length))
        pieces.append(model.forward(batch, chunked_cache))
        start = end
    chunked = torch.cat(pieces)
    assert torch.allclose(chunked, theirs, atol=ATOL), (chunked - theirs).abs().max()


def test_bfloat16_on_cpu_stays_close_to_float32(case) -> None:
    """bfloat16 weights, cache and activations: first-token log-probabilities within 0.05
    of float32's (bf16 keeps 8 bits of mantissa; exact tokens may differ on near ties)."""
    directory, prompt_ids, references = case
    engine = make_engine(directory, dtype="bfloat16", max_num_seqs=8, max_num_batched_tokens=64)
    requests = [GenerationRequest(f"p{i}", tuple(ids), greedy(1, logprobs=TOP)) for i, ids in enumerate(prompt_ids)]
    results = run(engine, requests)
    for i, reference in enumerate(references):
        top = results[f"p{i}"].top[0]
        ids = torch.tensor([t for t, _ in top])
        ours = torch.tensor([lp for _, lp in top])
        assert torch.allclose(ours, reference.logprobs[0, ids], atol=0.05), (i, (ours - reference.logprobs[0, ids]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_with_a_weight_is_transformers_bit_for_bit(tmp_path, dtype: torch.dtype) -> None:
    """The checkpoints above keep their norms at 1 (as transformers initialises them), so
    only this test sees the norm's weight: ours is LlamaRMSNorm's result, bit for bit."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    checkpoint = Checkpoint.open(tiny_checkpoint(tmp_path))
    config = checkpoint.config
    model = Decoder.from_weights(config, checkpoint.load_weights(), max_len=64, dtype=dtype)
    torch.manual_seed(0)
    x = (torch.randn(9, config.hidden_size) * 3).to(dtype)
    theirs = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(dtype)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(config.hidden_size))
        assert torch.equal(model._rms_norm(x, theirs.weight), theirs(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_greedy_on_gpu_matches_transformers(case) -> None:
    directory, prompt_ids, references = case
    engine = make_engine(directory, device="cuda", dtype="float32", max_num_seqs=8, max_num_batched_tokens=24)
    results = run(engine, _requests(prompt_ids))
    for i, reference in enumerate(references):
        assert results[f"p{i}"].tokens == reference.tokens, i


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_seeded_sampling_on_gpu_is_reproducible(case) -> None:
    """The runner makes each request's generator on the model's device (a CPU generator
    cannot draw into CUDA tensors): the same seed gives the same tokens, alone or batched."""
    from modelgw.runtimes.llm.sampling import SamplingParams

    directory, prompt_ids, _ = case
    engine = make_engine(directory, device="cuda", dtype="float32", max_num_seqs=8, max_num_batched_tokens=24)
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True)
    alone = run(engine, [GenerationRequest("s", tuple(prompt_ids[0]), params)])["s"]
    batched = run(engine, [*_requests(prompt_ids), GenerationRequest("s", tuple(prompt_ids[0]), params)])["s"]
    assert len(alone.tokens) == 16 and batched.tokens == alone.tokens
