"""A shared tracking server for real, on loopback: PostgreSQL (Debian's package, installed by `make test-deps`) as MLflow's
backend store, proxied artifacts, basic auth; a short pipeline run logs into it and is read back through the client.
This is what docker-compose.tracking.yml runs for a group, minus the S3-compatible store (a folder here)."""
import hashlib, json, os, re, subprocess
from pathlib import Path

import pytest, requests, yaml

from conftest import ENTRYPOINT, PG_BIN, ROOT, mhist, sql

pytestmark = pytest.mark.skipif(PG_BIN is None, reason='PostgreSQL is absent: `make test-deps` installs Debian\'s postgresql')


def test_entrypoint_names_a_missing_setting(tmp_path):
    r = subprocess.run([str(ENTRYPOINT)], capture_output=True, text=True, env={'PATH': os.environ['PATH'], 'HOME': str(tmp_path),
                       'POSTGRES_USER': 'u', 'POSTGRES_PASSWORD': 'p', 'POSTGRES_DB': 'd', 'MLFLOW_ADMIN_PASSWORD': 'a'})
    assert r.returncode != 0 and 'MLFLOW_ARTIFACTS_DESTINATION is not set' in r.stderr
    assert not (tmp_path/'basic_auth.ini').exists()


def test_compose_tracking_stack():
    "docker-compose.tracking.yml: valid Compose, credentials only from the env file, the server wired to its store."
    import jsonschema
    from test_containers import interpolate
    raw = yaml.safe_load((ROOT/'docker-compose.tracking.yml').read_text())
    example = dict(l.split('=', 1) for l in (ROOT/'.env.tracking.example').read_text().splitlines() if l and not l.startswith('#'))
    doc = interpolate(raw, example)
    schema = json.loads((ROOT/'tests'/'schemas'/'compose_spec.json').read_text())
    errors = [e.message for d in (raw, doc) for e in jsonschema.Draft202012Validator(schema).iter_errors(d)]
    assert errors == [], errors
    with pytest.raises(KeyError, match='POSTGRES_PASSWORD'): interpolate(raw, {k: v for k, v in example.items() if k != 'POSTGRES_PASSWORD'})
    ml = doc['services']['mlflow']
    assert (ROOT/ml['build']['dockerfile']).is_file() and 'tracking-entrypoint.sh' in (ROOT/ml['build']['dockerfile']).read_text()
    read = set(re.findall(r'\$\{(\w+)', ENTRYPOINT.read_text()))
    passed = set(ml['environment']) - {'MLFLOW_S3_ENDPOINT_URL', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY'}  # read by boto3
    assert passed <= read, f'passed but never read: {passed - read}'
    assert ml['environment']['MLFLOW_ARTIFACTS_DESTINATION'].startswith('s3://')
    assert '.env.tracking' in (ROOT/'.gitignore').read_text().split()
    secrets_in_file = [v for v in yaml.safe_dump(raw).split() if 'change-me' in v]
    assert not secrets_in_file


def test_server_wants_credentials(tracking_server):
    url = f"{tracking_server['uri']}/api/2.0/mlflow/experiments/search"
    assert requests.get(url, params={'max_results': 1}, timeout=10).status_code == 401
    assert requests.get(url, params={'max_results': 1}, auth=('admin', 'wrong'), timeout=10).status_code == 401
    assert requests.get(url, params={'max_results': 1}, auth=tracking_server['auth'], timeout=10).ok


def walk(client, run_id, path=None):
    for a in client.list_artifacts(run_id, path):
        if a.is_dir: yield from walk(client, run_id, a.path)
        else: yield a.path


def test_pipeline_logs_into_the_shared_server(tracking_server, postgres, synth_dir, tmp_path):
    "A short pipeline pointed at the server through the environment; runs, metrics, notebooks and ONNX files read back."
    from mlflow import MlflowClient
    params = tmp_path/'shared.yaml'
    params.write_text(yaml.safe_dump({
        'name': 'shared', 'run': ['10_train_mlp', '13_onnx'],       # one family is enough to see every kind of record
        'common': {'data_dir': str(synth_dir), 'seed': 0, 'quiet': True},
        '10_train_mlp': {'epochs': 2}, '13_onnx': {'families': ['mlp'], 'latency_runs': 2}}))
    user, pw = tracking_server['auth']
    env = {**os.environ, 'MLFLOW_TRACKING_URI': tracking_server['uri'], 'MLFLOW_TRACKING_USERNAME': user,
           'MLFLOW_TRACKING_PASSWORD': pw, 'MLFLOW_HTTP_REQUEST_MAX_RETRIES': '0'}
    r = mhist('run', params, '--reports', tmp_path/'reports', '--quiet', env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    out = tmp_path/'reports'/'shared'
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=pw)
    try:
        client = MlflowClient(tracking_server['uri'])
        info = json.loads((out/'run_mlp.json').read_text())
        run = client.get_run(info['run_id'])
        assert run.info.status == 'FINISHED' and run.data.tags['mhist.pipeline'] == 'shared'
        assert len(client.get_metric_history(run.info.run_id, 'val_auc')) == 2            # one point per epoch
        arts = set(walk(client, run.info.run_id))
        assert {'notebook/10_train_mlp.ipynb', 'onnx/model_mlp.onnx', 'onnx/manifest_mlp.json'} <= arts, sorted(arts)
        got = client.download_artifacts(run.info.run_id, 'onnx/model_mlp.onnx', str(tmp_path))
        sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
        assert sha(got) == sha(out/'model_mlp.onnx')
        assert list(tracking_server['artifacts'].rglob('model_mlp.onnx')), 'artifacts were not proxied into the server\'s store'
    finally:
        for k in ('MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD'): os.environ.pop(k, None)
    # the runs live in PostgreSQL, not in a local file somewhere
    assert sql(postgres, f"SELECT status FROM runs WHERE run_uuid = '{info['run_id']}'") == 'FINISHED'
    assert int(sql(postgres, "SELECT count(*) FROM metrics WHERE key = 'val_auc'")) >= 2


def test_server_down_mid_run(postgres, synth_dir, tmp_path):
    """The server dies during training and comes back: training finishes, the checkpoint is kept, the notebook shows one
    warning, tracking is off from the first failure, and the driver marks the run incomplete once the server answers."""
    import time
    from mlflow import MlflowClient
    from conftest import BIN, TrackingServer
    srv = TrackingServer(postgres, tmp_path/'server').start()
    epochs = 20                                       # long enough to stop the server while it trains
    params = tmp_path/'p.yaml'
    params.write_text(yaml.safe_dump({'name': 'down', 'run': ['10_train_mlp'],
                                      'common': {'data_dir': str(synth_dir), 'seed': 0, 'quiet': True},
                                      '10_train_mlp': {'epochs': epochs, 'experiment': 'mhist-down', 'log_checkpoint': False}}))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(('MHIST_', 'MLFLOW_'))},
           'MLFLOW_TRACKING_URI': srv.uri, 'MLFLOW_TRACKING_USERNAME': srv.auth[0], 'MLFLOW_TRACKING_PASSWORD': srv.auth[1]}
    run = subprocess.Popen([str(BIN/'mhist'), 'run', str(params), '--reports', str(tmp_path/'reports'), '--quiet'], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.environ.update(MLFLOW_TRACKING_USERNAME=srv.auth[0], MLFLOW_TRACKING_PASSWORD=srv.auth[1])
    try:
        client = MlflowClient(srv.uri)
        rid, t_end = None, time.monotonic() + 300
        while time.monotonic() < t_end and run.poll() is None:          # until the first epoch is logged
            exp = client.get_experiment_by_name('mhist-down')
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and client.get_metric_history(runs[0].info.run_id, 'val_auc'):
                rid = runs[0].info.run_id; break
            time.sleep(0.3)
        assert rid and run.poll() is None, 'training ended before the server could be stopped'
        srv.stop()                                                        # the server dies mid-run...
        time.sleep(3)
        srv.start()                                                       # ...and comes back
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
        rep = tmp_path/'reports'/'down'
        assert (rep/'ckpt_mlp_small'/'best.pt').is_file() and (rep/'predictions_mlp_test.csv').is_file()
        import nbformat
        nb = nbformat.read(rep/'10_train_mlp.ipynb', as_version=4)
        texts = ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []))
        assert texts.count('UserWarning: MLflow failed while') == 1, texts[-3000:]         # one warning, then silence
        r = client.get_run(rid)
        assert r.info.status == 'FINISHED' and r.data.tags.get('mhist.tracking') == 'incomplete', r.data.tags
        assert len(client.get_metric_history(rid, 'val_auc')) < epochs                    # nothing logged after the failure
        assert 'notebook/10_train_mlp.ipynb' in {a.path for a in client.list_artifacts(rid, 'notebook')}
        assert not list(rep.glob('.tracking_incomplete_*'))
    finally:
        for k in ('MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD'): os.environ.pop(k, None)
        if run.poll() is None: run.kill()
        srv.stop()
