"""The engine's parts on a tiny random checkpoint (made by `make_checkpoint`): the KV cache
budget and admission, continuous batching and its fairness, cancellation, sampling
(seeds, top-k/top-p), stop strings and stop tokens, incremental detokenization."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path

import pytest
from llm_helpers import Result, greedy, make_engine, run, tiny_checkpoint

from modelgw.runtimes.llm.async_engine import AsyncEngine
from modelgw.runtimes.llm.checkpoint import Checkpoint
from modelgw.runtimes.llm.detokenizer import TextStream
from modelgw.runtimes.llm.engine import GenerationRequest
from modelgw.runtimes.llm.kv_cache import BlockPool
from modelgw.runtimes.llm.sampling import SampleResult, SamplingParams
from modelgw.runtimes.llm.scheduler import QueueFull, Scheduler, SchedulerConfig
from modelgw.runtimes.llm.sequence import Sequence

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path):
    return Checkpoint.open(checkpoint).tokenizer


def request(tokenizer, request_id: str, prompt: str, params: SamplingParams) -> GenerationRequest:
    return GenerationRequest(request_id, tuple(tokenizer.encode(prompt)), params)


# -- KV cache budget, admission, fairness ------------------------------------------------


def test_requests_queue_when_the_cache_is_full_and_memory_stays_bounded(checkpoint: Path, tokenizer) -> None:
    # 4 blocks of 8 tokens; each request needs 3 (prompt ~5 + 16 new tokens): one at a time
    engine = make_engine(checkpoint, block_size=8, kv_cache_bytes=4 * 8 * 2 * 2 * 2 * 16 * 4,
                         max_num_seqs=8, max_num_batched_tokens=64)
    assert engine.pool.num_blocks == 4
    cache_bytes = engine.cache.nbytes
    for i in range(3):
        engine.add_request(request(tokenizer, f"r{i}", "Hello world", greedy(16, ignore_eos=True)))
    seen_running, finished_order, results = [], [], {}
    while engine.has_unfinished():
        for output in engine.step():
            results.setdefault(output.request_id, Result()).tokens += output.token_ids
            if output.finished:
                finished_order.append(output.request_id)
        figures = engine.figures()
        seen_running.append(figures.running)
        assert figures.kv_cache_usage <= 1.0
        assert engine.pool.num_free + sum(len(s.blocks) for s in engine.scheduler.running) == 4
    assert max(seen_running) == 1, "a second request was admitted without cache for it"
    assert finished_order == ["r0", "r1", "r2"]
    assert all(len(r.tokens) == 16 for r in results.values())
    assert engine.cache.nbytes == cache_bytes
    assert engine.figures().kv_cache_usage == 0.0


def test_a_request_larger_than_the_whole_cache_is_refused(checkpoint: Path, tokenizer) -> None:
    engine = make_engine(checkpoint, block_size=8, kv_cache_bytes=4 * 8 * 2 * 2 * 2 * 16 * 4, max_model_len=4096)
    assert engine.max_model_len == 32  # lowered to what the cache holds
    with pytest.raises(ValueError, match="KV cache holds 32"):
        engine.add_request(request(tokenizer, "big", "Hello world", greedy(40)))
    assert not engine.has_unfinished()


def _sequence(request_id: str, prompt_len: int, max_tokens: int) -> Sequence:
    class Chars:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i % 26) for i in ids)

    return Sequence(request_id, list(range(3, 3 + prompt_len)), greedy(max_tokens), Chars())


def _simulate(scheduler: Scheduler, step) -> None:
    """A runner's result for a step (token 7 for every sampled row), applied by the scheduler."""
    sampled = step.sampling_ids
    scheduler.update_from_output(step, SampleResult([7] * len(sampled), [None] * len(sampled)))


def test_scheduler_budget_decodes_first_chunked_prefill_and_fifo() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=6), pool)
    a, b = _sequence("a", 2, 4), _sequence("b", 11, 2)   # b's prompt needs two chunks
    big, small = _sequence("big", 4, 16), _sequence("small", 1, 1)  # big needs 5 blocks
    for seq in (a, b, big, small):
        scheduler.add(seq)
    first = scheduler.schedule()
    assert [(r.request_id, r.num_tokens) for r in first.rows] == [("a", 2), ("b", 4)]
    assert first.sampling_ids == ["a"]  # b's prompt is not done yet
    _simulate(scheduler, first)
    second = scheduler.schedule()
    # the decoder first (one token), then the rest of b's prompt in the remaining budget
    assert [(r.request_id, r.num_tokens) for r in second.rows] == [("a", 1), ("b", 5)]
    assert second.num_single == 1
    _simulate(scheduler, second)
    # big needs 5 blocks, 5 are free once... a (2 blocks) and b (4 blocks) hold 6 of 8: big waits,
    # and so does small behind it (strict FIFO), although small would fit
    for _ in range(10):
        step = scheduler.schedule()
        assert step.num_tokens <= 6
        ids = [r.request_id for r in step.rows]
        if "small" in ids:
            assert "big" in [s.request_id for s in scheduler.running], "small overtook big"
        _simulate(scheduler, step)
    assert scheduler.get("big") is not None and big.blocks, "big never got admitted"


