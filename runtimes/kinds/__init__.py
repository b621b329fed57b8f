"""Runtime kinds: a kind name -> the factory that builds a Model from (name, version, uri,
options). Kinds are imported lazily, so serving ONNX never imports torch.

A new kind plugs in three ways:
- from another distribution (a platform team's package), declare an entry point in the
  group `modelgw.runtime_kinds`: installed where the runtime runs, it is served, listed by
  `modelgw runtime serve --help`, and the registry and reconciler take it like any kind
  (they check the kind only as a name: they cannot see what a runtime's machine has);
- call `register_kind("mykind", factory_or_"pkg.module:Factory")` before serving;
- add it to BUILTIN_KINDS below (kinds that ship with modelgw).
A factory is any callable `(name, version, uri, options) -> Model`; a Model subclass is one.
A kind that is none of these is refused when the runtime starts (resolve_kind).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from modelgw.runtimes.errors import ModelLoadError
from modelgw.runtimes.model import Model

ModelFactory = Callable[[str, str, str, Mapping[str, str]], Model]

ENTRY_POINT_GROUP = "modelgw.runtime_kinds"

BUILTIN_KINDS: dict[str, str] = {
    "pytorch": "modelgw.runtimes.kinds.pytorch:PyTorchModel",
    "onnx": "modelgw.runtimes.kinds.onnx:OnnxModel",
    "python": "modelgw.runtimes.kinds.python:create_python_model",
    "llm": "modelgw.runtimes.llm.runtime:LLMModel",
}

_registered: dict[str, ModelFactory | str] = {}


def register_kind(name: str, factory: ModelFactory | str) -> None:
    """Make `name` a kind: a factory, or its import path 'pkg.module:Attr' (imported on use)."""
    _registered[name] = factory


def kind_names() -> list[str]:
    """Every kind this process can serve: built in, registered, or installed as an entry point."""
    names = set(BUILTIN_KINDS) | set(_registered)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def resolve_kind(name: str) -> ModelFactory:
    """The factory of a kind; ModelLoadError naming the installed kinds if there is none."""
    target: ModelFactory | str | None = _registered.get(name) or BUILTIN_KINDS.get(name)
    if target is None:
        for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
            target = _load_entry_point(ep)
            break
    if target is None:
        raise ModelLoadError(
            f"unknown runtime kind '{name}' (not built in, and no installed package declares it as a "
            f"'{ENTRY_POINT_GROUP}' entry point); installed kinds: {', '.join(kind_names())}"
        )
    if isinstance(target, str):
        target = import_object(target)
    if not callable(target):
        raise ModelLoadError(f"runtime kind '{name}' is not callable: {target!r}")
    return target


def _load_entry_point(ep: EntryPoint) -> Any:
    distribution = f" of {ep.dist.name}" if ep.dist is not None else ""
    try:
        return ep.load()
    except Exception as exc:  # an installed package's import error, named as such
        raise ModelLoadError(
            f"runtime kind '{ep.name}' (entry point '{ep.value}'{distribution}): cannot load: {type(exc).__name__}: {exc}"
        ) from exc


def import_object(reference: str) -> Any:
    """The object a reference names: 'pkg.module:Attr' (importable module) or
    'path/to/file.py:Attr' / 'file:///path/file.py:Attr' (a source file)."""
    module_ref, sep, attr = reference.rpartition(":")
    if not sep or not module_ref or not attr:
        raise ModelLoadError(f"'{reference}' is not an import path; expected 'pkg.module:Name' or 'file.py:Name'")
    if module_ref.startswith("file://"):
        module_ref = module_ref[len("file://"):]
    try:
        if module_ref.endswith(".py"):
            module = _import_file(Path(module_ref).expanduser())
        else:
            module = importlib.import_module(module_ref)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot import '{module_ref}': {type(exc).__name__}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ModelLoadError(f"'{module_ref}' has no attribute '{attr}'") from None


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise ModelLoadError(f"'{path}': no such python file")
    path = path.resolve()
    # A stable, unique module name per file, so pickling and tracebacks show something useful.
    name = f"modelgw_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"'{path}': not an importable python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
