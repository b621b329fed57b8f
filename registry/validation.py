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
MAX_PARALLELISM = 256  # a job's infer calls in flight
MAX_IN_FLIGHT = 65536  # a stream replica's messages read and not yet acknowledged
MAX_BACKOFF_LIMIT = 100
MAX_TTL_SECONDS = 2**31 - 1  # Kubernetes' ttlSecondsAfterFinished is an int32
MAX_ROW_FAILURES = 1000  # failures kept in a JobStatus (rows_failed counts them all): etcd values stay small
MAX_BURST_SECONDS = 3600.0
# what a job or stream leaves at 0 means these (the proto's comments); checks compare against them
DEFAULT_JOB_BATCH_SIZE = 256
DEFAULT_JOB_PARALLELISM = 4
DEFAULT_STREAM_BATCH_SIZE = 32
DEFAULT_STREAM_MAX_IN_FLIGHT = 256
GATEWAY_DEFAULTS_NAME = "default"  # the one GatewayDefaults record

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
        p.add("kind", "required (e.g. pytorch, onnx, python, llm, external, or the name of an installed kind)")
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
    if spec.kind == EXTERNAL_KIND:
        _external(p, spec)
    return p.items


# A runtime of kind "external" is an OIP server that modelgw did not write, registered by
# `modelgw runtime attach` beside it: options.port is the port it serves gRPC on; with
# replicas the reconciler runs it (the local backend its `command`, with {port} filled in;
# the kubernetes backend its `image`, the adapter as a sidecar); with none, servers
# started elsewhere are attached by hand.
EXTERNAL_KIND = "external"
EXTERNAL_PORT_OPTION = "port"


def external_port(spec: rpb.RuntimeSpec) -> int | None:
    """The gRPC port of an external runtime's server (options.port), None if not a port."""
    text = spec.options.get(EXTERNAL_PORT_OPTION, "")
    return int(text) if text.isdigit() and 0 < int(text) < 65536 else None


def _external(p: _Problems, spec: rpb.RuntimeSpec) -> None:
    if EXTERNAL_PORT_OPTION not in spec.options:
        p.add(f"options[{EXTERNAL_PORT_OPTION!r}]", "required for kind 'external': the port the server serves OIP gRPC on")
    elif external_port(spec) is None:
        p.add(f"options[{EXTERNAL_PORT_OPTION!r}]", f"{spec.options[EXTERNAL_PORT_OPTION]!r} is not a port (1 to 65535)")
    if spec.replicas and not spec.command and not spec.image:
        p.add("command", "kind 'external' with replicas needs the server to run: its command (local backend, "
                         "'{port}' is its port) or its image (kubernetes backend); with replicas 0 attach servers by hand")


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
    if limits.HasField("per_tenant"):
        _tenant_limit(p, "limits.per_tenant", limits.per_tenant)


def _tenant_limit(p: _Problems, field: str, limit: rpb.TenantLimit) -> None:
    for name, value, maximum in (
        ("requests_per_second", limit.requests_per_second, math.inf),
        ("tokens_per_minute", limit.tokens_per_minute, math.inf),
        ("burst_seconds", limit.burst_seconds, MAX_BURST_SECONDS),
    ):
        if not math.isfinite(value) or value < 0:
            p.add(f"{field}.{name}", f"{value} must be a finite number of zero or more (0: no limit / the default)")
        elif value > maximum:
            p.add(f"{field}.{name}", f"{value:g} is more than the maximum of {maximum:g}")
    if limit.tenant_claim and not _TOKEN.match(limit.tenant_claim):
        p.add(f"{field}.tenant_claim", f"{limit.tenant_claim!r} must be a claim name without spaces (e.g. sub, tenant)")


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


# ---------------------------------------------------------------- gateway defaults


def gateway_defaults_problems(spec: rpb.GatewayDefaults) -> list[str]:
    p = _Problems(_record("gateway-defaults", spec.name))
    if spec.name != GATEWAY_DEFAULTS_NAME:
        given = f"{spec.name!r} is not allowed" if spec.name else "required"
        p.add("name", f"{given}: the one GatewayDefaults record is named {GATEWAY_DEFAULTS_NAME!r}")
    if spec.HasField("per_tenant"):
        _tenant_limit(p, "per_tenant", spec.per_tenant)
    return p.items


def check_gateway_defaults(spec: rpb.GatewayDefaults) -> None:
    problems = gateway_defaults_problems(spec)
    if problems:
        raise ValidationError(problems)


# ---------------------------------------------------------------- jobs and streams

