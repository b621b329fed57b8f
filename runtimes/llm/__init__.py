"""The `llm` runtime kind: Llama-family decoders from local Hugging Face-style checkpoints,
with a paged KV cache, continuous batching and token streaming.

    modelgw llm make-checkpoint /tmp/tiny                # a small random Llama, offline
    modelgw runtime serve --kind llm --model tiny=/tmp/tiny --port 8001

Modules, each one responsibility (the wire contract is runtimes/llm/CONTRACT.md):

    checkpoint.py      config.json, safetensors weights, tokenizer.json, chat template
    model.py           the decoder (RMSNorm, RoPE with scaling, GQA, SwiGLU) over a paged cache
    kv_cache.py        fixed-budget block pool + the cache tensors
    sequence.py        one request's state while it runs, and its outputs
    scheduler.py       continuous batching, and every change of request state (tokens, stops, finish)
    runner.py          a scheduled step (plain data) -> tensors -> forward -> sampled tokens
    sampling.py        sampling parameters and the batched sampler (the runner's)
    detokenizer.py     incremental detokenization and stop strings
    engine.py          the Engine interface and the `torch` engine (TensorRT design note)
    async_engine.py    an Engine driven by a background thread, with an async generate()
    runtime.py         the `llm` kind's Model: tensors and parameters in, tokens out
    make_checkpoint.py the random checkpoint + trained tokenizer writer; cli.py its command
"""
