# syntax=docker/dockerfile:1
# CPU image of ihc-adapter: the service (`ihc-adapter serve`) and its command line.
#
# Reproducible: the base image is pinned by digest, and every Python package is
# installed from requirements.lock with its hashes (pip --require-hashes).
# Refresh both together: `docker buildx imagetools inspect python:3.11-slim-bookworm`
# for the digest; `uv pip compile pyproject.toml --generate-hashes --python-version 3.11
# --python-platform x86_64-manylinux_2_28 -o requirements.lock` for the lock (add
# `--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match`
# for a CPU-only torch, which makes the image several GB smaller).
#
# A private package index is passed as a build secret, so neither its address nor
# its credentials reach any layer or the image history:
#   docker build --secret id=pip_index_url,env=PIP_INDEX_URL -t ihc-adapter .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY requirements.lock ./
RUN --mount=type=secret,id=pip_index_url,required=false \
    python -m venv /opt/ihc-adapter \
 && if [ -s /run/secrets/pip_index_url ]; then export PIP_INDEX_URL="$(cat /run/secrets/pip_index_url)"; fi \
 && /opt/ihc-adapter/bin/pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY adapter ./adapter
COPY pipeline ./pipeline
COPY dicom_io ./dicom_io
COPY config ./config
# The project itself: its dependencies are all in the lock already.
RUN /opt/ihc-adapter/bin/pip install --no-cache-dir --no-deps . \
 && /opt/ihc-adapter/bin/ihc-adapter --help >/dev/null

# Runtime: the virtual environment only. No compilers, no DICOM validators
# (dcmtk, dicom3tools are for the test suite), no build arguments.
FROM ${PYTHON_IMAGE}
RUN useradd --create-home --uid 1000 ihc \
 && mkdir -p /data/spool /data/output /data/incoming /config \
 && chown -R ihc /data
COPY --from=build /opt/ihc-adapter /opt/ihc-adapter
ENV PATH=/opt/ihc-adapter/bin:$PATH \
    IHC_ADAPTER__PATHS__SPOOL=/data/spool IHC_ADAPTER__PATHS__OUTPUT=/data/output \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    IHC_ADAPTER__SERVICE__HTTP_HOST=0.0.0.0 IHC_ADAPTER__SERVICE__HTTP_PORT=8080
USER ihc
VOLUME ["/data/spool", "/data/output", "/data/incoming", "/config"]
# DICOM (C-STORE, C-ECHO) and /healthz + /metrics. Publish 8080 only to the
# monitoring network (docs/deployment.md): it has no authentication.
EXPOSE 11112 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"
ENTRYPOINT ["ihc-adapter", "serve"]
CMD ["--config", "/config/adapter.toml"]