# input files whose format the extension says (JobSpec.format FORMAT_UNSPECIFIED)
JOB_FORMAT_OF_EXTENSION = {".jsonl": rpb.JobSpec.JSONL, ".parquet": rpb.JobSpec.PARQUET}
_SECRET_REF = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/[-._A-Za-z0-9]{1,253}$")
_KAFKA_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
# a NATS subject: '.'-separated tokens without spaces; '*' and '>' wildcards only as whole tokens
_NATS_TOKEN = re.compile(r"^([^\s.*>]+|\*|>)$")
_NATS_NAME = re.compile(r"^[^\s.*>/\\]{1,255}$")  # JetStream stream and durable consumer names


def job_input_format(spec: rpb.JobSpec) -> int:
    """The input's format: the spec's, else what the input URI's extension says
    (FORMAT_UNSPECIFIED when neither says: job_problems refuses such a spec)."""
    if spec.format != rpb.JobSpec.FORMAT_UNSPECIFIED:
        return spec.format
    return JOB_FORMAT_OF_EXTENSION.get(_extension(spec.input_uri), rpb.JobSpec.FORMAT_UNSPECIFIED)


def _extension(uri: str) -> str:
    path = urlsplit(uri).path if "://" in uri else uri
    name = path.rstrip("/").rpartition("/")[2]
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def _model_call(p: _Problems, call: rpb.ModelCall, present: bool) -> None:
    if not present or not call.model:
        p.add("model.model", "required: the name of the model to call (a model in the registry)")
    elif not is_model_name(call.model):
        p.add("model.model", f"{call.model!r} is not a model name ({MODEL_NAME_RULE})")
    if call.version and not _VERSION.match(call.version):
        p.add("model.version", f"{call.version!r} is not a version name (letters, digits, '.', '_', '-', at most 63)")
    if call.mode not in rpb.ModelCall.Mode.values():
        p.add("model.mode", f"{call.mode} is not one of {', '.join(rpb.ModelCall.Mode.keys())}")
    if call.mode == rpb.ModelCall.IN_PROCESS:
        for field in ("gateway", "token_file", "token_secret"):
            if getattr(call, field):
                p.add(f"model.{field}", "only for mode GATEWAY (IN_PROCESS loads the model in the job's process)")
    if call.gateway:
        host, sep, port = call.gateway.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            p.add("model.gateway", f"{call.gateway!r} is not host:port (the gateway's gRPC listener)")
    if call.token_file and not call.token_file.startswith("/"):
        p.add("model.token_file", f"{call.token_file!r} must be an absolute path")
    if call.token_file and call.token_secret:
        p.add("model.token_secret", "give token_file or token_secret, not both")
    if call.token_secret and not _SECRET_REF.match(call.token_secret):
        p.add("model.token_secret", f"{call.token_secret!r} is not '<secret>/<key>' (a Secret name and one of its keys)")
    if not math.isfinite(call.timeout_seconds) or call.timeout_seconds < 0:
        p.add("model.timeout_seconds", f"{call.timeout_seconds} must be a number of zero or more (0: 30 s)")
    elif call.timeout_seconds > MAX_TIMEOUT_SECONDS:
        p.add("model.timeout_seconds", f"{call.timeout_seconds:g} is more than the maximum of {MAX_TIMEOUT_SECONDS:g}")
    seen: dict[str, int] = {}
    for i, output in enumerate(call.outputs):
        if not output:
            p.add(f"model.outputs[{i}]", "must not be empty")
        elif output in seen:
            p.add(f"model.outputs[{i}]", f"{output!r} duplicates model.outputs[{seen[output]}]")
        else:
            seen[output] = i


def _bounded(p: _Problems, field: str, value: int, maximum: int, zero_means: str) -> None:
    if value > maximum:
        p.add(field, f"{value} is more than the maximum of {maximum} (0: {zero_means})")


def _workload(p: _Problems, spec: rpb.JobSpec | rpb.StreamSpec) -> None:
    """What jobs and streams share: name, resources, image, env."""
    p.name("name", spec.name, "jobs")
    if spec.HasField("resources"):
        _resources(p, spec.resources)
    if spec.image and any(c.isspace() for c in spec.image):
        p.add("image", f"{spec.image!r} must not contain spaces")
    for key in spec.env:
        if not _ENV_NAME.match(key):
            p.add(f"env[{key!r}]", "not a valid environment variable name (letters, digits, '_', not starting with a digit)")


