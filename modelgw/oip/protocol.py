"""The Open Inference Protocol's constants as modelgw speaks them: one definition each,
imported by the gateway and the runtimes alike (neither imports the other for these).

    from modelgw.oip.protocol import MAX_MESSAGE_BYTES, FINAL_RESPONSE, SUBJECT_HEADER

- MAX_MESSAGE_BYTES: the default limit on one request or response message, on every hop
  (gateway gRPC and REST frontends, gateway->runtime channels, runtime servers). The CLIs'
  --max-message-bytes default to it.
- MAX_SHAPE_DIMS: the most dimensions a tensor's shape may have (see the comment there).
- Triton's ModelStreamInfer parameter names (FINAL_RESPONSE, ENABLE_EMPTY_FINAL_RESPONSE).
- EXTENSIONS: the protocol extensions the gateway reports in its server metadata (gRPC
  ServerMetadata and REST GET /v2); UNLOADED_LABEL: how the repository extension's unload
  is written in the registry.
- modelgw's header names: the ones a client may send, the one the gateway sets, and the
  ones that travel on to runtimes as they came. All lower-case, as gRPC metadata keys are
  (HTTP header lookups are case-insensitive, so the same names serve REST).
"""

from __future__ import annotations

# -- limits --------------------------------------------------------------------------------

# gRPC's own default is 4 MiB, too small for image batches; 64 MiB fits a batch of a few
# hundred 224x224x3 FP32 images and still bounds what one message can make us buffer.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# A shape's number of dimensions. Every kind decodes tensors to numpy, which holds at most
# 64 (NPY_MAXDIMS, numpy 2), so a longer shape could never be served; TensorRT stops at 8.
# Unbounded, a 10,000-dim shape made the error that echoed it outgrow gRPC's metadata
# limit (RESOURCE_EXHAUSTED instead of INVALID_ARGUMENT naming the tensor).
MAX_SHAPE_DIMS = 64

# -- Triton's streaming parameters (ModelStreamInfer) ---------------------------------------

# On each streamed response: true on the last response of a request.
FINAL_RESPONSE = "triton_final_response"
# On a streamed request: ask for an empty response flagged final after the last one, so
# every data response can leave as soon as it exists.
ENABLE_EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"

# -- extensions -----------------------------------------------------------------------------

# Reported in server metadata (gRPC ServerMetadata, REST GET /v2); the same list on both,
# exactly the extensions the gateway serves (Triton's names where Triton has one). Not
# listed: system_shared_memory and cuda_shared_memory, which cannot work through a network
# gateway (their RPCs answer UNIMPLEMENTED saying so), and trace and logging.
EXTENSIONS = [
    "classification",
    "model_configuration",
    "model_repository",
    "statistics",
    "binary_tensor_data",
    "streaming",
    "traffic_split",
]

# The label RepositoryModelUnload sets on a model's registry record (value "true"): the
# runtimes unload every version of a model that carries it, and RepositoryModelLoad takes
# it off again (gateway/triton.py).
UNLOADED_LABEL = "modelgw.io/unloaded"

# -- headers (lower-case gRPC metadata keys; HTTP header names alike) -----------------------

REQUEST_ID_HEADER = "x-request-id"
TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"
# Forwarded to runtimes as they came.
PROPAGATED_HEADERS = (REQUEST_ID_HEADER, TRACEPARENT_HEADER, TRACESTATE_HEADER)
# Set by the gateway only (the caller it verified); a client's copy is dropped.
SUBJECT_HEADER = "x-modelgw-subject"
# Sent by a client: requests with the same value go to the same replica.
SESSION_HEADER = "x-modelgw-session"
# Sent by a client over HTTP: its deadline in seconds (gRPC clients use grpc-timeout).
TIMEOUT_HEADER = "x-modelgw-timeout"
# gRPC's own deadline header, as gRPC writes it (e.g. `2500m`); REST clients may send it too.
GRPC_TIMEOUT_HEADER = "grpc-timeout"
