"""The Model API: what a runtime kind (or a platform team's python class) implements.

A model declares its tensors and answers a batch:

    class Scale(Model):
        inputs = [TensorSpec("x", "FP32", [-1, 4])]
        outputs = [TensorSpec("y", "FP32", [-1, 4])]
        max_batch_size = 32          # >0: dim 0 is the batch dim; requests get merged

        def load(self) -> None:      # blocking, runs in a thread
            self.factor = float(self.options.get("factor", 2))

        def predict(self, inputs, parameters):   # blocking, runs in a thread pool
            return {"y": inputs["x"] * self.factor}

Shapes are the shapes clients see, -1 marks a variable dimension. With max_batch_size > 0
dim 0 of every input and output must be -1: the server concatenates concurrent requests
along it and splits the outputs back. Input arrays may be read-only views of the request
bytes: copy before writing to them. predict may run in several threads at once (always
without batching; with batching when max concurrent batches > 1): guard shared state.

Two optional declarations feed the model configuration (Triton's ModelConfig) and its
classification extension:

        label_files = {"probs": "labels.txt"}   # output -> labels file, one label a line
        input_formats = {"image": "NCHW"}       # input -> image layout (NCHW / NHWC)

A client that asks for an output with `class_count` k gets its top k as BYTES
"value:index:label" (labels from that file; relative paths are beside the model: next to
its artifact, else to the class's source file), or "value:index" for an output without one.

A streaming (decoupled) model implements `generate` instead of (or as well as) predict:
an async or plain generator yielding one output dict per response.

`request_metadata()` in predict or generate gives the gRPC metadata of the request being
answered, e.g. `x-modelgw-subject`: the caller the gateway verified. It is empty under
dynamic batching, where one predict call answers several callers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelgw.oip.codec import DATATYPES

Tensors = dict[str, np.ndarray]

# the invocation metadata of the request being answered; set by the runtime server
REQUEST_METADATA: ContextVar[tuple[tuple[str, str | bytes], ...]] = ContextVar("modelgw_request_metadata", default=())


def request_metadata() -> dict[str, str]:
    """The text metadata of the request being answered (lower-case keys). Inside predict
    without dynamic batching, and inside generate; elsewhere empty."""
    return {key: value for key, value in REQUEST_METADATA.get() if isinstance(value, str)}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A named, typed, shaped tensor of a model's signature (-1: any size). An optional
    input may be left out of a request (like Triton's `optional: true`)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool

    def __init__(self, name: str, datatype: str, shape: Sequence[int], optional: bool = False) -> None:
        datatype = datatype.upper()
        if datatype not in DATATYPES:
            raise ValueError(
                f"tensor '{name}': unknown datatype '{datatype}'; "
                f"expected one of {', '.join(sorted(DATATYPES))}"
            )
        dims = tuple(int(d) for d in shape)
        if any(d < -1 for d in dims):
            raise ValueError(f"tensor '{name}': shape {list(dims)} has a dimension below -1")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "datatype", datatype)
        object.__setattr__(self, "shape", dims)
        object.__setattr__(self, "optional", bool(optional))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        """From {"name": ..., "datatype": ..., "shape": [...]} (sidecar files, registry)."""
        try:
            return cls(str(data["name"]), str(data["datatype"]), list(data["shape"]), bool(data.get("optional", False)))
        except KeyError as missing:
            raise ValueError(f"tensor spec {dict(data)} lacks {missing}") from None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
        if self.optional:
            data["optional"] = True
        return data


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """What ModelMetadata answers, plus the batching contract."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    platform: str = "python"
    max_batch_size: int = 0


class Model:
    """Base class of every model. Subclasses set the class attributes or fill them in load()."""

    platform: str = "python"
    inputs: Sequence[TensorSpec] = ()
    outputs: Sequence[TensorSpec] = ()
    max_batch_size: int = 0
    status_message: str = ""  # set in load(): shown with READY in the endpoint record (e.g. the LLM engine chosen)
    label_files: Mapping[str, str] = {}    # output name -> classification labels file (see the module docstring)
    input_formats: Mapping[str, str] = {}  # input name -> "NCHW" | "NHWC" (image inputs)

    def __init__(
        self,
        name: str,
        version: str = "1",
        uri: str = "",
        options: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.uri = uri
        self.options: dict[str, str] = dict(options or {})

    def load(self) -> None:
        """Read weights and set inputs/outputs. Blocking; the server runs it in a thread."""

    @property
    def metadata(self) -> ModelMetadata:
        return ModelMetadata(
            inputs=tuple(self.inputs),
            outputs=tuple(self.outputs),
            platform=self.platform,
            max_batch_size=int(self.max_batch_size),
        )

    def predict(self, inputs: Tensors, parameters: Mapping[str, Any]) -> Tensors:
        """Answer one batch. Blocking; runs in a thread pool (frameworks release the GIL)."""
        raise NotImplementedError(f"model '{self.name}' streams: call ModelStreamInfer")

    def generate(
        self, inputs: Tensors, parameters: Mapping[str, Any]
    ) -> AsyncIterator[Tensors] | Iterator[Tensors]:
        """Answer one request with several responses (an async or a plain generator).

        A plain generator is advanced in the thread pool, so it may block."""
        raise NotImplementedError

    def unload(self) -> None:
        """Free resources. Blocking; runs in a thread after in-flight requests drained."""

    # -- what the server asks about the implementation
    @property
    def streaming(self) -> bool:
        """True when the class implements generate (a decoupled model)."""
        return type(self).generate is not Model.generate

    @property
    def has_predict(self) -> bool:
        """True when the class implements predict."""
        return type(self).predict is not Model.predict