def job_problems(spec: rpb.JobSpec) -> list[str]:
    """Problems of a job on its own (that its model exists is the store's integrity check)."""
    p = _Problems(_record("jobs", spec.name))
    _workload(p, spec)
    _model_call(p, spec.model, spec.HasField("model"))
    _uri(p, "input_uri", spec.input_uri)
    _uri(p, "output_uri", spec.output_uri)
    if spec.input_uri and spec.input_uri == spec.output_uri:
        p.add("output_uri", "must differ from input_uri (the output is a directory of parts beside a manifest)")
    extension_format = JOB_FORMAT_OF_EXTENSION.get(_extension(spec.input_uri))
    formats = ", ".join(JOB_FORMAT_OF_EXTENSION)
    if spec.format not in rpb.JobSpec.Format.values():
        p.add("format", f"{spec.format} is not one of {', '.join(rpb.JobSpec.Format.keys())}")
    elif spec.format == rpb.JobSpec.FORMAT_UNSPECIFIED:
        if spec.input_uri and extension_format is None:
            p.add("format", f"required: input_uri does not end in {formats}, so say JSONL or PARQUET")
    elif extension_format is not None and extension_format != spec.format:
        p.add(
            "format",
            f"{rpb.JobSpec.Format.Name(spec.format)} contradicts input_uri's extension "
            f"{_extension(spec.input_uri)!r} ({rpb.JobSpec.Format.Name(extension_format)}); "
            "leave format out or make them agree",
        )
    for model_input, column in spec.inputs.items():
        if not model_input:
            p.add("inputs", "a model input name must not be empty")
        if not column:
            p.add(f"inputs[{model_input!r}]", "the column name must not be empty")
    if spec.id_column and spec.id_column.strip() != spec.id_column:
        p.add("id_column", f"{spec.id_column!r} must not start or end with spaces")
    _bounded(p, "batch_size", spec.batch_size, MAX_BATCH_SIZE, f"{DEFAULT_JOB_BATCH_SIZE} rows per infer call")
    _bounded(p, "parallelism", spec.parallelism, MAX_PARALLELISM, f"{DEFAULT_JOB_PARALLELISM} infer calls in flight")
    _bounded(p, "backoff_limit", spec.backoff_limit, MAX_BACKOFF_LIMIT, "6 restarts")
    _bounded(p, "ttl_seconds_after_finished", spec.ttl_seconds_after_finished, MAX_TTL_SECONDS, "3600 s")
    return p.items


def check_job(spec: rpb.JobSpec) -> None:
    problems = job_problems(spec)
    if problems:
        raise ValidationError(problems)


def _topic(p: _Problems, field: str, topic: rpb.BrokerTopic, broker: int, *, source: bool, broker_of_source: int = 0) -> None:
    """One end of a stream; `broker` is the one it uses (a sink's or dead letter's unset
    broker and servers are the source's)."""
    if topic.broker not in rpb.BrokerTopic.Broker.values():
        p.add(f"{field}.broker", f"{topic.broker} is not one of KAFKA, NATS")
    elif source and topic.broker == rpb.BrokerTopic.BROKER_UNSPECIFIED:
        p.add(f"{field}.broker", "required: KAFKA or NATS")
    if source and not topic.servers:
        p.add(f"{field}.servers", "required: the Kafka bootstrap servers or NATS URLs (host:port or nats://host:port)")
    elif not source and not topic.servers and topic.broker and topic.broker != broker_of_source:
        p.add(f"{field}.servers", "required: its broker is not the source's, so the source's servers do not apply")
    for i, server in enumerate(topic.servers):
        if not server or any(c.isspace() for c in server):
            p.add(f"{field}.servers[{i}]", f"{server!r} must be a non-empty address without spaces")
    if not topic.topic:
        what = "subject" if broker == rpb.BrokerTopic.NATS else "topic"
        p.add(f"{field}.topic", f"required: the {what} to {'read' if source else 'write'}")
    elif broker == rpb.BrokerTopic.KAFKA and not _KAFKA_TOPIC.match(topic.topic):
        p.add(f"{field}.topic", f"{topic.topic!r} is not a Kafka topic name (letters, digits, '.', '_', '-', at most 249)")
    elif broker == rpb.BrokerTopic.NATS:
        tokens = topic.topic.split(".")
        if not all(_NATS_TOKEN.match(t) for t in tokens) or ">" in tokens[:-1]:
            p.add(f"{field}.topic", f"{topic.topic!r} is not a NATS subject (non-empty '.'-separated tokens, no spaces)")
        elif not source and any(t in ("*", ">") for t in tokens):
            p.add(f"{field}.topic", f"{topic.topic!r}: a subject written to cannot hold the wildcards '*' or '>'")
    if source and not topic.group:
        what = "JetStream durable consumer name" if broker == rpb.BrokerTopic.NATS else "Kafka consumer group"
        p.add(f"{field}.group", f"required: the {what} (the replicas share it)")
    elif not source and topic.group:
        p.add(f"{field}.group", "only for the source (the consumer group / durable consumer that reads it)")
    if topic.group and broker == rpb.BrokerTopic.NATS and not _NATS_NAME.match(topic.group):
        p.add(f"{field}.group", f"{topic.group!r} is not a durable consumer name (no spaces, '.', '*', '>', '/')")
    if topic.stream and broker != rpb.BrokerTopic.NATS:
        p.add(f"{field}.stream", "only for NATS (the JetStream stream holding the subject)")
    elif topic.stream and not _NATS_NAME.match(topic.stream):
        p.add(f"{field}.stream", f"{topic.stream!r} is not a JetStream stream name (no spaces, '.', '*', '>', '/')")


