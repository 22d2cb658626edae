"""The papermill pipeline from the command line: parameter checking, a failing notebook, a sweep, the SageMaker entry.

Each test uses its own throw-away MLflow store (MLFLOW_TRACKING_URI) and report folder."""
import html, io, json, os, re, subprocess, sys, tarfile, time
from pathlib import Path
import nbformat, pandas as pd, pytest, yaml
from conftest import ROOT, free_port, mhist


@pytest.fixture
def env(tmp_path):
    "Environment for a subprocess: a private MLflow store, fail-fast HTTP retries."
    e = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path/'mlflow.db'}", MLFLOW_HTTP_REQUEST_MAX_RETRIES='0')
    e.pop('MLFLOW_RUN_ID', None)
    return e


def write_yaml(path, d):
    path.write_text(yaml.safe_dump(d, sort_keys=False)); return path


def write_nb(path, params, *cells):
    "A small notebook: a `parameters` cell, then one code cell per string."
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(params, metadata={'tags': ['parameters']}),
                                         *map(nbformat.v4.new_code_cell, cells)])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    nbformat.write(nb, path); return path


def injected(nb_path):
    "Source of the cell papermill injected into an executed notebook."
    nb = nbformat.read(nb_path, as_version=4)
    return next(c.source for c in nb.cells if 'injected-parameters' in c.metadata.get('tags', []))


