# syntax=docker/dockerfile:1
# The mhist_nb Streamlit page (`mhist app`, mhist_nb/app.py): tiles, both models' P(SSA) against their thresholds, occlusion
# maps, and the study's figures. No torch.
#
#   docker build -f docker/app.Dockerfile -t mhist-app .
#   docker compose up -d app            # with the API (MHIST_API_URL=http://api:8000), the reports and tiles read-only
#   docker run --rm -p 8501:8501 -v "$PWD/reports/demo:/reports:ro" -v "$PWD/data/synth:/data:ro" mhist-app
#
# Predictions go to the API at MHIST_API_URL when it is set; otherwise the page loads the models itself (ONNX Runtime,
# the `serve` requirements are installed for that) from MHIST_MODEL_DIR, default the reports folder. Settings (all
# optional): MHIST_REPORTS (/reports), MHIST_DATA_DIR (/data), MHIST_MODEL_DIR, MHIST_API_URL, MHIST_API_TIMEOUT (30 s),
# MHIST_EXPLAIN_BUDGET_S (in process only).
FROM python:3.11-slim-bookworm

# Streamlit writes its machine id and caches under $HOME: a tmpfs (/tmp) in docker-compose.yml, the image being read-only
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false \
    MHIST_REPORTS=/reports \
    MHIST_DATA_DIR=/data

# an unprivileged user owning nothing in the image
RUN groupadd --system --gid 10001 mhist \
    && useradd --system --uid 10001 --gid mhist --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mhist \
    && mkdir -p /reports /data

WORKDIR /app

# the serving requirements (pyproject's `serve` extra: the page can run the models in process) and its `app` extra, in
# one layer reused while only the package changes; never torch. The `app` specifiers are pyproject's, checked by a test.
COPY docker/requirements-serve.txt docker/requirements-serve.txt
RUN pip install --no-cache-dir -r docker/requirements-serve.txt "streamlit>=1.35" "requests>=2.31"

# the package without its training dependencies, built from /tmp/src, which is then deleted (as in docker/api.Dockerfile)
COPY pyproject.toml README.md /tmp/src/
COPY mhist_nb/ /tmp/src/mhist_nb/
RUN pip install --no-cache-dir --no-deps /tmp/src \
    && rm -rf /tmp/src \
    && python -c "import importlib.util as u, mhist_nb.app, mhist_nb.cli; assert u.find_spec('torch') is None, 'torch in the image'"

USER 10001:10001

EXPOSE 8501

# Streamlit's own health route; python, as slim images have no curl
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=3)"]

CMD ["mhist", "app", "--host", "0.0.0.0", "--port", "8501"]
