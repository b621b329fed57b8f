"""The `pytorch` kind: torch.export programs (.pt2, the default) and TorchScript files.

URI: a model file, or a directory holding model.pt2 / model.pt (or exactly one such file;
model.pt2 wins where both are there). Files ending in .pt2 are torch.export programs
(torch.export.save); anything else is TorchScript (torch.jit.save). PyTorch has deprecated
TorchScript: it keeps working here, but export new models with torch.export:

    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, "model.pt2")

Signature (the tensors clients see):
- .pt2 programs carry their signature: inputs are named after forward's arguments,
  datatypes and shapes come from the exported program (dynamic dims -> -1), outputs are
  named output_0, output_1, ... A sidecar (below), when present, overrides all of this,
  e.g. to name the outputs or set max_batch_size.
- TorchScript has no typed signature, so a JSON sidecar declares it. It sits next to the
  model file with the same stem (model.pt -> model.json), or the option `config=PATH`
  names it:
      {"inputs":  [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
       "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
       "max_batch_size": 16}
  forward() receives the inputs positionally in this order and returns a tensor, a
  tuple/list of tensors in output order, or a dict keyed by output name.
BYTES inputs reach TorchScript as (nested) lists of str; List[str] outputs become BYTES.

Options: threads=N (torch intra-op threads; default torch's, one per core),
device=cpu|cuda:N (default cpu), config=PATH (the sidecar).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelgw.runtimes.errors import InferenceError, ModelLoadError
from modelgw.runtimes.model import Model, Tensors, TensorSpec
from modelgw.runtimes.storage import find_model_file, local_path

TORCH_DATATYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "UINT8",
    torch.uint16: "UINT16",
    torch.uint32: "UINT32",
    torch.uint64: "UINT64",
    torch.int8: "INT8",
    torch.int16: "INT16",
    torch.int32: "INT32",
    torch.int64: "INT64",
    torch.float16: "FP16",
    torch.float32: "FP32",
    torch.float64: "FP64",
    torch.bfloat16: "BF16",
}

MODEL_SUFFIXES = (".pt", ".pt2", ".pth", ".ts", ".torchscript")


def read_sidecar(path: Path) -> dict[str, Any]:
    """The signature JSON: {"inputs": [...], "outputs": [...], "max_batch_size": N}."""
    try:
        data = json.loads(path.read_text())
        return {
            "inputs": [TensorSpec.from_dict(t) for t in data.get("inputs", [])],
            "outputs": [TensorSpec.from_dict(t) for t in data.get("outputs", [])],
            "max_batch_size": int(data.get("max_batch_size", 0)),
        }
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"'{path}': not a valid signature file: {exc}") from exc


def _spec_from_fake(name: str, value: Any, role: str) -> TensorSpec:
    if not isinstance(value, torch.Tensor):
        raise ModelLoadError(f"{role} '{name}' of the exported program is not a tensor ({type(value).__name__})")
    datatype = TORCH_DATATYPES.get(value.dtype)
    if datatype is None:
        raise ModelLoadError(f"{role} '{name}' has dtype {value.dtype}, which OIP cannot carry")
    return TensorSpec(name, datatype, [d if isinstance(d, int) else -1 for d in value.shape])


def _to_torch(array: np.ndarray, spec: TensorSpec | None, device: torch.device) -> Any:
    if array.dtype == object:  # BYTES: TorchScript takes List[str]
        return np.vectorize(lambda b: b.decode("utf-8", "surrogateescape") if isinstance(b, bytes) else str(b),
                            otypes=[object])(array).tolist()
    if not array.flags.writeable:
        # views of the request's immutable bytes: torch may write in place, so copy
        array = array.copy()
    tensor = torch.from_numpy(array)
    if spec is not None and spec.datatype == "BF16":
        tensor = tensor.to(torch.bfloat16)
    return tensor if device.type == "cpu" else tensor.to(device)


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.numpy()
    if isinstance(value, (list, tuple)):  # List[str] and friends
        return np.array(value, dtype=object)
    return np.asarray(value)


class PyTorchModel(Model):
    platform = "pytorch_libtorch"
    _arity: int | None = None  # forward's number of inputs, where the file tells
    # Model's own, declared again for mypy, which sees `modelgw.runtimes.model` only as
    # an untyped import (the package maps the top-level runtimes/ directory)
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]
    max_batch_size: int

    def load(self) -> None:
        path = find_model_file(local_path(self.uri), MODEL_SUFFIXES, ("model.pt2", "model.pt"))
        if "threads" in self.options:
            torch.set_num_threads(int(self.options["threads"]))
        self._device = torch.device(self.options.get("device", "cpu"))
        sidecar_path = Path(self.options["config"]) if "config" in self.options else path.with_suffix(".json")
        sidecar = read_sidecar(sidecar_path) if sidecar_path.is_file() or "config" in self.options else None

        if path.suffix == ".pt2":
            self._load_exported(path)
        else:
            self._load_torchscript(path)
        if sidecar is not None:
            self.inputs = sidecar["inputs"] or self.inputs
            self.outputs = sidecar["outputs"] or self.outputs
            self.max_batch_size = sidecar["max_batch_size"] or self.max_batch_size
        if not self.inputs or not self.outputs:
            raise ModelLoadError(
                f"'{path}': no signature; write {sidecar_path.name} next to it with "
                '{"inputs": [{"name", "datatype", "shape"}...], "outputs": [...]}'
            )
        arity = self._arity
        if arity is not None and arity != len(self.inputs):
            raise ModelLoadError(
                f"'{path}': forward takes {arity} inputs but the signature declares {len(self.inputs)}"
            )
        self._input_specs = {s.name: s for s in self.inputs}
        self._input_order = [s.name for s in self.inputs]
        self._output_names = [s.name for s in self.outputs]

    def _load_torchscript(self, path: Path) -> None:
        try:
            module = torch.jit.load(str(path), map_location=self._device)
        except Exception as exc:
            raise ModelLoadError(
                f"'{path}': not a TorchScript file ({type(exc).__name__}: {exc}); save models with "
                "torch.jit.save(torch.jit.script(m)) or torch.export.save(...) as .pt2"
            ) from exc
        module.eval()
        self._module = module
        try:
            arguments = module.forward.schema.arguments
            self._arity = len([a for a in arguments if a.name != "self"])
        except (AttributeError, RuntimeError):
            self._arity = None

    def _load_exported(self, path: Path) -> None:
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise ModelLoadError(f"'{path}': not a torch.export program ({type(exc).__name__}: {exc})") from exc
        self.platform = "pytorch_export"
        signature = program.graph_signature
        user_inputs = set(signature.user_inputs)
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        for node in program.graph.nodes:
            if node.op == "placeholder" and node.name in user_inputs:
                inputs.append(_spec_from_fake(node.name, node.meta.get("val"), "input"))
            elif node.op == "output":
                values = node.args[0]
                user_values = values[len(values) - len(signature.user_outputs):]
                for i, value in enumerate(user_values):
                    outputs.append(_spec_from_fake(f"output_{i}", getattr(value, "meta", {}).get("val"), "output"))
        self.inputs = inputs
        self.outputs = outputs
        module = program.module()
        self._module = module if self._device.type == "cpu" else module.to(self._device)
        self._arity = len(inputs)

    def predict(self, inputs: Tensors, parameters: Mapping[str, Any]) -> Tensors:
        specs, device = self._input_specs, self._device
        with torch.inference_mode():
            args = [_to_torch(inputs[name], specs[name], device) for name in self._input_order]
            result = self._module(*args)
        names = self._output_names
        if isinstance(result, Mapping):
            return {name: _to_numpy(value) for name, value in result.items()}
        if isinstance(result, (tuple, list)) and len(names) > 1:
            if len(result) != len(names):
                raise InferenceError(
                    f"model '{self.name}' returned {len(result)} outputs, its signature declares {len(names)}"
                )
            return {name: _to_numpy(value) for name, value in zip(names, result, strict=True)}
        return {names[0]: _to_numpy(result)}

    def unload(self) -> None:
        self._module = None