def test_shipped_parameter_files_are_valid(monkeypatch, tmp_path):
    from mhist_nb.pipeline import load_params
    from mhist_nb.sweeps import load_sweep
    monkeypatch.setenv('MHIST_DIR', str(tmp_path)); monkeypatch.setenv('MHIST_VIT_WEIGHTS', str(tmp_path/'w.safetensors'))
    monkeypatch.setenv('MHIST_OPTUNA_STORAGE', f"sqlite:///{tmp_path/'optuna.db'}")
    monkeypatch.chdir(ROOT)
    for f in ('demo', 'mhist_cpu', 'mhist_gpu'):
        cfg = load_params(ROOT/'params'/f'{f}.yaml')
        assert cfg['run'] == ['02_explore', '10_train_mlp', '11_train_vit', '12_threshold', '13_onnx', '14_compare', '15_explain']
    assert load_params(ROOT/'params'/'gpu_smoke.yaml')['run']                  # its values within their ranges too
    for f in ('sweep_vit', 'sweep_vit_optuna'):
        assert load_sweep(ROOT/'params'/f'{f}.yaml')['notebook'] == '11_train_vit'


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
    """The entry as the PyTorch container's training toolkit runs it: `python sagemaker/train.py` with the
    hyper-parameters also as arguments, from the unpacked package that `mhist sagemaker train` uploads (this working
    tree's), where the toolkit's `pip install -r requirements.txt` installs the project editable (PYTHONPATH here)."""
    from mhist_nb.sagemaker_jobs import source_package
    code = tmp_path/'code'
    with tarfile.open(fileobj=io.BytesIO(source_package(ROOT, allow_dirty=True).data)) as t: t.extractall(code, filter='data')
    write_yaml(code/'params'/'sm.yaml', {'name': 'sm', 'run': ['10_train_mlp'],
                                         'common': {'data_dir': 'set-by-sagemaker', 'seed': 0, 'quiet': True},
                                         '10_train_mlp': {'epochs': 2}})
    job = dict(env, PYTHONPATH=str(code))
    r = subprocess.run([sys.executable, '-c', 'import mhist_nb; print(mhist_nb.__file__)'], env=job, cwd=code,
                       capture_output=True, text=True)
    assert r.stdout.strip() == str(code/'mhist_nb'/'__init__.py'), r.stdout + r.stderr    # the package's copy
    hps = {'params': 'params/sm.yaml', 'name': 'job1', '10_train_mlp.epochs': 1}
    sm = {'SM_CHANNEL_TRAINING': str(synth_dir), 'SM_MODEL_DIR': str(tmp_path/'model'),
          'SM_OUTPUT_DATA_DIR': str(tmp_path/'output'), 'SM_HPS': json.dumps(hps)}
    argv = [sys.executable, 'sagemaker/train.py', *[a for k, v in hps.items() for a in (f'--{k}', str(v))]]
    r = subprocess.run(argv, env={**job, **sm}, cwd=code, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out, model = tmp_path/'output'/'job1', tmp_path/'model'
    assert (out/'10_train_mlp.ipynb').is_file() and (out/'10_train_mlp.html').is_file()
    nb = nbformat.read(out/'10_train_mlp.ipynb', as_version=4)
    injected = next(c for c in nb.cells if 'injected-parameters' in c.metadata.get('tags', []))
    assert f'data_dir = "{synth_dir}"' in injected.source and 'epochs = 1' in injected.source   # channel + override
    assert (model/'predictions_mlp_val.csv').is_file() and (model/'predictions_mlp_test.csv').is_file()
    assert list(model.rglob('best.pt'))
    # a mistyped hyper-parameter is rejected, naming it; missing SageMaker variables are reported
    bad = dict(sm, SM_HPS=json.dumps({'params': 'params/sm.yaml', '10_train_mlp.epoks': 1}))
    r = subprocess.run(argv[:2], env={**job, **bad}, cwd=code, capture_output=True, text=True)
    assert r.returncode == 1 and "unknown parameter 'epoks'" in r.stderr
    r = subprocess.run(argv[:2], env={k: v for k, v in job.items() if not k.startswith('SM_')}, cwd=code,
                       capture_output=True, text=True)
    assert r.returncode == 2 and 'SM_CHANNEL_TRAINING' in r.stderr


def test_command_line_overrides_reach_the_notebook_typed(tmp_path, env):
    write_nb(tmp_path/'echo.ipynb', 'lr: float = 0.1\nn: int = 1\nflag: bool = False', 'print(lr, n, flag)')
    p = write_yaml(tmp_path/'e.yaml', {'name': 'e', 'run': [str(tmp_path/'echo.ipynb')], 'echo': {'n': 2}})
    r = mhist('run', p, '--reports', tmp_path/'reports', '--quiet', '-p', 'echo.lr', '2e-5', '-p', 'echo.n', '3',
              '-p', 'echo.flag', 'true', env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path/'reports'/'e'/'echo.ipynb'
    assert all(s in injected(out) for s in ('lr = 2e-05', 'n = 3', 'flag = True'))     # YAML's string '2e-5' arrived a float
    assert nbformat.read(out, as_version=4).cells[-1].outputs[0].text.strip() == '2e-05 3 True'
    # mistyped keys and values on the command line: nbs/39_cli.ipynb; data folder and weights checks: nbs/30_pipeline.ipynb


def test_report_hides_tagged_cells_and_tqdm_noise(tmp_path, env):
    "The HTML report drops `report-hide` cells (the .ipynb keeps them) and shows no tqdm widget warning; other warnings stay."
    nb = write_nb(tmp_path/'rep.ipynb', 'n: int = 1', 'from tqdm.auto import tqdm\nimport warnings',
                  "print('total', sum(tqdm(range(n))))", "warnings.warn('this one stays')")
    book = nbformat.read(nb, as_version=4); book.cells[1].metadata['tags'] = ['report-hide']; nbformat.write(book, nb)
    p = write_yaml(tmp_path/'r.yaml', {'name': 'r', 'run': [str(nb)], 'rep': {'n': 4}})
    r = mhist('run', p, '--reports', tmp_path/'reports', '--quiet', env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path/'reports'/'r'
    cells = nbformat.read(out/'rep.ipynb', as_version=4).cells
    texts = [o.get('text', '') for c in cells for o in c.get('outputs', [])]
    assert 'total 6\n' in texts and any('this one stays' in t for t in texts), texts
    assert not any('IProgress' in t or 'it/s' in t for t in texts + [r.stdout, r.stderr]), texts      # no widget warning, no bars
    assert any(c.source.startswith('from tqdm.auto') for c in cells if 'report-hide' in c.metadata.get('tags', []))
    page = html.unescape(re.sub(r'<[^>]+>', '', (out/'rep.html').read_text()))       # the text a reader sees
    assert 'total 6' in page and 'this one stays' in page and 'n = 4' in page          # outputs, kept warning, parameters
    assert 'from tqdm.auto' not in page and 'IProgress' not in page

def test_cell_timeout_fails_the_notebook_and_its_mlflow_run(tmp_path, env):
    from mlflow import MlflowClient
    write_nb(tmp_path/'sleepy.ipynb', "experiment: str = 'mhist-timeout'\nnap: float = 0", 'import time', 'time.sleep(nap)',
             "print('woke up')")
    p = write_yaml(tmp_path/'t.yaml', {'name': 't', 'timeout': 600, 'run': [str(tmp_path/'sleepy.ipynb')],
                                       'sleepy': {'nap': 120, 'timeout': 2}})
    t0 = time.perf_counter()
    r = mhist('run', p, '--reports', tmp_path/'reports', '--quiet', env=env)
    assert r.returncode == 1 and time.perf_counter() - t0 < 90                      # the block's 2 s, not the file's 600
    assert 'error: sleepy failed at cell 3 of sleepy.ipynb' in r.stderr and 'time.sleep(nap)' in r.stderr, r.stderr[-3000:]
    assert 'CellTimeoutError: no result within 2 s' in r.stderr
    out = tmp_path/'reports'/'t'
    nb = nbformat.read(out/'sleepy.ipynb', as_version=4)                             # partial notebook kept, the cell marked
    assert nb.cells[3].outputs[-1].ename == 'CellTimeoutError' and nb.cells[3].metadata.papermill.status == 'failed'
    assert 'CellTimeoutError' in (out/'sleepy.html').read_text()                       # and the HTML shows it
    assert 'timeout' not in injected(out/'sleepy.ipynb')                               # the driver's key, not a parameter
    client = MlflowClient(env['MLFLOW_TRACKING_URI'])
    runs = client.search_runs([client.get_experiment_by_name('mhist-timeout').experiment_id])
    assert [x.info.status for x in runs] == ['FAILED']
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id, 'notebook')} == {'notebook/sleepy.ipynb', 'notebook/sleepy.html'}


FAKE_TRAIN = """import json, os, time
from pathlib import Path
if action == 'sleep': time.sleep(120)
if action == 'die': os._exit(1)
score = {'ok': 0.7, 'best': 0.9}[action]"""
FAKE_SAVE = """out = Path(out_dir); out.mkdir(parents=True, exist_ok=True)   # what save_experiment writes, in small
(out/'history_fake.csv').write_text(f'epoch,stage,val_auc,val_balanced_accuracy\\n0,full,0.5,{score}\\n1,full,0.6,0.1\\n')
(out/'run_fake.json').write_text(json.dumps(dict(family='fake', best_epoch=0, best_val_auc=0.5, train_seconds=0.1)))"""


def test_sweep_without_tracking_keeps_failed_trials_and_shows_the_top(tmp_path, env):
    write_nb(tmp_path/'fake.ipynb', "out_dir: str = None\naction: str = 'ok'", FAKE_TRAIN, FAKE_SAVE)
    base = write_yaml(tmp_path/'base.yaml', {'name': 'b', 'run': [str(tmp_path/'fake.ipynb')], 'fake': {'timeout': 3}})
    sweep = write_yaml(tmp_path/'s.yaml', {'name': 's', 'base': str(base), 'notebook': 'fake',
                                           'grid': {'action': ['ok', 'sleep', 'die', 'best']}, 'top': 2,
                                           'rule': {'monitor': 'best_val_balanced_accuracy', 'mode': 'max'}})
    r = mhist('sweep', sweep, '--reports', tmp_path/'reports', '--quiet', env={**env, 'MHIST_TRACKING': 'off'})
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'trial 1 failed' in r.stderr and 'CellTimeoutError' in r.stderr
    assert 'trial 2 failed' in r.stderr and 'DeadKernelError: the kernel died' in r.stderr
    table = pd.read_csv(tmp_path/'reports'/'s'/'sweep.csv')                         # every trial, ranked
    assert table.action.tolist() == ['best', 'ok', 'sleep', 'die']
    assert table.status.tolist() == ['FINISHED', 'FINISHED', 'FAILED', 'FAILED']
    m = table.best_val_balanced_accuracy                                             # the selected epoch's, from the files
    assert m.iloc[:2].tolist() == [0.9, 0.7] and m.iloc[2:].isna().all()
    rows = [line.split() for line in r.stdout.strip().splitlines()]                  # printed: the header and the top 2
    assert len(rows) == 3 and rows[1][rows[0].index('action')] == 'best' and rows[2][rows[0].index('action')] == 'ok'
    assert not (tmp_path/'mlflow.db').exists()                                       # MHIST_TRACKING=off: no MLflow store


def test_sagemaker_two_instances_on_loopback(tmp_path, env, synth_dir):
    """A two-instance SageMaker job, both "instances" on this machine: the first runs the pipeline and its training under
    torchrun as node 0, the second only joins that training as node 1; rank 0 logs every epoch into the notebook's run."""
    from mlflow import MlflowClient
    params = write_yaml(tmp_path/'sm.yaml', {'name': 'sm', 'run': ['10_train_mlp'],
                                             'common': {'data_dir': 'set-by-sagemaker', 'seed': 0, 'quiet': True},
                                             '10_train_mlp': {'epochs': 2, 'save_last': False, 'log_checkpoint': False}})
    hps = json.dumps({'params': str(params), 'name': 'job2', 'master_port': free_port()})
    sm = lambda host: {**env, 'SM_CHANNEL_TRAINING': str(synth_dir), 'SM_MODEL_DIR': str(tmp_path/host/'model'),
                       'SM_OUTPUT_DATA_DIR': str(tmp_path/host/'output'), 'SM_HPS': hps, 'SM_NUM_GPUS': '0',
                       'SM_HOSTS': '["127.0.0.1", "127.0.0.2"]', 'SM_CURRENT_HOST': host, 'OMP_NUM_THREADS': '1'}
    train = lambda host: subprocess.Popen([sys.executable, str(ROOT/'sagemaker'/'train.py')], env=sm(host),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second, first = train('127.0.0.2'), train('127.0.0.1')
    (out2, err2), (out1, err1) = second.communicate(timeout=900), first.communicate(timeout=900)
    assert (first.returncode, second.returncode) == (0, 0), err1[-3000:] + err2[-3000:]
    assert 'joining the training of 10_train_mlp as node 1 of 2 (node 0: 127.0.0.1)' in out2
    assert not (tmp_path/'127.0.0.2'/'output').exists()                  # the second instance runs no notebook
    out = tmp_path/'127.0.0.1'/'output'/'job2'
    assert 'distributed = {"nproc_per_node": 1, "nnodes": 2, "node_rank": 0' in injected(out/'10_train_mlp.ipynb')
    fit = json.loads(next(out.rglob('fit.json')).read_text())
    info = json.loads(next(out.rglob('run_mlp.json')).read_text())
    assert fit['world'] == 2 and len(fit['history']) == 2 and info['best_epoch'] == fit['best']['epoch']
    client = MlflowClient(env['MLFLOW_TRACKING_URI'])
    assert client.get_run(info['run_id']).info.status == 'FINISHED'
    assert [m.step for m in client.get_metric_history(info['run_id'], 'val_auc')] == [0, 1]   # each epoch once: rank 0
    assert list((tmp_path/'127.0.0.1'/'model').rglob('best.pt'))
