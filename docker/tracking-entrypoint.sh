#!/bin/sh
# The shared MLflow tracking server: PostgreSQL as the backend store, artifacts proxied to MLFLOW_ARTIFACTS_DESTINATION
# (s3://bucket/prefix with an S3-compatible store, or a file URI), and every request behind basic auth.
# Settings come from the environment (docker-compose.tracking.yml reads them from .env.tracking; none is committed).
set -eu

: "${POSTGRES_USER:?POSTGRES_USER is not set}"
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is not set}"
: "${POSTGRES_DB:?POSTGRES_DB is not set}"
: "${MLFLOW_ADMIN_PASSWORD:?MLFLOW_ADMIN_PASSWORD is not set}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?MLFLOW_ARTIFACTS_DESTINATION is not set (e.g. s3://mlflow-artifacts)}"
POSTGRES_HOST="${POSTGRES_HOST:-postgres}"
POSTGRES_PORT="${POSTGRES_PORT:-5432}"
MLFLOW_HOST="${MLFLOW_HOST:-0.0.0.0}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
db="postgresql://${POSTGRES_USER}:${POSTGRES_PASSWORD}@${POSTGRES_HOST}:${POSTGRES_PORT}"

# MLflow's auth app reads its settings (and the first admin's password) from an ini file; users and permissions live in
# their own database beside the tracking one. The file holds secrets: readable by this user only.
MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-${HOME:-/tmp}/basic_auth.ini}"
export MLFLOW_AUTH_CONFIG_PATH
umask 077
cat > "${MLFLOW_AUTH_CONFIG_PATH}" <<INI
[mlflow]
default_permission = ${MLFLOW_DEFAULT_PERMISSION:-READ}
database_uri = ${db}/${MLFLOW_AUTH_DB:-${POSTGRES_DB}_auth}
admin_username = ${MLFLOW_ADMIN_USER:-admin}
admin_password = ${MLFLOW_ADMIN_PASSWORD}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI

exec mlflow server \
  --backend-store-uri "${db}/${POSTGRES_DB}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION}" --serve-artifacts \
  --app-name basic-auth \
  --host "${MLFLOW_HOST}" --port "${MLFLOW_PORT}" "$@"
