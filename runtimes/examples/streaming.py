"""A streaming (decoupled) python-kind model: one request, several responses.

    modelgw runtime serve --kind python --port 8001 \
        --model words=modelgw.runtimes.examples.streaming:WordStream

Clients call ModelStreamInfer (tritonclient: start_stream + async_stream_infer); each
yielded dict is one response, and the stream marks the last one with the
`triton_final_response` parameter. generate() may be an async generator (as here, for
models that await other work) or a plain generator (advanced in the thread pool, so it
may block on a framework call, e.g. one decoding step per response).
"""

import numpy as np

from modelgw.runtimes.errors import InvalidInput
from modelgw.runtimes.model import Model, TensorSpec


class WordStream(Model):
    """Splits the text into words and streams them back, one response per word."""

    inputs = [TensorSpec("text", "BYTES", [1])]
    outputs = [TensorSpec("word", "BYTES", [1]), TensorSpec("index", "INT64", [1])]

    async def generate(self, inputs, parameters):
        words = inputs["text"][0].split()
        if not words:
            raise InvalidInput("input 'text' holds no words")
        for index, word in enumerate(words):
            yield {"word": np.array([word], dtype=object), "index": np.array([index], dtype=np.int64)}