def test_queue_limit_and_duplicate_ids() -> None:
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=4, max_waiting=2), BlockPool(4, 4))
    scheduler.add(_sequence("x", 2, 2))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add(_sequence("x", 2, 2))
    scheduler.add(_sequence("y", 2, 2))
    with pytest.raises(QueueFull):
        scheduler.add(_sequence("z", 2, 2))


def test_new_requests_join_a_running_batch_and_finished_ones_leave(checkpoint: Path, tokenizer) -> None:
    engine = make_engine(checkpoint, max_num_seqs=4, max_num_batched_tokens=64)
    engine.add_request(request(tokenizer, "long", "Hello world", greedy(30, ignore_eos=True)))
    for _ in range(5):
        engine.step()
    engine.add_request(request(tokenizer, "short", "It is sunny", greedy(3, ignore_eos=True)))
    running = []
    finished_short_at = None
    for i in range(40):
        outputs = engine.step()
        running.append(engine.figures().running)
        if any(o.request_id == "short" and o.finished for o in outputs):
            finished_short_at = i
        if not engine.has_unfinished():
            break
    assert 2 in running, "the new request never ran beside the first"
    assert finished_short_at is not None
    assert running[finished_short_at] == 1, "a finished sequence stayed in the batch"


def test_the_runner_gets_plain_data_and_owns_no_request_state(checkpoint: Path, tokenizer) -> None:
    """Each step crosses to the runner, and its result back, through a pickle round trip (as
    to a runner in another process): the outputs stay the same, so the runner changes no
    scheduler state and the scheduler applies every result (tokens, stops, finishing)."""
    requests = [
        ("greedy", "Hello world", greedy(20, ignore_eos=True, logprobs=2)),
        ("seeded", "The quick brown fox", SamplingParams(max_tokens=18, temperature=1.0, seed=5, ignore_eos=True)),
        ("long", "Continuous batching lets new requests join the batch " * 3, greedy(6, ignore_eos=True)),
    ]
    reference = run(make_engine(checkpoint, max_num_seqs=4, max_num_batched_tokens=24),
                    [request(tokenizer, *r) for r in requests])
    base = reference["greedy"]
    stop = base.text[5:8]
    requests.append(("stopped", "Hello world", greedy(20, ignore_eos=True, stop=(stop,))))
    reference["stopped"] = run(make_engine(checkpoint), [request(tokenizer, *requests[-1])])["stopped"]

    engine = make_engine(checkpoint, max_num_seqs=4, max_num_batched_tokens=24)
    execute = engine.runner.execute

    def remote_execute(step):
        return pickle.loads(pickle.dumps(execute(pickle.loads(pickle.dumps(step)))))

    engine.runner.execute = remote_execute  # type: ignore[method-assign]
    remote = run(engine, [request(tokenizer, *r) for r in requests], max_steps=500)
    for name, _, _ in requests:
        assert remote[name].tokens == reference[name].tokens, name
        assert remote[name].text == reference[name].text, name
        assert remote[name].finish_reason == reference[name].finish_reason, name
    assert remote["greedy"].logprobs == reference["greedy"].logprobs
    assert remote["stopped"].finish_reason == "stop" and stop not in remote["stopped"].text
    assert engine.figures().kv_cache_usage == 0.0
    # the runner hears which requests left with the next step, and forgets them
    run(engine, [request(tokenizer, "next", "Hello", greedy(2, ignore_eos=True))])
    assert not set(engine.runner._requests) & {name for name, _, _ in requests}, "the runner kept their state"


def test_abort_frees_the_cache_at_once(checkpoint: Path, tokenizer) -> None:
    engine = make_engine(checkpoint, max_num_seqs=1, max_num_batched_tokens=32)
    engine.add_request(request(tokenizer, "a", "Hello world", greedy(50, ignore_eos=True)))
    engine.add_request(request(tokenizer, "b", "Hello world", greedy(50, ignore_eos=True)))
    engine.step()
    engine.step()
    assert engine.figures().running == 1 and engine.figures().waiting == 1
    held = engine.figures().kv_cache_usage
    assert held > 0
    output = engine.abort("b")  # waiting
    assert output.finished and output.finish_reason == "cancelled"
    assert engine.figures().waiting == 0
    output = engine.abort("a")  # running
    assert output.finish_reason == "cancelled"
    assert engine.figures().kv_cache_usage == 0.0 and not engine.has_unfinished()
    assert engine.abort("a") is None


