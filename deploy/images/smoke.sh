#!/usr/bin/env bash
# Smoke test of the modelgw image, end to end on one machine without a registry or a
# container daemon: a Debian base from debootstrap (debian-base.sh, cached), the image
# built with buildah from a wheelhouse made here (build.sh), then run with podman next to
# this machine's etcd:
#   - the gateway container (read-only root, /tmp a tmpfs, as a pod has it) answers
#     /v2/health/ready;
#   - the CLI inside it applies a runtime and a model and `modelgw get models` lists it;
#   - a python-kind runtime in a second container registers, and an inference through the
#     gateway's REST port returns its answer;
#   - the container runs as UID 65532 and holds no compiler.
#
#   deploy/images/smoke.sh          (as root; needs debootstrap, buildah, podman, runc, etcd, curl)
#
# Prints how long each step took. Every container and the etcd it started are removed on
# exit, whatever happened; the base image, the wheelhouse and buildah's layer cache stay,
# so a second run takes seconds for the first two steps.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BASE=${BASE_IMAGE:-localhost/modelgw-base:bookworm}
# podman's defaults fail in unprivileged sandboxes (crun's cgroup handling, an unlimited
# nofile); runc with explicit limits runs in both.
PODMAN_RUN=(podman run --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network host)

for tool in debootstrap buildah podman runc etcd curl python3; do
  command -v "$tool" >/dev/null || { echo "smoke: $tool is missing (apt-get install buildah podman runc debootstrap etcd-server curl)" >&2; exit 1; }
done

work=$(mktemp -d)
etcd_pid=""
containers=()
cleanup() {
  for c in "${containers[@]}"; do podman rm --force --time 2 "$c" >/dev/null 2>&1 || true; done
  if [ -n "$etcd_pid" ]; then kill "$etcd_pid" 2>/dev/null || true; wait "$etcd_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# wait_for WHAT SECONDS COMMAND...: run COMMAND once a second until it succeeds.
wait_for() {
  local what=$1 seconds=$2; shift 2
  for _ in $(seq "$seconds"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "smoke: FAILED: $what within $seconds s" >&2; return 1
}
timings=()
step() { timings+=("$1 $(($SECONDS - $2)) s"); echo "smoke: $1 done in $(($SECONDS - $2)) s"; }

t=$SECONDS
bash "$HERE/debian-base.sh" "$BASE"
step "base image (debootstrap or cache)" "$t"

t=$SECONDS
bash "$HERE/build.sh" --images modelgw --base-image "$BASE" --tool buildah
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$HERE/../../modelgw/__init__.py")
image=localhost/modelgw:$version
step "image build ($image)" "$t"

t=$SECONDS
etcd_port=$(free_port); peer_port=$(free_port); http_port=$(free_port); grpc_port=$(free_port); runtime_port=$(free_port)
etcd_url=http://127.0.0.1:$etcd_port
etcd --name smoke --data-dir "$work/etcd" --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "smoke=http://127.0.0.1:$peer_port" >"$work/etcd.log" 2>&1 &
etcd_pid=$!
wait_for "etcd answers on $etcd_port" 30 curl -sf "$etcd_url/health"
etcd_endpoint=127.0.0.1:$etcd_port

gateway=modelgw-smoke-gateway-$$
containers+=("$gateway")
"${PODMAN_RUN[@]}" --detach --name "$gateway" --read-only --tmpfs /tmp "$image" \
  gateway --etcd "$etcd_endpoint" --http-port "$http_port" --grpc-port "$grpc_port" --insecure-no-auth >/dev/null
if ! wait_for "the gateway answers /v2/health/ready" 60 curl -sf "http://127.0.0.1:$http_port/v2/health/ready"; then
  podman logs "$gateway" >&2 || true; exit 1
fi
echo "smoke: the gateway in $image answers /v2/health/ready"

uid=$(podman exec "$gateway" id -u)
[ "$uid" = 65532 ] || { echo "smoke: FAILED: the container runs as UID $uid, not 65532" >&2; exit 1; }
if podman exec "$gateway" sh -c 'command -v cc || command -v gcc || command -v c++ || command -v pip || command -v pip3'; then
  echo "smoke: FAILED: the final image holds a compiler or pip (above)" >&2; exit 1
fi
echo "smoke: the container runs as UID 65532 and holds no compiler or pip"

# The CLI inside the image, through the gateway's RegistryService (gRPC port).
podman exec -i "$gateway" modelgw apply --server "127.0.0.1:$grpc_port" -f - <<'EOF'
kind: Runtime
spec: {name: smoke-python, kind: python, model_formats: [python], replicas: 1}
---
kind: Model
spec:
  name: smoke-scale
  versions:
    - {version: "1", uri: "modelgw.runtimes.examples.scale:Scale", format: python, runtime: smoke-python}
EOF
models=$(podman exec "$gateway" modelgw get models --server "127.0.0.1:$grpc_port")
echo "$models"
grep -q smoke-scale <<<"$models" || { echo "smoke: FAILED: modelgw get models does not list smoke-scale" >&2; exit 1; }
echo "smoke: modelgw get models inside the container lists smoke-scale"

# A runtime of the python kind from the same image (its core install carries that kind):
# it registers in etcd, takes the model the registry assigns it, and the gateway routes to it.
runtime=modelgw-smoke-runtime-$$
containers+=("$runtime")
"${PODMAN_RUN[@]}" --detach --name "$runtime" --read-only --tmpfs /tmp "$image" \
  runtime serve --kind python --registry "$etcd_endpoint" --runtime smoke-python \
  --host 127.0.0.1 --port "$runtime_port" >/dev/null
infer() {
  curl -sf -H 'content-type: application/json' "http://127.0.0.1:$http_port/v2/models/smoke-scale/infer" \
    -d '{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.5, 2.0]}]}'
}
if ! wait_for "an inference through the gateway answers" 60 infer; then
  podman logs "$runtime" >&2 || true; podman logs "$gateway" >&2 || true; exit 1
fi
echo "smoke: inference through the gateway: $(infer)"
step "run (etcd, gateway and runtime containers, checks)" "$t"

echo "smoke: PASSED"
printf 'smoke: %s\n' "${timings[@]}"
