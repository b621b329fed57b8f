"""The OpenAI API of the gateway: /v1/models, /v1/completions, /v1/chat/completions.

Served for models whose runtimes are of kind `llm`, speaking the LLM contract
(runtimes/llm/CONTRACT.md) to them over the same gRPC service as every other request.

- parsing:   OpenAI request bodies -> the contract's ModelInferRequest
- rendering: the contract's responses -> OpenAI bodies and stream chunks
- errors:    OpenAI's error format, and the status of errors that arrive on a stream
- api:       the aiohttp routes (a sub-application at /v1), SSE, client disconnects
"""

from modelgw.gateway.openai.api import OpenAIApi

__all__ = ["OpenAIApi"]
