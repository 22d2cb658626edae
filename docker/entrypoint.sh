#!/bin/sh
# Entrypoint of the mhist_nb API image (docker/api.Dockerfile).
#
#   serve            SageMaker bring-your-own-container: SageMaker starts the container as `docker run IMAGE serve`
#                    and expects HTTP on port 8080 (GET /ping, POST /invocations) with the model unpacked under
#                    /opt/ml/model. Runs the image's gunicorn command bound to 0.0.0.0:8080 (SAGEMAKER_BIND_TO_PORT,
#                    set by SageMaker in multi-container endpoints, overrides the port) with MHIST_MODEL_DIR
#                    defaulting to /opt/ml/model. Arguments after `serve` are passed on to gunicorn.
#   anything else    exec'd as is (the image's CMD runs gunicorn; `docker run IMAGE sh` gives a shell), with
#                    MHIST_MODEL_DIR defaulting to /models, where docker-compose.yml mounts the models read-only.
#
# MHIST_MODEL_DIR is defaulted here rather than with ENV in the Dockerfile, so that each mode gets its own default
# and a value set by the user (docker run -e, compose, a SageMaker model's Environment) always wins.
set -eu

if [ "${1:-}" = "serve" ]; then
    shift
    MHIST_MODEL_DIR="${MHIST_MODEL_DIR:-/opt/ml/model}"
    export MHIST_MODEL_DIR
    port="${SAGEMAKER_BIND_TO_PORT:-8080}"
    exec gunicorn -c python:mhist_nb.gunicorn_conf --bind "0.0.0.0:${port}" "$@" 'mhist_nb.api:create_app()'
fi

MHIST_MODEL_DIR="${MHIST_MODEL_DIR:-/models}"
export MHIST_MODEL_DIR
exec "$@"
