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
        'name': 'shared', 'run': ['10_train_mlp', '11_train_vit', '12_threshold', '13_onnx'],
        'common': {'data_dir': str(synth_dir), 'seed': 0, 'quiet': True},
        '10_train_mlp': {'epochs': 2}, '11_train_vit': {'head_epochs': 1, 'full_epochs': 1},
        '13_onnx': {'latency_runs': 2}}))
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
