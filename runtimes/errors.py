"""Errors of the runtime SDK, each carrying the gRPC status code a client should see.

Models may raise `InvalidInput` from predict/generate to reject a request with
INVALID_ARGUMENT; any other exception from model code becomes INTERNAL with the
exception's text, and the server keeps serving.
"""

from __future__ import annotations

import grpc


class InferenceError(Exception):
    """A request failed; `code` is the gRPC status code to answer with."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidInput(InferenceError):
    """The request does not fit the model: unknown/missing tensor, datatype, shape."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(InferenceError):
    code = grpc.StatusCode.NOT_FOUND


class ModelNotReady(InferenceError):
    """The model exists but is loading, failed to load or is being unloaded."""

    code = grpc.StatusCode.UNAVAILABLE


class ModelLoadError(Exception):
    """A model could not be loaded; the message says which model and why."""
