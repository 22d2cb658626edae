"""The papermill pipeline from the command line: parameter checking, a failing notebook, a sweep, the SageMaker entry.

Each test uses its own throw-away MLflow store (MLFLOW_TRACKING_URI) and report folder."""
import json, os, subprocess, sys
from pathlib import Path
import nbformat, pytest, yaml
from conftest import ROOT, mhist


@pytest.fixture
def env(tmp_path):
    "Environment for a subprocess: a private MLflow store, fail-fast HTTP retries."
    e = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path/'mlflow.db'}", MLFLOW_HTTP_REQUEST_MAX_RETRIES='0')
    e.pop('MLFLOW_RUN_ID', None)
    return e


def write_yaml(path, d):
    path.write_text(yaml.safe_dump(d, sort_keys=False)); return path


def test_shipped_parameter_files_are_valid(monkeypatch, tmp_path):
    from mhist_nb.pipeline import load_params, load_sweep
    monkeypatch.setenv('MHIST_DIR', str(tmp_path)); monkeypatch.setenv('MHIST_VIT_WEIGHTS', str(tmp_path/'w.safetensors'))
    monkeypatch.chdir(ROOT)
    for f in ('demo', 'mhist_cpu', 'mhist_gpu'):
        cfg = load_params(ROOT/'params'/f'{f}.yaml')
        assert cfg['run'] == ['02_explore', '10_train_mlp', '11_train_vit', '12_threshold', '13_onnx', '14_compare']
    spec = load_sweep(ROOT/'params'/'sweep_vit.yaml')
    assert spec['notebook'] == '11_train_vit'


def test_unknown_key_is_rejected_before_anything_runs(tmp_path, env):
    p = write_yaml(tmp_path/'typo.yaml', {'name': 'typo', 'run': ['10_train_mlp'], '10_train_mlp': {'lr_ful': 1e-3}})
    r = mhist('run', p, '--reports', tmp_path/'reports', env=env)
    assert r.returncode == 1
    assert "unknown parameter 'lr_ful'" in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path/'reports').exists()            # nothing ran, nothing written


def test_failing_notebook_stops_the_run_naming_the_cell(tmp_path, env):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('n = 3', metadata={'tags': ['parameters']}),
        nbformat.v4.new_code_cell('ok = n * 2'),
        nbformat.v4.new_code_cell("assert ok == 7, 'deliberately failing cell'"),
        nbformat.v4.new_code_cell("print('never reached')")])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    nbformat.write(nb, tmp_path/'broken.ipynb')
    after = tmp_path/'after.ipynb'; nbformat.write(nb, after)
    p = write_yaml(tmp_path/'fail.yaml', {'name': 'fail', 'run': [str(tmp_path/'broken.ipynb'), str(after)],
                                          'broken': {'n': 3}})
    r = mhist('run', p, '--reports', tmp_path/'reports', '--quiet', env=env)
    assert r.returncode == 1
    assert 'broken failed at cell 3 of broken.ipynb' in r.stderr
    assert "assert ok == 7" in r.stderr and 'deliberately failing cell' in r.stderr
    out = tmp_path/'reports'/'fail'
    assert (out/'broken.ipynb').is_file() and (out/'broken.html').is_file()     # partial notebook kept
    assert not (out/'after.ipynb').exists()                                      # stopped at the first failure


def test_tiny_sweep(tmp_path, env):
    from mlflow import MlflowClient
    base = write_yaml(tmp_path/'base.yaml', {
        'name': 'tiny', 'synth': {'scale': 0.02, 'seed': 0, 'jobs': 1}, 'run': ['11_train_vit'],
        'common': {'data_dir': str(tmp_path/'data'), 'seed': 0, 'quiet': True},
        '11_train_vit': {'full_epochs': 1, 'batch_size': 16}})
    sweep = write_yaml(tmp_path/'sweep.yaml', {
        'name': 'tiny_sweep', 'base': str(base), 'notebook': '11_train_vit',
        'grid': {'head_epochs': [0, 1], 'lr_full': [0.001, 0.0003]}, 'rule': {'monitor': 'best_val_auc', 'mode': 'max'}})
    r = mhist('sweep', sweep, '--reports', tmp_path/'reports', '--quiet', env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'best_val_auc' in r.stdout and r.stdout.count('FINISHED') == 4
    client = MlflowClient(env['MLFLOW_TRACKING_URI'])
    runs = client.search_runs([client.get_experiment_by_name('mhist-vit').experiment_id])
    parents = [x for x in runs if x.data.tags.get('mhist.sweep') == 'parent']
    children = [x for x in runs if x.data.tags.get('mlflow.parentRunId')]
    assert len(parents) == 1 and len(children) == 4
    assert {x.data.tags['mlflow.parentRunId'] for x in children} == {parents[0].info.run_id}
    assert all(x.info.status == 'FINISHED' and 'best_val_auc' in x.data.metrics for x in children)
    assert {(x.data.params['nb.head_epochs'], x.data.params['nb.lr_full']) for x in children} == \
        {('0', '0.001'), ('0', '0.0003'), ('1', '0.001'), ('1', '0.0003')}
    import pandas as pd
    table = pd.read_csv(tmp_path/'reports'/'tiny_sweep'/'sweep.csv')
    assert len(table) == 4 and table.best_val_auc.is_monotonic_decreasing


def test_sagemaker_entry_contract(tmp_path, env, synth_dir):
    params = write_yaml(tmp_path/'sm.yaml', {'name': 'sm', 'run': ['10_train_mlp'],
                                             'common': {'data_dir': 'set-by-sagemaker', 'seed': 0, 'quiet': True},
                                             '10_train_mlp': {'epochs': 2}})
    sm = {'SM_CHANNEL_TRAINING': str(synth_dir), 'SM_MODEL_DIR': str(tmp_path/'model'),
          'SM_OUTPUT_DATA_DIR': str(tmp_path/'output'),
          'SM_HPS': json.dumps({'params': str(params), 'name': 'job1', '10_train_mlp.epochs': 1})}
    r = subprocess.run([sys.executable, str(ROOT/'sagemaker'/'train.py')], env={**env, **sm}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out, model = tmp_path/'output'/'job1', tmp_path/'model'
    assert (out/'10_train_mlp.ipynb').is_file() and (out/'10_train_mlp.html').is_file()
    nb = nbformat.read(out/'10_train_mlp.ipynb', as_version=4)
    injected = next(c for c in nb.cells if 'injected-parameters' in c.metadata.get('tags', []))
    assert f'data_dir = "{synth_dir}"' in injected.source and 'epochs = 1' in injected.source   # channel + override
    assert (model/'predictions_mlp_val.csv').is_file() and (model/'predictions_mlp_test.csv').is_file()
    assert list(model.rglob('best.pt'))
    # a mistyped hyper-parameter is rejected, naming it; missing SageMaker variables are reported
    bad = dict(sm, SM_HPS=json.dumps({'params': str(params), '10_train_mlp.epoks': 1}))
    r = subprocess.run([sys.executable, str(ROOT/'sagemaker'/'train.py')], env={**env, **bad}, capture_output=True, text=True)
    assert r.returncode == 1 and "unknown parameter 'epoks'" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT/'sagemaker'/'train.py')], env={k: v for k, v in env.items() if not k.startswith('SM_')},
                       capture_output=True, text=True)
    assert r.returncode == 2 and 'SM_CHANNEL_TRAINING' in r.stderr
