"""A shared tracking server for real, on loopback: PostgreSQL (Debian's package, installed by `make test-deps`) as MLflow's
backend store, proxied artifacts, basic auth; a short pipeline run logs into it and is read back through the client.
This is what docker-compose.tracking.yml runs for a group, minus the S3-compatible store (a folder here)."""
import hashlib, json, os, re, secrets, shutil, socket, subprocess, sys, tempfile, time
from pathlib import Path

import pytest, requests, yaml

from conftest import mhist

PG_BINS = sorted(Path('/usr/lib/postgresql').glob('*/bin/initdb'))
PG_BIN = PG_BINS[-1].parent if PG_BINS else (Path(shutil.which('initdb')).parent if shutil.which('initdb') else None)
pytestmark = pytest.mark.skipif(PG_BIN is None, reason='PostgreSQL is absent: `make test-deps` installs Debian\'s postgresql')
MLFLOW = Path(sys.executable).parent/'mlflow'


def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def as_pg(args, **kw):
    "Run a PostgreSQL program as the `postgres` system user when we are root (PostgreSQL refuses to run as root)."
    cmd = [str(PG_BIN/args[0]), *map(str, args[1:])]
    if os.geteuid() == 0: cmd = ['runuser', '-u', 'postgres', '--', *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)


@pytest.fixture(scope='module')
def postgres():
    "A throw-away PostgreSQL cluster on 127.0.0.1 with a password-protected `mlflow` role and two databases."
    d = Path(tempfile.mkdtemp(prefix='mhist-pg-', dir='/var/tmp' if os.geteuid() == 0 else None))
    if os.geteuid() == 0: shutil.chown(d, 'postgres', 'postgres')
    port, pw = free_port(), secrets.token_hex(8)
    as_pg(['initdb', '-D', d/'data', '-U', 'postgres', '-E', 'UTF8', '--auth-local=trust', '--auth-host=scram-sha-256', '--no-sync'])
    as_pg(['pg_ctl', '-D', d/'data', '-l', d/'log', '-w', '-o', f'-h 127.0.0.1 -p {port} -k {d}', 'start'])
    try:
        for sql in (f"CREATE ROLE mlflow LOGIN PASSWORD '{pw}'", 'CREATE DATABASE mlflow OWNER mlflow',
                    'CREATE DATABASE mlflow_auth OWNER mlflow'):
            as_pg(['psql', '-h', d, '-p', port, '-U', 'postgres', '-v', 'ON_ERROR_STOP=1', '-c', sql])
        yield dict(port=port, dir=d, url=lambda db: f'postgresql://mlflow:{pw}@127.0.0.1:{port}/{db}')
    finally:
        subprocess.run(['runuser', '-u', 'postgres', '--'] * (os.geteuid() == 0) + [str(PG_BIN/'pg_ctl'), '-D', str(d/'data'),
                        '-m', 'fast', 'stop'], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def sql(pg, query: str) -> str:
    return as_pg(['psql', '-h', pg['dir'], '-p', pg['port'], '-U', 'postgres', '-d', 'mlflow', '-tAc', query]).stdout.strip()


ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT/'docker'/'tracking-entrypoint.sh'


@pytest.fixture(scope='module')
def server(postgres, tmp_path_factory):
    """The tracking image's command (docker/tracking-entrypoint.sh: `mlflow server` on PostgreSQL, proxied artifacts,
    basic auth) run on loopback with the settings docker-compose.tracking.yml passes, a folder as the artifact store."""
    tmp = tmp_path_factory.mktemp('mlflow-server')
    admin_pw, port = secrets.token_urlsafe(12), free_port()
    url = postgres['url']('mlflow')
    env = {**os.environ, 'HOME': str(tmp), 'PATH': f"{MLFLOW.parent}{os.pathsep}{os.environ.get('PATH', '')}",
           'POSTGRES_HOST': '127.0.0.1', 'POSTGRES_PORT': str(postgres['port']), 'POSTGRES_USER': 'mlflow',
           'POSTGRES_PASSWORD': url.split(':')[2].split('@')[0], 'POSTGRES_DB': 'mlflow', 'MLFLOW_AUTH_DB': 'mlflow_auth',
           'MLFLOW_ADMIN_PASSWORD': admin_pw, 'MLFLOW_ARTIFACTS_DESTINATION': (tmp/'artifacts').as_uri(),
           'MLFLOW_HOST': '127.0.0.1', 'MLFLOW_PORT': str(port), 'MLFLOW_FLASK_SERVER_SECRET_KEY': secrets.token_hex(16)}
    log = open(tmp/'server.log', 'w')
    proc = subprocess.Popen([str(ENTRYPOINT)], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f'http://127.0.0.1:{port}'
    try:
        for _ in range(240):
            if proc.poll() is not None: pytest.fail(f'mlflow server exited: {(tmp/"server.log").read_text()[-3000:]}')
            try:
                if requests.get(f'{uri}/health', timeout=5).ok: break
            except requests.RequestException: pass      # not listening yet, or busy migrating the database
            time.sleep(0.5)
        else: pytest.fail(f'mlflow server did not start: {(tmp/"server.log").read_text()[-3000:]}')
        assert oct((tmp/'basic_auth.ini').stat().st_mode & 0o777) == '0o600'          # it holds the passwords
        yield dict(uri=uri, auth=('admin', admin_pw), artifacts=tmp/'artifacts', log=tmp/'server.log')
    finally:
        os.killpg(proc.pid, 15)
        try: proc.wait(20)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, 9)
        log.close()


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


def test_server_wants_credentials(server):
    url = f"{server['uri']}/api/2.0/mlflow/experiments/search"
    assert requests.get(url, params={'max_results': 1}, timeout=10).status_code == 401
    assert requests.get(url, params={'max_results': 1}, auth=('admin', 'wrong'), timeout=10).status_code == 401
    assert requests.get(url, params={'max_results': 1}, auth=server['auth'], timeout=10).ok


def walk(client, run_id, path=None):
    for a in client.list_artifacts(run_id, path):
        if a.is_dir: yield from walk(client, run_id, a.path)
        else: yield a.path


def test_pipeline_logs_into_the_shared_server(server, postgres, synth_dir, tmp_path):
    "A short pipeline pointed at the server through the environment; runs, metrics, notebooks and ONNX files read back."
    from mlflow import MlflowClient
    params = tmp_path/'shared.yaml'
    params.write_text(yaml.safe_dump({
        'name': 'shared', 'run': ['10_train_mlp', '11_train_vit', '12_threshold', '13_onnx'],
        'common': {'data_dir': str(synth_dir), 'seed': 0, 'quiet': True},
        '10_train_mlp': {'epochs': 2}, '11_train_vit': {'head_epochs': 1, 'full_epochs': 1},
        '13_onnx': {'latency_runs': 2}}))
    user, pw = server['auth']
    env = {**os.environ, 'MLFLOW_TRACKING_URI': server['uri'], 'MLFLOW_TRACKING_USERNAME': user,
           'MLFLOW_TRACKING_PASSWORD': pw, 'MLFLOW_HTTP_REQUEST_MAX_RETRIES': '0'}
    r = mhist('run', params, '--reports', tmp_path/'reports', '--quiet', env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    out = tmp_path/'reports'/'shared'
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=pw)
    try:
        client = MlflowClient(server['uri'])
        info = json.loads((out/'run_mlp.json').read_text())
        run = client.get_run(info['run_id'])
        assert run.info.status == 'FINISHED' and run.data.tags['mhist.pipeline'] == 'shared'
        assert len(client.get_metric_history(run.info.run_id, 'val_auc')) == 2            # one point per epoch
        arts = set(walk(client, run.info.run_id))
        assert {'notebook/10_train_mlp.ipynb', 'onnx/model_mlp.onnx', 'onnx/manifest_mlp.json'} <= arts, sorted(arts)
        got = client.download_artifacts(run.info.run_id, 'onnx/model_mlp.onnx', str(tmp_path))
        sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
        assert sha(got) == sha(out/'model_mlp.onnx')
        assert list(server['artifacts'].rglob('model_mlp.onnx')), 'artifacts were not proxied into the server\'s store'
    finally:
        for k in ('MLFLOW_TRACKING_USERNAME', 'MLFLOW_TRACKING_PASSWORD'): os.environ.pop(k, None)
    # the runs live in PostgreSQL, not in a local file somewhere
    assert sql(postgres, f"SELECT status FROM runs WHERE run_uuid = '{info['run_id']}'") == 'FINISHED'
    assert int(sql(postgres, "SELECT count(*) FROM metrics WHERE key = 'val_auc'")) >= 2