# -- sampling ----------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(checkpoint: Path, tokenizer) -> None:
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)
    engine = make_engine(checkpoint, max_num_seqs=8, max_num_batched_tokens=64)
    alone = run(engine, [request(tokenizer, "s", "Hello world", params)])["s"]
    others = [request(tokenizer, f"o{i}", "The quick brown fox", SamplingParams(max_tokens=10 + i, temperature=0.9))
              for i in range(4)]
    batched = run(engine, [*others[:2], request(tokenizer, "s", "Hello world", params), *others[2:]])["s"]
    assert batched.tokens == alone.tokens and batched.text == alone.text
    other_seed = run(engine, [request(tokenizer, "t", "Hello world",
                                      SamplingParams(max_tokens=24, temperature=1.0, seed=4321, ignore_eos=True))])["t"]
    assert other_seed.tokens != alone.tokens
    greedy_run = run(engine, [request(tokenizer, "g", "Hello world", greedy(24, ignore_eos=True))])["g"]
    assert alone.tokens != greedy_run.tokens  # a random model at temperature 1 is nowhere near greedy


def test_top_k_and_top_p_cut_the_distribution(checkpoint: Path, tokenizer) -> None:
    engine = make_engine(checkpoint, max_num_seqs=4, max_num_batched_tokens=64)
    greedy_tokens = run(engine, [request(tokenizer, "g", "Hello world", greedy(12, ignore_eos=True))])["g"].tokens
    for name, params in {
        "top_k=1": SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=1, ignore_eos=True),
        "top_p=1e-6": SamplingParams(max_tokens=12, temperature=1.5, top_p=1e-6, seed=1, ignore_eos=True),
    }.items():
        assert run(engine, [request(tokenizer, name, "Hello world", params)])[name].tokens == greedy_tokens, name
    # top_k=3: every token is one of the 3 most likely (the raw top-3 logprobs come back with it)
    params = SamplingParams(max_tokens=40, temperature=5.0, top_k=3, seed=7, logprobs=3, ignore_eos=True)
    result = run(engine, [request(tokenizer, "k", "Hello world", params)])["k"]
    assert len(result.top) == 40
    assert all(token in [t for t, _ in top] for token, top in zip(result.tokens, result.top, strict=True))
    assert any(token != top[0][0] for token, top in zip(result.tokens, result.top, strict=True)), "top_k=3 never sampled"


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(max_tokens=0), "max_tokens must be >= 1"),
    (dict(stop=("",)), "stop strings must not be empty"),
])
def test_sampling_parameters_out_of_range(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad).check()


# -- stop strings, stop tokens, detokenization -------------------------------------------


def _printable_greedy(engine, tokenizer, prompt: str, max_tokens: int = 48) -> Result:
    return run(engine, [request(tokenizer, "base", prompt, greedy(max_tokens, ignore_eos=True))])["base"]


def test_stop_strings_end_the_text_before_them(checkpoint: Path, tokenizer) -> None:
    engine = make_engine(checkpoint, max_num_seqs=4, max_num_batched_tokens=64)
    base = _printable_greedy(engine, tokenizer, "The quick brown fox jumps")
    text = base.text
    assert len(text) > 12
    stop = text[8:11]
    cut = text.find(stop)
    result = run(engine, [request(tokenizer, "s", "The quick brown fox jumps",
                                  greedy(48, ignore_eos=True, stop=("never there", stop)))])["s"]
    assert result.finish_reason == "stop"
    assert result.text == text[:cut]
    assert stop not in result.text
    assert result.tokens == base.tokens[:len(result.tokens)]


def test_stop_token_ids_end_generation(checkpoint: Path, tokenizer) -> None:
    engine = make_engine(checkpoint, max_num_seqs=4, max_num_batched_tokens=64)
    base = _printable_greedy(engine, tokenizer, "Hello world")
    stop_token = base.tokens[3]
    first = base.tokens.index(stop_token)
    result = run(engine, [request(tokenizer, "s", "Hello world",
                                  greedy(48, ignore_eos=True, stop_token_ids=(stop_token,)))])["s"]
    assert result.finish_reason == "stop"
    assert result.tokens == base.tokens[:first + 1]  # the stop token is generated, its text is not
    assert result.completion_tokens == first + 1
    # the text stops where the stop token came (a character cut short there shows as U+FFFD)
    assert base.text.startswith(result.text.rstrip("\ufffd"))
    assert len(result.text.rstrip("\ufffd")) <= len(tokenizer.decode(base.tokens[:first]))


