"""The `python` kind: a platform team's own Model subclass, named by import path.

    modelgw runtime serve --kind python --model scale=modelgw.runtimes.examples.scale:Scale
    modelgw runtime serve --kind python --model m=./my_models.py:MyModel --option factor=3
    modelgw runtime serve --kind python --model m=/models/m1 --option class=pkg.mod:MyModel

The URI is the class reference ('pkg.module:Class', 'file.py:Class' or 'file:///…/file.py:Class'),
unless the option `class` names it: then the URI is the model's artifact location, handed
to the class as `self.uri` (resolve it with modelgw.runtimes.storage.local_path). Every
option reaches the model as `self.options`. See runtimes/examples/ for documented classes.
"""

from __future__ import annotations

from collections.abc import Mapping

from modelgw.runtimes.errors import ModelLoadError
from modelgw.runtimes.kinds import import_object
from modelgw.runtimes.model import Model


def create_python_model(name: str, version: str, uri: str, options: Mapping[str, str]) -> Model:
    reference = options.get("class") or uri
    artifact_uri = uri if options.get("class") else ""
    cls = import_object(reference)
    if not (isinstance(cls, type) and issubclass(cls, Model)):
        raise ModelLoadError(
            f"'{reference}' is not a subclass of modelgw.runtimes.model.Model; "
            "python-kind models subclass it and implement predict or generate"
        )
    model = cls(name, version, artifact_uri, options)
    if not (model.has_predict or model.streaming):
        raise ModelLoadError(f"'{reference}' implements neither predict nor generate")
    return model
