"""Validation of registry records, with one message per problem that names the record and
the field: "models/resnet: versions[1].uri: scheme 's3' is not supported ...".

`check_*` raise ValidationError listing every problem found; `*_problems` return the list.
Checks that need other records (a model's runtimes) take them as arguments: the store reads
them inside the same etcd transaction that guards the write.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote, urlsplit

from modelgw.protos import registry_pb2 as rpb
from modelgw.registry.errors import ValidationError

MAX_REPLICAS = 100
MAX_GPUS = 64
MAX_TIMEOUT_SECONDS = 3600.0
MAX_BATCH_SIZE = 65536
MAX_QUEUE_DELAY_MS = 60_000.0
MAX_DESCRIPTION = 1024

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Model names as Triton allows them in practice ("simple_string", "resnet50.v1"): never a
# Kubernetes object name (runtimes are), but an etcd key segment, a REST path segment and a
# metrics label, so no '/', no spaces, and no leading '.' (which also rules out '.' and '..').
MAX_MODEL_NAME = 128
_MODEL_NAME = re.compile(rf"^[A-Za-z0-9_][A-Za-z0-9._-]{{0,{MAX_MODEL_NAME - 1}}}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_FORMAT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# A runtime kind is checked as a name only: kinds plug in as entry points where the runtime
# runs (modelgw.runtimes.kinds), which the registry cannot see; a runtime whose machine
# lacks its kind refuses to start, saying so, and the reconciler's status shows that.
_KIND = _FORMAT
_INSTANCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_TOKEN = re.compile(r"^\S{1,256}$")
_QUANTITY = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][-+]?\d+)?$")
_SUFFIX_SCALE = {
    None: 1.0, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
    "E": 1e18, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60,
}

DNS_LABEL_RULE = "lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters"
MODEL_NAME_RULE = (
    f"letters, digits, '_', '-' and '.', starting with a letter, digit or '_', at most {MAX_MODEL_NAME} characters"
)


def is_dns_label(name: str) -> bool:
    return bool(_DNS_LABEL.fullmatch(name))


def is_model_name(name: str) -> bool:
    return bool(_MODEL_NAME.fullmatch(name))  # fullmatch: `$` alone lets a trailing newline in


def name_problem(kind: str, name: str) -> str | None:
    """Why `name` cannot name a record of `kind` ("models", "runtimes"), or None: models take
    Triton's names, every other record a DNS label (runtimes become Kubernetes objects)."""
    if kind == "models":
        return None if is_model_name(name) else f"{name!r} is not a model name ({MODEL_NAME_RULE})"
    return None if is_dns_label(name) else f"{name!r} is not a DNS label ({DNS_LABEL_RULE})"


def parse_quantity(text: str) -> float | None:
    """The value of a Kubernetes quantity ("500m" -> 0.5, "1Gi" -> 2**30); None if invalid."""
    match = _QUANTITY.match(text)
    if not match:
        return None
    number, suffix = float(match.group(1)), match.group(2)
    if suffix and suffix[0] in "eE":
        return number * 10.0 ** int(suffix[1:])
    return number * _SUFFIX_SCALE[suffix]


class _Problems:
    """Collects problems for one record, prefixing each with "<record>: <field>: "."""

    def __init__(self, record: str) -> None:
        self.record = record
        self.items: list[str] = []

    def add(self, field: str, message: str) -> None:
        self.items.append(f"{self.record}: {field}: {message}")

    def name(self, field: str, value: str, kind: str = "runtimes") -> None:
        """A record name of `kind`: a DNS label but for models (name_problem)."""
        problem = name_problem(kind, value) if value else "required"
        if problem:
            self.add(field, problem)

    def labels(self, field: str, labels: Mapping[str, str]) -> None:
        for key, value in labels.items():
            prefix, slash, name = key.rpartition("/")
            if not _LABEL_NAME.match(name) or (slash and not _LABEL_PREFIX.match(prefix)):
                self.add(f"{field}[{key!r}]", "not a valid label key (e.g. 'team' or 'example.com/team')")
            if not _LABEL_VALUE.match(value):
                self.add(
                    f"{field}[{key!r}]",
                    f"value {value!r} is not a valid label value "
                    "(at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)",
                )

    def tokens(self, field: str, values: Iterable[str]) -> None:
        for i, value in enumerate(values):
            if not _TOKEN.match(value):
                self.add(f"{field}[{i}]", f"{value!r} must be a non-empty word without spaces")


