# syntax=docker/dockerfile:1
# The mhist_nb prediction API: Flask app `mhist_nb.api:create_app()` under gunicorn, ONNX Runtime on CPU, no torch.
#
#   docker build -f docker/api.Dockerfile -t mhist-api .
#   docker run --rm -p 8000:8000 -v "$PWD/reports/demo:/models:ro" mhist-api        # or: docker compose up api
#   curl -s localhost:8000/health; curl -s -F file=@tile.png localhost:8000/predict
#
# SageMaker (bring your own container) starts it as `docker run IMAGE serve`: docker/entrypoint.sh then serves on
# 0.0.0.0:8080 with the models of /opt/ml/model (GET /ping, POST /invocations).
#
# Models are not in the image: mount a folder of manifest_*.json + the ONNX files they name read-only at /models
# (MHIST_MODEL_DIR, defaulted to /models by the entrypoint). Settings (all optional): PORT (8000), MHIST_WORKERS,
# MHIST_THREADS, MHIST_MAX_BODY_MB (10), MHIST_MAX_BATCH (32), MHIST_RESIZE (reject|center-crop|resize),
# MHIST_ALLOWED_ORIGINS (CORS, comma-separated; none by default), MHIST_DEFAULT_MODELS, MHIST_TIMEOUT. gunicorn's
# config (mhist_nb.gunicorn_conf) gives each start a fresh PROMETHEUS_MULTIPROC_DIR under /tmp unless one is set.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8000

# an unprivileged user owning nothing in the image: code and models are read-only to the server
RUN groupadd --system --gid 10001 mhist \
    && useradd --system --uid 10001 --gid mhist --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mhist \
    && mkdir -p /models

WORKDIR /app

# the serving dependencies first (their layer is reused while only the package changes); exactly pyproject's `serve`
# extra, never torch
COPY docker/requirements-serve.txt docker/requirements-serve.txt
RUN pip install --no-cache-dir -r docker/requirements-serve.txt

# the package itself, without its training dependencies (torch, timm, mlflow, ...). Built from /tmp/src, which is then
# deleted: no source tree in the working directory shadows the installed package, so the check imports what pip installed.
COPY pyproject.toml README.md /tmp/src/
COPY mhist_nb/ /tmp/src/mhist_nb/
RUN pip install --no-cache-dir --no-deps /tmp/src \
    && rm -rf /tmp/src \
    && python -c "import importlib.util as u, mhist_nb.api, mhist_nb.aws_lambda; assert u.find_spec('torch') is None, 'torch in the image'"

# the entrypoint and the health check (and the requirements file, for reference)
COPY docker/ docker/

# numeric, so that runtimes can verify it is not root without reading /etc/passwd (Kubernetes runAsNonRoot)
USER 10001:10001

EXPOSE 8000 8080

# GET /health with python (slim images have no curl) on $PORT, or on 8080 in SageMaker's `serve` mode
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]

ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["gunicorn", "-c", "python:mhist_nb.gunicorn_conf", "mhist_nb.api:create_app()"]
