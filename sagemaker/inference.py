"""SageMaker framework-container entry points (PyTorch/scikit-learn/... inference containers call these four).

The model archive holds the manifests and ONNX files that `mhist run` writes (`manifest_*.json`, `model_*.onnx`);
the container needs `mhist_nb` (installed with `--no-deps`) and docker/requirements-serve.txt, not PyTorch.
Bring-your-own-container deployments use the API image instead (`docker/api.Dockerfile`, started with `serve`)."""
from mhist_nb.api import input_fn, model_fn, output_fn, predict_fn

__all__ = ['model_fn', 'input_fn', 'predict_fn', 'output_fn']