class _Chars:
    """A tokenizer whose tokens are single characters (ids = code points)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_a_partial_stop_string_is_never_sent() -> None:
    stream = TextStream(_Chars(), [], stop=("abc",))
    sent = []
    for char in "xyab":
        stream.add(ord(char))
        sent.append(stream.take())
    assert "".join(sent) == "xy"  # "ab" may still become "abc": held back
    stream.add(ord("d"))
    assert stream.take() == "abd"  # it did not
    stream.add(ord("a"))
    stream.add(ord("b"))
    stream.add(ord("c"))
    assert stream.stopped
    assert stream.take() == ""
    assert stream.text == "xyabd"


def test_incremental_detokenization_of_multibyte_text(tokenizer) -> None:
    text = " héllo wörld — 日本語 🙂 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = tokenizer.encode("Hello")
    stream = TextStream(tokenizer, prompt)
    chunks = []
    for token in ids:
        stream.add(token)
        chunks.append(stream.take())
    chunks.append(stream.take(final=True))
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)
    assert len([c for c in chunks if c]) > 5  # it streamed, not all at the end


# -- the async front: cancellation -------------------------------------------------------


async def test_closing_the_stream_aborts_and_frees_the_cache(checkpoint: Path, tokenizer) -> None:
    engine = AsyncEngine(make_engine(checkpoint, max_num_seqs=4, max_num_batched_tokens=64), "tiny")
    try:
        # a consumer that stops reading (the iterator is closed)
        stream = engine.generate(request(tokenizer, "closed", "Hello world", greedy(400, ignore_eos=True)))
        first = await stream.__anext__()
        assert not first.finished
        assert engine.figures().running == 1 and engine.figures().kv_cache_usage > 0
        await stream.aclose()
        await _until(lambda: engine.figures().kv_cache_usage == 0.0 and engine.figures().running == 0)

        # a consumer task that gets cancelled (what a cancelled gRPC call does)
        async def consume() -> None:
            async for _ in engine.generate(request(tokenizer, "task", "Hello world", greedy(400, ignore_eos=True))):
                pass

        task = asyncio.create_task(consume())
        await _until(lambda: engine.figures().running == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _until(lambda: engine.figures().kv_cache_usage == 0.0 and engine.figures().running == 0)

        # and the engine still serves
        outputs = [o async for o in engine.generate(request(tokenizer, "after", "Hello", greedy(4, ignore_eos=True)))]
        assert outputs[-1].finished and outputs[-1].completion_tokens == 4
    finally:
        engine.shutdown()


async def test_shutdown_ends_running_requests_as_cancelled(checkpoint: Path, tokenizer) -> None:
    engine = AsyncEngine(make_engine(checkpoint, max_num_seqs=4, max_num_batched_tokens=64), "tiny")
    stream = engine.generate(request(tokenizer, "r", "Hello world", greedy(400, ignore_eos=True)))
    await stream.__anext__()
    await asyncio.to_thread(engine.shutdown)
    last = None
    async for output in stream:
        last = output
    assert last is not None and last.finished and last.finish_reason == "cancelled"


async def _until(condition, timeout: float = 10.0) -> None:
    """Wait for a condition the engine thread brings about (never a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_a_failing_step_fails_its_requests_not_the_engine(checkpoint: Path, tokenizer) -> None:
    from modelgw.runtimes.llm.engine import EngineConfig, TorchEngine

    class FailsOnce(TorchEngine):
        failed = False

        def step(self):
            if not self.failed and self.scheduler.num_running:
                self.failed = True
                raise RuntimeError("out of memory, say")
            return super().step()

    engine = AsyncEngine(FailsOnce(Checkpoint.open(checkpoint), EngineConfig(device="cpu")), "tiny")
    try:
        with pytest.raises(RuntimeError, match="the engine failed: RuntimeError: out of memory, say"):
            async for _ in engine.generate(request(tokenizer, "doomed", "Hello", greedy(8, ignore_eos=True))):
                pass
        assert engine.figures().kv_cache_usage == 0.0 and engine.figures().running == 0
        outputs = [o async for o in engine.generate(request(tokenizer, "next", "Hello", greedy(3, ignore_eos=True)))]
        assert outputs[-1].finished and outputs[-1].completion_tokens == 3
    finally:
        engine.shutdown()
