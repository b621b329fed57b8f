"""The files `modelgw apply -f` reads and `modelgw get -o yaml|json` writes.

A file holds one or many documents, in YAML (several separated by `---`) or JSON (one
object, a list of objects, or {"kind": "List", "items": [...]}). Each document says what
it is and carries the record's fields exactly as in protos/registry.proto:

    kind: Runtime                 # Runtime, Model, Job, Stream or GatewayDefaults
    spec:                         # a RuntimeSpec / ModelSpec (snake_case or lowerCamelCase)
      name: torch
      kind: pytorch
      model_formats: [torchscript]
      replicas: 2
    ---
    kind: Model
    revision: 42                  # optional: apply only if the record is still at revision 42
    spec:                         # (0: create only; absent: create or replace)
      name: resnet
      versions:
        - {version: "1", uri: /models/resnet/1, format: torchscript, runtime: torch}
      traffic: {"1": 100}

Jobs and streams take a JobSpec / StreamSpec (their model must exist), and GatewayDefaults
the one record named "default" (`spec: {name: default, per_tenant: {...}}`).

`get -o yaml` writes the same documents with `revision` set (and a runtime's, job's or
stream's `status`, which apply ignores), so get, edit and apply round-trips with optimistic concurrency: the
apply fails with a conflict if someone changed the record in between.

`read_document` is the one reader of a document, for the CLI's files and for the REST admin
API's bodies alike, so a body's `revision` means there exactly what it means here. The REST
API also takes a bare spec, and a record as its GET answers it (`revision` and
`create_revision` as strings, as the proto3 JSON mapping writes int64); `create_revision`
and `status` are read-only and ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml
from google.protobuf.message import Message

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry import codec
from modelgw.registry.errors import ValidationError
from modelgw.registry.keys import KINDS

# document kind -> its spec message / its plural (the key path), from the one table of kinds
SPEC_TYPES: dict[str, type[Message]] = {k.document: k.message for k in KINDS if k.applied}
PLURAL: dict[str, str] = {k.document: k.path.rstrip("/") for k in KINDS if k.document}
DOCUMENT_FIELDS = ("kind", "revision", "spec", "status", "create_revision")


@dataclass
class Document:
    kind: str  # a document kind of keys.KINDS: "Runtime", "Model", "Job", "Stream", "GatewayDefaults"
    spec: Any  # its spec message: RuntimeSpec, ModelSpec, ...
    revision: int | None  # expected revision, when the document gives one
    source: str  # where it came from, for error messages: "models.yaml#2"

    def expected_revision(self, outside: int | None, outside_name: str) -> int | None:
        """The expected revision of applying this document when the caller also gave one
        outside it (an HTTP If-Match): either alone counts; both must agree, because which
        of two different revisions the writer meant cannot be known."""
        if outside is None:
            return self.revision
        if self.revision is not None and self.revision != outside:
            raise ValidationError(
                f"{self.source}: {PLURAL[self.kind]}/{self.spec.name or '<unnamed>'}: revision: the body says "
                f"{self.revision} but {outside_name} says {outside}; send one of them, or the same revision in both"
            )
        return outside


def parse_documents(text: str, source: str) -> list[Document]:
    """Every document of a file, parsed and type-checked (not yet validated: the store
    does that). Raises ValidationError naming the file and document."""
    stripped = text.lstrip()
    try:
        if source.endswith(".json") or stripped.startswith(("{", "[")):
            loaded = [json.loads(text)]
        else:
            loaded = list(yaml.safe_load_all(text))
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValidationError(f"{source}: invalid YAML{where}: {problem}") from None
    items: list[Any] = []
    for item in loaded:
        if isinstance(item, list):
            items.extend(item)
        elif isinstance(item, dict) and item.get("kind") == "List":
            items.extend(item.get("items") or [])
        elif item is not None:
            items.append(item)
    if not items:
        raise ValidationError(f"{source}: no documents found (expected kind and spec)")
    multiple = len(items) > 1
    return [read_document(item, f"{source}#{i + 1}" if multiple else source) for i, item in enumerate(items)]


def read_document(item: Any, source: str, kind: str | None = None) -> Document:
    """One document as parsed JSON or YAML: its spec, type-checked (not yet validated: the
    store does that), and the revision it expects. With `kind` (a REST URL says it), the
    document's kind may be left out but must match, and a bare spec (no `spec` field) is
    accepted too, expecting no revision. Raises ValidationError naming `source` and field."""
    if kind is not None and not (isinstance(item, dict) and "spec" in item):
        what = f"{PLURAL[kind]}/{item.get('name') or '<unnamed>'}" if isinstance(item, dict) else PLURAL[kind]
        return Document(kind=kind, spec=codec.from_dict(item, SPEC_TYPES[kind], what), revision=None, source=source)
    if not isinstance(item, dict):
        raise ValidationError(f"{source}: expected a mapping with kind and spec, got {type(item).__name__}")
    unknown = [str(k) for k in item if k not in DOCUMENT_FIELDS]
    if unknown:
        raise ValidationError(f"{source}: unknown field {unknown[0]!r} (a document has: {', '.join(DOCUMENT_FIELDS)})")
    if kind is not None and item.get("kind", kind) != kind:
        raise ValidationError(f"{source}: kind: {item['kind']!r} sent to the {PLURAL[kind]} API (expected {kind!r})")
    kind = item.get("kind", kind)
    if kind == "Endpoint":
        raise ValidationError(f"{source}: kind: endpoints are registered by runtime replicas and cannot be applied")
    if kind not in SPEC_TYPES:
        got = f"{kind!r} is not" if kind else "required:"
        raise ValidationError(f"{source}: kind: {got} one of {', '.join(SPEC_TYPES)}")
    spec = item.get("spec")
    if spec is None:
        raise ValidationError(f"{source}: spec: required")
    name = spec.get("name") if isinstance(spec, dict) else None
    what = f"{PLURAL[kind]}/{name if isinstance(name, str) and name else '<unnamed>'}"
    revision = item.get("revision")
    if isinstance(revision, str) and revision.isdigit():
        revision = int(revision)  # the proto3 JSON mapping writes int64 as a string
    if revision is not None and (isinstance(revision, bool) or not isinstance(revision, int) or revision < 0):
        raise ValidationError(f"{source}: {what}: revision: expected a whole number of 0 or more, got {revision!r}")
    message = codec.from_dict(spec, SPEC_TYPES[kind], what)
    return Document(kind=kind, spec=message, revision=revision, source=source)


# ---------------------------------------------------------------- output


def model_document(record: rpb.ModelRecord) -> dict[str, Any]:
    return {"kind": "Model", "revision": record.revision, "spec": codec.to_dict(record.spec)}


def runtime_document(record: rpb.RuntimeRecord) -> dict[str, Any]:
    return _with_status("Runtime", record)


def job_document(record: rpb.JobRecord) -> dict[str, Any]:
    return _with_status("Job", record)


def stream_document(record: rpb.StreamRecord) -> dict[str, Any]:
    return _with_status("Stream", record)


def gateway_defaults_document(record: rpb.GatewayDefaultsRecord) -> dict[str, Any]:
    return {"kind": "GatewayDefaults", "revision": record.revision, "spec": codec.to_dict(record.spec)}


def _with_status(kind: str, record: Any) -> dict[str, Any]:
    document = {"kind": kind, "revision": record.revision, "spec": codec.to_dict(record.spec)}
    if record.HasField("status"):
        document["status"] = codec.to_dict(record.status)
    return document


def endpoint_document(endpoint: rpb.Endpoint) -> dict[str, Any]:
    return {"kind": "Endpoint", "spec": codec.to_dict(endpoint)}


def dump_yaml(documents: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False, allow_unicode=True)


def dump_json(documents: list[dict[str, Any]], single: bool) -> str:
    body: Any = documents[0] if single else {"kind": "List", "items": documents}
    return json.dumps(body, indent=2, ensure_ascii=False) + "\n"
