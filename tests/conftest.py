import os, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def mhist(*args, check=False, **kw):
    "Run the installed `mhist` console script; return the CompletedProcess."
    exe = shutil.which('mhist', path=str(BIN)) or shutil.which('mhist')
    assert exe, 'the mhist console script is not installed (pip install -e .)'
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, check=check, **kw)


@pytest.fixture(scope='session')
def synth_dir(tmp_path_factory):
    "A small synthetic MHIST-layout dataset shared by the tests (read-only by convention)."
    from mhist_nb.synth import synth
    return synth(tmp_path_factory.mktemp('data')/'synth', scale=0.02, seed=0)


@pytest.fixture(scope='session')
def tiny_pipeline(tmp_path_factory):
    """The whole default pipeline (explore -> MLP -> ViT -> threshold study -> ONNX -> comparison -> explanations) on a tiny synthetic
    set, run once per session with `mhist run`: the end-to-end test checks its reports, the serving tests serve its
    models. Returns (reports folder, MLflow tracking URI, the CompletedProcess)."""
    import yaml
    tmp = tmp_path_factory.mktemp('pipeline')
    params = tmp/'tiny.yaml'
    params.write_text(yaml.safe_dump({
        'name': 'tiny', 'synth': {'scale': 0.05, 'seed': 0, 'jobs': 2},
        'common': {'data_dir': str(tmp/'data'), 'seed': 0, 'quiet': True},
        '10_train_mlp': {'epochs': 2}, '11_train_vit': {'head_epochs': 1, 'full_epochs': 2},
        '13_onnx': {'latency_runs': 3}}))
    uri = f"sqlite:///{tmp/'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES='0')
    r = mhist('run', params, '--reports', tmp/'reports', '--quiet', env=env)
    return tmp/'reports'/'tiny', uri, r
