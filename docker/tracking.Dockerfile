# The shared MLflow tracking server of docker-compose.tracking.yml: PostgreSQL backend, proxied S3 artifacts, basic auth.
FROM python:3.11-slim

COPY docker/requirements-tracking.txt /tmp/requirements-tracking.txt
RUN pip install --no-cache-dir -r /tmp/requirements-tracking.txt \
    && useradd --create-home --uid 10001 mlflow

COPY --chmod=755 docker/tracking-entrypoint.sh /usr/local/bin/tracking-entrypoint.sh

USER 10001
WORKDIR /home/mlflow
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["/usr/local/bin/tracking-entrypoint.sh"]
