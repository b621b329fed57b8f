"""Validation of inference requests against a model's metadata.

Runs on the request's tensor descriptors (name, datatype, shape) before any tensor is
decoded, so a bad request costs little and its error names the tensor. The codec then
checks that the data matches the declared shape (element count, raw byte length).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from modelgw.oip.codec import check_dims
from modelgw.runtimes.errors import InvalidInput
from modelgw.runtimes.model import ModelMetadata, TensorSpec


class TensorDescriptor(Protocol):
    """What validation reads from a request tensor (protobuf InferInputTensor fits)."""

    name: str
    datatype: str
    shape: Sequence[int]


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class RequestValidator:
    """Checks requests for one loaded model; built once at load, used on every request.

    A model that declares no inputs (or no outputs) accepts any (free-form python models).
    """

    __slots__ = ("_input_names", "_inputs", "_max_batch_size", "_model", "_outputs", "_required")

    def __init__(self, model_name: str, metadata: ModelMetadata) -> None:
        self._model = model_name
        self._inputs: dict[str, TensorSpec] = {s.name: s for s in metadata.inputs}
        self._input_names = ", ".join(self._inputs)
        self._required = [s.name for s in metadata.inputs if not s.optional]
        self._outputs: dict[str, TensorSpec] = {s.name: s for s in metadata.outputs}
        self._max_batch_size = metadata.max_batch_size

    def check_inputs(self, tensors: Sequence[TensorDescriptor]) -> int:
        """Raise InvalidInput naming the first bad tensor (the codec's TensorError for a shape
        with too many dims); return the request's batch size (dim 0 for batching models, 1
        otherwise)."""
        specs = self._inputs
        if not specs:
            return 1
        batch = -1
        for tensor in tensors:
            spec = specs.get(tensor.name)
            if spec is None:
                raise InvalidInput(
                    f"input '{tensor.name}' is unknown to model '{self._model}'; "
                    f"its inputs are: {self._input_names}"
                )
            if tensor.datatype != spec.datatype:
                raise InvalidInput(
                    f"input '{tensor.name}' of model '{self._model}' has datatype "
                    f"{tensor.datatype or '(none)'}, expected {spec.datatype}"
                )
            shape = tensor.shape
            check_dims(tensor.name, shape)  # a TensorError, before the message below quotes the shape
            expected = spec.shape
            if len(shape) != len(expected) or any(
                e != -1 and e != d for e, d in zip(expected, shape, strict=True)  # lengths equal here
            ):
                raise InvalidInput(
                    f"input '{tensor.name}' of model '{self._model}' has shape "
                    f"{_shape_text(shape)}, expected {_shape_text(expected)} (-1: any size)"
                )
            if self._max_batch_size:
                rows = shape[0]
                if batch == -1:
                    batch = rows
                elif rows != batch:
                    raise InvalidInput(
                        f"input '{tensor.name}' of model '{self._model}' has batch size "
                        f"{rows} (dim 0) but the inputs before it have {batch}"
                    )
        if len(tensors) != len(specs):
            given = {t.name for t in tensors}
            missing = [name for name in self._required if name not in given]
            if missing:
                raise InvalidInput(
                    f"input '{missing[0]}' is missing; model '{self._model}' needs inputs: "
                    f"{', '.join(self._required)}"
                )
            if len(given) != len(tensors):
                raise InvalidInput(f"an input of model '{self._model}' is given more than once")
        if self._max_batch_size:
            if not tensors:  # every input optional and none given: no dim 0 to batch on
                raise InvalidInput(f"the request has no inputs; model '{self._model}' takes: {self._input_names}")
            if batch < 1 or batch > self._max_batch_size:
                raise InvalidInput(
                    f"batch size {batch} (dim 0 of input '{tensors[0].name}') is outside "
                    f"1..{self._max_batch_size}, the max batch size of model '{self._model}'"
                )
            return batch
        return 1

    def check_outputs(self, names: Iterable[str]) -> None:
        """Raise InvalidInput when a requested output does not exist."""
        if not self._outputs:
            return
        for name in names:
            if name not in self._outputs:
                raise InvalidInput(
                    f"requested output '{name}' is unknown to model '{self._model}'; "
                    f"its outputs are: {', '.join(self._outputs)}"
                )
