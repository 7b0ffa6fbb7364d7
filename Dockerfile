# The discovery server and command line (deploy/README.md, "The image").
# Pinned by tag; to pin by digest, replace the default with python:3.12-slim-bookworm@sha256:...
# (read it with `docker buildx imagetools inspect python:3.12-slim-bookworm`).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Offline: PIP_NO_INDEX=1 and the wheels in deploy/wheelhouse/ (its README says how to fill it).
# Or a mirror: PIP_INDEX_URL=https://pypi.internal.example/simple
ARG PIP_NO_INDEX=0
ARG PIP_INDEX_URL=https://pypi.org/simple
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INDEX=${PIP_NO_INDEX} \
    PIP_INDEX_URL=${PIP_INDEX_URL}
WORKDIR /src
COPY deploy/wheelhouse/ /wheelhouse/
COPY clients/python/ clients/python/
COPY pyproject.toml README.md ./
COPY discovery/ discovery/
# The client first: the server depends on discovery-client, which no index has.
RUN python -m pip wheel --wheel-dir /wheels --find-links /wheelhouse ./clients/python \
    && python -m pip wheel --wheel-dir /wheels --find-links /wheelhouse --find-links /wheels .
# A virtual environment the final stage copies whole (same base image, same paths).
# xds-protos ships an old copy of opentelemetry/proto over opentelemetry-proto's,
# which breaks the OTLP exporters: put the real one back, as the Makefile
# does (the version is the one just installed, so DL3013's pin is there).
# hadolint ignore=DL3013
RUN python -m venv /opt/discovery \
    && /opt/discovery/bin/pip install --no-index --find-links /wheels discovery \
    && /opt/discovery/bin/pip install --no-index --find-links /wheels --force-reinstall --no-deps \
        "opentelemetry-proto==$(/opt/discovery/bin/python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')" \
    && /opt/discovery/bin/pip uninstall --yes pip \
    && /opt/discovery/bin/python -m compileall -q /opt/discovery

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="discovery" \
      org.opencontainers.image.description="Multi-region service discovery on etcd and gRPC"
COPY --from=build /opt/discovery /opt/discovery
# Non-root with a numeric id (Kubernetes' runAsNonRoot can check it); nothing is written
# at run time, so the root filesystem may be read-only.
RUN useradd --system --uid 10001 --gid 0 --no-create-home --shell /usr/sbin/nologin discovery
ENV PATH=/opt/discovery/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:0
# gRPC, plaintext gRPC health, HTTP, metrics, DNS (unprivileged; port 53 is the Service's)
EXPOSE 7400 7401 8400 9400 8600/udp 8600/tcp
ENTRYPOINT ["discovery"]
CMD ["serve", "--help"]