def _record(kind: str, name: str) -> str:
    return f"{kind}/{name or '<unnamed>'}"


# ---------------------------------------------------------------- runtimes


def runtime_problems(spec: rpb.RuntimeSpec) -> list[str]:
    p = _Problems(_record("runtimes", spec.name))
    p.name("name", spec.name)
    if not spec.kind:
        p.add("kind", "required (e.g. pytorch, onnx, python, llm, or the name of an installed kind)")
    elif not _KIND.match(spec.kind):
        p.add("kind", f"{spec.kind!r} is not a kind name (lowercase letters, digits, '.', '_', '-', at most 63)")
    if spec.image and any(c.isspace() for c in spec.image):
        p.add("image", f"{spec.image!r} must not contain spaces")
    for i, arg in enumerate(spec.command):
        if not arg:
            p.add(f"command[{i}]", "must not be empty")
    if not spec.model_formats:
        # the runtime declares what its kind loads; models are checked against it
        p.add("model_formats", "at least one model format is required: what its kind loads (e.g. torchscript, onnx)")
    seen_formats: dict[str, int] = {}
    for i, fmt in enumerate(spec.model_formats):
        if not _FORMAT.match(fmt):
            p.add(f"model_formats[{i}]", f"{fmt!r} is not a format name (lowercase letters, digits, '.', '_', '-')")
        elif fmt in seen_formats:
            p.add(f"model_formats[{i}]", f"{fmt!r} duplicates model_formats[{seen_formats[fmt]}]")
        else:
            seen_formats[fmt] = i
    if spec.replicas > MAX_REPLICAS:
        p.add("replicas", f"{spec.replicas} is more than the maximum of {MAX_REPLICAS}")
    if spec.HasField("resources"):
        _resources(p, spec.resources)
    for key in spec.env:
        if not _ENV_NAME.match(key):
            p.add(f"env[{key!r}]", "not a valid environment variable name (letters, digits, '_', not starting with a digit)")
    p.labels("labels", spec.labels)
    p.labels("node_selector", spec.node_selector)
    for key in spec.options:
        if not key or "=" in key or any(c.isspace() for c in key):
            p.add(f"options[{key!r}]", "option names must be non-empty, without '=' or spaces")
    return p.items


def _resources(p: _Problems, resources: rpb.Resources) -> None:
    for field, example in (("cpu", "500m or 2"), ("memory", "512Mi or 2Gi")):
        text = getattr(resources, field)
        if not text:
            continue
        value = parse_quantity(text)
        if value is None:
            p.add(f"resources.{field}", f"{text!r} is not a Kubernetes quantity (e.g. {example})")
        elif value <= 0:
            p.add(f"resources.{field}", f"{text!r} must be more than zero")
        elif field == "cpu" and value < 1e-3:
            p.add("resources.cpu", f"{text!r} is less than the smallest unit, 1m")
        elif field == "memory" and value != math.floor(value):
            p.add("resources.memory", f"{text!r} is not a whole number of bytes")
    if resources.gpu > MAX_GPUS:
        p.add("resources.gpu", f"{resources.gpu} is more than the maximum of {MAX_GPUS}")


def check_runtime(spec: rpb.RuntimeSpec) -> None:
    problems = runtime_problems(spec)
    if problems:
        raise ValidationError(problems)


# ---------------------------------------------------------------- models


