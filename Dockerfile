# CPU image of ihc-adapter.
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends dcmtk dicom3tools \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 ihc
WORKDIR /opt/ihc-adapter
COPY pyproject.toml README.md ./
COPY adapter ./adapter
COPY pipeline ./pipeline
COPY dicom_io ./dicom_io
COPY config ./config
# torch==2.13.0 is pinned in pyproject. To keep the image small, point pip at a
# CPU-only torch wheel (PIP_EXTRA_INDEX_URL build arg) where your mirror has one.
ARG PIP_EXTRA_INDEX_URL=
RUN pip install --no-cache-dir . \
 && ihc-adapter --help >/dev/null

RUN mkdir -p /data/spool /data/output /data/incoming /config && chown -R ihc /data
USER ihc
VOLUME ["/data/spool", "/data/output", "/data/incoming", "/config"]
# DICOM (C-STORE, C-ECHO) and /healthz + /metrics for Prometheus.
EXPOSE 11112 8080
ENV IHC_ADAPTER__PATHS__SPOOL=/data/spool IHC_ADAPTER__PATHS__OUTPUT=/data/output \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    IHC_ADAPTER__SERVICE__HTTP_HOST=0.0.0.0 IHC_ADAPTER__SERVICE__HTTP_PORT=8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"
ENTRYPOINT ["ihc-adapter", "serve"]
CMD ["--config", "/config/adapter.toml"]
