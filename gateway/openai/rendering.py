"""The runtime's answers (LLM contract responses) -> OpenAI response bodies and stream chunks.

    piece = read_piece(response)                      # one ModelInferResponse
    body = completion_body(info, piece)               # non-streaming answers
    chunks = ChunkRenderer(info, include_usage)       # `stream: true`
    chunks.start(); chunks.delta(piece); chunks.finish(piece); chunks.usage(piece)

Log-probabilities: the runtime returns the chosen token's id and log-probability; the
gateway has no tokenizer, so a token is named "token_id:<id>" (vLLM's
return_tokens_as_token_ids form) and no alternatives (top_logprobs) are given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc

from modelgw.gateway.errors import GatewayError
from modelgw.oip.codec import TensorError, decode_response_outputs, parameter_value
from modelgw.oip.protocol import FINAL_RESPONSE
from modelgw.protos import inference_pb2 as pb


@dataclass(frozen=True)
class CallInfo:
    """What every body of one answer repeats."""

    chat: bool
    id: str
    created: int
    model: str
    logprobs: bool = False


@dataclass
class Piece:
    """One response of the runtime: a text delta (or the whole text), its tokens, and on
    the final response the usage figures and the finish reason."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    final: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None


def _param(response: pb.ModelInferResponse, key: str) -> Any:
    return parameter_value(response.parameters[key]) if key in response.parameters else None


def read_piece(response: pb.ModelInferResponse, final: bool | None = None) -> Piece:
    """A Piece of a contract response; GatewayError INTERNAL if it breaks the contract."""
    try:
        outputs = decode_response_outputs(response)
    except TensorError as err:
        raise GatewayError(grpc.StatusCode.INTERNAL, f"the runtime's answer is malformed: {err}") from None
    piece = Piece()
    text = outputs.get("text_output")
    if text is not None and text.size:
        value = text.reshape(-1)[0]
        piece.text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    token_ids = outputs.get("token_ids")
    if token_ids is not None:
        piece.token_ids = [int(t) for t in token_ids.reshape(-1)]
    logprobs = outputs.get("logprobs")
    if logprobs is not None:
        piece.logprobs = [float(v) for v in logprobs.reshape(-1)]
    piece.final = bool(_param(response, FINAL_RESPONSE)) if final is None else final
    prompt_tokens, completion_tokens = _param(response, "prompt_tokens"), _param(response, "completion_tokens")
    piece.prompt_tokens = int(prompt_tokens) if prompt_tokens is not None else None
    piece.completion_tokens = int(completion_tokens) if completion_tokens is not None else None
    reason = _param(response, "finish_reason")
    piece.finish_reason = str(reason) if reason is not None else None
    return piece


def usage(piece: Piece) -> dict[str, int] | None:
    if piece.prompt_tokens is None or piece.completion_tokens is None:
        return None
    return {
        "prompt_tokens": piece.prompt_tokens,
        "completion_tokens": piece.completion_tokens,
        "total_tokens": piece.prompt_tokens + piece.completion_tokens,
    }


def _token(token_id: int) -> str:
    return f"token_id:{token_id}"


def chat_logprobs(piece: Piece) -> dict[str, Any]:
    return {
        "content": [
            {"token": _token(t), "logprob": lp, "bytes": None, "top_logprobs": []}
            for t, lp in zip(piece.token_ids, piece.logprobs, strict=False)
        ]
    }


def completion_logprobs(piece: Piece) -> dict[str, Any]:
    pairs = list(zip(piece.token_ids, piece.logprobs, strict=False))
    return {
        "tokens": [_token(t) for t, _ in pairs],
        "token_logprobs": [lp for _, lp in pairs],
        "top_logprobs": None,
        "text_offset": None,  # needs each token's text, which the gateway cannot know
    }


def _logprobs(info: CallInfo, piece: Piece) -> dict[str, Any] | None:
    if not info.logprobs:
        return None
    return chat_logprobs(piece) if info.chat else completion_logprobs(piece)


def finish_reason(piece: Piece) -> str:
    # "stop" | "length" from the runtime; a missing one is a runtime that stopped by itself
    return piece.finish_reason or "stop"


# -- whole answers ------------------------------------------------------------------------


def completion_body(info: CallInfo, piece: Piece) -> dict[str, Any]:
    """The body of a non-streaming answer (chat or text completion)."""
    if info.chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": piece.text},
            "logprobs": _logprobs(info, piece),
            "finish_reason": finish_reason(piece),
        }
    else:
        choice = {
            "index": 0, "text": piece.text, "logprobs": _logprobs(info, piece), "finish_reason": finish_reason(piece),
        }
    return {
        "id": info.id,
        "object": "chat.completion" if info.chat else "text_completion",
        "created": info.created,
        "model": info.model,
        "choices": [choice],
        "usage": usage(piece),
        "system_fingerprint": None,
    }


# -- stream chunks ------------------------------------------------------------------------


class ChunkRenderer:
    """The chunks of one streamed answer, in OpenAI's format: for chat, a first chunk with
    the assistant role, content deltas, a last chunk with the finish reason; for text
    completions, text deltas and a last chunk with the finish reason. With include_usage,
    every chunk has "usage": null and a final chunk with no choices carries the figures."""

    def __init__(self, info: CallInfo, include_usage: bool = False) -> None:
        self.info = info
        self.include_usage = include_usage
        self._object = "chat.completion.chunk" if info.chat else "text_completion"

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {
            "id": self.info.id,
            "object": self._object,
            "created": self.info.created,
            "model": self.info.model,
            "choices": choices,
            "system_fingerprint": None,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(
        self, content: str | None, piece: Piece | None, reason: str | None, role: bool = False
    ) -> dict[str, Any]:
        logprobs = _logprobs(self.info, piece) if piece is not None else None
        if self.info.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if content is not None:
                delta["content"] = content
            return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"index": 0, "text": content or "", "logprobs": logprobs, "finish_reason": reason}

    def start(self) -> dict[str, Any] | None:
        """Chat: the chunk that says who speaks; None for text completions."""
        if not self.info.chat:
            return None
        return self._chunk([self._choice("", None, None, role=True)])

    def delta(self, piece: Piece) -> dict[str, Any] | None:
        """A chunk for a piece's text (None when it has neither text nor tokens to show)."""
        if not piece.text and not (self.info.logprobs and piece.token_ids):
            return None
        return self._chunk([self._choice(piece.text, piece, None)])

    def finish(self, piece: Piece) -> dict[str, Any]:
        """The last chunk with choices: the finish reason (and any text the final piece has)."""
        return self._chunk([self._choice(piece.text if piece.text else (None if self.info.chat else ""),
                                         piece if piece.token_ids else None, finish_reason(piece))])

    def usage(self, piece: Piece) -> dict[str, Any] | None:
        if not self.include_usage:
            return None
        chunk = self._chunk([])
        chunk["usage"] = usage(piece)
        return chunk