def model_problems(spec: rpb.ModelSpec, runtimes: Mapping[str, rpb.RuntimeSpec] | None = None) -> list[str]:
    """Problems of a model on its own and, when `runtimes` is given, against the runtimes
    it names (format supported). A runtime missing from `runtimes` is not reported here:
    that is referential integrity (store.IntegrityError), not a property of the record."""
    p = _Problems(_record("models", spec.name))
    p.name("name", spec.name, "models")
    if not spec.versions:
        p.add("versions", "at least one version is required")
    seen: dict[str, int] = {}
    for i, version in enumerate(spec.versions):
        field = f"versions[{i}]"
        if not version.version:
            p.add(f"{field}.version", "required")
        elif not _VERSION.match(version.version):
            p.add(
                f"{field}.version",
                f"{version.version!r} is not a version name (letters, digits, '.', '_', '-', at most 63)",
            )
        elif version.version in seen:
            p.add(f"{field}.version", f"{version.version!r} duplicates versions[{seen[version.version]}]")
        else:
            seen[version.version] = i
        if version.format == "python" and _IMPORT_REF.match(version.uri):
            pass  # the python kind's URI may name a class: pkg.module:Class
        else:
            _uri(p, f"{field}.uri", version.uri)
        if not version.format:
            p.add(f"{field}.format", "required (a format of its runtime, e.g. torchscript)")
        p.name(f"{field}.runtime", version.runtime)
        if runtimes is not None:
            _format_loaded(p, field, version, runtimes)
    _traffic(p, spec, seen)
    if spec.HasField("access"):
        _access(p, spec.access)
    if spec.HasField("limits"):
        _limits(p, spec.limits)
    p.labels("labels", spec.labels)
    if len(spec.description) > MAX_DESCRIPTION:
        p.add("description", f"longer than {MAX_DESCRIPTION} characters")
    return p.items


# 'pkg.module:Class': what a model of format "python" may give as its URI
_IMPORT_REF = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


# pvc://CLAIM/PATH: PATH inside the PersistentVolumeClaim CLAIM, which the kubernetes
# backend mounts read-only at PVC_MOUNT_ROOT/CLAIM in the runtime's pods; the runtime reads
# the URI as that path (runtimes.storage). The mount point is this contract's, so that the
# reconciler and the runtimes, peers, both read it from here.
PVC_MOUNT_ROOT = "/mnt/models"
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # a DNS subdomain, as claim names are


