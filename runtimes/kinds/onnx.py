"""The `onnx` kind: an ONNX model run by onnxruntime; the signature comes from the graph.

URI: a .onnx file, or a directory holding model.onnx (or a single *.onnx file).
Symbolic or unknown dimensions become -1; element types map to OIP datatypes (string
tensors are BYTES). Options:
  threads=N          intra-op threads of the session (default: onnxruntime's choice)
  providers=A,B      execution providers (default CPUExecutionProvider)
Dynamic batching (--max-batch-size) needs dim 0 of every input and output to be dynamic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from modelgw.runtimes.errors import ModelLoadError
from modelgw.runtimes.model import Model, Tensors, TensorSpec
from modelgw.runtimes.storage import find_model_file, local_path

# onnxruntime's type strings -> OIP datatypes
ONNX_DATATYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _spec(node: Any, role: str) -> TensorSpec:
    datatype = ONNX_DATATYPES.get(node.type)
    if datatype is None:
        raise ModelLoadError(f"{role} '{node.name}' has type {node.type}, which OIP cannot carry here")
    shape = node.shape if isinstance(node.shape, (list, tuple)) else [-1]
    return TensorSpec(node.name, datatype, [d if isinstance(d, int) and d >= 0 else -1 for d in shape])


def _to_strings(array: np.ndarray) -> np.ndarray:
    """BYTES arrive as bytes objects; onnxruntime string tensors want str."""
    flat = [b.decode("utf-8", "surrogateescape") if isinstance(b, bytes) else str(b) for b in array.reshape(-1)]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape)


class OnnxModel(Model):
    platform = "onnxruntime_onnx"

    def load(self) -> None:
        import onnxruntime as ort

        path = find_model_file(local_path(self.uri), (".onnx",), ("model.onnx",))
        session_options = ort.SessionOptions()
        if "threads" in self.options:
            session_options.intra_op_num_threads = int(self.options["threads"])
        providers = self.options.get("providers", "CPUExecutionProvider").split(",")
        try:
            self._session = ort.InferenceSession(str(path), session_options, providers=providers)
        except Exception as exc:
            raise ModelLoadError(f"'{path}': onnxruntime cannot load it: {exc}") from exc
        self.inputs = [_spec(i, "input") for i in self._session.get_inputs()]
        self.outputs = [_spec(o, "output") for o in self._session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        self._string_inputs = frozenset(s.name for s in self.inputs if s.datatype == "BYTES")

    def predict(self, inputs: Tensors, parameters: Mapping[str, Any]) -> Tensors:
        feed = inputs
        if self._string_inputs:
            feed = {n: _to_strings(a) if n in self._string_inputs else a for n, a in inputs.items()}
        results = self._session.run(self._output_names, feed)
        return dict(zip(self._output_names, results, strict=True))

    def unload(self) -> None:
        self._session = None
