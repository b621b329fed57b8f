import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApplyOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    APPLY_OUTCOME_UNSPECIFIED: _ClassVar[ApplyOutcome]
    CREATED: _ClassVar[ApplyOutcome]
    UPDATED: _ClassVar[ApplyOutcome]
    UNCHANGED: _ClassVar[ApplyOutcome]
APPLY_OUTCOME_UNSPECIFIED: ApplyOutcome
CREATED: ApplyOutcome
UPDATED: ApplyOutcome
UNCHANGED: ApplyOutcome

class Resources(_message.Message):
    __slots__ = ("cpu", "memory", "gpu")
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    cpu: str
    memory: str
    gpu: int
    def __init__(self, cpu: _Optional[str] = ..., memory: _Optional[str] = ..., gpu: _Optional[int] = ...) -> None: ...

class RuntimeSpec(_message.Message):
    __slots__ = ("name", "kind", "image", "command", "model_formats", "replicas", "resources", "env", "labels", "options", "node_selector")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class NodeSelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FORMATS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    NODE_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    image: str
    command: _containers.RepeatedScalarFieldContainer[str]
    model_formats: _containers.RepeatedScalarFieldContainer[str]
    replicas: int
    resources: Resources
    env: _containers.ScalarMap[str, str]
    labels: _containers.ScalarMap[str, str]
    options: _containers.ScalarMap[str, str]
    node_selector: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., image: _Optional[str] = ..., command: _Optional[_Iterable[str]] = ..., model_formats: _Optional[_Iterable[str]] = ..., replicas: _Optional[int] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., env: _Optional[_Mapping[str, str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., options: _Optional[_Mapping[str, str]] = ..., node_selector: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "uri", "format", "runtime")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    version: str
    uri: str
    format: str
    runtime: str
    def __init__(self, version: _Optional[str] = ..., uri: _Optional[str] = ..., format: _Optional[str] = ..., runtime: _Optional[str] = ...) -> None: ...

class AccessPolicy(_message.Message):
    __slots__ = ("scopes", "groups", "roles", "public")
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_FIELD_NUMBER: _ClassVar[int]
    scopes: _containers.RepeatedScalarFieldContainer[str]
    groups: _containers.RepeatedScalarFieldContainer[str]
    roles: _containers.RepeatedScalarFieldContainer[str]
    public: bool
    def __init__(self, scopes: _Optional[_Iterable[str]] = ..., groups: _Optional[_Iterable[str]] = ..., roles: _Optional[_Iterable[str]] = ..., public: _Optional[bool] = ...) -> None: ...

class TenantLimit(_message.Message):
    __slots__ = ("requests_per_second", "tokens_per_minute", "burst_seconds", "tenant_claim")
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    BURST_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TENANT_CLAIM_FIELD_NUMBER: _ClassVar[int]
    requests_per_second: float
    tokens_per_minute: float
    burst_seconds: float
    tenant_claim: str
    def __init__(self, requests_per_second: _Optional[float] = ..., tokens_per_minute: _Optional[float] = ..., burst_seconds: _Optional[float] = ..., tenant_claim: _Optional[str] = ...) -> None: ...

class ModelLimits(_message.Message):
    __slots__ = ("timeout_seconds", "max_batch_size", "max_queue_delay_ms", "max_in_flight", "per_tenant")
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PER_TENANT_FIELD_NUMBER: _ClassVar[int]
    timeout_seconds: float
    max_batch_size: int
    max_queue_delay_ms: float
    max_in_flight: int
    per_tenant: TenantLimit
    def __init__(self, timeout_seconds: _Optional[float] = ..., max_batch_size: _Optional[int] = ..., max_queue_delay_ms: _Optional[float] = ..., max_in_flight: _Optional[int] = ..., per_tenant: _Optional[_Union[TenantLimit, _Mapping]] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "versions", "traffic", "access", "limits", "labels", "description")
    class TrafficEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    traffic: _containers.ScalarMap[str, int]
    access: AccessPolicy
    limits: ModelLimits
    labels: _containers.ScalarMap[str, str]
    description: str
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., traffic: _Optional[_Mapping[str, int]] = ..., access: _Optional[_Union[AccessPolicy, _Mapping]] = ..., limits: _Optional[_Union[ModelLimits, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., description: _Optional[str] = ...) -> None: ...

class GatewayDefaults(_message.Message):
    __slots__ = ("name", "per_tenant")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PER_TENANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    per_tenant: TenantLimit
    def __init__(self, name: _Optional[str] = ..., per_tenant: _Optional[_Union[TenantLimit, _Mapping]] = ...) -> None: ...

class ModelCall(_message.Message):
    __slots__ = ("model", "version", "mode", "gateway", "token_file", "token_secret", "timeout_seconds", "outputs")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MODE_UNSPECIFIED: _ClassVar[ModelCall.Mode]
        GATEWAY: _ClassVar[ModelCall.Mode]
        IN_PROCESS: _ClassVar[ModelCall.Mode]
    MODE_UNSPECIFIED: ModelCall.Mode
    GATEWAY: ModelCall.Mode
    IN_PROCESS: ModelCall.Mode
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FILE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SECRET_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    mode: ModelCall.Mode
    gateway: str
    token_file: str
    token_secret: str
    timeout_seconds: float
    outputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., mode: _Optional[_Union[ModelCall.Mode, str]] = ..., gateway: _Optional[str] = ..., token_file: _Optional[str] = ..., token_secret: _Optional[str] = ..., timeout_seconds: _Optional[float] = ..., outputs: _Optional[_Iterable[str]] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("name", "model", "input_uri", "output_uri", "format", "inputs", "id_column", "batch_size", "parallelism", "max_failed_rows", "resources", "image", "env", "backoff_limit", "ttl_seconds_after_finished")
    class Format(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FORMAT_UNSPECIFIED: _ClassVar[JobSpec.Format]
        JSONL: _ClassVar[JobSpec.Format]
        PARQUET: _ClassVar[JobSpec.Format]
    FORMAT_UNSPECIFIED: JobSpec.Format
    JSONL: JobSpec.Format
    PARQUET: JobSpec.Format
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_URI_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_URI_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ID_COLUMN_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARALLELISM_FIELD_NUMBER: _ClassVar[int]
    MAX_FAILED_ROWS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_LIMIT_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_AFTER_FINISHED_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: ModelCall
    input_uri: str
    output_uri: str
    format: JobSpec.Format
    inputs: _containers.ScalarMap[str, str]
    id_column: str
    batch_size: int
    parallelism: int
    max_failed_rows: int
    resources: Resources
    image: str
    env: _containers.ScalarMap[str, str]
    backoff_limit: int
    ttl_seconds_after_finished: int
    def __init__(self, name: _Optional[str] = ..., model: _Optional[_Union[ModelCall, _Mapping]] = ..., input_uri: _Optional[str] = ..., output_uri: _Optional[str] = ..., format: _Optional[_Union[JobSpec.Format, str]] = ..., inputs: _Optional[_Mapping[str, str]] = ..., id_column: _Optional[str] = ..., batch_size: _Optional[int] = ..., parallelism: _Optional[int] = ..., max_failed_rows: _Optional[int] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., image: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., backoff_limit: _Optional[int] = ..., ttl_seconds_after_finished: _Optional[int] = ...) -> None: ...

class RowFailure(_message.Message):
    __slots__ = ("row_id", "row", "error")
    ROW_ID_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    row_id: str
    row: int
    error: str
    def __init__(self, row_id: _Optional[str] = ..., row: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("name", "phase", "rows_done", "rows_total", "rows_failed", "rows_per_second", "started_at", "finished_at", "failures", "message", "observed_revision", "attempts", "backend", "updated_at")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[JobStatus.Phase]
        PENDING: _ClassVar[JobStatus.Phase]
        RUNNING: _ClassVar[JobStatus.Phase]
        SUCCEEDED: _ClassVar[JobStatus.Phase]
        FAILED: _ClassVar[JobStatus.Phase]
    PHASE_UNSPECIFIED: JobStatus.Phase
    PENDING: JobStatus.Phase
    RUNNING: JobStatus.Phase
    SUCCEEDED: JobStatus.Phase
    FAILED: JobStatus.Phase
    NAME_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROWS_DONE_FIELD_NUMBER: _ClassVar[int]
    ROWS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROWS_FAILED_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_REVISION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    phase: JobStatus.Phase
    rows_done: int
    rows_total: int
    rows_failed: int
    rows_per_second: float
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    failures: _containers.RepeatedCompositeFieldContainer[RowFailure]
    message: str
    observed_revision: int
    attempts: int
    backend: str
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., phase: _Optional[_Union[JobStatus.Phase, str]] = ..., rows_done: _Optional[int] = ..., rows_total: _Optional[int] = ..., rows_failed: _Optional[int] = ..., rows_per_second: _Optional[float] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., failures: _Optional[_Iterable[_Union[RowFailure, _Mapping]]] = ..., message: _Optional[str] = ..., observed_revision: _Optional[int] = ..., attempts: _Optional[int] = ..., backend: _Optional[str] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class BrokerTopic(_message.Message):
    __slots__ = ("broker", "servers", "topic", "group", "stream")
    class Broker(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        BROKER_UNSPECIFIED: _ClassVar[BrokerTopic.Broker]
        KAFKA: _ClassVar[BrokerTopic.Broker]
        NATS: _ClassVar[BrokerTopic.Broker]
    BROKER_UNSPECIFIED: BrokerTopic.Broker
    KAFKA: BrokerTopic.Broker
    NATS: BrokerTopic.Broker
    BROKER_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    broker: BrokerTopic.Broker
    servers: _containers.RepeatedScalarFieldContainer[str]
    topic: str
    group: str
    stream: str
    def __init__(self, broker: _Optional[_Union[BrokerTopic.Broker, str]] = ..., servers: _Optional[_Iterable[str]] = ..., topic: _Optional[str] = ..., group: _Optional[str] = ..., stream: _Optional[str] = ...) -> None: ...

class StreamSpec(_message.Message):
    __slots__ = ("name", "source", "model", "sink", "dead_letter", "replicas", "max_in_flight", "batch_size", "max_batch_delay_ms", "resources", "image", "env")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SINK_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTER_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: BrokerTopic
    model: ModelCall
    sink: BrokerTopic
    dead_letter: BrokerTopic
    replicas: int
    max_in_flight: int
    batch_size: int
    max_batch_delay_ms: float
    resources: Resources
    image: str
    env: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., source: _Optional[_Union[BrokerTopic, _Mapping]] = ..., model: _Optional[_Union[ModelCall, _Mapping]] = ..., sink: _Optional[_Union[BrokerTopic, _Mapping]] = ..., dead_letter: _Optional[_Union[BrokerTopic, _Mapping]] = ..., replicas: _Optional[int] = ..., max_in_flight: _Optional[int] = ..., batch_size: _Optional[int] = ..., max_batch_delay_ms: _Optional[float] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., image: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StreamStatus(_message.Message):
    __slots__ = ("name", "messages_processed", "messages_failed", "consumer_lag", "replicas_desired", "replicas_ready", "conditions", "observed_revision", "backend", "updated_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FAILED_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_LAG_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_DESIRED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_READY_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_REVISION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    messages_processed: int
    messages_failed: int
    consumer_lag: int
    replicas_desired: int
    replicas_ready: int
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    observed_revision: int
    backend: str
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., messages_processed: _Optional[int] = ..., messages_failed: _Optional[int] = ..., consumer_lag: _Optional[int] = ..., replicas_desired: _Optional[int] = ..., replicas_ready: _Optional[int] = ..., conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ..., observed_revision: _Optional[int] = ..., backend: _Optional[str] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class LoadedModel(_message.Message):
    __slots__ = ("name", "version", "state", "message")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[LoadedModel.State]
        LOADING: _ClassVar[LoadedModel.State]
        READY: _ClassVar[LoadedModel.State]
        FAILED: _ClassVar[LoadedModel.State]
        UNLOADING: _ClassVar[LoadedModel.State]
    STATE_UNSPECIFIED: LoadedModel.State
    LOADING: LoadedModel.State
    READY: LoadedModel.State
    FAILED: LoadedModel.State
    UNLOADING: LoadedModel.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    state: LoadedModel.State
    message: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[_Union[LoadedModel.State, str]] = ..., message: _Optional[str] = ...) -> None: ...

class LoadFigures(_message.Message):
    __slots__ = ("queue_depth", "in_flight", "kv_cache_usage", "running")
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    queue_depth: int
    in_flight: int
    kv_cache_usage: float
    running: int
    def __init__(self, queue_depth: _Optional[int] = ..., in_flight: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ..., running: _Optional[int] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("runtime", "instance", "address", "models", "load", "started_at", "ready")
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    runtime: str
    instance: str
    address: str
    models: _containers.RepeatedCompositeFieldContainer[LoadedModel]
    load: LoadFigures
    started_at: _timestamp_pb2.Timestamp
    ready: bool
    def __init__(self, runtime: _Optional[str] = ..., instance: _Optional[str] = ..., address: _Optional[str] = ..., models: _Optional[_Iterable[_Union[LoadedModel, _Mapping]]] = ..., load: _Optional[_Union[LoadFigures, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ready: _Optional[bool] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("type", "status", "reason", "message", "last_transition_time")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_TRANSITION_TIME_FIELD_NUMBER: _ClassVar[int]
    type: str
    status: str
    reason: str
    message: str
    last_transition_time: _timestamp_pb2.Timestamp
    def __init__(self, type: _Optional[str] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., last_transition_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RuntimeStatus(_message.Message):
    __slots__ = ("name", "replicas_desired", "replicas_ready", "conditions", "observed_revision", "backend", "updated_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_DESIRED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_READY_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_REVISION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    replicas_desired: int
    replicas_ready: int
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    observed_revision: int
    backend: str
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., replicas_desired: _Optional[int] = ..., replicas_ready: _Optional[int] = ..., conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ..., observed_revision: _Optional[int] = ..., backend: _Optional[str] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ModelRecord(_message.Message):
    __slots__ = ("spec", "revision", "create_revision")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATE_REVISION_FIELD_NUMBER: _ClassVar[int]
    spec: ModelSpec
    revision: int
    create_revision: int
    def __init__(self, spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., revision: _Optional[int] = ..., create_revision: _Optional[int] = ...) -> None: ...

class RuntimeRecord(_message.Message):
    __slots__ = ("spec", "revision", "status", "create_revision")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATE_REVISION_FIELD_NUMBER: _ClassVar[int]
    spec: RuntimeSpec
    revision: int
    status: RuntimeStatus
    create_revision: int
    def __init__(self, spec: _Optional[_Union[RuntimeSpec, _Mapping]] = ..., revision: _Optional[int] = ..., status: _Optional[_Union[RuntimeStatus, _Mapping]] = ..., create_revision: _Optional[int] = ...) -> None: ...

class JobRecord(_message.Message):
    __slots__ = ("spec", "revision", "status", "create_revision")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATE_REVISION_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    revision: int
    status: JobStatus
    create_revision: int
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., revision: _Optional[int] = ..., status: _Optional[_Union[JobStatus, _Mapping]] = ..., create_revision: _Optional[int] = ...) -> None: ...

class StreamRecord(_message.Message):
    __slots__ = ("spec", "revision", "status", "create_revision")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATE_REVISION_FIELD_NUMBER: _ClassVar[int]
    spec: StreamSpec
    revision: int
    status: StreamStatus
    create_revision: int
    def __init__(self, spec: _Optional[_Union[StreamSpec, _Mapping]] = ..., revision: _Optional[int] = ..., status: _Optional[_Union[StreamStatus, _Mapping]] = ..., create_revision: _Optional[int] = ...) -> None: ...

class GatewayDefaultsRecord(_message.Message):
    __slots__ = ("spec", "revision", "create_revision")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATE_REVISION_FIELD_NUMBER: _ClassVar[int]
    spec: GatewayDefaults
    revision: int
    create_revision: int
    def __init__(self, spec: _Optional[_Union[GatewayDefaults, _Mapping]] = ..., revision: _Optional[int] = ..., create_revision: _Optional[int] = ...) -> None: ...

class ApplyModelRequest(_message.Message):
    __slots__ = ("spec", "expected_revision")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    spec: ModelSpec
    expected_revision: int
    def __init__(self, spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class ApplyRuntimeRequest(_message.Message):
    __slots__ = ("spec", "expected_revision")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    spec: RuntimeSpec
    expected_revision: int
    def __init__(self, spec: _Optional[_Union[RuntimeSpec, _Mapping]] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class ApplyModelResponse(_message.Message):
    __slots__ = ("record", "outcome")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    record: ModelRecord
    outcome: ApplyOutcome
    def __init__(self, record: _Optional[_Union[ModelRecord, _Mapping]] = ..., outcome: _Optional[_Union[ApplyOutcome, str]] = ...) -> None: ...

class ApplyRuntimeResponse(_message.Message):
    __slots__ = ("record", "outcome")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    record: RuntimeRecord
    outcome: ApplyOutcome
    def __init__(self, record: _Optional[_Union[RuntimeRecord, _Mapping]] = ..., outcome: _Optional[_Union[ApplyOutcome, str]] = ...) -> None: ...

class ApplyJobRequest(_message.Message):
    __slots__ = ("spec", "expected_revision")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    expected_revision: int
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class ApplyJobResponse(_message.Message):
    __slots__ = ("record", "outcome")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    record: JobRecord
    outcome: ApplyOutcome
    def __init__(self, record: _Optional[_Union[JobRecord, _Mapping]] = ..., outcome: _Optional[_Union[ApplyOutcome, str]] = ...) -> None: ...

class ApplyStreamRequest(_message.Message):
    __slots__ = ("spec", "expected_revision")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    spec: StreamSpec
    expected_revision: int
    def __init__(self, spec: _Optional[_Union[StreamSpec, _Mapping]] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class ApplyStreamResponse(_message.Message):
    __slots__ = ("record", "outcome")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    record: StreamRecord
    outcome: ApplyOutcome
    def __init__(self, record: _Optional[_Union[StreamRecord, _Mapping]] = ..., outcome: _Optional[_Union[ApplyOutcome, str]] = ...) -> None: ...

class ApplyGatewayDefaultsRequest(_message.Message):
    __slots__ = ("spec", "expected_revision")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    spec: GatewayDefaults
    expected_revision: int
    def __init__(self, spec: _Optional[_Union[GatewayDefaults, _Mapping]] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class ApplyGatewayDefaultsResponse(_message.Message):
    __slots__ = ("record", "outcome")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    record: GatewayDefaultsRecord
    outcome: ApplyOutcome
    def __init__(self, record: _Optional[_Union[GatewayDefaultsRecord, _Mapping]] = ..., outcome: _Optional[_Union[ApplyOutcome, str]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("name", "expected_revision", "force")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    expected_revision: int
    force: bool
    def __init__(self, name: _Optional[str] = ..., expected_revision: _Optional[int] = ..., force: _Optional[bool] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "revision")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelRecord]
    revision: int
    def __init__(self, models: _Optional[_Iterable[_Union[ModelRecord, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class ListRuntimesResponse(_message.Message):
    __slots__ = ("runtimes", "revision")
    RUNTIMES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    runtimes: _containers.RepeatedCompositeFieldContainer[RuntimeRecord]
    revision: int
    def __init__(self, runtimes: _Optional[_Iterable[_Union[RuntimeRecord, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "revision")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobRecord]
    revision: int
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobRecord, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class ListStreamsResponse(_message.Message):
    __slots__ = ("streams", "revision")
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    streams: _containers.RepeatedCompositeFieldContainer[StreamRecord]
    revision: int
    def __init__(self, streams: _Optional[_Iterable[_Union[StreamRecord, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class ListEndpointsRequest(_message.Message):
    __slots__ = ("runtime",)
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    runtime: str
    def __init__(self, runtime: _Optional[str] = ...) -> None: ...

class ListEndpointsResponse(_message.Message):
    __slots__ = ("endpoints", "revision")
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    revision: int
    def __init__(self, endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("start_revision",)
    START_REVISION_FIELD_NUMBER: _ClassVar[int]
    start_revision: int
    def __init__(self, start_revision: _Optional[int] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("type", "revision", "model", "runtime", "endpoint", "runtime_status", "job", "stream", "job_status", "stream_status", "gateway_defaults", "key")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[WatchEvent.Type]
        PUT: _ClassVar[WatchEvent.Type]
        DELETE: _ClassVar[WatchEvent.Type]
    TYPE_UNSPECIFIED: WatchEvent.Type
    PUT: WatchEvent.Type
    DELETE: WatchEvent.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_STATUS_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    JOB_STATUS_FIELD_NUMBER: _ClassVar[int]
    STREAM_STATUS_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    type: WatchEvent.Type
    revision: int
    model: ModelSpec
    runtime: RuntimeSpec
    endpoint: Endpoint
    runtime_status: RuntimeStatus
    job: JobSpec
    stream: StreamSpec
    job_status: JobStatus
    stream_status: StreamStatus
    gateway_defaults: GatewayDefaults
    key: str
    def __init__(self, type: _Optional[_Union[WatchEvent.Type, str]] = ..., revision: _Optional[int] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., runtime: _Optional[_Union[RuntimeSpec, _Mapping]] = ..., endpoint: _Optional[_Union[Endpoint, _Mapping]] = ..., runtime_status: _Optional[_Union[RuntimeStatus, _Mapping]] = ..., job: _Optional[_Union[JobSpec, _Mapping]] = ..., stream: _Optional[_Union[StreamSpec, _Mapping]] = ..., job_status: _Optional[_Union[JobStatus, _Mapping]] = ..., stream_status: _Optional[_Union[StreamStatus, _Mapping]] = ..., gateway_defaults: _Optional[_Union[GatewayDefaults, _Mapping]] = ..., key: _Optional[str] = ...) -> None: ...
