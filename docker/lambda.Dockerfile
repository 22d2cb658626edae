# syntax=docker/dockerfile:1
# The mhist_nb prediction API as an AWS Lambda container image: handler `mhist_nb.aws_lambda.handler` (API Gateway
# events, HTTP API 2.0 or REST 1.0, run through the same Flask app as the server), ONNX Runtime on CPU, no torch.
# The models are loaded once per execution environment, at init, from MHIST_MODEL_DIR (/opt/models).
#
# Base: python:3.12 on purpose, not 3.11. Lambda's python 3.8-3.11 images are Amazon Linux 2 (glibc 2.26), for which
# onnxruntime has published no wheel since 1.16 (its wheels need glibc >= 2.28), so `onnxruntime>=1.18` cannot install
# there. python:3.12 is Amazon Linux 2023 (glibc 2.34); mhist_nb supports Python >= 3.11.
#
# Two ways to give it models (a folder of manifest_*.json + the ONNX files they name, e.g. reports/demo after make demo):
#
# 1. Copied into the image: the default target, `with-models`; what you push to ECR for Lambda.
#      docker build -f docker/lambda.Dockerfile -t mhist-lambda .                          # copies reports/demo
#      docker build -f docker/lambda.Dockerfile --build-arg MODELS=reports/other -t mhist-lambda .
#    MODELS is a folder in the build context (.dockerignore lets in only the manifests and .onnx files of reports/*/).
#
# 2. Mounted at run time: target `runtime` (the code only), for local tests with the Runtime Interface Emulator that
#    the base image carries, or on Lambda with an EFS access point (set MHIST_MODEL_DIR to its /mnt/... path).
#      docker build -f docker/lambda.Dockerfile --target runtime -t mhist-lambda-code .
#      docker run --rm -p 9000:8080 -v "$PWD/reports/demo:/opt/models:ro" mhist-lambda-code
#      curl -s localhost:9000/2015-03-31/functions/function/invocations -d '{"httpMethod": "GET", "path": "/ready"}'
FROM public.ecr.aws/lambda/python:3.12 AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MHIST_MODEL_DIR=/opt/models

# the serving dependencies into the task root, where the Lambda runtime imports from; exactly pyproject's `serve`
# extra, never torch
COPY docker/requirements-serve.txt /tmp/src/docker/requirements-serve.txt
RUN pip install --no-cache-dir --target "${LAMBDA_TASK_ROOT}" -r /tmp/src/docker/requirements-serve.txt

# the package itself, without its training dependencies (built from /tmp/src, which is then deleted)
COPY pyproject.toml README.md /tmp/src/
COPY mhist_nb/ /tmp/src/mhist_nb/
RUN pip install --no-cache-dir --no-deps --target "${LAMBDA_TASK_ROOT}" /tmp/src \
    && rm -rf /tmp/src \
    && mkdir -p /opt/models \
    && PYTHONPATH="${LAMBDA_TASK_ROOT}" python3 -c "import importlib.util as u, mhist_nb.aws_lambda, mhist_nb.api; assert u.find_spec('torch') is None, 'torch in the image'"

# Lambda runs the function as its own unprivileged user whatever USER says; this makes local runs match. Numeric
# (nobody on Amazon Linux 2023), so nothing needs to resolve a name.
USER 65534:65534

CMD ["mhist_nb.aws_lambda.handler"]

FROM runtime AS with-models
ARG MODELS=reports/demo
COPY --chmod=0444 ${MODELS}/manifest_*.json ${MODELS}/*.onnx /opt/models/