def _same_destination(a: rpb.BrokerTopic, b: rpb.BrokerTopic, source: rpb.BrokerTopic) -> bool:
    """Whether two ends of a stream name the same topic on the same broker (an unset
    broker or servers being the source's)."""
    def where(t: rpb.BrokerTopic) -> tuple[int, tuple[str, ...], str]:
        return (t.broker or source.broker, tuple(sorted(t.servers or source.servers)), t.topic)

    return where(a) == where(b)


def stream_problems(spec: rpb.StreamSpec) -> list[str]:
    """Problems of a stream on its own (that its model exists is the store's integrity check)."""
    p = _Problems(_record("streams", spec.name))
    _workload(p, spec)
    source = spec.source
    if not spec.HasField("source"):
        p.add("source", "required: the Kafka topic or NATS subject to consume (broker, servers, topic, group)")
    else:
        _topic(p, "source", source, source.broker, source=True)
    _model_call(p, spec.model, spec.HasField("model"))
    if not spec.HasField("sink"):
        p.add("sink", "required: the topic or subject the results are written to (topic; broker and servers "
                      "default to the source's)")
    else:
        _topic(p, "sink", spec.sink, spec.sink.broker or source.broker, source=False, broker_of_source=source.broker)
        if spec.sink.topic and _same_destination(spec.sink, source, source):
            p.add("sink.topic", f"{spec.sink.topic!r} is the source: results would be consumed again")
    if spec.HasField("dead_letter"):
        _topic(p, "dead_letter", spec.dead_letter, spec.dead_letter.broker or source.broker, source=False,
               broker_of_source=source.broker)
        if spec.dead_letter.topic and _same_destination(spec.dead_letter, source, source):
            p.add("dead_letter.topic", f"{spec.dead_letter.topic!r} is the source: failures would be consumed again")
    _bounded(p, "replicas", spec.replicas, MAX_REPLICAS, "1 consumer process")
    _bounded(p, "max_in_flight", spec.max_in_flight, MAX_IN_FLIGHT, f"{DEFAULT_STREAM_MAX_IN_FLIGHT} messages")
    _bounded(p, "batch_size", spec.batch_size, MAX_BATCH_SIZE, f"{DEFAULT_STREAM_BATCH_SIZE} messages per infer call")
    batch = spec.batch_size or DEFAULT_STREAM_BATCH_SIZE
    in_flight = spec.max_in_flight or DEFAULT_STREAM_MAX_IN_FLIGHT
    if spec.batch_size <= MAX_BATCH_SIZE and spec.max_in_flight <= MAX_IN_FLIGHT and batch > in_flight:
        # a batch could never fill: it would only ever leave on its delay
        p.add("batch_size", f"{batch} is more than max_in_flight ({in_flight}), so a batch could never fill")
    delay = spec.max_batch_delay_ms
    if not math.isfinite(delay) or delay < 0:
        p.add("max_batch_delay_ms", f"{delay} must be a number of zero or more (0: 5 ms)")
    elif delay > MAX_QUEUE_DELAY_MS:
        p.add("max_batch_delay_ms", f"{delay:g} is more than the maximum of {MAX_QUEUE_DELAY_MS:g}")
    return p.items


def check_stream(spec: rpb.StreamSpec) -> None:
    problems = stream_problems(spec)
    if problems:
        raise ValidationError(problems)


def check_job_status(status: rpb.JobStatus) -> None:
    p = _Problems(f"status/jobs/{status.name or '<unnamed>'}")
    p.name("name", status.name)
    if status.phase not in rpb.JobStatus.Phase.values():
        p.add("phase", f"{status.phase} is not one of {', '.join(rpb.JobStatus.Phase.keys())}")
    if not math.isfinite(status.rows_per_second) or status.rows_per_second < 0:
        p.add("rows_per_second", f"{status.rows_per_second} must be a finite number of zero or more")
    if len(status.failures) > MAX_ROW_FAILURES:
        p.add("failures", f"{len(status.failures)} kept; at most {MAX_ROW_FAILURES} (rows_failed counts them all)")
    if p.items:
        raise ValidationError(p.items)


def check_stream_status(status: rpb.StreamStatus) -> None:
    p = _Problems(f"status/streams/{status.name or '<unnamed>'}")
    p.name("name", status.name)
    if status.consumer_lag < -1:
        p.add("consumer_lag", f"{status.consumer_lag} must be -1 (unknown) or more")
    if p.items:
        raise ValidationError(p.items)


def workload_model(spec: rpb.JobSpec | rpb.StreamSpec) -> tuple[str, str]:
    """(model, version) a job or stream calls."""
    return spec.model.model, spec.model.version
