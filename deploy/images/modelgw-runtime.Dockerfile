# modelgw-runtime: a model runtime of the pytorch, onnx or python kind (torch CPU build +
# onnxruntime). The reconciler starts it as `modelgw runtime serve --kind K ...`. By hand:
#
#   buildah bud -f deploy/images/modelgw-runtime.Dockerfile --build-arg MODELGW_VERSION=0.1.0 \
#     -t modelgw-runtime:0.1.0 WHEELHOUSE
#
# The build context is a wheelhouse: modelgw's wheel, every dependency's, requirements.txt
# (a copy of modelgw-runtime.requirements.txt) and constraints.txt. The image installs from it
# alone (--no-index), so a machine that reaches no package index builds it too.
# BASE_IMAGE: any Debian bookworm with python3 3.11 and its venv module; the default is the
# official Python image, a machine without a registry passes debian-base.sh's image.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG MODELGW_VERSION=0.1.0
COPY . /wheels/
# The virtualenv is the unit the final stage copies; pip leaves with the build stage.
RUN python3 -m venv /opt/modelgw \
    && /opt/modelgw/bin/python -m pip install --no-cache-dir --no-index --find-links /wheels \
        --requirement /wheels/requirements.txt --constraint /wheels/constraints.txt \
    && /opt/modelgw/bin/python -c "import modelgw, sys; sys.exit(modelgw.__version__ != '${MODELGW_VERSION}')" \
    && /opt/modelgw/bin/python -m pip uninstall --yes --quiet pip

FROM ${BASE_IMAGE}
ARG MODELGW_VERSION=0.1.0
LABEL org.opencontainers.image.title="modelgw-runtime" \
      org.opencontainers.image.description="modelgw runtime: pytorch (CPU), onnx and python kinds" \
      org.opencontainers.image.version="${MODELGW_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed UID, so that runAsUser/runAsNonRoot in the manifests can name it.
RUN useradd --uid 65532 --user-group --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin modelgw
COPY --from=build /opt/modelgw /opt/modelgw
# HOME=/tmp: the root filesystem is read-only in a pod; /tmp is the writable emptyDir.
ENV PATH=/opt/modelgw/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
# the runtime's gRPC port (name grpc in the pod spec)
EXPOSE 9000
ENTRYPOINT ["modelgw"]
CMD ["runtime", "serve", "--help"]
