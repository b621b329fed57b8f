# modelgw-runtime-llm: the llm runtime kind on NVIDIA GPUs (torch's CUDA 13 build, TensorRT
# for CUDA 13). The reconciler starts it as `modelgw runtime serve --kind llm ...`. By hand:
#
#   deploy/images/build.sh --images modelgw-runtime-llm      (wheelhouse for Python 3.12)
#
# The build context is a wheelhouse as for the other images (requirements.txt is a copy of
# modelgw-runtime-llm.requirements.txt), made for the base's Python: Ubuntu 24.04's 3.12.
# NOT BUILT on modelgw's development machines: they reach no NVIDIA registry or index.
# The base is the CUDA runtime (no compiler, no CUDA headers): torch's and TensorRT's
# wheels carry the CUDA libraries they link; the node's driver must support CUDA 13.0.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS build
ARG MODELGW_VERSION=0.1.0
# Ubuntu's python3 is held to 3.12 by the base's release (noble); its security updates are
# taken at build time rather than pinned to a patch that the archive drops.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install --yes --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY . /wheels/
RUN python3 -m venv /opt/modelgw \
    && /opt/modelgw/bin/python -m pip install --no-cache-dir --no-index --find-links /wheels \
        --requirement /wheels/requirements.txt --constraint /wheels/constraints.txt \
    && /opt/modelgw/bin/python -c "import modelgw, sys; sys.exit(modelgw.__version__ != '${MODELGW_VERSION}')" \
    && /opt/modelgw/bin/python -m pip uninstall --yes --quiet pip

FROM ${BASE_IMAGE}
ARG MODELGW_VERSION=0.1.0
LABEL org.opencontainers.image.title="modelgw-runtime-llm" \
      org.opencontainers.image.description="modelgw runtime: llm kind on CUDA (torch, TensorRT)" \
      org.opencontainers.image.version="${MODELGW_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# the interpreter only: the virtualenv comes built from the build stage
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install --yes --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 65532 --user-group --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin modelgw
COPY --from=build /opt/modelgw /opt/modelgw
# HOME=/tmp: the root filesystem is read-only in a pod; /tmp is the writable emptyDir.
ENV PATH=/opt/modelgw/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
# the runtime's gRPC port (name grpc in the pod spec)
EXPOSE 9000
ENTRYPOINT ["modelgw"]
CMD ["runtime", "serve", "--help"]