def parse_pvc_uri(uri: str) -> tuple[str, str]:
    """(claim, path inside it: %-decoded, without a leading '/') of a pvc://CLAIM[/PATH] URI; raises
    ValueError saying what is wrong otherwise."""
    parts = urlsplit(uri)
    if parts.scheme != "pvc":
        raise ValueError(f"{uri!r} is not a pvc://CLAIM/PATH URI")
    if not _CLAIM.match(parts.netloc):
        raise ValueError(f"{uri!r}: {parts.netloc!r} is not a claim name (lowercase letters, digits, '-' and '.')")
    if parts.query or parts.fragment:
        raise ValueError(f"{uri!r}: pvc:// URIs take no '?' or '#' parts")
    segments = [s for s in unquote(parts.path).split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise ValueError(f"{uri!r}: the path must not contain '.' or '..' (it stays inside the claim)")
    return parts.netloc, "/".join(segments)


def pvc_mount_path(claim: str) -> str:
    """Where the kubernetes backend mounts the claim in a runtime pod."""
    return f"{PVC_MOUNT_ROOT}/{claim}"


def _uri(p: _Problems, field: str, uri: str) -> None:
    if not uri:
        p.add(field, "required (an absolute local path, a file:// URI or pvc://CLAIM/PATH)")
        return
    if uri.startswith("/"):
        return
    parts = urlsplit(uri)
    if parts.scheme == "pvc":
        try:
            parse_pvc_uri(uri)
        except ValueError as exc:
            p.add(field, str(exc))
        return
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            p.add(field, f"{uri!r}: file:// URIs must not name a host (use file:///path)")
        elif not parts.path.startswith("/"):
            p.add(field, f"{uri!r}: file:// URIs need an absolute path (file:///path)")
        return
    if parts.scheme and len(parts.scheme) > 1:  # a Windows drive letter is not a scheme
        p.add(field, f"scheme {parts.scheme!r} is not supported (use an absolute local path, file:///path or pvc://CLAIM/PATH)")
    else:
        p.add(field, f"{uri!r} is a relative path; use an absolute local path or file:///path")


def _traffic(p: _Problems, spec: rpb.ModelSpec, versions: Mapping[str, int]) -> None:
    if not spec.traffic:
        return
    total = 0
    for version, weight in sorted(spec.traffic.items()):
        if version not in versions:
            known = ", ".join(v.version for v in spec.versions) or "none"
            p.add(f"traffic[{version!r}]", f"no such version (versions: {known})")
        if weight > 100:
            p.add(f"traffic[{version!r}]", f"weight {weight} is more than 100")
        total += weight
    if total != 100:
        p.add("traffic", f"weights sum to {total}, they must sum to 100")


def _access(p: _Problems, access: rpb.AccessPolicy) -> None:
    p.tokens("access.scopes", access.scopes)
    p.tokens("access.groups", access.groups)
    p.tokens("access.roles", access.roles)
    if access.public and (access.scopes or access.groups or access.roles):
        p.add("access.public", "a public model cannot also require scopes, groups or roles")


def _limits(p: _Problems, limits: rpb.ModelLimits) -> None:
    for field, value, maximum in (
        ("timeout_seconds", limits.timeout_seconds, MAX_TIMEOUT_SECONDS),
        ("max_queue_delay_ms", limits.max_queue_delay_ms, MAX_QUEUE_DELAY_MS),
    ):
        if not math.isfinite(value) or value < 0:
            p.add(f"limits.{field}", f"{value} must be a number of zero or more")
        elif value > maximum:
            p.add(f"limits.{field}", f"{value:g} is more than the maximum of {maximum:g}")
    if limits.max_batch_size > MAX_BATCH_SIZE:
        p.add("limits.max_batch_size", f"{limits.max_batch_size} is more than the maximum of {MAX_BATCH_SIZE}")


def _format_loaded(p: _Problems, field: str, version: rpb.ModelVersion, runtimes: Mapping[str, rpb.RuntimeSpec]) -> None:
    runtime = runtimes.get(version.runtime)
    if runtime is not None and version.format and version.format not in runtime.model_formats:
        supported = ", ".join(runtime.model_formats) or "none"
        p.add(
            f"{field}.format",
            f"runtime {version.runtime!r} does not load format {version.format!r} (it loads: {supported})",
        )


def check_model(spec: rpb.ModelSpec, runtimes: Mapping[str, rpb.RuntimeSpec] | None = None) -> None:
    problems = model_problems(spec, runtimes)
    if problems:
        raise ValidationError(problems)


def check_model_formats(spec: rpb.ModelSpec, runtimes: Mapping[str, rpb.RuntimeSpec]) -> None:
    """Only the check of a model against its runtimes (each loads its version's format),
    for a spec check_model already passed: the store runs it on each attempt of a write,
    against the runtimes that attempt read, instead of validating the whole spec again."""
    p = _Problems(_record("models", spec.name))
    for i, version in enumerate(spec.versions):
        _format_loaded(p, f"versions[{i}]", version, runtimes)
    if p.items:
        raise ValidationError(p.items)


def model_runtimes(spec: rpb.ModelSpec) -> list[str]:
    """The runtimes a model's versions name, in first-use order, without repeats."""
    return list(dict.fromkeys(v.runtime for v in spec.versions if v.runtime))


def uses_runtime(spec: rpb.ModelSpec, runtime: str) -> bool:
    return any(v.runtime == runtime for v in spec.versions)


# ---------------------------------------------------------------- endpoints and status


def endpoint_problems(endpoint: rpb.Endpoint) -> list[str]:
    p = _Problems(f"endpoints/{endpoint.runtime or '<unnamed>'}/{endpoint.instance or '<unnamed>'}")
    p.name("runtime", endpoint.runtime)
    if not endpoint.instance:
        p.add("instance", "required")
    elif not _INSTANCE.match(endpoint.instance):
        p.add("instance", f"{endpoint.instance!r} is not an instance name (letters, digits, '.', '_', '-')")
    host, sep, port = endpoint.address.rpartition(":")
    if not endpoint.address:
        p.add("address", "required (host:port of the replica's inference service)")
    elif not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        p.add("address", f"{endpoint.address!r} is not host:port")
    for i, model in enumerate(endpoint.models):
        if not model.name:
            p.add(f"models[{i}].name", "required")
    if not (0.0 <= endpoint.load.kv_cache_usage <= 1.0):
        p.add("load.kv_cache_usage", f"{endpoint.load.kv_cache_usage} must be between 0 and 1")
    return p.items


def check_endpoint(endpoint: rpb.Endpoint) -> None:
    problems = endpoint_problems(endpoint)
    if problems:
        raise ValidationError(problems)


def check_runtime_status(status: rpb.RuntimeStatus) -> None:
    p = _Problems(f"status/runtimes/{status.name or '<unnamed>'}")
    p.name("name", status.name)
    if p.items:
        raise ValidationError(p.items)
